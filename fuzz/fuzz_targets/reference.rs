//! Image references and blob URLs (from the CLI, and from manifests and
//! redirects naming other registries).
#![no_main]

use damselfly::oci::{BlobUrl, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(s) {
        // What is printed (logs, the pull's own name for the image) reads back
        // as the same reference.
        let again = Reference::parse(&r.to_string())
            .unwrap_or_else(|e| panic!("{s:?} printed as {r} does not parse: {e}"));
        assert_eq!(again, r, "{s:?}");
        let _ = (r.api_host(), r.manifest_ref(), r.tag_or_default());
        let _ = r.origin("https").authority();
    }
    if let Ok(u) = BlobUrl::parse(s) {
        let again = BlobUrl::parse(&u.to_string())
            .unwrap_or_else(|e| panic!("{s:?} printed as {u} does not parse: {e}"));
        assert_eq!(again, u, "{s:?}");
        assert_eq!(
            BlobUrl::new(&u.origin(), &u.repo, &u.digest()).as_ref(),
            Ok(&u)
        );
    }
});
