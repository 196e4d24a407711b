//! Accept steered connections, name them from their first bytes, and carry
//! them on, byte for byte, to where they were going.

pub mod peek;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{admin::metrics::Metrics, steer::Steering};
use peek::{PEEK_LIMIT, Peek};

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
            tokio::spawn(async move {
                if let Err(e) = this.handle(client, peer).await {
                    debug!(%peer, error = %e, "steered connection ended with an error");
                }
            });
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let Some(orig) = self.steering.take_original(peer) else {
            // Not steered by our programs (someone dialled the listener directly).
            warn!(%peer, "connection without an original destination; closing");
            return Ok(());
        };
        let _ = client.set_nodelay(true);
        let mut head = Vec::with_capacity(4096);
        let seen = timeout(PEEK_TIMEOUT, peek_head(&mut client, &mut head))
            .await
            .unwrap_or(Peek::Other);
        info!(%peer, %orig, proto = seen.protocol(), name = seen.name().unwrap_or("-"), "steered");

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
        self.metrics.intercept_connection("splice");
        self.splice(client, upstream, &head).await
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
