//! Where one registry's requests go: the host a client named and, for a
//! steered connection, the destination it was going to.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::Uri;
use tokio::sync::OnceCell;
use tracing::debug;

use super::OriginClient;

/// Where requests for one registry go: those of one intercepted
/// connection, or one of the agent's own (`/v1/fetch`).
#[derive(Debug, Clone)]
pub struct OriginRef {
    /// "https" or "http".
    pub scheme: &'static str,
    /// Host as the client named it (SNI or Host), lowercase, without port.
    pub host: String,
    /// The original destination port.
    pub port: u16,
    /// Set when a steered connection asks: where it was going.
    pub steered: Option<Steered>,
}

/// A steered connection's own destination and the client that reaches it.
/// Its host and address are the client's word only: they are used for its
/// own requests and for nothing else.
#[derive(Clone)]
pub struct Steered {
    pub dest: SocketAddr,
    upstream: OriginClient,
    /// Plain HTTP only: whether the node's resolver gives `dest` for the
    /// host (asked once, when a blob is first asked for).
    resolves: Arc<OnceCell<bool>>,
}

impl std::fmt::Debug for Steered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steered").field("dest", &self.dest).finish()
    }
}

/// How long the node's resolver may take to say where a plain HTTP
/// registry is; past that its address counts as unconfirmed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl OriginRef {
    /// One of the agent's own requests: the host is reached where the
    /// agent trusts it to be (see [`OriginClient`]).
    pub fn new(scheme: &'static str, host: &str, port: u16) -> Self {
        Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            steered: None,
        }
    }

    /// The origin of a steered connection that named `host` (SNI or Host)
    /// and was going to `dest`: its requests go to `dest`, on connections
    /// of its own.
    pub fn steered(upstream: &OriginClient, tls: bool, host: &str, dest: SocketAddr) -> Self {
        let host = host.to_ascii_lowercase();
        Self {
            scheme: if tls { "https" } else { "http" },
            steered: Some(Steered {
                dest,
                upstream: upstream.pinned(&host, dest.ip()),
                resolves: Arc::default(),
            }),
            port: dest.port(),
            host,
        }
    }

    /// The client for this origin's requests: the steered connection's
    /// own, or `agent`'s for the agent's own requests.
    pub fn upstream<'a>(&'a self, agent: &'a OriginClient) -> &'a OriginClient {
        self.steered.as_ref().map_or(agent, |s| &s.upstream)
    }

    /// Whether answers from where this origin's requests go are the named
    /// registry's, so that they may decide who gets a cached blob. Over
    /// TLS the certificate is verified for the name on every connection;
    /// plain HTTP has nothing to verify, so a steered connection's
    /// destination counts only if the node's resolver gives it for the
    /// host. The agent's own requests go where it resolves the name.
    pub async fn confirmed(&self) -> bool {
        let Some(s) = &self.steered else {
            return true;
        };
        if self.scheme == "https" {
            return true;
        }
        *s.resolves
            .get_or_init(|| async {
                let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(mut addrs)) => addrs.any(|a| a.ip() == s.dest.ip()),
                    Ok(Err(e)) => {
                        debug!(host = %self.host, error = %e, "resolving a plain HTTP registry");
                        false
                    }
                    Err(_) => false,
                }
            })
            .await
    }

    pub fn authority(&self) -> String {
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn uri(&self, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
        Uri::builder()
            .scheme(self.scheme)
            .authority(self.authority())
            .path_and_query(path_and_query)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_omits_default_ports() {
        let o = OriginRef::new("https", "r.io", 443);
        assert_eq!(
            o.uri("/v2/?x=1").unwrap().to_string(),
            "https://r.io/v2/?x=1"
        );
        let o = OriginRef::new("http", "r.io", 5000);
        assert_eq!(o.authority(), "r.io:5000");
    }

    /// A plain HTTP destination is the registry's only where the node's
    /// resolver puts the name (here `localhost`, 127.0.0.1); over TLS the
    /// certificate speaks for every connection.
    #[tokio::test]
    async fn a_plain_http_destination_counts_only_where_the_resolver_puts_the_name() {
        let up = OriginClient::with_roots(crate::testing::http::Pki::new().roots());
        let dest = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);
        let o = OriginRef::steered(&up, false, "LocalHost", dest("127.0.0.1", 80));
        assert!(o.confirmed().await);
        assert_eq!(o.authority(), "localhost");
        assert!(
            !OriginRef::steered(&up, false, "localhost", dest("127.0.0.2", 80))
                .confirmed()
                .await
        );
        assert!(
            OriginRef::steered(&up, true, "localhost", dest("127.0.0.2", 443))
                .confirmed()
                .await
        );
        assert!(OriginRef::new("http", "localhost", 80).confirmed().await);
    }
}
