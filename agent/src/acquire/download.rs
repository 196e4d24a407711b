//! One origin download: every byte goes to the client that asked (while it
//! listens) and, piece by piece, into the store. A download a killed agent
//! left resumes from its first missing piece.

use std::sync::Arc;

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    acquire::{
        Chunk,
        resume::{on_writer, read_back},
    },
    store::{BlobReader, BlobWriter},
    swarm::Progress,
    telemetry::{Metrics, SourceBytes},
    vocab::{Digest, RateLimiter},
};

/// One origin download: every byte goes to the client that asked (while it
/// listens) and, piece by piece, into the store.
pub(super) struct Download {
    /// `None` once a store error made us give up caching (the client stream goes on).
    pub writer: Option<BlobWriter>,
    pub digest: Digest,
    pub size: u64,
    pub metrics: Arc<Metrics>,
    pub client: mpsc::Sender<Chunk>,
    pub progress: Option<Progress>,
    pub rate: Arc<RateLimiter>,
    /// This request's bytes by source, for its trace.
    pub bytes: SourceBytes,
}

impl Download {
    /// Returns the blob as committed to the store, if it was, and the
    /// progress to finish.
    pub(super) async fn run(
        mut self,
        body: Incoming,
        body_offset: u64,
    ) -> (Option<BlobReader>, Option<Progress>) {
        let cached = self.stream(body, body_offset).await;
        (cached, self.progress.take())
    }

    async fn stream(&mut self, mut body: Incoming, body_offset: u64) -> Option<BlobReader> {
        let piece_size = self.writer.as_ref().map(|w| w.piece_size()).unwrap_or(1);
        let mut client_open = true;
        // Pieces a killed download left behind go to the client first.
        let first_piece = body_offset / piece_size;
        for index in 0..first_piece {
            match read_back(&mut self.writer, index, &self.metrics, &self.bytes).await {
                Ok(piece) => client_open = self.client.send(Ok(Frame::data(piece))).await.is_ok(),
                Err(e) => {
                    let _ = self.client.send(Err(e.to_string().into())).await;
                    return None;
                }
            }
        }

        let mut pos = body_offset;
        let mut index = first_piece;
        let mut buf = BytesMut::new();
        loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    warn!(digest = %self.digest, error = %e, "origin body failed");
                    let _ = self.client.send(Err(Box::new(e))).await;
                    return None;
                }
                None => break,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pos += data.len() as u64;
            self.rate.acquire_high(data.len() as u64).await;
            self.metrics.blob_bytes("origin", data.len() as u64);
            self.bytes.add("origin", data.len() as u64);
            if client_open {
                client_open = self
                    .client
                    .send(Ok(Frame::data(data.clone())))
                    .await
                    .is_ok();
            }
            if self.writer.is_none() {
                if !client_open {
                    return None;
                }
                continue;
            }
            buf.extend_from_slice(&data);
            while buf.len() as u64 >= piece_size || (pos >= self.size && !buf.is_empty()) {
                let take = (piece_size as usize).min(buf.len());
                let piece = buf.split_to(take).freeze();
                let i = index;
                match self.with_writer(move |w| w.write_piece(i, &piece)).await {
                    Some(Ok(sum)) => {
                        if let Some(p) = &self.progress {
                            p.piece(i, sum);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(digest = %self.digest, error = %e, "store write failed; streaming the rest through");
                        self.writer = None;
                        break;
                    }
                    None => {}
                }
                index += 1;
            }
        }
        if pos != self.size {
            let _ = self
                .client
                .send(Err(
                    format!("origin sent {pos} of {} bytes", self.size).into()
                ))
                .await;
            return None;
        }
        let writer = self.writer.take()?;
        match tokio::task::spawn_blocking(move || writer.commit()).await {
            Ok(Ok(reader)) => {
                info!(digest = %self.digest, size = self.size, "cached");
                Some(reader)
            }
            Ok(Err(e)) => {
                warn!(digest = %self.digest, error = %e, "not cached");
                None
            }
            Err(_) => None,
        }
    }

    async fn with_writer<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut BlobWriter) -> T + Send + 'static,
    ) -> Option<T> {
        on_writer(&mut self.writer, f).await
    }
}
