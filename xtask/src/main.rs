//! `cargo xtask setup | build-ebpf | test | fuzz | demo | lint | bench | sim | manifests`:
//! the project's own commands, so a fresh machine and CI run exactly what a
//! developer runs. `demo` and `test` install what they need first.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite (idempotent): apt packages, nightly rust-src, bpf-linker,
    /// cargo-fuzz, the chart tests' Python packages.
    Setup,
    /// Build the kernel programs (agent-ebpf) into target/ebpf.
    BuildEbpf,
    /// Run the suite (runs `setup` first): unit tests, the Helm chart tests, every fuzz
    /// target briefly on its committed corpus, then end-to-end tests (root, real kernel).
    /// With part flags, only those parts.
    Test {
        /// The unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// The Helm chart tests (pytest: render, lint, Kubernetes schema, flags vs binary).
        #[arg(long)]
        chart: bool,
        /// Each fuzz target for a few seconds, starting from fuzz/corpus and
        /// fuzz/regressions (nightly, ASan).
        #[arg(long)]
        fuzz: bool,
        /// The end-to-end tests.
        #[arg(long)]
        e2e: bool,
        /// Passed to the test binaries as a name filter (pytest: `-k`).
        filter: Option<String>,
    },
    /// Fuzz every target (or one) in turn, one job each, growing fuzz/corpus/TARGET
    /// (only the committed seeds are tracked). Crashes land in fuzz/artifacts/TARGET.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// One target (`cargo fuzz list` names them); all when absent.
        target: Option<String>,
    },
    /// Regenerate deploy/manifests from the Helm chart (default values).
    Manifests {
        /// Only check that deploy/manifests matches a fresh render.
        #[arg(long)]
        check: bool,
    },
    /// rustfmt --check and clippy -D warnings.
    Lint,
    /// The seed article's demo on local nodes (root; runs `setup` first): the first
    /// node pulls from a 100 Mbit/s origin, the second from it, then all at once.
    Demo {
        /// Arguments for dfly-demo: --image-size 300MiB --layers 4 --origin-rate 100mbit --nodes 3 --keep
        /// (`cargo xtask demo -- --help` explains them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measurements on the testbed (root): N nodes pulling at once directly, through a
    /// central pull-through cache and through Damselfly, into target/bench/ (CSV,
    /// markdown table, PNG plot); `--micro` for connect cost, splice and cache hits.
    Bench {
        /// Arguments for dfly-bench: --nodes 1,2,4,8 --image-size 48MiB --layers 4
        /// --origin-rate 50mbit --node-rate 250mbit --modes direct,central,damselfly,damselfly+seed
        /// --repeat 3 --out DIR, or --micro [--scenario steer|hit|all] (`cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A simulated rollout (no root): the real scheduler and tracker state on a simulated
    /// clock and network, N nodes at once, into target/sim/ (sim.csv, sim.md, sim.png);
    /// `--tracker-load` instead measures one real tracker replica on loopback.
    Sim {
        /// Run the tracker load generator (sim/src/bin/tracker-load.rs) instead.
        #[arg(long)]
        tracker_load: bool,
        /// Arguments for damselfly-sim: --nodes 2,4,8 --image-size 48MiB --layers 4
        /// --node-rate 250mbit --origin-rate 50mbit --latency 1 --seed 1 --out DIR
        /// (`cargo xtask sim -- --help`); for tracker-load: --clients 16 --seconds 10 --holders 1024.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the build and the testbed need.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker against nightly's LLVM 22
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // the testbed
    "iproute2",
    "bpftool",
    "openssl",
    "curl",
    // real clients and registry for the end-to-end harness
    "containerd",
    "docker-registry",
    "skopeo",
    "busybox-static",
    // the other runtimes the agent steers by default: Docker Engine (dockerd pulls
    // itself) and Podman (containers/image, as CRI-O); rootful, so no uidmap
    "docker.io",
    "podman",
    // k8s-cri's build script (CRI gRPC client)
    "protobuf-compiler",
    // the bench's plot (plotters' ttf: font-kit finds fonts through fontconfig)
    "pkg-config",
    "libfontconfig-dev",
    "libfreetype-dev",
    "fonts-dejavu-core",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long `test --fuzz` fuzzes each target, after replaying its committed inputs.
const FUZZ_TEST_SECONDS: u64 = 4;
/// Free space the suite needs where `target/` lives (a clean build of every
/// test binary, the release agent and the fuzz targets is about 15 GiB) and in
/// /tmp (each end-to-end test unpacks images into its nodes' containerd roots).
const FREE_FOR_BUILD_GIB: u64 = 16;
const FREE_FOR_E2E_GIB: u64 = 4;
/// libFuzzer's limits in every run: an input that makes a parser allocate more
/// than this (a length taken from the input unchecked) or spin is a finding.
const FUZZ_LIMITS: &[&str] = &["-rss_limit_mb=512", "-malloc_limit_mb=256", "-timeout=5"];
/// PyPI packages of the chart tests (deploy/helm/tests), with the module each provides.
const PY_PACKAGES: &[(&str, &str)] = &[
    ("helm-python-sdk==0.2.2", "helm_python"),
    ("kubernetes-validate==1.37.0", "kubernetes_validate"),
    ("pytest==9.2.0", "pytest"),
];

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test {
            unit,
            chart,
            fuzz,
            e2e,
            filter,
        } => {
            // A fresh machine has no bpf-linker, so not even the unit tests build.
            setup()?;
            let all = !(unit || chart || fuzz || e2e);
            test(
                Parts {
                    unit: unit || all,
                    chart: chart || all,
                    fuzz: fuzz || all,
                    e2e: e2e || all,
                },
                filter.as_deref(),
            )
        }
        Cmd::Fuzz { seconds, target } => fuzz(seconds, target.as_deref()),
        Cmd::Manifests { check } => manifests(check),
        Cmd::Demo { args } => demo(&args),
        Cmd::Lint => lint(),
        Cmd::Bench { args } => bench(&args),
        Cmd::Sim { tracker_load, args } => sim(tracker_load, &args),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// `cargo ARGS` in the workspace root.
fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing packages {}: run as root (`sudo cargo xtask setup`)",
                missing.join(" ")
            );
        }
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    let have = output_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        // Built against the system LLVM 22 that nightly's rustc also uses.
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path))?;
    }
    install_cargo_fuzz()?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
        ])
        .args(PY_PACKAGES.iter().map(|(pkg, _)| pkg)))?;
    eprintln!("setup complete");
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    // agent/build.rs owns the recipe; building the agent builds the object.
    run(&mut cargo(&["build", "-p", "damselfly"]))?;
    eprintln!("kernel object: target/ebpf/bpfel-unknown-none/release/damselfly-ebpf");
    Ok(())
}

struct Parts {
    unit: bool,
    chart: bool,
    fuzz: bool,
    e2e: bool,
}

fn test(parts: Parts, filter: Option<&str>) -> anyhow::Result<()> {
    let Parts {
        unit,
        chart,
        fuzz,
        e2e,
    } = parts;
    let filter: Vec<&str> = filter.into_iter().collect();
    // Cargo grows target/ as it builds, so what is already there counts.
    let built = disk_usage_gib(&root().join("target")).unwrap_or(0);
    require_free(
        &root(),
        FREE_FOR_BUILD_GIB.saturating_sub(built),
        "build artefacts in target/",
    )?;
    if unit {
        // Everything but the testbed's end-to-end scenarios (agent/tests runs
        // the built binary against temporary dirs only).
        run(cargo(&[
            "test",
            "--workspace",
            "--exclude",
            "damselfly-ebpf",
            "--exclude",
            "damselfly-testbed",
            "--",
        ])
        .args(&filter))?;
        run(cargo(&["test", "-p", "damselfly-testbed", "--lib", "--bins", "--"]).args(&filter))?;
    }
    if chart {
        // The tests check every rendered command line against the real binary.
        run(&mut cargo(&[
            "build",
            "-p",
            "damselfly",
            "--bin",
            "damselfly",
        ]))?;
        check_py_packages()?;
        let mut pytest = python(&["-m", "pytest", "-q", "-p", "no:cacheprovider"]);
        pytest
            .arg("deploy/helm/tests")
            .env("DAMSELFLY_BIN", root().join("target/debug/damselfly"));
        match filter.first() {
            None => run(&mut pytest)?,
            Some(f) => {
                pytest.args(["-k", f]);
                eprintln!("+ {pytest:?}");
                // 5: no test matched the filter, which is fine when filtering the whole suite.
                match pytest.status().context("starting pytest")?.code() {
                    Some(0 | 5) => {}
                    _ => bail!("chart tests failed"),
                }
            }
        }
    }
    if fuzz {
        fuzz_briefly(filter.first().copied())?;
    }
    if e2e {
        if !is_root() {
            bail!(
                "the end-to-end tests need root (network namespaces, cgroups, eBPF); run `sudo cargo xtask test --e2e`"
            );
        }
        require_free(
            Path::new("/tmp"),
            FREE_FOR_E2E_GIB,
            "the test nodes' data in /tmp",
        )?;
        // The tests start the real agent binary; build it first.
        run(&mut cargo(&[
            "build",
            "-p",
            "damselfly",
            "-p",
            "damselfly-testbed",
            "--bins",
        ]))?;
        // One at a time: each test builds its own nodes, and the machine has 2 cores.
        run(cargo(&[
            "test",
            "-p",
            "damselfly-testbed",
            "--test",
            "*",
            "--",
            "--test-threads=1",
        ])
        .args(&filter))?;
    }
    Ok(())
}

/// Fails, naming the shortfall, unless the filesystem holding `path` has
/// `gib` GiB free: a full disk otherwise shows as a test failing mid-pull.
fn require_free(path: &Path, gib: u64, what: &str) -> anyhow::Result<()> {
    let out = output_of(Command::new("df").args(["-k", "--output=avail"]).arg(path))
        .with_context(|| format!("df {}", path.display()))?;
    let kib: u64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("df {}: unexpected output {out:?}", path.display()))?;
    let free = kib >> 20;
    if free < gib {
        bail!(
            "only {free} GiB free on the filesystem of {} and {what} need {gib} GiB: free some disk space first",
            path.display()
        );
    }
    Ok(())
}

/// GiB under `path` (`du`), if it exists.
fn disk_usage_gib(path: &Path) -> Option<u64> {
    let out = output_of(Command::new("du").args(["-sk"]).arg(path))?;
    let kib: u64 = out.split_whitespace().next()?.parse().ok()?;
    Some(kib >> 20)
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    let have = output_of(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !have.contains(CARGO_FUZZ_VERSION) {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

/// `cargo +nightly fuzz ARGS` on the fuzz crate (its own workspace: sanitizer
/// flags and nightly stay out of the main one).
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .args(args)
        .current_dir(root());
    // What `cargo xtask` itself runs under (stable) must not pick the compiler.
    for key in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO"] {
        cmd.env_remove(key);
    }
    cmd
}

/// The fuzz targets, or just `only` (which must be one of them).
fn fuzz_targets(only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let list = output_of(&mut cargo_fuzz(&["list"])).context("`cargo fuzz list` failed")?;
    let all: Vec<String> = list.lines().map(str::to_string).collect();
    match only {
        None => Ok(all),
        Some(t) if all.iter().any(|a| a == t) => Ok(vec![t.to_string()]),
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", all.join(", ")),
    }
}

fn fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    install_cargo_fuzz()?;
    for t in fuzz_targets(only)? {
        let corpus = format!("fuzz/corpus/{t}");
        let max_time = format!("-max_total_time={seconds}");
        run(cargo_fuzz(&["run", &t, &corpus])
            .args(regressions(&t))
            .arg("--")
            .args([max_time.as_str(), "-print_final_stats=1"])
            .args(FUZZ_LIMITS))?;
    }
    Ok(())
}

/// A target's committed crash inputs, if it has any, as a read-only corpus dir.
fn regressions(target: &str) -> Option<String> {
    let dir = format!("fuzz/regressions/{target}");
    root().join(&dir).is_dir().then_some(dir)
}

/// Every target (whose name contains `filter`) replays its seeds and
/// regressions, then fuzzes a few seconds from them. What it finds goes to a
/// scratch dir, so the tree stays as committed.
fn fuzz_briefly(filter: Option<&str>) -> anyhow::Result<()> {
    install_cargo_fuzz()?;
    run(&mut cargo_fuzz(&["build"]))?;
    let scratch = std::env::temp_dir().join(format!("damselfly-fuzz-{}", std::process::id()));
    let result = (|| {
        let targets = fuzz_targets(None)?;
        for t in targets
            .iter()
            .filter(|t| filter.is_none_or(|f| t.contains(f)))
        {
            let new = scratch.join(t);
            std::fs::create_dir_all(&new).with_context(|| format!("creating {new:?}"))?;
            let max_time = format!("-max_total_time={FUZZ_TEST_SECONDS}");
            run(cargo_fuzz(&["run", t])
                .arg(&new)
                .arg(format!("fuzz/corpus/{t}"))
                .args(regressions(t))
                .arg("--")
                .arg(max_time)
                .args(FUZZ_LIMITS))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// `python3 ARGS` in the workspace root, writing no bytecode into the tree.
fn python(args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(args)
        .current_dir(root())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

fn check_py_packages() -> anyhow::Result<()> {
    for (package, module) in PY_PACKAGES {
        let found = python(&["-c", &format!("import {module}")])
            .output()
            .with_context(|| "starting python3")?
            .status
            .success();
        if !found {
            bail!(
                "the Python package {package} (module {module}) is missing: run `cargo xtask setup`"
            );
        }
    }
    Ok(())
}

fn manifests(check: bool) -> anyhow::Result<()> {
    check_py_packages()?;
    let mut cmd = python(&["deploy/helm/render.py"]);
    if check {
        cmd.arg("--check");
    }
    run(&mut cmd)
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    require_root("the bench", "bench")?;
    become_harness("dfly-bench", args)
}

/// `cargo run --release` of the simulator (or the tracker load generator),
/// so it lands wherever the target dir is.
fn sim(tracker_load: bool, args: &[String]) -> anyhow::Result<()> {
    let bin = if tracker_load {
        "tracker-load"
    } else {
        "damselfly-sim"
    };
    let mut cmd = cargo(&[
        "run",
        "--release",
        "-q",
        "-p",
        "damselfly-sim",
        "--bin",
        bin,
        "--",
    ]);
    cmd.args(args);
    eprintln!("+ {cmd:?}");
    let err = cmd.exec();
    Err(err).context(format!("starting {bin}"))
}

fn demo(args: &[String]) -> anyhow::Result<()> {
    require_root("the demo", "demo")?;
    setup()?;
    become_harness("dfly-demo", args)
}

fn require_root(what: &str, cmd: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (network namespaces, cgroups, eBPF): run `sudo cargo xtask {cmd}`"
        );
    }
    Ok(())
}

/// Builds the harness binaries in release and replaces this process with
/// `bin` (run in the workspace root, so its default output paths land there).
fn become_harness(bin: &str, args: &[String]) -> anyhow::Result<()> {
    // Release: a debug agent's hashing and QUIC would be what is measured,
    // slowly enough to show up in the pull times.
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "damselfly",
        "-p",
        "damselfly-testbed",
        "--bins",
    ]))?;
    let mut cmd = Command::new(root().join("target/release").join(bin));
    cmd.args(args).current_dir(root());
    eprintln!("+ {cmd:?}");
    // Become it rather than wait for it: Ctrl-C reaches the whole process
    // group, and a waiting xtask would exit at once, giving the shell back
    // while the harness still tears its testbed down.
    let err = cmd.exec();
    Err(err).context(format!("starting {bin}"))
}

fn lint() -> anyhow::Result<()> {
    run(&mut cargo(&["fmt", "--all", "--check"]))?;
    // Its own workspace; built (and so type-checked) by `cargo xtask test --fuzz`.
    run(&mut cargo(&[
        "fmt",
        "--check",
        "--manifest-path",
        "fuzz/Cargo.toml",
    ]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "damselfly-ebpf",
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Cmd};

    /// `sim` passes its flags through, and `--tracker-load` picks the other binary.
    #[test]
    fn sim_passes_its_arguments_through() {
        let cli =
            Cli::try_parse_from(["cargo xtask", "sim", "--nodes", "2,4,8", "--seed", "3"]).unwrap();
        let Cmd::Sim { tracker_load, args } = cli.cmd else {
            panic!("not sim");
        };
        assert!(!tracker_load);
        assert_eq!(args, ["--nodes", "2,4,8", "--seed", "3"]);
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "sim",
            "--tracker-load",
            "--",
            "--clients",
            "8",
        ])
        .unwrap();
        assert!(
            matches!(cli.cmd, Cmd::Sim { tracker_load: true, ref args } if args == &["--clients", "8"])
        );
    }

    /// Every `cargo xtask …` the docs show parses: the subcommands and flags
    /// exist. Usage brackets are dropped and placeholders (`N`) given a value.
    #[test]
    fn every_xtask_command_in_the_docs_parses() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut checked = 0;
        for doc in [
            "README.md",
            "deploy/helm/damselfly/README.md",
            "deploy/manifests/README.md",
        ] {
            let text = std::fs::read_to_string(format!("{root}/{doc}")).unwrap();
            for (i, _) in text.match_indices("cargo xtask ") {
                let rest = &text[i + "cargo xtask ".len()..];
                let end = rest
                    .find(['`', '\n', '#', '|', ')', '\''])
                    .unwrap_or(rest.len());
                let mut argv = vec!["cargo xtask".to_string()];
                for w in rest[..end].split_whitespace() {
                    let w = w.trim_matches(['[', ']']);
                    argv.push(if w == "N" { "1".into() } else { w.into() });
                }
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{doc}: `{}`\n{}", argv.join(" "), e.render());
                }
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} found");
    }
}
