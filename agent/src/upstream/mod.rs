//! The origin client: real certificate verification (system roots plus
//! `--upstream-ca`), HTTP/2 and HTTP/1.1 by ALPN, pooled connections.
//!
//! A registry host is dialled at the address its steered client was going to
//! (learned per host by the interceptor), never re-resolved: what the node's
//! DNS said to the runtime is what we use. Hosts we were never steered to (a
//! CDN a blob redirects to) are resolved normally; the agent's own connects
//! are never steered, so this cannot loop.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
    vec,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, Uri, body::Incoming, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector, connect::dns::Name},
    rt::TokioExecutor,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading --upstream-ca {path}: {source}")]
    Ca { path: String, source: io::Error },
    #[error("no usable root certificates (system store empty and no --upstream-ca)")]
    NoRoots,
    #[error("request to the origin: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error("bad redirect from the origin: {0}")]
    Redirect(String),
    #[error("building a request: {0}")]
    Http(#[from] hyper::http::Error),
}

/// Host (lowercase, no port) -> the IP its steered clients connected to.
#[derive(Clone, Default)]
pub struct Learned(Arc<RwLock<HashMap<String, IpAddr>>>);

impl Learned {
    pub fn learn(&self, host: &str, ip: IpAddr) {
        let host = host.to_ascii_lowercase();
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if map.get(&host) != Some(&ip) {
            map.insert(host, ip);
        }
    }

    fn get(&self, host: &str) -> Option<IpAddr> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(&host.to_ascii_lowercase()).copied()
    }
}

/// hyper-util resolver: learned addresses first, the system resolver otherwise.
#[derive(Clone)]
struct Resolver(Learned);

impl tower_service::Service<Name> for Resolver {
    type Response = vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let learned = self.0.get(name.as_str());
        Box::pin(async move {
            if let Some(ip) = learned {
                // The connector sets the port from the URI.
                return Ok(vec![SocketAddr::new(ip, 0)].into_iter());
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            Ok(addrs.into_iter())
        })
    }
}

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector<Resolver>>, Body>,
    pub learned: Learned,
}

impl Upstream {
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, UpstreamError> {
        let mut roots = rustls::RootCertStore::empty();
        // Honours SSL_CERT_FILE / SSL_CERT_DIR like the runtimes do.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = extra_ca {
            let ca_err = |source| UpstreamError::Ca {
                path: path.display().to_string(),
                source,
            };
            let pem = std::fs::read(path).map_err(ca_err)?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(ca_err)?)
                    .map_err(|e| ca_err(io::Error::other(e)))?;
            }
        }
        if roots.is_empty() {
            return Err(UpstreamError::NoRoots);
        }
        Ok(Self::with_tls(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    }

    /// A client with its own TLS settings (e.g. the cluster's mutual TLS, to
    /// reach a seed's admin server).
    pub fn with_tls(mut tls: rustls::ClientConfig) -> Self {
        // hyper-rustls offers the ALPN of the HTTP versions it speaks itself.
        tls.alpn_protocols.clear();
        let learned = Learned::default();
        let mut http = HttpConnector::new_with_resolver(Resolver(learned.clone()));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Self { client, learned }
    }

    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        Ok(self.client.request(req).await?)
    }

    /// A bodiless request (GET/HEAD) that follows redirects itself, dropping
    /// `Authorization` when a redirect leaves the original host (as Docker does:
    /// a CDN must not see registry credentials).
    pub async fn fetch_following(
        &self,
        method: hyper::Method,
        uri: Uri,
        headers: &hyper::HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin_host = uri.host().map(str::to_ascii_lowercase);
        let mut uri = uri;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder().method(method.clone()).uri(uri.clone());
            let same_host = uri.host().map(str::to_ascii_lowercase) == origin_host;
            for (k, v) in headers {
                if k == header::HOST || (!same_host && k == header::AUTHORIZATION) {
                    continue;
                }
                req = req.header(k, v);
            }
            let resp = self.send(req.body(empty())?).await?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| UpstreamError::Redirect("redirect without Location".into()))?;
            uri = resolve(&uri, location)?;
        }
        Err(UpstreamError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A `Location` relative to the URI it came from.
fn resolve(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |_| UpstreamError::Redirect(format!("unusable Location {location:?}"));
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(bad);
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}").parse().map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_and_relative() {
        let base: Uri = "https://r.example/v2/x/blobs/sha256:ab".parse().unwrap();
        assert_eq!(
            resolve(&base, "https://cdn.example/a?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/a?sig=1"
        );
        assert_eq!(
            resolve(&base, "/other").unwrap().to_string(),
            "https://r.example/other"
        );
        assert_eq!(
            resolve(&base, "y").unwrap().to_string(),
            "https://r.example/v2/x/blobs/y"
        );
    }

    #[test]
    fn learned_hosts_are_case_insensitive() {
        let l = Learned::default();
        l.learn("Registry.Example", "10.0.0.1".parse().unwrap());
        assert_eq!(l.get("registry.example"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(l.get("other"), None);
    }
}
