//! The swarm's shared parts: a `damselfly tracker` in a node, and the
//! cluster PKI the Helm chart would create (one CA, the tracker's certificate
//! with SAN `damselfly-tracker`, a peer certificate per node).

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    agent::damselfly_bin,
    pki::TestCa,
    testbed::{Proc, Testbed},
};

/// `damselfly tracker` in node `infra`, listening on its port 7400 with
/// `extra` flags (the cluster certificates among them); returns once it
/// accepts connections.
pub fn start_tracker_with(
    tb: &Testbed,
    infra: usize,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let node = tb.node(infra);
    let addr = node.addr4(7400);
    let mut cmd = node.command(damselfly_bin()?)?;
    cmd.args(["tracker", "--listen", &addr.to_string()])
        .args(extra)
        .envs(env.iter().copied());
    let mut tracker = node.spawn(cmd, &tb.dir.join("tracker.log"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node
        .in_netns(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?
    {
        if !tracker.running() || Instant::now() > deadline {
            bail!("tracker did not start: {}", tracker.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(tracker)
}

/// A tracker and the cluster CA.
pub struct Cluster {
    pub tracker: Proc,
    pub tracker_addr: SocketAddr,
    pub ca: TestCa,
    pub ca_pem: PathBuf,
    infra: usize,
    /// The tracker's flags: its certificates and the test's own.
    tracker_flags: Vec<String>,
}

impl Cluster {
    pub fn start(tb: &Testbed, infra: usize) -> anyhow::Result<Self> {
        Self::start_with(tb, infra, &[], &[])
    }

    /// [`Cluster::start`] with extra tracker flags and environment variables.
    pub fn start_with(
        tb: &Testbed,
        infra: usize,
        tracker_flags: &[&str],
        tracker_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let ca = TestCa::new("dfly cluster CA")?;
        let ca_pem = tb.dir.join("cluster-ca.crt");
        fs::write(&ca_pem, ca.pem())?;
        let (crt, key) = ca
            .issue(&["damselfly-tracker"])?
            .write(&tb.dir, "tracker")?;
        let mut flags: Vec<String> = [
            "--cluster-ca",
            &ca_pem.display().to_string(),
            "--cluster-cert",
            &crt.display().to_string(),
            "--cluster-key",
            &key.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.extend(tracker_flags.iter().map(|s| s.to_string()));
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        Ok(Self {
            tracker: start_tracker_with(tb, infra, &args, tracker_env)?,
            tracker_addr: tb.node(infra).addr4(7400),
            ca,
            ca_pem,
            infra,
            tracker_flags: flags,
        })
    }

    /// A fresh tracker (empty state) in place of the current one, which must
    /// be gone.
    pub fn restart_tracker(&mut self, tb: &Testbed) -> anyhow::Result<()> {
        let args: Vec<&str> = self.tracker_flags.iter().map(String::as_str).collect();
        self.tracker = start_tracker_with(tb, self.infra, &args, &[])?;
        Ok(())
    }

    /// The flags that join the agent of node `node` to the swarm, with a peer
    /// certificate from the cluster CA.
    pub fn agent_flags(&self, tb: &Testbed, node: usize) -> anyhow::Result<Vec<String>> {
        peer_flags(tb, &self.ca, &self.ca_pem, self.tracker_addr, node)
    }
}

/// The flags that join node `node`'s agent to the swarm of `tracker`,
/// trusting the CA in `ca_pem`, with a peer certificate from `issuer` (the
/// cluster CA, or another one to play an outsider).
pub fn peer_flags(
    tb: &Testbed,
    issuer: &TestCa,
    ca_pem: &Path,
    tracker: SocketAddr,
    node: usize,
) -> anyhow::Result<Vec<String>> {
    let (crt, key) = issuer
        .issue(&["damselfly-peer"])?
        .write(&tb.dir, &format!("peer-n{node}"))?;
    Ok(vec![
        "--tracker".into(),
        tracker.to_string(),
        "--cluster-ca".into(),
        ca_pem.display().to_string(),
        "--cluster-cert".into(),
        crt.display().to_string(),
        "--cluster-key".into(),
        key.display().to_string(),
        "--node-name".into(),
        format!("n{node}"),
    ])
}
