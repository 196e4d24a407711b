//! An OTLP/gRPC trace collector in the test process, listening in a node's
//! network namespace: the `TraceService` that Jaeger implements, keeping
//! every span it is sent, flattened with its resource for assertions.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

use crate::testbed::Node;

/// A span as received, with what the assertions need.
#[derive(Debug, Clone)]
pub struct Span {
    /// Resource attributes of the exporting process (`service.name`, `host.name`, ...).
    pub resource: HashMap<String, Value>,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    /// Empty for a root span.
    pub parent_id: Vec<u8>,
    pub attrs: HashMap<String, Value>,
    /// Span ids this span links to (in other traces).
    pub links: Vec<Vec<u8>>,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// An attribute value, as much of OTLP's `AnyValue` as spans here carry.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    Other,
}

impl Span {
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute (tracing records u64 as an int, or a string when it does not fit).
    pub fn int(&self, key: &str) -> Option<u64> {
        match self.attrs.get(key)? {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Str(s) => s.parse().ok(),
            _ => None,
        }
    }

    pub fn resource_str(&self, key: &str) -> Option<&str> {
        match self.resource.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_root(&self) -> bool {
        self.parent_id.is_empty()
    }
}

type Received = Arc<Mutex<Vec<Span>>>;

struct Sink(Received);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        resource: resource.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_id: s.parent_span_id,
                        attrs: attributes(&s.attributes),
                        links: s.links.into_iter().map(|l| l.span_id).collect(),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
        .collect()
}

fn value(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::Int(*i),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(*d),
        _ => Value::Other,
    }
}

/// The collector; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    received: Received,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Listen on `port` of `node`'s IPv4 address; its endpoint for
    /// `--otlp-endpoint` is [`Collector::endpoint`].
    pub fn start(node: &Node, port: u16) -> anyhow::Result<Self> {
        let addr = node.addr4(port);
        // A socket keeps the namespace it was made in: bind there, serve from here.
        let listener = node
            .in_netns(move || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding the OTLP collector on {addr}"))?;
        listener.set_nonblocking(true)?;
        let received = Received::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let sink = Sink(received.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(sink))
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready
            .recv()
            .context("the collector thread died")?
            .context("starting the collector")?;
        Ok(Self {
            addr,
            received,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://ADDR:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `done` holds for the spans received, up to `limit`; the
    /// spans then. Exporters send in batches, so spans arrive in steps. On
    /// timeout, `$DFLY_OTLP_DUMP` (a file) gets every span received.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Span]) -> bool,
    ) -> anyhow::Result<Vec<Span>> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                if let Some(path) = std::env::var_os("DFLY_OTLP_DUMP") {
                    let _ = std::fs::write(path, format!("{spans:#?}"));
                }
                bail!(
                    "no {what} after {limit:?}; {} spans: {}",
                    spans.len(),
                    summary(&spans)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Span counts by service and name, for failure messages.
pub fn summary(spans: &[Span]) -> String {
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for s in spans {
        let svc = s.resource_str("service.name").unwrap_or("?");
        let host = s.resource_str("host.name").unwrap_or("?");
        *count.entry(format!("{svc}@{host}:{}", s.name)).or_default() += 1;
    }
    format!("{count:?}")
}

/// Spans of `trace_id` under `root` (children, grandchildren, ...).
pub fn descendants<'a>(spans: &'a [Span], root: &Span) -> Vec<&'a Span> {
    let mut out: Vec<&Span> = Vec::new();
    let mut frontier = vec![root.span_id.clone()];
    while let Some(id) = frontier.pop() {
        for s in spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id && s.parent_id == id)
        {
            frontier.push(s.span_id.clone());
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u8, parent: Option<u8>) -> Span {
        Span {
            resource: HashMap::new(),
            name: format!("s{id}"),
            trace_id: vec![1; 16],
            span_id: vec![id; 8],
            parent_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            attrs: HashMap::from([("n".into(), Value::Int(i64::from(id)))]),
            links: Vec::new(),
            start_ns: 0,
            end_ns: 0,
        }
    }

    #[test]
    fn descendants_walk_the_whole_subtree() {
        let spans = vec![
            span(1, None),
            span(2, Some(1)),
            span(3, Some(2)),
            span(4, None),
        ];
        let mut names: Vec<_> = descendants(&spans, &spans[0])
            .iter()
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["s2", "s3"]);
        assert!(spans[0].is_root() && !spans[1].is_root());
        assert_eq!(spans[2].int("n"), Some(3));
    }
}
