//! Admin HTTP: `/healthz`, `/metrics` (Prometheus text), `/status` (JSON for
//! `damselfly status`), `/v1/fetch` (blobs for `damselfly get` and `preheat`).
//!
//! Who may ask for what: `/healthz` and `/metrics` answer anyone who reaches
//! the address (probes, Prometheus). Everything else (blob bytes, the node's
//! configuration) only a caller on loopback (this node: `damselfly get`,
//! `status`, `kubectl port-forward`) or one that presents a certificate of the
//! cluster CA over TLS (`damselfly preheat` to a seed). TLS is offered on the
//! same port, told apart by its first byte, when the agent has a cluster PKI.

mod fetch;
mod status;

pub use status::{CacheStatus, PeerStatus, ReplicaStatus};

pub use fetch::{CACHE_HEADER, Fetcher, fetch_uri};
pub use status::PEERS_RECENT;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
pub use tokio_rustls::TlsAcceptor;
use tracing::warn;

use crate::{
    intercept::ClientTrust,
    origin::Body,
    steer::Steering,
    store::Store,
    telemetry::{Metrics, RecentErrors},
};
pub use status::{Status, SwarmParts};

pub struct Admin {
    pub instance: String,
    pub listen: Vec<SocketAddr>,
    /// `None` on a seed, which takes no node's connections.
    pub steering: Option<Arc<Steering>>,
    pub metrics: Arc<Metrics>,
    /// `None` with --splice-only (no cache, no registry client).
    pub fetch: Option<Fetcher>,
    /// `None` where no TLS is terminated (a seed, --splice-only).
    pub trust: Option<Arc<ClientTrust>>,
    /// `None` without a tracker or a cache.
    pub swarm: Option<SwarmParts>,
    /// `None` with --splice-only, or when the cache could not be opened.
    pub store: Option<Store>,
    /// The last warnings and errors logged.
    pub recent: RecentErrors,
}

impl Admin {
    /// Serve `listener`; with `tls`, a connection whose first byte is a TLS
    /// handshake is served over TLS, its client certificate checked by `tls`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let local = peer.ip().to_canonical().is_loopback();
                let result = match tls {
                    Some(tls) if starts_with_tls(&stream).await => {
                        match timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                            // rustls has verified the client's chain to the cluster CA.
                            Ok(Ok(stream)) => this.serve_connection(stream, true).await,
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => return,
                        }
                    }
                    _ => this.serve_connection(stream, local).await,
                };
                if let Err(e) = result {
                    warn!(error = %e, %peer, "admin connection");
                }
            });
        }
    }

    async fn serve_connection<S>(
        self: Arc<Self>,
        stream: S,
        trusted: bool,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.route(req, trusted).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await?;
        Ok(())
    }

    async fn route(&self, req: Request<Incoming>, trusted: bool) -> Response<Body> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        let path = req.uri().path();
        if !trusted && !matches!(path, "/healthz" | "/metrics") {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "{path} answers only callers on this node (loopback) or with a certificate \
                     of the cluster CA (https, mutual TLS); /healthz and /metrics answer anyone\n"
                ),
            );
        }
        match path {
            fetch::PATH => match &self.fetch {
                Some(f) => f.handle(req).await,
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this agent runs --splice-only: it fetches no blobs\n".into(),
                ),
            },
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            "/status" => {
                let body = serde_json::to_string_pretty(&self.status()).unwrap_or_default();
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /metrics, /status, /v1/fetch?url=BLOB-URL\n".into(),
            ),
        }
    }
}

/// A slow or silent client gets this long to start and finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS record starts with content type 22 (handshake); no HTTP request does.
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == 0x16
    )
}

fn text(code: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}
