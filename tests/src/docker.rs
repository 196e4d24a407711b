//! Docker Engine in a node: Debian's `docker.io` (20.10), whose dockerd pulls
//! with its own client (not containerd's), with no registry configuration.
//!
//! dockerd runs inside the node (netns, cgroup, /etc/hosts; the host's /sys,
//! whose cgroup mounts it needs) in a mount namespace of its own, with every
//! path it writes under the testbed's dir: data and exec roots, pidfile,
//! socket, an empty daemon.json; overlays over /etc/docker (see
//! [`Trust::mounts`]), /run and /opt catch the rest. No bridge, no iptables, the vfs storage driver: it
//! mounts nothing for a pull, and whatever it did mount would live in its
//! own namespace.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    image::Pulled,
    testbed::{Mount, Node, Proc, Testbed},
    tools,
    trust::Trust,
};

/// Where dockerd keeps its configuration (and reads certs.d/).
pub const ETC_DIR: &str = "/etc/docker";

pub struct Dockerd {
    pub node: Node,
    pub dir: PathBuf,
    sock: PathBuf,
    cli: PathBuf,
    proc: Proc,
}

impl Dockerd {
    /// Start dockerd in `node`, trusting as `trust` says. Returns once it
    /// answers on its socket.
    pub fn start(tb: &Testbed, node: &Node, trust: &Trust) -> anyhow::Result<Self> {
        let dockerd = tools::need("dockerd", "docker.io")?;
        let cli = tools::need("docker", "docker.io")?;
        let dir = tb.dir.join(format!("docker-n{}", node.index));
        let no_certs = dir.join("no-certs");
        for d in ["root", "exec", "cli", "no-certs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let config = dir.join("daemon.json");
        fs::write(&config, "{}\n")?;
        let sock = dir.join("docker.sock");
        // dockerd makes /run/docker/plugins and its containerd /opt/containerd,
        // neither configurable: overlays keep them off the host.
        let mut mounts = trust.mounts(ETC_DIR, &dir)?;
        mounts.push(Mount::overlay("/run", &dir)?);
        mounts.push(Mount::overlay("/opt", &dir)?);
        let mut cmd = node.command_with(dockerd, &mounts)?;
        tools::isolate_env(&mut cmd, trust.roots(), &no_certs);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", sock.display()))
            .args([
                "--storage-driver=vfs",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ]);
        let proc = node.spawn(cmd, &dir.join("dockerd.log"))?;
        let mut d = Self {
            node: node.clone(),
            dir,
            sock,
            cli,
            proc,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.proc.running() {
                bail!("dockerd exited during start:\n{}", self.proc.log_text());
            }
            if self.sock.exists()
                && self
                    .docker()?
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dockerd not ready after 30 s:\n{}", self.proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `docker` CLI for this daemon, with a config dir of its own (where
    /// `docker login` keeps the credential).
    pub fn docker(&self) -> anyhow::Result<Command> {
        let mut cmd = self.node.command(&self.cli)?;
        cmd.arg("--config")
            .arg(self.dir.join("cli"))
            .arg("--host")
            .arg(format!("unix://{}", self.sock.display()));
        Ok(cmd)
    }

    fn docker_out(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tools::run(self.docker()?.args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `docker login`: dockerd checks the credential against the registry.
    pub fn login(&self, registry: &str, user: &str, password: &str) -> anyhow::Result<()> {
        self.docker_out(&[
            "login",
            "--username",
            user,
            "--password",
            password,
            registry,
        ])
        .map(drop)
    }

    /// `docker pull REF`: dockerd itself (comm `dockerd`) fetches.
    pub fn pull(&self, reference: &str) -> anyhow::Result<()> {
        self.docker_out(&["pull", "--quiet", reference]).map(drop)
    }

    /// What `docker image inspect` says about `reference`.
    pub fn inspect(&self, reference: &str) -> anyhow::Result<Pulled> {
        let out = self.docker_out(&[
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{range .RepoDigests}}{{.}} {{end}}",
            reference,
        ])?;
        let mut words = out.split_whitespace();
        let id = words.next().context("no image id")?.to_string();
        let manifest = words
            .filter_map(|d| d.split_once('@').map(|(_, digest)| digest.to_string()))
            .collect::<Vec<_>>();
        match manifest.as_slice() {
            [one] => Ok(Pulled {
                config_digest: id,
                manifest_digest: one.clone(),
            }),
            _ => bail!("docker image inspect {reference}: {out:?}"),
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// SIGTERM (dockerd stops the containerd it started), then SIGKILL
    /// after 20 s; then unmount anything left under its dir, which the
    /// mount namespace should have made impossible.
    pub fn stop(&mut self) {
        if self.proc.running() {
            self.proc.signal(libc::SIGTERM);
            if self.proc.wait_exit(Duration::from_secs(20)).is_err() {
                self.proc.kill();
            }
        }
        tools::unmount_under(&self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
