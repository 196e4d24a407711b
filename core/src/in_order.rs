//! In-order delivery of one blob and its whole-blob digest check, without IO.
//!
//! Pieces complete in any order; the client must get them in index order, and
//! the last piece only if the bytes before it and it hash to the blob's
//! digest. Piece hashes may come from peers, so only that digest vouches for
//! the whole: a hash list that lies consistently passes every piece check and
//! is caught here, before the client has the complete blob.

use std::collections::BTreeMap;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::vocab::Digest;

/// What the driver does next for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send these bytes: the piece at the read position.
    Deliver(Bytes),
    /// The piece at the read position was on disk before this download began
    /// (resume): read it back and [`InOrder::insert`] it.
    ReadBack(u64),
    /// The piece at the read position has not arrived yet.
    Wait,
    /// Every piece has been delivered and the blob matched its digest.
    Finished,
    /// Every piece matched its hash but the blob fails its digest: the hash
    /// list was poisoned. The last piece is withheld.
    Poisoned,
}

pub struct InOrder {
    digest: Digest,
    pieces: u64,
    next: u64,
    ready: BTreeMap<u64, Bytes>,
    whole: Sha256,
    poisoned: bool,
}

impl InOrder {
    pub fn new(digest: Digest, pieces: u64) -> Self {
        Self {
            digest,
            pieces,
            next: 0,
            ready: BTreeMap::new(),
            whole: Sha256::new(),
            poisoned: false,
        }
    }

    /// A verified piece is in. Pieces already delivered are ignored.
    pub fn insert(&mut self, piece: u64, data: Bytes) {
        if !self.poisoned && piece >= self.next && piece < self.pieces {
            self.ready.insert(piece, data);
        }
    }

    /// The index of the next piece the client needs (the scheduler's read
    /// position).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Every piece has been delivered.
    pub fn finished(&self) -> bool {
        !self.poisoned && self.next >= self.pieces
    }

    /// The next step; `held(i)`: piece `i` is on disk from before.
    pub fn next(&mut self, held: impl Fn(u64) -> bool) -> Next {
        if self.poisoned {
            return Next::Poisoned;
        }
        if self.next >= self.pieces {
            return Next::Finished;
        }
        let Some(data) = self.ready.remove(&self.next) else {
            return if held(self.next) {
                Next::ReadBack(self.next)
            } else {
                Next::Wait
            };
        };
        self.whole.update(&data);
        if self.next + 1 == self.pieces {
            let sum = Digest(std::mem::take(&mut self.whole).finalize().into());
            if sum != self.digest {
                self.ready.clear();
                self.poisoned = true;
                return Next::Poisoned;
            }
        }
        self.next += 1;
        Next::Deliver(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(pieces: &[&'static [u8]]) -> (Digest, Vec<Bytes>) {
        let whole: Vec<u8> = pieces.concat();
        let digest = Digest(Sha256::digest(&whole).into());
        (
            digest,
            pieces.iter().map(|p| Bytes::from_static(p)).collect(),
        )
    }

    fn none(_: u64) -> bool {
        false
    }

    #[test]
    fn delivers_in_index_order_whatever_the_arrival_order() {
        let (digest, p) = blob(&[b"ab", b"cd", b"e"]);
        let mut o = InOrder::new(digest, 3);
        o.insert(2, p[2].clone());
        assert_eq!(o.next(none), Next::Wait);
        o.insert(1, p[1].clone());
        assert_eq!(o.next(none), Next::Wait);
        o.insert(0, p[0].clone());
        assert_eq!(o.next(none), Next::Deliver(p[0].clone()));
        assert_eq!(o.position(), 1);
        assert_eq!(o.next(none), Next::Deliver(p[1].clone()));
        assert_eq!(o.next(none), Next::Deliver(p[2].clone()));
        assert_eq!(o.next(none), Next::Finished);
        assert_eq!(o.position(), 3);
    }

    #[test]
    fn a_piece_held_from_before_is_read_back_then_delivered() {
        let (digest, p) = blob(&[b"ab", b"cd"]);
        let mut o = InOrder::new(digest, 2);
        o.insert(1, p[1].clone());
        let held = |i| i == 0;
        assert_eq!(o.next(held), Next::ReadBack(0));
        // Asking again without the bytes asks again.
        assert_eq!(o.next(held), Next::ReadBack(0));
        o.insert(0, p[0].clone());
        assert_eq!(o.next(held), Next::Deliver(p[0].clone()));
        assert_eq!(o.next(held), Next::Deliver(p[1].clone()));
        assert_eq!(o.next(held), Next::Finished);
    }

    #[test]
    fn a_blob_failing_its_digest_withholds_the_last_piece_for_good() {
        let (digest, p) = blob(&[b"ab", b"cd"]);
        let mut o = InOrder::new(digest, 2);
        o.insert(0, p[0].clone());
        o.insert(1, Bytes::from_static(b"cX"));
        assert_eq!(o.next(none), Next::Deliver(p[0].clone()));
        assert_eq!(o.next(none), Next::Poisoned);
        // Not delivered later either, even if the right bytes come.
        o.insert(1, p[1].clone());
        assert_eq!(o.next(none), Next::Poisoned);
        assert_eq!(o.position(), 1);
    }

    #[test]
    fn late_duplicates_and_out_of_range_pieces_are_ignored() {
        let (digest, p) = blob(&[b"ab", b"cd"]);
        let mut o = InOrder::new(digest, 2);
        o.insert(0, p[0].clone());
        assert_eq!(o.next(none), Next::Deliver(p[0].clone()));
        // A second copy of piece 0 must not be hashed into the blob again.
        o.insert(0, Bytes::from_static(b"zz"));
        o.insert(7, Bytes::from_static(b"zz"));
        o.insert(1, p[1].clone());
        assert_eq!(o.next(none), Next::Deliver(p[1].clone()));
        assert_eq!(o.next(none), Next::Finished);
    }

    #[test]
    fn a_single_piece_blob_is_checked_before_delivery() {
        let (digest, p) = blob(&[b"only"]);
        let mut o = InOrder::new(digest, 1);
        o.insert(0, Bytes::from_static(b"ONLY"));
        assert_eq!(o.next(none), Next::Poisoned);
        let mut o = InOrder::new(digest, 1);
        o.insert(0, p[0].clone());
        assert_eq!(o.next(none), Next::Deliver(p[0].clone()));
        assert_eq!(o.next(none), Next::Finished);
    }
}
