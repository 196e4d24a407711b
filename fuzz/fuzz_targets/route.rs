//! Registry request routing: method and path of any request a steered client
//! sends to the node's registry endpoint.
#![no_main]

use damselfly::registry::{Route, route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // "METHOD path", as on a request line.
    let (method, path) = match data.iter().position(|&b| b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"GET"[..], data),
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    if let Route::Blob { repo, hex, head } = route(&method, path) {
        // A blob route is exactly what the path said, nothing more.
        assert_eq!(path, format!("/v2/{repo}/blobs/sha256:{hex}"));
        assert_eq!(head, method == http::Method::HEAD);
    }
});
