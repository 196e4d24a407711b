//! What `damselfly get` and `preheat` need to know about images: references,
//! manifests, registry credentials and the token flow.

mod auth;
mod client;
mod manifest;
mod reference;

#[cfg(test)]
mod tests;

pub use auth::{Credential, parse_challenges};
pub use client::{ClientError, Platforms, RegistryClient, error_message};
pub use manifest::{Descriptor, Manifest, OCI_INDEX, Platform, REF_NAME};
pub(crate) use reference::valid_repo;

pub use reference::{BlobUrl, Reference};

/// Percent-encode everything but RFC 3986's unreserved characters, for a
/// value inside a query string.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undo percent-encoding (and `+` for space, as forms send it); `None` if a
/// `%` is not followed by two hex digits or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in a query string, decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| percent_decode(v))
}
