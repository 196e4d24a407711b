//! `damselfly-sim` (run by `cargo xtask sim`): simulated rollouts at each N,
//! into DIR/sim.csv, DIR/sim.md and DIR/sim.png.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use damselfly_core::{
    rollout::{parse_rate, parse_size},
    sched::Config,
};
use damselfly_sim::{
    model::{self, Params},
    report::{self, CSV_HEADER, Row},
};

#[derive(Parser)]
#[command(
    name = "damselfly-sim",
    about = "N agents pulling one image at once, simulated: the real scheduler and tracker state on a simulated clock and network"
)]
struct Cli {
    /// Nodes pulling at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    nodes: Vec<usize>,
    /// Image size (e.g. 48MiB, 3GB), split into equal layers as the bench does.
    #[arg(long, default_value = "48MiB", value_parser = parse_size)]
    image_size: u64,
    #[arg(long, default_value_t = 4)]
    layers: u64,
    /// Each node's uplink and downlink, as tc writes it (250mbit, 2400mbit, 12gbit).
    #[arg(long, default_value = "250mbit", value_parser = parse_rate)]
    node_rate: u32,
    /// The origin's uplink.
    #[arg(long, default_value = "50mbit", value_parser = parse_rate)]
    origin_rate: u32,
    /// Round trip of one hop (node-node, node-origin, node-tracker), ms.
    #[arg(long, default_value_t = 1.0)]
    latency: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Nodes start uniformly within this many ms of t = 0.
    #[arg(long, default_value_t = 50.0)]
    jitter: f64,
    /// The agent's largest piece size (`--piece-size`, 4 MiB by default); a
    /// layer's own follows from its size (`damselfly_store::piece_size_for`).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    piece_size: u64,
    /// Layers a node pulls at once (containerd's default: 3).
    #[arg(long, default_value_t = 3)]
    concurrent_layers: usize,
    /// Agent timer: a follower asks the tracker again this long after its
    /// last answer, or as long as the answer says if longer (the tracker's
    /// pace), ms (REFRESH_EVERY in agent/src/acquire/driver.rs).
    #[arg(long, default_value_t = 100)]
    refresh_ms: u64,
    /// Agent timer: new pieces are announced at most this often, or as the
    /// tracker's pace says if less often, ms (ANNOUNCE_EVERY in
    /// agent/src/swarm/progress.rs).
    #[arg(long, default_value_t = 100)]
    announce_ms: u64,
    /// Upload limits of a node's peer server: requests answered at once in
    /// all, to one node, and distinct nodes served (ServerConfig::new in
    /// agent/src/swarm/peer/server.rs; the agent's --max-upload-peers).
    #[arg(long, default_value_t = 4)]
    max_uploads: usize,
    #[arg(long, default_value_t = 2)]
    max_uploads_per_peer: usize,
    #[arg(long, default_value_t = 16)]
    max_upload_peers: usize,
    /// What-if: peers a find asks for (0, the agent's: the tracker's default
    /// of 32; at most 64).
    #[arg(long, default_value_t = 0)]
    max_peers: usize,
    /// What-if: holders the tracker names per blob (its
    /// Limits::max_peers_per_digest, 4096; past it a node's announcements are
    /// refused and nobody is told it holds pieces).
    #[arg(long)]
    max_holders: Option<usize>,
    /// What-if: the scheduler's busy backoff, ms (Config::production: 50,
    /// doubling up to 16 x).
    #[arg(long)]
    busy_backoff_ms: Option<u64>,
    /// What-if: the scheduler's requests out at once (Config::production: 16).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// What-if: a holder answers busy a node already receiving this many
    /// transfers, even with a slot free (not in the agent: its requests
    /// do not say how much the asker receives).
    #[arg(long)]
    fed_limit: Option<usize>,
    /// A line per simulated second on stderr.
    #[arg(long)]
    progress: bool,
    /// With --progress: why followers wait, each simulated second (downloads
    /// under way, requests out, idle ones and whether a peer they know holds
    /// a piece they lack and has an upload slot free; how full the nodes'
    /// links were, the leaders' apart, and the upload slots taken).
    #[arg(long)]
    census: bool,
    /// Output directory.
    #[arg(long, default_value = "target/sim")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let mut rows = Vec::new();
    for &n in &cli.nodes {
        let p = Params {
            nodes: n,
            image_bytes: cli.image_size,
            layers: cli.layers,
            piece_size: cli.piece_size,
            node_mbit: cli.node_rate,
            origin_mbit: cli.origin_rate,
            latency: Duration::from_secs_f64(cli.latency / 1e3),
            seed: cli.seed,
            jitter: Duration::from_secs_f64(cli.jitter / 1e3),
            concurrent_layers: cli.concurrent_layers,
            refresh_every: Duration::from_millis(cli.refresh_ms),
            announce_every: Duration::from_millis(cli.announce_ms),
            heartbeat: damselfly_tracker::DEFAULT_HEARTBEAT,
            max_uploads: cli.max_uploads,
            max_uploads_per_peer: cli.max_uploads_per_peer,
            max_upload_peers: cli.max_upload_peers,
            config: {
                let mut c = Config::production();
                if let Some(ms) = cli.busy_backoff_ms {
                    c.busy_backoff = Duration::from_millis(ms);
                }
                if let Some(n) = cli.max_in_flight {
                    c.max_in_flight = n;
                }
                c
            },
            max_peers: cli.max_peers,
            max_holders: cli
                .max_holders
                .unwrap_or(damselfly_tracker::Limits::default().max_peers_per_digest),
            fed_limit: cli.fed_limit,
            progress: cli.progress,
            census: cli.census,
        };
        eprintln!("simulating N = {n} ...");
        let started = std::time::Instant::now();
        let o = model::run(&p)?;
        let wall = started.elapsed();
        let row = Row::new(&p, &o, wall);
        let s = &o.stats;
        eprintln!(
            "N = {n}: p50 {:.2} s, p99 {:.2} s, slowest {:.2} s, T* {:.2} s, slowest/T* {:.2}, origin {:.2} x, \
             {} events, {} scheduler calls ({:.1} s), tracker {:.1} s, {} deadline spins, {} tracker refusals (joins and announces past its limits), {} nodes uploaded (busiest 32: {:.0} % of pieces), \
             requests: {} to peers ({} busy: {} at the holder's distinct-peer limit, {} at its per-peer limit, {} at its upload limit, {} seeding), {} to the origin, {} streamed, {} cancelled, wall {:.1} s",
            row.p50_s,
            row.p99_s,
            row.max_s,
            row.t_star_s,
            row.slowest_over_t_star(),
            row.origin_ratio,
            s.events,
            s.scheduler_calls,
            s.scheduler_wall.as_secs_f64(),
            s.tracker_wall.as_secs_f64(),
            s.spins,
            s.tracker_refusals,
            s.uploaders,
            s.top32_share * 100.0,
            s.peer_requests,
            s.busy,
            s.busy_peers,
            s.busy_per_peer,
            s.busy_uploads,
            s.busy_seeding,
            s.origin_requests,
            s.streamed_pieces,
            s.cancels,
            wall.as_secs_f64(),
        );
        rows.push(row);
    }
    let csv = std::iter::once(CSV_HEADER.to_string())
        .chain(rows.iter().map(Row::to_csv))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    fs::write(cli.out.join("sim.csv"), csv)?;
    let setting = format!(
        "Image {} bytes in {} layers (pieces by layer size, at most {} B); nodes {} Mbit/s up and down, origin {} Mbit/s; \
         {} ms round trip per hop; seed {}",
        cli.image_size,
        cli.layers,
        cli.piece_size,
        cli.node_rate,
        cli.origin_rate,
        cli.latency,
        cli.seed
    );
    let table = report::markdown(&rows);
    fs::write(cli.out.join("sim.md"), format!("{setting}\n\n{table}"))?;
    println!("{setting}\n\n{table}");
    report::plot(
        &rows,
        "Simulated rollout: completion time CDF per N",
        &cli.out.join("sim.png"),
    )?;
    eprintln!(
        "wrote {}, sim.md and sim.png",
        cli.out.join("sim.csv").display()
    );
    Ok(())
}
