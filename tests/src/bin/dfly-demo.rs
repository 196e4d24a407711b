//! `dfly-demo`: the seed article's demo on one machine. There, with
//! Dragonfly, the first node pulled `node:16` in 2m19s and the second in 20s.
//! Here: an origin registry behind a shaped link, a tracker, and N nodes
//! (network namespace + cgroup + containerd + agent); node 1 pulls a large
//! image, then node 2, then all of them pull a fresh one at once. Prints a
//! table of pull times and where the bytes came from. Run it through
//! `cargo xtask demo` (root), which installs and builds what it needs first.
//!
//! Everything it makes carries the run's tag (`dfly-<pid>-...`) and goes away
//! at the end, on failure, and on Ctrl-C / SIGTERM.

use std::{
    fmt::Write as _,
    fs,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use damselfly_testbed::{
    Agent, Containerd, Image, Node, Origin, Testbed,
    agent::{damselfly_bin, metric_value},
    bench::{parse_rate, parse_size},
    cluster::Cluster as Swarm,
    pki::TestCa,
    signals,
    testbed::{BPFFS_ROOT, cgroup2_root},
};

const REGISTRY: &str = "registry.dfly.test";
const REPO: &str = "demo/app";

#[derive(Parser, Debug)]
#[command(
    name = "dfly-demo",
    about = "The first node pulls from the origin, the next from it (root)"
)]
struct Cli {
    /// Total size of the image's layers: random, incompressible bytes (e.g. 300MiB, 1GiB).
    #[arg(long, default_value = "300MiB", value_parser = parse_size)]
    image_size: u64,
    /// Number of layers the image size is split into.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    layers: u16,
    /// Rate of the origin registry's link, both ways (e.g. 100mbit, 1gbit).
    #[arg(long, default_value = "100mbit", value_parser = parse_rate)]
    origin_rate: u32,
    /// Pulling nodes, each with its own containerd and agent.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=32))]
    nodes: u16,
    /// Keep the cluster up after the table, until Ctrl-C, to look around.
    #[arg(long)]
    keep: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    signals::run_or_sweep(move || run(&cli))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let n = usize::from(cli.nodes);
    let sizes = layer_sizes(cli.image_size, cli.layers.into())?;
    let started = Instant::now();
    progress(&format!(
        "starting {n} nodes + an origin node (registry behind {} Mbit/s, tracker)",
        cli.origin_rate
    ));
    let c = Cluster::start(n, cli.origin_rate)?;

    progress(&format!(
        "building and pushing two images of {} in {} layers (random bytes)",
        human(cli.image_size),
        sizes.len()
    ));
    // Both up front, so the timed steps contain nothing but pulls. The
    // origin pushes to itself over loopback: the shaped link is not in the way.
    let v1 = Image::build_and_push(&c.tb, &c.origin, REPO, "v1", &sizes, 1)?;
    let v2 = Image::build_and_push(&c.tb, &c.origin, REPO, "v2", &sizes, 2)?;
    for img in [&v1, &v2] {
        // The registry has its own copy; the layout is only disk.
        let _ = fs::remove_dir_all(&img.layout.dir);
    }
    println!("{}", c.where_to_look());

    let mut steps = Vec::new();
    progress(&format!(
        "step 1: n1 pulls {} (CRI PullImage)",
        v1.reference
    ));
    steps.push(c.step("1. first node", &[1], &v1)?);
    progress(&format!("step 2: n2 pulls {}", v1.reference));
    steps.push(c.step("2. second node", &[2], &v1)?);

    // Cold again. The agents keep v1 in their caches (that is their job),
    // so the simultaneous pull is of v2: same size, fresh random layers that
    // no containerd and no agent has seen.
    for (i, ctd) in c.containerds.iter().enumerate() {
        if ctd.has_image(&v1.reference)? {
            ctd.remove_image(&v1.reference)
                .with_context(|| format!("removing {} from n{}", v1.reference, i + 1))?;
        }
    }
    let all: Vec<usize> = (1..=n).collect();
    progress(&format!(
        "step 3: {} removed from every containerd; all {n} nodes pull {} at once",
        v1.reference, v2.reference
    ));
    steps.push(c.step("3. all at once", &all, &v2)?);

    println!(
        "\n## Pulls ({} in {} layers, origin link {} Mbit/s, {} nodes; {} total)\n",
        human(cli.image_size),
        sizes.len(),
        cli.origin_rate,
        n,
        secs(started.elapsed().as_secs_f64())
    );
    print!("{}", render(&steps));
    println!(
        "\n- Steps 1 and 2 pull {v1}. Step 3 first removes it from every node's containerd, \
         then pulls {v2}: the same size, fresh random layers that no node has seen (the agents \
         still cache {v1}; that is what they are for).\n\
         - origin sent: blob bytes the registry logged as sent during the step; origin link: \
         bytes out of its node's link (TLS, manifests, everything).\n\
         - from origin / peers / cache: what each node's agent served its containerd, by source \
         (damselfly_blob_bytes_total{{source=...}}).",
        v1 = v1.reference,
        v2 = v2.reference,
    );

    if cli.keep {
        println!("\n{}", c.where_to_look());
        println!("Kept up until Ctrl-C.");
        signals::KEEPING.store(true, Ordering::SeqCst);
        loop {
            std::thread::park();
        }
    }
    println!("\nTearing down (run with --keep to look around first).");
    Ok(())
}

/// The nodes 1..=n pull; node n+1 runs the origin registry and the tracker.
struct Cluster {
    containerds: Vec<Containerd>,
    agents: Vec<Agent>,
    _swarm: Swarm,
    origin: Origin,
    origin_rate: u32,
    tb: Testbed,
}

impl Cluster {
    fn start(n: usize, origin_rate: u32) -> anyhow::Result<Self> {
        let tb = Testbed::new(n + 1)?;
        let infra = tb.node(n + 1).clone();
        let public_ca = TestCa::new("dfly demo public CA")?;
        let origin = Origin::start(&tb, n + 1, REGISTRY, &public_ca, None)?;
        infra.shape(&tb.hub, origin_rate)?;

        // The cluster PKI the Helm chart would make: one CA, a peer certificate per node.
        let swarm = Swarm::start(&tb, infra.index)?;
        let mut agents = Vec::new();
        let mut containerds = Vec::new();
        for i in 1..=n {
            let mut flags = origin.agent_flags();
            flags.extend(swarm.agent_flags(&tb, i)?);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let agent = Agent::start(&tb, tb.node(i), &flags)?;
            // containerd trusts the origin's CA and this node's agent CA, nothing else.
            containerds.push(Containerd::start_for(&tb, &agent, &public_ca)?);
            agents.push(agent);
        }
        Ok(Self {
            containerds,
            agents,
            _swarm: swarm,
            origin,
            origin_rate,
            tb,
        })
    }

    /// Pull `img` on `nodes` (1-based) at once, each timed on its own, and
    /// what the origin and each agent counted meanwhile.
    fn step(&self, name: &str, nodes: &[usize], img: &Image) -> anyhow::Result<Step> {
        let sent0 = self.origin_blob_bytes();
        let link0 = self.origin.link_bytes()?;
        let before: Vec<Counters> = nodes
            .iter()
            .map(|&i| self.counters(i))
            .collect::<anyhow::Result<_>>()?;
        let times: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
            let pulls: Vec<_> = nodes
                .iter()
                .map(|&i| {
                    let ctd = &self.containerds[i - 1];
                    s.spawn(move || {
                        let t = Instant::now();
                        ctd.cri_pull(&img.reference, None)
                            .with_context(|| format!("pull on n{i}"))?;
                        Ok(t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            pulls
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("pull thread panicked")))
                .collect()
        });
        // Not timed: the agents commit what they streamed and tell the
        // tracker, so the next step's nodes can find it.
        for &i in nodes {
            self.wait_cached(i, img)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut pulls = Vec::new();
        for ((&i, t), b) in nodes.iter().zip(times).zip(before) {
            pulls.push(Pull {
                node: format!("n{i}"),
                secs: t?,
                got: self.counters(i)?.since(b),
            });
        }
        Ok(Step {
            name: name.to_string(),
            origin_sent: self.origin_blob_bytes().saturating_sub(sent0),
            origin_link: self.origin.link_bytes()?.saturating_sub(link0),
            pulls,
        })
    }

    fn counters(&self, node: usize) -> anyhow::Result<Counters> {
        Ok(Counters::parse(&self.agents[node - 1].metrics()?))
    }

    /// The registry logs a request just after its last byte: read until two
    /// reads agree.
    fn origin_blob_bytes(&self) -> u64 {
        let mut last = self.origin.blob_bytes_sent();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.origin.blob_bytes_sent();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    fn wait_cached(&self, node: usize, img: &Image) -> anyhow::Result<()> {
        let dir = self.tb.dir.join(format!("state-n{node}/blobs"));
        let deadline = Instant::now() + Duration::from_secs(60);
        for d in img.blob_digests() {
            while !dir.join(&d["sha256:".len()..]).exists() {
                ensure!(
                    Instant::now() < deadline,
                    "{d} never reached n{node}'s cache:\n{}",
                    self.agents[node - 1].log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The real names and commands, to look at the cluster from the host.
    fn where_to_look(&self) -> String {
        let tb = &self.tb;
        let infra: &Node = &self.origin.node;
        let bin = damselfly_bin().map_or_else(|_| "damselfly".into(), |p| p.display().to_string());
        let cg_root =
            cgroup2_root().map_or_else(|_| "/sys/fs/cgroup".into(), |p| p.display().to_string());
        let n1 = &tb.node(1).name;
        let mut out = String::new();
        let _ = writeln!(out, "## The cluster (run tag {})\n", tb.tag);
        let _ = writeln!(
            out,
            "origin   https://{REGISTRY} = {} in netns {}, link shaped to {} Mbit/s both ways",
            self.origin.addr, infra.name, self.origin_rate
        );
        let _ = writeln!(
            out,
            "tracker  {} in netns {}",
            infra.addr4(7400),
            infra.name
        );
        for a in &self.agents {
            let node = &a.node;
            let _ = writeln!(
                out,
                "n{}       netns {}  {}  cgroup {}  admin {} (inside the netns)",
                node.index,
                node.name,
                node.ip4,
                node.cgroup.display(),
                a.admin
            );
        }
        let _ = writeln!(
            out,
            "\nLook, as root from the host (any node: replace {n1}):\n"
        );
        let admin = self.agents[0].admin;
        let cmds = [
            (
                format!("ip netns exec {n1} {bin} status --admin {admin}"),
                "programs, rules, steering counters",
            ),
            (
                format!(
                    "ip netns exec {n1} curl -s http://{admin}/metrics | grep -E 'damselfly_(blob|peer)_bytes'"
                ),
                "where blob bytes came from",
            ),
            (
                "bpftool prog show | grep -A1 damselfly_".into(),
                "five programs per agent",
            ),
            (
                format!("bpftool cgroup tree {cg_root} | grep -A5 {}", tb.tag),
                "attached to each node's cgroup",
            ),
            (
                format!("bpftool map dump pinned {BPFFS_ROOT}/{n1}/counters"),
                "steered/passed per port",
            ),
            (
                format!("tc -n {} -s qdisc show dev eth0", infra.name),
                "the origin's shaper",
            ),
            (
                format!("tail -f {}", tb.dir.join("agent-n1.0.log").display()),
                "agent log (containerd, registry, tracker logs are next to it)",
            ),
        ];
        for (cmd, why) in cmds {
            let _ = writeln!(out, "  # {why}\n  {cmd}");
        }
        out
    }
}

/// The blob bytes one agent served to its containerd, by source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    origin: u64,
    peer: u64,
    cache: u64,
}

impl Counters {
    fn parse(metrics: &str) -> Self {
        let get = |source: &str| {
            metric_value(
                metrics,
                &format!("damselfly_blob_bytes_total{{source=\"{source}\"}}"),
            )
            .unwrap_or(0.0) as u64
        };
        Self {
            origin: get("origin"),
            peer: get("peer"),
            cache: get("cache"),
        }
    }

    /// What was counted after `before` (counters only grow, unless the agent
    /// restarted, which must not turn into a huge number).
    fn since(self, before: Self) -> Self {
        Self {
            origin: self.origin.saturating_sub(before.origin),
            peer: self.peer.saturating_sub(before.peer),
            cache: self.cache.saturating_sub(before.cache),
        }
    }
}

struct Pull {
    node: String,
    secs: f64,
    got: Counters,
}

struct Step {
    name: String,
    /// Blob bytes the registry logged as sent during the step.
    origin_sent: u64,
    /// Bytes the origin node's link sent during the step.
    origin_link: u64,
    pulls: Vec<Pull>,
}

/// A markdown table: one row per pull; the origin's columns belong to the
/// whole step, so only its first row carries them.
fn render(steps: &[Step]) -> String {
    let mut out = String::from(
        "| step | node | pull time | origin sent | origin link | from origin | from peers | from cache |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for step in steps {
        for (k, p) in step.pulls.iter().enumerate() {
            let (name, sent, link) = if k == 0 {
                (
                    step.name.as_str(),
                    human(step.origin_sent),
                    human(step.origin_link),
                )
            } else {
                ("", String::new(), String::new())
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {sent} | {link} | {} | {} | {} |",
                p.node,
                secs(p.secs),
                human(p.got.origin),
                human(p.got.peer),
                human(p.got.cache),
            );
        }
    }
    out
}

fn secs(s: f64) -> String {
    if s >= 60.0 {
        format!("{}m{:04.1}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1} s")
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `total` split into `layers` near-equal layers (the last takes the rest).
fn layer_sizes(total: u64, layers: u64) -> anyhow::Result<Vec<u64>> {
    ensure!(
        layers > 0 && total >= layers,
        "an image of {total} bytes cannot have {layers} layers"
    );
    let each = total / layers;
    let mut sizes = vec![each; layers as usize];
    *sizes.last_mut().expect("at least one") += total - each * layers;
    Ok(sizes)
}

fn progress(msg: &str) {
    eprintln!("[dfly-demo] {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn counters_come_from_the_blob_bytes_series_and_subtract() {
        let text = "# TYPE damselfly_blob_bytes counter\n\
            damselfly_blob_bytes_total{source=\"origin\"} 100\n\
            damselfly_blob_bytes_total{source=\"peer\"} 2048\n\
            damselfly_peer_bytes_total{direction=\"in\"} 9999\n# EOF\n";
        let c = Counters::parse(text);
        assert_eq!(
            c,
            Counters {
                origin: 100,
                peer: 2048,
                cache: 0
            }
        );
        let before = Counters {
            origin: 40,
            peer: 2048,
            cache: 5,
        };
        assert_eq!(
            c.since(before),
            Counters {
                origin: 60,
                peer: 0,
                cache: 0
            }
        );
    }

    #[test]
    fn table_has_a_row_per_pull_and_step_columns_once() {
        let pull = |node: &str, secs, origin, peer| Pull {
            node: node.into(),
            secs,
            got: Counters {
                origin,
                peer,
                cache: 0,
            },
        };
        let steps = [
            Step {
                name: "1. first node".into(),
                origin_sent: 300 * MIB,
                origin_link: 310 * MIB,
                pulls: vec![pull("n1", 26.04, 300 * MIB, 0)],
            },
            Step {
                name: "3. all at once".into(),
                origin_sent: 0,
                origin_link: 1500,
                pulls: vec![pull("n1", 61.0, 0, 300 * MIB), pull("n2", 2.0, 0, 0)],
            },
        ];
        let table = render(&steps);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 3, "{table}");
        assert_eq!(
            lines[2],
            "| 1. first node | n1 | 26.0 s | 300.0 MiB | 310.0 MiB | 300.0 MiB | 0 B | 0 B |"
        );
        assert_eq!(
            lines[3],
            "| 3. all at once | n1 | 1m01.0s | 0 B | 1.5 KiB | 0 B | 300.0 MiB | 0 B |"
        );
        assert_eq!(lines[4], "|  | n2 | 2.0 s |  |  | 0 B | 0 B | 0 B |");
        for l in &lines {
            assert_eq!(l.matches('|').count(), 9, "{l}");
        }
    }

    #[test]
    fn layer_sizes_split_the_image() {
        assert_eq!(layer_sizes(300 * MIB, 4).unwrap(), vec![75 * MIB; 4]);
        assert_eq!(layer_sizes(10, 3).unwrap(), vec![3, 3, 4]);
        assert!(layer_sizes(2, 3).is_err());
    }
}
