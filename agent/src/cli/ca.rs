//! `damselfly ca show | install | uninstall | rotate`: the node CA from the
//! command line. `--state-dir` and `--registry` must match the agent's: the
//! registry list becomes the CA's name constraints.
//!
//! Only the agent (on start) and `rotate` replace the CA; `show` changes
//! nothing; `install` creates or replaces it only while no agent signs with
//! it (as the chart's init container does, just before the agent starts).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    ca::{
        CaOrigin, ForInstall, NodeCa,
        constraints::difference,
        permitted_dns_subtrees,
        trust::{self, CERTS_D, CertsDirs, CertsDirsChange, Installed, Removed, TrustStore},
    },
    registry::RegistryHosts,
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
    /// While an agent runs on --state-dir: its CA, unchanged (with a warning
    /// if --registry differs). Otherwise it first prepares the CA as the
    /// agent's next start will, as the chart's init container does: creates
    /// it if there is none, re-creates it if --registry changed its
    /// constraints (so give the agent's list).
    Install(InstallArgs),
    /// Remove the node CA from the host's trust store and from certs.d.
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
    /// Restart containerd on the host if the CA was not trusted before.
    #[arg(long)]
    pub restart_runtime: bool,
    /// Run this instead of `systemctl restart containerd` on the host. For tests.
    #[arg(long, env = "DAMSELFLY_CA_RESTART_COMMAND", hide = true)]
    pub restart_command: Option<String>,
}

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
    let hosts = registries.exact();
    let change = CertsDirs::new(&args.host.host_root)
        .install(cert_pem, &hosts)
        .with_context(|| certs_d_context("installing the node CA in", &args.host.host_root))?;
    let removed = match change.removed.len() {
        0 => String::new(),
        n => format!(", {n} removed for hosts no longer intercepted"),
    };
    println!(
        "node CA in certs.d for {} registries ({} files written, {} already there{removed}): {}",
        hosts.len(),
        change.written.len(),
        change.unchanged.len(),
        certs_d_dirs(&args.host.host_root)
    );
    match trusted {
        Installed::AlreadyTrusted => {
            println!(
                "node CA already trusted: {} (nothing to do)",
                anchor.display()
            );
            if args.restart_runtime {
                println!("not restarting containerd: it was trusted before");
            }
        }
        Installed::NewlyTrusted { replaced } => {
            println!(
                "node CA {}: {} ({} ran)",
                if replaced {
                    "newly trusted, replacing an older damselfly CA"
                } else {
                    "newly trusted"
                },
                anchor.display(),
                update.join(" ")
            );
            println!(
                "A container runtime that is already running has loaded its roots once at start: \
                 restart it once to trust the new CA (systemctl restart containerd). Docker \
                 Engine, Podman and CRI-O read certs.d at every pull and need no restart, \
                 except for registries certs.d cannot name: Docker Hub in dockerd, wildcards."
            );
            if args.restart_runtime {
                let restart = args
                    .restart_command
                    .as_deref()
                    .map(split_command)
                    .unwrap_or_else(|| {
                        trust::in_host(
                            &args.host.host_root,
                            &["systemctl", "restart", "containerd"],
                        )
                    });
                match trust::run(&restart) {
                    Ok(()) => println!("restarted containerd ({})", restart.join(" ")),
                    Err(e) => println!(
                        "could not restart containerd: {e}\n\
                         restart it by hand on the host: systemctl restart containerd"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// `ca uninstall`; `damselfly cleanup` runs it too.
pub fn uninstall(args: &HostArgs) -> anyhow::Result<()> {
    let store = TrustStore::detect(&args.host_root)?;
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
            "node CA removed: {} ({} ran); a running container runtime trusts it until restarted",
            anchor.display(),
            update.join(" ")
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
}
