//! Which pieces of a blob are on disk. Pure; the store persists
//! [`Bitmap::as_bytes`] inside the blob's meta file (see `layout`).
//!
//! Bit `i` is bit `i % 8` (least significant first) of byte `i / 8`, so
//! setting one piece rewrites exactly one byte on disk, and a single-byte
//! write cannot be torn.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadBitmap {
    #[error("piece bitmap: {got} bytes for {pieces} pieces (expected {expected})")]
    Length {
        pieces: u64,
        got: usize,
        expected: usize,
    },
    #[error("piece bitmap: bits set past the last piece")]
    TrailingBits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pieces: u64,
    bytes: Vec<u8>,
    held: u64,
}

impl Bitmap {
    pub fn new(pieces: u64) -> Self {
        Self {
            pieces,
            bytes: vec![0; Self::byte_len(pieces)],
            held: 0,
        }
    }

    /// Bytes needed on disk for `pieces` bits.
    pub fn byte_len(pieces: u64) -> usize {
        pieces.div_ceil(8) as usize
    }

    pub fn from_bytes(pieces: u64, bytes: &[u8]) -> Result<Self, BadBitmap> {
        let expected = Self::byte_len(pieces);
        if bytes.len() != expected {
            return Err(BadBitmap::Length {
                pieces,
                got: bytes.len(),
                expected,
            });
        }
        // Stray bits past the end mean the file is not what we wrote; refusing
        // it keeps `held` honest (a count that could reach `pieces` early).
        if !pieces.is_multiple_of(8) && bytes[expected - 1] >> (pieces % 8) != 0 {
            return Err(BadBitmap::TrailingBits);
        }
        let held = bytes.iter().map(|b| u64::from(b.count_ones())).sum();
        Ok(Self {
            pieces,
            bytes: bytes.to_vec(),
            held,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn pieces(&self) -> u64 {
        self.pieces
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn is_complete(&self) -> bool {
        self.held == self.pieces
    }

    /// False for an index past the end.
    pub fn get(&self, i: u64) -> bool {
        i < self.pieces && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Sets bit `i`; returns the byte offset within [`Self::as_bytes`] that
    /// changed, which is all the caller needs to persist.
    ///
    /// # Panics
    /// If `i` is past the end: the store checks indices before writing data.
    pub fn set(&mut self, i: u64) -> usize {
        assert!(i < self.pieces, "piece {i} of {}", self.pieces);
        let at = (i / 8) as usize;
        if self.bytes[at] & (1 << (i % 8)) == 0 {
            self.bytes[at] |= 1 << (i % 8);
            self.held += 1;
        }
        at
    }

    /// The byte that holds bit `i` and its value with the bit set, without
    /// setting it: the store persists it first and calls [`Self::set`] after.
    ///
    /// # Panics
    /// If `i` is past the end.
    pub fn byte_with(&self, i: u64) -> (usize, u8) {
        assert!(i < self.pieces, "piece {i} of {}", self.pieces);
        let at = (i / 8) as usize;
        (at, self.bytes[at] | 1 << (i % 8))
    }

    /// Sets every bit `other` has (same piece count; bits past either's end
    /// are never set).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
            self.held += u64::from((b & !*a).count_ones());
            *a |= b;
        }
    }

    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pieces).filter(|&i| !self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_holds_what_either_holds() {
        let mut a = Bitmap::new(10);
        a.set(1);
        a.set(9);
        let mut b = Bitmap::new(10);
        b.set(1);
        b.set(4);
        a.union_with(&b);
        assert_eq!(a.held(), 3);
        assert!(a.get(1) && a.get(4) && a.get(9) && !a.get(0));
    }

    #[test]
    fn set_get_and_missing() {
        let mut b = Bitmap::new(11);
        assert_eq!(b.as_bytes().len(), 2);
        assert_eq!(b.byte_with(9), (1, 0b10));
        assert_eq!(b.set(0), 0);
        assert_eq!(b.set(9), 1);
        b.set(9);
        assert!(b.get(0) && b.get(9) && !b.get(1) && !b.get(11));
        assert_eq!(b.held(), 2);
        assert_eq!(b.as_bytes(), &[0b1, 0b10]);
        assert_eq!(
            b.missing().collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8, 10]
        );
        for i in 0..11 {
            b.set(i);
        }
        assert!(b.is_complete());
        assert_eq!(b.missing().count(), 0);
    }

    #[test]
    fn round_trips_through_bytes() {
        let mut b = Bitmap::new(20);
        for i in [1, 7, 8, 19] {
            b.set(i);
        }
        let c = Bitmap::from_bytes(20, b.as_bytes()).unwrap();
        assert_eq!(b, c);
    }

    #[test]
    fn refuses_wrong_length_and_stray_bits() {
        assert!(matches!(
            Bitmap::from_bytes(9, &[0]),
            Err(BadBitmap::Length { .. })
        ));
        assert_eq!(
            Bitmap::from_bytes(9, &[0, 0b10]),
            Err(BadBitmap::TrailingBits)
        );
        assert!(Bitmap::from_bytes(8, &[0xff]).unwrap().is_complete());
    }

    #[test]
    fn empty_blob_is_complete() {
        let b = Bitmap::new(0);
        assert!(b.is_complete());
        assert!(b.as_bytes().is_empty());
        assert_eq!(Bitmap::from_bytes(0, &[]).unwrap(), b);
    }
}
