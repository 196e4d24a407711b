//! OCI distribution routing: blob GET/HEAD by digest go through the cache;
//! everything else goes to the origin as is.

mod authz;
mod blob;
mod blob_trace;
mod proxy;
mod range;
mod route;
mod service;

pub use blob::Blobs;
pub use proxy::error_response;
pub use route::{Route, route};
pub use service::RegistryService;
