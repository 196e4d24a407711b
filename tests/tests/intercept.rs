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
    tools,
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
    /// Unmounted after the processes above are gone and before the testbed's dir goes.
    _mounts: Vec<Tmpfs>,
    tb: Testbed,
}

fn bed(auth: Option<(&str, &str)>, agent_flags: &[&str]) -> Bed {
    bed_on(
        Testbed::new(2).expect("testbed"),
        Vec::new(),
        auth,
        agent_flags,
    )
}

fn bed_on(
    tb: Testbed,
    mounts: Vec<Tmpfs>,
    auth: Option<(&str, &str)>,
    agent_flags: &[&str],
) -> Bed {
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, 2, REGISTRY, &public_ca, auth).unwrap();
    let mut flags = vec!["--registry", REGISTRY, "--upstream-ca"];
    let ca = origin.ca_pem.display().to_string();
    flags.push(&ca);
    flags.extend_from_slice(agent_flags);
    let agent = Agent::start(&tb, tb.node(1), &flags).unwrap();
    // containerd trusts the public CA and this node's CA, and knows nothing else.
    let bundle = tb.dir.join("bundle-n1.pem");
    let node_ca = node_ca_pem(&agent);
    fs::write(&bundle, format!("{}\n{}", public_ca.pem(), node_ca)).unwrap();
    let containerd = Containerd::start(&tb, tb.node(1), &bundle).unwrap();
    Bed {
        containerd,
        agent,
        origin,
        bundle,
        public_ca,
        _mounts: mounts,
        tb,
    }
}

/// What `damselfly ca show` prints for the agent's state dir.
fn node_ca_pem(agent: &Agent) -> String {
    let out = Command::new(damselfly_testbed::agent::damselfly_bin().unwrap())
        .args(["ca", "show", "--state-dir"])
        .arg(&agent.state_dir)
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
    b.agent.wait_cached(&img.blob_digests());
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
    b.agent.wait_cached(&img.blob_digests());
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

#[test]
fn a_corrupted_cache_file_is_detected_and_the_pull_still_succeeds() {
    let b = bed(None, &[]);
    let img =
        Image::build_and_push(&b.tb, &b.origin, "team/app", "v1", &[20 * MB, 3 * MB], 3).unwrap();
    b.containerd.ctr_pull(&img.reference, None).unwrap();
    b.agent.wait_cached(&img.blob_digests());
    b.containerd.remove_image(&img.reference).unwrap();

    // Flip one byte in the middle of the big layer's cache file.
    let (layer, size) = img.layers[0].clone();
    let dir = b.agent.state_dir.join("blobs");
    let file = dir.join(&layer[7..]);
    let listing: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut data = fs::read(&file).unwrap_or_else(|e| {
        panic!(
            "{e}: {} not in {listing:?}\n{}",
            file.display(),
            b.agent.log_text()
        )
    });
    assert_eq!(data.len() as u64, size);
    data[size as usize / 2] ^= 0xff;
    fs::write(&file, &data).unwrap();

    let origin0 = m(&b.agent, "damselfly_blob_bytes_total{source=\"origin\"}");
    // containerd checks every blob's digest: success means the right bytes.
    b.containerd.ctr_pull(&img.reference, None).unwrap();
    let repaired = m(&b.agent, "damselfly_blob_bytes_total{source=\"origin\"}") - origin0;
    assert!(
        repaired > 0.0 && repaired <= size as f64,
        "repair fetched {repaired} bytes"
    );
    // The bad copy is gone from the cache.
    assert!(!file.exists() || fs::read(&file).unwrap() != data);
}

#[test]
fn skopeo_copies_through_the_agent() {
    let b = bed(None, &[]);
    let img =
        Image::build_and_push(&b.tb, &b.origin, "team/app", "v1", &[5 * MB, 2 * MB], 4).unwrap();
    for round in 0..2 {
        let out = b.tb.dir.join(format!("copied-{round}"));
        let mut cmd = tools::skopeo(b.tb.node(1), &b.tb.dir.join("skopeo")).unwrap();
        let empty = b.tb.dir.join("no-certs");
        fs::create_dir_all(&empty).unwrap();
        tools::isolate_env(&mut cmd, &b.bundle, &empty);
        cmd.args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("docker://{}", img.reference))
            .arg(format!("dir:{}", out.display()));
        tools::run(&mut cmd).unwrap();
        b.agent.wait_cached(&img.blob_digests());
        for (d, size) in &img.layers {
            let got = fs::read(out.join(&d[7..])).unwrap();
            assert_eq!(got.len() as u64, *size);
            assert_eq!(
                format!(
                    "sha256:{}",
                    damselfly_testbed::body::hex(&<sha2::Sha256 as sha2::Digest>::digest(&got))
                ),
                *d
            );
        }
    }
    let blobs = img.blob_digests().len() as f64;
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"miss\"}"),
        blobs
    );
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"hit\"}"),
        blobs
    );
}

#[test]
fn a_full_cache_disk_never_fails_a_pull() {
    let tb = Testbed::new(2).expect("testbed");
    // The agent's state dir is a 16 MB tmpfs; the image has a 24 MB layer.
    let state = tb.dir.join("state-n1");
    fs::create_dir_all(&state).unwrap();
    let mount = Tmpfs::mount(&state, "16m");
    let b = bed_on(tb, vec![mount], None, &[]);
    let img = Image::build_and_push(
        &b.tb,
        &b.origin,
        "team/big",
        "v1",
        &[24 * MB, 6 * MB, 5 * MB],
        5,
    )
    .unwrap();
    b.containerd.ctr_pull(&img.reference, None).unwrap();
    b.containerd.remove_image(&img.reference).unwrap();
    b.containerd.cri_pull(&img.reference, None).unwrap();
    assert!(
        m(
            &b.agent,
            "damselfly_blob_requests_total{result=\"passthrough\"}"
        ) >= 1.0,
        "{}",
        b.agent.log_text()
    );
}

#[test]
fn a_download_killed_halfway_resumes_from_its_pieces() {
    let mut b = bed(None, &[]);
    let layer = 200 * MB;
    let img = Image::build_and_push(&b.tb, &b.origin, "team/huge", "v1", &[layer], 6).unwrap();
    let (digest, size) = img.layers[0].clone();
    // A client of our own fetches the blob, so no runtime-side partial download
    // (containerd resumes its own with Range) muddies what the agent resumed.
    let url = format!("https://{REGISTRY}/v2/team/huge/blobs/{digest}");
    // 400 Mbit/s: the layer takes about 4 s, long enough to stop it in the middle.
    b.tb.node(2).shape(&b.tb.hub, 400).unwrap();
    let tx0 = b.origin.link_bytes().unwrap();
    let mut first = {
        let mut cmd =
            b.tb.node(1)
                .command(damselfly_testbed::agent::probe_bin().unwrap())
                .unwrap();
        cmd.args(["--comm", "ctr", "get", &url, "--ca"])
            .arg(&b.bundle);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.origin.link_bytes().unwrap() - tx0 < layer / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.agent.kill();
    let _ = first.kill();
    let _ = first.wait();

    b.agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tx1 = b.origin.link_bytes().unwrap();
    let r = probe_get(b.tb.node(1), "ctr", &url, Some(&b.bundle)).unwrap();
    assert_eq!(
        (r.error.as_deref(), r.status, r.bytes),
        (None, 200, size),
        "{}",
        b.agent.log_text()
    );
    assert_eq!(format!("sha256:{}", r.sha256), digest);
    let sent = b.origin.link_bytes().unwrap() - tx1;
    assert!(
        sent < size * 9 / 10,
        "origin sent {sent} bytes for a {size}-byte blob: nothing resumed"
    );
    // Served from the pieces it had plus the rest from the origin.
    assert!(m(&b.agent, "damselfly_blob_bytes_total{source=\"cache\"}") > 0.0);
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"miss\"}"),
        1.0
    );
    b.agent.wait_cached(std::slice::from_ref(&digest));
}

/// A tmpfs mounted for the length of a test; lazily unmounted on drop, even
/// if a process still has files open in it.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Self {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "dfly-tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn concurrent_requests_for_one_blob_share_one_download() {
    let b = bed(None, &[]);
    let img = Image::build_and_push(&b.tb, &b.origin, "team/shared", "v1", &[30 * MB], 7).unwrap();
    let (digest, size) = img.layers[0].clone();
    let url = format!("https://{REGISTRY}/v2/team/shared/blobs/{digest}");
    // 200 Mbit/s: the blob takes over a second, so the requests overlap.
    b.tb.node(2).shape(&b.tb.hub, 200).unwrap();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let mut cmd =
                b.tb.node(1)
                    .command(damselfly_testbed::agent::probe_bin().unwrap())
                    .unwrap();
            cmd.args(["--comm", "ctr", "get", &url, "--ca"])
                .arg(&b.bundle);
            cmd.stdout(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let r: damselfly_testbed::probe::GetResult = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((r.error.as_deref(), r.status, r.bytes), (None, 200, size));
        assert_eq!(format!("sha256:{}", r.sha256), digest);
    }
    let gets = b
        .origin
        .requests()
        .iter()
        .filter(|r| r.is_blob_get() && r.uri.contains(&digest[7..]))
        .count();
    assert_eq!(gets, 1, "the origin served the blob {gets} times");
}

#[test]
fn a_plain_http_registry_on_port_80_is_intercepted_by_host() {
    let tb = Testbed::new(2).expect("testbed");
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start_plain(&tb, 2, REGISTRY, &public_ca).unwrap();
    let agent = Agent::start(&tb, tb.node(1), &["--registry", REGISTRY]).unwrap();
    let bundle = tb.dir.join("bundle-n1.pem");
    fs::write(&bundle, public_ca.pem()).unwrap();
    let containerd = Containerd::start(&tb, tb.node(1), &bundle).unwrap();
    let img = Image::build_and_push(&tb, &origin, "team/plain", "v1", &[4 * MB, MB], 15).unwrap();
    let pull = || {
        let mut cmd = containerd.ctr().unwrap();
        cmd.args(["images", "pull", "--plain-http", &img.reference]);
        tools::run(&mut cmd).unwrap();
    };
    pull();
    let dir = tb.dir.join("state-n1/blobs");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !img
        .blob_digests()
        .iter()
        .all(|d| dir.join(&d[7..]).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never cached:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    containerd.remove_image(&img.reference).unwrap();
    let before = origin.wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));
    pull();
    assert_eq!(
        origin.wait_blob_bytes(before + 1, Duration::from_secs(1)),
        before
    );
    assert!(
        m(
            &agent,
            "damselfly_intercept_connections_total{mode=\"terminate\"}"
        ) >= 2.0
    );
    assert_eq!(
        m(&agent, "damselfly_blob_requests_total{result=\"hit\"}"),
        img.blob_digests().len() as f64
    );
}

#[test]
fn sigterm_during_a_blob_download_detaches_at_once_and_lets_it_finish() {
    let mut b = bed(None, &[]);
    let img = Image::build_and_push(&b.tb, &b.origin, "team/big", "v1", &[100 * MB], 31).unwrap();
    let (digest, size) = img.layers[0].clone();
    let url = format!("https://{REGISTRY}/v2/team/big/blobs/{digest}");
    // About 4 s for the layer through the origin's link.
    b.tb.node(2).shape(&b.tb.hub, 200).unwrap();
    std::thread::scope(|s| {
        // One GET and no retry: a response cut by the agent would be an error
        // here (containerd would quietly resume it from the origin).
        let get = s.spawn(|| probe_get(b.tb.node(1), "ctr", &url, Some(&b.bundle)).unwrap());
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !get.is_finished(),
            "the download must still be running when SIGTERM arrives"
        );
        b.agent.proc.signal(libc::SIGTERM);
        let r = get.join().unwrap();
        assert_eq!((r.error, r.status), (None, 200));
        assert_eq!(format!("sha256:{}", r.sha256), digest);
        assert_eq!(r.bytes, size);
    });
    let st = b.agent.proc.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "agent exit status {st}");
    let log = b.agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("finishing the connections in flight"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!line.contains("in_flight=0"), "{line}");
    assert!(!log.contains("are cut"), "{log}");
}

#[test]
fn a_runtime_that_does_not_trust_the_node_ca_still_pulls() {
    // Both containerds trust the origin's CA only, never the node CA.
    let tb = Testbed::new(3).expect("testbed");
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, 2, REGISTRY, &public_ca, None).unwrap();
    let bundle = tb.dir.join("public-only.pem");
    fs::write(&bundle, public_ca.pem()).unwrap();
    let flags = origin.agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // Node 1: the runtime was running before the agent made its CA (as on a
    // node where `ca install` could not restart it): it cannot trust the CA,
    // and its connections are spliced from the first one.
    let early = Containerd::start(&tb, tb.node(1), &bundle).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let agent1 = Agent::start(&tb, tb.node(1), &flags).unwrap();
    // Node 3: started after the CA, refuses our certificate once; from then
    // on its connections to that registry are spliced.
    let agent3 = Agent::start(&tb, tb.node(3), &flags).unwrap();
    let late = Containerd::start(&tb, tb.node(3), &bundle).unwrap();

    let img = Image::build_and_push(&tb, &origin, "team/app", "v1", &[5 * MB, 3 * MB], 41).unwrap();
    early.cri_pull(&img.reference, None).unwrap();
    let spliced = |agent: &Agent, mode: &str| {
        m(
            agent,
            &format!("damselfly_intercept_connections_total{{mode=\"{mode}\"}}"),
        )
    };
    assert!(spliced(&agent1, "splice-started-before-ca") >= 1.0);
    assert_eq!(spliced(&agent1, "tls-refused"), 0.0);
    assert_eq!(spliced(&agent1, "terminate"), 0.0);

    let mut failures = Vec::new();
    for _ in 0..2 {
        match late.cri_pull(&img.reference, None) {
            Ok(_) => break,
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.len() <= 1,
        "more than one failed pull: {failures:#?}"
    );
    assert!(
        failures.len() < 2,
        "no pull succeeded: {failures:#?}\n{}",
        agent3.log_text()
    );
    // One refused handshake (or a few, if the client had several under way).
    let refused = spliced(&agent3, "tls-refused");
    assert!(refused >= 1.0, "{}", agent3.log_text());
    assert!(spliced(&agent3, "splice-refused-ca") >= 1.0);
    // Later pulls do not fail at all, and `damselfly status` says why.
    let img2 = Image::build_and_push(&tb, &origin, "team/app", "v2", &[2 * MB], 42).unwrap();
    late.cri_pull(&img2.reference, None).unwrap();
    assert_eq!(spliced(&agent3, "tls-refused"), refused);
    let (_, status) = agent3.node.http_get(agent3.admin, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let refused = &status["refused_ca"];
    assert_eq!(refused[0]["comm"], "containerd", "{status}");
    assert_eq!(refused[0]["host"], REGISTRY, "{status}");
    let containerd = |agent: &Agent| {
        let (_, status) = agent.node.http_get(agent.admin, "/status").unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["ca_trust"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["comm"] == "containerd")
            .cloned()
            .unwrap_or_else(|| panic!("{status}"))
    };
    let v = containerd(&agent3);
    assert_eq!(
        (&v["verdict"], &v["reason"], &v["host"]),
        (&"not trusted".into(), &"refused".into(), &REGISTRY.into()),
        "{v}"
    );
    assert!(v["spliced_until"].is_string(), "{v}");
    let v = containerd(&agent1);
    assert_eq!(
        (&v["verdict"], &v["reason"]),
        (&"not trusted".into(), &"started-before-ca".into()),
        "{v}"
    );
}
