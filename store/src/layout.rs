//! The meta file that sits beside every blob's data (`<hex>.meta`). Pure:
//! encoding and offsets only.
//!
//! ```text
//! offset 0   8 bytes  magic "DFLYBLB1"
//!        8   u64 LE   blob size in bytes
//!       16   u64 LE   piece size in bytes (the blob's own; the store's may change)
//!       24   ceil(pieces/8) bytes  piece bitmap (see `bitmap`)
//!       ..   pieces * 32 bytes     sha256 of each piece, in piece order
//! ```
//!
//! The file is created at its full length, so a piece's sum and bitmap byte are
//! rewritten in place. A complete blob keeps its meta file (bitmap all ones)
//! because every read checks the piece sums in it.

pub(super) const MAGIC: &[u8; 8] = b"DFLYBLB1";
pub(super) const HEADER_LEN: u64 = 24;
pub(super) const SUM_LEN: u64 = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum BadHeader {
    #[error("meta file: not a Damselfly blob header")]
    Magic,
    #[error("meta file: piece size 0")]
    PieceSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub size: u64,
    pub piece_size: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.piece_size.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<Self, BadHeader> {
        if &b[..8] != MAGIC {
            return Err(BadHeader::Magic);
        }
        let size = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let piece_size = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        if piece_size == 0 {
            return Err(BadHeader::PieceSize);
        }
        Ok(Self { size, piece_size })
    }

    pub(super) fn pieces(&self) -> u64 {
        self.size.div_ceil(self.piece_size)
    }

    /// Byte range of piece `i` within the blob; the last piece may be short.
    pub(super) fn piece_range(&self, i: u64) -> (u64, u64) {
        let start = i * self.piece_size;
        (start, (start + self.piece_size).min(self.size))
    }

    pub(super) fn bitmap_offset(&self) -> u64 {
        HEADER_LEN
    }

    pub(super) fn bitmap_len(&self) -> u64 {
        self.pieces().div_ceil(8)
    }

    pub(super) fn sum_offset(&self, i: u64) -> u64 {
        HEADER_LEN + self.bitmap_len() + i * SUM_LEN
    }

    /// The length a well-formed meta file has.
    pub(super) fn meta_len(&self) -> u64 {
        self.sum_offset(self.pieces())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_offsets() {
        let h = Header {
            size: 10 * 1024 + 1,
            piece_size: 1024,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert_eq!(h.pieces(), 11);
        assert_eq!(h.piece_range(10), (10240, 10241));
        assert_eq!(h.piece_range(0), (0, 1024));
        assert_eq!(h.bitmap_len(), 2);
        assert_eq!(h.sum_offset(0), 26);
        assert_eq!(h.meta_len(), 26 + 11 * 32);
    }

    #[test]
    fn refuses_foreign_files() {
        let mut b = Header {
            size: 1,
            piece_size: 1,
        }
        .encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(BadHeader::Magic));
        let b = Header {
            size: 1,
            piece_size: 0,
        }
        .encode();
        assert_eq!(Header::decode(&b), Err(BadHeader::PieceSize));
    }

    #[test]
    fn empty_blob_has_no_pieces() {
        let h = Header {
            size: 0,
            piece_size: 4,
        };
        assert_eq!(h.pieces(), 0);
        assert_eq!(h.meta_len(), HEADER_LEN);
    }
}
