//! `damselfly tracker`: the tracker service's flags, and running it.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use super::{ClusterPkiArgs, size::parse_size};
use crate::{
    pki::Role,
    tracker::{Config, Limits, serve, tls},
};

#[derive(Debug, Args)]
pub struct TrackerArgs {
    /// gRPC listen address (TLS; clients must present a cluster certificate).
    #[arg(long, env = "DAMSELFLY_TRACKER_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// The cluster CA, and the tracker's certificate (SAN damselfly-tracker)
    /// and key: required.
    #[command(flatten)]
    pub cluster: ClusterPkiArgs,
    /// Heap the tracker's state may hold (registrations and announcements);
    /// past it, new ones are refused. One client may take a sixteenth.
    #[arg(long, env = "DAMSELFLY_TRACKER_MAX_STATE", default_value = "256MiB", value_parser = parse_size)]
    pub max_state: u64,
    /// Client connections at once (every agent keeps one to each replica).
    #[arg(
        long,
        env = "DAMSELFLY_TRACKER_MAX_CONNECTIONS",
        default_value_t = crate::tracker::DEFAULT_MAX_CONNECTIONS
    )]
    pub max_connections: usize,
    /// Requests handled at once; more are refused. For tests.
    #[arg(
        long,
        env = "DAMSELFLY_TRACKER_MAX_IN_FLIGHT",
        default_value_t = crate::tracker::MAX_IN_FLIGHT,
        hide = true
    )]
    pub max_in_flight: usize,
    /// Heartbeat interval peers are told to keep (leases last 1.5x). For tests.
    #[arg(
        long,
        env = "DAMSELFLY_TRACKER_HEARTBEAT",
        default_value = "5s",
        value_parser = parse_duration,
        hide = true
    )]
    pub heartbeat: Duration,
    /// OpenTelemetry collector (OTLP/gRPC, e.g. http://jaeger:4317); traces are off without it.
    #[arg(long, env = "DAMSELFLY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// `200ms`, `5s`, `1m`, or bare milliseconds; positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 200ms, 5s or 1m"))?;
    let d = match unit {
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(d)
}

/// `damselfly tracker`: check the cluster PKI, bind, serve, stop on
/// SIGTERM/SIGINT.
pub async fn run(args: TrackerArgs) -> anyhow::Result<()> {
    // Checked before binding: a tracker agents cannot verify, or that
    // cannot verify them, would answer nobody.
    let pki = args.cluster.load("damselfly tracker", Role::Tracker)?;
    let tls = tls::server_config(&pki).context("cluster certificates")?;
    let cfg = Config {
        heartbeat: args.heartbeat,
        limits: Limits::with_max_bytes(args.max_state),
        max_connections: args.max_connections,
        max_in_flight: args.max_in_flight,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        heartbeat = ?cfg.heartbeat,
        max_state = cfg.limits.max_bytes,
        max_connections = cfg.max_connections,
        memory_bound = cfg.memory_bound(10 << 20),
        "tracker listening (TLS)"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    };
    serve(listener, tls, cfg, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("750"), Ok(Duration::from_millis(750)));
        for bad in ["", "0s", "5h", "s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
