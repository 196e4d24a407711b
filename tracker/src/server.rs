//! The tracker's gRPC face: translate protobuf to [`State`] calls under one
//! lock, and sweep expired leases in the background. All decisions live in
//! `state`; this file only parses, locks and stamps the time, and bounds
//! what a request may cost before `state` sees it.
//!
//! # Memory
//!
//! What the tracker holds is bounded by its limits, whatever its
//! (authenticated) clients send:
//!
//! ```text
//! RSS <= B0 + max_bytes + max_in_flight * 2 * max_message + max_connections * C
//! ```
//!
//! - `max_bytes` (`--max-state`): the state's own heap ([`State`] charges
//!   every registration and holding and refuses what would pass it).
//! - `max_in_flight` requests at once ([`MAX_IN_FLIGHT`]; more are refused
//!   with `RESOURCE_EXHAUSTED`), each holding at most its decoded request and
//!   its encoded answer, both at most `max_message`
//!   ([`Limits::max_message`], 744 KiB by default; the gRPC size limit).
//!   A request's slot lasts until its answer is sent or its connection
//!   closed, and a connection whose writes stall for
//!   [`super::tls::STALL_TIMEOUT`] is closed.
//! - `max_connections` (`--max-connections`), each costing at most
//!   `C` = [`CONNECTION_COST`] (256 KiB): TLS buffers, HTTP/2 state and the
//!   [`CONNECTION_WINDOW`] of request bytes not yet read. An idle one
//!   measures about 100 KiB (`agent/tests/tracker_limits.rs`).
//! - `B0`: the process at rest, about 10 MiB (23 MiB in a debug build).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use damselfly_proto::tracker::{
    self as pb,
    tracker_server::{Tracker, TrackerServer},
};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{Request, Response, Status};
use tracing::{Span, debug, field, info, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    state::{Announce, Caller, Lease, Limits, PeerInfo, State, StateError, check_len},
    tls::{ConnInfo, OnClose, incoming},
};
use damselfly_core::vocab::Digest;

/// The interval peers are told to heartbeat at, unless configured otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Requests being decoded, handled or answered at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Connections served at once, unless configured otherwise: every agent keeps
/// one to each replica.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Request bytes HTTP/2 lets a client send ahead of the server reading them,
/// per connection and per stream.
pub const CONNECTION_WINDOW: u32 = 64 * 1024;
/// Streams one connection may have open.
pub const MAX_STREAMS: u32 = 32;
/// For a request to arrive whole and be handled.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one open connection costs besides its requests: `C` in the
/// module doc's bound.
pub const CONNECTION_COST: u64 = 256 * 1024;

/// How a tracker serves: its lease interval and limits.
#[derive(Debug, Clone)]
pub struct Config {
    pub heartbeat: Duration,
    pub limits: Limits,
    pub max_connections: usize,
    pub max_in_flight: usize,
}

impl Config {
    /// The most the tracker's RSS can be with these limits, given `base`,
    /// the RSS of the process at rest (see the module doc).
    pub fn memory_bound(&self, base: u64) -> u64 {
        base + self.limits.max_bytes
            + (self.max_in_flight as u64) * 2 * self.limits.max_message() as u64
            + self.max_connections as u64 * CONNECTION_COST
    }

    pub fn new(heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            limits: Limits::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

#[derive(Clone)]
pub struct TrackerService {
    state: Arc<Mutex<State>>,
    limits: Limits,
}

impl TrackerService {
    pub fn new(heartbeat: Duration, limits: Limits) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::with_limits(heartbeat, limits.clone()))),
            limits,
        }
    }

    /// A std mutex: every critical section is short and never awaits.
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic inside a state call leaves nothing half-written that matters
        // more than serving on; peers re-announce anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the listener calls when a connection closes: its peers are gone.
    fn on_connection_closed(&self) -> OnClose {
        let weak = Arc::downgrade(&self.state);
        Arc::new(move |conn| {
            let Some(state) = weak.upgrade() else { return };
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            let n = s.connection_closed(conn);
            if n > 0 {
                debug!(
                    peers = n,
                    left = s.peer_count(),
                    "tracker peers gone with their connection"
                );
            }
        })
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

/// Serve the tracker over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let svc = TrackerService::new(cfg.heartbeat, cfg.limits.clone());
    let sweeper = svc.spawn_sweeper();
    let on_close = svc.on_connection_closed();
    let max = cfg.limits.max_message();
    let result = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(CONNECTION_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(16 * 1024)
        .layer(InFlightLayer {
            permits: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        })
        .add_service(
            TrackerServer::new(svc)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(
            incoming(listener, tls, cfg.max_connections, on_close),
            shutdown,
        )
        .await;
    sweeper.abort();
    result
}

/// At most `permits` requests at once, each holding its slot until its
/// answer's body is done (sent, or dropped with its connection): a request
/// past the limit is refused at once rather than queued, so neither decoded
/// requests nor answers waiting for a slow reader pile up.
#[derive(Clone)]
struct InFlightLayer {
    permits: Arc<Semaphore>,
}

impl<S> tower_layer::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone)]
struct InFlight<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for InFlight<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            debug!("tracker request refused: too many in flight");
            let busy = Status::resource_exhausted("tracker busy: too many requests in flight");
            return Box::pin(async move { Ok(busy.into_http()) });
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| {
                tonic::body::Body::new(Held {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

/// An answer's body and the request slot it holds.
struct Held {
    body: tonic::body::Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A server span for `rpc`, in the trace of the caller that sent one
/// (`traceparent`); calls from outside a trace (heartbeats, background
/// announcements) get none, or every few hundred ms would start a trace.
fn rpc_span<T>(rpc: &'static str, req: &Request<T>, digest: &str) -> Span {
    let Some(parent) = crate::propagation::extract(req.metadata()) else {
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
    let msg = e.to_string();
    match e {
        StateError::UnknownPeer(_) => Status::not_found(msg),
        StateError::Geometry { .. } => Status::failed_precondition(msg),
        StateError::Taken { .. } | StateError::NotYours { .. } => {
            info!("tracker refused: {msg}");
            Status::permission_denied(msg)
        }
        StateError::TooManyPeers { .. }
        | StateError::TooManyPeersOfCaller { .. }
        | StateError::TooManyDigests { .. }
        | StateError::TooManyHolders { .. }
        | StateError::OutOfMemory { .. } => {
            debug!("tracker refused: {msg}");
            Status::resource_exhausted(msg)
        }
        _ => Status::invalid_argument(msg),
    }
}

fn digest(s: &str) -> Result<Digest, Status> {
    // Checked first: a parse error would quote all of it back.
    check_len("digest", s, 71).map_err(status)?;
    s.parse()
        .map_err(|e: damselfly_core::vocab::BadDigest| Status::invalid_argument(e.to_string()))
}

/// The connection `req` came over, if it came through the TLS listener.
fn connection<T>(req: &Request<T>) -> Option<u64> {
    req.extensions().get::<ConnInfo>().map(|c| c.id)
}

/// Who sent `req`: set by the TLS listener on every request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|c| c.caller.clone())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))
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
        let (who, conn) = (caller(&req)?, connection(&req));
        traced(span, || self.register_now(&who, conn, req.into_inner()))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (who, conn) = (caller(&req)?, connection(&req));
        self.heartbeat_now(&who, conn, req.into_inner())
    }

    async fn announce(
        &self,
        req: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        let span = rpc_span("announce", &req, &req.get_ref().digest);
        let who = caller(&req)?;
        traced(span, || self.announce_now(&who, req.into_inner()))
    }

    async fn withdraw(
        &self,
        req: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let span = rpc_span("withdraw", &req, &req.get_ref().digest);
        let who = caller(&req)?;
        traced(span, || self.withdraw_now(&who, req.into_inner()))
    }

    async fn find(
        &self,
        req: Request<pb::FindRequest>,
    ) -> Result<Response<pb::FindResponse>, Status> {
        let span = rpc_span("find", &req, &req.get_ref().digest);
        let who = caller(&req)?;
        traced(span, || self.find_now(&who, req.into_inner()))
    }
}

/// The RPCs' bodies: no await in any, so each runs whole inside its span.
impl TrackerService {
    fn register_now(
        &self,
        who: &Caller,
        conn: Option<u64>,
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
        let (id, now) = (info.id.clone(), Instant::now());
        let mut s = self.state();
        let l = s
            .register(who, info, req.active_uploads, now)
            .map_err(status)?;
        if let Some(conn) = conn {
            s.bind_connection(who, &id, conn, now).map_err(status)?;
        }
        Ok(Response::new(pb::RegisterResponse {
            lease: Some(lease(l)),
        }))
    }

    fn heartbeat_now(
        &self,
        who: &Caller,
        conn: Option<u64>,
        req: pb::HeartbeatRequest,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let mut s = self.state();
        // Unknown is an answer, not an error: it is the normal way a restarted
        // tracker asks peers to replay.
        let now = Instant::now();
        let (known, l) = match s.heartbeat(who, &req.peer_id, req.active_uploads, now) {
            Ok(l) => {
                if let Some(conn) = conn {
                    s.bind_connection(who, &req.peer_id, conn, now)
                        .map_err(status)?;
                }
                (true, l)
            }
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
        who: &Caller,
        req: pb::AnnounceRequest,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        let d = digest(&req.digest)?;
        // Counted before they are converted: an empty entry is 2 bytes on the
        // wire and 33 here.
        let max = self.limits.max_pieces;
        if req.piece_hashes.len() as u64 > max {
            return Err(Status::invalid_argument(format!(
                "{d}: {} piece hashes, at most {max} allowed",
                req.piece_hashes.len()
            )));
        }
        let mut hashes = Vec::with_capacity(req.piece_hashes.len());
        for (i, h) in req.piece_hashes.iter().enumerate() {
            hashes.push(match h.len() {
                0 => None,
                32 => Some(h[..].try_into().expect("32 bytes")),
                n => {
                    return Err(Status::invalid_argument(format!(
                        "piece hash {i}: {n} bytes, expected 32 or 0"
                    )));
                }
            });
        }
        let a = Announce {
            digest: d,
            size: req.size,
            piece_size: req.piece_size,
            hashes,
            bitmap: req.bitmap,
        };
        let mut s = self.state();
        s.announce(who, &req.peer_id, a, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::AnnounceResponse {
            announce_after_ms: s.pace(&d).as_millis() as u64,
        }))
    }

    fn withdraw_now(
        &self,
        who: &Caller,
        req: pb::WithdrawRequest,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let d = digest(&req.digest)?;
        self.state()
            .withdraw(who, &req.peer_id, &d, Instant::now())
            .map_err(status)?;
        Ok(Response::new(pb::WithdrawResponse {}))
    }

    fn find_now(
        &self,
        who: &Caller,
        req: pb::FindRequest,
    ) -> Result<Response<pb::FindResponse>, Status> {
        let d = digest(&req.digest)?;
        let join = req.join.map(|j| (j.size, j.piece_size));
        let found = self
            .state()
            .find_and_join(
                who,
                &d,
                &req.peer_id,
                &req.zone,
                req.max_peers as usize,
                join,
                Instant::now(),
            )
            .map_err(status)?;
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
            refresh_after_ms: f.refresh_after.as_millis() as u64,
        }))
    }
}
