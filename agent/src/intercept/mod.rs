//! Accept steered connections, name them from their first bytes, and carry
//! them on, byte for byte, to where they were going.

mod drain;
mod peek;
mod rewind;
mod trust;

pub use drain::Drain;
pub use peek::{PEEK_LIMIT, Peek, classify};
pub use trust::{ClientTrust, Refusal, TrustVerdict, Verdict};

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::{
    origin::{OriginRef, RegistryHosts, hosts},
    registry::RegistryService,
    steer::{Client, Steering},
    telemetry::Metrics,
};
use rewind::Rewind;

/// How long to wait for a client's first bytes. Registry clients speak first;
/// after this we splice without a name.
const PEEK_TIMEOUT: Duration = Duration::from_secs(2);
/// A destination that does not answer gets the client a reset after this,
/// rather than a connection that hangs forever on our side.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const SPLICE_BUF: usize = 64 * 1024;

pub struct Interceptor {
    pub steering: Arc<Steering>,
    pub metrics: Arc<Metrics>,
    /// Connections carried now, and the signal to finish them (SIGTERM).
    pub drain: Drain,
    /// Clients that do not trust the node CA get their connections spliced.
    pub trust: Arc<ClientTrust>,
    /// Registry hosts are terminated and served; `None` splices everything.
    pub gateway: Option<Gateway>,
}

/// What terminating registry connections takes.
pub struct Gateway {
    pub hosts: RegistryHosts,
    /// Leaf certificates minted per SNI by the node CA; ALPN h2 and http/1.1.
    pub tls: Arc<rustls::ServerConfig>,
    pub service: Arc<RegistryService>,
}

/// How one steered connection is carried.
enum Plan {
    Splice,
    Terminate { tls: bool, host: String },
}

impl Interceptor {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let tracked = self.drain.track();
            // The requests on a terminated connection have traces of their
            // own (one per blob) that link back to this span.
            let span = info_span!(
                "connection",
                client = %peer,
                dest = field::Empty,
                proto = field::Empty,
                host = field::Empty,
                mode = field::Empty,
                bytes.up = field::Empty,
                bytes.down = field::Empty,
            );
            tokio::spawn(
                async move {
                    if let Err(e) = this.handle(client, peer).await {
                        debug!(%peer, error = %e, "steered connection ended with an error");
                    }
                    drop(tracked);
                }
                .instrument(span),
            );
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let Some(original) = self.steering.take_original(peer) else {
            // Not steered by our programs (someone dialled the listener directly).
            warn!(%peer, "connection without an original destination; closing");
            return Ok(());
        };
        let orig = original.dest;
        let _ = client.set_nodelay(true);
        let mut head = Vec::with_capacity(4096);
        let seen = timeout(PEEK_TIMEOUT, peek_head(&mut client, &mut head))
            .await
            .unwrap_or(Peek::Other);
        let mut plan = self.plan(&seen);
        let mut splice_as = "splice";
        if let Plan::Terminate { tls: true, host } = &plan
            && let Some(why) = self.trust.check(&original.client, host)
        {
            // Our certificate would be refused: the origin's own, spliced.
            debug!(client = ?original.client, %host, ?why, "client does not trust the node CA: splicing");
            splice_as = why.label();
            plan = Plan::Splice;
        }
        let span = Span::current();
        span.record("dest", field::display(orig));
        span.record("proto", seen.protocol());
        if let Some(name) = seen.name() {
            span.record("host", name);
        }
        span.record(
            "mode",
            if matches!(plan, Plan::Terminate { .. }) {
                "terminate"
            } else {
                "splice"
            },
        );
        info!(
            %peer, %orig, proto = seen.protocol(), name = seen.name().unwrap_or("-"),
            terminate = matches!(plan, Plan::Terminate { .. }), "steered"
        );
        if let (Plan::Terminate { tls, host }, Some(gw)) = (plan, &self.gateway) {
            return self
                .terminate(gw, client, Bytes::from(head), &original, tls, host)
                .await;
        }

        let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(orig)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(%orig, error = %e, "original destination refused; resetting client");
                return reset(client);
            }
            Err(_) => {
                info!(%orig, "original destination did not answer; resetting client");
                return reset(client);
            }
        };
        let _ = upstream.set_nodelay(true);
        self.metrics.intercept_connection(splice_as);
        self.splice(client, upstream, &head).await
    }

    fn plan(&self, seen: &Peek) -> Plan {
        let Some(gw) = &self.gateway else {
            return Plan::Splice;
        };
        match seen {
            Peek::Tls { sni: Some(name) } if gw.hosts.contains(name) => Plan::Terminate {
                tls: true,
                host: name.to_ascii_lowercase(),
            },
            Peek::Http { host: Some(h) } if gw.hosts.contains(h) => Plan::Terminate {
                tls: false,
                host: hosts::strip_port(h).to_ascii_lowercase(),
            },
            _ => Plan::Splice,
        }
    }

    /// Be the registry for this connection: TLS with a node-CA leaf (or plain
    /// HTTP), then HTTP/2 or HTTP/1.1 requests routed by [`RegistryService`].
    /// What it asks of the origin goes to `orig` and nowhere else: its name
    /// and destination are whatever the client chose, so they decide nothing
    /// for other connections or for the agent's own requests.
    async fn terminate(
        &self,
        gw: &Gateway,
        client: TcpStream,
        head: Bytes,
        original: &crate::steer::Original,
        tls: bool,
        host: String,
    ) -> io::Result<()> {
        self.metrics.intercept_connection("terminate");
        let origin = OriginRef::steered(gw.service.upstream(), tls, &host, original.dest);
        let stream = Rewind::new(head, client);
        if tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(gw.tls.clone());
            match acceptor.accept(stream).await {
                Ok(s) => {
                    self.trust.trusted(&original.client, &origin.host);
                    serve_http(s, gw.service.clone(), origin, &self.drain).await
                }
                Err(e) => {
                    if trust::is_refusal(&e) {
                        self.refused(&original.client, &origin.host);
                    } else {
                        warn!(host = %origin.host, error = %e, "TLS handshake with the client failed");
                    }
                    Err(e)
                }
            }
        } else {
            serve_http(stream, gw.service.clone(), origin, &self.drain).await
        }
    }

    /// The client answered our certificate with an alert: it does not trust
    /// the node CA. Its retry, and its next connections to `host`, are spliced.
    fn refused(&self, client: &Client, host: &str) {
        warn!(
            comm = %client.comm, pid = client.tgid, %host,
            "the client refused the node CA's certificate: splicing its connections to this host \
             (install the CA with `damselfly ca install` and restart the runtime)"
        );
        self.trust.refused(client, host);
        self.metrics.intercept_connection("tls-refused");
    }

    async fn splice(
        &self,
        mut client: TcpStream,
        mut upstream: TcpStream,
        head: &[u8],
    ) -> io::Result<()> {
        if let Err(e) = upstream.write_all(head).await {
            return reset(client).and(Err(e));
        }
        self.metrics.intercept_bytes("upstream", head.len() as u64);
        let r = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            SPLICE_BUF,
            SPLICE_BUF,
        )
        .await;
        match r {
            Ok((up, down)) => {
                self.metrics.intercept_bytes("upstream", up);
                self.metrics.intercept_bytes("downstream", down);
                Span::current().record("bytes.up", up + head.len() as u64);
                Span::current().record("bytes.down", down);
                Ok(())
            }
            Err(e) => {
                // The origin reset or vanished: the client must see the same.
                let _ = reset(client);
                Err(e)
            }
        }
    }
}

async fn serve_http<S>(
    stream: S,
    service: Arc<RegistryService>,
    origin: OriginRef,
    drain: &Drain,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let origin = Arc::new(origin);
    // HTTP/2 streams run as tasks of their own: carry the connection's span.
    let conn = Span::current();
    let svc = service_fn(move |req| {
        let (service, origin) = (service.clone(), origin.clone());
        async move { Ok::<_, Infallible>(service.handle(req, &origin).await) }
            .instrument(conn.clone())
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(io::Error::other),
        () = drain.started() => {}
    }
    // Stopping: answer what is in flight, take no new request, then close.
    conn.as_mut().graceful_shutdown();
    conn.await.map_err(io::Error::other)
}

/// Read until the head can be classified, the limit is hit or the client closes.
async fn peek_head(client: &mut TcpStream, head: &mut Vec<u8>) -> Peek {
    let mut buf = [0u8; 4096];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return peek::classify(head).resolved(),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        match peek::classify(head) {
            Peek::NeedMore if head.len() < PEEK_LIMIT => continue,
            p => return p.resolved(),
        }
    }
}

impl Peek {
    fn resolved(self) -> Peek {
        match self {
            Peek::NeedMore => Peek::Other,
            p => p,
        }
    }
}

/// Close with RST, so the client sees what a refused or reset origin gives it.
fn reset(client: TcpStream) -> io::Result<()> {
    client.set_zero_linger()?;
    drop(client);
    Ok(())
}
