//! End-to-end: the real kernel programs steer a client's connects in node 1
//! to the real agent, which splices them to a server in node 2.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use damselfly_testbed::{
    Agent, Proc, Testbed,
    agent::{probe_get, start_server},
    body,
    pki::TestCa,
    testbed::BPFFS_ROOT,
};

const ORIGIN: &str = "origin.dfly.test";
const MB50: u64 = 50 * 1000 * 1000;

struct Bed {
    agent: Agent,
    _server: Proc,
    ca: PathBuf,
    // Last: dropped after the processes above.
    tb: Testbed,
}

/// Node 1: client + agent (with `flags`). Node 2: origin on :80, :443 (TLS,
/// cert for origin.dfly.test from a test CA), :8080 and [v6]:80.
fn bed(flags: &[&str]) -> Bed {
    bed_with_env(flags, &[])
}

fn bed_with_env(flags: &[&str], env: &[(&str, &str)]) -> Bed {
    let tb = Testbed::new(2).expect("testbed");
    let srv = tb.node(2).clone();
    let ca = TestCa::new("dfly test public CA").unwrap();
    let ca_path = tb.dir.join("public-ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (crt, key) = ca
        .issue(&[ORIGIN])
        .unwrap()
        .write(&tb.dir, "origin")
        .unwrap();
    tb.add_host(ORIGIN, srv.ip4.into()).unwrap();
    let server = start_server(
        &tb,
        &srv,
        &[srv.addr4(80), srv.addr4(8080), srv.addr6(80)],
        &[srv.addr4(443)],
        Some((crt, key)),
    )
    .unwrap();
    let agent = Agent::start_with_env(&tb, tb.node(1), flags, env).unwrap();
    Bed {
        agent,
        _server: server,
        ca: ca_path,
        tb,
    }
}

fn get(b: &Bed, comm: &str, url: &str) -> damselfly_testbed::probe::GetResult {
    probe_get(b.tb.node(1), comm, url, Some(&b.ca)).unwrap()
}

#[test]
fn http_on_80_is_steered_and_spliced_intact() {
    let b = bed(&[]);
    let srv = b.tb.node(2).addr4(80);
    let (steered0, spliced0) = (b.agent.steered(80).unwrap(), b.agent.spliced().unwrap());
    let down0 = b
        .agent
        .metric("damselfly_intercept_bytes_total{direction=\"downstream\"}")
        .unwrap();

    let r = get(&b, "ctr", &format!("http://{srv}/bytes/{MB50}"));
    assert_eq!(r.error, None, "{}", b.agent.log_text());
    assert_eq!((r.status, r.bytes), (200, MB50));
    assert_eq!(
        r.sha256,
        body::sha256(MB50, MB50),
        "body changed in transit"
    );
    // getpeername inside the client shows the server, not the agent's listener.
    assert_eq!(r.peer, srv.to_string());

    assert_eq!(b.agent.steered(80).unwrap(), steered0 + 1.0);
    assert_eq!(b.agent.spliced().unwrap(), spliced0 + 1.0);
    let down = b
        .agent
        .metric("damselfly_intercept_bytes_total{direction=\"downstream\"}")
        .unwrap();
    assert!(
        down - down0 >= MB50 as f64,
        "downstream bytes {down} - {down0}"
    );
    assert!(
        b.agent
            .metric("damselfly_intercept_bytes_total{direction=\"upstream\"}")
            .unwrap()
            > 0.0
    );
    // The server saw the request arrive (from the agent, in the client's node).
    let peer_seen = get(&b, "ctr", &format!("http://{srv}/peer"));
    assert!(peer_seen.bytes > 0);
}

#[test]
fn tls_on_443_is_spliced_and_the_client_verifies_the_real_certificate() {
    let b = bed(&[]);
    let steered0 = b.agent.steered(443).unwrap();
    let r = get(&b, "containerd", &format!("https://{ORIGIN}/bytes/1000000"));
    assert_eq!(r.error, None, "{}", b.agent.log_text());
    assert_eq!(r.status, 200);
    assert_eq!(r.sha256, body::sha256(1_000_000, 1_000_000));
    assert_eq!(r.peer, b.tb.node(2).addr4(443).to_string());
    assert_eq!(b.agent.steered(443).unwrap(), steered0 + 1.0);
    // The agent saw the SNI without decrypting anything.
    assert!(
        b.agent.log_text().contains(ORIGIN),
        "{}",
        b.agent.log_text()
    );
}

#[test]
fn other_processes_other_ports_excluded_and_loopback_are_not_steered() {
    // Node 2's IPv6 address is excluded (and an unrelated IPv4 one, to exercise lists).
    let exclude = "10.213.0.99/32,fd00:213::c/128";
    let b = bed(&["--steer-exclude", exclude]);
    assert_eq!(
        format!("{}/128", b.tb.node(2).ip6),
        exclude.split(',').nth(1).unwrap()
    );
    let srv = b.tb.node(2);
    let spliced0 = b.agent.spliced().unwrap();

    // A process name not in the allow-list.
    let passed0 = b.agent.passed(80).unwrap();
    let r = get(&b, "curl", &format!("http://{}/bytes/1000", srv.addr4(80)));
    assert_eq!((r.error, r.status), (None, 200));
    assert_eq!(b.agent.passed(80).unwrap(), passed0 + 1.0);
    assert_eq!(b.agent.steered(80).unwrap(), 0.0);

    // A port not in the set: not even counted.
    let r = get(&b, "ctr", &format!("http://{}/bytes/1000", srv.addr4(8080)));
    assert_eq!((r.error, r.status), (None, 200));

    // An excluded destination (IPv6 /128 here; the IPv4 entry shows lists work).
    let passed0 = b.agent.passed(80).unwrap();
    let r = get(&b, "ctr", &format!("http://[{}]/bytes/1000", srv.ip6));
    assert_eq!((r.error, r.status), (None, 200));
    assert_eq!(b.agent.passed(80).unwrap(), passed0 + 1.0);

    // Loopback: the agent's own admin port is on 127.0.0.1; a steered port there too.
    let passed0 = b.agent.passed(80).unwrap();
    let r = get(&b, "ctr", "http://127.0.0.1:80/");
    assert!(
        r.error.is_some(),
        "nothing listens on the node's 127.0.0.1:80"
    );
    assert_eq!(b.agent.passed(80).unwrap(), passed0 + 1.0);

    assert_eq!(
        b.agent.spliced().unwrap(),
        spliced0,
        "nothing above went through the agent:\n{}",
        b.agent.log_text()
    );
    assert_eq!(b.agent.steered(80).unwrap(), 0.0);
}

#[test]
fn kernel_logs_each_steering_decision_only_when_asked() {
    // Off by default: not a line from the kernel at the default level.
    let quiet = bed(&[]);
    let srv = quiet.tb.node(2).addr4(80);
    let r = get(&quiet, "ctr", &format!("http://{srv}/bytes/1000"));
    assert_eq!((r.error, r.status), (None, 200));
    assert!(
        !quiet.agent.log_text().contains("damselfly::kernel"),
        "{}",
        quiet.agent.log_text()
    );
    drop(quiet);

    let b = bed_with_env(
        &["--steer-exclude", "10.213.0.99/32,fd00:213::c/128"],
        &[("DAMSELFLY_LOG", "info,damselfly::kernel=debug")],
    );
    let srv = b.tb.node(2);
    for (comm, url) in [
        ("ctr", format!("http://{}/bytes/1000", srv.addr4(80))),
        ("curl", format!("http://{}/bytes/1000", srv.addr4(80))),
        ("ctr", format!("http://[{}]/bytes/1000", srv.ip6)),
    ] {
        let r = get(&b, comm, &url);
        assert_eq!((r.error, r.status), (None, 200), "{comm} {url}");
    }
    let expected = [
        format!("steered: ctr (pid {{}}) to {}", srv.addr4(80)),
        format!(
            "not steered (process not in the steer list): curl (pid {{}}) to {}",
            srv.addr4(80)
        ),
        format!(
            "not steered (excluded destination): ctr (pid {{}}) to [{}]:80",
            srv.ip6
        ),
    ];
    // The reader forwards records as the ring buffer wakes it: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = b.agent.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("damselfly::kernel"))
            .collect();
        let found = expected.iter().all(|e| {
            let (head, tail) = e.split_once("{}").unwrap();
            lines.iter().any(|l| {
                l.split_once(head)
                    .and_then(|(_, rest)| rest.split_once(tail))
                    .is_some_and(|(pid, _)| pid.parse::<u32>().is_ok())
            })
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:#?} in the kernel's lines:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_process_in_a_pods_network_namespace_is_not_steered() {
    // A pod's process: in the node's cgroup (as every pod's is) but in a
    // network namespace of its own, where the agent's loopback listener is
    // not. Steered there, `ctr` would reach nothing at all.
    let mut b = bed(&[]);
    let pod = b.tb.pod(1).unwrap();
    let _server = start_server(&b.tb, &pod, &[pod.addr4(80)], &[], None).unwrap();
    let r = probe_get(
        &pod,
        "ctr",
        &format!("http://{}/bytes/1000", pod.addr4(80)),
        None,
    )
    .unwrap();
    assert_eq!((r.error, r.status), (None, 200));
    assert_eq!(r.peer, pod.addr4(80).to_string());
    assert_eq!(b.agent.steered(80).unwrap(), 0.0);
    assert_eq!(b.agent.passed(80).unwrap(), 1.0);
    // The node's own namespace is steered as ever.
    let r = get(
        &b,
        "ctr",
        &format!("http://{}/bytes/1000", b.tb.node(2).addr4(80)),
    );
    assert_eq!((r.error, r.status), (None, 200));
    assert_eq!(b.agent.steered(80).unwrap(), 1.0);
}

#[test]
fn ipv4_mapped_ipv6_destinations_obey_the_ipv4_exclusions_and_loopback() {
    let b = bed(&["--steer-exclude", "10.213.0.0/24"]);
    let mapped = format!("[::ffff:{}]:80", b.tb.node(2).ip4);
    let r = get(&b, "ctr", &format!("http://{mapped}/bytes/1000"));
    assert_eq!((r.error, r.status), (None, 200));
    let r = get(&b, "ctr", "http://[::ffff:127.0.0.1]:80/");
    assert!(
        r.error.is_some(),
        "nothing listens on the node's 127.0.0.1:80"
    );
    assert_eq!(b.agent.steered(80).unwrap(), 0.0);
    assert_eq!(b.agent.passed(80).unwrap(), 2.0);
    assert_eq!(b.agent.spliced().unwrap(), 0.0);
}

#[test]
fn an_agent_in_its_own_pid_namespace_never_steers_its_own_connects() {
    // In a container without hostPID the agent's pid is not the tgid the
    // kernel sees. Its threads' names (tokio's workers, its main thread) are
    // in the steer list here, so a connect of its own that the kernel failed
    // to recognise would come back to it (a loop) instead of reaching the server.
    let tb = Testbed::new(2).expect("testbed");
    let srv = tb.node(2).clone();
    let _server = start_server(&tb, &srv, &[srv.addr4(80)], &[], None).unwrap();
    let agent = Agent::start_wrapped(
        &tb,
        tb.node(1),
        &["--steer-comm", "ctr,tokio-rt-worker,damselfly"],
        &["unshare", "--pid", "--fork", "--kill-child", "--"],
    )
    .unwrap();
    let (_, status) = agent.node.http_get(agent.admin, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pid"], 1, "the agent runs as pid 1 of its namespace");

    let r = probe_get(
        tb.node(1),
        "ctr",
        &format!("http://{}/bytes/{MB50}", srv.addr4(80)),
        None,
    )
    .unwrap();
    assert_eq!(r.error, None, "{}", agent.log_text());
    assert_eq!(r.sha256, body::sha256(MB50, MB50));
    assert_eq!(agent.steered(80).unwrap(), 1.0);
    assert_eq!(agent.spliced().unwrap(), 1.0);
}

#[test]
fn excluded_ipv4_cidr_is_not_steered() {
    let b = bed(&["--steer-exclude", "10.213.0.0/24"]);
    let r = get(
        &b,
        "ctr",
        &format!("http://{}/bytes/1000", b.tb.node(2).addr4(80)),
    );
    assert_eq!((r.error, r.status), (None, 200));
    assert_eq!(b.agent.steered(80).unwrap(), 0.0);
    assert_eq!(b.agent.passed(80).unwrap(), 1.0);
    assert_eq!(b.agent.spliced().unwrap(), 0.0);
}

#[test]
fn ipv6_is_steered_and_spliced() {
    let b = bed(&[]);
    let srv = b.tb.node(2).addr6(80);
    let r = get(&b, "skopeo", &format!("http://{srv}/bytes/{MB50}"));
    assert_eq!(r.error, None, "{}", b.agent.log_text());
    assert_eq!(r.sha256, body::sha256(MB50, MB50));
    assert_eq!(r.peer, srv.to_string());
    assert_eq!(b.agent.steered(80).unwrap(), 1.0);
    assert_eq!(b.agent.spliced().unwrap(), 1.0);
}

#[test]
fn refused_destination_resets_the_client_quickly() {
    let b = bed(&[]);
    // Nothing listens on node 2's port 443 over IPv6: the origin refuses.
    let url = format!("https://[{}]:443/", b.tb.node(2).ip6);
    let started = Instant::now();
    let r = get(&b, "ctr", &url);
    let took = started.elapsed();
    let err = r.error.expect("a refused origin must fail the client");
    assert!(
        err.contains("reset")
            || err.contains("refused")
            || err.contains("closed")
            || err.contains("eof"),
        "client saw {err}"
    );
    assert!(
        took < Duration::from_secs(5),
        "client waited {took:?}: looks like a hang"
    );
    assert_eq!(
        b.agent.steered(443).unwrap(),
        1.0,
        "the connect was steered"
    );
}

#[test]
fn fail_open_across_kill_and_restart_cycles() {
    let mut b = bed(&[]);
    let url = format!("http://{}/bytes/200000", b.tb.node(2).addr4(80));
    let want = body::sha256(200_000, 200_000);
    let mut failures = Vec::new();
    let mut check = |b: &Bed, what: String| {
        let r = get(b, "ctr", &url);
        if r.error.is_some() || r.sha256 != want {
            failures.push(format!("{what}: {:?}", r.error));
        }
    };
    for cycle in 0..20 {
        check(&b, format!("cycle {cycle} steered"));
        assert!(b.agent.steered(80).unwrap() >= 1.0);
        b.agent.kill();
        // Right after the kill: the links are gone, the connect goes straight out.
        check(&b, format!("cycle {cycle} after SIGKILL"));
        b.agent.restart().unwrap();
        // Counters start from zero in the restarted agent's fresh maps.
        check(&b, format!("cycle {cycle} after restart"));
        assert_eq!(
            b.agent.steered(80).unwrap(),
            1.0,
            "cycle {cycle}: steering resumed"
        );
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
}

#[test]
fn sigterm_detaches_and_removes_pins() {
    let mut b = bed(&[]);
    let pins = PathBuf::from(BPFFS_ROOT).join(&b.agent.node.name);
    assert!(pins.join("counters").exists());
    let st = b.agent.terminate().unwrap();
    assert!(st.success(), "agent exit status {st}");
    assert!(!pins.exists(), "pins left at {}", pins.display());
    let cg = bpftool(&["cgroup", "show", &b.tb.node(1).cgroup.display().to_string()]);
    assert!(!cg.contains("damselfly"), "still attached: {cg}");
    // And a connect now goes straight to the server.
    let r = get(
        &b,
        "ctr",
        &format!("http://{}/bytes/1000", b.tb.node(2).addr4(80)),
    );
    assert_eq!((r.error, r.status), (None, 200));
}

#[test]
fn bpftool_shows_named_programs_attachments_and_pinned_counters() {
    let b = bed(&[]);
    let r = get(
        &b,
        "ctr",
        &format!("http://{}/bytes/1000", b.tb.node(2).addr4(80)),
    );
    assert_eq!(r.error, None);

    let progs = bpftool(&["prog", "show"]);
    for name in [
        "damselfly_conn4",
        "damselfly_conn6",
        "damselfly_peer4",
        "damselfly_peer6",
        "damselfly_sops",
    ] {
        assert!(
            progs.contains(&format!("name {name}")),
            "bpftool prog show lacks {name}:\n{progs}"
        );
    }
    let cg = bpftool(&["cgroup", "show", &b.tb.node(1).cgroup.display().to_string()]);
    for hook in [
        "inet4_connect",
        "inet6_connect",
        "inet4_getpeername",
        "inet6_getpeername",
        "sock_ops",
    ] {
        assert!(cg.contains(hook), "bpftool cgroup show lacks {hook}:\n{cg}");
    }

    // The pinned per-CPU counters: slot 1 is port 80 (--steer-ports 443,80).
    // The object carries BTF, so bpftool prints every field by its name.
    let dump = |map: &str| -> serde_json::Value {
        let pin = PathBuf::from(BPFFS_ROOT).join(&b.agent.node.name).join(map);
        let out = bpftool(&["-j", "map", "dump", "pinned", &pin.display().to_string()]);
        serde_json::from_str(&out).unwrap()
    };
    let counters = dump("counters");
    let slot = counters
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .find(|f| f["key"] == 1)
        .unwrap_or_else(|| panic!("no formatted slot 1 in {counters}"));
    let (mut steered, mut passed) = (0, 0);
    for cpu in slot["values"].as_array().unwrap() {
        steered += cpu["value"]["steered"].as_u64().unwrap();
        passed += cpu["value"]["passed"].as_u64().unwrap();
    }
    assert_eq!((steered, passed), (1, 0), "{counters}");
    let config = &dump("config")[0]["formatted"]["value"];
    assert_eq!(config["agent_tgid"], b.agent.proc.pid(), "{config}");
    assert_eq!(config["listen4_port"], 7403, "{config}");
    let ports = dump("ports");
    let mut by_port: Vec<(u64, u64)> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let f = &e["formatted"];
            (f["key"].as_u64().unwrap(), f["value"].as_u64().unwrap())
        })
        .collect();
    by_port.sort();
    assert_eq!(by_port, [(80, 1), (443, 0)], "{ports}");

    // `damselfly status` in the node prints the same.
    let node = b.tb.node(1);
    let mut cmd = node
        .command(damselfly_testbed::agent::damselfly_bin().unwrap())
        .unwrap();
    let out = cmd.arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("damselfly_conn4") && text.contains("cgroup/connect4"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("80 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["80", "1", "0"],
        "{text}"
    );
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool is needed (apt-get install bpftool; `cargo xtask setup` does it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
