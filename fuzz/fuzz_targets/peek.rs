//! The first bytes of a steered connection: a ClientHello (SNI) or an HTTP
//! request head (Host), from any process on the node.
#![no_main]

use damselfly::intercept::{PEEK_LIMIT, Peek, classify};
use libfuzzer_sys::fuzz_target;

fn check(buf: &[u8]) {
    let peek = classify(buf);
    // The caller keeps reading while told NeedMore: past the limit that would
    // buffer without end.
    if buf.len() >= PEEK_LIMIT {
        assert_ne!(peek, Peek::NeedMore, "{} bytes", buf.len());
    }
    let _ = (peek.protocol(), peek.name());
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // libFuzzer's inputs stay under 4 KiB, short of the limit: now and then
    // repeat one past it (a head or hello that never ends).
    // Its first byte kept (it picks TLS or HTTP), the rest repeated.
    if data.len() > 2 && data.last().is_some_and(|b| b % 8 == 0) {
        let body = &data[..data.len() - 1];
        let mut long = body.to_vec();
        while long.len() < PEEK_LIMIT {
            long.extend_from_slice(&body[1..]);
        }
        check(&long);
    }
});
