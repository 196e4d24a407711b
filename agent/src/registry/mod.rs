//! OCI distribution routing: blob GET/HEAD by digest go through the cache;
//! everything else goes to the origin as is.

mod authz;
mod blob;
mod proxy;
mod range;
mod route;
mod service;
mod trace;

pub use blob::Blobs;
pub use proxy::error_response;
pub use route::{Route, route};
pub use service::RegistryService;
