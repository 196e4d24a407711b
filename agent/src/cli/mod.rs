//! The command line: the product's interface. Flags also read `DAMSELFLY_*`.

pub mod advertise;
pub mod ca;
pub mod cleanup;
pub mod get;
pub mod preheat;
pub mod size;
pub mod status;
pub mod tracker;
pub mod transfer;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::pki::{ClusterFiles, ClusterPki, Part, Role};

#[derive(Debug, Parser)]
#[command(
    name = "damselfly",
    version,
    about = "Peer-to-peer container image pulls, no runtime config change"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: steer registry connections and carry them on.
    Agent(Box<AgentArgs>),
    /// Show a running agent: tracker, peers, cache, node CA trust, recent errors, steering.
    Status(StatusArgs),
    /// The node CA: show it, install it into the host trust store, remove it, rotate it.
    Ca(ca::CaArgs),
    /// Run the tracker: which peer holds which pieces of which blob (gRPC).
    Tracker(tracker::TrackerArgs),
    /// Download a blob (URL) or an image (to an OCI layout) through the local agent.
    Get(get::GetArgs),
    /// Have seed agents fetch an image's blobs before a rollout.
    Preheat(preheat::PreheatArgs),
    /// On a node after `helm uninstall`: remove the node CA from the host,
    /// the state dir and leftover pins, then serve /healthz (200 when clean).
    Cleanup(cleanup::CleanupArgs),
    /// Wait until every `damselfly cleanup` behind a Service answers 200.
    CleanupWait(cleanup::CleanupWaitArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of this agent; its maps are pinned under /sys/fs/bpf/damselfly/NAME.
    #[arg(long, env = "DAMSELFLY_INSTANCE", default_value = "default", value_parser = parse_instance)]
    pub instance: String,
    /// cgroup v2 directory to attach to [default: the cgroup2 mount in /proc/mounts].
    #[arg(long, env = "DAMSELFLY_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Destination TCP ports to steer.
    #[arg(
        long,
        env = "DAMSELFLY_STEER_PORTS",
        value_delimiter = ',',
        default_value = "443,80"
    )]
    pub steer_ports: Vec<u16>,
    /// Process names (comm) whose connections are steered.
    #[arg(
        long,
        env = "DAMSELFLY_STEER_COMM",
        value_delimiter = ',',
        default_value = "containerd,dockerd,crio,podman,skopeo,ctr,nerdctl"
    )]
    pub steer_comm: Vec<String>,
    /// Destinations never steered (CIDRs, e.g. the cluster's service range). Loopback never is.
    #[arg(long, env = "DAMSELFLY_STEER_EXCLUDE", value_delimiter = ',')]
    pub steer_exclude: Vec<String>,
    /// Steering listeners, at most one IPv4 and one IPv6.
    #[arg(
        long,
        env = "DAMSELFLY_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:7403,[::1]:7403"
    )]
    pub listen: Vec<SocketAddr>,
    /// Admin HTTP: /healthz, /metrics, /status.
    #[arg(long, env = "DAMSELFLY_ADMIN", default_value = "127.0.0.1:7402")]
    pub admin: SocketAddr,
    /// Where the agent keeps its state: the node CA and the blob cache.
    #[arg(
        long,
        env = "DAMSELFLY_STATE_DIR",
        default_value = "/var/lib/damselfly"
    )]
    pub state_dir: PathBuf,
    /// More registry hosts to intercept, besides the public ones (wildcards: *.example.com).
    #[arg(long = "registry", env = "DAMSELFLY_REGISTRY", value_delimiter = ',')]
    pub registries: Vec<String>,
    /// Extra CA certificates (PEM) to trust for origins, besides the system roots.
    #[arg(long, env = "DAMSELFLY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Blob cache capacity (e.g. 20GiB).
    #[arg(long, env = "DAMSELFLY_CACHE_SIZE", default_value = "20GiB", value_parser = size::parse_size)]
    pub cache_size: u64,
    /// Largest piece size of cached blobs: a blob is cut into about 64 pieces
    /// of 256 KiB up to this (so blobs of 256 × this and more into pieces of this).
    #[arg(long, env = "DAMSELFLY_PIECE_SIZE", default_value = "4MiB", value_parser = size::parse_size, hide = true)]
    pub piece_size: u64,
    /// Only steer and splice: never terminate TLS or cache.
    #[arg(long, env = "DAMSELFLY_SPLICE_ONLY")]
    pub splice_only: bool,
    /// Tracker replicas (host:port); without one, blobs come from the origin only.
    #[arg(long, env = "DAMSELFLY_TRACKER", value_delimiter = ',')]
    pub tracker: Vec<String>,
    /// QUIC address serving pieces to other nodes.
    #[arg(long, env = "DAMSELFLY_PEER_LISTEN", default_value = "0.0.0.0:7401")]
    pub peer_listen: SocketAddr,
    /// Address other nodes reach us at: an IP (IPv4 or IPv6, brackets optional;
    /// the port is --peer-listen's) or IP:PORT ([V6]:PORT for IPv6)
    /// [default: our IP on the route to the tracker].
    #[arg(long, env = "DAMSELFLY_PEER_ADVERTISE", value_name = "IP|IP:PORT")]
    pub peer_advertise: Option<advertise::PeerAdvertise>,
    #[command(flatten)]
    pub cluster: ClusterPkiArgs,
    /// Node name told to the tracker [default: the host name].
    #[arg(long, env = "DAMSELFLY_NODE_NAME")]
    pub node_name: Option<String>,
    /// Zone label; peers in the same zone are preferred.
    #[arg(long, env = "DAMSELFLY_ZONE", default_value = "")]
    pub zone: String,
    /// Upload limit to peers, bytes/s (e.g. 100MiB; 0 = none).
    #[arg(long, env = "DAMSELFLY_UPLOAD_RATE", default_value = "0", value_parser = size::parse_size)]
    pub upload_rate: u64,
    /// Download limit from peers, bytes/s (0 = none).
    #[arg(long, env = "DAMSELFLY_DOWNLOAD_RATE", default_value = "0", value_parser = size::parse_size)]
    pub download_rate: u64,
    /// Most peers served at once.
    #[arg(long, env = "DAMSELFLY_MAX_UPLOAD_PEERS", default_value_t = 16)]
    pub max_upload_peers: usize,
    /// Limit on blob bytes read from origin registries, bytes/s (0 = none).
    #[arg(long, env = "DAMSELFLY_ORIGIN_RATE", default_value = "0", value_parser = size::parse_size)]
    pub origin_rate: u64,
    /// Run as a seed peer: no steering; a large cache that serves the swarm
    /// and preheat requests (and fetches from the origin what no node has).
    #[arg(long, env = "DAMSELFLY_SEED")]
    pub seed: bool,
    /// OpenTelemetry collector (OTLP/gRPC, e.g. http://jaeger:4317); traces are off without it.
    #[arg(long, env = "DAMSELFLY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// On SIGTERM/SIGINT: detach at once, then give the connections in flight
    /// this long to finish before exiting (keep it below the pod's
    /// terminationGracePeriodSeconds).
    #[arg(long, env = "DAMSELFLY_SHUTDOWN_GRACE", default_value = "25s", value_parser = tracker::parse_duration)]
    pub shutdown_grace: std::time::Duration,
}

/// The cluster PKI, for every command that authenticates to cluster members.
/// Checked at startup: a command refuses to start naming the file and the
/// check that failed (see [`crate::pki`]).
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterPkiArgs {
    /// Cluster CA (PEM) that every peer and tracker certificate chains to.
    #[arg(long, env = "DAMSELFLY_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), then any intermediates. An agent's: SAN
    /// damselfly-peer, serverAuth and clientAuth if it has extended key usages;
    /// the tracker's: SAN damselfly-tracker, serverAuth.
    #[arg(long, env = "DAMSELFLY_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// The key of --cluster-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DAMSELFLY_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
}

impl ClusterPkiArgs {
    /// Reads and checks the three files for `role`; `user` says what needs
    /// them (e.g. "--tracker"), for the message when some are not given.
    pub fn load(&self, user: &str, role: Role) -> anyhow::Result<ClusterPki> {
        let (Some(ca), Some(cert), Some(key)) =
            (&self.cluster_ca, &self.cluster_cert, &self.cluster_key)
        else {
            let missing: Vec<&str> = [
                (self.cluster_ca.is_none(), Part::Ca),
                (self.cluster_cert.is_none(), Part::Cert),
                (self.cluster_key.is_none(), Part::Key),
            ]
            .into_iter()
            .filter(|(missing, _)| *missing)
            .map(|(_, part)| part.flag())
            .collect();
            anyhow::bail!(
                "{user} needs --cluster-ca, --cluster-cert and --cluster-key (peers and the \
                 tracker authenticate each other); missing: {}",
                missing.join(", ")
            );
        };
        Ok(ClusterPki::load(
            &ClusterFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            role,
        )?)
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's admin address.
    #[arg(long, env = "DAMSELFLY_ADMIN", default_value = "127.0.0.1:7402")]
    pub admin: SocketAddr,
    /// Print the raw JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Instance names become a bpffs directory: keep them to one safe path segment.
fn parse_instance(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_string())
    } else {
        Err("use 1-64 of [A-Za-z0-9-_.], not starting with '.'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_interface() {
        let cli = Cli::try_parse_from(["damselfly", "agent"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.instance, "default");
        assert_eq!(a.steer_ports, vec![443, 80]);
        assert_eq!(a.steer_comm.len(), 7);
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.admin.port(), 7402);
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/damselfly"));

        let cli = Cli::try_parse_from(["damselfly", "tracker"]).unwrap();
        let Command::Tracker(t) = cli.command else {
            panic!()
        };
        assert_eq!(t.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(t.heartbeat, std::time::Duration::from_secs(5));
        assert_eq!(t.max_state, 256 << 20);
        assert_eq!(t.max_connections, 4096);
        // The certificates are checked at startup, with a message, not by clap.
        assert_eq!(t.cluster.cluster_ca, None);
    }

    #[test]
    fn lists_and_instance_are_validated() {
        let cli = Cli::try_parse_from([
            "damselfly",
            "agent",
            "--instance",
            "dfly-n1",
            "--steer-ports",
            "8443,80",
            "--steer-exclude",
            "10.96.0.0/12,fd00::/108",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.steer_ports, vec![8443, 80]);
        assert_eq!(a.steer_exclude.len(), 2);
        for bad in ["../x", "", "a/b", ".hidden"] {
            assert!(
                Cli::try_parse_from(["damselfly", "agent", "--instance", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(Cli::try_parse_from(["damselfly", "agent", "--steer-ports", "70000"]).is_err());
    }

    #[test]
    fn peer_advertise_takes_an_ip_alone_or_with_a_port() {
        let advertise = |v: &str| {
            let cli = Cli::try_parse_from(["damselfly", "agent", "--peer-advertise", v])?;
            let Command::Agent(a) = cli.command else {
                panic!()
            };
            Ok::<_, clap::Error>(a.peer_advertise.unwrap().resolve(7401))
        };
        assert_eq!(
            advertise("fd00::7").unwrap(),
            "[fd00::7]:7401".parse().unwrap()
        );
        assert_eq!(
            advertise("10.1.2.3").unwrap(),
            "10.1.2.3:7401".parse().unwrap()
        );
        assert_eq!(
            advertise("[fd00::7]:30401").unwrap(),
            "[fd00::7]:30401".parse().unwrap()
        );
        let e = advertise("node-1:7401").unwrap_err().to_string();
        assert!(e.contains("not an IP address"), "{e}");
    }

    #[test]
    fn get_and_preheat_flags() {
        let cli = Cli::try_parse_from([
            "damselfly",
            "get",
            "reg.io/app:v1",
            "-o",
            "out",
            "--platform",
            "linux/arm64",
            "--creds",
            "u:p",
        ])
        .unwrap();
        let Command::Get(g) = cli.command else {
            panic!()
        };
        assert_eq!(g.agent, "http://127.0.0.1:7402");
        assert_eq!(g.platform.unwrap().to_string(), "linux/arm64");
        assert_eq!(g.registry.creds.as_deref(), Some("u:p"));
        assert!(
            Cli::try_parse_from(["damselfly", "get", "x"]).is_err(),
            "-o is required"
        );

        let cli = Cli::try_parse_from([
            "damselfly",
            "preheat",
            "reg.io/app:v1",
            "--seed",
            "http://s0:7402,http://s1:7402",
            "--all-platforms",
        ])
        .unwrap();
        let Command::Preheat(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.seeds.len(), 2);
        assert!(p.all_platforms);
        assert!(
            Cli::try_parse_from([
                "damselfly",
                "preheat",
                "r/a",
                "--seed",
                "s",
                "--all-platforms",
                "--platform",
                "linux/amd64",
            ])
            .is_err()
        );
        let cli = Cli::try_parse_from(["damselfly", "agent", "--seed"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!()
        };
        assert!(a.seed);
    }
}
