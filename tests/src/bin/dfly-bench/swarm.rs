//! The swarm comparison: direct pulls, a central pull-through cache and
//! Damselfly, each on a fresh testbed per N, every link shaped.
//!
//! Layout of one testbed: nodes 1..=N pull (containerd, and an agent in the
//! damselfly modes); node N+1 is the origin registry; node N+2 holds the
//! mode's own infrastructure (the central cache, or the tracker and the seed).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use damselfly_testbed::{
    Agent, Containerd, Image, Origin, Testbed,
    agent::damselfly_bin,
    bench::{self, CSV_HEADER, Row},
    cluster::Cluster,
    containerd::Mirror,
    image::{self, Layout},
    pki::TestCa,
    testbed::Proc,
    tools,
};

const REGISTRY: &str = "registry.dfly.test";
const MIRROR: &str = "mirror.dfly.test";
const REPO: &str = "bench/app";
/// A run's CPUs count as the bottleneck when they were this busy on average.
const CPU_BOUND: f64 = 0.85;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Central,
    Damselfly,
    DamselflySeed,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Central => "central",
            Mode::Damselfly => "damselfly",
            Mode::DamselflySeed => "damselfly+seed",
        }
    }

    fn swarm(self) -> bool {
        matches!(self, Mode::Damselfly | Mode::DamselflySeed)
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Mode::Direct,
            Mode::Central,
            Mode::Damselfly,
            Mode::DamselflySeed,
        ]
        .into_iter()
        .find(|m| m.label() == s)
        .ok_or_else(|| format!("unknown mode {s:?} (direct, central, damselfly, damselfly+seed)"))
    }
}

pub struct Params {
    pub nodes: Vec<usize>,
    pub image_size: u64,
    pub layers: u64,
    pub origin_rate: u32,
    pub node_rate: u32,
    pub modes: Vec<Mode>,
    pub repeat: usize,
    pub out: PathBuf,
    /// Keep every agent's log in `out/logs/` (they go with the testbed otherwise).
    pub keep_logs: bool,
}

fn progress(msg: &str) {
    eprintln!("[dfly-bench] {msg}");
}

pub fn compare(p: &Params) -> anyhow::Result<()> {
    ensure!(p.repeat > 0, "--repeat must be at least 1");
    ensure!(
        !p.nodes.is_empty() && p.nodes.iter().all(|&n| (1..=40).contains(&n)),
        "--nodes: 1 to 40 nodes per run"
    );
    ensure!(
        p.layers > 0 && p.image_size >= p.layers,
        "an image of {} bytes cannot have {} layers",
        p.image_size,
        p.layers
    );
    let started = Instant::now();
    fs::create_dir_all(&p.out).with_context(|| format!("creating {}", p.out.display()))?;
    let csv_path = p.out.join("bench.csv");
    let mut csv = fs::File::create(&csv_path)?;
    writeln!(csv, "{CSV_HEADER}")?;

    // Every run pulls an image no node, agent or cache has seen: one per
    // repeat and scenario, built once and pushed to each testbed's origin.
    let work = std::env::temp_dir().join(format!("dfly-{}-bench", std::process::id()));
    let _work = RemoveOnDrop(work.clone());
    let sizes = damselfly_core::rollout::layer_sizes(p.image_size, p.layers);
    progress(&format!(
        "building {} images of {} bytes in {} layers",
        2 * p.repeat,
        p.image_size,
        sizes.len()
    ));
    let mut layouts = Vec::new();
    for (k, tag) in (0..p.repeat)
        .map(|r| format!("c{r}"))
        .chain((0..p.repeat).map(|r| format!("s{r}")))
        .enumerate()
    {
        layouts.push(image::build_layout(
            &work.join(&tag),
            &tag,
            &sizes,
            100 + k as u64,
        )?);
    }
    let (concurrent, sequential) = layouts.split_at(p.repeat);

    for &mode in &p.modes {
        let mut counts = p.nodes.clone();
        if !counts.contains(&2) {
            counts.push(2);
        }
        for &n in &counts {
            let with_concurrent = p.nodes.contains(&n);
            let bed = Bed::start(mode, n, p)?;
            if with_concurrent {
                for (r, layout) in concurrent.iter().enumerate() {
                    let img = bed.push(layout)?;
                    progress(&format!(
                        "{} N={n} repeat {}: all nodes pull at once",
                        mode.label(),
                        r + 1
                    ));
                    let rows = bed.run(&img, r, false, p)?;
                    report(&rows);
                    for row in &rows {
                        writeln!(csv, "{}", row.to_csv())?;
                    }
                    bed.forget(&img)?;
                }
            }
            if n == 2 {
                for (r, layout) in sequential.iter().enumerate() {
                    let img = bed.push(layout)?;
                    progress(&format!(
                        "{} N=2 repeat {}: node 1, then node 2",
                        mode.label(),
                        r + 1
                    ));
                    let rows = bed.run(&img, r, true, p)?;
                    report(&rows);
                    for row in &rows {
                        writeln!(csv, "{}", row.to_csv())?;
                    }
                    bed.forget(&img)?;
                }
            }
            csv.flush()?;
            if p.keep_logs {
                bed.save_logs(&p.out.join("logs"))?;
            }
        }
    }
    drop(csv);

    let rows = bench::parse_csv(&fs::read_to_string(&csv_path)?)?;
    let summaries = bench::summarize(&rows);
    let image_bytes = rows.first().map_or(0, |r| r.image_bytes);
    let machine = machine();
    let mut md = format!(
        "Image {:.1} MiB ({image_bytes} blob bytes) in {} layers; origin link {} Mbit/s, \
         every node's link {} Mbit/s; median of {} repeat(s); {}; {} in all.\n\n",
        image_bytes as f64 / (1 << 20) as f64,
        p.layers,
        p.origin_rate,
        p.node_rate,
        p.repeat,
        machine,
        fmt_secs(started.elapsed().as_secs_f64()),
    );
    md.push_str(&bench::markdown(&summaries));
    fs::write(p.out.join("bench.md"), &md)?;
    let title = format!(
        "{:.0} MiB image, origin {} Mbit/s, nodes {} Mbit/s",
        image_bytes as f64 / (1 << 20) as f64,
        p.origin_rate,
        p.node_rate
    );
    bench::plot(&summaries, &title, &p.out.join("bench.png"))?;
    println!("{md}");
    progress(&format!(
        "wrote {}, bench.md and bench.png",
        csv_path.display()
    ));
    Ok(())
}

fn report(rows: &[Row]) {
    let times: Vec<String> = rows
        .iter()
        .map(|r| format!("n{} {:.1}s", r.node, r.pull_s))
        .collect();
    if let Some(r) = rows.first() {
        progress(&format!(
            "  {}; T* {:.1}s; origin sent {:.2} x the image; CPUs {:.0}% busy ({:.0}% ours){}",
            times.join(", "),
            r.t_star_s,
            r.origin_bytes as f64 / r.image_bytes as f64,
            r.cpu_busy * 100.0,
            r.run_cpu * 100.0,
            if r.cpu_bound { " (CPU-bound)" } else { "" }
        ));
    }
}

/// One testbed of N pulling nodes set up for one mode.
struct Bed {
    mode: Mode,
    n: usize,
    containerds: Vec<Containerd>,
    agents: Vec<Agent>,
    seed: Option<Agent>,
    cache: Option<Origin>,
    _cluster: Option<Cluster>,
    origin: Origin,
    tb: Testbed,
}

impl Bed {
    fn start(mode: Mode, n: usize, p: &Params) -> anyhow::Result<Self> {
        progress(&format!("{}: starting {n} node(s)", mode.label()));
        let tb = Testbed::new(n + 2)?;
        let (origin_node, infra) = (n + 1, n + 2);
        let public_ca = TestCa::new("dfly bench public CA")?;
        let origin = Origin::start(&tb, origin_node, REGISTRY, &public_ca, None)?;
        let public_bundle = tb.dir.join("public-ca.pem");
        fs::write(&public_bundle, public_ca.pem())?;

        let mut cache = None;
        let mut cluster = None;
        let mut seed = None;
        let mut agents = Vec::new();
        let mut containerds = Vec::new();
        match mode {
            Mode::Direct => {
                for i in 1..=n {
                    containerds.push(Containerd::start(&tb, tb.node(i), &public_bundle)?);
                }
            }
            Mode::Central => {
                let c = Origin::start_proxy(&tb, infra, MIRROR, &public_ca, &origin)?;
                let mirror = Mirror {
                    registry: REGISTRY.into(),
                    url: format!("https://{MIRROR}"),
                };
                for i in 1..=n {
                    containerds.push(Containerd::start_with(
                        &tb,
                        tb.node(i),
                        &public_bundle,
                        Some(&mirror),
                    )?);
                }
                cache = Some(c);
            }
            Mode::Damselfly | Mode::DamselflySeed => {
                let cl = Cluster::start(&tb, infra)?;
                let common = |node: usize| -> anyhow::Result<Vec<String>> {
                    let mut f = origin.agent_flags();
                    f.extend(cl.agent_flags(&tb, node)?);
                    Ok(f)
                };
                if mode == Mode::DamselflySeed {
                    let mut flags = common(infra)?;
                    flags.extend(["--seed", "--admin", "0.0.0.0:7402"].map(String::from));
                    seed = Some(Agent::start(&tb, tb.node(infra), &strs(&flags))?);
                }
                for i in 1..=n {
                    let agent = Agent::start(&tb, tb.node(i), &strs(&common(i)?))?;
                    containerds.push(Containerd::start_for(&tb, &agent, &public_ca)?);
                    agents.push(agent);
                }
                cluster = Some(cl);
            }
        }
        for i in 1..=n {
            tb.node(i).shape(&tb.hub, p.node_rate)?;
        }
        tb.node(infra).shape(&tb.hub, p.node_rate)?;
        tb.node(origin_node).shape(&tb.hub, p.origin_rate)?;
        Ok(Self {
            mode,
            n,
            containerds,
            agents,
            seed,
            cache,
            _cluster: cluster,
            origin,
            tb,
        })
    }

    /// Push a layout to this bed's origin (over its own loopback: the shaped
    /// link is not in the way).
    fn push(&self, layout: &Layout) -> anyhow::Result<Image> {
        image::push(&self.tb, &self.origin, layout, REPO, &layout.tag)
    }

    /// Copies each agent's log to `dir/<mode>-N<n>-n<i>.log`.
    fn save_logs(&self, dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        let mode = self.mode.label().replace('+', "-");
        for (i, a) in self.agents.iter().enumerate() {
            let name = format!("{mode}-N{}-n{}.log", self.n, i + 1);
            fs::write(dir.join(name), a.log_text())?;
        }
        Ok(())
    }

    /// The processes whose CPU and memory count as the mode's: per node, then
    /// the extra one (the seed or the central cache).
    fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().map(|a| a.proc.pid()).collect()
    }

    fn extra_pid(&self) -> Option<u32> {
        self.seed
            .as_ref()
            .map(|s| s.proc.pid())
            .or(self.cache.as_ref().map(|c| c.proc.pid()))
    }

    /// One run: every node pulls at once (or node 1, then node 2).
    fn run(
        &self,
        img: &Image,
        repeat: usize,
        sequential: bool,
        p: &Params,
    ) -> anyhow::Result<Vec<Row>> {
        let pids = self.agent_pids();
        let extra = self.extra_pid();
        for pid in pids.iter().chain(&extra) {
            // Reset the peak RSS (VmHWM) so it belongs to this run.
            fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
        }
        let cpu0: Vec<f64> = pids
            .iter()
            .map(|&p| cpu_secs(p))
            .collect::<anyhow::Result<_>>()?;
        let extra0 = extra.map(cpu_secs).transpose()?;
        let link0 = self.origin.link_bytes()?;
        let sampler = CpuSampler::start()?;
        let own0 = self.testbed_cpu_secs();
        let wall = Instant::now();

        let preheat = if self.mode == Mode::DamselflySeed {
            Some(self.preheat(img)?)
        } else {
            None
        };
        let times: Vec<f64> = if sequential {
            let mut t = Vec::new();
            t.push(self.pull(1, img)?);
            // The article's second node comes later: node 1 has finished,
            // and its agent has committed and announced what it streamed.
            if self.mode.swarm() {
                self.agents[0].wait_cached(&img.blob_digests());
            }
            std::thread::sleep(Duration::from_millis(500));
            t.push(self.pull(2, img)?);
            t
        } else {
            std::thread::scope(|s| {
                let pulls: Vec<_> = (1..=self.n)
                    .map(|i| s.spawn(move || self.pull(i, img)))
                    .collect();
                pulls
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("pull thread panicked")))
                    .collect::<anyhow::Result<Vec<f64>>>()
            })?
        };
        if let Some(mut pre) = preheat {
            // Normally long done: the seed serves the nodes while it fetches.
            pre.wait_exit(Duration::from_secs(600))?;
        }
        let busy = sampler.stop();
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let run_cpu =
            (self.testbed_cpu_secs() - own0) / (wall.elapsed().as_secs_f64() * ncpu).max(1e-9);
        // The last bytes of a pull may still sit in the shaper's queue.
        std::thread::sleep(Duration::from_millis(300));
        let origin_bytes = self.origin.link_bytes()?.saturating_sub(link0);
        let extra_cpu = match (extra, extra0) {
            (Some(pid), Some(c0)) => cpu_secs(pid)? - c0,
            _ => 0.0,
        };
        let extra_rss = extra.map(peak_rss_kib).transpose()?.unwrap_or(0);
        let image_bytes = img.total_blob_bytes;
        let mut rows = Vec::new();
        for (k, &pull_s) in times.iter().enumerate() {
            let node = k + 1;
            let t_star_s = if sequential && node == 2 {
                // Node 1 already has the image; the best node 2 can do is
                // take it at its own link's rate.
                image_bytes as f64 * 8.0 / (f64::from(p.node_rate) * 1e6)
            } else if sequential {
                bench::t_star(image_bytes, p.origin_rate, p.node_rate, 1)
            } else {
                bench::t_star(image_bytes, p.origin_rate, p.node_rate, self.n)
            };
            let (agent_cpu_s, agent_rss_kib) = match pids.get(k) {
                Some(&pid) => (cpu_secs(pid)? - cpu0[k], peak_rss_kib(pid)?),
                None => (0.0, 0),
            };
            rows.push(Row {
                mode: self.mode.label().into(),
                nodes: self.n,
                repeat,
                scenario: if sequential {
                    "sequential"
                } else {
                    "concurrent"
                }
                .into(),
                node,
                pull_s,
                origin_bytes,
                image_bytes,
                t_star_s,
                agent_cpu_s,
                agent_rss_kib,
                extra_cpu_s: extra_cpu,
                extra_rss_kib: extra_rss,
                cpu_busy: busy,
                run_cpu,
                cpu_bound: busy >= CPU_BOUND,
            });
        }
        Ok(rows)
    }

    /// CPU seconds used so far by every process in the testbed's nodes.
    fn testbed_cpu_secs(&self) -> f64 {
        self.tb
            .nodes
            .iter()
            .filter_map(|n| fs::read_to_string(n.cgroup.join("cpu.stat")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum::<u64>() as f64
            / 1e6
    }

    fn pull(&self, node: usize, img: &Image) -> anyhow::Result<f64> {
        let t = Instant::now();
        self.containerds[node - 1]
            .cri_pull(&img.reference, None)
            .with_context(|| format!("{} pull on n{node}", self.mode.label()))?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// `damselfly preheat` of `img` on the seed, started now, from the seed's node.
    fn preheat(&self, img: &Image) -> anyhow::Result<Proc> {
        let node = self.tb.node(self.n + 2);
        let home = self.tb.dir.join("home-preheat");
        fs::create_dir_all(&home)?;
        let mut cmd = node.command(damselfly_bin()?)?;
        tools::isolate_env(&mut cmd, &self.origin.ca_pem, &self.origin.ca_dir);
        cmd.env("HOME", &home)
            .env_remove("RUST_BACKTRACE")
            .args(["preheat", &img.reference, "--seed"])
            // On the seed's own node: /v1/fetch answers plain HTTP on loopback only.
            .arg("http://127.0.0.1:7402")
            .arg("--upstream-ca")
            .arg(&self.origin.ca_pem);
        node.spawn(cmd, &self.tb.dir.join(format!("preheat-{}.log", img.tag)))
    }

    /// Remove the image from every containerd: its disk is not kept for runs
    /// that never use it again.
    fn forget(&self, img: &Image) -> anyhow::Result<()> {
        for c in &self.containerds {
            if c.has_image(&img.reference)? {
                c.remove_image(&img.reference)?;
            }
        }
        Ok(())
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// utime + stime of a process so far, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// (busy, total) jiffies of all CPUs together.
fn cpu_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(v.len() >= 5, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Ok((total - idle, total))
}

/// The machine's CPUs' busy fraction over a run (all CPUs, all processes:
/// the machine is shared, so this is what limits the run, whoever uses it).
struct CpuSampler {
    start: (u64, u64),
}

impl CpuSampler {
    fn start() -> anyhow::Result<Self> {
        Ok(Self {
            start: cpu_jiffies()?,
        })
    }

    fn stop(self) -> f64 {
        let Ok(end) = cpu_jiffies() else {
            return 0.0;
        };
        let busy = end.0.saturating_sub(self.start.0) as f64;
        let total = end.1.saturating_sub(self.start.1).max(1) as f64;
        busy / total
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs, kernel {kernel}, {date}")
}

fn fmt_secs(s: f64) -> String {
    if s >= 60.0 {
        format!("{}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.0}s")
    }
}
