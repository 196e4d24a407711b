//! Start the real `damselfly` binary and the `dfly-probe` helper inside nodes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    probe::GetResult,
    testbed::{Node, Proc, Testbed},
};

/// A built binary of this workspace: `$<ENV>` if set, else next to the test
/// executable's profile dir (`target/<profile>/<name>`).
fn workspace_bin(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a tool from target/<profile>/.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    match candidates.iter().find(|p| p.exists()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "{name} not found in {candidates:?}: build it first (`cargo xtask test` does), or set {env}"
        ),
    }
}

pub fn damselfly_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("damselfly", "DAMSELFLY_BIN")
}

pub fn probe_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("dfly-probe", "DFLY_PROBE_BIN")
}

/// A running `damselfly agent` in a node, steering that node's cgroup.
pub struct Agent {
    pub proc: Proc,
    pub node: Node,
    pub admin: SocketAddr,
    /// `--state-dir`: the node CA and the blob cache.
    pub state_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Started from this mount namespace instead of the test's (see [`Node::command_from`]).
    mnt_ns: Option<PathBuf>,
    /// Started through this command line (e.g. `unshare --pid --fork`), the agent's after it.
    wrapper: Vec<String>,
    log: PathBuf,
    starts: u32,
}

impl Agent {
    /// Start with the node's own instance name, cgroup and state dir, plus `extra` flags.
    pub fn start(tb: &Testbed, node: &Node, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(tb, node, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables (test-only switches).
    pub fn start_with_env(
        tb: &Testbed,
        node: &Node,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::launch(tb, node, extra, env, None, &[])
    }

    /// [`Agent::start`] through `wrapper` (a command line that runs the
    /// agent's, e.g. `unshare --pid --fork --kill-child --`).
    pub fn start_wrapped(
        tb: &Testbed,
        node: &Node,
        extra: &[&str],
        wrapper: &[&str],
    ) -> anyhow::Result<Self> {
        Self::launch(tb, node, extra, &[], None, wrapper)
    }

    /// [`Agent::start`] in a mount namespace made from `mnt_ns` (`/proc/PID/ns/mnt`),
    /// as a container runtime would start the agent's pod.
    pub fn start_from_mount_ns(
        tb: &Testbed,
        node: &Node,
        extra: &[&str],
        mnt_ns: &Path,
    ) -> anyhow::Result<Self> {
        Self::launch(tb, node, extra, &[], Some(mnt_ns.to_path_buf()), &[])
    }

    fn launch(
        tb: &Testbed,
        node: &Node,
        extra: &[&str],
        env: &[(&str, &str)],
        mnt_ns: Option<PathBuf>,
        wrapper: &[&str],
    ) -> anyhow::Result<Self> {
        let state = tb.dir.join(format!("state-n{}", node.index));
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--instance".into(),
            node.name.clone(),
            "--cgroup".into(),
            node.cgroup.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let admin: SocketAddr = "127.0.0.1:7402".parse()?;
        let log = tb.dir.join(format!("agent-n{}", node.index));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut agent = Self {
            proc: Proc::none(log.with_extension("0.log")),
            node: node.clone(),
            admin,
            state_dir: state,
            args,
            env,
            mnt_ns,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            log,
            starts: 0,
        };
        agent.restart()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !self.proc.running() {
                bail!("agent exited during start:\n{}", self.proc.log_text());
            }
            if matches!(self.node.http_get(self.admin, "/healthz"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent not healthy after 20 s:\n{}", self.proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start again with the same flags (after [`Agent::kill`] or [`Agent::terminate`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let bin = damselfly_bin()?;
        let mut cmd = match self.wrapper.split_first() {
            None => self.node.command_from(&bin, self.mnt_ns.as_deref())?,
            Some((program, args)) => {
                let mut c = self.node.command_from(program, self.mnt_ns.as_deref())?;
                c.args(args).arg(&bin);
                c
            }
        };
        // The test's own env (e.g. DAMSELFLY_LOG) wins over the default level.
        cmd.args(&self.args)
            .env(
                "DAMSELFLY_LOG",
                std::env::var("DFLY_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().cloned())
            .env_remove("RUST_BACKTRACE");
        self.proc = self.node.spawn(
            cmd,
            &self.log.with_extension(format!("{}.log", self.starts)),
        )?;
        self.starts += 1;
        self.wait_ready()
    }

    /// The `--registry` hosts it was started with (`damselfly ca` needs the
    /// same list, or it makes a CA with other constraints).
    pub fn registries(&self) -> Vec<String> {
        self.args
            .windows(2)
            .filter(|w| w[0] == "--registry")
            .map(|w| w[1].clone())
            .collect()
    }

    /// Waits until every blob in `digests` ("sha256:<hex>") is committed to
    /// the cache: that happens just after the client has its last byte (the
    /// whole digest is verified first).
    pub fn wait_cached(&self, digests: &[String]) {
        let dir = self.state_dir.join("blobs");
        let deadline = Instant::now() + Duration::from_secs(30);
        for d in digests {
            let hex = d.trim_start_matches("sha256:");
            while !dir.join(hex).exists() {
                assert!(
                    Instant::now() < deadline,
                    "{d} never cached on node {}:\n{}",
                    self.node.index,
                    self.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL and reap: the kernel has dropped the agent's links when this returns.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_exit(Duration::from_secs(10))
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (code, body) = self.node.http_get(self.admin, "/metrics")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    /// One sample, e.g. `damselfly_steer_connects_total{port="80",action="steered"}`; 0 if absent.
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics()?, series).unwrap_or(0.0))
    }

    pub fn steered(&self, port: u16) -> anyhow::Result<f64> {
        self.metric(&format!(
            "damselfly_steer_connects_total{{port=\"{port}\",action=\"steered\"}}"
        ))
    }

    pub fn passed(&self, port: u16) -> anyhow::Result<f64> {
        self.metric(&format!(
            "damselfly_steer_connects_total{{port=\"{port}\",action=\"passed\"}}"
        ))
    }

    pub fn spliced(&self) -> anyhow::Result<f64> {
        self.metric("damselfly_intercept_connections_total{mode=\"splice\"}")
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// The value of one exact series in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Start `dfly-probe serve` in `node` and wait until it listens.
pub fn start_server(
    tb: &Testbed,
    node: &Node,
    http: &[SocketAddr],
    https: &[SocketAddr],
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<Proc> {
    let mut cmd = node.command(probe_bin()?)?;
    cmd.arg("serve");
    let join = |a: &[SocketAddr]| {
        a.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    if !http.is_empty() {
        cmd.args(["--http", &join(http)]);
    }
    if !https.is_empty() {
        cmd.args(["--https", &join(https)]);
    }
    if let Some((cert, key)) = tls {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let log = tb
        .dir
        .join(format!("server-n{}-{}.log", node.index, std::process::id()));
    let mut proc = node.spawn(cmd, &log)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proc.log_text().contains("ready") {
        if !proc.running() || Instant::now() > deadline {
            bail!("test server did not start:\n{}", proc.log_text());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(proc)
}

/// Run `dfly-probe get URL` in `node` under process name `comm`.
pub fn probe_get(
    node: &Node,
    comm: &str,
    url: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<GetResult> {
    probe_get_with(node, comm, url, ca, &[])
}

/// [`probe_get`] with extra request headers (`Name: value`).
pub fn probe_get_with(
    node: &Node,
    comm: &str,
    url: &str,
    ca: Option<&std::path::Path>,
    headers: &[&str],
) -> anyhow::Result<GetResult> {
    let mut cmd = node.command(probe_bin()?)?;
    cmd.args(["--comm", comm, "get", url]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running dfly-probe get")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "dfly-probe printed {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_exact_series_only() {
        let text = "# TYPE x counter\nx_total{a=\"1\"} 5\nx_total{a=\"10\"} 7\n# EOF\n";
        assert_eq!(metric_value(text, "x_total{a=\"1\"}"), Some(5.0));
        assert_eq!(metric_value(text, "x_total{a=\"10\"}"), Some(7.0));
        assert_eq!(metric_value(text, "x_total{a=\"2\"}"), None);
    }
}
