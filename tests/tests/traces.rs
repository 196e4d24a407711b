//! End-to-end: agents and the tracker export OpenTelemetry traces over
//! OTLP/gRPC (`--otlp-endpoint`) to a collector on the testbed, while real
//! containerd pulls an image from a real registry, the second node from the
//! first over the swarm.

use std::{collections::HashMap, time::Duration};

use damselfly_testbed::{
    Agent, Testbed,
    agent::damselfly_bin,
    cluster::Cluster,
    containerd::Containerd,
    image::Image,
    origin::Origin,
    otlp::{Collector, Span, descendants, summary},
    pki::TestCa,
    tools,
};

const REGISTRY: &str = "registry.dfly.test";
const MB: u64 = 1000 * 1000;
/// Exporters send every 200 ms instead of every 5 s.
const FAST_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "200");

/// The `blob GET` root spans `node` exported, by digest.
fn blob_roots<'a>(spans: &'a [Span], node: &str) -> HashMap<String, Vec<&'a Span>> {
    let mut by_digest: HashMap<String, Vec<&Span>> = HashMap::new();
    for s in spans.iter().filter(|s| {
        s.name == "blob GET" && s.is_root() && s.resource_str("host.name") == Some(node)
    }) {
        by_digest
            .entry(s.str("digest").unwrap_or_default().to_string())
            .or_default()
            .push(s);
    }
    by_digest
}

/// Every blob of `img` has its root span from `node`, finished (the body's
/// end records `total_ms`).
fn all_finished(spans: &[Span], node: &str, img: &Image) -> bool {
    let roots = blob_roots(spans, node);
    img.blob_digests().iter().all(|d| {
        roots
            .get(d)
            .is_some_and(|r| r.iter().all(|s| s.int("total_ms").is_some()))
    })
}

#[test]
fn a_pull_is_traced_blob_by_blob_from_the_origin_and_from_a_peer() {
    let tb = Testbed::new(3).expect("testbed");
    let infra = 3;
    let collector = Collector::start(tb.node(infra), 4317).unwrap();
    let endpoint = collector.endpoint();
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, infra, REGISTRY, &public_ca, None).unwrap();
    let cluster =
        Cluster::start_with(&tb, infra, &["--otlp-endpoint", &endpoint], &[FAST_EXPORT]).unwrap();
    let agent_flags = |i: usize| -> Vec<String> {
        let mut flags = origin.agent_flags();
        flags.extend(["--otlp-endpoint".into(), endpoint.clone()]);
        flags.extend(cluster.agent_flags(&tb, i).unwrap());
        flags
    };
    let mut agents = Vec::new();
    let mut containerds = Vec::new();
    for i in 1..=2 {
        let flags = agent_flags(i);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = Agent::start_with_env(&tb, tb.node(i), &flags, &[FAST_EXPORT]).unwrap();
        containerds.push(Containerd::start_for(&tb, &agent, &public_ca).unwrap());
        agents.push(agent);
    }

    // 9 MB is three 4 MiB pieces: several piece spans for one blob.
    let img =
        Image::build_and_push(&tb, &origin, "team/traced", "v1", &[9 * MB, 2 * MB], 31).unwrap();
    let mut sizes: HashMap<String, u64> = img.layers.iter().cloned().collect();
    sizes.insert(
        img.config_digest.clone(),
        img.total_blob_bytes - img.layer_bytes(),
    );

    containerds[0].ctr_pull(&img.reference, None).unwrap();
    agents[0].wait_cached(&img.blob_digests());
    // Announcements follow the commit; give them a moment to reach the tracker.
    std::thread::sleep(Duration::from_millis(500));
    containerds[1].cri_pull(&img.reference, None).unwrap();
    agents[1].wait_cached(&img.blob_digests());

    let spans = collector
        .wait_for(
            Duration::from_secs(20),
            "finished blob traces from both nodes",
            |s| all_finished(s, "n1", &img) && all_finished(s, "n2", &img),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nnode 1:\n{}\nnode 2:\n{}",
                agents[0].log_text(),
                agents[1].log_text()
            )
        });
    let context = || {
        format!(
            "{}\nnode 1:\n{}\nnode 2:\n{}",
            summary(&spans),
            agents[0].log_text(),
            agents[1].log_text()
        )
    };

    for (node, source) in [("n1", "origin"), ("n2", "peer")] {
        let index = if node == "n1" { 1 } else { 2 };
        let roots = blob_roots(&spans, node);
        for (digest, size) in &sizes {
            let r = &roots[digest];
            assert_eq!(r.len(), 1, "{node}: one trace per blob GET of {digest}");
            let root = r[0];
            let why = || format!("{node} {digest}: {root:#?}\n{}", context());
            // The resource says who sent it.
            assert_eq!(
                root.resource_str("service.name"),
                Some("damselfly-agent"),
                "{}",
                why()
            );
            assert_eq!(
                root.resource_str("damselfly.instance"),
                Some(tb.node(index).name.as_str()),
                "{}",
                why()
            );
            assert_eq!(root.str("repository"), Some("team/traced"), "{}", why());
            assert_eq!(root.str("registry"), Some(REGISTRY), "{}", why());
            assert_eq!(root.str("outcome"), Some("miss"), "{}", why());
            assert_eq!(root.int("status"), Some(200), "{}", why());
            assert_eq!(root.str("body"), Some("complete"), "{}", why());
            // Every byte the client got is accounted for, by its source.
            assert_eq!(root.int("bytes.sent"), Some(*size), "{}", why());
            let by_source = |s: &str| root.int(&format!("bytes.{s}")).unwrap_or(u64::MAX);
            assert_eq!(
                by_source("cache") + by_source("peer") + by_source("origin"),
                *size,
                "{}",
                why()
            );
            assert_eq!(by_source(source), *size, "{}", why());
            let (ttfb, total) = (root.int("ttfb_ms").unwrap(), root.int("total_ms").unwrap());
            assert!(ttfb <= total, "{}", why());
            // An intercepted request links to its connection's span.
            assert_eq!(root.links.len(), 1, "{}", why());

            let children = descendants(&spans, root);
            let named = |n: &str| children.iter().filter(|s| s.name == n).collect::<Vec<_>>();
            assert_eq!(named("authz").len(), 1, "{}", why());
            assert!(!named("swarm.join").is_empty(), "{}", why());
            if source == "origin" {
                assert_eq!(named("origin.get").len(), 1, "{}", why());
                assert_eq!(named("origin.download").len(), 1, "{}", why());
            } else {
                let fetch = named("swarm.fetch");
                assert_eq!(fetch.len(), 1, "{}", why());
                assert_eq!(fetch[0].int("peers"), Some(1), "{}", why());
                assert_eq!(fetch[0].int("pieces.origin"), Some(0), "{}", why());
                let pieces = named("piece");
                let piece_bytes: u64 = pieces
                    .iter()
                    .filter(|p| p.str("result") == Some("ok"))
                    .map(|p| p.int("bytes").unwrap_or(0))
                    .sum();
                assert_eq!(piece_bytes, *size, "{}", why());
                assert!(
                    pieces.iter().all(|p| p.str("source") == Some("peer")),
                    "{}",
                    why()
                );
                if *size > 4 * 1024 * 1024 {
                    assert!(pieces.len() >= 3, "{}", why());
                }
                // The join asked the tracker, whose own span of that call
                // sits under ours, in this trace.
                let finds = named("tracker.find");
                let service = |s: &&&Span| s.resource_str("service.name").unwrap_or("").to_string();
                assert!(
                    finds.iter().any(|s| service(s) == "damselfly-agent"
                        && s.resource_str("host.name") == Some("n2")),
                    "{}",
                    why()
                );
                assert!(
                    finds.iter().any(|s| service(s) == "damselfly-tracker"),
                    "{}",
                    why()
                );
            }
        }
    }
    // Connection spans: registry connections terminated, named by SNI.
    assert!(
        spans.iter().any(|s| s.name == "connection"
            && s.str("mode") == Some("terminate")
            && s.str("host") == Some(REGISTRY)),
        "{}",
        context()
    );

    // What is still queued when an agent stops goes out on SIGTERM: node 1
    // restarted to export only every minute, so nothing but the shutdown
    // flush can deliver the trace of this cache hit in time.
    agents[0].terminate().unwrap();
    let flags = agent_flags(1);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut slow = Agent::start_with_env(
        &tb,
        tb.node(1),
        &flags,
        &[("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    )
    .unwrap();
    let (layer, size) = img.layers[0].clone();
    let url = format!("https://{REGISTRY}/v2/team/traced/blobs/{layer}");
    let out_file = tb.dir.join("hit.blob");
    let mut cmd = tb.node(1).command(damselfly_bin().unwrap()).unwrap();
    tools::isolate_env(&mut cmd, &origin.ca_pem, &origin.ca_dir);
    let out = cmd
        .args(["get", &url, "-o"])
        .arg(&out_file)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(slow.terminate().unwrap().success());
    let is_hit = |s: &Span| {
        s.name == "blob GET"
            && s.resource_str("host.name") == Some("n1")
            && s.str("digest") == Some(layer.as_str())
            && s.str("outcome") == Some("hit")
    };
    let spans = collector
        .wait_for(
            Duration::from_secs(5),
            "cache hit trace after SIGTERM",
            |s| s.iter().any(is_hit),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", slow.log_text()));
    let hit = spans.iter().find(|s| is_hit(s)).unwrap();
    assert_eq!(hit.int("bytes.cache"), Some(size), "{hit:#?}");
    assert_eq!(hit.int("bytes.origin"), Some(0), "{hit:#?}");
    // Asked through the admin endpoint, not an intercepted connection.
    assert!(hit.links.is_empty(), "{hit:#?}");
    let children = descendants(&spans, hit);
    assert!(
        children.iter().any(|s| s.name == "cache.read"),
        "{hit:#?}\n{}",
        summary(&spans)
    );
}
