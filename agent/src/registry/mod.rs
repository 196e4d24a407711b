//! OCI distribution routing: blob GET/HEAD by digest go through the cache;
//! everything else goes to the origin as is.

pub mod authz;
pub mod blob;
pub mod proxy;
pub mod range;
pub mod route;
pub mod service;
pub mod trace;
