//! End-to-end: `dfly-demo` (what `cargo xtask demo` runs) at a tiny size, so
//! the demo cannot rot: it finishes, prints its three steps, and leaves
//! nothing behind, also when interrupted.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use damselfly_testbed::testbed::{BPFFS_ROOT, cgroup2_root};

const DEMO: &str = env!("CARGO_BIN_EXE_dfly-demo");

fn demo(args: &[&str]) -> Command {
    let mut cmd = Command::new(DEMO);
    cmd.args(["--image-size", "20MiB", "--layers", "2"])
        .args(args);
    cmd
}

/// Every object of run `pid` that is still there.
fn leftovers(pid: u32) -> Vec<String> {
    let prefix = format!("dfly-{pid}-");
    let dirs = [
        Path::new("/run/netns").to_path_buf(),
        Path::new("/etc/netns").to_path_buf(),
        Path::new(BPFFS_ROOT).to_path_buf(),
        std::env::temp_dir(),
        cgroup2_root().unwrap(),
    ];
    dirs.iter()
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(&prefix)))
        .collect()
}

#[test]
fn the_demo_prints_three_steps_and_cleans_up() {
    let started = Instant::now();
    let child = demo(&[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "| 1. first node | n1 |",
        "| 2. second node | n2 |",
        "| 3. all at once | n1 |",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    // Step 3 pulls on every node: n2 and n3 follow n1 in the same step.
    assert!(stdout.contains("|  | n3 |"), "{stdout}");
    assert!(stdout.contains("status --admin"), "{stdout}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
    eprintln!("demo took {:?}", started.elapsed());
}

#[test]
fn ctrl_c_tears_the_demo_down() {
    let mut child = demo(&["--keep"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Interrupt in the middle: the nodes, agents and registry all exist.
    // The reader keeps draining: a closed pipe would fail the demo's own prints.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    while !seen.contains("step 1:") {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => panic!("the demo never got to step 1:\n{seen}"),
        }
    }
    assert!(!leftovers(pid).is_empty(), "nothing to clean up yet?");
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the demo ignored SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
