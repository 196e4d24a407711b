//! The peer wire protocol, version 1: one request per bidirectional QUIC
//! stream (ALPN `damselfly/1`). Pure encode/decode; nothing here panics on
//! any input.
//!
//! ```text
//! request  (client -> server, then the client finishes its side)
//!   0      1  magic 0xDF
//!   1      1  version 0x01
//!   2     32  blob digest: the raw sha256
//!   34     8  piece index, u64 big-endian
//!          = 42 bytes
//!
//! response (server -> client, then the server finishes its side)
//!   0      1  status: 0 ok, 1 not found, 2 busy (refused), 3 error
//!   ok only:
//!   1      8  piece length, u64 big-endian
//!   9      …  the piece's bytes, exactly that many
//! ```
//!
//! The piece's index and length follow from the blob's piece size, which
//! both sides learn from the tracker; the receiver checks the length it
//! expects before reading, and the piece's sha256 after.

use crate::vocab::Digest;

pub const MAGIC: u8 = 0xDF;
pub const VERSION: u8 = 1;
pub const REQUEST_LEN: usize = 42;
/// The longest response head (an ok status with its length).
pub const RESPONSE_HEAD_MAX: usize = 9;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("request is {0} bytes, expected {REQUEST_LEN}")]
    RequestLength(usize),
    #[error("bad magic byte {0:#04x}")]
    Magic(u8),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown response status {0}")]
    Status(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub digest: Digest,
    pub index: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0] = MAGIC;
        out[1] = VERSION;
        out[2..34].copy_from_slice(&self.digest.0);
        out[34..42].copy_from_slice(&self.index.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let buf: &[u8; REQUEST_LEN] = buf
            .try_into()
            .map_err(|_| WireError::RequestLength(buf.len()))?;
        if buf[0] != MAGIC {
            return Err(WireError::Magic(buf[0]));
        }
        if buf[1] != VERSION {
            return Err(WireError::Version(buf[1]));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&buf[2..34]);
        let mut index = [0u8; 8];
        index.copy_from_slice(&buf[34..42]);
        Ok(Self {
            digest: Digest(digest),
            index: u64::from_be_bytes(index),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Busy = 2,
    Error = 3,
}

impl TryFrom<u8> for Status {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::Busy,
            3 => Self::Error,
            b => return Err(WireError::Status(b)),
        })
    }
}

/// What precedes a response's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseHead {
    /// `len` bytes of piece follow.
    Ok {
        len: u64,
    },
    NotFound,
    Busy,
    Error,
}

impl ResponseHead {
    pub fn status(&self) -> Status {
        match self {
            Self::Ok { .. } => Status::Ok,
            Self::NotFound => Status::NotFound,
            Self::Busy => Status::Busy,
            Self::Error => Status::Error,
        }
    }

    /// The encoded head; its length is the returned count.
    pub fn encode(&self) -> ([u8; RESPONSE_HEAD_MAX], usize) {
        let mut out = [0u8; RESPONSE_HEAD_MAX];
        out[0] = self.status() as u8;
        match self {
            Self::Ok { len } => {
                out[1..9].copy_from_slice(&len.to_be_bytes());
                (out, RESPONSE_HEAD_MAX)
            }
            _ => (out, 1),
        }
    }

    /// Parses a head from the start of `buf`: `Ok(None)` if more bytes are
    /// needed, else the head and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let head = match Status::try_from(first)? {
            Status::Ok => {
                let Some(len) = buf.get(1..RESPONSE_HEAD_MAX) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(len.try_into().expect("8 bytes"));
                return Ok(Some((Self::Ok { len }, RESPONSE_HEAD_MAX)));
            }
            Status::NotFound => Self::NotFound,
            Status::Busy => Self::Busy,
            Status::Error => Self::Error,
        };
        Ok(Some((head, 1)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn request_round_trips_big_endian() {
        let r = Request {
            digest: Digest::of(b"x"),
            index: 0x0102_0304_0506_0708,
        };
        let b = r.encode();
        assert_eq!(&b[..2], &[0xDF, 1]);
        assert_eq!(&b[34..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(Request::decode(&b), Ok(r));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let good = Request {
            digest: Digest::of(b"x"),
            index: 3,
        }
        .encode();
        assert_eq!(Request::decode(&[]), Err(WireError::RequestLength(0)));
        assert_eq!(
            Request::decode(&good[..41]),
            Err(WireError::RequestLength(41))
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(Request::decode(&long), Err(WireError::RequestLength(43)));
        let mut bad = good;
        bad[0] = 0x16; // a TLS record, say
        assert_eq!(Request::decode(&bad), Err(WireError::Magic(0x16)));
        let mut bad = good;
        bad[1] = 2;
        assert_eq!(Request::decode(&bad), Err(WireError::Version(2)));
    }

    #[test]
    fn response_heads_round_trip() {
        for h in [
            ResponseHead::Ok { len: 0 },
            ResponseHead::Ok { len: u64::MAX },
            ResponseHead::Ok { len: 4 << 20 },
            ResponseHead::NotFound,
            ResponseHead::Busy,
            ResponseHead::Error,
        ] {
            let (buf, n) = h.encode();
            assert_eq!(ResponseHead::decode(&buf[..n]), Ok(Some((h, n))));
            // Trailing body bytes are not part of the head.
            let mut more = buf[..n].to_vec();
            more.extend_from_slice(b"body");
            assert_eq!(ResponseHead::decode(&more), Ok(Some((h, n))));
            for cut in 0..n {
                assert_eq!(ResponseHead::decode(&buf[..cut]), Ok(None), "{h:?} {cut}");
            }
        }
        assert_eq!(ResponseHead::Busy.encode().0[0], 2);
    }

    #[test]
    fn unknown_status_is_refused() {
        assert_eq!(ResponseHead::decode(&[4]), Err(WireError::Status(4)));
        assert_eq!(
            ResponseHead::decode(&[0xff, 0]),
            Err(WireError::Status(0xff))
        );
    }

    proptest! {
        #[test]
        fn decoding_anything_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::decode(&buf);
            if let Ok(Some((h, n))) = ResponseHead::decode(&buf) {
                prop_assert!(n <= buf.len());
                prop_assert_eq!(&h.encode().0[..n], &buf[..n]);
            }
        }
    }
}
