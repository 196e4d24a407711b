//! Blob requests, the HTTP side: ask the origin whether this client may
//! have the blob, answer HEAD and `Range` requests, and build the responses.
//! Where the bytes come from (cache, swarm, origin) is [`crate::acquire`]'s
//! business; without the origin's yes, or without a store, the request goes
//! to the origin as it came.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use tokio::sync::mpsc;
use tracing::{Instrument, Span, debug, field, info, instrument};

use crate::{
    acquire::{Acquire, Acquired, Chunk, OriginBlob},
    origin::{
        Body, OriginClient, OriginRef,
        headers::{content_length, copy_headers, value as hv, without_range},
    },
    registry::{
        authz::{AuthzCache, Subject, Verdict},
        blob_trace::BlobTrace,
        proxy,
        range::{self, ByteRange},
    },
    store::{BlobReader, Store},
    swarm::Swarm,
    telemetry::Metrics,
    vocab::{Digest, RateLimiter},
};

pub struct Blobs {
    pub upstream: OriginClient,
    pub metrics: Arc<Metrics>,
    authz: Mutex<AuthzCache>,
    /// Where the bytes come from; `None` without a store: every blob
    /// request is carried to the origin as it came.
    acquire: Option<Acquire>,
}

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
        let acquire = store.map(|store| {
            Acquire::new(
                store,
                metrics.clone(),
                swarm,
                Arc::new(RateLimiter::unlimited()),
            )
        });
        Self {
            upstream,
            metrics,
            authz: Mutex::default(),
            acquire,
        }
    }

    /// Limits origin blob bytes to `bytes_per_sec` (0: no limit).
    pub fn with_origin_rate(mut self, bytes_per_sec: u64) -> Self {
        if let Some(a) = &mut self.acquire {
            a.origin_rate = Arc::new(RateLimiter::new(bytes_per_sec));
        }
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
        let (Some(acquire), Ok(digest)) = (&self.acquire, hex.parse::<Digest>()) else {
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
        let held = acquire.store.get(&digest);
        let cached = Some(held.is_some());
        (
            self.serve_allowed(acquire, held, digest, size, req, origin)
                .await,
            cached,
        )
    }

    /// Serves a blob the origin said this client may have.
    async fn serve_allowed(
        &self,
        acquire: &Acquire,
        held: Option<BlobReader>,
        digest: Digest,
        size: Option<u64>,
        req: Request<Incoming>,
        origin: &OriginRef,
    ) -> Response<Body> {
        if let Some(reader) = held {
            self.outcome("hit");
            return self.hit(acquire, reader, req, origin);
        }
        // A HEAD, or a ranged GET (a client resuming its own partial download),
        // is the origin's to answer: caching starts with a whole-blob GET.
        if req.method() == Method::HEAD || req.headers().contains_key(header::RANGE) {
            self.outcome("passthrough");
            return self.carry(origin, req).await;
        }
        let blob = self.origin_blob(origin, &req);
        match acquire
            .get(digest, size, blob, BlobTrace::current_bytes())
            .await
        {
            Acquired::Cached(reader) => {
                self.outcome("hit");
                self.hit(acquire, reader, req, origin)
            }
            Acquired::Streaming { size, body } => {
                self.outcome("miss");
                blob_response(StatusCode::OK, &digest, size, channel_body(body))
            }
            Acquired::Relay(resp) => {
                self.outcome("passthrough");
                proxy::relay(resp)
            }
            Acquired::Carry => {
                self.outcome("passthrough");
                self.carry(origin, req).await
            }
            Acquired::Unreachable(e) => proxy::origin_error(&e),
        }
    }

    /// The origin's side of this request's blob, with the client's headers.
    fn origin_blob(&self, origin: &OriginRef, req: &Request<Incoming>) -> OriginBlob {
        OriginBlob::new(
            &self.upstream,
            origin,
            req.uri().path(),
            without_range(req.headers()),
        )
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
        copy_headers(headers, &mut ask);
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
        acquire: &Acquire,
        reader: BlobReader,
        req: Request<Incoming>,
        origin: &OriginRef,
    ) -> Response<Body> {
        let digest = &reader.digest();
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
            let blob = self.origin_blob(origin, &req);
            let rx = acquire.read(reader, (start, end), blob, BlobTrace::current_bytes());
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
