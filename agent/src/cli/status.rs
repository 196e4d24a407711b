//! `damselfly status`: fetch `/status` from a running agent and print tables.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::admin::Status;

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

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "agent      {} (pid {})", s.instance, s.pid);
    if s.seed {
        let _ = writeln!(out, "mode       seed (no steering)");
        out.push('\n');
        intercept_table(&mut out, s);
        return out;
    }
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
    intercept_table(&mut out, s);
    if !s.refused_ca.is_empty() {
        out.push('\n');
        let _ = writeln!(
            out,
            "These clients refused the node CA; their connections are spliced to the origin \
             (`damselfly ca install`, then restart the runtime):"
        );
        let rows: Vec<[String; 3]> = s
            .refused_ca
            .iter()
            .map(|r| {
                [
                    r.comm.clone(),
                    r.host.clone(),
                    format!("{} s ago", r.seconds_ago),
                ]
            })
            .collect();
        table(&mut out, ["CLIENT", "REGISTRY", "REFUSED"], &rows);
    }
    out
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
        admin::metrics::InterceptTotals,
        steer::{AttachedProgram, PortCounters, Rules},
    };

    #[test]
    fn tables_are_aligned_and_carry_every_value() {
        let s = Status {
            instance: "n1".into(),
            seed: false,
            pid: 42,
            cgroup: "/sys/fs/cgroup/n1".into(),
            pin_dir: "/sys/fs/bpf/damselfly/n1".into(),
            listen: vec!["127.0.0.1:7403".parse().unwrap()],
            programs: vec![AttachedProgram {
                name: "damselfly_conn4".into(),
                id: 7,
                hook: "cgroup/connect4".into(),
            }],
            rules: Rules::new(&[443, 80], &["ctr".into()], &["10.96.0.0/12".into()]).unwrap(),
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
            refused_ca: vec![crate::intercept::trust::Refusal {
                comm: "containerd".into(),
                host: "ghcr.io".into(),
                seconds_ago: 42,
            }],
        };
        let text = render(&s);
        assert!(
            text.contains("refused the node CA") && text.contains("containerd  ghcr.io   42 s ago"),
            "{text}"
        );
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

        let seed = Status {
            seed: true,
            programs: Vec::new(),
            counters: Vec::new(),
            ..s
        };
        let text = render(&seed);
        assert!(text.contains("seed (no steering)"), "{text}");
        assert!(!text.contains("PROGRAM"), "{text}");
    }
}
