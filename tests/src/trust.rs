//! How a runtime in a node trusts the origin's CA and its agent's node CA,
//! without ever touching this machine's trust store or /etc.
//!
//! The origin's issuer (the test "public" CA) always comes through
//! `SSL_CERT_FILE`, standing in for a host's system roots. The node CA comes
//! either through the same bundle, or the way `damselfly ca install` delivers
//! it to Docker Engine and Podman: a file in their per-registry `certs.d`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, ensure};

use crate::{
    agent::{Agent, damselfly_bin},
    pki::TestCa,
    testbed::{Mount, Testbed},
    tools,
};

/// How a runtime trusts the node CA.
#[derive(Clone, Debug)]
pub enum Trust {
    /// `SSL_CERT_FILE` holds the public CA and the node CA.
    Bundle(PathBuf),
    /// `SSL_CERT_FILE` holds only the public CA; the node CA comes from
    /// `<host_root>/<the runtime's certs.d>`, written by `damselfly ca install
    /// --host-root <host_root>` and bound over the runtime's real certs.d.
    CertsD { roots: PathBuf, host_root: PathBuf },
}

impl Trust {
    /// [`Trust::Bundle`] of `public_ca` and `agent`'s node CA.
    pub fn bundle(tb: &Testbed, agent: &Agent, public_ca: &TestCa) -> anyhow::Result<Self> {
        let node_ca = fs::read_to_string(agent.state_dir.join("ca/ca.crt"))?;
        let bundle = tb.dir.join(format!("bundle-n{}.pem", agent.node.index));
        fs::write(&bundle, format!("{}\n{node_ca}", public_ca.pem()))?;
        Ok(Self::Bundle(bundle))
    }

    /// [`Trust::CertsD`]: runs `damselfly ca install` for `agent` (its state
    /// dir and registries) on a stand-in host root; `roots` is the public CA.
    pub fn certs_d(tb: &Testbed, agent: &Agent, roots: &Path) -> anyhow::Result<Self> {
        let host_root = tb.dir.join(format!("host-n{}", agent.node.index));
        // A Debian host to `ca install` (it detects the distro by this file).
        fs::create_dir_all(host_root.join("etc"))?;
        fs::write(host_root.join("etc/debian_version"), "12\n")?;
        ca_cli(agent, "install", &host_root)?;
        Ok(Self::CertsD {
            roots: roots.to_path_buf(),
            host_root,
        })
    }

    /// What the runtime gets as `SSL_CERT_FILE`.
    pub fn roots(&self) -> &Path {
        match self {
            Self::Bundle(b) => b,
            Self::CertsD { roots, .. } => roots,
        }
    }

    /// The mounts for a runtime whose configuration lives in `etc_dir`
    /// (`/etc/docker`, `/etc/containers`; its certs.d is `etc_dir/certs.d`):
    /// an overlay over `etc_dir`, so whatever the runtime writes there lands
    /// in `scratch` (dockerd 20.10 creates `/etc/docker/key.json`), plus, for
    /// [`Trust::CertsD`], the stand-in host's certs.d bound over the real one.
    /// The overlay also gives the bind a target without creating one on the host.
    pub fn mounts(&self, etc_dir: &str, scratch: &Path) -> anyhow::Result<Vec<Mount>> {
        ensure!(
            Path::new(etc_dir).is_dir(),
            "{etc_dir} does not exist: its package creates it (`cargo xtask setup` installs it)"
        );
        let overlay = Mount::overlay(etc_dir, scratch)?;
        let Some(src) = self.certs_d_dir(etc_dir) else {
            return Ok(vec![overlay]);
        };
        if let Mount::Overlay { upper, .. } = &overlay {
            fs::create_dir_all(upper.join("certs.d"))?;
        }
        let dst = Path::new(etc_dir).join("certs.d");
        Ok(vec![overlay, Mount::Bind { src, dst }])
    }

    /// For [`Trust::CertsD`]: where `ca install` wrote the certs.d of a
    /// runtime configured in `etc_dir`, i.e. what it sees as `etc_dir/certs.d`.
    pub fn certs_d_dir(&self, etc_dir: &str) -> Option<PathBuf> {
        let Self::CertsD { host_root, .. } = self else {
            return None;
        };
        Some(
            host_root
                .join(etc_dir.trim_start_matches('/'))
                .join("certs.d"),
        )
    }

    /// For [`Trust::CertsD`]: `damselfly ca uninstall` on the stand-in host,
    /// then the paths of every certs.d file left under it (none, if
    /// uninstall removes all that install wrote).
    pub fn uninstall(&self, agent: &Agent) -> anyhow::Result<Vec<PathBuf>> {
        let Self::CertsD { host_root, .. } = self else {
            return Ok(Vec::new());
        };
        ca_cli(agent, "uninstall", host_root)?;
        let mut left = Vec::new();
        for dir in ["etc/docker", "etc/containers"] {
            collect_files(&host_root.join(dir), &mut left);
        }
        Ok(left)
    }
}

/// `damselfly ca --state-dir S --registry R... <action> --host-root H`, with
/// the trust-store update replaced by a stand-in (the stand-in host has no
/// update-ca-certificates): it makes the bundle of the local CAs, as the real
/// one would, since `ca install` checks that the bundle holds the CA.
fn ca_cli(agent: &Agent, action: &str, host_root: &Path) -> anyhow::Result<()> {
    let update = host_root.with_extension("update-ca-certificates");
    let root = host_root.display();
    fs::write(
        &update,
        format!(
            "#!/bin/sh\nmkdir -p {root}/etc/ssl/certs\ncat /dev/null {root}/usr/local/share/ca-certificates/*.crt \
             > {root}/etc/ssl/certs/ca-certificates.crt 2>/dev/null\nexit 0\n"
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&update, fs::Permissions::from_mode(0o755))?;
    }
    let mut cmd = Command::new(damselfly_bin()?);
    cmd.arg("ca").arg("--state-dir").arg(&agent.state_dir);
    for r in agent.registries() {
        cmd.args(["--registry", &r]);
    }
    cmd.arg(action)
        .arg("--host-root")
        .arg(host_root)
        .arg("--update-command")
        .arg(&update);
    tools::run(&mut cmd).with_context(|| format!("damselfly ca {action}"))?;
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
