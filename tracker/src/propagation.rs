//! Trace context across tracker RPCs (W3C traceparent in gRPC metadata), so
//! the tracker's spans join the trace of the pull that asked. The agent
//! installs the propagator when it exports traces; without one, `inject`
//! writes nothing.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether a span exists to hang children on: background work (heartbeats,
/// progress announcements) has none and is not traced, or it would start a
/// trace every few hundred milliseconds.
pub(crate) fn in_trace() -> bool {
    !Span::current().is_none()
}

/// Writes the current span's context into outgoing gRPC metadata (a no-op
/// without `--otlp-endpoint`: no propagator is installed then).
pub(crate) fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Metadata(metadata))
    });
}

/// The caller's trace context from incoming gRPC metadata, if it sent one.
pub(crate) fn extract(metadata: &tonic::metadata::MetadataMap) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&MetadataRef(metadata));
    cx.span().span_context().is_valid().then_some(cx)
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataRef<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_grpc_metadata() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let mut md = tonic::metadata::MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Metadata(&mut md));
        assert_eq!(
            md.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = extract(&md).unwrap();
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert!(extract(&tonic::metadata::MetadataMap::new()).is_none());
    }
}
