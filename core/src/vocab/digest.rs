//! Blob names: a sha256 digest, as OCI spells it (`sha256:<64 lowercase hex>`).

use std::{fmt, str::FromStr};

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a digest like sha256:<64 hex digits>")]
pub struct BadDigest(pub String);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `data`, for tests and small inputs; blobs are hashed
    /// streaming by the store.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// 64 lowercase hex digits: the blob's file name.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

impl FromStr for Digest {
    type Err = BadDigest;

    /// `sha256:<hex>` or bare `<hex>`. Upper-case hex is refused: the
    /// distribution spec says lowercase, and one spelling per blob keeps one
    /// file per blob.
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let bad = || BadDigest(s.to_string());
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        if h.len() != 64 {
            return Err(bad());
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in h.as_bytes().chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0]).ok_or_else(bad)? << 4) | nibble(pair[1]).ok_or_else(bad)?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_both_spellings_and_prints_the_prefixed_one() {
        let a: Digest = format!("sha256:{EMPTY}").parse().unwrap();
        let b: Digest = EMPTY.parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a, Digest::of(b""));
        assert_eq!(a.hex(), EMPTY);
        assert_eq!(a.to_string(), format!("sha256:{EMPTY}"));
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "sha256:",
            &EMPTY[1..],
            &format!("{EMPTY}0"),
            &EMPTY.to_uppercase(),
            &format!("sha512:{EMPTY}"),
            &format!("{}g", &EMPTY[1..]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
        }
    }
}
