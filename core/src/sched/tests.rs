use super::*;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};

const PS: u64 = 100;
const A: PeerId = PeerId(1);
const B: PeerId = PeerId(2);
const C: PeerId = PeerId(3);

fn cfg() -> Config {
    Config {
        endgame: false,
        ..Config::eager()
    }
}

/// `n` full pieces, none held, every hash known.
fn sched(n: u64, config: Config) -> Scheduler {
    let mut s = Scheduler::new(n * PS, PS, &vec![0; Bitmap::byte_len(n)], config).unwrap();
    s.set_hash_known_all(true);
    s
}

fn bits(n: u64, held: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut b = Bitmap::new(n);
    for i in held {
        b.set(i);
    }
    b.as_bytes().to_vec()
}

fn all(n: u64) -> Vec<u8> {
    bits(n, 0..n)
}

fn requests(actions: &[Action]) -> Vec<(u64, Source)> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Request { piece, from } => Some((piece, from)),
            _ => None,
        })
        .collect()
}

fn pieces(actions: &[Action]) -> Vec<u64> {
    requests(actions).into_iter().map(|(p, _)| p).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn read_window_goes_first_in_order() {
    let mut s = sched(
        20,
        Config {
            window: 4,
            max_in_flight: 4,
            ..cfg()
        },
    );
    s.add_peer(A, &all(20)).unwrap();
    s.set_read_position(10);
    let t = Instant::now();
    assert_eq!(pieces(&s.poll(t)), [10, 11, 12, 13]);
}

#[test]
fn rarest_first_beyond_the_window() {
    let mut s = sched(
        6,
        Config {
            window: 1,
            max_in_flight: 3,
            ..cfg()
        },
    );
    // Held by 3 peers: 0 and 1; by 2: 2 and 3; by 1: 4 and 5.
    s.add_peer(A, &all(6)).unwrap();
    s.add_peer(B, &bits(6, 0..4)).unwrap();
    s.add_peer(C, &bits(6, 0..2)).unwrap();
    let t = Instant::now();
    assert_eq!(pieces(&s.poll(t)), [0, 4, 5]);
}

#[test]
fn per_peer_and_global_limits() {
    let mut s = sched(
        20,
        Config {
            max_per_peer: 4,
            max_in_flight: 6,
            window: 20,
            ..cfg()
        },
    );
    let t = Instant::now();
    s.add_peer(A, &all(20)).unwrap();
    let first = requests(&s.poll(t));
    let to_a = first.iter().filter(|&&(_, f)| f == Source::Peer(A)).count();
    assert_eq!(to_a, 4);
    // Window pieces with their only holder busy go to the origin, up to
    // the global limit.
    assert_eq!(first.len(), 6);
    assert_eq!(s.in_flight(), 6);
    s.add_peer(B, &all(20)).unwrap();
    assert!(s.poll(t).is_empty(), "global limit reached");
    s.on_piece(0, Source::Peer(A), PS, t, true);
    assert_eq!(s.in_flight(), 6);
}

#[test]
fn busy_holders_leave_far_pieces_waiting() {
    let mut s = sched(
        20,
        Config {
            max_per_peer: 2,
            window: 1,
            ..cfg()
        },
    );
    s.add_peer(A, &all(20)).unwrap();
    let acts = s.poll(Instant::now());
    assert_eq!(requests(&acts).len(), 2);
    assert!(requests(&acts).iter().all(|&(_, f)| f == Source::Peer(A)));
}

#[test]
fn endgame_duplicates_then_cancels() {
    let mut s = sched(
        2,
        Config {
            max_per_peer: 2,
            endgame: true,
            ..cfg()
        },
    );
    s.add_peer(A, &all(2)).unwrap();
    s.add_peer(B, &all(2)).unwrap();
    let t = Instant::now();
    let mut r = requests(&s.poll(t));
    r.sort();
    assert_eq!(
        r,
        [
            (0, Source::Peer(A)),
            (0, Source::Peer(B)),
            (1, Source::Peer(A)),
            (1, Source::Peer(B))
        ]
    );
    let acts = s.on_piece(0, Source::Peer(B), PS, t + secs(1), true);
    assert_eq!(
        acts,
        [
            Action::Completed(0),
            Action::Cancel {
                piece: 0,
                from: Source::Peer(A)
            }
        ]
    );
    // The canceled copy arriving anyway changes nothing.
    assert!(
        s.on_piece(0, Source::Peer(A), PS, t + secs(1), true)
            .is_empty()
    );
    let acts = s.on_piece(1, Source::Peer(A), PS, t + secs(1), true);
    assert_eq!(
        acts,
        [
            Action::Completed(1),
            Action::Cancel {
                piece: 1,
                from: Source::Peer(B)
            },
            Action::Done
        ]
    );
    assert!(s.is_complete());
    assert_eq!(s.in_flight(), 0);
    assert!(s.poll(t + secs(100)).is_empty(), "Done comes once");
}

#[test]
fn endgame_duplicates_the_slowest_first() {
    let mut s = sched(
        4,
        Config {
            max_per_peer: 1,
            max_in_flight: 3,
            window: 1,
            endgame: true,
            ..cfg()
        },
    );
    let t = Instant::now();
    // Measure A fast and B slow; 2 and 3 wait for a holder meanwhile.
    s.add_peer(A, &bits(4, [0])).unwrap();
    s.add_peer(B, &bits(4, [1])).unwrap();
    assert_eq!(pieces(&s.poll(t)), [0, 1]);
    s.on_piece(0, Source::Peer(A), PS, t + secs(1), true);
    s.on_piece(1, Source::Peer(B), PS, t + secs(10), true);
    s.add_peer(A, &bits(4, [0, 2])).unwrap();
    s.add_peer(B, &bits(4, [1, 3])).unwrap();
    let t = t + secs(10);
    let r = requests(&s.poll(t));
    assert_eq!(r, [(2, Source::Peer(A)), (3, Source::Peer(B))]);
    // No other holder, and neither is in the read window: no duplicate
    // from the origin.
    assert!(s.poll(t).is_empty());
    // Room for one duplicate: B's piece, expected to finish last.
    s.add_peer(C, &bits(4, [2, 3])).unwrap();
    assert_eq!(requests(&s.poll(t)), [(3, Source::Peer(C))]);
}

#[test]
fn timeout_moves_the_piece_to_another_peer() {
    // Piece 0 is held, so piece 1 is outside the read window (no rescue).
    let config = Config { window: 1, ..cfg() };
    let mut s = Scheduler::new(2 * PS, PS, &bits(2, [0]), config).unwrap();
    s.set_hash_known_all(true);
    let t = Instant::now();
    s.add_peer(A, &all(2)).unwrap();
    assert_eq!(requests(&s.poll(t)), [(1, Source::Peer(A))]);
    s.add_peer(B, &all(2)).unwrap();
    let deadline = s.next_deadline().unwrap();
    assert_eq!(deadline, t + Config::eager().initial_timeout);
    assert!(s.poll(deadline - secs(1)).is_empty());
    assert_eq!(
        s.poll(deadline),
        [
            Action::Cancel {
                piece: 1,
                from: Source::Peer(A)
            },
            Action::Request {
                piece: 1,
                from: Source::Peer(B)
            }
        ]
    );
}

#[test]
fn timeout_follows_the_measured_rate_with_a_floor() {
    let mut s = sched(3, Config { window: 1, ..cfg() });
    let t = Instant::now();
    s.add_peer(A, &bits(3, [0])).unwrap();
    s.poll(t);
    // 100 B in 1 s: 1 s expected, so 4 s.
    s.on_piece(0, Source::Peer(A), PS, t + secs(1), true);
    s.add_peer(A, &bits(3, [0, 1])).unwrap();
    let t1 = t + secs(1);
    s.poll(t1);
    assert_eq!(s.next_deadline(), Some(t1 + secs(4)));
    // 100 B in 10 ms: 40 ms, raised to the 2 s floor.
    let t2 = t1 + Duration::from_millis(10);
    s.on_piece(1, Source::Peer(A), PS, t2, true);
    s.add_peer(A, &all(3)).unwrap();
    s.poll(t2);
    assert_eq!(s.next_deadline(), Some(t2 + secs(2)));
}

#[test]
fn corrupt_piece_bans_the_peer_and_goes_elsewhere() {
    let mut s = sched(1, cfg());
    let t = Instant::now();
    s.add_peer(A, &all(1)).unwrap();
    assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
    s.add_peer(B, &all(1)).unwrap();
    let acts = s.on_piece(0, Source::Peer(A), PS, t, false);
    assert_eq!(
        acts,
        [
            Action::Banned(A),
            Action::Request {
                piece: 0,
                from: Source::Peer(B)
            }
        ]
    );
    assert!(s.is_banned(A));
    // Announcing again does not bring it back.
    s.add_peer(A, &all(1)).unwrap();
    s.peer_has(A, 0);
    let acts = s.on_failure(0, Source::Peer(B), t);
    assert_eq!(requests(&acts), [(0, Source::Origin)]);
}

#[test]
fn corrupt_piece_from_the_origin_is_retried() {
    let mut s = sched(1, cfg());
    let t = Instant::now();
    assert_eq!(requests(&s.poll(t)), [(0, Source::Origin)]);
    let acts = s.on_piece(0, Source::Origin, PS, t, false);
    assert_eq!(requests(&acts), [(0, Source::Origin)]);
    assert_eq!(s.origin_failures(), 1);
}

#[test]
fn repeated_failures_drop_the_peer() {
    let mut s = sched(
        4,
        Config {
            max_failures: 2,
            window: 1,
            ..cfg()
        },
    );
    let t = Instant::now();
    s.add_peer(A, &all(4)).unwrap();
    let r = requests(&s.poll(t));
    let a: Vec<u64> = r
        .iter()
        .filter(|(_, f)| *f == Source::Peer(A))
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(a.len(), 4, "{r:?}");
    s.on_failure(a[0], Source::Peer(A), t);
    let acts = s.on_failure(a[1], Source::Peer(A), t);
    assert!(acts.contains(&Action::Dropped(A)));
    assert!(acts.contains(&Action::Cancel {
        piece: a[2],
        from: Source::Peer(A)
    }));
    assert!(s.is_excluded(A) && !s.is_banned(A));
    s.add_peer(A, &all(4)).unwrap();
    assert!(
        requests(&s.poll(t))
            .iter()
            .all(|&(_, f)| f != Source::Peer(A))
    );
    // A ban after a drop is still reported, for the metrics.
    assert_eq!(
        s.on_piece(a[2], Source::Peer(A), PS, t, false)[0],
        Action::Banned(A)
    );
}

#[test]
fn success_resets_the_failure_count() {
    let mut s = sched(
        4,
        Config {
            max_failures: 2,
            max_per_peer: 1,
            window: 1,
            ..cfg()
        },
    );
    let t = Instant::now();
    s.add_peer(A, &all(4)).unwrap();
    assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
    let acts = s.on_failure(0, Source::Peer(A), t);
    assert_eq!(requests(&acts), [(0, Source::Origin), (1, Source::Peer(A))]);
    s.on_piece(1, Source::Peer(A), PS, t, true);
    let acts = s.on_failure(2, Source::Peer(A), t);
    assert!(!acts.contains(&Action::Dropped(A)), "{acts:?}");
}

#[test]
fn unknown_hash_comes_from_the_origin_only() {
    let mut s = sched(6, Config { window: 6, ..cfg() });
    s.set_hash_known(3, false);
    s.add_peer(A, &all(6)).unwrap();
    s.add_peer(B, &all(6)).unwrap();
    let r = requests(&s.poll(Instant::now()));
    assert_eq!(r.len(), 6);
    for (p, f) in r {
        assert_eq!(f == Source::Origin, p == 3, "piece {p} from {f:?}");
    }
}

#[test]
fn hashes_start_unknown() {
    let mut s = Scheduler::new(3 * PS, PS, &[0], cfg()).unwrap();
    s.add_peer(A, &all(3)).unwrap();
    let r = requests(&s.poll(Instant::now()));
    assert!(r.iter().all(|&(_, f)| f == Source::Origin), "{r:?}");
}

#[test]
fn no_peers_means_the_origin_within_its_cap() {
    let mut s = sched(
        10,
        Config {
            max_origin: 2,
            window: 1,
            ..cfg()
        },
    );
    let r = requests(&s.poll(Instant::now()));
    assert_eq!(r, [(0, Source::Origin), (1, Source::Origin)]);
}

#[test]
fn no_holder_waits_until_the_read_window_reaches_it() {
    let mut s = sched(6, Config { window: 2, ..cfg() });
    let t = Instant::now();
    s.add_peer(A, &bits(6, 0..5)).unwrap();
    assert!(!pieces(&s.poll(t)).contains(&5));
    s.set_read_position(4);
    assert!(requests(&s.poll(t)).contains(&(5, Source::Origin)));
}

#[test]
fn patience_waits_for_a_peer_that_is_still_fetching() {
    let config = Config {
        window: 2,
        patience: Some(secs(5)),
        ..cfg()
    };
    let mut s = Scheduler::new(4 * PS, PS, &[0], config).unwrap();
    let t = Instant::now();
    // A peer that holds nothing yet: it is fetching from the origin.
    s.add_peer(A, &bits(4, [])).unwrap();
    assert!(requests(&s.poll(t)).is_empty());
    assert_eq!(s.next_deadline(), Some(t + secs(5)));
    // It announces piece 0 with its hash: we take it from the peer, and
    // the news restarts the wait for piece 1.
    s.add_peer(A, &bits(4, [0])).unwrap();
    s.set_hash_known(0, true);
    assert_eq!(requests(&s.poll(t + secs(4))), [(0, Source::Peer(A))]);
    s.on_piece(0, Source::Peer(A), PS, t + secs(4), true);
    assert!(requests(&s.poll(t + secs(8))).is_empty());
    // No news for the whole patience: the read window goes to the origin.
    let r = requests(&s.poll(t + secs(9)));
    assert_eq!(r, [(1, Source::Origin)]);
    // Without patience the window goes to the origin at once.
    let mut s = sched(4, Config { window: 2, ..cfg() });
    s.set_hash_known_all(false);
    s.add_peer(A, &bits(4, [])).unwrap();
    assert_eq!(
        requests(&s.poll(t)),
        [(0, Source::Origin), (1, Source::Origin)]
    );
}

#[test]
fn slower_peer_than_origin_loses_to_the_origin() {
    let mut s = sched(
        6,
        Config {
            window: 1,
            max_per_peer: 1,
            max_origin: 1,
            ..cfg()
        },
    );
    let t = Instant::now();
    // Measure: origin 100 B/s... peer 10 B/s.
    s.add_peer(A, &bits(6, [1])).unwrap();
    let r = requests(&s.poll(t));
    assert_eq!(r, [(0, Source::Origin), (1, Source::Peer(A))]);
    s.on_piece(0, Source::Origin, PS, t + secs(1), true);
    s.on_piece(1, Source::Peer(A), PS, t + secs(10), true);
    s.add_peer(A, &all(6)).unwrap();
    s.set_read_position(2);
    let r = requests(&s.poll(t + secs(10)));
    // The window piece goes to the faster origin; A takes the next one.
    assert_eq!(r[0], (2, Source::Origin));
    assert_eq!(r[1].1, Source::Peer(A));
}

#[test]
fn overdue_window_piece_is_also_asked_of_the_origin() {
    let mut s = sched(
        3,
        Config {
            window: 1,
            max_per_peer: 1,
            ..cfg()
        },
    );
    let t = Instant::now();
    s.add_peer(A, &all(3)).unwrap();
    assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
    // Unmeasured: overdue after min_timeout.
    let at = t + Config::eager().min_timeout;
    assert_eq!(s.next_deadline(), Some(at));
    assert!(s.poll(at - secs(1)).is_empty());
    assert_eq!(requests(&s.poll(at)), [(0, Source::Origin)]);
    // Now both copies run to their timeouts.
    assert_eq!(s.next_deadline(), Some(t + Config::eager().initial_timeout));
    let acts = s.on_piece(0, Source::Origin, PS, at + secs(1), true);
    assert_eq!(
        acts[..2],
        [
            Action::Completed(0),
            Action::Cancel {
                piece: 0,
                from: Source::Peer(A)
            }
        ]
    );
}

#[test]
fn busy_holders_send_window_pieces_to_the_origin() {
    let mut s = sched(
        4,
        Config {
            window: 2,
            max_per_peer: 1,
            ..cfg()
        },
    );
    s.add_peer(A, &all(4)).unwrap();
    let r = requests(&s.poll(Instant::now()));
    assert_eq!(r, [(0, Source::Peer(A)), (1, Source::Origin)]);
}

#[test]
fn removed_peer_requests_are_cancelled_and_reassigned() {
    let mut s = sched(1, cfg());
    let t = Instant::now();
    s.add_peer(A, &all(1)).unwrap();
    s.add_peer(B, &all(1)).unwrap();
    let first = requests(&s.poll(t))[0].1;
    let Source::Peer(p) = first else {
        panic!("{first:?}")
    };
    let other = if p == A { B } else { A };
    assert_eq!(
        s.remove_peer(p, t),
        [
            Action::Cancel {
                piece: 0,
                from: first
            },
            Action::Request {
                piece: 0,
                from: Source::Peer(other)
            }
        ]
    );
    assert!(!s.is_excluded(p));
}

#[test]
fn resume_skips_held_pieces() {
    let mut s = Scheduler::new(4 * PS - 50, PS, &bits(4, [0, 2]), cfg()).unwrap();
    assert_eq!((s.piece_count(), s.missing()), (4, 2));
    assert_eq!(s.piece_len(3), 50);
    let r = pieces(&s.poll(Instant::now()));
    assert_eq!(r, [1, 3]);
}

#[test]
fn empty_or_fully_held_blob_is_done_at_once() {
    let mut s = Scheduler::new(0, PS, &[], cfg()).unwrap();
    assert_eq!(s.poll(Instant::now()), [Action::Done]);
    let mut s = Scheduler::new(2 * PS, PS, &all(2), cfg()).unwrap();
    assert_eq!(s.poll(Instant::now()), [Action::Done]);
    assert!(s.poll(Instant::now()).is_empty());
}

#[test]
fn bad_input_is_refused() {
    assert_eq!(
        Scheduler::new(10, 0, &[], cfg()).unwrap_err(),
        Error::ZeroPieceSize
    );
    assert!(matches!(
        Scheduler::new(10 * PS, PS, &[0], cfg()),
        Err(Error::Bitmap(BadBitmap::Length { .. }))
    ));
    let mut s = sched(3, cfg());
    assert_eq!(
        s.add_peer(A, &[0b1000]),
        Err(Error::Bitmap(BadBitmap::TrailingBits))
    );
    // Out-of-range events are ignored.
    s.peer_has(A, 3);
    s.set_hash_known(99, true);
    let t = Instant::now();
    assert!(s.on_piece(7, Source::Origin, PS, t, true).is_empty());
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Verified,
    Corrupt,
    Failed,
    /// A peer answers busy (the origin never does: a failure then).
    Busy,
}

#[derive(Debug, Clone)]
enum Op {
    /// Let this many seconds pass, then poll.
    Poll(u64),
    /// Replace a peer's bitmap (it may shrink: an evicted cache).
    Add(u32, u32),
    /// Bits a peer gained.
    Grow(u32, u32),
    Has(u32, u64),
    Remove(u32),
    /// The peer's connection died.
    Drop(u32),
    /// This node takes over the origin fetch.
    Lead,
    ReadPosition(u64),
    HashKnown(u64, bool),
    /// Report the k-th outstanding request.
    Answer(usize, Outcome),
    /// Report the k-th cancelled request anyway.
    Late(usize, Outcome),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        6 => Just(Outcome::Verified),
        1 => Just(Outcome::Corrupt),
        2 => Just(Outcome::Failed),
        2 => Just(Outcome::Busy),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let peer = 0u32..6;
    let piece = 0u64..24;
    prop_oneof![
        3 => (0u64..20).prop_map(Op::Poll),
        2 => (peer.clone(), any::<u32>()).prop_map(|(p, m)| Op::Add(p, m)),
        1 => (peer.clone(), any::<u32>()).prop_map(|(p, m)| Op::Grow(p, m)),
        1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Has(p, i)),
        1 => peer.clone().prop_map(Op::Remove),
        1 => peer.prop_map(Op::Drop),
        1 => Just(Op::Lead),
        1 => piece.clone().prop_map(Op::ReadPosition),
        1 => (piece, any::<bool>()).prop_map(|(i, k)| Op::HashKnown(i, k)),
        8 => (any::<usize>(), outcome()).prop_map(|(k, o)| Op::Answer(k, o)),
        1 => (any::<usize>(), outcome()).prop_map(|(k, o)| Op::Late(k, o)),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        (1usize..5, 1usize..9, 1usize..4, 0u64..6),
        (1u64..4, 4u64..20, 1u32..5, any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (max_per_peer, max_in_flight, max_origin, window),
                (min_timeout, initial_timeout, max_failures, narrow_busy, endgame),
            )| Config {
                max_per_peer,
                max_in_flight,
                max_origin,
                window,
                min_timeout: secs(min_timeout),
                initial_timeout: secs(initial_timeout),
                max_failures,
                endgame,
                // The agent's settings vary too: wider margins and a
                // narrower busy window must keep every invariant.
                origin_margin: if endgame { f64::INFINITY } else { 1.0 },
                busy_window: narrow_busy.then_some(u64::from(max_failures) % 2),
                rescue_factor: max_failures,
                rescue_floor: secs(u64::from(max_failures) / 2),
                patience: (max_per_peer % 2 == 0).then(|| secs(min_timeout)),
                busy_backoff: Duration::from_millis(100 * u64::from(max_failures)),
            },
        )
}

/// What the driver knows, built only from what it told the scheduler and
/// the actions it got back; checked against the rules on every action.
struct Driver {
    s: Scheduler,
    n: u64,
    config: Config,
    now: Instant,
    held: Vec<bool>,
    completed: Vec<bool>,
    hash_known: Vec<bool>,
    peers: HashMap<u32, u32>,
    excluded: BTreeSet<PeerId>,
    banned: BTreeSet<PeerId>,
    outstanding: BTreeSet<(u64, Source)>,
    cancelled: Vec<(u64, Source)>,
    done: bool,
}

impl Driver {
    fn mask_bits(&self, mask: u32) -> Vec<u8> {
        bits(self.n, (0..self.n).filter(|&i| mask & (1 << i) != 0))
    }

    fn apply(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
        for a in actions {
            match a {
                Action::Request { piece, from } => {
                    let p = piece as usize;
                    prop_assert!(piece < self.n);
                    prop_assert!(!self.held[p] && !self.completed[p], "{piece} is held");
                    prop_assert!(self.outstanding.insert((piece, from)), "asked twice");
                    if let Source::Peer(id) = from {
                        prop_assert!(!self.excluded.contains(&id), "{id:?} is excluded");
                        let mask = self.peers.get(&id.0).copied().unwrap_or(0);
                        prop_assert!(mask & (1 << piece) != 0, "{id:?} lacks {piece}");
                        prop_assert!(self.hash_known[p], "{piece} has no hash");
                    }
                }
                Action::Cancel { piece, from } => {
                    prop_assert!(self.outstanding.remove(&(piece, from)));
                    self.cancelled.push((piece, from));
                }
                Action::Completed(piece) => {
                    let p = piece as usize;
                    prop_assert!(!self.held[p] && !self.completed[p], "{piece} twice");
                    self.completed[p] = true;
                }
                Action::Banned(id) => {
                    prop_assert!(self.banned.insert(id));
                    self.excluded.insert(id);
                }
                Action::Dropped(id) => {
                    prop_assert!(self.excluded.insert(id));
                }
                Action::Done => {
                    prop_assert!(!self.done);
                    self.done = true;
                    prop_assert!((0..self.n as usize).all(|i| self.held[i] || self.completed[i]));
                }
            }
        }
        // A driver sleeping until the next deadline does not spin.
        prop_assert!(self.s.next_deadline().is_none_or(|t| t > self.now));
        let c = &self.config;
        prop_assert!(self.outstanding.len() <= c.max_in_flight);
        prop_assert_eq!(self.s.in_flight(), self.outstanding.len());
        let origin = self
            .outstanding
            .iter()
            .filter(|(_, f)| *f == Source::Origin)
            .count();
        prop_assert!(origin <= c.max_origin);
        for id in 0..6 {
            let to = self
                .outstanding
                .iter()
                .filter(|(_, f)| *f == Source::Peer(PeerId(id)))
                .count();
            prop_assert!(to <= c.max_per_peer);
        }
        let missing = (0..self.n as usize)
            .filter(|&i| !self.held[i] && !self.completed[i])
            .count();
        prop_assert_eq!(self.s.missing(), missing as u64);
        Ok(())
    }

    fn report(&mut self, piece: u64, from: Source, o: Outcome) -> Result<(), TestCaseError> {
        let len = self.s.piece_len(piece);
        let was_missing = !self.s.is_held(piece);
        let acts = match o {
            Outcome::Verified => self.s.on_piece(piece, from, len, self.now, true),
            Outcome::Corrupt => self.s.on_piece(piece, from, len, self.now, false),
            Outcome::Failed => self.s.on_failure(piece, from, self.now),
            Outcome::Busy => match from {
                Source::Peer(id) => self.s.on_busy(piece, id, self.now),
                Source::Origin => self.s.on_failure(piece, from, self.now),
            },
        };
        let completed = acts.contains(&Action::Completed(piece));
        prop_assert_eq!(completed, was_missing && matches!(o, Outcome::Verified));
        if let (Outcome::Corrupt, Source::Peer(id)) = (o, from) {
            prop_assert!(self.banned.contains(&id) || acts.contains(&Action::Banned(id)));
        }
        self.apply(acts)
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let full = (1u32 << self.n) - 1;
        match op {
            Op::Poll(d) => {
                self.now += secs(d);
                let acts = self.s.poll(self.now);
                self.apply(acts)?;
            }
            Op::Add(id, mask) => {
                let mask = mask & full;
                self.s.add_peer(PeerId(id), &self.mask_bits(mask)).unwrap();
                self.peers.insert(id, mask);
            }
            Op::Grow(id, mask) => {
                let mask = (mask & full) | self.peers.get(&id).copied().unwrap_or(0);
                self.s
                    .update_peer(PeerId(id), &self.mask_bits(mask))
                    .unwrap();
                self.peers.insert(id, mask);
            }
            Op::Has(id, i) => {
                let i = i % self.n;
                self.s.peer_has(PeerId(id), i);
                *self.peers.entry(id).or_default() |= 1 << i;
            }
            Op::Remove(id) => {
                let acts = self.s.remove_peer(PeerId(id), self.now);
                self.peers.remove(&id);
                self.apply(acts)?;
            }
            Op::Drop(id) => {
                let acts = self.s.drop_peer(PeerId(id), self.now);
                self.peers.remove(&id);
                self.apply(acts)?;
            }
            Op::Lead => {
                self.s.set_leading();
                let acts = self.s.poll(self.now);
                self.apply(acts)?;
            }
            Op::ReadPosition(i) => self.s.set_read_position(i % self.n),
            Op::HashKnown(i, k) => {
                let i = i % self.n;
                self.s.set_hash_known(i, k);
                self.hash_known[i as usize] = k;
            }
            Op::Answer(k, o) => {
                if !self.outstanding.is_empty() {
                    let r = *self
                        .outstanding
                        .iter()
                        .nth(k % self.outstanding.len())
                        .unwrap();
                    self.outstanding.remove(&r);
                    self.report(r.0, r.1, o)?;
                }
            }
            Op::Late(k, o) => {
                if !self.cancelled.is_empty() {
                    let r = self.cancelled[k % self.cancelled.len()];
                    // Ambiguous with a new request to the same place.
                    if !self.outstanding.contains(&r) {
                        self.report(r.0, r.1, o)?;
                    }
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #[test]
    fn invariants_hold_and_every_run_completes(
        n in 1u64..=24,
        last in 1u64..=PS,
        held in any::<u32>(),
        known in any::<u32>(),
        config in config(),
        ops in proptest::collection::vec(op(), 0..150),
    ) {
        let size = (n - 1) * PS + last;
        let held: Vec<bool> = (0..n).map(|i| held & (1 << i) != 0 && i % 3 != 0).collect();
        let held_bits = bits(n, (0..n).filter(|&i| held[i as usize]));
        let mut s = Scheduler::new(size, PS, &held_bits, config.clone()).unwrap();
        let hash_known: Vec<bool> = (0..n).map(|i| known & (1 << i) != 0).collect();
        for (i, &k) in hash_known.iter().enumerate() {
            s.set_hash_known(i as u64, k);
        }
        let mut d = Driver {
            s,
            n,
            config,
            now: Instant::now(),
            held,
            completed: vec![false; n as usize],
            hash_known,
            peers: HashMap::new(),
            excluded: BTreeSet::new(),
            banned: BTreeSet::new(),
            outstanding: BTreeSet::new(),
            cancelled: Vec::new(),
            done: false,
        };
        for op in ops {
            d.step(op)?;
            d.s.check_counts();
        }
        // From here on the driver reads in order and every source
        // delivers: each round completes at least one piece.
        for _ in 0..2 * n + 5 {
            if d.s.is_complete() {
                break;
            }
            let first = (0..n).find(|&i| !d.s.is_held(i)).unwrap();
            d.s.set_read_position(first);
            // Patience with a stalled swarm runs out, and so does a busy
            // peer's backoff: a driver wakes at the next deadline.
            d.now += d.config.patience.unwrap_or_default();
            if let Some(t) = d.s.next_deadline() {
                d.now = d.now.max(t);
            }
            let acts = d.s.poll(d.now);
            d.apply(acts)?;
            d.s.check_counts();
            let round: Vec<_> = d.outstanding.iter().copied().collect();
            for r in round {
                if d.outstanding.remove(&r) {
                    d.report(r.0, r.1, Outcome::Verified)?;
                }
            }
        }
        prop_assert!(d.s.is_complete(), "{} missing", d.s.missing());
        if !d.done {
            // Complete from the start: Done comes with the first poll.
            let acts = d.s.poll(d.now);
            d.apply(acts)?;
        }
        prop_assert!(d.done);
        prop_assert!(d.outstanding.is_empty());
        prop_assert_eq!(d.s.in_flight(), 0);
    }
}

/// The followers of a node that died: the one that takes over fetches every
/// piece nobody holds from the origin at once, read window or not; the others
/// keep waiting for its pieces.
#[test]
fn a_node_that_takes_over_fetches_what_nobody_holds_at_once() {
    let config = Config {
        window: 2,
        patience: Some(secs(10)),
        max_origin: 8,
        ..cfg()
    };
    let t = Instant::now();
    let mut follower = sched(6, config.clone());
    follower.add_peer(A, &bits(6, 0..2)).unwrap();
    follower.add_peer(B, &bits(6, [])).unwrap();
    // The first poll is news: patience starts now and nothing goes to the
    // origin while it lasts.
    let r = requests(&follower.poll(t));
    assert!(r.iter().all(|(_, s)| *s != Source::Origin), "{r:?}");

    let mut heir = sched(6, config);
    heir.add_peer(A, &bits(6, 0..2)).unwrap();
    heir.add_peer(B, &bits(6, [])).unwrap();
    let first = requests(&heir.poll(t));
    // What a peer holds comes from the peer.
    assert_eq!(first, [(0, Source::Peer(A)), (1, Source::Peer(A))]);
    heir.set_leading();
    let r = requests(&heir.poll(t));
    for piece in 2..6 {
        assert!(r.contains(&(piece, Source::Origin)), "{piece}: {r:?}");
    }
}

/// A peer whose connection died is dropped at once: its requests go
/// elsewhere without counting as failures of their pieces (which would send
/// them to the origin), and a later announcement does not bring it back.
#[test]
fn an_unreachable_peer_is_dropped_without_failing_its_pieces() {
    let t = Instant::now();
    let mut s = sched(
        4,
        Config {
            window: 4,
            patience: Some(secs(10)),
            ..cfg()
        },
    );
    s.add_peer(A, &all(4)).unwrap();
    s.add_peer(B, &bits(4, [0, 1])).unwrap();
    let r: Vec<_> = requests(&s.poll(t))
        .into_iter()
        .filter(|(_, from)| *from == Source::Peer(A))
        .collect();
    assert!(r.len() >= 2, "{r:?}");
    let out = s.drop_peer(A, t);
    assert!(out.contains(&Action::Dropped(A)));
    let cancelled = out
        .iter()
        .filter(|a| matches!(a, Action::Cancel { from, .. } if *from == Source::Peer(A)))
        .count();
    assert_eq!(cancelled, r.len());
    // B takes what it holds; the rest waits (patience), not the origin.
    let again = requests(&out);
    assert!(
        again.iter().all(|(_, from)| *from != Source::Origin),
        "{again:?}"
    );
    for (piece, _) in &r {
        assert!(
            *piece > 1 || again.contains(&(*piece, Source::Peer(B))),
            "{piece}: {again:?}"
        );
    }
    s.update_peer(A, &all(4)).unwrap();
    assert!(s.live_peers().all(|p| p != A));
    assert!(
        requests(&s.poll(t))
            .iter()
            .all(|(_, f)| *f != Source::Peer(A))
    );
}

/// A busy answer is no failure: the piece goes to the other holder at once,
/// the busy peer is asked again after its backoff, and however many busy
/// answers it gives it is never dropped nor avoided for the piece.
#[test]
fn a_busy_peer_is_asked_again_after_its_backoff_and_never_dropped() {
    let backoff = Duration::from_millis(50);
    let mut s = sched(
        2,
        Config {
            max_per_peer: 1,
            busy_window: Some(0),
            busy_backoff: backoff,
            ..cfg()
        },
    );
    s.add_peer(A, &all(2)).unwrap();
    let t = Instant::now();
    assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
    s.add_peer(B, &bits(2, [0])).unwrap();
    // A is busy: piece 0 goes to B; piece 1 only A holds, so it waits.
    assert_eq!(requests(&s.on_busy(0, A, t)), [(0, Source::Peer(B))]);
    assert_eq!(s.next_deadline(), Some(t + backoff));
    assert!(requests(&s.poll(t + backoff / 2)).is_empty());
    assert_eq!(requests(&s.poll(t + backoff)), [(1, Source::Peer(A))]);
    // Busy again and again: the backoff doubles, up to its cap.
    let mut now = t + backoff;
    for n in 0..10 {
        let wait = backoff * (1 << (n + 1).min(MAX_BUSY_DOUBLINGS));
        let actions = s.on_busy(1, A, now);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Dropped(_))),
            "{actions:?}"
        );
        assert_eq!(s.next_deadline(), Some(now + wait).min(s.next_deadline()));
        now += wait;
        assert_eq!(requests(&s.poll(now)), [(1, Source::Peer(A))], "busy {n}");
    }
    assert!(!s.is_excluded(A));
    // A piece from it resets the backoff.
    s.on_piece(1, Source::Peer(A), PS, now, true);
    s.on_piece(0, Source::Peer(B), PS, now, true);
    assert!(s.is_complete());
}

/// With every holder busy, the piece waits for them rather than go to the
/// origin (production's busy window of 0), and the driver is woken when the
/// first backoff ends.
#[test]
fn when_every_holder_is_busy_the_piece_waits_for_the_first_one_free() {
    let mut s = sched(
        1,
        Config {
            busy_window: Some(0),
            busy_backoff: Duration::from_millis(100),
            ..cfg()
        },
    );
    s.add_peer(A, &all(1)).unwrap();
    s.add_peer(B, &all(1)).unwrap();
    let t = Instant::now();
    let first = requests(&s.poll(t));
    assert_eq!(first.len(), 1);
    let (_, Source::Peer(p1)) = first[0] else {
        panic!("{first:?}")
    };
    let second = requests(&s.on_busy(0, p1, t));
    let (_, Source::Peer(p2)) = second[0] else {
        panic!("{second:?}")
    };
    assert_ne!(p1, p2);
    let later = t + Duration::from_millis(30);
    assert!(requests(&s.on_busy(0, p2, later)).is_empty(), "no origin");
    assert_eq!(s.next_deadline(), Some(t + Duration::from_millis(100)));
    assert_eq!(
        requests(&s.poll(t + Duration::from_millis(100))),
        [(0, Source::Peer(p1))]
    );
}

/// Holders that answer busy to everyone hold up the read window no longer
/// than the swarm's patience: with no piece arriving or announced for that
/// long, the piece the client waits for goes to the origin; far pieces still
/// wait.
#[test]
fn holders_busy_for_the_whole_patience_lose_the_read_window_to_the_origin() {
    let mut s = sched(
        4,
        Config {
            window: 1,
            busy_window: Some(0),
            busy_backoff: Duration::from_millis(100),
            patience: Some(secs(10)),
            ..cfg()
        },
    );
    s.add_peer(A, &all(4)).unwrap();
    let t = Instant::now();
    let mut now = t;
    let mut out = s.poll(now);
    // Every answer is busy; the scheduler asks again after each backoff.
    while now < t + secs(10) {
        for (piece, from) in requests(&out) {
            assert_eq!(from, Source::Peer(A), "at {:?}", now - t);
            s.on_busy(piece, A, now);
        }
        now = s.next_deadline().expect("a backoff or the patience ends");
        out = s.poll(now);
    }
    let last = requests(&out);
    assert!(last.contains(&(0, Source::Origin)), "{last:?}");
    assert!(
        last.iter()
            .all(|&(p, from)| from != Source::Origin || p == 0),
        "only the read window: {last:?}"
    );
    // A piece completing is news: patience starts over.
    s.on_piece(0, Source::Origin, PS, now, true);
    s.set_read_position(1);
    let after = requests(&s.poll(now));
    assert!(!after.contains(&(1, Source::Origin)), "{after:?}");
}

/// A busy window wider than the read window reaches past it: a piece there
/// whose only holder is busy goes to the origin, one past both waits. (The
/// poll leaves out pieces that can go nowhere; this is the edge of that.)
#[test]
fn a_busy_window_wider_than_the_read_window_still_sends_its_pieces_to_the_origin() {
    let mut s = sched(
        8,
        Config {
            window: 2,
            busy_window: Some(4),
            max_per_peer: 1,
            max_origin: 1,
            busy_backoff: secs(10),
            ..cfg()
        },
    );
    s.add_peer(A, &all(8)).unwrap();
    let t = Instant::now();
    let o = Source::Origin;
    assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A)), (1, o)]);
    assert!(
        requests(&s.on_busy(0, A, t)).is_empty(),
        "the origin is full"
    );
    assert_eq!(requests(&s.on_piece(1, o, PS, t, true)), [(0, o)]);
    // 2 and 3 lie past the read window, within the busy window.
    assert_eq!(requests(&s.on_piece(0, o, PS, t, true)), [(2, o)]);
    assert_eq!(requests(&s.on_piece(2, o, PS, t, true)), [(3, o)]);
    assert!(requests(&s.on_piece(3, o, PS, t, true)).is_empty());
}

/// Many peers, each holding a few pieces, most of them busy: every poll
/// still sends each piece a free holder has to one, as if it looked at
/// every peer for every piece (the poll only looks where a free peer
/// offers something).
#[test]
fn a_free_holder_is_found_among_many_busy_peers() {
    let n = 64;
    let mut s = sched(
        n,
        Config {
            window: 1,
            max_per_peer: 1,
            max_in_flight: 64,
            busy_window: Some(0),
            busy_backoff: secs(10),
            ..cfg()
        },
    );
    for p in 0..32u32 {
        s.add_peer(
            PeerId(p),
            &bits(n, [u64::from(p) * 2, u64::from(p) * 2 + 1]),
        )
        .unwrap();
    }
    let t = Instant::now();
    let first = requests(&s.poll(t));
    assert_eq!(first.len(), 32, "one request per peer: {first:?}");
    // The even peers answer busy; their other piece stays with them (no
    // other holder), so nothing new goes out until the odd ones deliver.
    for (piece, from) in &first {
        let Source::Peer(PeerId(p)) = *from else {
            panic!("{first:?}")
        };
        if p % 2 == 0 {
            assert!(requests(&s.on_busy(*piece, PeerId(p), t)).is_empty());
        }
    }
    let mut next = Vec::new();
    for (piece, from) in &first {
        let Source::Peer(PeerId(p)) = *from else {
            unreachable!()
        };
        if p % 2 == 1 {
            next.extend(requests(&s.on_piece(*piece, *from, PS, t, true)));
        }
    }
    // Each odd peer is asked for its other piece, nobody else for anything.
    let mut want: Vec<(u64, Source)> = first
        .iter()
        .filter_map(|(piece, from)| match *from {
            Source::Peer(PeerId(p)) if p % 2 == 1 => Some((piece ^ 1, *from)),
            _ => None,
        })
        .collect();
    want.sort();
    next.sort();
    assert_eq!(next, want);
}

/// A driver told of pieces one at a time (a peer's have) polls only when
/// `could_ask` says a poll would ask for that piece.
#[test]
fn a_piece_told_of_can_be_asked_only_when_nothing_stands_in_the_way() {
    let t = Instant::now();
    let config = Config {
        max_per_peer: 1,
        max_origin: 0,
        ..cfg()
    };
    let mut s = sched(4, config);
    s.add_peer(A, &bits(4, [])).unwrap();
    assert!(s.poll(t).is_empty());
    s.peer_has(A, 2);
    assert!(s.could_ask(A, 2));
    assert_eq!(requests(&s.poll(t)), vec![(2, Source::Peer(A))]);
    // A is at its limit; piece 2 is asked of A already; B is unknown.
    s.peer_has(A, 3);
    assert!(!s.could_ask(A, 3));
    assert!(!s.could_ask(B, 3));
    s.peer_has(B, 2);
    assert!(!s.could_ask(B, 2));
    // A piece whose hash is not known is not asked of a peer.
    s.set_hash_known(1, false);
    s.peer_has(B, 1);
    assert!(!s.could_ask(B, 1));
    // A is free again once its piece came (and asked at once for the
    // piece held back); piece 2 is held.
    let next = s.on_piece(2, Source::Peer(A), PS, t, true);
    assert_eq!(requests(&next), vec![(3, Source::Peer(A))]);
    assert!(!s.could_ask(A, 2));
}
