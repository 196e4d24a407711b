//! `WWW-Authenticate` headers from any registry (or anything answering in its
//! place), and the `--creds` value.
#![no_main]

use damselfly::oci::{Credential, parse_challenges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Header values are bytes; callers see them through `to_str` or lossily.
    let header = String::from_utf8_lossy(data);
    let challenges = parse_challenges(&header);
    // Each challenge starts at a word of the header, so there are never more
    // challenges than bytes.
    assert!(challenges.len() <= data.len());
    for c in &challenges {
        assert!(!c.scheme.is_empty());
        let _ = (c.param("realm"), c.param("service"), c.param("scope"));
    }
    if let Ok(c) = Credential::parse(&header) {
        let _ = c.basic();
    }
});
