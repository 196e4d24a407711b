//! The agent's side of the tracker, for several replicas.
//!
//! Each digest belongs to one replica, chosen by rendezvous hashing over the
//! replica addresses, so every agent asks the same replica about the same blob
//! without coordinating, and losing a replica only moves its own digests.
//! Leases go to every replica, so each can name this peer.
//!
//! Replicas keep no state worth saving: this client remembers its latest
//! announcement per digest and replays them when a replica says it does not
//! know us (restart) or answers again after failing. Every call is bounded by
//! short timeouts — a tracker problem must turn into "ask the origin", never
//! into a stuck pull.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use damselfly_proto::tracker::{self as pb, tracker_client::TrackerClient as Rpc};
use futures_util::future::join_all;
use sha2::{Digest as _, Sha256};
use tonic::{
    Code, Request, Response, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::{
    state::{Candidate, PeerInfo},
    tls::Connector,
};
use damselfly_core::vocab::{Digest, PieceHash};

/// Connecting to a replica: long enough for a loaded LAN, short enough that a
/// dead replica costs a pull about a second before it goes to the origin.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Any one call, connect included.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_millis(1500);

/// Called once per RPC with its name (`register`, `heartbeat`, `announce`,
/// `withdraw`, `find`) and `ok` or `error`: the agent feeds
/// `damselfly_tracker_requests_total{rpc,result}` from it.
pub type MetricsHook = Arc<dyn Fn(&'static str, &'static str) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("no tracker replicas configured")]
    NoReplicas,
    #[error("tracker address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("tracker {replica} {rpc}: {code:?}: {message}")]
    Rpc {
        replica: String,
        rpc: &'static str,
        code: Code,
        message: String,
    },
    #[error("tracker {replica} {rpc}: no answer within {RPC_TIMEOUT:?}")]
    Timeout { replica: String, rpc: &'static str },
}

/// What the tracker knows about a digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FindResult {
    /// 0 when nobody holds the digest.
    pub size: u64,
    pub piece_size: u64,
    /// Best first (same zone, most pieces, least loaded); never this peer.
    pub peers: Vec<Candidate>,
    /// Hashes the holders agree on; `None` = unknown or disputed.
    pub hashes: Vec<PieceHash>,
    /// Ask about this digest again no sooner than this (zero: whenever).
    pub refresh_after: Duration,
}

/// The longest a replica may tell us to wait before asking again.
const MAX_REFRESH_AFTER: Duration = Duration::from_secs(5);

/// The replica that owns `digest`: highest sha256(replica, digest) wins.
/// Depends only on the set of addresses, not their order, and is the same in
/// every process (no random seed), so all agents agree. `None` if empty.
pub fn rendezvous(replicas: &[String], digest: &Digest) -> Option<usize> {
    replicas
        .iter()
        .enumerate()
        .max_by_key(|(_, r)| (weight(r, digest), r.as_str()))
        .map(|(i, _)| i)
}

fn weight(replica: &str, digest: &Digest) -> u64 {
    let mut h = Sha256::new();
    h.update(replica.as_bytes());
    // A separator so ("ab", d) and ("a", "b"+d) cannot collide.
    h.update([0xff]);
    h.update(digest.0);
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// Adds the caller's trace context to every call.
type Traced = fn(Request<()>) -> Result<Request<()>, Status>;

fn traced(mut req: Request<()>) -> Result<Request<()>, Status> {
    crate::propagation::inject(req.metadata_mut());
    Ok(req)
}

struct Replica {
    addr: String,
    rpc: Rpc<InterceptedService<Channel, Traced>>,
    /// Whether this replica has our lease and our announcements; false until
    /// the first register and after any failed call, so a recovered replica
    /// gets a full replay.
    synced: AtomicBool,
    /// One re-register-and-replay at a time per replica.
    resync: tokio::sync::Mutex<()>,
    /// What the calls so far say about it, for `/status`.
    health: Mutex<Health>,
}

#[derive(Debug, Clone, Default)]
struct Health {
    last_ok: Option<SystemTime>,
    last_error: Option<(SystemTime, String)>,
}

/// One replica as the client knows it from its own calls (heartbeats every
/// few seconds keep it fresh); asking for it dials nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub addr: String,
    /// It holds our lease and our announcements.
    pub registered: bool,
    /// When a call to it last succeeded.
    pub last_ok: Option<SystemTime>,
    /// When a call to it last failed, and why.
    pub last_error: Option<(SystemTime, String)>,
}

impl ReplicaHealth {
    /// The latest call to it succeeded.
    pub fn reachable(&self) -> bool {
        match (&self.last_ok, &self.last_error) {
            (Some(ok), Some((err, _))) => ok >= err,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

struct Inner {
    me: PeerInfo,
    heartbeat: Duration,
    /// The shortest interval any replica asked for, in ms (0 = none yet).
    advertised_ms: AtomicU64,
    replicas: Vec<Replica>,
    addrs: Vec<String>,
    /// Latest announcement per digest, replayed to a replica that lost it.
    announced: Mutex<HashMap<Digest, pb::AnnounceRequest>>,
    active_uploads: AtomicU32,
    metrics: OnceLock<MetricsHook>,
}

#[derive(Clone)]
pub struct TrackerClient {
    inner: Arc<Inner>,
}

impl TrackerClient {
    /// Channels connect lazily: nothing is dialled until the first call, so
    /// this works with replicas down. Must be called inside a tokio runtime.
    /// Addresses are `host:port`; every replica is reached over TLS with
    /// `tls` ([`super::tls::client_config`]), its certificate checked for
    /// `damselfly-tracker`.
    pub fn new(
        replicas: Vec<String>,
        me: PeerInfo,
        heartbeat: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, TrackerError> {
        if replicas.is_empty() {
            return Err(TrackerError::NoReplicas);
        }
        let replicas = replicas
            .into_iter()
            .map(|addr| {
                // TLS comes from the connector; tonic only needs the address.
                let uri = format!("http://{}", addr.trim_start_matches("http://"));
                let ep = Endpoint::from_shared(uri)
                    .map_err(|e| TrackerError::BadAddress {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .timeout(RPC_TIMEOUT)
                    .tcp_nodelay(true);
                Ok(Replica {
                    rpc: Rpc::with_interceptor(
                        ep.connect_with_connector_lazy(Connector::new(tls.clone())),
                        traced as Traced,
                    ),
                    addr,
                    synced: AtomicBool::new(false),
                    resync: tokio::sync::Mutex::new(()),
                    health: Mutex::new(Health::default()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = replicas.iter().map(|r| r.addr.clone()).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                me,
                heartbeat,
                advertised_ms: AtomicU64::new(0),
                replicas,
                addrs,
                announced: Mutex::new(HashMap::new()),
                active_uploads: AtomicU32::new(0),
                metrics: OnceLock::new(),
            }),
        })
    }

    /// Count every call through `hook`. Only the first hook set counts.
    pub fn with_metrics(self, hook: MetricsHook) -> Self {
        let _ = self.inner.metrics.set(hook);
        self
    }

    /// Uploads this peer is serving now; sent with the next heartbeat.
    pub fn set_active_uploads(&self, n: u32) {
        self.inner.active_uploads.store(n, Ordering::Relaxed);
    }

    /// This node, as it registers.
    pub fn me(&self) -> &PeerInfo {
        &self.inner.me
    }

    /// The replica addresses, in the order given.
    pub fn replicas(&self) -> &[String] {
        &self.inner.addrs
    }

    /// Each replica, in the order given, as the latest calls left it.
    pub fn health(&self) -> Vec<ReplicaHealth> {
        self.inner
            .replicas
            .iter()
            .map(|r| {
                let h = r.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ReplicaHealth {
                    addr: r.addr.clone(),
                    registered: r.synced.load(Ordering::Relaxed),
                    last_ok: h.last_ok,
                    last_error: h.last_error,
                }
            })
            .collect()
    }

    /// The replica address that owns `digest`.
    pub fn owner(&self, digest: &Digest) -> &str {
        &self.inner.addrs[self.owner_index(digest)]
    }

    /// Register with every replica now, then keep the leases: one independent
    /// loop per replica, so a slow or dead one never delays the others'
    /// heartbeats. Abort the handle to stop (the leases then run out).
    pub fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            join_all((0..this.inner.replicas.len()).map(|i| this.keep_lease(i))).await;
        })
    }

    /// Tell the owning replica which pieces of `digest` this peer holds,
    /// replacing the last announcement. Remembered for replay even if the call
    /// fails.
    pub async fn announce(
        &self,
        digest: &Digest,
        size: u64,
        piece_size: u64,
        hashes: Vec<PieceHash>,
        bitmap: Vec<u8>,
    ) -> Result<Duration, TrackerError> {
        let req = pb::AnnounceRequest {
            peer_id: self.inner.me.id.clone(),
            digest: digest.to_string(),
            size,
            piece_size,
            piece_hashes: hashes
                .into_iter()
                .map(|h| h.map(|h| h.to_vec()).unwrap_or_default())
                .collect(),
            bitmap,
        };
        self.announced().insert(*digest, req.clone());
        let r = &self.inner.replicas[self.owner_index(digest)];
        match self.call(r, "announce", r.rpc.clone().announce(req)).await {
            Ok(resp) => Ok(Duration::from_millis(resp.announce_after_ms).min(MAX_REFRESH_AFTER)),
            // The replica lost us between heartbeats: catch up now rather than
            // at the next beat; the replay carries this announcement.
            Err(TrackerError::Rpc {
                code: Code::NotFound,
                ..
            }) => {
                r.synced.store(false, Ordering::Relaxed);
                self.resync(r).await.map(|()| Duration::ZERO)
            }
            Err(e) => Err(e),
        }
    }

    /// This peer no longer holds `digest` (evicted).
    pub async fn withdraw(&self, digest: &Digest) -> Result<(), TrackerError> {
        self.announced().remove(digest);
        let r = &self.inner.replicas[self.owner_index(digest)];
        let req = pb::WithdrawRequest {
            peer_id: self.inner.me.id.clone(),
            digest: digest.to_string(),
        };
        match self.call(r, "withdraw", r.rpc.clone().withdraw(req)).await {
            // Unknown to the replica means it holds nothing of ours anyway.
            Ok(_)
            | Err(TrackerError::Rpc {
                code: Code::NotFound,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Who else holds (or is fetching) pieces of `digest`, best first.
    pub async fn find(&self, digest: &Digest) -> Result<FindResult, TrackerError> {
        self.find_and_join(digest, None).await
    }

    /// [`Self::find`], and with `join = Some((size, piece_size))` be recorded
    /// as fetching the blob in the same step (see `Join` in tracker.proto).
    pub async fn find_and_join(
        &self,
        digest: &Digest,
        join: Option<(u64, u64)>,
    ) -> Result<FindResult, TrackerError> {
        let r = &self.inner.replicas[self.owner_index(digest)];
        let req = pb::FindRequest {
            digest: digest.to_string(),
            peer_id: self.inner.me.id.clone(),
            zone: self.inner.me.zone.clone(),
            max_peers: 0,
            join: join.map(|(size, piece_size)| pb::Join { size, piece_size }),
        };
        let resp = self.call(r, "find", r.rpc.clone().find(req)).await?;
        Ok(FindResult {
            size: resp.size,
            piece_size: resp.piece_size,
            peers: resp
                .peers
                .into_iter()
                // Belt and braces: a replica must never send us to ourselves.
                .filter(|p| p.peer_id != self.inner.me.id)
                .map(|p| Candidate {
                    held: p.bitmap.iter().map(|b| u64::from(b.count_ones())).sum(),
                    id: p.peer_id,
                    quic_addr: p.quic_addr,
                    zone: p.zone,
                    bitmap: p.bitmap,
                    active_uploads: p.active_uploads,
                    upload_capacity: p.upload_capacity,
                })
                .collect(),
            // A malformed hash is as good as none: the downloader verifies
            // another way.
            hashes: resp
                .piece_hashes
                .iter()
                .map(|h| <[u8; 32]>::try_from(&h[..]).ok())
                .collect(),
            // A replica's word, within reason: never longer than a lease.
            refresh_after: Duration::from_millis(resp.refresh_after_ms).min(MAX_REFRESH_AFTER),
        })
    }

    fn owner_index(&self, digest: &Digest) -> usize {
        rendezvous(&self.inner.addrs, digest).expect("at least one replica")
    }

    fn announced(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, pb::AnnounceRequest>> {
        self.inner
            .announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn interval(&self) -> Duration {
        match self.inner.advertised_ms.load(Ordering::Relaxed) {
            0 => self.inner.heartbeat,
            ms => self.inner.heartbeat.min(Duration::from_millis(ms)),
        }
    }

    /// Follow a replica that wants more frequent heartbeats than configured,
    /// or its leases would run out between beats.
    fn note_lease(&self, lease: Option<pb::Lease>) {
        if let Some(ms) = lease.map(|l| l.heartbeat_interval_ms).filter(|&ms| ms > 0) {
            let prev = self.inner.advertised_ms.load(Ordering::Relaxed);
            if prev == 0 || ms < prev {
                self.inner.advertised_ms.store(ms, Ordering::Relaxed);
            }
        }
    }

    async fn keep_lease(&self, i: usize) {
        let r = &self.inner.replicas[i];
        // Warn when a replica stops answering, not on every beat after.
        let mut failing = false;
        loop {
            if r.synced.load(Ordering::Relaxed) {
                let req = pb::HeartbeatRequest {
                    peer_id: self.inner.me.id.clone(),
                    active_uploads: self.inner.active_uploads.load(Ordering::Relaxed),
                };
                match self
                    .call(r, "heartbeat", r.rpc.clone().heartbeat(req))
                    .await
                {
                    Ok(resp) if resp.known => self.note_lease(resp.lease),
                    Ok(resp) => {
                        info!(replica = %r.addr, "tracker does not know this peer; re-registering");
                        self.note_lease(resp.lease);
                        r.synced.store(false, Ordering::Relaxed);
                        let _ = self.resync(r).await;
                    }
                    // Whatever it knew may be gone when it answers again.
                    Err(e) => {
                        warn!("{e}; will re-register and replay when it answers");
                        failing = true;
                        r.synced.store(false, Ordering::Relaxed);
                    }
                }
            } else {
                match self.resync(r).await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        warn!("{e}; retrying every heartbeat");
                        failing = true;
                    }
                    Err(e) => debug!("{e}"),
                }
            }
            tokio::time::sleep(self.interval()).await;
        }
    }

    /// Register with `r` and replay every announcement it owns.
    async fn resync(&self, r: &Replica) -> Result<(), TrackerError> {
        let _one = r.resync.lock().await;
        if r.synced.load(Ordering::Relaxed) {
            // Someone else caught up while we waited.
            return Ok(());
        }
        let me = &self.inner.me;
        let req = pb::RegisterRequest {
            peer: Some(pb::PeerInfo {
                peer_id: me.id.clone(),
                quic_addr: me.quic_addr.clone(),
                node_name: me.node.clone(),
                zone: me.zone.clone(),
                upload_capacity: me.upload_capacity,
            }),
            active_uploads: self.inner.active_uploads.load(Ordering::Relaxed),
        };
        let resp = self
            .call(r, "register", r.rpc.clone().register(req))
            .await?;
        self.note_lease(resp.lease);
        let idx = self
            .inner
            .replicas
            .iter()
            .position(|x| std::ptr::eq(x, r))
            .expect("replica of this client");
        // A snapshot: an announce racing with the replay may be overtaken by
        // an older bitmap, which the next announce corrects.
        let mine: Vec<pb::AnnounceRequest> = self
            .announced()
            .iter()
            .filter(|(d, _)| self.owner_index(d) == idx)
            .map(|(_, a)| a.clone())
            .collect();
        let n = mine.len();
        for a in mine {
            self.call(r, "announce", r.rpc.clone().announce(a)).await?;
        }
        r.synced.store(true, Ordering::Relaxed);
        info!(replica = %r.addr, announcements = n, "registered with tracker");
        Ok(())
    }

    async fn call<T>(
        &self,
        r: &Replica,
        rpc: &'static str,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, TrackerError> {
        // A span only inside a traced operation (a pull): heartbeats and
        // background announcements would each start a trace of their own.
        let span = if crate::propagation::in_trace() {
            info_span!(
                "tracker.rpc",
                otel.name = format!("tracker.{rpc}"),
                otel.kind = "client",
                rpc,
                replica = %r.addr,
                result = field::Empty,
                otel.status_code = field::Empty,
                error = field::Empty,
            )
        } else {
            Span::none()
        };
        // The channel has its own timeouts; this one also covers anything
        // they miss (a stalled HTTP/2 connection), so a pull never waits on us.
        let res = match tokio::time::timeout(RPC_TIMEOUT, fut.instrument(span.clone())).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(s)) => Err(TrackerError::Rpc {
                replica: r.addr.clone(),
                rpc,
                code: s.code(),
                message: s.message().to_string(),
            }),
            Err(_) => Err(TrackerError::Timeout {
                replica: r.addr.clone(),
                rpc,
            }),
        };
        if let Some(m) = self.inner.metrics.get() {
            m(rpc, if res.is_ok() { "ok" } else { "error" });
        }
        {
            let mut h = r.health.lock().unwrap_or_else(|e| e.into_inner());
            match &res {
                Ok(_) => h.last_ok = Some(SystemTime::now()),
                Err(e) => h.last_error = Some((SystemTime::now(), e.to_string())),
            }
        }
        span.record("result", if res.is_ok() { "ok" } else { "error" });
        if let Err(e) = &res {
            span.record("otel.status_code", "ERROR");
            span.record("error", field::display(e));
        }
        // Callers decide what is worth a warning: a dead replica would
        // otherwise log on every beat.
        if let Err(e) = &res {
            debug!("{e}");
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("tracker-{i}:7400")).collect()
    }

    fn digests(n: u32) -> impl Iterator<Item = Digest> {
        (0..n).map(|i| Digest::of(&i.to_le_bytes()))
    }

    #[test]
    fn a_replica_is_reachable_when_its_latest_call_succeeded() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let h = |ok: Option<u64>, err: Option<u64>| ReplicaHealth {
            addr: "t0:7400".into(),
            registered: false,
            last_ok: ok.map(|s| t + Duration::from_secs(s)),
            last_error: err.map(|s| (t + Duration::from_secs(s), "down".into())),
        };
        assert!(!h(None, None).reachable(), "never asked");
        assert!(!h(None, Some(1)).reachable());
        assert!(h(Some(1), None).reachable());
        assert!(h(Some(5), Some(1)).reachable(), "answered again");
        assert!(!h(Some(1), Some(5)).reachable(), "failed since");
    }

    #[tokio::test]
    async fn health_records_each_call_without_dialling_for_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        // Nothing listens on port 1 of loopback: every call fails at once.
        let me = PeerInfo {
            id: "n1/1/127.0.0.1:7401".into(),
            quic_addr: "127.0.0.1:7401".into(),
            node: "n1".into(),
            zone: String::new(),
            upload_capacity: 0,
        };
        let c = TrackerClient::new(vec!["127.0.0.1:1".into()], me, Duration::from_secs(5), tls)
            .unwrap();
        let before = c.health();
        assert_eq!(before.len(), 1);
        assert_eq!(
            (before[0].last_ok, before[0].last_error.clone()),
            (None, None)
        );
        assert!(c.find(&Digest::of(b"x")).await.is_err());
        let after = c.health();
        assert!(!after[0].reachable() && !after[0].registered);
        let (_, why) = after[0]
            .last_error
            .clone()
            .expect("the failure is recorded");
        assert!(why.contains("127.0.0.1:1"), "{why}");
    }

    #[test]
    fn rendezvous_is_stable_and_order_free() {
        let rs = replicas(3);
        let mut rev = rs.clone();
        rev.reverse();
        for d in digests(200) {
            let a = rendezvous(&rs, &d).unwrap();
            assert_eq!(rendezvous(&rs, &d), Some(a));
            assert_eq!(rs[a], rev[rendezvous(&rev, &d).unwrap()]);
        }
        assert_eq!(rendezvous(&[], &Digest::of(b"x")), None);
        assert_eq!(rendezvous(&rs[..1], &Digest::of(b"x")), Some(0));
    }

    #[test]
    fn rendezvous_is_balanced() {
        let rs = replicas(4);
        let mut count = [0u32; 4];
        for d in digests(4000) {
            count[rendezvous(&rs, &d).unwrap()] += 1;
        }
        for c in count {
            assert!((800..1200).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn removing_a_replica_moves_only_its_digests() {
        let rs = replicas(5);
        let gone = 2;
        let rest: Vec<String> = rs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, r)| r.clone())
            .collect();
        let mut moved = 0;
        for d in digests(2000) {
            let before = &rs[rendezvous(&rs, &d).unwrap()];
            let after = &rest[rendezvous(&rest, &d).unwrap()];
            if before == &rs[gone] {
                moved += 1;
            } else {
                assert_eq!(before, after, "{d} moved off a live replica");
            }
        }
        assert!(moved > 0);
    }
}
