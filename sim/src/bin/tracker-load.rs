//! `cargo xtask sim --tracker-load`: what one real tracker replica sustains.
//! Starts the tracker's own gRPC server (`damselfly_tracker::serve`, mutual
//! TLS with a throwaway cluster CA) on 127.0.0.1 on a runtime of its own with
//! `--server-threads` workers, fills it with `--holders` peers holding one
//! blob of `--pieces` pieces (each with its own certificate, so each is its
//! own caller, as with per-node certificates), then has `--clients` of them
//! call Find, then Announce, back to back through the agent's own
//! `TrackerClient`, each for `--seconds`, and prints calls per second.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use damselfly_core::vocab::{Bitmap, Digest, PieceHash};
use damselfly_pki::ClusterPki;
use damselfly_tracker::{DEFAULT_HEARTBEAT, PeerInfo, TrackerClient, client_config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

#[derive(Parser)]
#[command(
    name = "tracker-load",
    about = "Find and Announce per second one real tracker replica sustains"
)]
struct Cli {
    /// Peers holding the blob (the tracker keeps at most 1024 per blob).
    #[arg(long, default_value_t = 1024)]
    holders: usize,
    /// Pieces of the blob (358: a 1.5 GB layer in 4 MiB pieces).
    #[arg(long, default_value_t = 358)]
    pieces: u64,
    /// Holders calling at once, each one call after another.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Worker threads of the tracker's runtime (the replica's cores).
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
}

const PIECE: u64 = 4 << 20;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "tracker-load cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Self { cert, key, pem })
    }

    /// The cluster PKI of a node carrying `names`.
    fn pki(&self, names: &[&str]) -> anyhow::Result<ClusterPki> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        ClusterPki::parse(
            self.pem.as_bytes(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .map_err(|p| anyhow::anyhow!("test certificate: {p:?}"))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.clients >= 1 && cli.clients <= cli.holders,
        "--clients must be 1..=--holders"
    );
    let most = damselfly_tracker::Limits::default().max_peers_per_digest;
    anyhow::ensure!(
        cli.holders <= most,
        "--holders {} is past the {most} holders the tracker names per blob (Limits::max_peers_per_digest)",
        cli.holders
    );
    state_only(&cli);
    let ca = Ca::new()?;
    // The replica: its own runtime, so its cores are what is measured.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.server_threads.max(1))
        .thread_name("tracker")
        .enable_all()
        .build()?;
    let tls = damselfly_tracker::tls::server_config(&ca.pki(&["damselfly-tracker"])?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener =
        server_rt.block_on(async { tokio::net::TcpListener::bind("127.0.0.1:0").await })?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.spawn(damselfly_tracker::serve(
        listener,
        tls,
        damselfly_tracker::Config::new(DEFAULT_HEARTBEAT),
        async {
            let _ = stop_rx.await;
        },
    ));

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = client_rt.block_on(load(&cli, &ca, addr.to_string()));
    let _ = stop_tx.send(());
    let _ = server_rt.block_on(server);
    result
}

/// The same calls on the tracker's `State` alone, in this thread: what the
/// state machine costs, without gRPC, TLS and the clients.
fn state_only(cli: &Cli) {
    use damselfly_tracker::{Announce, Caller, State};
    let t0 = Instant::now();
    let mut state = State::new(DEFAULT_HEARTBEAT);
    let digest = Digest::of(b"tracker-load blob");
    let mut full = Bitmap::new(cli.pieces);
    for i in 0..cli.pieces {
        full.set(i);
    }
    let hashes: Vec<PieceHash> = (0..cli.pieces).map(|i| Some([i as u8; 32])).collect();
    let announce = |state: &mut State, i: usize, now: Instant| {
        let id = format!("peer-{i}");
        let a = Announce {
            digest,
            size: cli.pieces * PIECE,
            piece_size: PIECE,
            hashes: hashes.clone(),
            bitmap: full.as_bytes().to_vec(),
        };
        state.announce(&Caller::Identity(format!("node-{i}")), &id, a, now)
    };
    for i in 0..cli.holders {
        let info = PeerInfo {
            id: format!("peer-{i}"),
            quic_addr: format!("10.0.{}.{}:4433", i >> 8, i & 255),
            node: format!("node-{i}"),
            zone: String::new(),
            upload_capacity: 300_000_000,
        };
        let caller = Caller::Identity(format!("node-{i}"));
        state.register(&caller, info, 0, t0).expect("registers");
        announce(&mut state, i, t0).expect("announces");
    }
    let n = 2000;
    let t = Instant::now();
    for k in 0..n {
        let asking = format!("peer-{}", k % cli.holders);
        std::hint::black_box(state.find(&digest, &asking, "", 0, t0));
    }
    let find = t.elapsed() / n as u32;
    let t = Instant::now();
    for k in 0..n {
        let _ = announce(&mut state, k % cli.holders, t0);
    }
    let ann = t.elapsed() / n as u32;
    println!(
        "State alone ({} holders, {} pieces): find {:.0} us ({:.0}/s on one core), announce {:.0} us ({:.0}/s)",
        cli.holders,
        cli.pieces,
        find.as_secs_f64() * 1e6,
        1.0 / find.as_secs_f64(),
        ann.as_secs_f64() * 1e6,
        1.0 / ann.as_secs_f64(),
    );
}

async fn load(cli: &Cli, ca: &Ca, addr: String) -> anyhow::Result<()> {
    let digest = Digest::of(b"tracker-load blob");
    let size = cli.pieces * PIECE;
    let mut full = Bitmap::new(cli.pieces);
    for i in 0..cli.pieces {
        full.set(i);
    }
    let hashes: Vec<PieceHash> = (0..cli.pieces)
        .map(|i| {
            let mut h = [7u8; 32];
            h[..8].copy_from_slice(&i.to_le_bytes());
            Some(h)
        })
        .collect();
    eprintln!(
        "filling the tracker at {addr}: {} holders of {} pieces each ...",
        cli.holders, cli.pieces
    );
    let mut clients = Vec::with_capacity(cli.holders);
    // Leases run out without heartbeats (a Find then names fewer holders):
    // every holder keeps its lease as an agent does.
    let mut beats = Vec::with_capacity(cli.holders);
    for i in 0..cli.holders {
        let node = format!("node-{i}");
        let pki = ca.pki(&["damselfly-peer", &node])?;
        let tls = client_config(&pki).map_err(|e| anyhow::anyhow!("{e}"))?;
        let me = PeerInfo {
            id: format!("peer-{i}"),
            quic_addr: format!("10.0.{}.{}:4433", i >> 8, i & 255),
            node,
            zone: String::new(),
            upload_capacity: 300_000_000,
        };
        let c = TrackerClient::new(vec![addr.clone()], me, DEFAULT_HEARTBEAT, tls)?;
        // The first announce registers (the replica answers "unknown peer"
        // and the client registers and replays).
        c.announce(
            &digest,
            size,
            PIECE,
            hashes.clone(),
            full.as_bytes().to_vec(),
        )
        .await
        .with_context(|| format!("filling: holder {i}"))?;
        beats.push(c.spawn_heartbeat());
        clients.push(c);
    }
    let found = clients[0].find(&digest).await?;
    anyhow::ensure!(
        !found.peers.is_empty(),
        "the filled tracker names no holder"
    );
    eprintln!(
        "filled; a Find answers {} peers and {} hashes",
        found.peers.len(),
        found.hashes.len()
    );
    let users: Vec<TrackerClient> = clients.iter().take(cli.clients).cloned().collect();
    let secs = Duration::from_secs(cli.seconds);
    let (finds, ferr, fp99) = hammer(&users, secs, move |c| {
        let d = digest;
        async move { c.find(&d).await.map(|_| ()) }
    })
    .await;
    let bitmap = full.as_bytes().to_vec();
    let all = hashes.clone();
    let (anns, aerr, ap99) = hammer(&users, secs, move |c| {
        let (d, h, b) = (digest, all.clone(), bitmap.clone());
        async move { c.announce(&d, size, PIECE, h, b).await.map(drop) }
    })
    .await;
    let listed = clients[0].find(&digest).await?.peers.len();
    for b in beats {
        b.abort();
    }
    eprintln!("after the runs a Find still answers {listed} peers");
    let s = cli.seconds as f64;
    println!(
        "| holders | pieces | clients | server threads | Find/s | Find p99 | Announce/s | Announce p99 | errors (find, announce) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.1} ms | {:.0} | {:.1} ms | {ferr}, {aerr} |",
        cli.holders,
        cli.pieces,
        cli.clients,
        cli.server_threads,
        finds as f64 / s,
        fp99.as_secs_f64() * 1e3,
        anns as f64 / s,
        ap99.as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Each client calls `call` back to back for `secs`: successful calls,
/// failed ones, and the p99 latency of the successful.
async fn hammer<F, Fut, E>(
    clients: &[TrackerClient],
    secs: Duration,
    call: F,
) -> (u64, u64, Duration)
where
    F: Fn(TrackerClient) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Send,
{
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in clients {
        let (c, call) = (c.clone(), call.clone());
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match call(c.clone()).await {
                    Ok(()) => {
                        lat.push(t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort();
    let p99 = all
        .get((all.len() * 99 / 100).min(all.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        p99,
    )
}
