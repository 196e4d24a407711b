//! The tracker's state fed any sequence of requests any peer could send
//! (register, heartbeat, announce, withdraw, find/join) with time passing and
//! expiry sweeps in between.
//!
//! Ids, zones, digests and callers (the address or certificate a request
//! comes from) come from small pools so that requests collide on the same
//! peers and blobs, and callers try each other's ids; every number is taken
//! as sent on the wire.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use damselfly::{
    tracker::{Announce, Caller, DEFAULT_MAX_PEERS, PeerInfo, State},
    vocab::Digest,
};
use libfuzzer_sys::fuzz_target;

/// One request, from one of four callers.
#[derive(Arbitrary, Debug)]
struct Step {
    from: u8,
    op: Op,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Register {
        peer: u8,
        no_addr: bool,
        zone: u8,
        active_uploads: u32,
        upload_capacity: u64,
    },
    Heartbeat {
        peer: u8,
        active_uploads: u32,
    },
    Announce {
        peer: u8,
        blob: u8,
        size: u64,
        piece_size: u64,
        hashes: Vec<Option<[u8; 32]>>,
        bitmap: Vec<u8>,
    },
    Withdraw {
        peer: u8,
        blob: u8,
    },
    Find {
        peer: u8,
        blob: u8,
        zone: u8,
        max_peers: u32,
        join: Option<(u64, u64)>,
    },
    Advance {
        millis: u16,
    },
    Expire,
}

fn id(peer: u8) -> String {
    format!("peer-{}", peer % 8)
}

fn zone(z: u8) -> String {
    // Zone 0 is the empty zone, which matches nothing.
    match z % 4 {
        0 => String::new(),
        z => format!("zone-{z}"),
    }
}

fn digest(blob: u8) -> Digest {
    Digest([blob % 4; 32])
}

fn caller(from: u8) -> Caller {
    match from % 4 {
        3 => Caller::Identity("node-3".into()),
        n => Caller::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))),
    }
}

/// The only place that knows the state's API: one request applied at `now`.
fn apply(state: &mut State, from: &Caller, op: Op, now: Instant) {
    match op {
        Op::Register {
            peer,
            no_addr,
            zone: z,
            active_uploads,
            upload_capacity,
        } => {
            let info = PeerInfo {
                id: id(peer),
                quic_addr: if no_addr {
                    String::new()
                } else {
                    format!("10.0.0.{peer}:4433")
                },
                node: format!("node-{peer}"),
                zone: zone(z),
                upload_capacity,
            };
            let _ = state.register(from, info, active_uploads, now);
        }
        Op::Heartbeat {
            peer,
            active_uploads,
        } => {
            let _ = state.heartbeat(from, &id(peer), active_uploads, now);
        }
        Op::Announce {
            peer,
            blob,
            size,
            piece_size,
            hashes,
            bitmap,
        } => {
            let a = Announce {
                digest: digest(blob),
                size,
                piece_size,
                hashes,
                bitmap,
            };
            let _ = state.announce(from, &id(peer), a, now);
        }
        Op::Withdraw { peer, blob } => {
            let _ = state.withdraw(from, &id(peer), &digest(blob), now);
        }
        Op::Find {
            peer,
            blob,
            zone: z,
            max_peers,
            join,
        } => {
            let asking = id(peer);
            let max_peers = max_peers as usize;
            let found =
                state.find_and_join(from, &digest(blob), &asking, &zone(z), max_peers, join, now);
            if let Ok(Some(f)) = found {
                let limit = if max_peers == 0 {
                    DEFAULT_MAX_PEERS
                } else {
                    max_peers
                }
                .min(state.limits().max_answer);
                assert!(f.peers.len() <= limit);
                assert!(f.peers.iter().all(|c| c.id != asking));
                let pieces = f.size.div_ceil(f.piece_size);
                assert!(f.hashes.len() as u64 <= pieces);
                for c in &f.peers {
                    assert!(c.held <= pieces);
                    assert_eq!(c.bitmap.len() as u64, pieces.div_ceil(8));
                }
            }
        }
        Op::Advance { .. } | Op::Expire => unreachable!("handled by the caller"),
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mut now = Instant::now();
    let mut state = State::new(Duration::from_secs(10));
    for Step { from, op } in steps {
        match op {
            Op::Advance { millis } => now += Duration::from_millis(millis.into()),
            Op::Expire => {
                state.expire(now);
            }
            op => apply(&mut state, &caller(from), op, now),
        }
        // The budget holds after every request.
        assert!(state.bytes() <= state.limits().max_bytes);
    }
});
