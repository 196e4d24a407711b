//! End-to-end: nodes share blobs through the tracker and QUIC, with real
//! containerd, a real registry and the real kernel steering.

use std::time::{Duration, Instant};

use damselfly_testbed::{
    Agent, Testbed,
    agent::damselfly_bin,
    cluster::{Cluster, peer_flags},
    containerd::Containerd,
    image::Image,
    origin::Origin,
    pki::TestCa,
};

const REGISTRY: &str = "registry.dfly.test";
const MB: u64 = 1000 * 1000;
/// The agent's test-only switch that corrupts every piece it uploads
/// (`DAMSELFLY_TEST_CORRUPT_UPLOADS`, read in `agent/src/swarm/peer/server.rs`).
const CORRUPT_UPLOADS_ENV: &str = "DAMSELFLY_TEST_CORRUPT_UPLOADS";

/// Nodes 1..=n are pulling nodes (agent + containerd); the last node runs the
/// origin registry and the tracker.
struct Swarm {
    containerds: Vec<Containerd>,
    agents: Vec<Agent>,
    cluster: Cluster,
    origin: Origin,
    tb: Testbed,
}

fn swarm(pulling: usize) -> Swarm {
    swarm_with(pulling, |_| NodeOpts::default())
}

/// How one pulling node differs from the rest.
#[derive(Default)]
struct NodeOpts {
    /// Its peer certificate comes from another CA. It trusts that CA and the
    /// cluster's (a certificate that does not chain to its own
    /// `--cluster-ca` stops the agent at startup), so it can verify the
    /// tracker and the peers, but they cannot verify it.
    outsider: bool,
    env: Vec<(&'static str, &'static str)>,
    flags: Vec<String>,
}

fn swarm_with(pulling: usize, opts: impl Fn(usize) -> NodeOpts) -> Swarm {
    let tb = Testbed::new(pulling + 1).expect("testbed");
    let infra = pulling + 1;
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, infra, REGISTRY, &public_ca, None).unwrap();

    let cluster = Cluster::start(&tb, infra).unwrap();
    let outsider = TestCa::new("not the cluster CA").unwrap();
    let outsider_pem = tb.dir.join("outsider-ca.crt");
    std::fs::write(&outsider_pem, outsider.pem() + &cluster.ca.pem()).unwrap();
    let mut agents = Vec::new();
    let mut containerds = Vec::new();
    for i in 1..=pulling {
        let opts = opts(i);
        let (issuer, ca_pem) = if opts.outsider {
            (&outsider, &outsider_pem)
        } else {
            (&cluster.ca, &cluster.ca_pem)
        };
        let mut flags = origin.agent_flags();
        flags.extend(peer_flags(&tb, issuer, ca_pem, cluster.tracker_addr, i).unwrap());
        flags.extend(opts.flags);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = Agent::start_with_env(&tb, tb.node(i), &flags, &opts.env).unwrap();
        containerds.push(Containerd::start_for(&tb, &agent, &public_ca).unwrap());
        agents.push(agent);
    }
    Swarm {
        containerds,
        agents,
        cluster,
        origin,
        tb,
    }
}

fn m(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap()
}

fn wait_cached(s: &Swarm, node: usize, img: &Image) {
    s.agents[node - 1].wait_cached(&img.blob_digests());
}

/// `ctr images pull` in the background; its stderr is kept for the verdict.
fn spawn_ctr_pull(containerd: &Containerd, reference: &str) -> std::process::Child {
    let mut cmd = containerd.ctr().unwrap();
    cmd.args(["images", "pull", reference]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_second_node_pulls_from_the_first_with_no_origin_blob_bytes() {
    let s = swarm(2);
    let img = Image::build_and_push(
        &s.tb,
        &s.origin,
        "team/app",
        "v1",
        &[30 * MB, 20 * MB, 10 * MB],
        11,
    )
    .unwrap();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 1, &img);
    // Announcements follow the commit; give them a moment to reach the tracker.
    std::thread::sleep(Duration::from_millis(500));
    let origin_before = s
        .origin
        .wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));

    s.containerds[1].cri_pull(&img.reference, None).unwrap();
    wait_cached(&s, 2, &img);
    let origin_after = s
        .origin
        .wait_blob_bytes(origin_before + 1, Duration::from_secs(1));
    assert_eq!(
        origin_after,
        origin_before,
        "node 2 took blob bytes from the origin:\n{}\n{}\nnode 1:\n{}",
        s.agents[1].metrics().unwrap(),
        s.agents[1].log_text(),
        s.agents[0].log_text()
    );
    let from_peers = m(&s.agents[1], "damselfly_blob_bytes_total{source=\"peer\"}");
    assert!(
        from_peers >= img.total_blob_bytes as f64,
        "node 2 got {from_peers} bytes from peers"
    );
    assert!(
        m(
            &s.agents[1],
            "damselfly_pieces_total{source=\"peer\",result=\"ok\"}"
        ) >= 4.0
    );
    let (pin, pout) = (
        m(&s.agents[1], "damselfly_peer_bytes_total{direction=\"in\"}"),
        m(
            &s.agents[0],
            "damselfly_peer_bytes_total{direction=\"out\"}",
        ),
    );
    assert!(
        pin >= img.total_blob_bytes as f64 && pout >= pin,
        "in {pin} out {pout}:\n{}",
        s.agents[1].metrics().unwrap()
    );
}

#[test]
fn four_nodes_pulling_at_once_take_the_image_from_the_origin_about_once() {
    let s = swarm(4);
    let img = Image::build_and_push(
        &s.tb,
        &s.origin,
        "team/big",
        "v1",
        &[70 * MB, 60 * MB, 50 * MB, 40 * MB],
        21,
    )
    .unwrap();
    let origin_before = s.origin.blob_bytes_sent();
    // The origin's uplink is the bottleneck, as in a cluster behind one uplink.
    s.tb.node(5).shape(&s.tb.hub, 200).unwrap();
    let started = Instant::now();
    let times: Vec<Duration> = std::thread::scope(|scope| {
        let pulls: Vec<_> = s
            .containerds
            .iter()
            .map(|c| {
                let reference = img.reference.clone();
                scope.spawn(move || {
                    c.cri_pull(&reference, None).unwrap();
                    started.elapsed()
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().unwrap()).collect()
    });
    for n in 1..=4 {
        wait_cached(&s, n, &img);
    }
    let sent = s.origin.blob_bytes_sent() - origin_before;
    let ratio = sent as f64 / img.total_blob_bytes as f64;
    eprintln!("pull times {times:?}; origin sent {sent} bytes = {ratio:.3} x the image");
    let logs = || {
        (0..4)
            .map(|i| {
                let log = s.agents[i].log_text();
                let why: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("from the origin") || l.contains("WARN"))
                    .take(40)
                    .collect();
                format!(
                    "node {}:\n{}\n{}",
                    i + 1,
                    s.agents[i].metrics().unwrap_or_default(),
                    why.join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        ratio <= 1.1,
        "origin sent {ratio:.3} x the image\n{}",
        logs()
    );
    let from_peers: f64 = s
        .agents
        .iter()
        .map(|a| m(a, "damselfly_blob_bytes_total{source=\"peer\"}"))
        .sum();
    assert!(
        from_peers >= 2.5 * img.layer_bytes() as f64,
        "only {from_peers} bytes moved between peers\n{}",
        logs()
    );
    // Nodes told the peers that asked them of each piece as they stored it
    // (datagrams), and those took the news to their fetches.
    let haves = |direction: &str| -> f64 {
        let series = format!("damselfly_peer_haves_total{{direction=\"{direction}\"}}");
        s.agents.iter().map(|a| m(a, &series)).sum()
    };
    let (out, taken) = (haves("out"), haves("in"));
    assert!(
        out > 0.0 && taken > 0.0 && taken <= out,
        "haves sent {out}, taken {taken}\n{}",
        logs()
    );
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_cannot_register_or_fetch() {
    let s = swarm_with(2, |i| NodeOpts {
        outsider: i == 2,
        ..NodeOpts::default()
    });
    let img = Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[8 * MB], 12).unwrap();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 1, &img);
    std::thread::sleep(Duration::from_millis(500));
    let served0 = m(
        &s.agents[0],
        "damselfly_peer_bytes_total{direction=\"out\"}",
    );

    // Node 2 trusts the cluster CA, but its own certificate is from another:
    // the tracker refuses its handshake, so it never registers nor learns of
    // node 1, and the pull still succeeds, from the origin.
    s.containerds[1].ctr_pull(&img.reference, None).unwrap();
    let register = |result: &str| {
        m(
            &s.agents[1],
            &format!("damselfly_tracker_requests_total{{rpc=\"register\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(register("ok"), 0.0, "{}", s.agents[1].log_text());
    assert!(
        register("error") >= 1.0,
        "{}",
        s.agents[1].metrics().unwrap()
    );
    assert!(
        s.cluster
            .tracker
            .log_text()
            .contains("tracker client refused"),
        "{}",
        s.cluster.tracker.log_text()
    );
    assert_eq!(
        m(&s.agents[1], "damselfly_blob_bytes_total{source=\"peer\"}"),
        0.0
    );
    assert!(
        m(
            &s.agents[1],
            "damselfly_blob_bytes_total{source=\"origin\"}"
        ) >= img.layer_bytes() as f64
    );
    assert_eq!(
        m(
            &s.agents[0],
            "damselfly_peer_bytes_total{direction=\"out\"}"
        ),
        served0
    );
    // Node 1, with a cluster certificate, registered and announced over TLS.
    assert!(
        m(
            &s.agents[0],
            "damselfly_tracker_requests_total{rpc=\"register\",result=\"ok\"}"
        ) >= 1.0
    );
}

/// `damselfly status` (`--json` or the text) run in the agent's node.
fn status_cli(agent: &Agent, json: bool) -> String {
    let mut cmd = agent.node.command(damselfly_bin().unwrap()).unwrap();
    cmd.arg("status");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn status(agent: &Agent) -> serde_json::Value {
    serde_json::from_str(&status_cli(agent, true)).unwrap()
}

/// Until `ok` holds for `damselfly status --json` (heartbeats are 5 s apart).
fn wait_status(agent: &Agent, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = status(agent);
        if ok(&st) || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The tracker is unreachable, and the agent's last errors say so.
fn tracker_down(st: &serde_json::Value, tracker: &str) -> bool {
    st["tracker"][0]["reachable"] == false
        && st["tracker"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(tracker))
        && st["last_errors"].as_array().unwrap().iter().any(|e| {
            e["level"] == "WARN"
                && e["target"] == "damselfly_tracker::client"
                && e["message"].as_str().unwrap().contains(tracker)
        })
}

#[test]
fn with_the_tracker_down_pulls_use_the_origin_and_the_swarm_comes_back_with_it() {
    let mut s = swarm(2);
    let tracker = s.cluster.tracker_addr.to_string();
    let img =
        Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[12 * MB, 3 * MB], 13).unwrap();
    s.cluster.tracker.kill();
    let started = Instant::now();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a pull waited on the dead tracker"
    );
    wait_cached(&s, 1, &img);
    // `damselfly status` says why the swarm did not help.
    let st = wait_status(&s.agents[0], |st| tracker_down(st, &tracker));
    assert!(tracker_down(&st, &tracker), "{st:#}");
    assert_eq!(st["tracker"][0]["addr"], tracker.as_str(), "{st:#}");

    // A fresh tracker knows nothing; the agents re-register and node 1
    // re-announces within a heartbeat (5 s), without being restarted.
    s.cluster.restart_tracker(&s.tb).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    let before = s
        .origin
        .wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));
    // Pulled by the containerd daemon itself, as the kubelet has it do.
    s.containerds[1].cri_pull(&img.reference, None).unwrap();
    wait_cached(&s, 2, &img);
    assert_eq!(
        s.origin.wait_blob_bytes(before + 1, Duration::from_secs(1)),
        before,
        "{}",
        s.agents[1].log_text()
    );
    assert!(
        m(&s.agents[1], "damselfly_blob_bytes_total{source=\"peer\"}") >= img.layer_bytes() as f64
    );

    // After the pull, `damselfly status` on node 2 answers the first questions.
    let st = status(&s.agents[1]);
    let replica = &st["tracker"][0];
    assert_eq!(
        (
            &replica["addr"],
            &replica["reachable"],
            &replica["registered"]
        ),
        (&tracker.as_str().into(), &true.into(), &true.into()),
        "{st:#}"
    );
    let cache = &st["cache"];
    assert!(
        cache["used_bytes"].as_u64().unwrap() >= img.total_blob_bytes,
        "{st:#}"
    );
    assert_eq!(cache["blobs"], img.blob_digests().len(), "{st:#}");
    assert_eq!(cache["partial_blobs"], 0, "{st:#}");
    assert!(
        st["peers"]["seen_recently"].as_u64().unwrap() >= 1,
        "{st:#}"
    );
    let verdict = |comm: &str| {
        st["ca_trust"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["comm"] == comm)
            .map(|v| v["verdict"].clone())
            .unwrap_or_else(|| panic!("no verdict for {comm}: {st:#}"))
    };
    assert_eq!(verdict("containerd"), "trusted", "{st:#}");
    // A steered name that made no TLS connection yet.
    assert_eq!(verdict("crio"), "unknown", "{st:#}");
    let text = status_cli(&s.agents[1], false);
    assert!(text.contains("1 of 1 replicas reachable"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("containerd") && l.contains(" trusted ")),
        "{text}"
    );

    // The tracker stops: the next heartbeat shows it.
    s.cluster.tracker.kill();
    let st = wait_status(&s.agents[1], |st| tracker_down(st, &tracker));
    assert!(tracker_down(&st, &tracker), "{st:#}");
    let text = status_cli(&s.agents[1], false);
    assert!(text.contains("0 of 1 replicas reachable"), "{text}");
    assert!(text.contains("UNREACHABLE"), "{text}");
}

#[test]
fn a_serving_peer_killed_mid_transfer_does_not_fail_the_pull() {
    let mut s = swarm(2);
    let img = Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[60 * MB], 14).unwrap();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 1, &img);
    std::thread::sleep(Duration::from_millis(500));
    // Node 1 serves at 200 Mbit/s: the layer takes about 2.5 s to cross.
    s.tb.node(1).shape(&s.tb.hub, 200).unwrap();
    let pull = spawn_ctr_pull(&s.containerds[1], &img.reference);
    let deadline = Instant::now() + Duration::from_secs(30);
    while m(&s.agents[1], "damselfly_blob_bytes_total{source=\"peer\"}") < (10 * MB) as f64 {
        assert!(
            Instant::now() < deadline,
            "node 2 never got going from node 1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.agents[0].kill();
    let out = pull.wait_with_output().unwrap();
    // ctr checks the layer's digest: success means the right bytes.
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.agents[1].log_text()
    );
    assert!(
        m(
            &s.agents[1],
            "damselfly_blob_bytes_total{source=\"origin\"}"
        ) > 0.0
    );
    wait_cached(&s, 2, &img);
}

#[test]
fn a_peer_serving_corrupt_pieces_is_banned_and_the_pull_completes() {
    // Node 1 flips a byte in every piece it uploads.
    let s = swarm_with(3, |i| NodeOpts {
        env: if i == 1 {
            vec![(CORRUPT_UPLOADS_ENV, "1")]
        } else {
            vec![]
        },
        ..NodeOpts::default()
    });
    let img = Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[24 * MB], 15).unwrap();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 1, &img);
    std::thread::sleep(Duration::from_millis(500));

    // Node 2's only peer lies: every lie is caught, the rest comes from the origin.
    s.containerds[1].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 2, &img);
    std::thread::sleep(Duration::from_millis(500));
    let banned = |a: &Agent| {
        m(
            a,
            "damselfly_pieces_total{source=\"peer\",result=\"banned\"}",
        )
    };
    let corrupt = |a: &Agent| {
        m(
            a,
            "damselfly_pieces_total{source=\"peer\",result=\"corrupt\"}",
        )
    };
    assert!(
        banned(&s.agents[1]) >= 1.0,
        "{}",
        s.agents[1].metrics().unwrap()
    );
    assert!(corrupt(&s.agents[1]) >= 1.0);

    // Node 3 has an honest peer too: it bans node 1 and needs no origin byte.
    let before = s.origin.blob_bytes_sent();
    s.containerds[2].cri_pull(&img.reference, None).unwrap();
    wait_cached(&s, 3, &img);
    assert!(
        banned(&s.agents[2]) >= 1.0,
        "{}",
        s.agents[2].metrics().unwrap()
    );
    assert_eq!(
        s.origin.wait_blob_bytes(before + 1, Duration::from_secs(1)),
        before,
        "node 3 went to the origin:\n{}",
        s.agents[2].log_text()
    );
    assert!(
        m(&s.agents[2], "damselfly_blob_bytes_total{source=\"peer\"}") >= img.layer_bytes() as f64
    );
}

#[test]
fn upload_rate_holds_over_a_long_transfer() {
    const RATE: u64 = 5 * 1024 * 1024;
    let s = swarm_with(2, |i| NodeOpts {
        flags: if i == 1 {
            vec!["--upload-rate".into(), "5MiB".into()]
        } else {
            vec![]
        },
        ..NodeOpts::default()
    });
    // About 36 s at the limit.
    let img = Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[190 * MB], 16).unwrap();
    s.containerds[0].ctr_pull(&img.reference, None).unwrap();
    wait_cached(&s, 1, &img);
    std::thread::sleep(Duration::from_millis(500));

    let out = || {
        m(
            &s.agents[0],
            "damselfly_peer_bytes_total{direction=\"out\"}",
        )
    };
    let base = out();
    let pull = {
        let c = &s.containerds[1];
        let mut cmd = c.ctr().unwrap();
        cmd.args(["images", "pull", &img.reference]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Skip the start (bucket burst, connection set-up), then measure 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while out() - base < (8 * MB) as f64 {
        assert!(Instant::now() < deadline, "node 2 never started on node 1");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (t0, b0) = (Instant::now(), out());
    std::thread::sleep(Duration::from_secs(30));
    let (t1, b1) = (Instant::now(), out());
    let rate = (b1 - b0) / (t1 - t0).as_secs_f64();
    let err = (rate - RATE as f64).abs() / RATE as f64;
    eprintln!(
        "upload {rate:.0} B/s against a limit of {RATE} ({:.1} % off)",
        err * 100.0
    );
    assert!(err <= 0.10, "upload ran at {rate:.0} B/s, limit {RATE}");

    let done = pull.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        m(
            &s.agents[1],
            "damselfly_blob_bytes_total{source=\"origin\"}"
        ),
        0.0,
        "a limited peer is slow, not a reason to go to the origin"
    );
}

/// The node fetching a fresh blob from the origin dies halfway. Its kernel
/// closes its tracker connection, the tracker forgets it at once, and at
/// their next find (every 100 ms) the followers agree on one of them to take
/// over the origin fetch while the other takes its pieces: within 2 s, and
/// the origin sends the rest about once, rather than each follower fetching
/// it after its patience.
#[test]
fn a_leader_killed_mid_download_is_replaced_and_the_origin_sends_the_rest_once() {
    let mut s = swarm(3);
    let img = Image::build_and_push(&s.tb, &s.origin, "team/app", "v1", &[64 * MB], 31).unwrap();
    let origin_before = s.origin.blob_bytes_sent();
    // The origin's uplink is the bottleneck: the layer takes about 5 s.
    s.tb.node(4).shape(&s.tb.hub, 100).unwrap();
    let mut leader = spawn_ctr_pull(&s.containerds[0], &img.reference);
    let served = |a: &Agent| -> f64 {
        ["origin", "peer", "cache"]
            .iter()
            .map(|src| {
                m(
                    a,
                    &format!("damselfly_blob_bytes_total{{source=\"{src}\"}}"),
                )
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while m(
        &s.agents[0],
        "damselfly_blob_bytes_total{source=\"origin\"}",
    ) < (12 * MB) as f64
    {
        assert!(Instant::now() < deadline, "node 1 never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (killed, times) = std::thread::scope(|scope| {
        let followers: Vec<_> = s.containerds[1..]
            .iter()
            .map(|c| {
                let reference = img.reference.clone();
                scope.spawn(move || {
                    let started = Instant::now();
                    c.cri_pull(&reference, None).unwrap();
                    started.elapsed()
                })
            })
            .collect();
        // Both follow node 1 before it dies.
        let deadline = Instant::now() + Duration::from_secs(30);
        while (1..3).any(|i| served(&s.agents[i]) < (4 * MB) as f64) {
            assert!(Instant::now() < deadline, "nodes 2 and 3 never got going");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Node 1 dies: its pull with it (left alone, ctr would retry
        // straight at the origin once nothing steers it).
        let _ = leader.kill();
        s.agents[0].kill();
        let killed = Instant::now();
        let origin = |s: &Swarm| -> f64 {
            (1..3)
                .map(|i| {
                    m(
                        &s.agents[i],
                        "damselfly_blob_bytes_total{source=\"origin\"}",
                    )
                })
                .sum()
        };
        let at_kill = origin(&s);
        // The takeover: a follower decides to fetch from the origin what
        // nobody holds (it logs so), then its first piece from there lands.
        let (mut took_over, mut first_piece) = (None, None);
        while followers.iter().any(|f| !f.is_finished()) {
            if took_over.is_none()
                && (1..3).any(|i| {
                    s.agents[i]
                        .log_text()
                        .contains("taking over fetching from the origin")
                })
            {
                took_over = Some(killed.elapsed());
            }
            if first_piece.is_none() && origin(&s) > at_kill {
                first_piece = Some(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let times: Vec<Duration> = followers.into_iter().map(|f| f.join().unwrap()).collect();
        ((killed, took_over, first_piece), times)
    });
    let (killed_at, took_over, first_piece) = killed;
    let _ = leader.wait_with_output();
    for n in 2..=3 {
        wait_cached(&s, n, &img);
    }
    let sent = s.origin.blob_bytes_sent() - origin_before;
    let ratio = sent as f64 / img.total_blob_bytes as f64;
    eprintln!(
        "a follower took over the origin fetch {took_over:?} after the kill, its first piece \
         from there landed after {first_piece:?}; pulls took {times:?}, done {:?} after the \
         kill; origin sent {ratio:.3} x the image",
        killed_at.elapsed()
    );
    // Node 1 held a fifth of the layer when it died: the rest must come
    // from the origin again, through one of the followers.
    let took_over = took_over.expect("no follower took over the origin fetch");
    // Not the lease (1.5 heartbeats, 7.5 s): the closed connection.
    assert!(
        took_over < Duration::from_secs(2),
        "the followers waited {took_over:?} after their leader died\n{}\n{}",
        s.agents[1].log_text(),
        s.agents[2].log_text()
    );
    assert!(
        ratio <= 1.3,
        "origin sent {ratio:.3} x the image: the followers each fetched the rest"
    );
}
