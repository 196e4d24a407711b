//! End-to-end: `damselfly ca install --restart-runtime` and `ca uninstall`
//! on this (Debian) machine's own trust store, seen through overlays.
//!
//! Real parts: the damselfly binary run in a testbed node, the host's real
//! `update-ca-certificates` and its real bundle. The node sees `/etc` and
//! `/usr/local/share/ca-certificates` through overlays whose writes land in
//! the test's dir, so the machine's trust store never changes; the
//! distro's update hooks (Java's keystore, which would run dpkg triggers)
//! are hidden behind an empty directory. What is faked: systemd (a
//! containerd unit file in the overlay, `--unit-active-command true`) and
//! the restart itself (`--restart-command`, a script that succeeds or fails).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Output,
};

use damselfly_testbed::{Mount, Testbed, agent::damselfly_bin};

const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

struct Host {
    tb: Testbed,
    mounts: Vec<Mount>,
    /// Where the node's writes to /etc land.
    etc_upper: PathBuf,
    state: PathBuf,
    restarts: PathBuf,
}

impl Host {
    fn new() -> Self {
        let tb = Testbed::new(1).expect("testbed");
        let scratch = tb.dir.join("host");
        let etc = Mount::overlay("/etc", &scratch).unwrap();
        let local = Mount::overlay("/usr/local/share/ca-certificates", &scratch).unwrap();
        let Mount::Overlay { upper, .. } = &etc else {
            unreachable!()
        };
        let etc_upper = upper.clone();
        // containerd's unit, as its package installs it.
        let unit = etc_upper.join("systemd/system/containerd.service");
        fs::create_dir_all(unit.parent().unwrap()).unwrap();
        fs::write(&unit, "[Service]\nExecStart=/usr/bin/containerd\n").unwrap();
        let no_hooks = scratch.join("no-hooks");
        fs::create_dir_all(&no_hooks).unwrap();
        let mut mounts = vec![etc, local];
        if Path::new("/etc/ca-certificates/update.d").is_dir() {
            mounts.push(Mount::Bind {
                src: no_hooks,
                dst: "/etc/ca-certificates/update.d".into(),
            });
        }
        let restarts = tb.dir.join("restarts");
        for (name, exit) in [("restart-ok", 0), ("restart-fails", 1)] {
            let p = tb.dir.join(name);
            fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"$1\" >> {}\n[ {exit} = 0 ] || echo \"Job for $1.service failed.\" >&2\nexit {exit}\n",
                    restarts.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self {
            state: tb.dir.join("state"),
            tb,
            mounts,
            etc_upper,
            restarts,
        }
    }

    /// `damselfly ca --state-dir S ARGS --host-root /` in the node.
    fn ca(&self, args: &[&str]) -> Output {
        let mut cmd = self
            .tb
            .node(1)
            .command_with(damselfly_bin().unwrap(), &self.mounts)
            .unwrap();
        cmd.arg("ca").arg("--state-dir").arg(&self.state);
        cmd.args(args).args(["--host-root", "/"]);
        cmd.output().unwrap()
    }

    fn install(&self, restart: &str) -> Output {
        let restart = self.tb.dir.join(restart).display().to_string();
        self.ca(&[
            "install",
            "--restart-runtime",
            "--restart-spread=200ms",
            "--restart-command",
            &restart,
            "--unit-active-command",
            "true",
        ])
    }

    /// The node's view of the bundle (the machine's own, if the node never
    /// wrote it).
    fn bundle(&self) -> String {
        let written = self.etc_upper.join("ssl/certs/ca-certificates.crt");
        fs::read_to_string(if written.exists() {
            written
        } else {
            BUNDLE.into()
        })
        .unwrap()
    }

    fn restarts(&self) -> String {
        fs::read_to_string(&self.restarts).unwrap_or_default()
    }

    fn node_ca(&self) -> String {
        fs::read_to_string(self.state.join("ca/ca.crt")).unwrap()
    }
}

/// Does `bundle` hold the certificate `pem` (compared by base64 body)?
fn holds(bundle: &str, pem: &str) -> bool {
    let body = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut cur: Option<String> = None;
        for l in s.lines().map(str::trim) {
            match (l, &mut cur) {
                ("-----BEGIN CERTIFICATE-----", _) => cur = Some(String::new()),
                ("-----END CERTIFICATE-----", Some(b)) => out.push(std::mem::take(b)),
                (l, Some(b)) => b.push_str(l),
                _ => {}
            }
        }
        out
    };
    let ours = body(pem);
    assert_eq!(ours.len(), 1, "{pem}");
    body(bundle).contains(&ours[0])
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn ca_install_trusts_the_node_ca_in_the_real_bundle_and_fails_while_the_runtime_restart_fails() {
    let host = Host::new();
    let machine_bundle = fs::read_to_string(BUNDLE).unwrap();

    // The restart fails: the CA is trusted (the real bundle holds it), but
    // the command says it failed, which unit, and what to run by hand.
    let out = host.install("restart-fails");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("trust store: Debian/Ubuntu (os-release ID=debian")
            && said.contains("update-ca-certificates ran")
            && said.contains("containerd.service")
            && said.contains("systemctl restart containerd")
            && said.contains("Job for containerd.service failed"),
        "{said}"
    );
    let ca = host.node_ca();
    assert!(holds(&host.bundle(), &ca), "not in the node's bundle");
    assert_eq!(host.restarts(), "containerd\n");

    // Run again (as a restarted init container would): the CA is already
    // trusted, but the restart it is owed happens, and now succeeds.
    let out = host.install("restart-ok");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("already trusted")
            && said.contains("did not succeed")
            && said.contains("random below --restart-spread=0.2s")
            && said.contains("restarted containerd"),
        "{said}"
    );
    assert_eq!(host.restarts(), "containerd\ncontainerd\n");

    // Nothing owed any more: no restart, even one that would fail.
    let out = host.install("restart-fails");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not restarting the runtime"));
    assert_eq!(host.restarts(), "containerd\ncontainerd\n");

    // Uninstall: out of the real bundle again.
    let out = host.ca(&["uninstall"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("no longer in /etc/ssl/certs/ca-certificates.crt"),
        "{said}"
    );
    assert!(!holds(&host.bundle(), &ca));

    // The machine's own store never changed.
    assert_eq!(fs::read_to_string(BUNDLE).unwrap(), machine_bundle);
    assert!(!holds(&machine_bundle, &ca));
}

#[test]
fn ca_install_with_a_working_restart_trusts_the_ca_and_exits_zero() {
    let host = Host::new();
    let out = host.install("restart-ok");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("newly trusted") && said.contains("restarted containerd"),
        "{said}"
    );
    assert!(holds(&host.bundle(), &host.node_ca()));
    assert_eq!(host.restarts(), "containerd\n");
}
