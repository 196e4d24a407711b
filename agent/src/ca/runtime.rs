//! The container runtimes that need a restart to trust a new root, found
//! among the host's systemd units.
//!
//! containerd (and so k3s and RKE2, which embed it) and CRI-O load the
//! system roots once, at start. Docker Engine and Podman need no restart for
//! the node CA: they read the certs.d files `ca install` writes at every pull.

use std::path::{Path, PathBuf};

use super::trust::{self, TrustError};

/// A runtime's systemd unit, and what restarting it does besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeUnit {
    /// The unit name, without `.service`.
    pub name: &'static str,
    /// What else a restart restarts, for the output.
    pub note: &'static str,
}

pub const RUNTIME_UNITS: &[RuntimeUnit] = &[
    RuntimeUnit {
        name: "containerd",
        note: "",
    },
    RuntimeUnit {
        name: "k3s",
        note: "k3s embeds containerd: restarting it restarts this node's kubelet too",
    },
    RuntimeUnit {
        name: "k3s-agent",
        note: "k3s embeds containerd: restarting it restarts this node's kubelet too",
    },
    RuntimeUnit {
        name: "rke2-server",
        note: "RKE2 runs containerd and the kubelet: restarting it restarts this node's kubelet too",
    },
    RuntimeUnit {
        name: "rke2-agent",
        note: "RKE2 runs containerd and the kubelet: restarting it restarts this node's kubelet too",
    },
    RuntimeUnit {
        name: "crio",
        note: "",
    },
];

/// Where unit files are, relative to the host root: the admin's, the
/// distro's (merged /usr, and not), and the local one RKE2's tarball
/// install uses.
pub(super) const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
    "usr/local/lib/systemd/system",
];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "no container runtime to restart: no unit file for any of {units} under {dirs} of {root}{inactive}; \
         restart the node's runtime by hand (systemctl restart <unit>)",
        units = unit_list(),
        dirs = UNIT_DIRS.join(", "),
        inactive = inactive_note(.inactive),
    )]
    NoneFound {
        root: PathBuf,
        inactive: Vec<String>,
    },
    #[error("could not ask systemd whether {unit} is active: {source}")]
    Probe {
        unit: &'static str,
        source: TrustError,
    },
    #[error(
        "could not restart {unit}: {source}; the node CA is trusted but {unit} still runs with \
         the old roots: restart it by hand on the host: systemctl restart {unit}"
    )]
    Restart {
        unit: &'static str,
        source: TrustError,
    },
}

fn unit_list() -> String {
    RUNTIME_UNITS
        .iter()
        .map(|u| format!("{}.service", u.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn inactive_note(inactive: &[String]) -> String {
    if inactive.is_empty() {
        String::new()
    } else {
        format!(
            " that is active (present but not active: {})",
            inactive.join(", ")
        )
    }
}

/// How units are probed and restarted: the host's systemctl, or test stand-ins.
#[derive(Debug, Clone)]
pub struct Systemd {
    root: PathBuf,
    /// `argv + [unit]` exits 0 when the unit is active.
    is_active: Vec<String>,
    /// `argv + [unit]` restarts it.
    restart: Vec<String>,
}

impl Systemd {
    /// `systemctl is-active` / `systemctl restart`, chrooted into `root` as
    /// [`trust::in_host`] does; `is_active` / `restart` replace them (run
    /// as given, with the unit appended).
    pub fn new(root: &Path, is_active: Option<Vec<String>>, restart: Option<Vec<String>>) -> Self {
        Self {
            root: root.to_path_buf(),
            is_active: is_active
                .unwrap_or_else(|| trust::in_host(root, &["systemctl", "is-active", "--quiet"])),
            restart: restart.unwrap_or_else(|| trust::in_host(root, &["systemctl", "restart"])),
        }
    }

    /// The runtime units installed and active on the host; an error if none is.
    pub fn active_runtimes(&self) -> Result<Vec<RuntimeUnit>, RuntimeError> {
        let mut active = Vec::new();
        let mut inactive = Vec::new();
        for unit in RUNTIME_UNITS {
            if !self.installed(unit.name) {
                continue;
            }
            if self.is_active(unit.name)? {
                active.push(*unit);
            } else {
                inactive.push(format!("{}.service", unit.name));
            }
        }
        if active.is_empty() {
            return Err(RuntimeError::NoneFound {
                root: self.root.clone(),
                inactive,
            });
        }
        Ok(active)
    }

    fn installed(&self, name: &str) -> bool {
        let file = format!("{name}.service");
        UNIT_DIRS
            .iter()
            .any(|d| self.root.join(d).join(&file).exists())
    }

    /// Active: the probe exits 0. Inactive, failed or unknown: it exits
    /// non-zero. Not being able to run it at all is an error.
    fn is_active(&self, name: &'static str) -> Result<bool, RuntimeError> {
        trust::succeeds(&with_unit(&self.is_active, name))
            .map_err(|source| RuntimeError::Probe { unit: name, source })
    }

    /// The command that restarts `unit`, for the output.
    pub fn restart_command(&self, unit: &RuntimeUnit) -> Vec<String> {
        with_unit(&self.restart, unit.name)
    }

    pub fn restart(&self, unit: &RuntimeUnit) -> Result<(), RuntimeError> {
        trust::run(&self.restart_command(unit)).map_err(|source| RuntimeError::Restart {
            unit: unit.name,
            source,
        })
    }
}

fn with_unit(argv: &[String], unit: &str) -> Vec<String> {
    let mut v = argv.to_vec();
    v.push(unit.to_string());
    v
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::testing::TempDir;

    fn unit_file(root: &TempDir, dir: &str, name: &str) {
        let p = root.join(dir).join(format!("{name}.service"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "[Service]\n").unwrap();
    }

    /// A probe that says "active" for exactly `active` (the unit is `$0`).
    fn active_among(active: &[&str]) -> Vec<String> {
        let pattern = if active.is_empty() {
            "-".to_string()
        } else {
            active.join("|")
        };
        vec![
            "sh".into(),
            "-c".into(),
            format!("case \"$0\" in {pattern}) exit 0;; esac; exit 3"),
        ]
    }

    /// A restart that appends the unit to `log`, and fails for `failing`.
    fn restart_logging(log: &Path, failing: &str) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo \"$0\" >> '{}'; [ \"$0\" != '{failing}' ] || {{ echo 'Job failed' >&2; exit 1; }}",
                log.display()
            ),
        ]
    }

    fn names(units: &[RuntimeUnit]) -> Vec<&str> {
        units.iter().map(|u| u.name).collect()
    }

    #[test]
    fn the_runtimes_restarted_are_those_installed_and_active() {
        let root = TempDir::new("runtime-units");
        unit_file(&root, "usr/lib/systemd/system", "containerd");
        unit_file(&root, "etc/systemd/system", "k3s");
        unit_file(&root, "lib/systemd/system", "crio");
        unit_file(&root, "usr/local/lib/systemd/system", "rke2-agent");
        // Docker's unit is no runtime to restart: it reads certs.d.
        unit_file(&root, "lib/systemd/system", "docker");
        let log = root.join("restarts");
        let s = Systemd::new(
            root.path(),
            Some(active_among(&["containerd", "k3s", "rke2-agent", "docker"])),
            Some(restart_logging(&log, "none")),
        );
        let active = s.active_runtimes().unwrap();
        assert_eq!(names(&active), ["containerd", "k3s", "rke2-agent"]);
        assert!(active[1].note.contains("kubelet"), "{:?}", active[1]);
        for unit in &active {
            s.restart(unit).unwrap();
        }
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "containerd\nk3s\nrke2-agent\n"
        );
    }

    #[test]
    fn no_active_runtime_is_an_error_naming_what_was_looked_for() {
        let root = TempDir::new("runtime-none");
        let s = Systemd::new(root.path(), Some(active_among(&["containerd"])), None);
        let e = s.active_runtimes().unwrap_err().to_string();
        for unit in RUNTIME_UNITS {
            assert!(e.contains(&format!("{}.service", unit.name)), "{e}");
        }
        for dir in UNIT_DIRS {
            assert!(e.contains(dir), "{dir} not in: {e}");
        }
        // Installed but stopped: said so.
        unit_file(&root, "lib/systemd/system", "crio");
        let e = s.active_runtimes().unwrap_err().to_string();
        assert!(e.contains("present but not active: crio.service"), "{e}");
    }

    #[test]
    fn a_probe_that_cannot_run_is_an_error_not_an_inactive_unit() {
        let root = TempDir::new("runtime-probe");
        unit_file(&root, "etc/systemd/system", "containerd");
        let s = Systemd::new(
            root.path(),
            Some(vec!["/nonexistent/systemctl".into()]),
            None,
        );
        let e = s.active_runtimes().unwrap_err();
        assert!(
            matches!(
                e,
                RuntimeError::Probe {
                    unit: "containerd",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_failed_restart_names_the_unit_and_the_command_to_run_by_hand() {
        let root = TempDir::new("runtime-restart-fails");
        unit_file(&root, "etc/systemd/system", "k3s-agent");
        let log = root.join("restarts");
        let s = Systemd::new(
            root.path(),
            Some(active_among(&["k3s-agent"])),
            Some(restart_logging(&log, "k3s-agent")),
        );
        let units = s.active_runtimes().unwrap();
        let e = s.restart(&units[0]).unwrap_err().to_string();
        assert!(
            e.contains("could not restart k3s-agent")
                && e.contains("Job failed")
                && e.contains("systemctl restart k3s-agent"),
            "{e}"
        );
    }

    #[test]
    fn the_real_commands_are_systemctl_in_the_host() {
        let s = Systemd::new(Path::new("/host"), None, None);
        let unit = RUNTIME_UNITS[0];
        assert_eq!(
            s.restart_command(&unit),
            ["chroot", "/host", "systemctl", "restart", "containerd"]
        );
        assert_eq!(
            with_unit(&s.is_active, unit.name),
            [
                "chroot",
                "/host",
                "systemctl",
                "is-active",
                "--quiet",
                "containerd"
            ]
        );
    }
}
