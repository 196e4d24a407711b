//! The blob path: authorize with the origin, then serve from the cache, or
//! fetch from the origin once while streaming to the client and writing the
//! store; a store that cannot help turns into a plain stream-through.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, Span, debug, field, info, info_span, instrument, warn};

use crate::{
    origin::{Body, BoxError, OriginClient, OriginRef},
    registry::{
        authz::{AuthzCache, Subject, Verdict},
        proxy,
        range::{self, ByteRange},
        trace::BlobTrace,
    },
    store::{BlobReader, BlobWriter, Store},
    swarm::{
        Swarm,
        driver::{Driver, Holders, RangeFetcher, on_writer},
        progress::Progress,
    },
    telemetry::{metrics::Metrics, trace::SourceBytes},
    vocab::Digest,
    vocab::RateLimiter,
};

/// Chunks in flight between a producer and a client connection.
const CHANNEL_DEPTH: usize = 8;
/// Cache hits are queued in slices of this size (a verified piece is up to 4 MiB).
const HIT_SLICE: usize = 256 * 1024;

pub struct Blobs {
    pub upstream: OriginClient,
    pub store: Option<Store>,
    pub metrics: Arc<Metrics>,
    /// Peers to fetch from; `None` without a tracker.
    pub swarm: Option<Arc<Swarm>>,
    authz: Mutex<AuthzCache>,
    /// Downloads in progress, so concurrent requests for a digest share one.
    inflight: Inflight,
    /// `--origin-rate`: shared by every blob byte fetched from an origin to
    /// be cached (blobs only streamed through are not counted).
    origin_rate: Arc<RateLimiter>,
    /// Blobs whose swarm copy failed its digest (a poisoned hash list), and
    /// since when: fetched from the origin alone for [`POISON_TTL`].
    poisoned: Poisoned,
}

type Poisoned = Arc<Mutex<HashMap<Digest, Instant>>>;

/// How long a blob whose swarm fetch was poisoned skips the swarm.
const POISON_TTL: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug)]
enum Authz {
    Allowed {
        size: Option<u64>,
    },
    /// The origin refused (401/403/404). `answer` is its own reply to the
    /// HEAD, to hand back as is, when no redirect was followed to get it.
    Denied {
        answer: Option<Response<Incoming>>,
    },
    /// No yes: the origin could not be asked, or answered something that
    /// is neither a yes nor a refusal. Serve nothing we hold.
    Unknown,
}

/// A blob request's response and what only a client the origin said yes to
/// may learn about how it was served.
pub struct Served {
    pub response: Response<Body>,
    /// `None` without the origin's yes; else whether the blob was complete
    /// in the cache when the yes came.
    pub cached: Option<bool>,
}

impl Blobs {
    pub fn new(
        upstream: OriginClient,
        store: Option<Store>,
        metrics: Arc<Metrics>,
        swarm: Option<Arc<Swarm>>,
    ) -> Self {
        Self {
            upstream,
            store,
            metrics,
            swarm,
            authz: Mutex::default(),
            inflight: Arc::default(),
            origin_rate: Arc::new(RateLimiter::unlimited()),
            poisoned: Arc::default(),
        }
    }

    /// Whether the swarm's copy of `digest` failed its digest lately.
    fn is_poisoned(&self, digest: &Digest) -> bool {
        let mut map = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, since| since.elapsed() < POISON_TTL);
        map.contains_key(digest)
    }

    /// Limits origin blob bytes to `bytes_per_sec` (0: no limit).
    pub fn with_origin_rate(mut self, bytes_per_sec: u64) -> Self {
        self.origin_rate = Arc::new(RateLimiter::new(bytes_per_sec));
        self
    }

    /// Serves one blob request in a trace of its own (see [`BlobTrace`]).
    pub async fn serve(
        &self,
        req: Request<Incoming>,
        origin: &OriginRef,
        repo: &str,
        hex: &str,
    ) -> Served {
        let trace = BlobTrace::start(req.method(), origin, repo, hex);
        let span = trace.span().clone();
        let (resp, cached) = trace
            .clone()
            .scope(self.serve_untraced(req, origin, repo, hex).instrument(span))
            .await;
        Served {
            response: trace.respond(resp),
            cached,
        }
    }

    /// Counts how a blob request is served, in the metrics and its trace.
    fn outcome(&self, outcome: &'static str) {
        self.metrics.blob_request(outcome);
        BlobTrace::set_outcome(outcome);
    }

    /// The client's request as it came, to where it was going: the answer
    /// is the origin's own, so it tells nothing of what this node holds.
    async fn carry(&self, origin: &OriginRef, req: Request<Incoming>) -> Response<Body> {
        proxy::forward(&self.upstream, origin, req).await
    }

    /// The response and, if the origin said yes, whether the blob was in the
    /// cache then. Nothing that depends on what this node holds (the store,
    /// size, digest headers, timing, the swarm) is looked at before the yes.
    async fn serve_untraced(
        &self,
        req: Request<Incoming>,
        origin: &OriginRef,
        repo: &str,
        hex: &str,
    ) -> (Response<Body>, Option<bool>) {
        let (Some(store), Ok(digest)) = (&self.store, hex.parse::<Digest>()) else {
            self.outcome("passthrough");
            return (self.carry(origin, req).await, None);
        };
        if !origin.confirmed().await {
            // A plain HTTP destination the node's resolver does not give for
            // the name it was sent: its yes would be anyone's to give.
            info!(
                host = %origin.host,
                dest = ?origin.steered.as_ref().map(|s| s.dest),
                "plain HTTP to an address the node's resolver does not give for this host: carried through, nothing served from the cache"
            );
            self.outcome("passthrough");
            return (self.carry(origin, req).await, None);
        }
        let size = match self.authorize(origin, repo, hex, req.headers()).await {
            Authz::Allowed { size } => size,
            Authz::Denied { answer } => {
                self.outcome("denied");
                return match answer {
                    Some(resp) if req.method() == Method::HEAD => (proxy::relay(resp), None),
                    // The origin answers the GET itself, with its own error
                    // body (or the redirect the client would have followed).
                    _ => (self.carry(origin, req).await, None),
                };
            }
            Authz::Unknown => {
                self.outcome("passthrough");
                return (self.carry(origin, req).await, None);
            }
        };
        let held = store.get(&digest);
        let cached = Some(held.is_some());
        (
            self.serve_allowed(store, held, digest, size, req, origin)
                .await,
            cached,
        )
    }

    /// Serves a blob the origin said this client may have.
    async fn serve_allowed(
        &self,
        store: &Store,
        held: Option<BlobReader>,
        digest: Digest,
        size: Option<u64>,
        req: Request<Incoming>,
        origin: &OriginRef,
    ) -> Response<Body> {
        if let Some(reader) = held {
            self.outcome("hit");
            return self.hit(reader, &digest, req, origin);
        }
        // A HEAD, or a ranged GET (a client resuming its own partial download),
        // is the origin's to answer: caching starts with a whole-blob GET.
        if req.method() == Method::HEAD || req.headers().contains_key(header::RANGE) {
            self.outcome("passthrough");
            return self.carry(origin, req).await;
        }

        // One download per digest on this node: the first request leads, the
        // rest wait for it and then serve the cached copy.
        let lead = match self.claim(digest) {
            Ok(lead) => lead,
            Err(mut done) => {
                let ok = done
                    .wait_for(Option::is_some)
                    .await
                    .map(|v| *v == Some(true))
                    .unwrap_or(false);
                if let (true, Some(reader)) = (ok, store.get(&digest)) {
                    self.outcome("hit");
                    return self.hit(reader, &digest, req, origin);
                }
                self.outcome("passthrough");
                return self.carry(origin, req).await;
            }
        };
        self.miss(store, lead, size, req, origin).await
    }

    /// Become the one downloading `digest`, or get what to wait on.
    fn claim(&self, digest: Digest) -> Result<Lead, watch::Receiver<Option<bool>>> {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = map.get(&digest) {
            return Err(done.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(digest, rx);
        Ok(Lead {
            digest,
            inflight: self.inflight.clone(),
            done: Some(tx),
        })
    }

    /// Ask the origin (HEAD, the client's own headers) whether it would
    /// serve this client this blob, following redirects as the client's HTTP
    /// library would (credentials stay on the registry's host: see
    /// [`crate::origin::carries_credentials`]); only a final 2xx is a yes.
    /// A yes is remembered for a minute (see [`AuthzCache`]).
    #[instrument(name = "authz", skip_all, fields(cached = false, result = field::Empty, status = field::Empty, redirects = field::Empty))]
    async fn authorize(
        &self,
        origin: &OriginRef,
        repo: &str,
        hex: &str,
        headers: &HeaderMap,
    ) -> Authz {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let subject = Subject {
            scheme: origin.scheme,
            host: &origin.host,
            port: origin.port,
            repo,
            hex,
        };
        let span = Span::current();
        if self
            .authz
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_allowed(&subject, auth, Instant::now())
        {
            self.metrics.authz_check("cached");
            span.record("cached", true);
            span.record("result", "allowed");
            return Authz::Allowed { size: None };
        }
        let Ok(uri) = origin.uri(&format!("/v2/{repo}/blobs/sha256:{hex}")) else {
            return Authz::Unknown;
        };
        let mut ask = HeaderMap::new();
        proxy::copy_headers(headers, &mut ask);
        ask.remove(header::RANGE);
        ask.remove(header::IF_RANGE);
        let sent = origin
            .upstream(&self.upstream)
            .follow(Method::HEAD, uri, &ask)
            .await;
        let followed = match sent {
            Ok(f) => f,
            Err(e) => {
                // Unreachable, or redirects without end: no yes.
                debug!(error = %e, "authorization HEAD failed");
                self.metrics.authz_check("error");
                span.record("result", "error");
                span.record("otel.status_code", "ERROR");
                return Authz::Unknown;
            }
        };
        let status = followed.response.status();
        span.record("status", status.as_u16());
        span.record("redirects", followed.redirects);
        match Verdict::of(status) {
            Verdict::Yes => {
                self.metrics.authz_check("allowed");
                span.record("result", "allowed");
                self.authz.lock().unwrap_or_else(|e| e.into_inner()).allow(
                    &subject,
                    auth,
                    Instant::now(),
                );
                // A storage host's length is its own business: only the
                // registry's own answer tells the blob's.
                let size = (followed.redirects == 0)
                    .then(|| content_length(followed.response.headers()))
                    .flatten();
                Authz::Allowed { size }
            }
            Verdict::Refused => {
                self.metrics.authz_check("denied");
                span.record("result", "denied");
                Authz::Denied {
                    answer: (followed.redirects == 0).then_some(followed.response),
                }
            }
            Verdict::No => {
                debug!(%status, redirects = followed.redirects, "the authorization HEAD ended in neither a yes nor a refusal");
                self.metrics.authz_check("error");
                span.record("result", "error");
                Authz::Unknown
            }
        }
    }

    /// Serve a cached blob, honouring a single `Range`. Every piece is checked
    /// against its stored hash as it is read; if one is corrupt, the rest of
    /// the response comes from the origin and the copy is dropped.
    fn hit(
        &self,
        reader: BlobReader,
        digest: &Digest,
        req: Request<Incoming>,
        origin: &OriginRef,
    ) -> Response<Body> {
        let size = reader.size();
        let range = range::parse(
            req.headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok()),
            size,
        );
        let (status, start, end) = match range {
            ByteRange::Full => (StatusCode::OK, 0, size),
            ByteRange::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
            ByteRange::Unsatisfiable => {
                let mut r = proxy::error_response(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range not satisfiable",
                );
                r.headers_mut()
                    .insert(header::CONTENT_RANGE, hv(format!("bytes */{size}")));
                return r;
            }
        };
        let head = req.method() == Method::HEAD;
        let body = if head {
            crate::origin::empty()
        } else {
            let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
            let ctx = Continuation {
                upstream: origin.upstream(&self.upstream).clone(),
                rate: self.origin_rate.clone(),
                store: self.store.clone(),
                metrics: self.metrics.clone(),
                digest: *digest,
                origin: origin.clone(),
                headers: req.headers().clone(),
                path: req.uri().path().to_string(),
                bytes: BlobTrace::current_bytes(),
            };
            let span = info_span!("cache.read", start, end);
            tokio::spawn(stream_hit(reader, start, end, tx, ctx).instrument(span));
            channel_body(rx)
        };
        let mut resp = blob_response(status, digest, end - start, body);
        if status == StatusCode::PARTIAL_CONTENT {
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                hv(format!("bytes {start}-{}/{size}", end - 1)),
            );
        }
        resp
    }

    /// Fetch from the origin, stream to the client and into the store at once.
    async fn miss(
        &self,
        store: &Store,
        lead: Lead,
        size: Option<u64>,
        req: Request<Incoming>,
        origin: &OriginRef,
    ) -> Response<Body> {
        let digest = lead.digest;
        let headers = strip_range(req.headers());
        // The authorization answer was cached (or a redirect): a HEAD tells the size
        // without a blob byte, so the swarm can still be asked.
        let size = match size {
            Some(s) => Some(s),
            None if self.swarm.is_some() => {
                self.origin_size(origin, req.uri().path(), &headers).await
            }
            None => None,
        };
        let size = match size {
            Some(s) => s,
            // Still unknown: learn it from the GET itself.
            None => match self
                .origin_get(origin, req.uri().path(), &headers, None)
                .await
            {
                Ok(resp) if resp.status() == StatusCode::OK => match content_length(resp.headers())
                {
                    Some(s) => return self.fetch_with(store, lead, s, resp).await,
                    None => return self.passthrough(resp),
                },
                Ok(resp) => return self.passthrough(resp),
                Err(e) => return proxy::origin_error(&e),
            },
        };
        let writer = match begin(store, &digest, size).await {
            Ok(w) => w,
            Err(e) => {
                info!(%digest, error = %e, "store cannot take this blob; streaming it through");
                self.outcome("passthrough");
                return self.carry(origin, req).await;
            }
        };
        let mut progress = None;
        if let Some(swarm) = self.swarm.as_ref().filter(|_| !self.is_poisoned(&digest)) {
            match swarm.join(&digest, size).await {
                Some(holders) => {
                    return self.start_swarm(
                        swarm.clone(),
                        writer,
                        lead,
                        size,
                        holders,
                        origin,
                        req.uri().path(),
                        headers,
                    );
                }
                // We are the first: others that ask now wait for our pieces.
                None => progress = Some(progress_of(swarm, &writer)),
            }
        }
        // Resume: what a killed download already wrote stays; fetch from the first gap.
        let first_missing = writer.missing_pieces().first().copied().unwrap_or(0);
        let offset = first_missing * store.piece_size();
        let resp = match self
            .origin_get(
                origin,
                req.uri().path(),
                &headers,
                (offset > 0).then_some(offset),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => return proxy::origin_error(&e),
        };
        let expected = if offset > 0 {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        if resp.status() != expected && resp.status() != StatusCode::OK {
            return self.passthrough(resp);
        }
        // A 200 to a range request restarts from byte 0.
        let body_offset = if resp.status() == StatusCode::OK {
            0
        } else {
            offset
        };
        self.start_download(writer, lead, size, resp, body_offset, progress)
    }

    async fn fetch_with(
        &self,
        store: &Store,
        lead: Lead,
        size: u64,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        match begin(store, &lead.digest, size).await {
            // This body starts at byte 0, so pieces a killed download left are rewritten.
            Ok(w) => self.start_download(w, lead, size, resp, 0, None),
            Err(e) => {
                info!(digest = %lead.digest, error = %e, "store cannot take this blob; streaming it through");
                self.passthrough(resp)
            }
        }
    }

    #[instrument(name = "origin.head", skip_all, fields(size = field::Empty))]
    async fn origin_size(
        &self,
        origin: &OriginRef,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<u64> {
        let mut req = Request::head(origin.uri(path).ok()?);
        if let Some(h) = req.headers_mut() {
            proxy::copy_headers(headers, h);
        }
        let resp = origin
            .upstream(&self.upstream)
            .send(req.body(crate::origin::empty()).ok()?)
            .await
            .ok()?;
        let size = resp
            .status()
            .is_success()
            .then(|| content_length(resp.headers()))
            .flatten();
        if let Some(size) = size {
            Span::current().record("size", size);
        }
        size
    }

    fn passthrough(&self, resp: Response<Incoming>) -> Response<Body> {
        self.outcome("passthrough");
        proxy::relay(resp)
    }

    /// The response's head; its body is read by the caller (see `origin.download`).
    #[instrument(name = "origin.get", skip_all, fields(from, status = field::Empty))]
    async fn origin_get(
        &self,
        origin: &OriginRef,
        path: &str,
        headers: &HeaderMap,
        from: Option<u64>,
    ) -> Result<Response<Incoming>, crate::origin::OriginError> {
        let mut headers = headers.clone();
        if let Some(off) = from {
            headers.insert(header::RANGE, hv(format!("bytes={off}-")));
        }
        let resp = origin
            .upstream(&self.upstream)
            .fetch_following(Method::GET, origin.uri(path)?, &headers)
            .await;
        match &resp {
            Ok(r) => Span::current().record("status", r.status().as_u16()),
            Err(_) => Span::current().record("otel.status_code", "ERROR"),
        };
        resp
    }

    fn start_download(
        &self,
        writer: BlobWriter,
        lead: Lead,
        size: u64,
        resp: Response<Incoming>,
        body_offset: u64,
        progress: Option<Progress>,
    ) -> Response<Body> {
        self.outcome("miss");
        let digest = lead.digest;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let job = Download {
            writer: Some(writer),
            digest,
            size,
            metrics: self.metrics.clone(),
            client: tx,
            progress,
            rate: self.origin_rate.clone(),
            bytes: BlobTrace::current_bytes(),
        };
        let body = resp.into_body();
        let swarm = self.swarm.clone();
        let span = info_span!(
            "origin.download",
            size,
            offset = body_offset,
            cached = field::Empty
        );
        tokio::spawn(
            async move {
                let (cached, progress) = job.run(body, body_offset).await;
                Span::current().record("cached", cached.is_some());
                lead.finish(cached.is_some());
                match (progress, swarm, cached) {
                    (Some(p), _, cached) => p.finish(cached).await,
                    (None, Some(swarm), Some(reader)) => swarm.announce_complete(reader).await,
                    _ => {}
                }
            }
            .instrument(span),
        );
        blob_response(StatusCode::OK, &digest, size, channel_body(rx))
    }

    /// Fetch from peers (and the origin for what they cannot give), streaming
    /// to the client in order and into the store.
    #[allow(clippy::too_many_arguments)]
    fn start_swarm(
        &self,
        swarm: Arc<Swarm>,
        writer: BlobWriter,
        lead: Lead,
        size: u64,
        holders: Holders,
        origin: &OriginRef,
        path: &str,
        headers: HeaderMap,
    ) -> Response<Body> {
        self.outcome("miss");
        let digest = lead.digest;
        let (upstream, origin, path) = (
            origin.upstream(&self.upstream).clone(),
            origin.clone(),
            path.to_string(),
        );
        let rate = self.origin_rate.clone();
        let range: RangeFetcher = Arc::new(move |start, end| {
            let (upstream, origin, path, headers, rate) = (
                upstream.clone(),
                origin.clone(),
                path.clone(),
                headers.clone(),
                rate.clone(),
            );
            Box::pin(async move {
                origin_range(&upstream, &origin, &path, headers, &rate, start, end).await
            })
        });
        let job = Driver {
            digest,
            peers: swarm.peers.clone(),
            origin: range,
            metrics: self.metrics.clone(),
            config: swarm.config.clone(),
            refresh: Some(swarm.refresher(digest, size)),
            progress: Some(progress_of(&swarm, &writer)),
            bytes: BlobTrace::current_bytes(),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let span = info_span!(
            "swarm.fetch",
            size,
            pieces = writer.pieces(),
            peers = field::Empty,
            pieces.peer = field::Empty,
            pieces.origin = field::Empty,
            cached = field::Empty,
            poisoned = field::Empty,
        );
        let (poisoned, store) = (self.poisoned.clone(), self.store.clone());
        tokio::spawn(
            async move {
                let outcome = job.run(writer, holders, tx).await;
                if outcome.poisoned {
                    Span::current().record("poisoned", true);
                    // The pieces match the lying hashes: drop them all, tell the
                    // tracker, and let the client's retry go to the origin.
                    poisoned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(digest, Instant::now());
                    if let Some(store) = store {
                        let _ = tokio::task::spawn_blocking(move || store.remove(&digest)).await;
                    }
                    if let Some(p) = outcome.progress {
                        p.abandon().await;
                    }
                    lead.finish(false);
                    return;
                }
                let committed = match outcome.writer {
                    Some(w) if w.missing_pieces().is_empty() => {
                        tokio::task::spawn_blocking(move || w.commit())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                    _ => None,
                };
                lead.finish(committed.is_some());
                Span::current().record("cached", committed.is_some());
                match &committed {
                    Some(_) => info!(%digest, size, "cached from the swarm"),
                    None => warn!(%digest, "swarm download not cached"),
                }
                if let Some(p) = outcome.progress {
                    p.finish(committed).await;
                }
            }
            .instrument(span),
        );
        blob_response(StatusCode::OK, &digest, size, channel_body(rx))
    }
}

/// The right to download one digest; whoever waits on it learns the outcome
/// when it is finished or dropped (a drop is a failure: followers go to the origin).
struct Lead {
    digest: Digest,
    inflight: Inflight,
    done: Option<watch::Sender<Option<bool>>>,
}

impl Lead {
    fn finish(mut self, ok: bool) {
        self.release(ok);
    }

    fn release(&mut self, ok: bool) {
        if let Some(done) = self.done.take() {
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.digest);
            let _ = done.send(Some(ok));
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// Downloads in progress by digest; each receiver learns whether it ended in the cache.
type Inflight = Arc<Mutex<HashMap<Digest, watch::Receiver<Option<bool>>>>>;

type Chunk = Result<Frame<Bytes>, BoxError>;

/// One origin download: every byte goes to the client that asked (while it
/// listens) and, piece by piece, into the store.
struct Download {
    /// `None` once a store error made us give up caching (the client stream goes on).
    writer: Option<BlobWriter>,
    digest: Digest,
    size: u64,
    metrics: Arc<Metrics>,
    client: mpsc::Sender<Chunk>,
    progress: Option<Progress>,
    rate: Arc<RateLimiter>,
    /// This request's bytes by source, for its trace.
    bytes: SourceBytes,
}

impl Download {
    /// Returns the blob as committed to the store, if it was, and the
    /// progress to finish.
    async fn run(
        mut self,
        body: Incoming,
        body_offset: u64,
    ) -> (Option<BlobReader>, Option<Progress>) {
        let cached = self.fetch(body, body_offset).await;
        (cached, self.progress.take())
    }

    async fn fetch(&mut self, mut body: Incoming, body_offset: u64) -> Option<BlobReader> {
        let piece_size = self.writer.as_ref().map(|w| w.piece_size()).unwrap_or(1);
        let mut client_open = true;
        // Pieces a killed download left behind go to the client first.
        let first_piece = body_offset / piece_size;
        for index in 0..first_piece {
            let piece = match self.with_writer(move |w| w.read_piece(index)).await {
                Some(Ok(p)) => p,
                _ => {
                    let _ = self
                        .client
                        .send(Err("damselfly: resumed piece unreadable".into()))
                        .await;
                    return None;
                }
            };
            self.metrics.blob_bytes("cache", piece.len() as u64);
            self.bytes.add("cache", piece.len() as u64);
            client_open = self.client.send(Ok(Frame::data(piece))).await.is_ok();
        }

        let mut pos = body_offset;
        let mut index = first_piece;
        let mut buf = BytesMut::new();
        loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    warn!(digest = %self.digest, error = %e, "origin body failed");
                    let _ = self.client.send(Err(Box::new(e))).await;
                    return None;
                }
                None => break,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pos += data.len() as u64;
            self.rate.acquire_high(data.len() as u64).await;
            self.metrics.blob_bytes("origin", data.len() as u64);
            self.bytes.add("origin", data.len() as u64);
            if client_open {
                client_open = self
                    .client
                    .send(Ok(Frame::data(data.clone())))
                    .await
                    .is_ok();
            }
            if self.writer.is_none() {
                if !client_open {
                    return None;
                }
                continue;
            }
            buf.extend_from_slice(&data);
            while buf.len() as u64 >= piece_size || (pos >= self.size && !buf.is_empty()) {
                let take = (piece_size as usize).min(buf.len());
                let piece = buf.split_to(take).freeze();
                let i = index;
                match self.with_writer(move |w| w.write_piece(i, &piece)).await {
                    Some(Ok(sum)) => {
                        if let Some(p) = &self.progress {
                            p.piece(i, sum);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(digest = %self.digest, error = %e, "store write failed; streaming the rest through");
                        self.writer = None;
                        break;
                    }
                    None => {}
                }
                index += 1;
            }
        }
        if pos != self.size {
            let _ = self
                .client
                .send(Err(
                    format!("origin sent {pos} of {} bytes", self.size).into()
                ))
                .await;
            return None;
        }
        let writer = self.writer.take()?;
        match tokio::task::spawn_blocking(move || writer.commit()).await {
            Ok(Ok(reader)) => {
                info!(digest = %self.digest, size = self.size, "cached");
                Some(reader)
            }
            Ok(Err(e)) => {
                warn!(digest = %self.digest, error = %e, "not cached");
                None
            }
            Err(_) => None,
        }
    }

    async fn with_writer<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut BlobWriter) -> T + Send + 'static,
    ) -> Option<T> {
        on_writer(&mut self.writer, f).await
    }
}

/// What serving the rest of a hit from the origin takes, should a piece be corrupt.
struct Continuation {
    upstream: OriginClient,
    rate: Arc<RateLimiter>,
    store: Option<Store>,
    metrics: Arc<Metrics>,
    digest: Digest,
    origin: OriginRef,
    headers: HeaderMap,
    path: String,
    bytes: SourceBytes,
}

async fn stream_hit(
    reader: BlobReader,
    start: u64,
    end: u64,
    tx: mpsc::Sender<Chunk>,
    ctx: Continuation,
) {
    let metrics = ctx.metrics.clone();
    let counted = ctx.bytes.clone();
    let sender = tx.clone();
    // Blocking reads on the blocking pool; returns where it stopped if a piece was corrupt.
    let stopped = tokio::task::spawn_blocking(move || {
        let mut pos = start;
        let chunks = match reader.read_range(start, end) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cached blob unreadable; the rest comes from the origin");
                return Some(pos);
            }
        };
        for chunk in chunks {
            match chunk {
                Ok(mut data) => {
                    pos += data.len() as u64;
                    metrics.blob_bytes("cache", data.len() as u64);
                    counted.add("cache", data.len() as u64);
                    // Zero-copy slices: the queue holds little more than one piece per client.
                    while !data.is_empty() {
                        let slice = data.split_to(data.len().min(HIT_SLICE));
                        if sender.blocking_send(Ok(Frame::data(slice))).is_err() {
                            return None;
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cached blob failed verification; the rest comes from the origin");
                    return Some(pos);
                }
            }
        }
        None
    })
    .await
    .unwrap_or(None);
    let Some(pos) = stopped else { return };
    let span = info_span!("origin.range", start = pos, end, repair = true);
    async move {
        if let Some(store) = &ctx.store {
            let (store, digest) = (store.clone(), ctx.digest);
            let _ = tokio::task::spawn_blocking(move || store.remove(&digest)).await;
        }
        let mut headers = strip_range(&ctx.headers);
        headers.insert(header::RANGE, hv(format!("bytes={pos}-{}", end - 1)));
        let resp = match ctx.origin.uri(&ctx.path) {
            Ok(uri) => {
                ctx.upstream
                    .fetch_following(Method::GET, uri, &headers)
                    .await
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let mut body = match resp {
            Ok(r) if r.status() == StatusCode::PARTIAL_CONTENT => r.into_body(),
            Ok(r) => {
                let _ = tx
                    .send(Err(format!(
                        "origin answered {} to the repair range",
                        r.status()
                    )
                    .into()))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        ctx.rate.acquire_high(d.len() as u64).await;
                        ctx.metrics.blob_bytes("origin", d.len() as u64);
                        ctx.bytes.add("origin", d.len() as u64);
                    }
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Bytes `[start, end)` of a blob from the origin, with the client's credential.
#[instrument(name = "origin.range", skip_all, fields(start, end, status = field::Empty))]
async fn origin_range(
    upstream: &OriginClient,
    origin: &OriginRef,
    path: &str,
    mut headers: HeaderMap,
    rate: &RateLimiter,
    start: u64,
    end: u64,
) -> Result<Bytes, BoxError> {
    headers.insert(header::RANGE, hv(format!("bytes={start}-{}", end - 1)));
    let resp = upstream
        .fetch_following(Method::GET, origin.uri(path)?, &headers)
        .await?;
    Span::current().record("status", resp.status().as_u16());
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err(format!("origin answered {} to a range request", resp.status()).into());
    }
    let mut body = resp.into_body();
    let mut data = BytesMut::with_capacity((end - start) as usize);
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            rate.acquire_high(chunk.len() as u64).await;
            data.extend_from_slice(&chunk);
        }
    }
    let data = data.freeze();
    if data.len() as u64 != end - start {
        return Err(format!("origin sent {} of {} bytes", data.len(), end - start).into());
    }
    Ok(data)
}

/// Starts telling the tracker what we hold of the blob `writer` fills.
fn progress_of(swarm: &Arc<Swarm>, writer: &BlobWriter) -> Progress {
    let bitmap = writer.bitmap().clone();
    // Only a resumed download holds pieces already; their sums are a few reads.
    let hashes = if bitmap.held() > 0 {
        writer.held_hashes().unwrap_or_default()
    } else {
        Vec::new()
    };
    Progress::start(
        swarm.clone(),
        writer.digest(),
        writer.size(),
        writer.piece_size(),
        bitmap,
        hashes,
    )
}

async fn begin(
    store: &Store,
    digest: &Digest,
    size: u64,
) -> Result<BlobWriter, crate::store::StoreError> {
    let (store, digest) = (store.clone(), *digest);
    tokio::task::spawn_blocking(move || store.begin(&digest, size))
        .await
        .unwrap_or_else(|e| {
            Err(crate::store::StoreError::Io {
                path: PathBuf::from("(blocking task)"),
                source: std::io::Error::other(e),
            })
        })
}

fn channel_body(rx: mpsc::Receiver<Chunk>) -> Body {
    let s = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    StreamBody::new(s).boxed()
}

fn blob_response(status: StatusCode, digest: &Digest, len: u64, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, hv(len.to_string()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert("docker-content-digest", hv(digest.to_string()));
    h.insert(header::ETAG, hv(format!("\"{digest}\"")));
    r
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn strip_range(h: &HeaderMap) -> HeaderMap {
    let mut h = h.clone();
    h.remove(header::RANGE);
    h.remove(header::IF_RANGE);
    h
}

fn hv(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::testing::http::{Pki, Server, reply};

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER_HEX: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const ALICE: &str = "Basic YWxpY2U6czNjcmV0";

    fn any_port() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn blobs(pki: &Pki) -> Blobs {
        Blobs::new(
            OriginClient::with_roots(pki.roots()),
            None,
            Arc::new(Metrics::new()),
            None,
        )
    }

    /// `registry.test` as a steered connection to `server` names it.
    fn steered(b: &Blobs, tls: bool, server: &Server) -> OriginRef {
        OriginRef::steered(&b.upstream, tls, "registry.test", server.addr)
    }

    fn creds(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    /// The private registry over TLS: alice may read blob `HEX` of
    /// `private/app`; nothing else is there.
    async fn private_registry(pki: &Pki) -> Server {
        Server::start(any_port(), Some(pki.server(&["registry.test"])), |s| {
            let authed = s.headers.get("authorization").is_some_and(|a| a == ALICE);
            match (authed, s.target.as_str()) {
                (false, _) => reply(401, &[("www-authenticate", "Basic realm=x".into())]),
                (true, t) if t == format!("/v2/private/app/blobs/sha256:{HEX}") => {
                    reply(200, &[("content-length", "1234".into())])
                }
                (true, _) => reply(404, &[]),
            }
        })
        .await
        .unwrap()
    }

    /// Its port 80: a redirect to https for every path.
    async fn port_80(https: u16) -> Server {
        Server::start(any_port(), None, move |s| {
            reply(
                301,
                &[(
                    "location",
                    format!("https://registry.test:{https}{}", s.target),
                )],
            )
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_redirect_to_https_is_followed_and_the_https_answer_decides() {
        let pki = Pki::new();
        let registry = private_registry(&pki).await;
        let http = port_80(registry.addr.port()).await;
        let b = blobs(&pki);
        let origin = steered(&b, false, &http);

        let a = b.authorize(&origin, "private/app", HEX, &creds(None)).await;
        assert!(matches!(a, Authz::Denied { answer: None }), "{a:?}");
        let a = b
            .authorize(&origin, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        // A yes, but the length came from elsewhere than the first answer.
        assert!(matches!(a, Authz::Allowed { size: None }), "{a:?}");
        assert_eq!(registry.seen().len(), 2);

        // The yes on port 80 is not one on 443: there the origin is asked again.
        let tls = steered(&b, true, &registry);
        let a = b.authorize(&tls, "private/app", HEX, &creds(None)).await;
        assert!(matches!(a, Authz::Denied { answer: Some(_) }), "{a:?}");
        let a = b
            .authorize(&tls, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Allowed { size: Some(1234) }), "{a:?}");
        assert_eq!(registry.seen().len(), 4);
        // Asked again within the minute: remembered.
        let a = b
            .authorize(&tls, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Allowed { size: None }), "{a:?}");
        assert_eq!(registry.seen().len(), 4);
    }

    #[tokio::test]
    async fn a_yes_for_one_blob_is_not_a_yes_for_another() {
        let pki = Pki::new();
        let registry = private_registry(&pki).await;
        let b = blobs(&pki);
        let origin = steered(&b, true, &registry);
        let a = b
            .authorize(&origin, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Allowed { .. }), "{a:?}");
        let a = b
            .authorize(&origin, "private/app", OTHER_HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Denied { .. }), "{a:?}");
    }

    #[tokio::test]
    async fn a_redirect_to_storage_that_answers_2xx_is_a_yes() {
        let pki = Pki::new();
        let storage = Server::start(any_port(), None, |_| reply(200, &[]))
            .await
            .unwrap();
        let to = format!("http://{}/bucket/{HEX}?sig=1", storage.addr);
        let registry =
            Server::start(
                any_port(),
                Some(pki.server(&["registry.test"])),
                move |s| match s.headers.get("authorization") {
                    Some(a) if a == ALICE => reply(307, &[("location", to.clone())]),
                    _ => reply(401, &[]),
                },
            )
            .await
            .unwrap();
        let b = blobs(&pki);
        let origin = steered(&b, true, &registry);
        let a = b
            .authorize(&origin, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Allowed { size: None }), "{a:?}");
        assert!(!storage.seen()[0].headers.contains_key("authorization"));
    }

    #[tokio::test]
    async fn a_redirect_that_ends_in_neither_yes_nor_refusal_is_no() {
        let pki = Pki::new();
        let broken = Server::start(any_port(), None, |_| reply(503, &[]))
            .await
            .unwrap();
        let to = format!("http://{}/bucket", broken.addr);
        let redirecting =
            Server::start(any_port(), Some(pki.server(&["registry.test"])), move |s| {
                if s.target.contains(HEX) {
                    reply(307, &[("location", to.clone())])
                } else {
                    reply(302, &[("location", s.target.clone())])
                }
            })
            .await
            .unwrap();
        let b = blobs(&pki);
        let origin = steered(&b, true, &redirecting);
        let a = b
            .authorize(&origin, "private/app", HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Unknown), "{a:?}");
        // A redirect loop.
        let a = b
            .authorize(&origin, "private/app", OTHER_HEX, &creds(Some(ALICE)))
            .await;
        assert!(matches!(a, Authz::Unknown), "{a:?}");
        assert!(
            b.metrics
                .encode()
                .contains("damselfly_authz_checks_total{result=\"error\"} 2"),
            "{}",
            b.metrics.encode()
        );
    }
}
