//! `damselfly agent`: wire steering, interception and admin together, and take
//! them down cleanly on SIGTERM/SIGINT.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, bail};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    admin::{Admin, metrics::Metrics},
    ca::{CaOrigin, NodeCa},
    cli::AgentArgs,
    intercept::{Gateway, Interceptor},
    registry::{RegistryHosts, blob::Blobs, service::RegistryService},
    steer::{Listeners, Rules, Steering, mounts},
    store::Store,
    upstream::Upstream,
};

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let rules = Rules::new(&args.steer_ports, &args.steer_comm, &args.steer_exclude)?;
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => mounts::cgroup2_root()?,
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating --state-dir {}", args.state_dir.display()))?;

    // Listeners first: the kernel sends connects to them as soon as we attach.
    let (listeners, bound) = bind_listeners(&args.listen).await?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding --admin {}", args.admin))?;
    raise_memlock();

    let steering = Arc::new(
        Steering::start(&args.instance, &cgroup, rules, listeners)
            .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?,
    );
    let mut metrics = Metrics::new();
    metrics.attach_steering(&steering);

    let parts = if args.splice_only {
        None
    } else {
        Some(GatewayParts::open(&args, &mut metrics)?)
    };
    let metrics = Arc::new(metrics);
    let gateway = parts.map(|p| p.into_gateway(metrics.clone()));

    let interceptor = Arc::new(Interceptor {
        steering: steering.clone(),
        metrics: metrics.clone(),
        gateway,
    });
    let listen: Vec<SocketAddr> = bound.iter().filter_map(|l| l.local_addr().ok()).collect();
    for l in bound {
        tokio::spawn(interceptor.clone().serve(l));
    }
    let admin = Arc::new(Admin {
        instance: args.instance.clone(),
        listen: listen.clone(),
        steering: steering.clone(),
        metrics,
    });
    tokio::spawn(admin.serve(admin_listener));
    info!(
        instance = %args.instance,
        cgroup = %cgroup.display(),
        ?listen,
        admin = %args.admin,
        pins = %steering.pin_dir.display(),
        "steering"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    steering.shutdown().context("removing pins")?;
    info!("detached; pins removed");
    Ok(())
}

/// Node CA, origin client and blob cache: what terminating registry
/// connections takes, opened before the metrics are shared.
struct GatewayParts {
    hosts: RegistryHosts,
    tls: rustls::ServerConfig,
    upstream: Upstream,
    store: Option<Store>,
}

impl GatewayParts {
    fn open(args: &AgentArgs, metrics: &mut Metrics) -> anyhow::Result<Self> {
        let hosts = RegistryHosts::new(&args.registries)?;
        let ca = NodeCa::load_or_create(&args.state_dir, &hosts).context("node CA")?;
        match ca.origin() {
            CaOrigin::Loaded => info!(ca = %ca.cert_path().display(), "node CA loaded"),
            other => warn!(
                ca = %ca.cert_path().display(),
                "node CA {other:?}: install it (`damselfly ca install`) and restart the runtime once"
            ),
        }
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ca.resolver()));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let upstream = Upstream::new(args.upstream_ca.as_deref())?;
        // A cache that cannot open costs speed, never a pull: blobs stream through.
        let store = match Store::open(&args.state_dir, args.cache_size, args.piece_size) {
            Ok(s) => {
                let gauge = s.clone();
                metrics.register_cache_gauge(move || gauge.used_bytes());
                Some(s)
            }
            Err(e) => {
                warn!(error = %e, "blob cache unavailable; blobs stream through");
                None
            }
        };
        Ok(Self {
            hosts,
            tls,
            upstream,
            store,
        })
    }

    fn into_gateway(self, metrics: Arc<Metrics>) -> Gateway {
        Gateway {
            hosts: self.hosts,
            tls: Arc::new(self.tls),
            service: Arc::new(RegistryService {
                blobs: Blobs::new(self.upstream, self.store, metrics),
            }),
        }
    }
}

/// Bind each `--listen` address. An IPv6 listener that cannot be bound (no
/// IPv6 on this host) only turns off IPv6 steering.
async fn bind_listeners(addrs: &[SocketAddr]) -> anyhow::Result<(Listeners, Vec<TcpListener>)> {
    let mut listeners = Listeners::default();
    let mut bound = Vec::new();
    for &addr in addrs {
        let slot = if addr.is_ipv4() {
            &mut listeners.v4
        } else {
            &mut listeners.v6
        };
        if slot.is_some() {
            bail!("--listen: give at most one IPv4 and one IPv6 address");
        }
        match TcpListener::bind(addr).await {
            Ok(l) => {
                *slot = Some(l.local_addr()?);
                bound.push(l);
            }
            Err(e) if addr.is_ipv6() => {
                warn!(%addr, error = %e, "no IPv6 listener: IPv6 connects are not steered");
            }
            Err(e) => return Err(e).with_context(|| format!("binding --listen {addr}")),
        }
    }
    if bound.is_empty() {
        bail!("--listen: no listener could be bound");
    }
    Ok((listeners, bound))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (only kernels before 5.11 need it)");
    }
}
