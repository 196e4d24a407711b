//! The tracker's gRPC face: translate protobuf to [`State`] calls under one
//! lock, and sweep expired leases in the background. All decisions live in
//! `state`; this file only parses, locks and stamps the time.

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use damselfly_proto::tracker::{
    self as pb,
    tracker_server::{Tracker, TrackerServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};
use tracing::{Span, debug, field, info, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::state::{Announce, Lease, PeerInfo, State, StateError};
use crate::store::Digest;

/// The interval peers are told to heartbeat at, unless configured otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct TrackerService {
    state: Arc<Mutex<State>>,
}

impl TrackerService {
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::new(heartbeat))),
        }
    }

    /// A std mutex: every critical section is short and never awaits.
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic inside a state call leaves nothing half-written that matters
        // more than serving on; peers re-announce anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop expired peers every quarter interval, until the service is gone.
    fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.state);
        let period = self.state().sweep_interval();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                let n = s.expire(Instant::now());
                if n > 0 {
                    debug!(
                        expired = n,
                        peers = s.peer_count(),
                        blobs = s.blob_count(),
                        "tracker leases swept"
                    );
                }
            }
        })
    }
}

/// Serve the tracker on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    heartbeat: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let svc = TrackerService::new(heartbeat);
    let sweeper = svc.spawn_sweeper();
    let result = tonic::transport::Server::builder()
        .add_service(TrackerServer::new(svc))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await;
    sweeper.abort();
    result
}

/// `damselfly tracker`: bind, serve, stop on SIGTERM/SIGINT.
pub async fn run(listen: std::net::SocketAddr, heartbeat: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = TcpListener::bind(listen).await?;
    info!(addr = %listener.local_addr()?, ?heartbeat, "tracker listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    };
    serve(listener, heartbeat, shutdown).await?;
    Ok(())
}

/// A server span for `rpc`, in the trace of the caller that sent one
/// (`traceparent`); calls from outside a trace (heartbeats, background
/// announcements) get none, or every few hundred ms would start a trace.
fn rpc_span<T>(rpc: &'static str, req: &Request<T>, digest: &str) -> Span {
    let Some(parent) = crate::admin::trace::extract(req.metadata()) else {
        return Span::none();
    };
    let span = info_span!(
        "tracker.serve",
        otel.name = format!("tracker.{rpc}"),
        otel.kind = "server",
        rpc,
        digest,
        peers = field::Empty,
        otel.status_code = field::Empty,
        error = field::Empty,
    );
    // Fails only if the span is already closed or not recorded: either way
    // there is nothing to attach.
    let _ = span.set_parent(parent);
    span
}

/// Runs one RPC's (synchronous) body inside its span and notes a failure.
fn traced<T>(span: Span, f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    let out = span.in_scope(f);
    if let Err(s) = &out {
        span.record("otel.status_code", "ERROR");
        span.record("error", field::display(s.message()));
    }
    out
}

fn status(e: StateError) -> Status {
    match e {
        StateError::UnknownPeer(_) => Status::not_found(e.to_string()),
        StateError::Geometry { .. } => Status::failed_precondition(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn digest(s: &str) -> Result<Digest, Status> {
    s.parse()
        .map_err(|e: crate::store::BadDigest| Status::invalid_argument(e.to_string()))
}

fn lease(l: Lease) -> pb::Lease {
    pb::Lease {
        heartbeat_interval_ms: l.heartbeat.as_millis() as u64,
        lease_ms: l.lease.as_millis() as u64,
    }
}

#[tonic::async_trait]
impl Tracker for TrackerService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let span = rpc_span("register", &req, "");
        traced(span, || self.register_now(req.into_inner()))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.heartbeat_now(req.into_inner())
    }

    async fn announce(
        &self,
        req: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        let span = rpc_span("announce", &req, &req.get_ref().digest);
        traced(span, || self.announce_now(req.into_inner()))
    }

    async fn withdraw(
        &self,
        req: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let span = rpc_span("withdraw", &req, &req.get_ref().digest);
        traced(span, || self.withdraw_now(req.into_inner()))
    }

    async fn find(
        &self,
        req: Request<pb::FindRequest>,
    ) -> Result<Response<pb::FindResponse>, Status> {
        let span = rpc_span("find", &req, &req.get_ref().digest);
        traced(span, || self.find_now(req.into_inner()))
    }
}

/// The RPCs' bodies: no await in any, so each runs whole inside its span.
impl TrackerService {
    fn register_now(
        &self,
        req: pb::RegisterRequest,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let p = req
            .peer
            .ok_or_else(|| Status::invalid_argument("register without a peer"))?;
        let info = PeerInfo {
            id: p.peer_id,
            quic_addr: p.quic_addr,
            node: p.node_name,
            zone: p.zone,
            upload_capacity: p.upload_capacity,
        };
        let l = self
            .state()
            .register(info, req.active_uploads, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::RegisterResponse {
            lease: Some(lease(l)),
        }))
    }

    fn heartbeat_now(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let mut s = self.state();
        // Unknown is an answer, not an error: it is the normal way a restarted
        // tracker asks peers to replay.
        let (known, l) = match s.heartbeat(&req.peer_id, req.active_uploads, Instant::now()) {
            Ok(l) => (true, l),
            Err(StateError::UnknownPeer(_)) => (false, s.lease()),
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(pb::HeartbeatResponse {
            known,
            lease: Some(lease(l)),
        }))
    }

    fn announce_now(
        &self,
        req: pb::AnnounceRequest,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        let hashes = req
            .piece_hashes
            .iter()
            .enumerate()
            .map(|(i, h)| match h.len() {
                0 => Ok(None),
                32 => Ok(Some(h[..].try_into().expect("32 bytes"))),
                n => Err(Status::invalid_argument(format!(
                    "piece hash {i}: {n} bytes, expected 32 or 0"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let a = Announce {
            digest: digest(&req.digest)?,
            size: req.size,
            piece_size: req.piece_size,
            hashes,
            bitmap: req.bitmap,
        };
        self.state()
            .announce(&req.peer_id, a, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::AnnounceResponse {}))
    }

    fn withdraw_now(
        &self,
        req: pb::WithdrawRequest,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let d = digest(&req.digest)?;
        self.state()
            .withdraw(&req.peer_id, &d, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::WithdrawResponse {}))
    }

    fn find_now(&self, req: pb::FindRequest) -> Result<Response<pb::FindResponse>, Status> {
        let d = digest(&req.digest)?;
        let join = req.join.map(|j| (j.size, j.piece_size));
        let found = self.state().find_and_join(
            &d,
            &req.peer_id,
            &req.zone,
            req.max_peers as usize,
            join,
            Instant::now(),
        );
        let Some(f) = found else {
            Span::current().record("peers", 0);
            return Ok(Response::new(pb::FindResponse::default()));
        };
        Span::current().record("peers", f.peers.len());
        Ok(Response::new(pb::FindResponse {
            peers: f
                .peers
                .into_iter()
                .map(|c| pb::PeerHolding {
                    peer_id: c.id,
                    quic_addr: c.quic_addr,
                    zone: c.zone,
                    bitmap: c.bitmap,
                    active_uploads: c.active_uploads,
                    upload_capacity: c.upload_capacity,
                })
                .collect(),
            size: f.size,
            piece_size: f.piece_size,
            piece_hashes: f
                .hashes
                .into_iter()
                .map(|h| h.map(|h| h.to_vec()).unwrap_or_default())
                .collect(),
        }))
    }
}
