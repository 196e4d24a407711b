//! OCI distribution routing: blob GET/HEAD by digest go through the cache;
//! everything else goes to the origin as is.

pub mod hosts;

pub use hosts::RegistryHosts;
