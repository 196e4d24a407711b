//! Manifests and indexes from a registry, with the `Content-Type` it sent.
#![no_main]

use damselfly::oci::{Manifest, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // An optional Content-Type line, then the body.
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (std::str::from_utf8(&data[..i]).ok(), &data[i + 1..]),
        None => (None, data),
    };
    match Manifest::parse(content_type, body) {
        Ok((_, Manifest::Image(m))) => {
            let _ = m.blobs().count();
        }
        Ok((_, Manifest::Index(i))) => {
            let _ = i.select(&Platform::host());
            let _ = i.platforms();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Some(Ok(p)) = content_type.map(str::parse::<Platform>) {
        assert_eq!(p.to_string().parse::<Platform>().ok(), Some(p));
    }
});
