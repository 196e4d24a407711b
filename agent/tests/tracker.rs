//! The tracker end to end over loopback: the real tonic server, real clients
//! heartbeating on a short interval, a restart, and a dead replica.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use damselfly::{
    testing::TestCa,
    tracker::{FindResult, PeerInfo, TrackerClient, rendezvous, server, tls},
    vocab::Digest,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const HB: Duration = Duration::from_millis(200);

/// The cluster CA every tracker and client of a test shares.
fn ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::new("tracker test CA"))
}

struct Tracker {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(addr: SocketAddr) -> Tracker {
    start_with(addr, HB).await
}

async fn start_with(addr: SocketAddr, heartbeat: Duration) -> Tracker {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let tls = tls::server_config(&ca().tracker()).unwrap();
    let task = tokio::spawn(server::serve(
        listener,
        tls,
        server::Config::new(heartbeat),
        async {
            let _ = stopped.await;
        },
    ));
    Tracker { addr, stop, task }
}

impl Tracker {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("tracker shut down")
            .unwrap()
            .unwrap();
    }
}

fn peer(id: &str, zone: &str) -> PeerInfo {
    PeerInfo {
        id: id.into(),
        quic_addr: format!("127.0.0.1:{}", 7401 + id.len()),
        node: format!("node-{id}"),
        zone: zone.into(),
        upload_capacity: 1 << 30,
    }
}

/// Every client shares the chart's kind of certificate (`damselfly-peer`
/// only), so the tracker tells them apart by address: all 127.0.0.1 here.
fn client(replicas: &[SocketAddr], id: &str, zone: &str) -> TrackerClient {
    client_with(replicas, id, zone, HB)
}

fn client_with(replicas: &[SocketAddr], id: &str, zone: &str, hb: Duration) -> TrackerClient {
    let rs = replicas.iter().map(|a| a.to_string()).collect();
    let pki = ca().pki(ca().issue(&[damselfly::pki::PEER_SERVER_NAME]));
    TrackerClient::new(rs, peer(id, zone), hb, tls::client_config(&pki).unwrap()).unwrap()
}

fn ids(f: &FindResult) -> Vec<&str> {
    f.peers.iter().map(|p| p.id.as_str()).collect()
}

/// 4 pieces of 1 MiB (the last one short).
const SIZE: u64 = 3 * (1 << 20) + 5;
const PIECE: u64 = 1 << 20;

fn hashes(n: usize) -> Vec<Option<[u8; 32]>> {
    (0..n).map(|i| Some([i as u8; 32])).collect()
}

/// Poll `check` every 20 ms until it holds; how long that took.
async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if check().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A peer whose connection closes (its process died: the kernel closes its
/// sockets) is gone from the tracker at once, not when its lease runs out,
/// so the peers waiting on its pieces learn it from their next find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_gone_as_soon_as_its_connection_closes() {
    let hb = Duration::from_secs(30);
    let tracker = start_with("127.0.0.1:0".parse().unwrap(), hb).await;
    let addr = tracker.addr;
    let stays = client_with(&[addr], "stays", "z", hb);
    let leaves = client_with(&[addr], "leaves", "z", hb);
    let (_hs, hl) = (stays.spawn_heartbeat(), leaves.spawn_heartbeat());
    let d = Digest::of(b"layer");
    wait_for("announce", Duration::from_secs(3), async || {
        leaves
            .announce(&d, SIZE, PIECE, hashes(4), vec![0b1111])
            .await
            .is_ok()
    })
    .await;
    let f = stays.find(&d).await.unwrap();
    assert_eq!(ids(&f), ["leaves"]);
    // One holder: the tracker's base pace.
    assert_eq!(f.refresh_after, Duration::from_millis(100));
    hl.abort();
    let _ = hl.await;
    drop(leaves);
    let took = wait_for(
        "gone with its connection",
        Duration::from_secs(2),
        async || ids(&stays.find(&d).await.unwrap()).is_empty(),
    )
    .await;
    eprintln!(
        "gone {took:?} after its connection closed (lease {:?})",
        hb * 3 / 2
    );
    tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_find_each_other_expire_and_survive_a_tracker_restart() {
    let tracker = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = tracker.addr;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let a = client(&[addr], "a", "z1");
    let b = client(&[addr], "b", "z1").with_metrics(Arc::new(move |rpc, result| {
        seen.lock().unwrap().push((rpc, result));
    }));
    let c = client(&[addr], "c", "z2");
    let _ha = a.spawn_heartbeat();
    let _hb = b.spawn_heartbeat();
    let hc = c.spawn_heartbeat();
    let d = Digest::of(b"layer");

    // Announce until registered: the first beats race with us.
    for (cl, bitmap) in [(&a, 0b1111u8), (&b, 0b0001), (&c, 0b1111)] {
        wait_for("announce", Duration::from_secs(3), async || {
            cl.announce(&d, SIZE, PIECE, hashes(4), vec![bitmap])
                .await
                .is_ok()
        })
        .await;
    }

    // b (zone z1): a is in its zone, c has as much but is far.
    let f = b.find(&d).await.unwrap();
    assert_eq!(ids(&f), ["a", "c"]);
    assert_eq!((f.size, f.piece_size), (SIZE, PIECE));
    assert_eq!(f.hashes, hashes(4));
    assert_eq!(f.peers[0].bitmap, vec![0b1111]);
    assert_eq!(f.peers[0].quic_addr, peer("a", "").quic_addr);
    // a: b is in its zone even with fewer pieces; never a itself.
    assert_eq!(ids(&a.find(&d).await.unwrap()), ["b", "c"]);
    assert!(calls.lock().unwrap().contains(&("find", "ok")));

    // A bitmap update replaces the old one.
    b.announce(&d, SIZE, PIECE, hashes(4), vec![0b0011])
        .await
        .unwrap();
    let f = a.find(&d).await.unwrap();
    assert_eq!(f.peers[0].bitmap, vec![0b0011]);

    // c goes silent: gone within two intervals of its last heartbeat.
    hc.abort();
    let took = wait_for("silent peer expires", 2 * HB, async || {
        !ids(&b.find(&d).await.unwrap()).contains(&"c")
    })
    .await;
    eprintln!("silent peer gone after {took:?}");

    // Withdraw: b evicted the blob.
    b.withdraw(&d).await.unwrap();
    assert_eq!(ids(&a.find(&d).await.unwrap()), Vec::<&str>::new());
    b.announce(&d, SIZE, PIECE, hashes(4), vec![0b0011])
        .await
        .unwrap();

    // Restart the tracker on the same port with empty state. The running
    // clients re-register and replay on their next heartbeat.
    tracker.stop().await;
    let tracker = start(addr).await;
    let took = wait_for(
        "re-announce after restart",
        HB + Duration::from_millis(300),
        // Both clients replay on their own heartbeats: both must be back.
        async || {
            b.find(&d)
                .await
                .is_ok_and(|f| ids(&f) == ["a"] && f.hashes == hashes(4))
                && a.find(&d).await.is_ok_and(|f| ids(&f) == ["b"])
        },
    )
    .await;
    eprintln!("found again {took:?} after the restart");
    assert!(calls.lock().unwrap().contains(&("register", "ok")));
    tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_fails_only_its_digests_and_fast() {
    let live = start("127.0.0.1:0".parse().unwrap()).await;
    // A port nobody listens on: connections are refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let replicas = [live.addr, dead];
    let names: Vec<String> = replicas.iter().map(|a| a.to_string()).collect();
    let owned_by = |i: usize| {
        (0u32..)
            .map(|n| Digest::of(&n.to_le_bytes()))
            .find(|d| rendezvous(&names, d) == Some(i))
            .unwrap()
    };
    let (on_live, on_dead) = (owned_by(0), owned_by(1));

    let x = client(&replicas, "x", "z");
    let y = client(&replicas, "y", "z");
    assert_eq!(x.owner(&on_live), names[0]);
    let _hx = x.spawn_heartbeat();
    let _hy = y.spawn_heartbeat();
    wait_for(
        "announce on the live replica",
        Duration::from_secs(3),
        async || {
            x.announce(&on_live, 10, 4, vec![], vec![0b111])
                .await
                .is_ok()
        },
    )
    .await;
    assert_eq!(ids(&y.find(&on_live).await.unwrap()), ["x"]);

    for _ in 0..3 {
        let t0 = Instant::now();
        assert!(y.find(&on_dead).await.is_err());
        assert!(
            x.announce(&on_dead, 10, 4, vec![], vec![0b1])
                .await
                .is_err()
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    // The live replica's digests keep working alongside.
    assert_eq!(ids(&y.find(&on_live).await.unwrap()), ["x"]);
    live.stop().await;
}
