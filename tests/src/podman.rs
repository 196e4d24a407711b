//! Podman in a node: Debian's `podman` (4.3), rootful, daemonless: every
//! command is one `podman` process in the node (comm `podman`) that pulls with
//! containers/image, the library CRI-O pulls with too.
//!
//! Storage (vfs: no mounts), run root, libpod's tmp dir, network configs, the
//! credential file and TMPDIR (where blobs are staged) all live under the
//! testbed's dir; each command runs in a mount namespace of its own with
//! overlays over /etc/containers (see [`Trust::mounts`]) and /var/lib.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::{
    image::Pulled,
    testbed::{Mount, Node, Testbed},
    tools,
    trust::Trust,
};

/// Where containers/image reads its configuration (and certs.d/).
pub const ETC_DIR: &str = "/etc/containers";

pub struct Podman {
    pub node: Node,
    pub dir: PathBuf,
    bin: PathBuf,
    trust: Trust,
    mounts: Vec<Mount>,
}

impl Podman {
    pub fn new(tb: &Testbed, node: &Node, trust: &Trust) -> anyhow::Result<Self> {
        let bin = tools::need("podman", "podman")?;
        let dir = tb.dir.join(format!("podman-n{}", node.index));
        for d in ["root", "run", "tmp", "networks", "no-certs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        // containers/image keeps root's blob info cache in /var/lib/containers/cache
        // whatever --root says: an overlay keeps it off the host.
        let mut mounts = trust.mounts(ETC_DIR, &dir)?;
        mounts.push(Mount::overlay("/var/lib", &dir)?);
        Ok(Self {
            node: node.clone(),
            dir,
            bin,
            trust: trust.clone(),
            mounts,
        })
    }

    /// `podman` with this node's storage, inside the node.
    pub fn podman(&self) -> anyhow::Result<Command> {
        let mut cmd = self.node.command_with(&self.bin, &self.mounts)?;
        tools::isolate_env(&mut cmd, self.trust.roots(), &self.dir.join("no-certs"));
        let d = |s: &str| self.dir.join(s);
        cmd.env("TMPDIR", d("tmp"))
            .arg("--root")
            .arg(d("root"))
            .arg("--runroot")
            .arg(d("run"))
            .arg("--tmpdir")
            .arg(d("tmp"))
            // (else the CNI backend writes its lock into /etc/cni/net.d)
            .arg("--network-config-dir")
            .arg(d("networks"))
            .args([
                "--storage-driver=vfs",
                "--cgroup-manager=cgroupfs",
                "--events-backend=none",
            ]);
        Ok(cmd)
    }

    fn podman_out(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tools::run(self.podman()?.args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn authfile(&self) -> String {
        self.dir.join("auth.json").display().to_string()
    }

    /// `podman login` into a credential file of its own.
    pub fn login(&self, registry: &str, user: &str, password: &str) -> anyhow::Result<()> {
        let authfile = self.authfile();
        self.podman_out(&[
            "login",
            "--authfile",
            &authfile,
            "--username",
            user,
            "--password",
            password,
            registry,
        ])
        .map(drop)
    }

    /// `podman pull REF` with the credential from [`Podman::login`].
    pub fn pull(&self, reference: &str) -> anyhow::Result<()> {
        let authfile = self.authfile();
        self.podman_out(&["pull", "--quiet", "--authfile", &authfile, reference])
            .map(drop)
    }

    /// What `podman image inspect` says about `reference`.
    pub fn inspect(&self, reference: &str) -> anyhow::Result<Pulled> {
        let out = self.podman_out(&[
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{.Digest}}",
            reference,
        ])?;
        let (id, digest) = out
            .split_once(' ')
            .with_context(|| format!("podman image inspect {reference}: {out:?}"))?;
        if id.len() != 64 || !digest.starts_with("sha256:") {
            bail!("podman image inspect {reference}: {out:?}");
        }
        Ok(Pulled {
            config_digest: format!("sha256:{id}"),
            manifest_digest: digest.to_string(),
        })
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Nothing runs between commands; vfs mounted nothing.
        let _ = fs::remove_dir_all(&self.dir);
    }
}
