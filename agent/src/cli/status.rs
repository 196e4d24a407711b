//! `damselfly status`: fetch `/status` from a running agent and print tables.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::size::format_size;
use crate::{
    admin::{PEERS_RECENT, Status},
    intercept::{TrustVerdict, Verdict},
    telemetry::Stamp,
};

pub async fn fetch(admin: SocketAddr) -> anyhow::Result<Status> {
    let stream = TcpStream::connect(admin).await.with_context(|| {
        format!("no agent answers on {admin} (is `damselfly agent` running? see --admin)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/status")
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("agent at {admin} answered {} for /status", resp.status());
    }
    let body = resp.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&body).context("agent's /status is not what this damselfly expects")
}

/// What an operator asks first (tracker, peers, cache, CA trust, recent
/// errors) on top; steering's details below.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "agent      {} (pid {})", s.instance, s.pid);
    if s.seed {
        let _ = writeln!(out, "mode       seed (no steering)");
    }
    swarm_and_cache(&mut out, s);
    ca_trust(&mut out, s);
    tracker(&mut out, s);
    last_errors(&mut out, s);
    out.push('\n');
    if !s.seed {
        steering(&mut out, s);
        out.push('\n');
        let rows: Vec<[String; 3]> = s
            .programs
            .iter()
            .map(|p| [p.name.clone(), p.hook.clone(), p.id.to_string()])
            .collect();
        table(&mut out, ["PROGRAM", "HOOK", "ID"], &rows);

        out.push('\n');
        let rows: Vec<[String; 3]> = s
            .counters
            .iter()
            .map(|c| {
                [
                    c.port.to_string(),
                    c.steered.to_string(),
                    c.passed.to_string(),
                ]
            })
            .collect();
        table(&mut out, ["PORT", "STEERED", "PASSED"], &rows);
        out.push('\n');
    }
    intercept_table(&mut out, s);
    out
}

fn steering(out: &mut String, s: &Status) {
    let _ = writeln!(out, "cgroup     {}", s.cgroup);
    let _ = writeln!(out, "pins       {}", s.pin_dir);
    let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "listen     {}", listen.join(", "));
    let ports: Vec<String> = s.rules.ports.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "ports      {}", ports.join(", "));
    let _ = writeln!(out, "comm       {}", s.rules.comms.join(", "));
    let exclude: Vec<String> = s.rules.exclude.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "exclude    {}",
        if exclude.is_empty() {
            "(loopback only)".to_string()
        } else {
            format!("{} (and loopback)", exclude.join(", "))
        }
    );
}

/// One line each: the tracker at a glance, peers, cache.
fn swarm_and_cache(out: &mut String, s: &Status) {
    if s.tracker.is_empty() {
        let _ = writeln!(out, "tracker    none (blobs come from the origin only)");
    } else {
        let up = s.tracker.iter().filter(|r| r.reachable).count();
        let _ = writeln!(
            out,
            "tracker    {up} of {} replicas reachable{}",
            s.tracker.len(),
            if up < s.tracker.len() {
                " (see TRACKER below)"
            } else {
                ""
            }
        );
    }
    if let Some(p) = &s.peers {
        let _ = writeln!(
            out,
            "peers      {} known, {} seen in the last {} min; connections {} out, {} in; serving {}",
            p.known,
            p.seen_recently,
            PEERS_RECENT.as_secs() / 60,
            p.connections_out,
            p.connections_in,
            p.serving
        );
    }
    match &s.cache {
        Some(c) => {
            let pct = if c.capacity_bytes == 0 {
                0.0
            } else {
                c.used_bytes as f64 * 100.0 / c.capacity_bytes as f64
            };
            let _ = writeln!(
                out,
                "cache      {} of {} used ({pct:.0}%); {} blobs, {} partial",
                format_size(c.used_bytes),
                format_size(c.capacity_bytes),
                c.blobs,
                c.partial_blobs
            );
        }
        None => {
            let _ = writeln!(out, "cache      none (blobs stream through)");
        }
    }
}

fn ca_trust(out: &mut String, s: &Status) {
    if s.ca_trust.is_empty() {
        return;
    }
    out.push('\n');
    let (unknown, seen): (Vec<&TrustVerdict>, Vec<&TrustVerdict>) = s
        .ca_trust
        .iter()
        .partition(|v| v.verdict == Verdict::Unknown);
    if !seen.is_empty() {
        let rows: Vec<[String; 3]> = seen
            .iter()
            .map(|v| {
                [
                    v.comm.clone(),
                    v.verdict.label().into(),
                    trust_detail(v, s.time),
                ]
            })
            .collect();
        table(out, ["CLIENT", "NODE CA", "SEEN"], &rows);
    }
    // Most steered names never connect on a given node: one line for them.
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.iter().map(|v| v.comm.as_str()).collect();
        let _ = writeln!(
            out,
            "node CA trust unknown (no TLS connection yet): {}",
            names.join(", ")
        );
    }
    if seen.iter().any(|v| v.verdict == Verdict::NotTrusted) {
        let _ = writeln!(
            out,
            "Not trusted: registry connections go to the origin untouched (no cache, no peers).\n\
             Fix: `damselfly ca install`, then restart the runtime."
        );
    }
}

fn trust_detail(v: &TrustVerdict, now: Stamp) -> String {
    let host = v.host.as_deref().unwrap_or("?");
    let at = v.at.map(|t| ago(t, now)).unwrap_or_default();
    match (v.verdict, v.reason.as_deref()) {
        (Verdict::Unknown, _) => "no TLS connection yet".into(),
        (Verdict::Trusted, _) => format!("handshake with {host} {at}"),
        (Verdict::NotTrusted, Some("started-before-ca")) => {
            format!("started before the node CA: spliced until it restarts (last {host} {at})")
        }
        (Verdict::NotTrusted, _) => match v.spliced_until {
            Some(until) if until > now => format!(
                "refused our certificate for {host} {at}; spliced until {until} (in {})",
                span(now.seconds_until(until))
            ),
            _ => format!(
                "refused our certificate for {host} {at}; offered again on its next connection"
            ),
        },
    }
}

fn tracker(out: &mut String, s: &Status) {
    if s.tracker.is_empty() {
        return;
    }
    out.push('\n');
    let rows: Vec<[String; 4]> = s
        .tracker
        .iter()
        .map(|r| {
            let state = match (r.reachable, r.registered) {
                (true, true) => "reachable",
                (true, false) => "reachable, not registered",
                (false, _) if r.last_ok.is_none() && r.last_error.is_none() => "not asked yet",
                (false, _) => "UNREACHABLE",
            };
            let last_error = match (&r.last_error_at, &r.last_error) {
                (Some(at), Some(e)) => format!("{}: {e}", ago(*at, s.time)),
                _ => "-".into(),
            };
            [
                r.addr.clone(),
                state.into(),
                r.last_ok
                    .map(|t| ago(t, s.time))
                    .unwrap_or_else(|| "never".into()),
                last_error,
            ]
        })
        .collect();
    table(
        out,
        ["TRACKER", "STATE", "LAST ANSWER", "LAST ERROR"],
        &rows,
    );
}

fn last_errors(out: &mut String, s: &Status) {
    out.push('\n');
    if s.last_errors.is_empty() {
        let _ = writeln!(out, "no warnings or errors logged");
        return;
    }
    let rows: Vec<[String; 4]> = s
        .last_errors
        .iter()
        .map(|e| {
            [
                e.time.to_string(),
                e.level.clone(),
                e.target.clone(),
                e.message.clone(),
            ]
        })
        .collect();
    table(out, ["LAST ERRORS", "LEVEL", "TARGET", "MESSAGE"], &rows);
}

/// `12 s ago`, `5 min ago`; `now` is the agent's clock, as `t` is.
fn ago(t: Stamp, now: Stamp) -> String {
    format!("{} ago", span(t.seconds_until(now)))
}

fn span(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

fn intercept_table(out: &mut String, s: &Status) {
    let i = &s.intercept;
    table(
        out,
        ["SPLICED CONNECTIONS", "BYTES UPSTREAM", "BYTES DOWNSTREAM"],
        &[[
            i.connections.to_string(),
            i.bytes_upstream.to_string(),
            i.bytes_downstream.to_string(),
        ]],
    );
}

fn table<const N: usize>(out: &mut String, head: [&str; N], rows: &[[String; N]]) {
    let mut width: [usize; N] = head.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut String, cells: [&str; N]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(out, head);
    for row in rows {
        line(out, std::array::from_fn(|i| row[i].as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admin::{CacheStatus, PeerStatus, ReplicaStatus},
        intercept::Refusal,
        steer::{AttachedProgram, Rules},
        telemetry::{InterceptTotals, LogEvent},
        vocab::PortCounters,
    };

    fn at(s: &str) -> Stamp {
        s.parse().unwrap()
    }

    fn status() -> Status {
        Status {
            instance: "n1".into(),
            seed: false,
            pid: 42,
            time: at("2026-11-30T12:30:21Z"),
            cgroup: "/sys/fs/cgroup/n1".into(),
            pin_dir: "/sys/fs/bpf/damselfly/n1".into(),
            listen: vec!["127.0.0.1:7403".parse().unwrap()],
            programs: vec![AttachedProgram {
                name: "damselfly_conn4".into(),
                id: 7,
                hook: "cgroup/connect4".into(),
            }],
            rules: Rules::new(
                &[443, 80],
                &["containerd".into(), "ctr".into(), "dockerd".into()],
                &["10.96.0.0/12".into()],
            )
            .unwrap(),
            counters: vec![
                PortCounters {
                    port: 443,
                    steered: 12345,
                    passed: 1,
                },
                PortCounters {
                    port: 80,
                    steered: 0,
                    passed: 0,
                },
            ],
            intercept: InterceptTotals {
                connections: 3,
                bytes_upstream: 10,
                bytes_downstream: 99,
            },
            refused_ca: vec![Refusal {
                comm: "dockerd".into(),
                host: "ghcr.io".into(),
                seconds_ago: 42,
            }],
            ca_trust: vec![
                TrustVerdict {
                    comm: "containerd".into(),
                    verdict: Verdict::Trusted,
                    reason: None,
                    host: Some("registry.dfly.test".into()),
                    at: Some(at("2026-11-30T12:30:18Z")),
                    spliced_until: None,
                },
                TrustVerdict {
                    comm: "ctr".into(),
                    verdict: Verdict::Unknown,
                    reason: None,
                    host: None,
                    at: None,
                    spliced_until: None,
                },
                TrustVerdict {
                    comm: "dockerd".into(),
                    verdict: Verdict::NotTrusted,
                    reason: Some("refused".into()),
                    host: Some("ghcr.io".into()),
                    at: Some(at("2026-11-30T12:29:39Z")),
                    spliced_until: Some(at("2026-11-30T12:39:39Z")),
                },
            ],
            tracker: vec![
                ReplicaStatus {
                    addr: "10.0.0.9:7400".into(),
                    reachable: true,
                    registered: true,
                    last_ok: Some(at("2026-11-30T12:30:19Z")),
                    last_error_at: None,
                    last_error: None,
                },
                ReplicaStatus {
                    addr: "10.0.0.8:7400".into(),
                    reachable: false,
                    registered: false,
                    last_ok: Some(at("2026-11-30T12:20:21Z")),
                    last_error_at: Some(at("2026-11-30T12:30:16Z")),
                    last_error: Some("no answer within 1.5s".into()),
                },
            ],
            peers: Some(PeerStatus {
                known: 4,
                seen_recently: 3,
                connections_out: 2,
                connections_in: 1,
                serving: 1,
            }),
            cache: Some(CacheStatus {
                capacity_bytes: 20 << 30,
                used_bytes: 5 << 30,
                blobs: 14,
                partial_blobs: 1,
            }),
            last_errors: vec![LogEvent {
                time: at("2026-11-30T12:30:16Z"),
                level: "WARN".into(),
                target: "damselfly_tracker::client".into(),
                message: "tracker 10.0.0.8:7400 heartbeat: no answer within 1.5s".into(),
            }],
        }
    }

    #[test]
    fn the_first_questions_are_answered_on_top() {
        let text = render(&status());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "tracker    1 of 2 replicas reachable (see TRACKER below)"
        );
        assert_eq!(
            lines[2],
            "peers      4 known, 3 seen in the last 10 min; connections 2 out, 1 in; serving 1"
        );
        assert_eq!(
            lines[3],
            "cache      5.0 GiB of 20.0 GiB used (25%); 14 blobs, 1 partial"
        );
        assert!(
            text.contains("containerd  trusted      handshake with registry.dfly.test 3 s ago"),
            "{text}"
        );
        assert!(
            text.contains("node CA trust unknown (no TLS connection yet): ctr\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "dockerd     not trusted  refused our certificate for ghcr.io 42 s ago; \
                 spliced until 2026-11-30T12:39:39Z (in 9 min)"
            ),
            "{text}"
        );
        assert!(text.contains("`damselfly ca install`"), "{text}");
        assert!(
            text.contains("10.0.0.9:7400  reachable    2 s ago      -"),
            "{text}"
        );
        assert!(
            text.contains(
                "10.0.0.8:7400  UNREACHABLE  10 min ago   5 s ago: no answer within 1.5s"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "2026-11-30T12:30:16Z  WARN   damselfly_tracker::client  tracker 10.0.0.8:7400"
            ),
            "{text}"
        );
        // The summary comes before steering's details.
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle}: {text}"))
        };
        assert!(pos("cache ") < pos("PROGRAM") && pos("LAST ERRORS") < pos("cgroup "));
    }

    #[test]
    fn steering_tables_are_aligned_and_carry_every_value() {
        let text = render(&status());
        assert!(
            text.contains("damselfly_conn4  cgroup/connect4  7"),
            "{text}"
        );
        assert!(text.contains("443   12345    1"), "{text}");
        assert!(text.contains("80    0        0"), "{text}");
        assert!(text.contains("10.96.0.0/12 (and loopback)"), "{text}");
        assert!(
            text.contains("3                    10              99"),
            "{text}"
        );
    }

    #[test]
    fn a_seed_shows_what_applies_to_it() {
        let seed = Status {
            seed: true,
            programs: Vec::new(),
            counters: Vec::new(),
            ca_trust: Vec::new(),
            refused_ca: Vec::new(),
            last_errors: Vec::new(),
            ..status()
        };
        let text = render(&seed);
        assert!(text.contains("seed (no steering)"), "{text}");
        assert!(!text.contains("PROGRAM"), "{text}");
        assert!(!text.contains("NODE CA"), "{text}");
        assert!(!text.contains("cgroup"), "{text}");
        assert!(text.contains("1 of 2 replicas reachable"), "{text}");
        assert!(text.contains("14 blobs, 1 partial"), "{text}");
        assert!(text.contains("no warnings or errors logged"), "{text}");
    }

    #[test]
    fn an_agent_without_swarm_or_cache_says_so() {
        let plain = Status {
            tracker: Vec::new(),
            peers: None,
            cache: None,
            ..status()
        };
        let text = render(&plain);
        assert!(
            text.contains("tracker    none (blobs come from the origin only)"),
            "{text}"
        );
        assert!(
            text.contains("cache      none (blobs stream through)"),
            "{text}"
        );
        assert!(!text.contains("peers "), "{text}");
        assert!(!text.contains("TRACKER"), "{text}");
    }

    #[test]
    fn the_json_round_trips_and_an_older_agents_json_still_reads() {
        let s = status();
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(render(&back), render(&s));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["tracker"][0]["reachable"], true);
        assert_eq!(v["cache"]["blobs"], 14);
        assert_eq!(v["ca_trust"][0]["verdict"], "trusted");
        assert_eq!(v["last_errors"][0]["level"], "WARN");
        assert_eq!(v["refused_ca"][0]["comm"], "dockerd");

        // Before these sections existed.
        let mut old = v.clone();
        for k in [
            "time",
            "ca_trust",
            "tracker",
            "peers",
            "cache",
            "last_errors",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        let old: Status = serde_json::from_value(old).unwrap();
        assert!(old.tracker.is_empty() && old.cache.is_none());
    }
}
