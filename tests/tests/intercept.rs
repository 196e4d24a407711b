//! End-to-end: containerd on a node pulls from a real TLS registry with no
//! registry configuration at all; the agent intercepts, authorizes, caches.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use damselfly_testbed::{
    Agent, Testbed,
    agent::{probe_get, probe_get_with},
    containerd::Containerd,
    image::Image,
    origin::Origin,
    pki::TestCa,
};

const REGISTRY: &str = "registry.dfly.test";
const MB: u64 = 1000 * 1000;

/// Node 1: agent + containerd. Node 2: the origin registry.
struct Bed {
    containerd: Containerd,
    agent: Agent,
    origin: Origin,
    bundle: PathBuf,
    public_ca: TestCa,
    tb: Testbed,
}

fn bed(auth: Option<(&str, &str)>, agent_flags: &[&str]) -> Bed {
    let tb = Testbed::new(2).expect("testbed");
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, 2, REGISTRY, &public_ca, auth).unwrap();
    let mut flags = vec!["--registry", REGISTRY, "--upstream-ca"];
    let ca = origin.ca_pem.display().to_string();
    flags.push(&ca);
    flags.extend_from_slice(agent_flags);
    let agent = Agent::start(&tb, tb.node(1), &flags).unwrap();
    // containerd trusts the public CA and this node's CA, and knows nothing else.
    let bundle = tb.dir.join("bundle-n1.pem");
    let node_ca = node_ca_pem(&tb, &agent);
    fs::write(&bundle, format!("{}\n{}", public_ca.pem(), node_ca)).unwrap();
    let containerd = Containerd::start(&tb, tb.node(1), &bundle).unwrap();
    Bed {
        containerd,
        agent,
        origin,
        bundle,
        public_ca,
        tb,
    }
}

/// What `damselfly ca show` prints for the agent's state dir.
fn node_ca_pem(tb: &Testbed, agent: &Agent) -> String {
    let out = Command::new(damselfly_testbed::agent::damselfly_bin().unwrap())
        .args(["ca", "show", "--state-dir"])
        .arg(agent_state(tb, agent))
        .args(["--registry", REGISTRY])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));
    pem
}

fn agent_state(tb: &Testbed, agent: &Agent) -> PathBuf {
    tb.dir.join(format!("state-n{}", agent.node.index))
}

fn m(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap()
}

#[test]
fn pulls_go_through_the_agent_and_the_second_comes_from_cache() {
    let b = bed(None, &[]);
    let img = Image::build_and_push(
        &b.tb,
        &b.origin,
        "team/app",
        "v1",
        &[40 * MB, 35 * MB, 30 * MB],
        1,
    )
    .unwrap();
    assert!(img.total_blob_bytes >= 100 * MB);

    b.containerd.ctr_pull(&img.reference, None).unwrap();
    let from_origin = b
        .origin
        .wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));
    assert!(
        from_origin >= img.total_blob_bytes,
        "origin sent {from_origin}"
    );
    let misses = m(&b.agent, "damselfly_blob_requests_total{result=\"miss\"}");
    assert_eq!(
        misses,
        img.blob_digests().len() as f64,
        "{}",
        b.agent.log_text()
    );
    assert!(m(&b.agent, "damselfly_cache_bytes") >= img.total_blob_bytes as f64);

    // Everything gone from containerd; a kubelet-style pull now comes from the cache.
    b.containerd.remove_image(&img.reference).unwrap();
    let before = b.origin.blob_bytes_sent();
    b.containerd.cri_pull(&img.reference, None).unwrap();
    assert_eq!(
        b.origin.wait_blob_bytes(before + 1, Duration::from_secs(1)),
        before,
        "blob bytes came from the origin"
    );
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"hit\"}"),
        img.blob_digests().len() as f64
    );
    assert!(
        m(&b.agent, "damselfly_blob_bytes_total{source=\"cache\"}") >= img.total_blob_bytes as f64
    );
}

#[test]
fn private_blobs_are_only_served_to_clients_the_origin_accepts() {
    let b = bed(Some(("alice", "s3cret")), &[]);
    let img =
        Image::build_and_push(&b.tb, &b.origin, "private/app", "v1", &[3 * MB, 2 * MB], 2).unwrap();
    b.containerd
        .ctr_pull(&img.reference, b.origin.creds())
        .unwrap();
    b.containerd.remove_image(&img.reference).unwrap();

    // Without or with a wrong credential the pull fails (at the manifest).
    for creds in [None, Some(("alice", "wrong"))] {
        let err = b.containerd.ctr_pull(&img.reference, creds).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("401") || text.to_lowercase().contains("unauthorized"),
            "{creds:?}: {text}"
        );
    }

    // Asking for a cached blob directly: the origin's refusal comes back as is,
    // and not one cached byte with it.
    let (layer, size) = img.layers[0].clone();
    let url = format!("https://{REGISTRY}/v2/private/app/blobs/{layer}");
    let cache0 = m(&b.agent, "damselfly_blob_bytes_total{source=\"cache\"}");
    for auth in [
        None,
        Some(basic("alice", "wrong")),
        Some(basic("mallory", "s3cret")),
    ] {
        let headers: Vec<String> = auth.iter().map(|a| format!("Authorization: {a}")).collect();
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let r = probe_get_with(b.tb.node(1), "ctr", &url, Some(&b.bundle), &headers).unwrap();
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
        assert!(r.headers.contains_key("www-authenticate"), "{r:?}");
        assert!(r.bytes < 1000, "{auth:?}: {} body bytes", r.bytes);
    }
    assert_eq!(
        m(&b.agent, "damselfly_blob_bytes_total{source=\"cache\"}"),
        cache0,
        "cached bytes went to a refused client"
    );
    assert_eq!(
        m(&b.agent, "damselfly_authz_checks_total{result=\"denied\"}"),
        3.0
    );
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"denied\"}"),
        3.0
    );

    // The right credential gets the cached copy, checked by its digest.
    let auth = format!("Authorization: {}", basic("alice", "s3cret"));
    let r = probe_get_with(b.tb.node(1), "ctr", &url, Some(&b.bundle), &[&auth]).unwrap();
    assert_eq!((r.status, r.bytes), (200, size));
    assert_eq!(format!("sha256:{}", r.sha256), layer);
    assert_eq!(
        m(&b.agent, "damselfly_blob_bytes_total{source=\"cache\"}"),
        cache0 + size as f64
    );
    b.containerd
        .ctr_pull(&img.reference, b.origin.creds())
        .unwrap();
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[test]
fn a_non_registry_host_on_443_keeps_its_own_certificate() {
    let b = bed(None, &[]);
    // A TLS server on node 2's 443 would collide with the registry: add an
    // address for another host there.
    let other_ip = "10.213.0.99";
    let ns = b.tb.node(2).name.clone();
    assert!(
        Command::new("ip")
            .args([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{other_ip}/24"),
                "dev",
                "eth0"
            ])
            .status()
            .unwrap()
            .success()
    );
    let other = "other.dfly.test";
    b.tb.add_host(other, other_ip.parse().unwrap()).unwrap();
    let (crt, key) = b
        .public_ca
        .issue(&[other])
        .unwrap()
        .write(&b.tb.dir, "other")
        .unwrap();
    let srv = b.tb.node(2).clone();
    let addr = format!("{other_ip}:443").parse().unwrap();
    let _server =
        damselfly_testbed::agent::start_server(&b.tb, &srv, &[], &[addr], Some((crt, key)))
            .unwrap();

    let spliced0 = b.agent.spliced().unwrap();
    // Trusting only the public CA: a node-CA leaf would fail verification.
    let r = probe_get(
        b.tb.node(1),
        "containerd",
        &format!("https://{other}/bytes/100000"),
        Some(&b.origin.ca_pem),
    )
    .unwrap();
    assert_eq!(r.error, None, "{}", b.agent.log_text());
    assert_eq!(r.sha256, damselfly_testbed::body::sha256(100_000, 100_000));
    assert_eq!(
        b.agent.spliced().unwrap(),
        spliced0 + 1.0,
        "spliced, not terminated"
    );
    assert!(b.agent.steered(443).unwrap() >= 1.0);
}
