//! End-to-end smoke run of `dfly-bench` with tiny sizes: every mode, N=2,
//! the concurrent and the sequential scenario; checks what it writes, not
//! the numbers (those depend on the machine).

use std::process::Command;

use damselfly_testbed::bench::{self, Row};

#[test]
fn the_bench_writes_a_row_per_node_per_run_per_mode_and_its_table_and_plot() {
    let out = tempfile::Builder::new()
        .prefix(&format!("dfly-{}-bench-out", std::process::id()))
        .tempdir()
        .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_dfly-bench"))
        .args([
            "--nodes",
            "2",
            "--image-size",
            "20MiB",
            "--repeat",
            "1",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "dfly-bench failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let rows =
        bench::parse_csv(&std::fs::read_to_string(out.path().join("bench.csv")).unwrap()).unwrap();
    let modes = ["direct", "central", "damselfly", "damselfly+seed"];
    for mode in modes {
        for scenario in ["concurrent", "sequential"] {
            let nodes: Vec<usize> = rows
                .iter()
                .filter(|r| r.mode == mode && r.scenario == scenario)
                .map(|r| r.node)
                .collect();
            assert_eq!(nodes, [1, 2], "{mode} {scenario}: {rows:#?}");
        }
    }
    assert_eq!(rows.len(), modes.len() * 2 * 2);
    let all_pulled = |r: &Row| r.pull_s > 0.0 && r.image_bytes > 20 << 20 && r.t_star_s > 0.0;
    assert!(rows.iter().all(all_pulled), "{rows:#?}");
    // The swarm takes the image from the origin about once; direct pulls twice.
    for r in &rows {
        let ratio = r.origin_bytes as f64 / r.image_bytes as f64;
        match r.mode.as_str() {
            "direct" => assert!(ratio >= 1.9, "{r:?}"),
            "damselfly" | "damselfly+seed" => assert!(ratio < 1.5, "{r:?}"),
            _ => {}
        }
        if r.mode.starts_with("damselfly") {
            assert!(r.agent_rss_kib > 0, "{r:?}");
        }
    }
    let md = std::fs::read_to_string(out.path().join("bench.md")).unwrap();
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        1 + 8,
        "{md}"
    );
    let png = std::fs::read(out.path().join("bench.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "bench.png is not a PNG");
}
