use super::*;

const HB: Duration = Duration::from_secs(5);

fn info(id: &str, zone: &str) -> PeerInfo {
    PeerInfo {
        id: id.into(),
        quic_addr: format!("{id}.example:7401"),
        node: format!("node-{id}"),
        zone: zone.into(),
        upload_capacity: 100,
    }
}

/// Each test peer calls from a certificate of its own name.
fn by(id: &str) -> Caller {
    Caller::Identity(id.to_string())
}

fn digest() -> Digest {
    Digest::of(b"blob")
}

/// A 10-piece blob of 1-byte pieces; `held` lists the pieces in the bitmap.
fn ann(held: &[u64], hashes: Vec<PieceHash>) -> Announce {
    let mut b = Bitmap::new(10);
    for &i in held {
        b.set(i);
    }
    Announce {
        digest: digest(),
        size: 10,
        piece_size: 1,
        hashes,
        bitmap: b.as_bytes().to_vec(),
    }
}

fn ids(f: &Found) -> Vec<&str> {
    f.peers.iter().map(|c| c.id.as_str()).collect()
}

#[test]
fn ranks_zone_then_pieces_then_load() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    for (id, zone, load) in [
        ("far-full", "b", 0),
        ("near-few", "a", 0),
        ("near-many-busy", "a", 5),
        ("near-many-idle", "a", 1),
        ("far-few", "b", 0),
    ] {
        s.register(&by(id), info(id, zone), load, t0).unwrap();
    }
    let all: Vec<u64> = (0..10).collect();
    s.announce(&by("far-full"), "far-full", ann(&all, vec![]), t0)
        .unwrap();
    s.announce(&by("near-few"), "near-few", ann(&[1], vec![]), t0)
        .unwrap();
    s.announce(
        &by("near-many-busy"),
        "near-many-busy",
        ann(&[1, 2, 3], vec![]),
        t0,
    )
    .unwrap();
    s.announce(
        &by("near-many-idle"),
        "near-many-idle",
        ann(&[4, 5, 6], vec![]),
        t0,
    )
    .unwrap();
    s.announce(&by("far-few"), "far-few", ann(&[9], vec![]), t0)
        .unwrap();

    let f = s.find(&digest(), "asker", "a", 0, t0).unwrap();
    assert_eq!(
        ids(&f),
        [
            "near-many-idle",
            "near-many-busy",
            "near-few",
            "far-full",
            "far-few"
        ]
    );
    assert_eq!((f.size, f.piece_size), (10, 1));
    assert_eq!(f.peers[0].held, 3);
    assert_eq!(f.peers[0].quic_addr, "near-many-idle.example:7401");

    // No zone: pieces decide.
    let f = s.find(&digest(), "asker", "", 0, t0).unwrap();
    assert_eq!(ids(&f)[0], "far-full");
    // The limit keeps the best.
    let f = s.find(&digest(), "asker", "a", 2, t0).unwrap();
    assert_eq!(ids(&f), ["near-many-idle", "near-many-busy"]);
}

#[test]
fn heartbeat_updates_load_and_ranking() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("x"), info("x", "a"), 0, t0).unwrap();
    s.register(&by("y"), info("y", "a"), 3, t0).unwrap();
    s.announce(&by("x"), "x", ann(&[0], vec![]), t0).unwrap();
    s.announce(&by("y"), "y", ann(&[1], vec![]), t0).unwrap();
    assert_eq!(
        ids(&s.find(&digest(), "z", "a", 0, t0).unwrap()),
        ["x", "y"]
    );
    s.heartbeat(&by("x"), "x", 9, t0).unwrap();
    s.heartbeat(&by("y"), "y", 0, t0).unwrap();
    assert_eq!(
        ids(&s.find(&digest(), "z", "a", 0, t0).unwrap()),
        ["y", "x"]
    );
}

#[test]
fn asking_peer_is_not_answered_and_starting_peers_come_last() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("me"), info("me", "a"), 0, t0).unwrap();
    s.register(&by("other"), info("other", "a"), 0, t0).unwrap();
    s.register(&by("starting"), info("starting", "a"), 0, t0)
        .unwrap();
    s.announce(&by("me"), "me", ann(&[0, 1, 2], vec![]), t0)
        .unwrap();
    s.announce(&by("other"), "other", ann(&[0], vec![]), t0)
        .unwrap();
    s.announce(&by("starting"), "starting", ann(&[], vec![]), t0)
        .unwrap();
    let f = s.find(&digest(), "me", "a", 0, t0).unwrap();
    assert_eq!(ids(&f), ["other", "starting"]);
    s.withdraw(&by("starting"), "starting", &digest(), t0)
        .unwrap();
    // Only the asker holds it: still an answer (geometry, hashes), no peers.
    s.withdraw(&by("other"), "other", &digest(), t0).unwrap();
    let f = s.find(&digest(), "me", "a", 0, t0).unwrap();
    assert!(f.peers.is_empty());
    assert!(s.find(&Digest::of(b"other"), "me", "a", 0, t0).is_none());
}

#[test]
fn of_peers_joining_together_only_the_first_hears_nobody() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    for id in ["a", "b", "c"] {
        s.register(&by(id), info(id, ""), 0, t0).unwrap();
    }
    let join = Some((10, 1));
    let mut join_as = |id: &str, d: &Digest| s.find_and_join(&by(id), d, id, "", 0, join, t0);
    assert!(join_as("a", &digest()).unwrap().is_none());
    let f = join_as("b", &digest()).unwrap().unwrap();
    assert_eq!(ids(&f), ["a"]);
    assert_eq!(f.peers[0].held, 0);
    let f = join_as("c", &digest()).unwrap().unwrap();
    assert_eq!(ids(&f), ["a", "b"]);

    // Joining again keeps what the joiner announced since.
    s.announce(&by("a"), "a", ann(&[0, 1], vec![]), t0).unwrap();
    s.find_and_join(&by("a"), &digest(), "a", "", 0, join, t0)
        .unwrap();
    let f = s.find(&digest(), "b", "", 0, t0).unwrap();
    assert_eq!(f.peers[0].id, "a");
    assert_eq!(f.peers[0].held, 2);

    // A plain find records nothing; an unknown asker is answered but not recorded.
    assert!(s.find(&Digest::of(b"x"), "a", "", 0, t0).is_none());
    assert!(
        s.find_and_join(&by("ghost"), &Digest::of(b"x"), "ghost", "", 0, join, t0)
            .unwrap()
            .is_none()
    );
    assert!(s.find(&Digest::of(b"x"), "a", "", 0, t0).is_none());
}

#[test]
fn announce_replaces_the_bitmap() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("p"), info("p", ""), 0, t0).unwrap();
    s.announce(&by("p"), "p", ann(&[0], vec![]), t0).unwrap();
    s.announce(&by("p"), "p", ann(&[3, 4], vec![]), t0).unwrap();
    let f = s.find(&digest(), "q", "", 0, t0).unwrap();
    assert_eq!(f.peers[0].held, 2);
    assert_eq!(f.peers[0].bitmap, vec![0b0001_1000, 0]);
}

#[test]
fn silent_peer_disappears_within_two_intervals() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("quiet"), info("quiet", "a"), 0, t0).unwrap();
    s.register(&by("chatty"), info("chatty", "a"), 0, t0)
        .unwrap();
    s.announce(&by("quiet"), "quiet", ann(&[0], vec![]), t0)
        .unwrap();
    s.announce(&by("chatty"), "chatty", ann(&[1], vec![]), t0)
        .unwrap();

    // The server sweeps every quarter interval; walk time like it does.
    let mut now = t0;
    let mut gone_at = None;
    while now <= t0 + 2 * HB {
        now += s.sweep_interval();
        if (now - t0).as_millis().is_multiple_of(HB.as_millis()) {
            s.heartbeat(&by("chatty"), "chatty", 0, now).unwrap();
        }
        s.expire(now);
        let f = s.find(&digest(), "asker", "a", 0, now).unwrap();
        if gone_at.is_none() && !ids(&f).contains(&"quiet") {
            gone_at = Some(now - t0);
        }
    }
    let gone_at = gone_at.expect("quiet peer never expired");
    assert!(
        gone_at > HB,
        "expired before one missed heartbeat: {gone_at:?}"
    );
    assert!(gone_at <= 2 * HB, "{gone_at:?}");
    assert_eq!(s.peer_count(), 1);
    assert_eq!(
        s.heartbeat(&by("quiet"), "quiet", 0, now),
        Err(StateError::UnknownPeer("quiet".into()))
    );
    assert_eq!(
        ids(&s.find(&digest(), "asker", "a", 0, now).unwrap()),
        ["chatty"]
    );
}

#[test]
fn find_hides_lapsed_peers_before_the_sweep() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("p"), info("p", ""), 0, t0).unwrap();
    s.announce(&by("p"), "p", ann(&[0], vec![]), t0).unwrap();
    let later = t0 + s.lease().lease;
    assert!(s.find(&digest(), "q", "", 0, later).is_none());
    // And a lapsed peer must register again, which clears its holdings.
    assert!(matches!(
        s.announce(&by("p"), "p", ann(&[0], vec![]), later),
        Err(StateError::UnknownPeer(_))
    ));
    s.register(&by("p"), info("p", ""), 0, later).unwrap();
    assert!(s.find(&digest(), "q", "", 0, later).is_none());
    assert_eq!(s.blob_count(), 0);
}

#[test]
fn reregistering_a_live_peer_keeps_its_holdings() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("p"), info("p", ""), 0, t0).unwrap();
    s.announce(&by("p"), "p", ann(&[0], vec![]), t0).unwrap();
    s.register(&by("p"), info("p", "z"), 0, t0 + HB).unwrap();
    let f = s.find(&digest(), "q", "z", 0, t0 + HB).unwrap();
    assert_eq!(f.peers[0].zone, "z");
}

#[test]
fn expiry_drops_announcements_and_empty_blobs() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("p"), info("p", ""), 0, t0).unwrap();
    s.announce(&by("p"), "p", ann(&[0], vec![]), t0).unwrap();
    assert_eq!(s.expire(t0 + HB), 0);
    assert_eq!(s.expire(t0 + 2 * HB), 1);
    assert_eq!((s.peer_count(), s.blob_count()), (0, 0));
}

#[test]
fn hashes_merge_and_conflicts_drop_the_hash() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    for id in ["a", "b", "c"] {
        s.register(&by(id), info(id, ""), 0, t0).unwrap();
    }
    let h = |b: u8| Some([b; 32]);
    // a knows pieces 0-1, b knows 1-2 (agrees on 1), c lies about 2.
    s.announce(&by("a"), "a", ann(&[0], vec![h(0), h(1)]), t0)
        .unwrap();
    s.announce(&by("b"), "b", ann(&[1], vec![None, h(1), h(2)]), t0)
        .unwrap();
    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(f.hashes, vec![h(0), h(1), h(2)]);

    s.announce(&by("c"), "c", ann(&[2], vec![None, None, h(9), h(3)]), t0)
        .unwrap();
    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(f.hashes, vec![h(0), h(1), None, h(3)]);

    // An announcement replaces the last one's hashes, votes and all.
    s.announce(&by("c"), "c", ann(&[2], vec![None, None, h(2), h(3)]), t0)
        .unwrap();
    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(f.hashes, vec![h(0), h(1), h(2), h(3)]);
    s.announce(&by("c"), "c", ann(&[2], vec![None, None, h(9), h(3)]), t0)
        .unwrap();

    // Once the liar is gone, the honest hash is back.
    s.withdraw(&by("c"), "c", &digest(), t0).unwrap();
    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(f.hashes, vec![h(0), h(1), h(2)]);
}

#[test]
fn malformed_announcements_are_refused() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    s.register(&by("p"), info("p", ""), 0, t0).unwrap();
    let mut a = ann(&[0], vec![]);
    a.bitmap.push(0);
    assert!(matches!(
        s.announce(&by("p"), "p", a, t0),
        Err(StateError::Bitmap { .. })
    ));
    let a = ann(&[0], vec![None; 11]);
    assert!(matches!(
        s.announce(&by("p"), "p", a, t0),
        Err(StateError::TooManyHashes { .. })
    ));
    let mut a = ann(&[0], vec![]);
    a.piece_size = 0;
    assert!(matches!(
        s.announce(&by("p"), "p", a, t0),
        Err(StateError::BadPieceSize { .. })
    ));
    assert!(matches!(
        s.announce(&by("nobody"), "nobody", ann(&[0], vec![]), t0),
        Err(StateError::UnknownPeer(_))
    ));
    // Geometry is fixed by the first holder.
    s.announce(&by("p"), "p", ann(&[0], vec![]), t0).unwrap();
    s.register(&by("q"), info("q", ""), 0, t0).unwrap();
    let a = Announce {
        digest: digest(),
        size: 10,
        piece_size: 5,
        hashes: vec![],
        bitmap: vec![1],
    };
    assert!(matches!(
        s.announce(&by("q"), "q", a, t0),
        Err(StateError::Geometry { .. })
    ));
    let mut bad = info("r", "");
    bad.quic_addr.clear();
    assert_eq!(
        s.register(&by("r"), bad, 0, t0),
        Err(StateError::IncompletePeer)
    );
}

fn from(ip: [u8; 4]) -> Caller {
    Caller::Address(IpAddr::from(ip))
}

#[test]
fn a_live_peer_id_is_its_callers_alone() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    let (owner, other) = (from([10, 0, 0, 1]), from([10, 0, 0, 2]));
    s.register(&owner, info("p", "a"), 0, t0).unwrap();
    s.announce(&owner, "p", ann(&[0, 1], vec![Some([1; 32])]), t0)
        .unwrap();
    let before = s.bytes();

    // Another address: no takeover, no renewal, no announcing or
    // withdrawing in its name, no joining as it.
    assert!(matches!(
        s.register(&other, info("p", "evil"), 0, t0),
        Err(StateError::Taken { .. })
    ));
    assert!(matches!(
        s.heartbeat(&other, "p", 0, t0),
        Err(StateError::NotYours { .. })
    ));
    assert!(matches!(
        s.announce(&other, "p", ann(&[], vec![Some([9; 32])]), t0),
        Err(StateError::NotYours { .. })
    ));
    assert!(matches!(
        s.withdraw(&other, "p", &digest(), t0),
        Err(StateError::NotYours { .. })
    ));
    assert!(matches!(
        s.find_and_join(&other, &Digest::of(b"y"), "p", "", 0, Some((1, 1)), t0),
        Err(StateError::NotYours { .. })
    ));
    // Per-node certificates: another identity is another caller, even
    // from the same address.
    let cert = Caller::Identity("node-a".into());
    s.register(&cert, info("q", ""), 0, t0).unwrap();
    assert!(matches!(
        s.withdraw(&Caller::Identity("node-b".into()), "q", &digest(), t0),
        Err(StateError::NotYours { .. })
    ));

    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(ids(&f), ["p"]);
    assert_eq!(f.peers[0].held, 2);
    assert_eq!(f.peers[0].zone, "a");
    assert_eq!(f.hashes, vec![Some([1; 32])]);
    assert!(s.find(&Digest::of(b"y"), "x", "", 0, t0).is_none());
    assert!(s.bytes() > before, "q's registration");

    // Once its lease runs out, the id is free.
    let later = t0 + s.lease().lease;
    s.register(&other, info("p", "b"), 0, later).unwrap();
    assert!(s.find(&digest(), "x", "", 0, later).is_none());
}

#[test]
fn hostile_numbers_are_refused_before_they_size_anything() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    let me = from([10, 0, 0, 1]);
    s.register(&me, info("p", ""), 0, t0).unwrap();
    let (peers, bytes) = (s.peer_count(), s.bytes());

    // 2^64-1 one-byte pieces: a 2 EiB bitmap, once.
    let e = s.find_and_join(&me, &digest(), "p", "", 0, Some((u64::MAX, 1)), t0);
    assert!(matches!(e, Err(StateError::TooManyPieces { .. })), "{e:?}");
    let e = s.find_and_join(&me, &digest(), "p", "", 0, Some((10, 0)), t0);
    assert!(matches!(e, Err(StateError::BadPieceSize { .. })), "{e:?}");
    let e = s.find_and_join(&me, &digest(), "p", "", 0, Some((10, u64::MAX)), t0);
    assert!(matches!(e, Err(StateError::BadPieceSize { .. })), "{e:?}");
    // A 4 MiB bitmap.
    let big = Announce {
        digest: digest(),
        size: 32 << 20,
        piece_size: 1,
        hashes: vec![],
        bitmap: vec![0xff; 4 << 20],
    };
    assert!(matches!(
        s.announce(&me, "p", big, t0),
        Err(StateError::TooManyPieces { .. })
    ));
    let long = "x".repeat(s.limits().max_name + 1);
    let mut i = info("q", "");
    i.zone = long.clone();
    assert!(matches!(
        s.register(&me, i, 0, t0),
        Err(StateError::TooLong { what: "zone", .. })
    ));
    assert!(matches!(
        s.register(&me, info(&long, ""), 0, t0),
        Err(StateError::TooLong {
            what: "peer id",
            ..
        })
    ));
    assert_eq!(
        (s.peer_count(), s.blob_count(), s.bytes()),
        (peers, 0, bytes)
    );
    // The largest honest blob is fine.
    let max = s.limits().max_pieces;
    let f = s.find_and_join(&me, &digest(), "p", "", 0, Some((max * 4, 4)), t0);
    assert_eq!(f, Ok(None));
    assert_eq!(s.blob_count(), 1);
}

#[test]
fn other_geometry_is_refused_and_the_holders_keep_theirs() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    for id in ["a", "b"] {
        s.register(&by(id), info(id, ""), 0, t0).unwrap();
    }
    let hashes = vec![Some([1; 32]), Some([2; 32])];
    s.announce(&by("a"), "a", ann(&[0, 1, 2], hashes.clone()), t0)
        .unwrap();
    for (size, piece_size) in [(10, 5), (11, 1), (20, 2)] {
        let other = Announce {
            digest: digest(),
            size,
            piece_size,
            hashes: vec![Some([7; 32])],
            bitmap: vec![0xff; Bitmap::byte_len(u64::div_ceil(size, piece_size))],
        };
        let other = Announce {
            bitmap: Bitmap::from_bytes(size.div_ceil(piece_size), &other.bitmap)
                .map(|b| b.as_bytes().to_vec())
                .unwrap_or_else(|_| Bitmap::new(size.div_ceil(piece_size)).as_bytes().to_vec()),
            ..other
        };
        assert!(matches!(
            s.announce(&by("b"), "b", other, t0),
            Err(StateError::Geometry { .. })
        ));
        // A join with other numbers is answered (the asker compares the
        // size and goes to the origin) but not recorded.
        let f = s
            .find_and_join(
                &by("b"),
                &digest(),
                "b",
                "",
                0,
                Some((size, piece_size)),
                t0,
            )
            .unwrap()
            .unwrap();
        assert_eq!((f.size, f.piece_size), (10, 1));
    }
    let f = s.find(&digest(), "x", "", 0, t0).unwrap();
    assert_eq!(ids(&f), ["a"]);
    assert_eq!(f.peers[0].held, 3);
    assert_eq!(f.hashes, hashes);
}

#[test]
fn peers_digests_and_holders_are_counted() {
    let t0 = Instant::now();
    let limits = Limits {
        max_peers: 3,
        max_peers_per_caller: 2,
        max_digests_per_peer: 2,
        max_peers_per_digest: 2,
        ..Limits::default()
    };
    let mut s = State::with_limits(HB, limits);
    let (one, two) = (from([10, 0, 0, 1]), from([10, 0, 0, 2]));
    s.register(&one, info("a", ""), 0, t0).unwrap();
    s.register(&one, info("b", ""), 0, t0).unwrap();
    assert!(matches!(
        s.register(&one, info("c", ""), 0, t0),
        Err(StateError::TooManyPeersOfCaller { max: 2, .. })
    ));
    // Renewing is not a new registration.
    s.register(&one, info("a", "z"), 0, t0).unwrap();
    s.register(&two, info("c", ""), 0, t0).unwrap();
    assert!(matches!(
        s.register(&two, info("d", ""), 0, t0),
        Err(StateError::TooManyPeers { max: 3 })
    ));

    let blob = |n: u8| Announce {
        digest: Digest::of(&[n]),
        ..ann(&[0], vec![])
    };
    s.announce(&one, "a", blob(1), t0).unwrap();
    s.announce(&one, "a", blob(2), t0).unwrap();
    assert!(matches!(
        s.announce(&one, "a", blob(3), t0),
        Err(StateError::TooManyDigests { max: 2, .. })
    ));
    // Re-announcing one it holds is no new digest.
    s.announce(&one, "a", blob(2), t0).unwrap();
    s.announce(&one, "b", blob(1), t0).unwrap();
    assert!(matches!(
        s.announce(&two, "c", blob(1), t0),
        Err(StateError::TooManyHolders { max: 2, .. })
    ));
    // Withdrawing makes room.
    s.withdraw(&one, "b", &Digest::of(&[1]), t0).unwrap();
    s.announce(&two, "c", blob(1), t0).unwrap();
}

#[test]
fn state_bytes_stay_within_the_budget_and_come_back() {
    let t0 = Instant::now();
    let limits = Limits {
        max_pieces: 1024,
        ..Limits::with_max_bytes(1 << 20)
    };
    let per_caller = limits.max_bytes_per_caller;
    let mut s = State::with_limits(HB, limits);
    let full = |n: u32| Announce {
        digest: Digest::of(&n.to_le_bytes()),
        size: 1024,
        piece_size: 1,
        hashes: vec![Some([3; 32]); 1024],
        bitmap: vec![0xff; 128],
    };
    // One caller alone gets its share and no more.
    let me = from([10, 0, 0, 1]);
    s.register(&me, info("me", ""), 0, t0).unwrap();
    let mut n = 0;
    let e = loop {
        if let Err(e) = s.announce(&me, "me", full(n), t0) {
            break e;
        }
        n += 1;
    };
    assert!(matches!(e, StateError::OutOfMemory { .. }), "{e}");
    // Its own share; the blobs' votes are the state's (see VOTE_BYTES).
    let mine = s.callers[&me].bytes;
    assert!(mine <= per_caller, "{mine} > {per_caller}");
    assert!(mine + 40_000 > per_caller, "stopped early at {mine}");
    assert!(s.bytes() > mine, "the votes are charged to the state");

    // Many callers: the whole state stops at its budget.
    let mut refused = 0;
    for c in 0..40u8 {
        let caller = from([10, 0, 1, c]);
        let id = format!("peer-{c}");
        if s.register(&caller, info(&id, ""), 0, t0).is_err() {
            refused += 1;
            continue;
        }
        for k in 0..20 {
            match s.announce(&caller, &id, full(1000 * (c as u32 + 1) + k), t0) {
                Err(StateError::OutOfMemory { whose, .. }) if whose.is_empty() => refused += 1,
                _ => {}
            }
        }
    }
    assert!(refused > 0, "nothing refused for the state's budget");
    assert!(s.bytes() <= 1 << 20, "{}", s.bytes());
    // Withdrawals and expiry give every byte back.
    s.withdraw(&me, "me", &Digest::of(&0u32.to_le_bytes()), t0)
        .unwrap();
    s.expire(t0 + 2 * HB);
    assert_eq!((s.peer_count(), s.blob_count(), s.bytes()), (0, 0, 0));
    assert!(s.callers.is_empty());
}

/// A peer is gone with the connection it last spoke over, holdings and
/// all; one that moved to a new connection is not dropped with its old one.
#[test]
fn a_peer_is_gone_with_its_connection_not_with_an_old_one() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    for id in ["a", "b"] {
        s.register(&by(id), info(id, "z"), 0, t0).unwrap();
        s.announce(&by(id), id, ann(&[0, 1], vec![]), t0).unwrap();
    }
    s.bind_connection(&by("a"), "a", 1, t0).unwrap();
    s.bind_connection(&by("b"), "b", 2, t0).unwrap();
    // b reconnected: its old connection's close must not drop it.
    s.bind_connection(&by("b"), "b", 3, t0).unwrap();
    assert!(
        s.bind_connection(&by("b"), "a", 9, t0).is_err(),
        "only a's caller binds a"
    );
    assert_eq!(s.connection_closed(2), 0);
    assert_eq!(s.connection_closed(1), 1);
    let found = s.find(&digest(), "b", "z", 10, t0).unwrap();
    assert!(ids(&found).is_empty(), "{:?}", ids(&found));
    assert_eq!(s.peer_count(), 1);
    // Its next heartbeat is answered "unknown": it registers again.
    assert!(matches!(
        s.heartbeat(&by("a"), "a", 0, t0),
        Err(StateError::UnknownPeer(_))
    ));
    assert_eq!(s.connection_closed(3), 1);
    assert_eq!(s.peer_count(), 0);
}

/// With more holders than an answer names, each asker gets the most
/// complete few and its own stable sample of the rest, so followers spread
/// their requests instead of all asking the same 32 nodes.
#[test]
fn a_big_swarm_is_shown_to_each_asker_as_its_own_sample() {
    let t0 = Instant::now();
    let mut s = State::new(HB);
    let holders: Vec<String> = (0..100).map(|i| format!("h{i:03}")).collect();
    for (i, id) in holders.iter().enumerate() {
        s.register(&by(id), info(id, "z"), 0, t0).unwrap();
        // h000 holds the most pieces, then h001, ...; the rest hold one.
        let held: Vec<u64> = (0..(10 - i.min(9)) as u64).collect();
        s.announce(&by(id), id, ann(&held, vec![]), t0).unwrap();
    }
    let askers = ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"];
    let mut seen = std::collections::HashSet::new();
    let mut answers = Vec::new();
    for a in askers {
        s.register(&by(a), info(a, "z"), 0, t0).unwrap();
        let f = s.find(&digest(), a, "z", 32, t0).unwrap();
        let got: Vec<String> = ids(&f).into_iter().map(String::from).collect();
        assert_eq!(got.len(), 32);
        // The 8 most complete, in rank order, lead every answer.
        assert_eq!(got[..8], holders[..8], "{a}");
        // The same asker gets the same sample again.
        let again = s.find(&digest(), a, "z", 32, t0).unwrap();
        assert_eq!(
            ids(&again),
            got.iter().map(String::as_str).collect::<Vec<_>>()
        );
        seen.extend(got.clone());
        answers.push(got);
    }
    assert_ne!(answers[0], answers[1]);
    // 100 holders: ask and announce every 400 ms (100 ms per 32), so the
    // replica's calls for this blob stay about flat as the swarm grows.
    let f = s.find(&digest(), "a1", "z", 32, t0).unwrap();
    assert_eq!(f.refresh_after, Duration::from_millis(400));
    assert_eq!(s.pace(&digest()), Duration::from_millis(400));
    assert_eq!(
        s.pace(&Digest::of(b"nobody has it")),
        Duration::from_millis(100)
    );
    assert!(
        seen.len() > 60,
        "8 askers saw only {} of 100 holders",
        seen.len()
    );
}
