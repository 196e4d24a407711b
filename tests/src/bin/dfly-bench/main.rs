//! `dfly-bench`: measurements on the testbed. Run through `cargo xtask bench`
//! (root). Nothing here is asserted: these are the numbers issues ask for in
//! their closing notes and the README shows.
//!
//! By default, the swarm comparison: the same image pulled by N nodes at once
//! (CRI `PullImage`, as kubelet sends it) in each mode —
//! - `direct`: every containerd pulls from the origin itself;
//! - `central`: a pull-through cache (`docker-registry` with `proxy.remoteurl`)
//!   on a node of its own, every containerd mirroring to it through
//!   `hosts.toml`, as users run a registry mirror or a Harbor proxy project;
//! - `damselfly`: an agent per node (steering, interception, swarm) and a
//!   tracker, no seed;
//! - `damselfly+seed`: the same plus one seed agent that `damselfly preheat`
//!   (started together with the pulls, as a rollout's Job would be) sends to
//!   the origin first;
//!
//! plus, per mode, node 1 then node 2 one after the other. Writes
//! `bench.csv` (a row per node per run), `bench.md` (medians, computed from the
//! CSV) and `bench.png` into `--out`.
//!
//! `--micro`: the micro-benchmarks (`--scenario steer|hit|all`):
//! - connect cost of the steering programs (kernel `bpf_stats`: run_time_ns / run_cnt)
//!   for a port outside the set, a steered port from a process not in the
//!   allow-list, and a steered connect;
//! - splice throughput: one large download by curl through the agent vs direct;
//! - cache-hit throughput: a 1 GiB blob served from the agent's cache through
//!   TLS interception vs read directly from the origin registry over TLS, and
//!   the agent's peak RSS while serving it to `--readers` clients at once (1 and 4 by default).

mod swarm;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use damselfly_testbed::{
    Agent, Node, Testbed,
    agent::{probe_bin, start_server},
    bench::{parse_rate, parse_size},
};

#[derive(Parser)]
#[command(
    name = "dfly-bench",
    about = "Direct, central cache and Damselfly pulls compared (root)"
)]
struct Cli {
    /// Run the micro-benchmarks instead (connect cost, splice, cache hits).
    #[arg(long)]
    micro: bool,
    /// With --micro, which: steer (connect cost, splice), hit (cache hits), all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// With --micro: blob size for the cache-hit benchmark.
    #[arg(long, default_value_t = 1 << 30)]
    blob: u64,
    /// With --micro: how many clients read the cached blob at once, one
    /// peak-RSS figure each (e.g. `--blob 67108864 --readers 1,16,64,200`).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    readers: Vec<usize>,
    /// With --micro: bytes per download in the splice benchmark.
    #[arg(long, default_value_t = 1_000_000_000)]
    bytes: u64,
    /// With --micro: connect() calls per connect scenario.
    /// (Kept well below the ephemeral port range: TIME_WAIT sockets make connect() search for ports.)
    #[arg(long, default_value_t = 5_000)]
    connects: u32,
    /// Runs per measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Numbers of nodes pulling at once, one set of runs each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    nodes: Vec<usize>,
    /// Image size: random, incompressible layers (e.g. 48MiB, 200MiB). The
    /// default keeps a whole default run (4 modes, N up to 8, 3 repeats)
    /// under 30 minutes; direct and central at N = 8 send N copies through
    /// the 50 Mbit/s origin, so 200MiB would take over an hour.
    #[arg(long, default_value = "48MiB", value_parser = parse_size)]
    image_size: u64,
    /// Layers the image size is split into.
    #[arg(long, default_value_t = 4)]
    layers: u64,
    /// The origin registry's link, both ways.
    #[arg(long, default_value = "50mbit", value_parser = parse_rate)]
    origin_rate: u32,
    /// Every node's link (and the central cache's, and the seed's), both ways.
    #[arg(long, default_value = "250mbit", value_parser = parse_rate)]
    node_rate: u32,
    /// Modes to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,central,damselfly,damselfly+seed"
    )]
    modes: Vec<swarm::Mode>,
    /// Where bench.csv, bench.md and bench.png go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Keep every agent's log in OUT/logs/.
    #[arg(long)]
    keep_logs: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    damselfly_testbed::signals::run_or_sweep(move || {
        if cli.micro {
            micro(&cli)
        } else {
            swarm::compare(&swarm::Params {
                nodes: cli.nodes.clone(),
                image_size: cli.image_size,
                layers: cli.layers,
                origin_rate: cli.origin_rate,
                node_rate: cli.node_rate,
                modes: cli.modes.clone(),
                repeat: cli.repeat,
                out: cli.out.clone(),
                keep_logs: cli.keep_logs,
            })
        }
    })
}

fn micro(cli: &Cli) -> anyhow::Result<()> {
    println!("| measurement | value |\n|---|---|");
    if matches!(cli.scenario.as_str(), "steer" | "all") {
        let tb = Testbed::new(2)?;
        let (client, srv) = (tb.node(1).clone(), tb.node(2).clone());
        let _server = start_server(&tb, &srv, &[srv.addr4(80), srv.addr4(8080)], &[], None)?;
        connect_costs(&tb, &client, &srv, cli.connects)?;
        splice_throughput(&tb, &client, &srv, cli.bytes, cli.repeat)?;
    }
    if matches!(cli.scenario.as_str(), "hit" | "all") {
        cache_hits(cli.blob, &cli.readers, cli.repeat)?;
    }
    Ok(())
}

const REGISTRY: &str = "registry.dfly.test";

fn cache_hits(blob: u64, readers: &[usize], repeat: usize) -> anyhow::Result<()> {
    use damselfly_testbed::{image::Image, origin::Origin, pki::TestCa};
    let tb = Testbed::new(2)?;
    let client = tb.node(1).clone();
    let public_ca = TestCa::new("dfly bench public CA")?;
    let origin = Origin::start(&tb, 2, REGISTRY, &public_ca, None)?;
    let img = Image::build_and_push(&tb, &origin, "bench/big", "v1", &[blob], 9)?;
    let (digest, size) = img.layers[0].clone();
    let url = format!("https://{REGISTRY}/v2/bench/big/blobs/{digest}");

    let ca = origin.ca_pem.display().to_string();
    let flags = [
        "--registry",
        REGISTRY,
        "--upstream-ca",
        &ca,
        "--steer-comm",
        "curl",
    ];
    let mut direct = Vec::new();
    let mut hit = Vec::new();
    let mut agent = Agent::start(&tb, &client, &flags)?;
    let bundle = tb.dir.join("bundle.pem");
    let node_ca = std::fs::read_to_string(tb.dir.join("state-n1/ca/ca.crt"))?;
    std::fs::write(&bundle, format!("{}\n{node_ca}", public_ca.pem()))?;
    // The first read through the agent fills the cache.
    curl_seconds(&client, &url, Some(&bundle), size)?;
    wait_for(|| tb.dir.join("state-n1/blobs").join(&digest[7..]).exists())?;
    for _ in 0..repeat {
        agent.kill();
        direct.push(curl_seconds(&client, &url, Some(&origin.ca_pem), size)?);
        agent.restart()?;
        hit.push(curl_seconds(&client, &url, Some(&bundle), size)?);
    }
    let (d, h) = (median(&mut direct), median(&mut hit));
    let mb = size as f64 / 1e6;
    println!(
        "| cache hit {} MB, direct from the origin over TLS (curl) | {:.0} MB/s |",
        size / 1_000_000,
        mb / d
    );
    println!(
        "| cache hit {} MB, through TLS interception from the cache | {:.0} MB/s |",
        size / 1_000_000,
        mb / h
    );
    println!("| ratio hit / direct | {:.2} |", d / h);

    // Peak RSS while serving: reset the high-water mark, then serve.
    let pid = agent.proc.pid();
    // Readers at once: a busy node, or a seed during a preheat. The chart's
    // memory limit is 512 MiB.
    for &clients in readers {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (client, url, bundle) = (client.clone(), url.clone(), bundle.clone());
                std::thread::spawn(move || curl_seconds(&client, &url, Some(&bundle), size))
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("curl thread"))??;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("VmHWM: ?")
            .to_string();
        println!(
            "| agent peak RSS, {clients} client(s) reading the {} MB hit | {} |",
            size / 1_000_000,
            hwm.trim_start_matches("VmHWM:").trim()
        );
    }
    Ok(())
}

fn wait_for(mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        if std::time::Instant::now() > deadline {
            bail!("timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn connect_costs(tb: &Testbed, client: &Node, srv: &Node, n: u32) -> anyhow::Result<()> {
    let _stats = BpfStats::enable()?;
    // Logging off is the default; on, every decision is written to the ring
    // buffer (and, here, to the agent's log).
    for (log, env) in [("off", "info"), ("on", "info,damselfly::kernel=debug")] {
        // The allow-list holds a name no scenario below uses except the steered one.
        let agent = Agent::start_with_env(
            tb,
            client,
            &["--steer-comm", "dfly-steered"],
            &[("DAMSELFLY_LOG", env)],
        )?;
        let conn4 = prog_id(&agent, "damselfly_conn4")?;
        for (label, comm, port) in [
            ("port not in the set", "dfly-other", 8080),
            ("steered port, process not allowed", "dfly-other", 80),
            // Two runs per connect: the client's, steered, and the agent's own upstream connect, passed early.
            (
                "steered connect (+ the agent's upstream connect)",
                "dfly-steered",
                80,
            ),
        ] {
            let before = prog_stats(conn4)?;
            let mut cmd = client.command(probe_bin()?)?;
            cmd.args([
                "--comm",
                comm,
                "connect",
                &srv.addr4(port).to_string(),
                "--count",
                &n.to_string(),
            ]);
            let out = cmd.output()?;
            if !out.status.success() {
                bail!(
                    "connect loop failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let after = prog_stats(conn4)?;
            let runs = after.1 - before.1;
            let ns = (after.0 - before.0) as f64 / runs.max(1) as f64;
            println!(
                "| connect4 cost, {label}, kernel log {log} | {ns:.0} ns per run ({runs} runs) |"
            );
        }
    }
    Ok(())
}

fn splice_throughput(
    tb: &Testbed,
    client: &Node,
    srv: &Node,
    bytes: u64,
    repeat: usize,
) -> anyhow::Result<()> {
    let url = format!("http://{}/bytes/{bytes}", srv.addr4(80));
    let mut direct = Vec::new();
    let mut steered = Vec::new();
    for _ in 0..repeat {
        direct.push(curl_seconds(client, &url, None, bytes)?);
        let agent = Agent::start(tb, client, &["--steer-comm", "curl"])?;
        steered.push(curl_seconds(client, &url, None, bytes)?);
        anyhow::ensure!(
            agent.steered(80)? == 1.0,
            "the curl download was not steered"
        );
        drop(agent);
    }
    let (d, s) = (median(&mut direct), median(&mut steered));
    let mb = bytes as f64 / 1e6;
    println!(
        "| splice throughput, direct (curl, unshaped veth) | {:.0} MB/s |",
        mb / d
    );
    println!(
        "| splice throughput, steered through the agent | {:.0} MB/s |",
        mb / s
    );
    println!("| ratio steered / direct | {:.2} |", d / s);
    Ok(())
}

/// Seconds curl took to download `url` (`bytes` long) inside `node`,
/// trusting `ca` for https.
fn curl_seconds(
    node: &Node,
    url: &str,
    ca: Option<&std::path::Path>,
    bytes: u64,
) -> anyhow::Result<f64> {
    let mut cmd = node.command("curl")?;
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        url,
    ]);
    let out = cmd.output().context("running curl")?;
    parse_curl(&out, bytes)
}

/// `curl -w '%{size_download} %{time_total}'` -> seconds, if all bytes came.
fn parse_curl(out: &std::process::Output, bytes: u64) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    let got: u64 = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let secs: f64 = f.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    if got != bytes {
        bail!(
            "curl got {got} of {bytes} bytes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn prog_id(agent: &Agent, name: &str) -> anyhow::Result<u64> {
    let (_, body) = agent.node.http_get(agent.admin, "/status")?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    status["programs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["id"].as_u64())
        .with_context(|| format!("{name} not in /status"))
}

/// (run_time_ns, run_cnt) of one program.
fn prog_stats(id: u64) -> anyhow::Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// `kernel.bpf_stats_enabled=1` for as long as this lives; restored after.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(Self::PATH)?.trim().to_string();
        std::fs::write(Self::PATH, "1").context("enabling kernel.bpf_stats_enabled")?;
        std::thread::sleep(Duration::from_millis(10));
        Ok(Self(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}
