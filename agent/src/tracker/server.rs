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
use tracing::{debug, info};

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
        let req = req.into_inner();
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

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
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

    async fn announce(
        &self,
        req: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        let req = req.into_inner();
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

    async fn withdraw(
        &self,
        req: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let req = req.into_inner();
        let d = digest(&req.digest)?;
        self.state()
            .withdraw(&req.peer_id, &d, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::WithdrawResponse {}))
    }

    async fn find(
        &self,
        req: Request<pb::FindRequest>,
    ) -> Result<Response<pb::FindResponse>, Status> {
        let req = req.into_inner();
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
            return Ok(Response::new(pb::FindResponse::default()));
        };
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
