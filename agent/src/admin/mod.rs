//! Admin HTTP: `/healthz`, `/metrics` (Prometheus text), `/status` (JSON for
//! `damselfly status`).

pub mod metrics;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::warn;

use crate::steer::{AttachedProgram, PortCounters, Rules, Steering};
use metrics::{InterceptTotals, Metrics};

/// What `/status` returns and `damselfly status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
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
    pub steering: Arc<Steering>,
    pub metrics: Arc<Metrics>,
}

impl Admin {
    pub fn status(&self) -> Status {
        let s = &self.steering;
        Status {
            instance: self.instance.clone(),
            pid: std::process::id(),
            cgroup: s.cgroup.display().to_string(),
            pin_dir: s.pin_dir.display().to_string(),
            listen: self.listen.clone(),
            programs: s.attached.clone(),
            rules: s.rules.clone(),
            counters: s.counters(),
            intercept: self.metrics.intercept_totals(),
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
                    async move { Ok::<_, Infallible>(this.route(req)) }
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

    fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
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
                "not found: try /healthz, /metrics, /status\n".into(),
            ),
        }
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r
}
