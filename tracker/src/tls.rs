//! The tracker's transport: gRPC over TLS 1.3 with client certificates, and
//! the limits that keep a connection's memory bounded.
//!
//! - The tracker presents a certificate with the DNS SAN
//!   [`TRACKER_SERVER_NAME`] (`damselfly-tracker`), which agents verify
//!   against the cluster CA whatever address they dialled.
//! - Agents present their peer certificate: it must chain to the cluster CA
//!   and carry [`damselfly_pki::PEER_SERVER_NAME`]
//!   ([`damselfly_pki::peer_client_verifier`]). Who the client is, as far as the
//!   tracker binds peer ids ([`Caller`]), comes from that certificate or the
//!   source address.
//! - At most `max_connections` connections at once, handshakes included; a
//!   handshake gets [`HANDSHAKE_TIMEOUT`], and a connection whose writes make
//!   no progress for [`STALL_TIMEOUT`] (a client that stopped reading its
//!   answers) is closed, which frees whatever was queued for it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
    time::Sleep,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use super::state::Caller;
use damselfly_pki::{
    ClusterPki, TRACKER_SERVER_NAME, node_identity, peer_client_verifier, provider,
};

/// For a client to finish its TLS handshake once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// For a connection's pending writes to make any progress.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// gRPC over TLS: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("cluster CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The tracker's side: its certificate, and the cluster CA for clients.
pub fn server_config(pki: &ClusterPki) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = peer_client_verifier(pki.roots()?)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(tls))
}

/// An agent's side: its peer certificate, and the cluster CA to verify the
/// tracker's for [`TRACKER_SERVER_NAME`].
pub fn client_config(pki: &ClusterPki) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.roots()?)
        .with_client_auth_cert(pki.chain.clone(), pki.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(tls))
}

/// Who is at the other end of a connection: every request carries it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub caller: Caller,
    /// This connection's number, unique for the listener's life: what
    /// [`incoming`]'s `on_close` is called with when it closes.
    pub id: u64,
}

/// Called with a connection's [`ConnInfo::id`] once it has closed.
pub type OnClose = Arc<dyn Fn(u64) + Send + Sync>;

/// Calls `on_close` when the connection holding it is dropped.
struct CloseNotice {
    id: u64,
    on_close: OnClose,
}

impl Drop for CloseNotice {
    fn drop(&mut self) {
        (self.on_close)(self.id);
    }
}

/// An authenticated connection, holding its place among `max_connections`.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
    stall: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
    _closed: CloseNotice,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl TlsConn {
    /// A write that cannot proceed: fine for a while, an error once it has
    /// not for [`STALL_TIMEOUT`].
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timer = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(STALL_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match p {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.stall = None;
                ready
            }
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, p)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Aborts the accept loop when the server drops its incoming stream.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts on `listener`, at most `max_connections` at once, and yields the
/// connections whose client passed the TLS handshake. `on_close` is called
/// with each one's [`ConnInfo::id`] when it has closed.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    max_connections: usize,
    on_close: OnClose,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let ids = Arc::new(AtomicU64::new(0));
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let (tx, rx) = mpsc::channel::<TlsConn>(16);
    let accept = tokio::spawn(async move {
        let mut full = false;
        loop {
            if slots.available_permits() == 0 && !full {
                warn!(
                    max_connections,
                    "tracker at its connection limit; new clients wait"
                );
            }
            full = slots.available_permits() == 0;
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: nothing to do but wait.
                    debug!(error = %e, "tracker accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            let (ids, on_close) = (ids.clone(), on_close.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        // Also how a client without a cluster certificate ends.
                        info!(%remote, error = %e, "tracker client refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "tracker client did not finish its handshake");
                        return;
                    }
                };
                let caller = io
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(node_identity)
                    .map(Caller::Identity)
                    .unwrap_or(Caller::Address(remote.ip().to_canonical()));
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let conn = TlsConn {
                    io,
                    info: ConnInfo { remote, caller, id },
                    stall: None,
                    _slot: slot,
                    _closed: CloseNotice { id, on_close },
                };
                let _ = tx.send(conn).await;
            });
        }
    });
    futures_util::stream::unfold((rx, AbortOnDrop(accept)), |(mut rx, guard)| async move {
        let conn = rx.recv().await?;
        Some((Ok(conn), (rx, guard)))
    })
}

/// Dials a tracker replica over TLS for tonic: `http://host:port` URIs, the
/// certificate checked for [`TRACKER_SERVER_NAME`].
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
}

impl Connector {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: TlsConnector::from(tls),
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host"))
            })?;
            // An IPv6 literal comes bracketed in a URI.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(7400);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(TRACKER_SERVER_NAME).expect("a valid DNS name");
            let io = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(io))
        })
    }
}
