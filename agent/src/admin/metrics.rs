//! Prometheus metrics. The steering counters live in a kernel map and are read
//! at scrape time; everything else is counted in process.

use std::sync::{Arc, Weak};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family},
    registry::Registry,
};

use crate::steer::Steering;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
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
        Self {
            registry,
            intercept_connections,
            intercept_bytes,
        }
    }

    /// Read the kernel's per-port counters on every scrape.
    pub fn attach_steering(&mut self, steering: &Arc<Steering>) {
        self.registry
            .register_collector(Box::new(SteerCollector(Arc::downgrade(steering))));
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

struct SteerCollector(Weak<Steering>);

impl std::fmt::Debug for SteerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SteerCollector")
    }
}

impl Collector for SteerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(steering) = self.0.upgrade() else {
            return Ok(());
        };
        let counters = steering.counters();
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
