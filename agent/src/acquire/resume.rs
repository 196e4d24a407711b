//! Resuming a download a killed agent left: the pieces it wrote stay in the
//! store and reach the client from there, read back and checked against the
//! hashes they were stored with, counted as served from the cache. The
//! origin download and the swarm driver both resume through [`read_back`].

use bytes::Bytes;

use crate::{
    store::{BlobWriter, StoreError},
    telemetry::{Metrics, SourceBytes},
};

#[derive(Debug, thiserror::Error)]
pub(super) enum ResumeError {
    /// The blocking store task died; the writer went with it.
    #[error("damselfly: the store failed reading back resumed piece {0}")]
    WriterLost(u64),
    #[error("damselfly: resumed piece {index} unreadable: {source}")]
    Unreadable { index: u64, source: StoreError },
}

/// Piece `index`, held from before this download began, as the client gets it.
pub(super) async fn read_back(
    writer: &mut Option<BlobWriter>,
    index: u64,
    metrics: &Metrics,
    bytes: &SourceBytes,
) -> Result<Bytes, ResumeError> {
    let data = on_writer(writer, move |w| w.read_piece(index))
        .await
        .ok_or(ResumeError::WriterLost(index))?
        .map_err(|source| ResumeError::Unreadable { index, source })?;
    metrics.blob_bytes("cache", data.len() as u64);
    bytes.add("cache", data.len() as u64);
    Ok(data)
}

/// Run a blocking store call on the writer off the async threads; `None`
/// if there is no writer or the blocking task died (the writer is lost then).
pub(super) async fn on_writer<T: Send + 'static>(
    writer: &mut Option<BlobWriter>,
    f: impl FnOnce(&mut BlobWriter) -> T + Send + 'static,
) -> Option<T> {
    let mut w = writer.take()?;
    let (w, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut w);
        (w, out)
    })
    .await
    .ok()?;
    *writer = Some(w);
    Some(out)
}
