//! Prometheus metrics. The steering counters live in a kernel map and are read
//! at scrape time; everything else is counted in process.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use crate::vocab::PortCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PieceLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SteerLabels {
    port: u16,
    action: &'static str,
}

pub struct Metrics {
    registry: Registry,
    intercept_connections: Family<ModeLabel, Counter>,
    intercept_bytes: Family<DirectionLabel, Counter>,
    blob_requests: Family<ResultLabel, Counter>,
    blob_bytes: Family<SourceLabel, Counter>,
    authz_checks: Family<ResultLabel, Counter>,
    pieces: Family<PieceLabels, Counter>,
    peer_bytes: Family<DirectionLabel, Counter>,
    peer_haves: Family<DirectionLabel, Counter>,
    tracker_requests: Family<RpcLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let intercept_connections = Family::<ModeLabel, Counter>::default();
        registry.register(
            "damselfly_intercept_connections",
            "Steered connections the agent carried, by how",
            intercept_connections.clone(),
        );
        let intercept_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "damselfly_intercept_bytes",
            "Bytes carried for steered connections (upstream: client to origin)",
            intercept_bytes.clone(),
        );
        let blob_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "damselfly_blob_requests",
            "Blob requests by outcome: hit (cache), miss (fetched), denied (origin refused the credential), passthrough (forwarded as is)",
            blob_requests.clone(),
        );
        let blob_bytes = Family::<SourceLabel, Counter>::default();
        registry.register(
            "damselfly_blob_bytes",
            "Blob bytes sent to clients, by where they came from",
            blob_bytes.clone(),
        );
        let authz_checks = Family::<ResultLabel, Counter>::default();
        registry.register(
            "damselfly_authz_checks",
            "Origin HEAD checks of a client's credential before serving a blob it did not fetch itself",
            authz_checks.clone(),
        );
        let pieces = Family::<PieceLabels, Counter>::default();
        registry.register(
            "damselfly_pieces",
            "Pieces received, by source (peer, origin) and result (ok, corrupt, failed, banned)",
            pieces.clone(),
        );
        let peer_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "damselfly_peer_bytes",
            "Bytes exchanged with other nodes over QUIC (in: fetched, out: served)",
            peer_bytes.clone(),
        );
        let peer_haves = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "damselfly_peer_haves",
            "Pieces a node was told of the moment a peer stored them (in: taken to a fetch of ours, out: sent to peers that asked us)",
            peer_haves.clone(),
        );
        let tracker_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "damselfly_tracker_requests",
            "Tracker RPCs by name and result",
            tracker_requests.clone(),
        );
        Self {
            registry,
            intercept_connections,
            intercept_bytes,
            blob_requests,
            blob_bytes,
            authz_checks,
            pieces,
            peer_bytes,
            peer_haves,
            tracker_requests,
        }
    }

    pub fn piece(&self, source: &'static str, result: &'static str) {
        self.pieces
            .get_or_create(&PieceLabels { source, result })
            .inc();
    }

    /// A byte counter for the QUIC layer, usable before the metrics are shared.
    pub fn peer_bytes_hook(&self, direction: &'static str) -> Arc<dyn Fn(u64) + Send + Sync> {
        count_hook(&self.peer_bytes, direction)
    }

    /// A have counter for the QUIC layer (`damselfly_peer_haves_total`).
    pub fn peer_haves_hook(&self, direction: &'static str) -> Arc<dyn Fn(u64) + Send + Sync> {
        count_hook(&self.peer_haves, direction)
    }

    /// `damselfly_tracker_requests_total` as the tracker client's hook.
    pub fn tracker_hook(&self) -> Arc<dyn Fn(&'static str, &'static str) + Send + Sync> {
        let family = self.tracker_requests.clone();
        Arc::new(move |rpc, result| {
            family.get_or_create(&RpcLabels { rpc, result }).inc();
        })
    }

    /// Report a gauge read from `read` on every scrape.
    pub fn register_gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(GaugeCollector {
            name,
            help,
            read: Box::new(read),
        }));
    }

    pub fn blob_request(&self, result: &'static str) {
        self.blob_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn blob_bytes(&self, source: &'static str, n: u64) {
        self.blob_bytes
            .get_or_create(&SourceLabel { source })
            .inc_by(n);
    }

    pub fn authz_check(&self, result: &'static str) {
        self.authz_checks
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Export the kernel's per-port connect counters, read by `read` on
    /// every scrape (the wiring hands in the steering programs' map).
    pub fn attach_port_counters(
        &mut self,
        read: impl Fn() -> Vec<PortCounters> + Send + Sync + 'static,
    ) {
        self.registry
            .register_collector(Box::new(SteerCollector(Box::new(read))));
    }

    pub fn intercept_connection(&self, mode: &'static str) {
        self.intercept_connections
            .get_or_create(&ModeLabel { mode })
            .inc();
    }

    pub fn intercept_bytes(&self, direction: &'static str, n: u64) {
        self.intercept_bytes
            .get_or_create(&DirectionLabel { direction })
            .inc_by(n);
    }

    pub fn intercept_totals(&self) -> InterceptTotals {
        let bytes = |direction| {
            self.intercept_bytes
                .get_or_create(&DirectionLabel { direction })
                .get()
        };
        InterceptTotals {
            connections: self
                .intercept_connections
                .get_or_create(&ModeLabel { mode: "splice" })
                .get(),
            bytes_upstream: bytes("upstream"),
            bytes_downstream: bytes("downstream"),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `family`'s counter for `direction` as a hook for code that knows no metrics.
fn count_hook(
    family: &Family<DirectionLabel, Counter>,
    direction: &'static str,
) -> Arc<dyn Fn(u64) + Send + Sync> {
    let counter = family.get_or_create(&DirectionLabel { direction }).clone();
    Arc::new(move |n| {
        counter.inc_by(n);
    })
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct InterceptTotals {
    pub connections: u64,
    pub bytes_upstream: u64,
    pub bytes_downstream: u64,
}

struct GaugeCollector {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for GaugeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Collector for GaugeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new((self.read)() as i64);
        let m = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(m)
    }
}

struct SteerCollector(Box<dyn Fn() -> Vec<PortCounters> + Send + Sync>);

impl std::fmt::Debug for SteerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SteerCollector")
    }
}

impl Collector for SteerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = (self.0)();
        if counters.is_empty() {
            // Nothing attached (any more): no family at all.
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "damselfly_steer_connects",
            "TCP connects to a steered port, by whether the kernel steered them to the agent",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for c in counters {
            for (action, value) in [("steered", c.steered), ("passed", c.passed)] {
                let labels = SteerLabels {
                    port: c.port,
                    action,
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_counters_are_read_at_each_scrape_and_absent_when_detached() {
        let mut m = Metrics::new();
        let counters = Arc::new(std::sync::Mutex::new(vec![PortCounters {
            port: 443,
            steered: 3,
            passed: 1,
        }]));
        let read = counters.clone();
        m.attach_port_counters(move || read.lock().unwrap().clone());
        let text = m.encode();
        for line in [
            "damselfly_steer_connects_total{port=\"443\",action=\"steered\"} 3",
            "damselfly_steer_connects_total{port=\"443\",action=\"passed\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        counters.lock().unwrap()[0].steered = 5;
        assert!(m.encode().contains("action=\"steered\"} 5"));
        counters.lock().unwrap().clear();
        assert!(!m.encode().contains("damselfly_steer_connects"));
    }

    #[test]
    fn intercept_counters_are_exported_with_labels() {
        let m = Metrics::new();
        m.intercept_connection("splice");
        m.intercept_bytes("upstream", 10);
        m.intercept_bytes("downstream", 32);
        m.intercept_bytes("downstream", 10);
        let text = m.encode();
        assert!(
            text.contains("damselfly_intercept_connections_total{mode=\"splice\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("damselfly_intercept_bytes_total{direction=\"downstream\"} 42"),
            "{text}"
        );
        let t = m.intercept_totals();
        assert_eq!(
            (t.connections, t.bytes_upstream, t.bytes_downstream),
            (1, 10, 42)
        );
    }
}
