//! The origin's side of one blob: every request the blob path makes for it
//! goes through here, with the client's own credentials, to where the
//! client's connection was going (see [`OriginRef`]).

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, body::Incoming, header};
use tracing::{Span, field, instrument};

use crate::{
    origin::{
        BoxError, OriginClient, OriginError, OriginRef,
        headers::{content_length, copy_headers, value},
    },
    vocab::RateLimiter,
};

/// One blob at one origin, asked for on one client's behalf.
#[derive(Clone)]
pub struct OriginBlob {
    client: OriginClient,
    origin: OriginRef,
    path: String,
    /// The client's headers, its own range removed.
    headers: HeaderMap,
}

impl OriginBlob {
    /// `agent`: the agent's own client, used unless `origin` is a steered
    /// connection's. `headers` must not carry the client's `Range`.
    pub fn new(agent: &OriginClient, origin: &OriginRef, path: &str, headers: HeaderMap) -> Self {
        Self {
            client: origin.upstream(agent).clone(),
            origin: origin.clone(),
            path: path.to_string(),
            headers,
        }
    }

    /// The blob's size by a HEAD: no blob byte moves.
    #[instrument(name = "origin.head", skip_all, fields(size = field::Empty))]
    pub async fn size(&self) -> Option<u64> {
        let mut req = Request::head(self.origin.uri(&self.path).ok()?);
        if let Some(h) = req.headers_mut() {
            copy_headers(&self.headers, h);
        }
        let resp = self
            .client
            .send(req.body(crate::origin::empty()).ok()?)
            .await
            .ok()?;
        let size = resp
            .status()
            .is_success()
            .then(|| content_length(resp.headers()))
            .flatten();
        if let Some(size) = size {
            Span::current().record("size", size);
        }
        size
    }

    /// A GET of the whole blob (`from: None`) or of everything from byte
    /// `from` on; the response's head, its body for the caller to read (see
    /// `origin.download`).
    #[instrument(name = "origin.get", skip_all, fields(from, status = field::Empty))]
    pub async fn get(&self, from: Option<u64>) -> Result<Response<Incoming>, OriginError> {
        let range = from.map(|off| format!("bytes={off}-"));
        self.send(range).await
    }

    /// Bytes `[start, end)` as the origin's `206` response, its body unread.
    pub async fn range(&self, start: u64, end: u64) -> Result<Response<Incoming>, BoxError> {
        let resp = self
            .send(Some(format!("bytes={start}-{}", end - 1)))
            .await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(format!("origin answered {} to a range request", resp.status()).into());
        }
        Ok(resp)
    }

    /// Bytes `[start, end)`, read whole at `rate` (a piece for the swarm).
    #[instrument(name = "origin.range", skip_all, fields(start, end, status = field::Empty))]
    pub async fn range_bytes(
        &self,
        rate: &RateLimiter,
        start: u64,
        end: u64,
    ) -> Result<Bytes, BoxError> {
        let mut body = self.range(start, end).await?.into_body();
        let mut data = BytesMut::with_capacity((end - start) as usize);
        while let Some(frame) = body.frame().await {
            if let Ok(chunk) = frame?.into_data() {
                rate.acquire_high(chunk.len() as u64).await;
                data.extend_from_slice(&chunk);
            }
        }
        let data = data.freeze();
        if data.len() as u64 != end - start {
            return Err(format!("origin sent {} of {} bytes", data.len(), end - start).into());
        }
        Ok(data)
    }

    async fn send(&self, range: Option<String>) -> Result<Response<Incoming>, OriginError> {
        let mut headers = self.headers.clone();
        if let Some(r) = range {
            headers.insert(header::RANGE, value(r));
        }
        let resp = self
            .client
            .fetch_following(Method::GET, self.origin.uri(&self.path)?, &headers)
            .await;
        match &resp {
            Ok(r) => Span::current().record("status", r.status().as_u16()),
            Err(_) => Span::current().record("otel.status_code", "ERROR"),
        };
        resp
    }
}
