//! `damselfly ca show | install | uninstall | rotate`: the node CA from the
//! command line. `--state-dir` and `--registry` must match the agent's: the
//! registry list becomes the CA's name constraints.
//!
//! Only the agent (on start) and `rotate` replace the CA; `show` changes
//! nothing; `install` creates or replaces it only while no agent signs with
//! it (as the chart's init container does, just before the agent starts).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    ca::{
        CERTS_D, CaOrigin, CertsDirs, CertsDirsChange, ForInstall, Installed, NodeCa,
        RUNTIME_UNITS, Removed, RuntimeUnit, Systemd, TrustStore, difference,
        permitted_dns_subtrees,
    },
    origin::RegistryHosts,
};

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Where the agent keeps its state; the CA lives in DIR/ca.
    #[arg(
        long,
        env = "DAMSELFLY_STATE_DIR",
        default_value = "/var/lib/damselfly",
        global = true
    )]
    pub state_dir: PathBuf,
    /// Extra registry host (repeatable; `*` = one label), as given to the agent.
    #[arg(long, env = "DAMSELFLY_REGISTRY", value_delimiter = ',', global = true)]
    pub registry: Vec<String>,
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the node CA certificate (PEM) on stdout; changes nothing.
    ///
    /// Fails if there is no CA yet (the agent creates it on its first start,
    /// or `rotate` does). Warns on stderr if --registry would change its
    /// constraints, or if the agent would replace it on its next start.
    Show,
    /// Add the node CA to the host's trust store, and to Docker's and
    /// containers/image's certs.d for every exact registry host; never
    /// changes a CA that a running agent signs with.
    ///
    /// The trust store is the host's distro's (from its os-release): Debian,
    /// Ubuntu, Alpine, RHEL, CentOS, Fedora, Rocky, Alma, Amazon Linux, SUSE,
    /// Flatcar. Bottlerocket, Talos and read-only roots are refused, with what
    /// to do instead. Fails unless the distro's CA bundle holds the CA after
    /// its update command (the CA file is then taken out again).
    ///
    /// While an agent runs on --state-dir: its CA, unchanged (with a warning
    /// if --registry differs). Otherwise it first prepares the CA as the
    /// agent's next start will, as the chart's init container does: creates
    /// it if there is none, re-creates it if --registry changed its
    /// constraints (so give the agent's list).
    Install(InstallArgs),
    /// Remove the node CA from the host's trust store and from certs.d.
    ///
    /// Fails unless the distro's CA bundle no longer holds it afterwards (the
    /// CA file is then put back, so that running it again retries).
    Uninstall(HostArgs),
    /// Replace the node CA with a new key and certificate; a running agent
    /// switches to it within seconds.
    ///
    /// While an agent runs, --registry must be its list: the agent cannot
    /// switch to a CA with other constraints.
    Rotate,
}

#[derive(Debug, Args)]
pub struct HostArgs {
    /// The host's / (the DaemonSet mounts it at /host).
    #[arg(long, env = "DAMSELFLY_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// Run this instead of the distro's trust-store update (split on spaces,
    /// not chrooted). For tests.
    #[arg(long, env = "DAMSELFLY_CA_UPDATE_COMMAND", hide = true)]
    pub update_command: Option<String>,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Restart the host's container runtime when the CA was not trusted
    /// before (or an earlier restart failed): every one of the systemd units
    /// containerd, k3s, k3s-agent, rke2-server, rke2-agent and crio that is
    /// installed and active (k3s and RKE2 restart their kubelet with it).
    /// Fails, before changing anything, if none is; fails if a restart fails.
    #[arg(long)]
    pub restart_runtime: bool,
    /// Before restarting the runtime, wait a random time below DURATION
    /// (e.g. 60s, 5m; 0 = no wait; at most 1h), so that the nodes of a
    /// cluster installing at once do not restart their runtimes together.
    #[arg(long, env = "DAMSELFLY_CA_RESTART_SPREAD", value_name = "DURATION",
          default_value = "0", value_parser = parse_spread)]
    pub restart_spread: Duration,
    /// Run this with the unit name appended instead of `systemctl restart
    /// UNIT` on the host (split on spaces, not chrooted). For tests.
    #[arg(long, env = "DAMSELFLY_CA_RESTART_COMMAND", hide = true)]
    pub restart_command: Option<String>,
    /// Run this with the unit name appended instead of `systemctl is-active
    /// --quiet UNIT` on the host; exit 0 = active (split on spaces, not
    /// chrooted). For tests.
    #[arg(long, env = "DAMSELFLY_CA_UNIT_ACTIVE_COMMAND", hide = true)]
    pub unit_active_command: Option<String>,
}

/// The longest `--restart-spread`: past it, an init container waits so long
/// that it looks hung.
pub const MAX_RESTART_SPREAD: Duration = Duration::from_secs(3600);

/// `0`, or a whole number with a unit: `500ms`, `60s`, `5m`, `1h`; at most
/// [`MAX_RESTART_SPREAD`].
pub fn parse_spread(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 60s, 5m or 0"))?;
    let d = match unit {
        "" if n == 0 => Duration::ZERO,
        "" => return Err(format!("{s:?}: give a unit (ms, s, m, h), e.g. {n}s")),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h)")),
    };
    if d > MAX_RESTART_SPREAD {
        return Err(format!(
            "{s:?}: at most {}s (1h): a longer wait holds the agent back for too long",
            MAX_RESTART_SPREAD.as_secs()
        ));
    }
    Ok(d)
}

/// A uniformly random time in `[0, spread)`, to the millisecond.
pub fn random_below(spread: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    let ms = spread.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    // A fresh RandomState is randomly keyed by the OS: no RNG crate for one number.
    let r = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    Duration::from_millis(r % ms)
}

/// Left in the state dir while a runtime restart owed to a newly trusted CA
/// has not succeeded: the next `ca install --restart-runtime` finds the CA
/// already trusted, and must restart anyway.
const RESTART_PENDING: &str = "runtime-restart-pending";

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    let registries = RegistryHosts::new(&args.registry)?;
    match args.command {
        CaCommand::Show => show(&args.state_dir, &registries),
        CaCommand::Install(install_args) => install(&args.state_dir, &registries, &install_args),
        CaCommand::Uninstall(host) => uninstall(&host),
        CaCommand::Rotate => {
            let ca = NodeCa::rotate(&args.state_dir, &registries)
                .with_context(|| format!("rotating the node CA in {}", args.state_dir.display()))?;
            println!("new node CA: {}", ca.cert_path().display());
            println!(
                "The old CA is gone. A running agent signs with the new one within seconds (no \
                 restart); until this host trusts it, pulls through the agent fail TLS: install it \
                 (damselfly ca install) and restart the container runtime."
            );
            Ok(())
        }
    }
}

fn show(state_dir: &Path, registries: &RegistryHosts) -> anyhow::Result<()> {
    let stored = NodeCa::stored(state_dir)?;
    print!("{}", stored.cert_pem);
    if let Some(problem) = &stored.problem {
        eprintln!(
            "warning: the agent will replace this CA when it next starts ({problem}); install it \
             again after that"
        );
    }
    let given = permitted_dns_subtrees(registries.patterns())?;
    if given != stored.permitted {
        eprintln!(
            "warning: the registry list given here would change this CA's constraints ({}); \
             an agent started with it would replace the CA. Give the agent's --registry list.",
            difference(&stored.permitted, &given)
        );
    }
    Ok(())
}
fn split_command(cmd: &str) -> Vec<String> {
    cmd.split_whitespace().map(str::to_string).collect()
}

fn install(state_dir: &Path, registries: &RegistryHosts, args: &InstallArgs) -> anyhow::Result<()> {
    // First, so that a host we cannot install into leaves the CA alone.
    let store = TrustStore::detect(&args.host.host_root)?;
    println!(
        "trust store: {} ({})",
        store.family().name(),
        store.recognised_by()
    );
    // Before anything changes too: a host with nothing to restart fails the
    // same way every time, not once after the CA went in.
    let runtimes = if args.restart_runtime {
        let systemd = Systemd::new(
            &args.host.host_root,
            args.unit_active_command.as_deref().map(split_command),
            args.restart_command.as_deref().map(split_command),
        );
        let units = systemd.active_runtimes()?;
        println!("container runtime units active: {}", unit_names(&units));
        Some((systemd, units))
    } else {
        None
    };
    let ca = NodeCa::for_install(state_dir, registries)
        .with_context(|| format!("the node CA in {}", state_dir.display()))?;
    let cert_pem = match &ca {
        ForInstall::Prepared(ca) => {
            if let CaOrigin::Replaced(why) = ca.origin() {
                eprintln!(
                    "note: the node CA was re-created ({why}), as the agent would on its next \
                     start; hosts that trusted the old one need `damselfly ca install` again"
                );
            }
            ca.cert_pem()
        }
        ForInstall::InUse(stored) => {
            let given = permitted_dns_subtrees(registries.patterns())?;
            if given != stored.permitted {
                eprintln!(
                    "warning: installing the CA the running agent signs with, unchanged; the \
                     registry list given here would change its constraints ({}): give the \
                     agent's --registry list",
                    difference(&stored.permitted, &given)
                );
            }
            &stored.cert_pem
        }
    };
    let update = args
        .host
        .update_command
        .as_deref()
        .map(split_command)
        .unwrap_or_else(|| store.update_command());
    let anchor = store.anchor_path();
    let trusted = store
        .install(cert_pem, &update)
        .with_context(|| format!("installing the node CA as {}", anchor.display()))?;
    match trusted {
        Installed::AlreadyTrusted => println!(
            "node CA already trusted: {} and in {} (nothing to do)",
            anchor.display(),
            store.bundle_path().display()
        ),
        Installed::NewlyTrusted { replaced } => println!(
            "node CA {}: {} ({} ran; the CA is in {})",
            if replaced {
                "newly trusted, replacing an older damselfly CA"
            } else {
                "newly trusted"
            },
            anchor.display(),
            update.join(" "),
            store.bundle_path().display()
        ),
    }
    let hosts = registries.exact();
    let change = CertsDirs::new(&args.host.host_root)
        .install(cert_pem, &hosts)
        .with_context(|| certs_d_context("installing the node CA in", &args.host.host_root))?;
    let removed = match change.removed.len() {
        0 => String::new(),
        n => format!(", {n} removed for hosts no longer intercepted"),
    };
    println!(
        "node CA in certs.d for {} registries ({} files written, {} already there{removed}): {} \
         (Docker Engine, Podman and CRI-O read these at every pull: no restart for them)",
        hosts.len(),
        change.written.len(),
        change.unchanged.len(),
        certs_d_dirs(&args.host.host_root)
    );
    let pending = state_dir.join(RESTART_PENDING);
    let newly = matches!(trusted, Installed::NewlyTrusted { .. });
    match runtimes {
        None if newly => println!(
            "A container runtime that is already running loaded its roots once at start: restart \
             it once to trust the new CA (systemctl restart <unit>, for the first of {} that runs \
             here), or give --restart-runtime.",
            RUNTIME_UNITS
                .iter()
                .map(|u| u.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => {}
        Some(_) if !newly && !pending.exists() => {
            println!("not restarting the runtime: it trusted the CA before")
        }
        Some((systemd, units)) => {
            if newly {
                std::fs::write(
                    &pending,
                    "the node CA was newly trusted; restarting the runtime\n",
                )
                .with_context(|| format!("writing {}", pending.display()))?;
            } else {
                println!(
                    "an earlier runtime restart for this CA did not succeed ({} is there): \
                     restarting now",
                    pending.display()
                );
            }
            restart_runtimes(&systemd, &units, args.restart_spread)?;
            std::fs::remove_file(&pending)
                .with_context(|| format!("removing {}", pending.display()))?;
        }
    }
    Ok(())
}

/// Wait the spread, then restart every unit; an error naming each that failed.
fn restart_runtimes(
    systemd: &Systemd,
    units: &[RuntimeUnit],
    spread: Duration,
) -> anyhow::Result<()> {
    if !spread.is_zero() {
        let wait = random_below(spread);
        println!(
            "waiting {:.1}s before restarting (random below --restart-spread={}s, so that nodes \
             installing together do not restart their runtimes together)",
            wait.as_secs_f64(),
            spread.as_secs_f64()
        );
        std::thread::sleep(wait);
    }
    let mut failed = Vec::new();
    for unit in units {
        if !unit.note.is_empty() {
            println!("restarting {}: {}", unit.name, unit.note);
        }
        match systemd.restart(unit) {
            Ok(()) => println!(
                "restarted {} ({})",
                unit.name,
                systemd.restart_command(unit).join(" ")
            ),
            Err(e) => {
                eprintln!("error: {e}");
                failed.push(unit.name);
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "the node CA is trusted, but the runtime restart failed for {}: until restarted, \
             it does not trust the CA; run on the host: {}",
            failed.join(", "),
            failed
                .iter()
                .map(|u| format!("systemctl restart {u}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

fn unit_names(units: &[RuntimeUnit]) -> String {
    units
        .iter()
        .map(|u| format!("{}.service", u.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ca uninstall`; `damselfly cleanup` runs it too.
pub fn uninstall(args: &HostArgs) -> anyhow::Result<()> {
    let store = TrustStore::detect(&args.host_root)?;
    println!(
        "trust store: {} ({})",
        store.family().name(),
        store.recognised_by()
    );
    let update = args
        .update_command
        .as_deref()
        .map(split_command)
        .unwrap_or_else(|| store.update_command());
    let anchor = store.anchor_path();
    let CertsDirsChange { removed, .. } = CertsDirs::new(&args.host_root)
        .uninstall()
        .with_context(|| certs_d_context("removing the node CA from", &args.host_root))?;
    println!(
        "node CA removed from certs.d ({} files): {}",
        removed.len(),
        certs_d_dirs(&args.host_root)
    );
    match store
        .uninstall(&update)
        .with_context(|| format!("removing the node CA {}", anchor.display()))?
    {
        Removed::Removed => println!(
            "node CA removed: {} ({} ran; the CA is no longer in {}); a running container \
             runtime trusts it until restarted",
            anchor.display(),
            update.join(" "),
            store.bundle_path().display()
        ),
        Removed::NotInstalled => println!(
            "node CA not installed: {} (nothing to do)",
            anchor.display()
        ),
    }
    Ok(())
}

fn certs_d_dirs(root: &Path) -> String {
    CERTS_D
        .iter()
        .map(|d| root.join(d).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn certs_d_context(action: &str, root: &Path) -> String {
    format!("{action} {}", certs_d_dirs(root))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> CaArgs {
        let Command::Ca(a) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        a
    }

    #[test]
    fn common_flags_go_before_or_after_the_subcommand() {
        let a = parse(&["damselfly", "ca", "show", "--state-dir", "/tmp/s"]);
        assert_eq!(a.state_dir, PathBuf::from("/tmp/s"));
        assert!(matches!(a.command, CaCommand::Show));
        let a = parse(&["damselfly", "ca", "--registry", "a.test", "show"]);
        assert_eq!(a.registry, ["a.test"]);
        // (clap does not merge a global flag given on both levels: the last level wins.)
        let a = parse(&[
            "damselfly",
            "ca",
            "install",
            "--registry",
            "a.test",
            "--registry",
            "b.test,c.test",
            "--restart-runtime",
        ]);
        assert_eq!(a.registry, ["a.test", "b.test", "c.test"]);
        let CaCommand::Install(i) = a.command else {
            panic!()
        };
        assert!(i.restart_runtime);
        assert_eq!(i.host.host_root, PathBuf::from("/"));
        let a = parse(&["damselfly", "ca", "uninstall", "--host-root", "/host"]);
        let CaCommand::Uninstall(h) = a.command else {
            panic!()
        };
        assert_eq!(h.host_root, PathBuf::from("/host"));
    }

    #[test]
    fn restart_spread_takes_a_duration_up_to_an_hour() {
        for (given, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("60s", Duration::from_secs(60)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("3600s", Duration::from_secs(3600)),
        ] {
            assert_eq!(parse_spread(given), Ok(want), "{given}");
        }
        for (bad, says) in [
            ("60", "give a unit"),
            ("2h", "at most"),
            ("3601s", "at most"),
            ("99999999999999999999h", "expected a duration"),
            ("61m", "at most"),
            ("1.5s", "unknown unit"),
            ("-1s", "expected a duration"),
            ("", "expected a duration"),
            ("10d", "unknown unit"),
        ] {
            let e = parse_spread(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let a = parse(&["damselfly", "ca", "install", "--restart-spread=60s"]);
        let CaCommand::Install(i) = a.command else {
            panic!()
        };
        assert_eq!(i.restart_spread, Duration::from_secs(60));
        let a = parse(&["damselfly", "ca", "install"]);
        let CaCommand::Install(i) = a.command else {
            panic!()
        };
        assert_eq!(i.restart_spread, Duration::ZERO);
        assert!(
            Cli::try_parse_from(["damselfly", "ca", "install", "--restart-spread", "2h"]).is_err()
        );
    }

    #[test]
    fn the_wait_is_below_the_spread_and_varies() {
        assert_eq!(random_below(Duration::ZERO), Duration::ZERO);
        let spread = Duration::from_secs(60);
        let waits: std::collections::HashSet<_> = (0..50).map(|_| random_below(spread)).collect();
        assert!(waits.iter().all(|w| *w < spread), "{waits:?}");
        assert!(waits.len() > 40, "hardly random: {waits:?}");
        assert!(random_below(Duration::from_millis(1)).is_zero());
    }

    /// A Debian host root with `units` installed, a fake update that builds
    /// the bundle from the anchor, and fake systemctl stand-ins.
    struct Host {
        dir: crate::testing::TempDir,
    }

    impl Host {
        fn new(units: &[&str]) -> Self {
            let dir = crate::testing::TempDir::new("cli-ca-host");
            let root = dir.join("root");
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
            for u in units {
                let f = root.join(format!("lib/systemd/system/{u}.service"));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, "").unwrap();
            }
            let script = |name: &str, body: &str| {
                use std::os::unix::fs::PermissionsExt as _;
                let p = dir.join(name);
                std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            };
            crate::testing::stand_in_update_ca_certificates(&root, &dir.join("update"));
            let log = dir.join("restarts");
            script("restart-ok", &format!("echo \"$1\" >> {}", log.display()));
            script(
                "restart-fails",
                &format!(
                    "echo \"$1\" >> {}; echo 'Job for $1 failed' >&2; exit 1",
                    log.display()
                ),
            );
            script("active", "true");
            Self { dir }
        }

        fn install(&self, restart: &str, extra: &[&str]) -> anyhow::Result<()> {
            let d = |n: &str| self.dir.join(n).display().to_string();
            let mut args = vec![
                "damselfly".to_string(),
                "ca".into(),
                "--state-dir".into(),
                d("state"),
                "install".into(),
                "--host-root".into(),
                d("root"),
                "--update-command".into(),
                d("update"),
                "--unit-active-command".into(),
                d("active"),
                "--restart-command".into(),
                d(restart),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let Command::Ca(a) = Cli::try_parse_from(args).unwrap().command else {
                panic!()
            };
            run(a)
        }

        fn restarts(&self) -> String {
            std::fs::read_to_string(self.dir.join("restarts")).unwrap_or_default()
        }

        fn anchor(&self) -> PathBuf {
            self.dir
                .join("root/usr/local/share/ca-certificates/damselfly-node-ca.crt")
        }
    }

    #[test]
    fn install_fails_loudly_when_the_runtime_restart_fails_and_retries_it_next_time() {
        let host = Host::new(&["containerd", "k3s"]);
        let e = host
            .install("restart-fails", &["--restart-runtime"])
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("restart failed for containerd, k3s")
                && msg.contains("systemctl restart containerd; systemctl restart k3s"),
            "{msg}"
        );
        assert!(host.anchor().exists(), "the CA itself is trusted");
        assert_eq!(host.restarts(), "containerd\nk3s\n");
        // The CA is trusted now, but the runtime was never restarted: the
        // next run restarts it (and fails again the same way) ...
        assert!(
            host.install("restart-fails", &["--restart-runtime"])
                .is_err()
        );
        // ... until a restart succeeds; then nothing more is owed.
        host.install("restart-ok", &["--restart-runtime", "--restart-spread=1ms"])
            .unwrap();
        assert_eq!(host.restarts().lines().count(), 6);
        host.install("restart-fails", &["--restart-runtime"])
            .unwrap();
        assert_eq!(host.restarts().lines().count(), 6, "restarted again");
    }

    #[test]
    fn install_restarts_only_when_the_ca_is_new() {
        let host = Host::new(&["crio"]);
        host.install("restart-ok", &["--restart-runtime"]).unwrap();
        assert_eq!(host.restarts(), "crio\n");
        host.install("restart-ok", &["--restart-runtime"]).unwrap();
        assert_eq!(host.restarts(), "crio\n");
        // Without --restart-runtime nothing is probed or restarted.
        let host = Host::new(&[]);
        host.install("restart-fails", &[]).unwrap();
        assert!(host.anchor().exists());
        assert_eq!(host.restarts(), "");
    }

    #[test]
    fn install_with_nothing_to_restart_fails_before_changing_anything() {
        let host = Host::new(&["docker"]);
        let e = format!(
            "{:#}",
            host.install("restart-ok", &["--restart-runtime"])
                .unwrap_err()
        );
        assert!(
            e.contains("no container runtime to restart") && e.contains("containerd.service"),
            "{e}"
        );
        assert!(!host.anchor().exists());
        assert!(!host.dir.join("state/ca").exists(), "the CA was created");
    }

    #[test]
    fn install_fails_when_the_update_leaves_the_ca_out_of_the_bundle() {
        let host = Host::new(&["containerd"]);
        std::fs::write(host.dir.join("update"), "#!/bin/sh\ntrue\n").unwrap();
        let e = format!(
            "{:#}",
            host.install("restart-ok", &["--restart-runtime"])
                .unwrap_err()
        );
        assert!(
            e.contains("the CA is not in") && e.contains("ca-certificates.crt after"),
            "{e}"
        );
        assert!(!host.anchor().exists());
        assert_eq!(host.restarts(), "", "restarted for a CA it does not trust");
    }
}
