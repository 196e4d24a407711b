//! Logs and traces. Logs always go to stderr (`DAMSELFLY_LOG`), and the last
//! warnings and errors also to a small ring for `/status` ([`RecentErrors`]); with
//! `--otlp-endpoint`, the agent's and the tracker's spans also go to an
//! OpenTelemetry collector over OTLP/gRPC, which is what Jaeger ingests.
//!
//! Only `damselfly`'s own spans at `info` and above are exported: the
//! exporter's gRPC client is built from the same hyper/h2/tonic crates, and
//! exporting their spans would trace the exporting itself.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Level;

use super::recent::RecentErrors;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Who is exporting: becomes the OTLP resource of every span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `damselfly-agent` or `damselfly-tracker`.
    pub service: &'static str,
    /// The node (`--node-name`, else the host name).
    pub node: String,
    /// The agent's `--instance`; a tracker has none.
    pub instance: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint:?}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("setting up logging: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Resource attributes, by OpenTelemetry's semantic conventions where one
/// fits (`service.*`, `host.name`) and `damselfly.*` where none does.
pub(super) fn resource_attributes(id: &Identity) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("service.name", id.service),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("host.name", id.node.clone()),
        KeyValue::new("damselfly.node", id.node.clone()),
    ];
    let instance_id = match &id.instance {
        Some(i) => {
            attrs.push(KeyValue::new("damselfly.instance", i.clone()));
            format!("{}/{i}", id.node)
        }
        None => id.node.clone(),
    };
    // Two agents on one node (tests, a seed beside a DaemonSet pod) stay apart.
    attrs.push(KeyValue::new("service.instance.id", instance_id));
    attrs
}

/// Keeps the exporter; [`Telemetry::shutdown`] sends what is still queued.
#[must_use = "dropping it loses the spans still queued: call shutdown()"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Logs to stderr only: for the commands that export nothing.
    pub fn logs_only() -> Result<Self, TelemetryError> {
        tracing_subscriber::registry()
            .with(log_layer())
            .with(RecentErrors::global().layer())
            .try_init()?;
        Ok(Self { provider: None })
    }

    /// Logs, plus span export to `endpoint` (e.g. `http://jaeger:4317`) when
    /// given. Must run inside the tokio runtime: the gRPC channel lives there.
    /// The batch processor sends every `OTEL_BSP_SCHEDULE_DELAY` ms (5 s by default).
    pub fn init(endpoint: Option<&str>, id: &Identity) -> Result<Self, TelemetryError> {
        let Some(endpoint) = endpoint else {
            return Self::logs_only();
        };
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let resource = Resource::builder()
            .with_attributes(resource_attributes(id))
            .build();
        // The SDK's batch processor runs the export loop on a thread of its
        // own; the tonic channel it sends through is driven by our runtime.
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("damselfly");
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target("damselfly", Level::INFO));
        tracing_subscriber::registry()
            .with(log_layer())
            .with(RecentErrors::global().layer())
            .with(otel)
            .try_init()?;
        // W3C traceparent on tracker RPCs, so the tracker's spans join the
        // trace of the pull that asked.
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!(endpoint, "exporting traces (OTLP/gRPC)");
        Ok(Self {
            provider: Some(provider),
        })
    }

    /// Export what is queued and stop. Blocking in the SDK, so it runs off
    /// the async threads (the export itself needs them).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            eprintln!("damselfly: flushing traces: {e}");
        }
    }
}

fn log_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter =
        EnvFilter::try_from_env("DAMSELFLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
}

/// Bytes one blob request got from each source, counted where the bytes
/// arrive (the producers run in spawned tasks, so this is shared).
#[derive(Debug, Clone, Default)]
pub struct SourceBytes(Arc<[AtomicU64; 3]>);

impl SourceBytes {
    /// `source` is a `damselfly_blob_bytes_total` label: cache, peer or origin.
    pub fn add(&self, source: &str, n: u64) {
        let i = match source {
            "cache" => 0,
            "peer" => 1,
            _ => 2,
        };
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }

    pub fn cache(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    pub fn peer(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }

    pub fn origin(&self) -> u64 {
        self.0[2].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
        attrs
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn agent_resource_names_node_and_instance() {
        let attrs = resource_attributes(&Identity {
            service: "damselfly-agent",
            node: "n1".into(),
            instance: Some("dfly-n1".into()),
        });
        assert_eq!(attr(&attrs, "service.name").unwrap(), "damselfly-agent");
        assert_eq!(attr(&attrs, "host.name").unwrap(), "n1");
        assert_eq!(attr(&attrs, "damselfly.instance").unwrap(), "dfly-n1");
        assert_eq!(attr(&attrs, "service.instance.id").unwrap(), "n1/dfly-n1");
        assert_eq!(
            attr(&attrs, "service.version").unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn tracker_resource_has_no_instance() {
        let attrs = resource_attributes(&Identity {
            service: "damselfly-tracker",
            node: "infra".into(),
            instance: None,
        });
        assert_eq!(attr(&attrs, "service.name").unwrap(), "damselfly-tracker");
        assert_eq!(attr(&attrs, "damselfly.instance"), None);
        assert_eq!(attr(&attrs, "service.instance.id").unwrap(), "infra");
    }

    #[test]
    fn source_bytes_add_up_per_source() {
        let b = SourceBytes::default();
        let shared = b.clone();
        shared.add("cache", 3);
        b.add("peer", 5);
        b.add("peer", 5);
        shared.add("origin", 7);
        assert_eq!((b.cache(), b.peer(), b.origin()), (3, 10, 7));
    }
}
