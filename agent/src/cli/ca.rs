//! `damselfly ca show | install | uninstall | rotate`: the node CA from the
//! command line. `--state-dir` and `--registry` must match the agent's, or
//! the CA made here carries different constraints than the agent expects
//! (and the agent would replace it on its next start).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    ca::{
        CaOrigin, NodeCa,
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
    /// Print the node CA certificate (PEM) on stdout, creating the CA if there is none.
    Show,
    /// Add the node CA to the host's trust store, and to Docker's and
    /// containers/image's certs.d for every exact registry host.
    Install(InstallArgs),
    /// Remove the node CA from the host's trust store and from certs.d.
    Uninstall(HostArgs),
    /// Replace the node CA with a new key and certificate.
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
        CaCommand::Show => {
            let ca = load(&args.state_dir, &registries)?;
            print!("{}", ca.cert_pem());
            Ok(())
        }
        CaCommand::Install(install_args) => install(&args.state_dir, &registries, &install_args),
        CaCommand::Uninstall(host) => uninstall(&host),
        CaCommand::Rotate => {
            let ca = NodeCa::rotate(&args.state_dir, &registries)
                .with_context(|| format!("rotating the node CA in {}", args.state_dir.display()))?;
            println!("new node CA: {}", ca.cert_path().display());
            println!(
                "The old CA is gone: install the new one on this host again (damselfly ca install), \
                 restart the container runtime, and restart the agent."
            );
            Ok(())
        }
    }
}

fn load(state_dir: &Path, registries: &RegistryHosts) -> anyhow::Result<NodeCa> {
    let ca = NodeCa::load_or_create(state_dir, registries)
        .with_context(|| format!("loading the node CA from {}", state_dir.display()))?;
    if let CaOrigin::Replaced(why) = ca.origin() {
        eprintln!(
            "note: the node CA was re-created ({why}); any host that trusted the old one needs \
             `damselfly ca install` again"
        );
    }
    Ok(ca)
}

fn split_command(cmd: &str) -> Vec<String> {
    cmd.split_whitespace().map(str::to_string).collect()
}

fn install(state_dir: &Path, registries: &RegistryHosts, args: &InstallArgs) -> anyhow::Result<()> {
    let ca = load(state_dir, registries)?;
    let store = TrustStore::detect(&args.host.host_root)?;
    let update = args
        .host
        .update_command
        .as_deref()
        .map(split_command)
        .unwrap_or_else(|| store.update_command());
    let anchor = store.anchor_path();
    let trusted = store
        .install(ca.cert_pem(), &update)
        .with_context(|| format!("installing the node CA as {}", anchor.display()))?;
    let hosts = registries.exact();
    let change = CertsDirs::new(&args.host.host_root)
        .install(ca.cert_pem(), &hosts)
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

fn uninstall(args: &HostArgs) -> anyhow::Result<()> {
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
