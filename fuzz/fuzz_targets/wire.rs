//! The peer wire format: requests a peer's server reads from any QUIC client
//! with a cluster certificate, response heads a client reads from a peer.
#![no_main]

use damselfly::swarm::wire::{REQUEST_LEN, Request, ResponseHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(data.len(), REQUEST_LEN);
        assert_eq!(&r.encode()[..], data);
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }
    if let Ok(Some((head, n))) = ResponseHead::decode(data) {
        assert!(n <= data.len());
        let (buf, len) = head.encode();
        assert_eq!(len, n);
        assert_eq!(&buf[..len], &data[..n]);
        assert_eq!(ResponseHead::decode(&buf[..len]), Ok(Some((head, n))));
    }
});
