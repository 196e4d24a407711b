//! Deterministic test bodies: the server and the test agree on the bytes (and
//! so on the sha256) without shipping them around.

use sha2::{Digest, Sha256};

/// Fill `buf` with the bytes at `offset..offset+buf.len()` of body number `seed`.
/// Blocks of 8 bytes from a splitmix64 stream keyed by (seed, block index),
/// so any offset can be produced without generating what comes before.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let block = pos / 8;
        let word = splitmix(seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// sha256 (hex) of the first `len` bytes of body `seed`.
pub fn sha256(seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_offset_matches_the_stream() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        for off in [0usize, 1, 7, 8, 13, 64] {
            let mut part = vec![0u8; 100 - off];
            fill(7, off as u64, &mut part);
            assert_eq!(part, whole[off..], "offset {off}");
        }
    }

    #[test]
    fn seeds_differ_and_hash_is_stable() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill(1, 0, &mut a);
        fill(2, 0, &mut b);
        assert_ne!(a, b);
        assert_eq!(sha256(3, 1000), sha256(3, 1000));
        assert_ne!(sha256(3, 1000), sha256(3, 999));
    }
}
