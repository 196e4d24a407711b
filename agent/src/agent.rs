//! `damselfly agent`: wire steering, interception and admin together, and take
//! them down cleanly on SIGTERM/SIGINT.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    admin::{Admin, Fetcher, SwarmParts, TlsAcceptor},
    ca::{CaOrigin, NodeCa},
    cli::AgentArgs,
    intercept::{ClientTrust, Drain, Gateway, Interceptor},
    origin::OriginClient,
    origin::RegistryHosts,
    pki::{ClusterPki, Role},
    registry::{Blobs, RegistryService},
    steer::{Listeners, Rules, Steering, mounts},
    store::Store,
    swarm::{
        ClientConfig, Config as SchedConfig, Haves, PeerClient, PeerServer, PeerTls, ServerConfig,
        Swarm,
    },
    telemetry::{Metrics, RecentErrors},
    tracker::{PeerInfo, TrackerClient},
    vocab::RateLimiter,
};

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    return_piece_buffers_at_once();
    if args.seed && (args.tracker.is_empty() || args.splice_only) {
        bail!("--seed serves the swarm: it needs --tracker, and cannot be --splice-only");
    }
    // Checked before anything is attached: a bad certificate would otherwise
    // only show as every peer handshake failing, and pulls quietly going to
    // the origin.
    let pki = if args.tracker.is_empty() || args.splice_only {
        None
    } else {
        Some(args.cluster.load("--tracker", Role::Peer)?)
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating --state-dir {}", args.state_dir.display()))?;

    // A seed takes no node's connections: no cgroup, no programs, no listeners.
    let steered = if args.seed {
        None
    } else {
        Some(attach(&args).await?)
    };
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding --admin {}", args.admin))?;
    let mut metrics = Metrics::new();
    if let Some((steering, _)) = &steered {
        let steering = Arc::downgrade(steering);
        metrics.attach_port_counters(move || {
            steering.upgrade().map(|s| s.counters()).unwrap_or_default()
        });
    }

    let parts = if args.splice_only {
        None
    } else {
        Some(GatewayParts::open(&args, pki.as_ref(), &mut metrics)?)
    };
    let metrics = Arc::new(metrics);
    // What /status reads, kept before the gateway takes the parts.
    let store = parts.as_ref().and_then(|p| p.store.clone());
    let swarm_parts = parts.as_ref().and_then(|p| {
        Some(SwarmParts {
            swarm: p.swarm.clone()?,
            server: p.peer_server.clone()?,
        })
    });
    let gateway = parts.map(|p| p.into_gateway(metrics.clone()));
    let fetch = gateway.as_ref().map(|g| Fetcher {
        hosts: g.hosts.clone(),
        service: g.service.clone(),
    });

    let mut listen = Vec::new();
    let drain = Drain::default();
    // A client that started before the node CA was written cannot trust it.
    let ca_written = std::fs::metadata(args.state_dir.join("ca").join("ca.crt"))
        .and_then(|m| m.modified())
        .ok();
    let trust = Arc::new(ClientTrust::new(
        ca_written,
        steered.as_ref().is_some_and(|(s, _)| s.sees_global_pids()),
    ));
    let steering = match steered {
        Some((steering, bound)) => {
            let interceptor = Arc::new(Interceptor {
                steering: steering.clone(),
                metrics: metrics.clone(),
                drain: drain.clone(),
                trust: trust.clone(),
                gateway,
            });
            listen = bound.iter().filter_map(|l| l.local_addr().ok()).collect();
            for l in bound {
                tokio::spawn(interceptor.clone().serve(l));
            }
            info!(
                instance = %args.instance,
                cgroup = %steering.cgroup.display(),
                ?listen,
                admin = %args.admin,
                pins = %steering.pin_dir.display(),
                "steering"
            );
            Some(steering)
        }
        None => {
            info!(instance = %args.instance, admin = %args.admin, "seed: no steering");
            None
        }
    };
    let admin = Arc::new(Admin {
        instance: args.instance.clone(),
        listen,
        steering: steering.clone(),
        metrics,
        fetch,
        // Only an agent that terminates TLS learns whether clients trust the CA.
        trust: (!args.seed && !args.splice_only).then_some(trust),
        swarm: swarm_parts,
        store,
        recent: RecentErrors::global().clone(),
    });
    // With a cluster PKI the admin port also speaks mutual TLS: how seeds are
    // preheated from elsewhere in the cluster (see admin's module docs).
    let admin_tls = match &pki {
        Some(pki) => Some(TlsAcceptor::from(Arc::new(
            PeerTls::new(pki)?.tls_server(b"http/1.1")?,
        ))),
        None => None,
    };
    tokio::spawn(admin.serve(admin_listener, admin_tls));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    // Detach first: from here on new connections go straight to their
    // destinations, and only the ones already here need us.
    if let Some(steering) = steering {
        steering.shutdown().context("removing pins")?;
        info!(
            in_flight = drain.active(),
            "detached; pins removed; finishing the connections in flight"
        );
    }
    drain.start();
    if tokio::time::timeout(args.shutdown_grace, drain.idle())
        .await
        .is_err()
    {
        warn!(
            cut = drain.active(),
            grace = ?args.shutdown_grace,
            "connections still open at the end of the grace period are cut"
        );
    }
    Ok(())
}

/// Bind the steering listeners and attach the programs; the listeners come
/// first because the kernel sends connects to them as soon as we attach.
async fn attach(args: &AgentArgs) -> anyhow::Result<(Arc<Steering>, Vec<TcpListener>)> {
    let rules = Rules::new(&args.steer_ports, &args.steer_comm, &args.steer_exclude)?;
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => mounts::cgroup2_root()?,
    };
    let (listeners, bound) = bind_listeners(&args.listen).await?;
    raise_memlock();
    let steering = Steering::start(&args.instance, &cgroup, rules, listeners)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    Ok((Arc::new(steering), bound))
}

/// Node CA, origin client and blob cache: what terminating registry
/// connections takes, opened before the metrics are shared.
struct GatewayParts {
    hosts: RegistryHosts,
    tls: rustls::ServerConfig,
    upstream: OriginClient,
    store: Option<Store>,
    swarm: Option<Arc<Swarm>>,
    peer_server: Option<Arc<PeerServer>>,
    origin_rate: u64,
}

impl GatewayParts {
    fn open(
        args: &AgentArgs,
        pki: Option<&ClusterPki>,
        metrics: &mut Metrics,
    ) -> anyhow::Result<Self> {
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
        let upstream = OriginClient::new(args.upstream_ca.as_deref())?;
        // A cache that cannot open costs speed, never a pull: blobs stream through.
        let store = match Store::open(&args.state_dir, args.cache_size, args.piece_size) {
            Ok(s) => {
                let gauge = s.clone();
                metrics.register_gauge(
                    "damselfly_cache_bytes",
                    "Bytes held in the blob cache",
                    move || gauge.used_bytes(),
                );
                Some(s)
            }
            Err(e) => {
                warn!(error = %e, "blob cache unavailable; blobs stream through");
                None
            }
        };
        let (swarm, peer_server) = match (&store, pki) {
            (Some(store), Some(pki)) => {
                let (swarm, server) = start_swarm(args, pki, store, metrics)?;
                (Some(swarm), Some(server))
            }
            _ => (None, None),
        };
        Ok(Self {
            hosts,
            tls,
            upstream,
            store,
            swarm,
            peer_server,
            origin_rate: args.origin_rate,
        })
    }

    fn into_gateway(self, metrics: Arc<Metrics>) -> Gateway {
        Gateway {
            hosts: self.hosts,
            tls: Arc::new(self.tls),
            service: Arc::new(RegistryService {
                blobs: Blobs::new(self.upstream, self.store, metrics, self.swarm)
                    .with_origin_rate(self.origin_rate),
            }),
        }
    }
}

/// Serve our pieces over QUIC, register with the tracker, announce what we hold.
fn start_swarm(
    args: &AgentArgs,
    pki: &ClusterPki,
    store: &Store,
    metrics: &mut Metrics,
) -> anyhow::Result<(Arc<Swarm>, Arc<PeerServer>)> {
    let tls = PeerTls::new(pki).context("cluster certificates")?;
    let mut server_cfg = ServerConfig::new(args.peer_listen);
    server_cfg.max_upload_peers = Some(args.max_upload_peers);
    server_cfg.rate = (args.upload_rate > 0).then(|| Arc::new(RateLimiter::new(args.upload_rate)));
    server_cfg.bytes_out = Some(metrics.peer_bytes_hook("out"));
    server_cfg.haves = Arc::new(Haves::new(Some(metrics.peer_haves_hook("out"))));
    let haves = server_cfg.haves.clone();
    let server = PeerServer::bind(&tls, Arc::new(store.clone()), server_cfg)
        .with_context(|| format!("--peer-listen {}", args.peer_listen))?;
    let mut client_cfg = ClientConfig::new(SocketAddr::new(unspecified(args.peer_listen), 0));
    client_cfg.rate =
        (args.download_rate > 0).then(|| Arc::new(RateLimiter::new(args.download_rate)));
    // The scheduler times requests out by the peer's measured rate; this is
    // only the backstop, above its longest timeout.
    client_cfg.request_timeout = Duration::from_secs(120);
    client_cfg.bytes_in = Some(metrics.peer_bytes_hook("in"));
    client_cfg.haves_in = Some(metrics.peer_haves_hook("in"));
    let peers = Arc::new(PeerClient::new(&tls, client_cfg)?);
    let advertise = match args.peer_advertise {
        Some(a) => a.resolve(server.local_addr().port()),
        None => SocketAddr::new(
            route_to(&args.tracker[0], args.peer_listen.ip())?,
            server.local_addr().port(),
        ),
    };
    let node = args.node_name.clone().unwrap_or_else(hostname);
    let me = PeerInfo {
        id: format!("{node}/{}/{}", std::process::id(), advertise),
        quic_addr: advertise.to_string(),
        node,
        zone: args.zone.clone(),
        upload_capacity: args.upload_rate,
    };
    let tracker = TrackerClient::new(
        args.tracker.clone(),
        me,
        crate::tracker::DEFAULT_HEARTBEAT,
        crate::tracker::client_config(pki).context("cluster certificates")?,
    )?
    .with_metrics(metrics.tracker_hook());
    let swarm = Arc::new(Swarm {
        tracker,
        peers: peers.clone(),
        haves,
        config: SchedConfig::production(),
        max_piece_size: store.max_piece_size(),
    });
    let counted = peers.clone();
    metrics.register_gauge(
        "damselfly_peers_connected",
        "QUIC connections to other nodes",
        move || counted.peers_connected() as u64,
    );
    let server = Arc::new(server);
    let serving = server.clone();
    metrics.register_gauge(
        "damselfly_peers_serving",
        "Peers being served pieces now",
        move || serving.peers_serving() as u64,
    );
    info!(%advertise, replicas = ?args.tracker, "joined the swarm");
    let (swarm2, store) = (swarm.clone(), store.clone());
    tokio::spawn(async move {
        swarm2.tracker.spawn_heartbeat();
        // What the cache already holds is worth announcing at once.
        for digest in store.complete() {
            if let Some(reader) = store.get(&digest) {
                swarm2.announce_complete(reader).await;
            }
        }
    });
    Ok((swarm, server))
}

fn unspecified(like: SocketAddr) -> std::net::IpAddr {
    if like.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    }
}

/// Our address on the route to `target` (host:port), unless `listen` names one.
fn route_to(target: &str, listen: std::net::IpAddr) -> anyhow::Result<std::net::IpAddr> {
    if !listen.is_unspecified() {
        return Ok(listen);
    }
    let dest = std::net::ToSocketAddrs::to_socket_addrs(target.trim_start_matches("http://"))
        .with_context(|| format!("resolving --tracker {target}"))?
        .next()
        .with_context(|| format!("--tracker {target} has no address"))?;
    // connect() on UDP sends nothing; it only picks the route and source address.
    let sock = std::net::UdpSocket::bind(SocketAddr::new(unspecified(dest), 0))?;
    sock.connect(dest)?;
    Ok(sock.local_addr()?.ip())
}

/// The kernel's host name (in a pod: the pod's, unless `--node-name` says otherwise).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into())
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

/// Pieces are read, verified and sent in buffers of up to 4 MiB, freed on
/// whichever thread wrote the last byte out. glibc raises its mmap threshold
/// after the first such free, and from then on serves them from per-thread
/// arenas that keep what is freed: the agent's RSS grew with the number of
/// readers (1.6 GB for 200 readers of a cached blob) long after the pieces
/// were gone. A fixed threshold keeps buffers of 1 MiB and more in mappings
/// of their own, returned to the kernel when freed.
fn return_piece_buffers_at_once() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // any piece buffer exists, and a failure leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
