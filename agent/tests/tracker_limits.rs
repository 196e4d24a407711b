//! The real `damselfly tracker` over TLS on loopback, sent what a hostile
//! client (with or without a cluster certificate) would send: every request
//! gets an error, the process keeps serving, and its memory stays under the
//! bound `server::Config::memory_bound` states, with its state filled to the
//! limit and every connection slot taken.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use damselfly::{
    pki::{ClusterPki, PEER_SERVER_NAME},
    testing::{TempDir, TestCa},
    tracker::{Limits, server, tls},
    vocab::{Bitmap, Digest},
};
use damselfly_proto::tracker::{self as pb, tracker_client::TrackerClient};
use tonic::{Code, transport::Channel};

const MAX_STATE: u64 = 32 << 20;
const MAX_CONNECTIONS: usize = 48;
const MAX_IN_FLIGHT: usize = 8;

/// The tracker process; killed on drop.
struct Tracker {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tracker {
    fn start(ca: &TestCa) -> Self {
        let dir = TempDir::new("tracker-limits");
        let flags = ca.write(dir.path(), "tracker", ca.issue(&["damselfly-tracker"]));
        // A port that was free a moment ago.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.join("tracker.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_damselfly"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DAMSELFLY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(["tracker", "--listen", &addr.to_string()])
            .args(&flags)
            .args(["--max-state", &MAX_STATE.to_string()])
            .args(["--max-connections", &MAX_CONNECTIONS.to_string()])
            .args(["--max-in-flight", &MAX_IN_FLIGHT.to_string()])
            // Nobody here heartbeats: leases outlast the test.
            .args(["--heartbeat", "60s"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut t = Self { child, addr, dir };
        let t0 = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(t.running(), "tracker exited: {}", t.log());
            assert!(t0.elapsed() < Duration::from_secs(10), "{}", t.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tracker.log")).unwrap_or_default()
    }

    /// (VmRSS, VmHWM) in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
                * 1024
        };
        (kib("VmRSS:"), kib("VmHWM:"))
    }
}

async fn connect(addr: SocketAddr, pki: &ClusterPki) -> Result<TrackerClient<Channel>, String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tls::Connector::new(tls::client_config(pki).unwrap()))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(TrackerClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

fn peer(id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        peer: Some(pb::PeerInfo {
            peer_id: id.into(),
            quic_addr: "127.0.0.1:7401".into(),
            node_name: id.into(),
            zone: "z".into(),
            upload_capacity: 0,
        }),
        active_uploads: 0,
    }
}

fn announce(id: &str, d: &Digest, size: u64, piece_size: u64, hash: u8) -> pb::AnnounceRequest {
    let pieces = size.div_ceil(piece_size);
    let mut bitmap = Bitmap::new(pieces);
    for i in 0..pieces {
        bitmap.set(i);
    }
    pb::AnnounceRequest {
        peer_id: id.into(),
        digest: d.to_string(),
        size,
        piece_size,
        piece_hashes: vec![vec![hash; 32]; pieces as usize],
        bitmap: bitmap.as_bytes().to_vec(),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_errors_and_the_tracker_stays_up_within_its_memory_bound() {
    let ca = TestCa::new("cluster");
    let mut t = Tracker::start(&ca);
    let addr = t.addr;
    // Let the runtime settle before taking the process's size at rest.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base, _) = t.memory();
    let t0 = Instant::now();

    // What an open connection costs at rest (TLS and HTTP/2 state), against
    // the server::CONNECTION_COST the bound counts (which also covers full
    // buffers).
    let shared = ca.peer("idle");
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut c = connect(addr, &shared).await.unwrap();
        let probe = pb::FindRequest {
            digest: Digest::of(b"nothing").to_string(),
            ..Default::default()
        };
        c.find(probe).await.unwrap();
        idle.push(c);
    }
    let (with_idle, _) = t.memory();
    let per_connection = with_idle.saturating_sub(base) / 40;
    eprintln!("an idle connection costs {} KiB", per_connection / 1024);
    assert!(per_connection <= server::CONNECTION_COST);
    drop(idle);

    // Without a cluster certificate nothing gets through.
    let outsider = TestCa::new("elsewhere");
    let refused = match connect(addr, &outsider.peer("intruder")).await {
        Err(_) => true,
        Ok(mut c) => c.register(peer("intruder")).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was served");
    eprintln!("outsider refused after {:?}", t0.elapsed());
    // Nor with the tracker's own (no damselfly-peer), nor with none of the
    // cluster's but trusting the right CA.
    let mut c = connect(addr, &ca.tracker()).await.ok();
    if let Some(c) = &mut c {
        assert!(c.register(peer("as-tracker")).await.is_err());
    }

    // An honest peer on a per-node certificate.
    let mut honest = connect(addr, &ca.peer("node-a")).await.unwrap();
    honest.register(peer("a")).await.unwrap();
    let layer = Digest::of(b"layer");
    honest
        .announce(announce("a", &layer, 10 << 22, 4 << 20, 7))
        .await
        .unwrap();

    // Another node, same address, another certificate.
    let mut evil = connect(addr, &ca.peer("node-b")).await.unwrap();
    assert_eq!(code(evil.register(peer("a")).await), Code::PermissionDenied);
    assert_eq!(
        code(evil.announce(announce("a", &layer, 10, 1, 9)).await),
        Code::PermissionDenied
    );
    let withdraw = pb::WithdrawRequest {
        peer_id: "a".into(),
        digest: layer.to_string(),
    };
    assert_eq!(code(evil.withdraw(withdraw).await), Code::PermissionDenied);
    let join = |id: &str, d: &Digest, size, piece_size| pb::FindRequest {
        digest: d.to_string(),
        peer_id: id.into(),
        zone: String::new(),
        max_peers: u32::MAX,
        join: Some(pb::Join { size, piece_size }),
    };
    assert_eq!(
        code(evil.find(join("a", &Digest::of(b"x"), 10, 1)).await),
        Code::PermissionDenied
    );

    evil.register(peer("b")).await.unwrap();
    // 2^64-1 one-byte pieces.
    assert_eq!(
        code(evil.find(join("b", &Digest::of(b"y"), u64::MAX, 1)).await),
        Code::InvalidArgument
    );
    // A 4 MiB bitmap: past the message size limit before anything is parsed.
    let huge = pb::AnnounceRequest {
        bitmap: vec![0xff; 4 << 20],
        ..announce("b", &Digest::of(b"z"), 32 << 20, 1, 1)
    };
    assert!(evil.announce(huge).await.is_err());
    // Other geometry for the honest peer's blob: refused, theirs kept.
    assert_eq!(
        code(evil.announce(announce("b", &layer, 10, 1, 9)).await),
        Code::FailedPrecondition
    );
    // Hashes past the piece limit, and names past theirs.
    let limits = Limits::with_max_bytes(MAX_STATE);
    let many = pb::AnnounceRequest {
        piece_hashes: vec![vec![]; limits.max_pieces as usize + 1],
        ..announce("b", &Digest::of(b"w"), 10, 1, 1)
    };
    assert_eq!(code(evil.announce(many).await), Code::InvalidArgument);
    let long = "x".repeat(100_000);
    assert_eq!(
        code(evil.register(peer(&long)).await),
        Code::InvalidArgument
    );
    let f = evil
        .find(pb::FindRequest {
            digest: layer.to_string(),
            peer_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.peers.len(), 1);
    assert_eq!(f.peers[0].peer_id, "a");
    assert_eq!((f.size, f.piece_size), (10 << 22, 4 << 20));
    assert_eq!(f.piece_hashes, vec![vec![7u8; 32]; 10]);

    // Fill the state: nodes with certificates of their own, each
    // registering all it may and announcing the largest blobs allowed.
    let largest = limits.max_pieces * (4 << 20);
    let mut exhausted = 0;
    let mut clients = Vec::new();
    for n in 0..24 {
        let mut c = connect(addr, &ca.peer(&format!("filler-{n}")))
            .await
            .unwrap();
        // Until this caller is refused: its share, or the whole budget, is used.
        'caller: for p in 0..limits.max_peers_per_caller + 1 {
            let id = format!("filler-{n}-{p}");
            if let Err(s) = c.register(peer(&id)).await {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
                exhausted += 1;
                break;
            }
            for k in 0..8u32 {
                let d = Digest::of(format!("{id}-{k}").as_bytes());
                if let Err(s) = c
                    .announce(announce(&id, &d, largest, 4 << 20, k as u8))
                    .await
                {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
                    exhausted += 1;
                    break 'caller;
                }
            }
        }
        clients.push(c);
    }
    assert!(exhausted > 0, "the state budget was never reached");
    eprintln!("state filled after {:?}", t0.elapsed());

    // Every answer at once, the largest the state allows, on every
    // connection the tracker takes.
    let mut askers = clients;
    while askers.len() + 2 < MAX_CONNECTIONS {
        askers.push(connect(addr, &ca.peer("asker")).await.unwrap());
    }
    let big = Digest::of(b"filler-0-0-0");
    let mut calls = tokio::task::JoinSet::new();
    for c in &askers {
        for _ in 0..4 {
            let mut c = c.clone();
            let req = pb::FindRequest {
                digest: big.to_string(),
                peer_id: "nobody".into(),
                ..Default::default()
            };
            calls
                .spawn(async move { c.find(req).await.map(|r| r.into_inner().piece_hashes.len()) });
        }
    }
    let (mut answered, mut busy) = (0, 0);
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(n) => {
                assert_eq!(n as u64, limits.max_pieces);
                answered += 1;
            }
            Err(s) if s.code() == Code::ResourceExhausted => busy += 1,
            Err(s) => panic!("{s}"),
        }
    }
    eprintln!("finds: {answered} answered, {busy} refused as busy");
    assert!(answered > 0);

    // Still serving the honest peer, and within the bound.
    assert!(t.running(), "{}", t.log());
    let f = honest
        .find(pb::FindRequest {
            digest: layer.to_string(),
            peer_id: "z".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.peers[0].peer_id, "a");
    let (rss, peak) = t.memory();
    let cfg = server::Config {
        limits,
        max_connections: MAX_CONNECTIONS,
        max_in_flight: MAX_IN_FLIGHT,
        ..server::Config::new(Duration::from_secs(5))
    };
    let bound = cfg.memory_bound(base);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "tracker RSS at rest {:.1} MiB; after the hostile requests {:.1} MiB, peak {:.1} MiB; \
         bound {:.1} MiB (state {:.1} + in flight {:.1} + connections {:.1})",
        mib(base),
        mib(rss),
        mib(peak),
        mib(bound),
        mib(MAX_STATE),
        mib(MAX_IN_FLIGHT as u64 * 2 * cfg.limits.max_message() as u64),
        mib(MAX_CONNECTIONS as u64 * server::CONNECTION_COST),
    );
    assert!(peak <= bound, "peak RSS {peak} over the bound {bound}");
    assert!(
        peak >= base + MAX_STATE / 2,
        "the state was not filled: peak {peak}"
    );
    drop(askers);
    drop((honest, evil));
    assert!(t.running(), "{}", t.log());
    let _ = PEER_SERVER_NAME;
}
