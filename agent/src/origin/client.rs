//! The origin client: real certificate verification (system roots plus
//! `--upstream-ca`), HTTP/2 and HTTP/1.1 by ALPN, pooled connections.
//!
//! Where a request goes is decided by who it is for, because any process
//! can name itself `ctr` and send any `Host` or SNI to any address:
//!
//! - A steered connection's requests go to its own original destination, on
//!   a client of its own ([`OriginClient::pinned`]): what one connection says
//!   never decides where another's requests, or the agent's, go.
//! - The agent's own requests (`/v1/fetch`, preheat) go where the node's
//!   resolver says, or over TLS to an address a steered client was going to
//!   once that address has answered TLS for the name ([`Learned`]); plain
//!   HTTP has nothing to verify, so there only the resolver counts.
//!
//! Hosts a redirect leads to (a CDN) are resolved normally; the agent's own
//! connects are never steered, so this cannot loop.

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
use hyper::{HeaderMap, Request, Response, StatusCode, Uri, body::Incoming, header, http::uri};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector, connect::dns::Name},
    rt::TokioExecutor,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub(super) const MAX_REDIRECTS: usize = 5;

/// Request headers that carry a client's identity: they follow a redirect
/// only where [`carries_credentials`] says so (Go's net/http list;
/// `Proxy-Authorization` never leaves the agent at all).
const CREDENTIAL_HEADERS: [header::HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::WWW_AUTHENTICATE,
];

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
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

/// Host (lowercase, no port) -> an address a steered client was going to
/// that then answered TLS for that name: only such an address is used for
/// the agent's own requests, and only over TLS.
#[derive(Clone, Default)]
pub(super) struct Learned(Arc<RwLock<HashMap<String, IpAddr>>>);

impl Learned {
    fn confirm(&self, host: &str, ip: IpAddr) {
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

/// hyper-util resolver for one client.
#[derive(Clone)]
enum Resolver {
    /// The agent's own requests: confirmed addresses (TLS only), else the
    /// system resolver.
    Agent { confirmed: Option<Learned> },
    /// A steered connection's client: its host at its destination; hosts a
    /// redirect names, by the system resolver.
    Pinned { host: Arc<str>, ip: IpAddr },
}

impl tower_service::Service<Name> for Resolver {
    type Response = vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let fixed = match self {
            Resolver::Agent { confirmed } => confirmed.as_ref().and_then(|l| l.get(name.as_str())),
            Resolver::Pinned { host, ip } => {
                name.as_str().eq_ignore_ascii_case(host).then_some(*ip)
            }
        };
        Box::pin(async move {
            if let Some(ip) = fixed {
                // The connector sets the port from the URI.
                return Ok(vec![SocketAddr::new(ip, 0)].into_iter());
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            Ok(addrs.into_iter())
        })
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector<Resolver>>, Body>;

#[derive(Clone)]
pub struct OriginClient {
    /// https requests.
    tls: HttpClient,
    /// Plain http requests (the same client as `tls` when pinned).
    plain: HttpClient,
    tls_config: Arc<rustls::ClientConfig>,
    learned: Learned,
    /// Set on a steered connection's client: the host it was named by and
    /// the address it was going to.
    pin: Option<(Arc<str>, IpAddr)>,
}

impl OriginClient {
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, OriginError> {
        let mut roots = rustls::RootCertStore::empty();
        // Honours SSL_CERT_FILE / SSL_CERT_DIR like the runtimes do.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = extra_ca {
            let ca_err = |source| OriginError::Ca {
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
            return Err(OriginError::NoRoots);
        }
        Ok(Self::with_roots(roots))
    }

    /// A client that trusts exactly `roots`.
    pub fn with_roots(roots: rustls::RootCertStore) -> Self {
        Self::with_tls(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// A client with its own TLS settings (e.g. the cluster's mutual TLS, to
    /// reach a seed's admin server).
    pub fn with_tls(mut tls: rustls::ClientConfig) -> Self {
        // hyper-rustls offers the ALPN of the HTTP versions it speaks itself.
        tls.alpn_protocols.clear();
        let tls_config = Arc::new(tls);
        let learned = Learned::default();
        let tls = client(
            &tls_config,
            Resolver::Agent {
                confirmed: Some(learned.clone()),
            },
        );
        let plain = client(&tls_config, Resolver::Agent { confirmed: None });
        Self {
            tls,
            plain,
            tls_config,
            learned,
            pin: None,
        }
    }

    /// A client for one steered connection that named `host` and was going
    /// to `ip`: every request to `host` goes to `ip`, on connections of its
    /// own (a pool shared by name would hand one destination's connections
    /// to another's requests). An answer over TLS there confirms `ip` for
    /// `host` (see [`Learned`]).
    pub fn pinned(&self, host: &str, ip: IpAddr) -> Self {
        let host: Arc<str> = host.to_ascii_lowercase().into();
        let c = client(
            &self.tls_config,
            Resolver::Pinned {
                host: host.clone(),
                ip,
            },
        );
        Self {
            tls: c.clone(),
            plain: c,
            tls_config: self.tls_config.clone(),
            learned: self.learned.clone(),
            pin: Some((host, ip)),
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, OriginError> {
        let tls = req.uri().scheme() == Some(&uri::Scheme::HTTPS);
        // The certificate was verified for this name at this address.
        let confirms = match (&self.pin, req.uri().host()) {
            (Some((host, ip)), Some(h)) if tls && h.eq_ignore_ascii_case(host) => {
                Some((host.clone(), *ip))
            }
            _ => None,
        };
        let client = if tls { &self.tls } else { &self.plain };
        let resp = client.request(req).await?;
        if let Some((host, ip)) = confirms {
            self.learned.confirm(&host, ip);
        }
        Ok(resp)
    }

    /// A bodiless request (GET/HEAD) that follows redirects itself, as the
    /// runtimes' HTTP library does; see [`OriginClient::follow`].
    pub async fn fetch_following(
        &self,
        method: hyper::Method,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, OriginError> {
        Ok(self.follow(method, uri, headers).await?.response)
    }

    /// A bodiless request (GET/HEAD) that follows up to [`MAX_REDIRECTS`]
    /// redirects, sending the credential headers only where
    /// [`carries_credentials`] allows (a CDN must not see registry
    /// credentials). Returns the first answer that is not a redirect.
    pub async fn follow(
        &self,
        method: hyper::Method,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Followed, OriginError> {
        let initial = uri.clone();
        let mut uri = uri;
        for hops in 0..=MAX_REDIRECTS {
            let mut req = Request::builder().method(method.clone()).uri(uri.clone());
            let credentials = carries_credentials(&initial, &uri);
            for (k, v) in headers {
                if k == header::HOST || (!credentials && CREDENTIAL_HEADERS.contains(k)) {
                    continue;
                }
                req = req.header(k, v);
            }
            let resp = self.send(req.body(empty())?).await?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(Followed {
                    response: resp,
                    redirects: hops,
                });
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| OriginError::Redirect("redirect without Location".into()))?;
            uri = resolve(&uri, location)?;
        }
        Err(OriginError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

/// The answer at the end of a chain of redirects.
pub struct Followed {
    pub response: Response<Incoming>,
    /// How many redirects led to it (0: the first request's own answer).
    pub redirects: usize,
}

fn client(tls: &Arc<rustls::ClientConfig>, resolver: Resolver) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(30)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((**tls).clone())
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// Whether a request first sent to `initial` takes its credentials along to
/// `to`, where a redirect led. As Go's net/http does it (containerd, Docker,
/// Podman, CRI-O, skopeo all pull with it): to the same host, whatever the
/// port, and from plain HTTP up to HTTPS (port 80 of a registry that
/// answers everything with a redirect to https); never to another host, not
/// even a subdomain, which Go would allow; and, stricter than Go again,
/// never from HTTPS down to plain HTTP, where anyone on the path could read them.
pub fn carries_credentials(initial: &Uri, to: &Uri) -> bool {
    let same_host = match (initial.host(), to.host()) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    };
    let downgrade =
        initial.scheme() == Some(&uri::Scheme::HTTPS) && to.scheme() != Some(&uri::Scheme::HTTPS);
    same_host && !downgrade
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A `Location` relative to the URI it came from.
fn resolve(base: &Uri, location: &str) -> Result<Uri, OriginError> {
    let bad = |_| OriginError::Redirect(format!("unusable Location {location:?}"));
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(bad);
    }
    let scheme = base.scheme_str().unwrap_or("https");
    if location.starts_with("//") {
        return format!("{scheme}:{location}").parse().map_err(bad);
    }
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
    fn scheme_relative_locations_keep_the_scheme() {
        let base: Uri = "https://r.example/v2/x".parse().unwrap();
        assert_eq!(
            resolve(&base, "//cdn.example/a").unwrap().to_string(),
            "https://cdn.example/a"
        );
    }

    #[test]
    fn learned_hosts_are_case_insensitive() {
        let l = Learned::default();
        l.confirm("Registry.Example", "10.0.0.1".parse().unwrap());
        assert_eq!(l.get("registry.example"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(l.get("other"), None);
    }

    #[test]
    fn credentials_follow_a_redirect_only_on_the_same_host_and_never_down_to_http() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        for (from, to, carried) in [
            ("http://r.io/v2/x", "https://r.io/v2/x", true),
            ("http://r.io/v2/x", "https://R.IO:8443/v2/x", true),
            ("https://r.io/v2/x", "https://r.io/other", true),
            ("https://r.io:5000/v2/x", "https://r.io/v2/x", true),
            ("https://r.io/v2/x", "http://r.io/v2/x", false),
            ("https://r.io/v2/x", "https://cdn.io/blob?sig=1", false),
            ("https://r.io/v2/x", "https://s3.r.io/blob", false),
            ("http://r.io/v2/x", "http://10.0.0.1/v2/x", false),
        ] {
            assert_eq!(
                carries_credentials(&u(from), &u(to)),
                carried,
                "{from} -> {to}"
            );
        }
    }

    use crate::testing::http::{Pki, Seen, Server, reply};
    use hyper::Method;

    fn at(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    fn has(seen: &Seen, name: &str) -> bool {
        seen.headers.contains_key(name)
    }

    /// Port 80 answers everything with a redirect to https, as most
    /// registries and ingresses do; the registry sends blobs to storage.
    #[tokio::test]
    async fn a_redirect_keeps_the_credential_up_to_https_and_drops_it_for_storage() {
        let pki = Pki::new();
        let storage = Server::start(at("127.0.0.1", 0), None, |_| reply(200, &[]))
            .await
            .unwrap();
        let to_storage = format!("http://{}/bucket/blob?sig=1", storage.addr);
        let registry = Server::start(
            at("127.0.0.1", 0),
            Some(pki.server(&["registry.test"])),
            move |s| match s.headers.get("authorization") {
                Some(a) if a == "Basic ok" => reply(307, &[("location", to_storage.clone())]),
                _ => reply(401, &[]),
            },
        )
        .await
        .unwrap();
        let https = registry.addr.port();
        let port80 = Server::start(at("127.0.0.1", 0), None, move |s| {
            reply(
                301,
                &[(
                    "location",
                    format!("https://registry.test:{https}{}", s.target),
                )],
            )
        })
        .await
        .unwrap();

        let up = OriginClient::with_roots(pki.roots())
            .pinned("registry.test", "127.0.0.1".parse().unwrap());
        let uri: Uri = format!(
            "http://registry.test:{}/v2/r/blobs/sha256:ab",
            port80.addr.port()
        )
        .parse()
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic ok".parse().unwrap());
        headers.insert(header::COOKIE, "session=1".parse().unwrap());
        let f = up
            .follow(Method::HEAD, uri.clone(), &headers)
            .await
            .unwrap();
        assert_eq!((f.response.status().as_u16(), f.redirects), (200, 2));
        assert!(has(&port80.seen()[0], "authorization"));
        assert!(has(&registry.seen()[0], "authorization"));
        let at_storage = &storage.seen()[0];
        assert_eq!(at_storage.target, "/bucket/blob?sig=1");
        assert!(!has(at_storage, "authorization") && !has(at_storage, "cookie"));

        let f = up
            .follow(Method::HEAD, uri, &HeaderMap::new())
            .await
            .unwrap();
        assert_eq!((f.response.status().as_u16(), f.redirects), (401, 1));
        assert_eq!(storage.seen().len(), 1);
    }

    #[tokio::test]
    async fn redirects_without_end_are_an_error() {
        let looping = Server::start(at("127.0.0.1", 0), None, |s| {
            reply(302, &[("location", s.target.clone())])
        })
        .await
        .unwrap();
        let up = OriginClient::with_roots(Pki::new().roots());
        let uri: Uri = format!("http://{}/v2/r/blobs/sha256:ab", looping.addr)
            .parse()
            .unwrap();
        let err = up
            .follow(Method::HEAD, uri, &HeaderMap::new())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OriginError::Redirect(_)), "{err}");
        assert_eq!(looping.seen().len(), MAX_REDIRECTS + 1);
    }

    /// Two servers on one port: where the node's resolver puts `localhost`
    /// (127.0.0.1) and an address a steered client chose (127.0.0.2).
    async fn real_and_chosen(
        tls: Option<Arc<rustls::ServerConfig>>,
        chosen: &str,
    ) -> (Server, Server) {
        loop {
            let real = Server::start(at("127.0.0.1", 0), tls.clone(), |_| reply(200, &[]))
                .await
                .unwrap();
            if let Ok(other) = Server::start(at(chosen, real.addr.port()), tls.clone(), |_| {
                reply(200, &[])
            })
            .await
            {
                return (real, other);
            }
        }
    }

    async fn get(up: &OriginClient, url: &str) -> Result<u16, OriginError> {
        let req = Request::get(url).body(empty()).unwrap();
        Ok(up.send(req).await?.status().as_u16())
    }

    #[tokio::test]
    async fn a_steered_connections_destination_serves_its_own_requests_only() {
        let (real, chosen) = real_and_chosen(None, "127.0.0.2").await;
        let agent = OriginClient::with_roots(Pki::new().roots());
        let steered = agent.pinned("localhost", "127.0.0.2".parse().unwrap());
        let url = format!("http://localhost:{}/v2/", real.addr.port());
        assert_eq!(get(&steered, &url).await.unwrap(), 200);
        assert_eq!((chosen.seen().len(), real.seen().len()), (1, 0));

        // Neither the agent's own request nor another connection's follows it.
        assert_eq!(get(&agent, &url).await.unwrap(), 200);
        let other = agent.pinned("localhost", "127.0.0.1".parse().unwrap());
        assert_eq!(get(&other, &url).await.unwrap(), 200);
        assert_eq!((chosen.seen().len(), real.seen().len()), (1, 2));
    }

    #[tokio::test]
    async fn only_an_address_that_answered_tls_for_the_name_serves_the_agents_own_requests() {
        let pki = Pki::new();
        let (real, liar) =
            real_and_chosen(Some(Pki::new().server(&["localhost"])), "127.0.0.2").await;
        // The resolver's address has no certificate we trust: we can tell
        // by its failure where a request went.
        let https = format!("https://localhost:{}/v2/", real.addr.port());
        let agent = OriginClient::with_roots(pki.roots());

        // A destination whose certificate does not verify confirms nothing.
        let steered = agent.pinned("localhost", "127.0.0.2".parse().unwrap());
        assert!(get(&steered, &https).await.is_err());
        assert_eq!(liar.connections(), 1);
        assert_eq!(agent.learned.get("localhost"), None);
        assert!(get(&agent, &https).await.is_err());
        assert_eq!((liar.connections(), real.connections()), (1, 1));

        // One that verifies is where the agent's own TLS requests go from then on.
        let good = Server::start(
            at("127.0.0.3", real.addr.port()),
            Some(pki.server(&["localhost"])),
            |_| reply(204, &[]),
        )
        .await
        .unwrap();
        let steered = agent.pinned("localhost", "127.0.0.3".parse().unwrap());
        assert_eq!(get(&steered, &https).await.unwrap(), 204);
        assert_eq!(
            agent.learned.get("localhost"),
            Some("127.0.0.3".parse().unwrap())
        );
        assert_eq!(get(&agent, &https).await.unwrap(), 204);
        assert_eq!(good.seen().len(), 2);

        // Plain HTTP has nothing to verify: only the resolver says where.
        let (plain_real, plain_good) = real_and_chosen(None, "127.0.0.3").await;
        let http = format!("http://localhost:{}/v2/", plain_real.addr.port());
        assert_eq!(get(&agent, &http).await.unwrap(), 200);
        assert_eq!((plain_real.seen().len(), plain_good.seen().len()), (1, 0));
    }
}
