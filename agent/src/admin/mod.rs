//! Admin HTTP: `/healthz`, `/metrics` (Prometheus text), `/status` (JSON for
//! `damselfly status`), `/v1/fetch` (blobs for `damselfly get` and `preheat`).

pub mod fetch;
pub mod metrics;
pub mod trace;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    steer::{AttachedProgram, PortCounters, Rules, Steering},
    upstream::Body,
};
use fetch::Fetcher;
use metrics::{InterceptTotals, Metrics};

/// What `/status` returns and `damselfly status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    /// A seed steers nothing: cgroup, pins, programs and counters are empty.
    #[serde(default)]
    pub seed: bool,
    pub pid: u32,
    pub cgroup: String,
    pub pin_dir: String,
    pub listen: Vec<SocketAddr>,
    pub programs: Vec<AttachedProgram>,
    pub rules: Rules,
    pub counters: Vec<PortCounters>,
    pub intercept: InterceptTotals,
}

pub struct Admin {
    pub instance: String,
    pub listen: Vec<SocketAddr>,
    /// `None` on a seed, which takes no node's connections.
    pub steering: Option<Arc<Steering>>,
    pub metrics: Arc<Metrics>,
    /// `None` with --splice-only (no cache, no registry client).
    pub fetch: Option<Fetcher>,
}

impl Admin {
    pub fn status(&self) -> Status {
        let intercept = self.metrics.intercept_totals();
        let Some(s) = &self.steering else {
            return Status {
                instance: self.instance.clone(),
                seed: true,
                pid: std::process::id(),
                cgroup: String::new(),
                pin_dir: String::new(),
                listen: self.listen.clone(),
                programs: Vec::new(),
                rules: Rules {
                    ports: Vec::new(),
                    comms: Vec::new(),
                    exclude: Vec::new(),
                },
                counters: Vec::new(),
                intercept,
            };
        };
        Status {
            instance: self.instance.clone(),
            seed: false,
            pid: std::process::id(),
            cgroup: s.cgroup.display().to_string(),
            pin_dir: s.pin_dir.display().to_string(),
            listen: self.listen.clone(),
            programs: s.attached.clone(),
            rules: s.rules.clone(),
            counters: s.counters(),
            intercept,
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    warn!(error = %e, "admin connection");
                }
            });
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
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

fn text(code: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}
