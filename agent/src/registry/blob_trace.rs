//! One trace per blob request: the `blob` root span, what it records when
//! the body has been sent, and the per-request byte counts that the
//! producers (spawned tasks) add to while they stream.
//!
//! The root span is a trace of its own rather than a child of its
//! connection's span: an HTTP/2 connection carries a whole pull, and one trace
//! per blob is what a reader looks for. It links to the connection instead.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Method, Response,
    body::{Body as HttpBody, Frame, SizeHint},
};
use opentelemetry::trace::TraceContextExt;
use tracing::{Span, field, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    origin::OriginRef,
    origin::{Body, BoxError},
    telemetry::SourceBytes,
};

tokio::task_local! {
    /// The blob request being served by this task, for the producers it
    /// starts (they count bytes into it) and for the outcome.
    static CURRENT: BlobTrace;
}

/// The root span of one blob request and what is counted for it.
#[derive(Clone)]
pub(super) struct BlobTrace {
    inner: Arc<Inner>,
}

struct Inner {
    span: Span,
    start: Instant,
    bytes: SourceBytes,
    outcome: Mutex<Option<&'static str>>,
}

impl BlobTrace {
    /// A new trace for `method` on `sha256:<hex>` in `repo` at `origin`,
    /// linked to the span current now (the connection's, if intercepted).
    pub(super) fn start(method: &Method, origin: &OriginRef, repo: &str, hex: &str) -> Self {
        let span = info_span!(
            parent: None,
            "blob",
            otel.name = format!("blob {method}"),
            otel.kind = "server",
            digest = format!("sha256:{hex}"),
            repository = repo,
            registry = origin.authority(),
            method = method.as_str(),
            outcome = field::Empty,
            status = field::Empty,
            ttfb_ms = field::Empty,
            total_ms = field::Empty,
            bytes.cache = field::Empty,
            bytes.peer = field::Empty,
            bytes.origin = field::Empty,
            bytes.sent = field::Empty,
            body = field::Empty,
            otel.status_code = field::Empty,
        );
        let conn = Span::current();
        if !conn.is_none() {
            span.add_link(conn.context().span().span_context().clone());
        }
        Self {
            inner: Arc::new(Inner {
                span,
                start: Instant::now(),
                bytes: SourceBytes::default(),
                outcome: Mutex::new(None),
            }),
        }
    }

    pub(super) fn span(&self) -> &Span {
        &self.inner.span
    }

    /// Runs `fut` (the request's handling) with this as the current blob trace.
    pub(super) async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// The blob request this task serves, if any.
    pub(super) fn current() -> Option<BlobTrace> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Byte counts of the current request; a detached counter outside one,
    /// so producers never need to care whether they are traced.
    pub(super) fn current_bytes() -> SourceBytes {
        Self::current()
            .map(|t| t.inner.bytes.clone())
            .unwrap_or_default()
    }

    /// Notes how the current request is served (`hit`, `miss`,
    /// `passthrough`, `denied`: the `damselfly_blob_requests_total` labels).
    pub(super) fn set_outcome(outcome: &'static str) {
        if let Some(t) = Self::current() {
            *t.inner.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            t.inner.span.record("outcome", outcome);
        }
    }

    /// Records the status and hands the body on, wrapped so that the end of
    /// the stream records the timings and byte counts.
    pub(super) fn respond(self, resp: Response<Body>) -> Response<Body> {
        let status = resp.status();
        self.inner.span.record("status", status.as_u16());
        if status.is_server_error() {
            self.inner.span.record("otel.status_code", "ERROR");
        }
        // hyper stops polling a body once Content-Length bytes are out: that
        // is its end, not a final empty poll.
        let length = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        resp.map(|body| {
            TracedBody {
                inner: body,
                trace: Some(self),
                first_byte: false,
                sent: 0,
                length,
            }
            .boxed()
        })
    }

    fn finish(&self, sent: u64, end: BodyEnd) {
        let i = &self.inner;
        let total = i.start.elapsed().as_millis() as u64;
        let outcome = *i.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let split = split_bytes(outcome, &i.bytes, sent);
        let s = &i.span;
        s.record("total_ms", total);
        s.record("bytes.sent", sent);
        s.record("bytes.cache", split.cache);
        s.record("bytes.peer", split.peer);
        s.record("bytes.origin", split.origin);
        s.record("body", end.as_str());
        if end != BodyEnd::Complete {
            s.record("otel.status_code", "ERROR");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyEnd {
    Complete,
    /// The producer failed mid-stream (the client sees a broken body).
    Error,
    /// The client went away first.
    Aborted,
}

impl BodyEnd {
    fn as_str(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::Error => "error",
            BodyEnd::Aborted => "aborted",
        }
    }
}

/// Bytes of one response by source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Split {
    pub cache: u64,
    pub peer: u64,
    pub origin: u64,
}

/// What each source gave. A relayed response (passthrough, a refusal) is
/// the origin's own body and passes no counter: all it sent is origin bytes.
/// Without an outcome the agent answered itself (an error): no source's.
pub(super) fn split_bytes(outcome: Option<&str>, counted: &SourceBytes, sent: u64) -> Split {
    match outcome {
        None => Split {
            cache: 0,
            peer: 0,
            origin: 0,
        },
        Some("passthrough" | "denied") => Split {
            cache: 0,
            peer: 0,
            origin: sent,
        },
        Some(_) => Split {
            cache: counted.cache(),
            peer: counted.peer(),
            origin: counted.origin(),
        },
    }
}

/// A response body that reports to its [`BlobTrace`] when the first byte
/// goes out and when the stream ends (or is dropped unfinished).
struct TracedBody {
    inner: Body,
    trace: Option<BlobTrace>,
    first_byte: bool,
    sent: u64,
    /// The response's Content-Length, if it has one.
    length: Option<u64>,
}

impl TracedBody {
    fn ttfb(&mut self) {
        if !self.first_byte {
            self.first_byte = true;
            if let Some(t) = &self.trace {
                let ms = t.inner.start.elapsed().as_millis() as u64;
                t.inner.span.record("ttfb_ms", ms);
            }
        }
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(t) = self.trace.take() {
            // An empty body (HEAD, a refusal) has its first byte at its end.
            self.ttfb();
            t.finish(self.sent, how);
        }
    }
}

impl HttpBody for TracedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.ttfb();
                    self.sent += d.len() as u64;
                    if Some(self.sent) == self.length {
                        self.end(BodyEnd::Complete);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(BodyEnd::Error),
            Poll::Ready(None) => self.end(BodyEnd::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        // hyper drops an empty body without polling it.
        let how = if self.inner.is_end_stream() || Some(self.sent) == self.length {
            BodyEnd::Complete
        } else {
            BodyEnd::Aborted
        };
        self.end(how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn origin() -> OriginRef {
        OriginRef::new("https", "reg.io", 443)
    }

    #[test]
    fn relayed_bodies_are_origin_bytes() {
        let counted = SourceBytes::default();
        counted.add("cache", 5);
        let s = split_bytes(Some("passthrough"), &counted, 100);
        assert_eq!((s.cache, s.peer, s.origin), (0, 0, 100));
        let s = split_bytes(Some("denied"), &counted, 12);
        assert_eq!(s.origin, 12);
        let s = split_bytes(None, &counted, 40);
        assert_eq!((s.cache, s.peer, s.origin), (0, 0, 0));
    }

    #[test]
    fn served_bodies_split_by_counted_source() {
        let counted = SourceBytes::default();
        counted.add("cache", 4);
        counted.add("peer", 60);
        counted.add("origin", 36);
        let s = split_bytes(Some("miss"), &counted, 100);
        assert_eq!((s.cache, s.peer, s.origin), (4, 60, 36));
    }

    #[tokio::test]
    async fn scope_makes_the_trace_current_for_outcome_and_bytes() {
        assert!(BlobTrace::current().is_none());
        // Outside a request these are no-ops, not panics.
        BlobTrace::set_outcome("hit");
        BlobTrace::current_bytes().add("peer", 1);

        let t = BlobTrace::start(&Method::GET, &origin(), "a/b", &"ab".repeat(32));
        let seen = t
            .clone()
            .scope(async {
                BlobTrace::set_outcome("miss");
                BlobTrace::current_bytes().add("peer", 7);
                BlobTrace::current().is_some()
            })
            .await;
        assert!(seen);
        assert_eq!(t.inner.bytes.peer(), 7);
        assert_eq!(*t.inner.outcome.lock().unwrap(), Some("miss"));
    }

    /// Spans recorded while `f` runs, by the exporting layer as in the agent.
    async fn exported<F: Future<Output = ()>>(f: F) -> Vec<opentelemetry_sdk::trace::SpanData> {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
        use tracing_subscriber::layer::SubscriberExt;
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        // A current-thread test runtime: the thread's default covers every poll.
        let guard = tracing::subscriber::set_default(subscriber);
        f.await;
        drop(guard);
        provider.force_flush().unwrap();
        exporter.get_finished_spans().unwrap()
    }

    fn attr(span: &opentelemetry_sdk::trace::SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    fn body_of(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn a_finished_body_records_timings_and_bytes_by_source() {
        let spans = exported(async {
            let t = BlobTrace::start(&Method::GET, &origin(), "a/b", &"ef".repeat(32));
            let resp = t
                .clone()
                .scope(async {
                    BlobTrace::set_outcome("miss");
                    let counted = BlobTrace::current_bytes();
                    counted.add("peer", 6);
                    counted.add("cache", 4);
                    let mut r = Response::new(body_of(&[b"hello", b"world"]));
                    r.headers_mut()
                        .insert(hyper::header::CONTENT_LENGTH, "10".parse().unwrap());
                    r
                })
                .await;
            let resp = t.respond(resp);
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&got[..], b"helloworld");
        })
        .await;
        let blob = spans.iter().find(|s| s.name == "blob GET").unwrap();
        let a = |k| attr(blob, k);
        assert_eq!(a("digest").unwrap(), format!("sha256:{}", "ef".repeat(32)));
        assert_eq!(a("registry").unwrap(), "reg.io");
        assert_eq!(a("outcome").unwrap(), "miss");
        assert_eq!(a("status").unwrap(), "200");
        assert_eq!(a("body").unwrap(), "complete");
        assert_eq!(a("bytes.sent").unwrap(), "10");
        assert_eq!(a("bytes.peer").unwrap(), "6");
        assert_eq!(a("bytes.cache").unwrap(), "4");
        assert_eq!(a("bytes.origin").unwrap(), "0");
        assert!(a("ttfb_ms").is_some() && a("total_ms").is_some());
        assert_eq!(blob.status, opentelemetry::trace::Status::Unset);
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_an_error() {
        let spans = exported(async {
            let t = BlobTrace::start(&Method::GET, &origin(), "a/b", &"01".repeat(32));
            let mut r = Response::new(body_of(&[b"hello", b"world"]));
            r.headers_mut()
                .insert(hyper::header::CONTENT_LENGTH, "10".parse().unwrap());
            let mut body = t.respond(r).into_body();
            // One frame, then the client goes away.
            let _ = body.frame().await;
        })
        .await;
        let blob = spans.iter().find(|s| s.name == "blob GET").unwrap();
        assert_eq!(attr(blob, "body").unwrap(), "aborted");
        assert_eq!(attr(blob, "bytes.sent").unwrap(), "5");
        // No outcome: an answer of the agent's own, from no source.
        assert_eq!(attr(blob, "bytes.origin").unwrap(), "0");
        assert!(matches!(
            blob.status,
            opentelemetry::trace::Status::Error { .. }
        ));
    }

    #[tokio::test]
    async fn the_wrapped_body_is_passed_on_unchanged() {
        let t = BlobTrace::start(&Method::GET, &origin(), "a/b", &"cd".repeat(32));
        let body = Full::new(Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed();
        let resp = t.respond(Response::new(body));
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
    }
}
