//! End-to-end: a seed agent (`--seed`, no steering) warmed by `damselfly
//! preheat` serves a node's whole pull; `damselfly get` writes blobs and OCI
//! layouts through a node's agent. Real registry (htpasswd), containerd, kernel.

use std::{fs, path::Path, process::Output, time::Duration};

use damselfly_testbed::{
    Agent, Testbed, agent::damselfly_bin, cluster::Cluster, containerd::Containerd, image::Image,
    origin::Origin, pki::TestCa, tools,
};
use sha2::{Digest, Sha256};

const REGISTRY: &str = "registry.dfly.test";
const USER: &str = "dfly";
const PASS: &str = "s3cret";
const MB: u64 = 1000 * 1000;

/// Node 1: a seed agent (admin on its node address). Node 2: a pulling node
/// (agent + containerd). Node 3: the private origin registry and the tracker.
struct Bed {
    /// Node 2's --cluster-ca/cert/key: what `preheat` shows an https seed.
    pki2: Vec<String>,
    seed: Agent,
    agent: Agent,
    containerd: Containerd,
    origin: Origin,
    _cluster: Cluster,
    tb: Testbed,
}

impl Bed {
    fn new() -> Self {
        let tb = Testbed::new(3).expect("testbed");
        let public_ca = TestCa::new("dfly test public CA").unwrap();
        let origin = Origin::start(&tb, 3, REGISTRY, &public_ca, Some((USER, PASS))).unwrap();
        let cluster = Cluster::start(&tb, 3).unwrap();
        let common = |node: usize| {
            let mut f = origin.agent_flags();
            f.extend(cluster.agent_flags(&tb, node).unwrap());
            f
        };

        let mut flags = common(1);
        flags.extend(["--seed", "--admin", "0.0.0.0:7402"].map(String::from));
        let seed = Agent::start(&tb, tb.node(1), &strs(&flags)).unwrap();

        let flags2 = common(2);
        let pki2 = flags2
            .chunks(2)
            .filter(|kv| kv[0].starts_with("--cluster-"))
            .flatten()
            .cloned()
            .collect();
        let agent = Agent::start(&tb, tb.node(2), &strs(&flags2)).unwrap();
        let containerd = Containerd::start_for(&tb, &agent, &public_ca).unwrap();
        Self {
            pki2,
            seed,
            agent,
            containerd,
            origin,
            _cluster: cluster,
            tb,
        }
    }

    /// From another node a seed is reached over mutual TLS.
    fn seed_url(&self) -> String {
        format!("https://{}", self.tb.node(1).addr4(7402))
    }

    /// `damselfly preheat REF --seed URL` from node 2 with the origin's
    /// credentials, then `extra`.
    fn preheat(&self, reference: &str, seed: &str, extra: &[&str]) -> Output {
        let creds = self.creds();
        let ca = self.origin.ca_pem.display().to_string();
        let mut args = vec![
            "preheat",
            reference,
            "--seed",
            seed,
            "--creds",
            &creds,
            "--upstream-ca",
            &ca,
        ];
        args.extend(extra);
        self.cli(2, &args)
    }

    /// `damselfly ARGS` inside node `node`, trusting the origin's CA only, with
    /// a HOME of its own (no docker config but the one a test writes).
    fn cli(&self, node: usize, args: &[&str]) -> Output {
        let home = self.tb.dir.join(format!("home-n{node}"));
        fs::create_dir_all(&home).unwrap();
        let mut cmd = self
            .tb
            .node(node)
            .command(damselfly_bin().unwrap())
            .unwrap();
        tools::isolate_env(&mut cmd, &self.origin.ca_pem, &self.origin.ca_dir);
        cmd.env("HOME", &home)
            .env_remove("DAMSELFLY_CREDS")
            .env_remove("RUST_BACKTRACE")
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd.output().unwrap()
    }

    fn creds(&self) -> String {
        format!("{USER}:{PASS}")
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn m(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap()
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut fs::File::open(path).unwrap(), &mut h).unwrap();
    format!("sha256:{:x}", h.finalize())
}

#[test]
fn a_seed_serves_blobs_off_its_node_only_to_a_cluster_certificate() {
    let b = Bed::new();
    let img = Image::build_and_push(&b.tb, &b.origin, "team/private", "v1", &[MB], 22).unwrap();
    let seed = b.tb.node(1).addr4(7402);
    let blob = format!(
        "https://{REGISTRY}/v2/team/private/blobs/{}",
        img.layers[0].0
    );
    let fetch = format!(
        "/v1/fetch?url={}",
        blob.replace(':', "%3A").replace('/', "%2F")
    );
    // Plain HTTP from another node: probes and Prometheus, nothing else.
    for (path, want) in [
        ("/healthz", 200),
        ("/metrics", 200),
        ("/status", 403),
        (fetch.as_str(), 403),
    ] {
        let (code, body) = b.tb.node(2).http_get(seed, path).unwrap();
        assert_eq!(code, want, "{path}: {body}");
        if want == 403 {
            assert!(body.contains("certificate of the cluster CA"), "{body}");
        }
    }
    let out = b.preheat(&img.reference, &format!("http://{seed}"), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("403"),
        "{}",
        text(&out)
    );
    // Over TLS the seed asks for a certificate of the cluster CA: curl with
    // node 2's gets /status, with another CA's or none gets no HTTP answer.
    let outsider = TestCa::new("not the cluster CA").unwrap();
    let (crt, key) = outsider
        .issue(&["damselfly-peer"])
        .unwrap()
        .write(&b.tb.dir, "outsider")
        .unwrap();
    let flag = |name: &str| {
        let i = b.pki2.iter().position(|f| f == name).unwrap();
        b.pki2[i + 1].clone()
    };
    let curl = |cert: Option<(&str, &str)>| -> (bool, String) {
        let mut cmd = b.tb.node(2).command("curl").unwrap();
        // -k: the seed's certificate names damselfly-peer, not its address;
        // what is tested here is whom the seed lets in.
        cmd.args(["-sk", "-o", "-", "-w", "%{http_code}"]);
        if let Some((crt, key)) = cert {
            cmd.args(["--cert", crt, "--key", key]);
        }
        let out = cmd.arg(format!("https://{seed}/status")).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, body) = curl(Some((&flag("--cluster-cert"), &flag("--cluster-key"))));
    assert!(
        ok && body.ends_with("200") && body.contains("\"seed\": true"),
        "{body}"
    );
    for cert in [Some((crt.to_str().unwrap(), key.to_str().unwrap())), None] {
        let (ok, body) = curl(cert);
        assert!(!ok && !body.contains("seed"), "{cert:?}: {body}");
    }
    // https without any certificate is refused before anything is sent.
    let out = b.preheat(&img.reference, &b.seed_url(), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--cluster-ca"),
        "{}",
        text(&out)
    );
    assert_eq!(b.origin.blob_bytes_sent(), 0, "nothing was fetched");
}

#[test]
fn a_preheated_seed_serves_a_whole_pull_with_no_origin_blob_bytes() {
    let b = Bed::new();
    let img =
        Image::build_and_push(&b.tb, &b.origin, "team/app", "v1", &[24 * MB, 8 * MB], 21).unwrap();
    let seed_url = b.seed_url();
    // Run from the pulling node: preheat talks to the seed over the network.
    let out = b.preheat(&img.reference, &seed_url, &strs(&b.pki2));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        b.seed.log_text()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for d in img.blob_digests() {
        assert!(stdout.contains(&d[..19]), "{d} not in the table:\n{stdout}");
    }
    assert!(stdout.contains(&seed_url), "{stdout}");
    println!("{stdout}");

    b.seed.wait_cached(&img.blob_digests());
    let seed_origin = m(&b.seed, "damselfly_blob_bytes_total{source=\"origin\"}");
    assert!(
        seed_origin >= img.total_blob_bytes as f64,
        "the seed read {seed_origin} of {} bytes from the origin",
        img.total_blob_bytes
    );
    // The seed is the only one that took blob bytes from the origin so far.
    let before = b
        .origin
        .wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));
    assert_eq!(before, img.total_blob_bytes, "{:?}", b.origin.requests());
    // Announcements follow the commit; give them a moment to reach the tracker.
    std::thread::sleep(Duration::from_millis(500));

    b.containerd
        .cri_pull(&img.reference, Some((USER, PASS)))
        .unwrap();
    b.agent.wait_cached(&img.blob_digests());
    let after = b.origin.wait_blob_bytes(before + 1, Duration::from_secs(1));
    assert_eq!(
        after,
        before,
        "the pulling node took blob bytes from the origin:\n{}\n{}",
        b.agent.metrics().unwrap(),
        b.agent.log_text()
    );
    let from_peers = m(&b.agent, "damselfly_blob_bytes_total{source=\"peer\"}");
    assert!(
        from_peers >= img.total_blob_bytes as f64,
        "node 2 got {from_peers} bytes from peers"
    );
    let served = m(&b.seed, "damselfly_peer_bytes_total{direction=\"out\"}");
    assert!(
        served >= img.total_blob_bytes as f64,
        "the seed served {served}"
    );
    println!(
        "origin blob bytes: {after} (all to the seed); seed origin bytes {seed_origin}; \
         node 2 from peers {from_peers}"
    );

    // A second preheat finds everything in the seed's cache.
    let out = b.preheat(&img.reference, &seed_url, &strs(&b.pki2));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("cached").count(),
        img.blob_digests().len(),
        "{stdout}"
    );
    assert_eq!(b.origin.blob_bytes_sent(), before);

    // A seed answers /status without steering.
    let (code, body) = b.seed.node.http_get(b.seed.admin, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["seed"], true, "{body}");
    assert_eq!(
        status["programs"].as_array().map(Vec::len),
        Some(0),
        "{body}"
    );
}

#[test]
fn get_writes_verified_blobs_and_an_oci_layout_through_the_agent() {
    let b = Bed::new();
    let img =
        Image::build_and_push(&b.tb, &b.origin, "team/get", "v2", &[6 * MB, 2 * MB], 22).unwrap();
    let creds = b.creds();
    let ca = b.origin.ca_pem.display().to_string();

    // An image: an OCI layout that skopeo reads, every blob matching its name.
    let layout = b.tb.dir.join("layout");
    let layout_s = layout.display().to_string();
    let out = b.cli(
        2,
        &[
            "get",
            &img.reference,
            "-o",
            &layout_s,
            "--creds",
            &creds,
            "--upstream-ca",
            &ca,
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        b.agent.log_text()
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("2 blobs") || summary.contains("3 blobs"),
        "{summary}"
    );
    println!("{summary}");
    let served = m(&b.agent, "damselfly_blob_bytes_total{source=\"origin\"}");
    assert!(
        served >= img.total_blob_bytes as f64,
        "the agent served {served}"
    );
    for entry in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256_file(&path),
            format!("sha256:{name}"),
            "{}",
            path.display()
        );
    }
    for d in img.blob_digests() {
        assert!(
            layout.join("blobs/sha256").join(&d[7..]).exists(),
            "{d} missing"
        );
    }
    let scratch = b.tb.dir.join("skopeo");
    let skopeo = || tools::skopeo(b.tb.node(1), &scratch).unwrap();
    let out = skopeo()
        .args(["inspect", &format!("oci:{layout_s}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspect["Digest"], img.manifest_digest.as_str(), "{inspect}");
    let layers: Vec<&str> = inspect["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    let want: Vec<&str> = img.layers.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(layers, want);
    let copy = b.tb.dir.join("copied");
    let out = skopeo()
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{layout_s}"))
        .arg(format!("dir:{}", copy.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // One blob by URL: the right bytes, and no temporary file left.
    let (layer, size) = &img.layers[0];
    let url = format!("https://{REGISTRY}/v2/team/get/blobs/{layer}");
    let file = b.tb.dir.join("one.blob");
    let file_s = file.display().to_string();
    let out = b.cli(2, &["get", &url, "-o", &file_s, "--creds", &creds]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256_file(&file), *layer);
    assert_eq!(fs::metadata(&file).unwrap().len(), *size);
    assert!(!b.tb.dir.join("one.blob.tmp").exists());
    // That one was a cache hit on the node's agent.
    assert!(m(&b.agent, "damselfly_blob_requests_total{result=\"hit\"}") >= 1.0);

    // The same credential from a docker config.json.
    let home = b.tb.dir.join("home-n2/.docker");
    fs::create_dir_all(&home).unwrap();
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&creds)
    };
    fs::write(
        home.join("config.json"),
        format!(r#"{{"auths":{{"{REGISTRY}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let file2 = format!("{file_s}.2");
    let out = b.cli(2, &["get", &url, "-o", &file2]);
    assert!(out.status.success(), "{}", text(&out));
    fs::remove_file(home.join("config.json")).unwrap();

    // No credential: the registry's 401, and nothing written.
    let bare = b.tb.dir.join("bare");
    let bare_s = bare.display().to_string();
    let out = b.cli(
        2,
        &["get", &img.reference, "-o", &bare_s, "--upstream-ca", &ca],
    );
    let err = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("401") && err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    assert!(!bare.join("index.json").exists());
    println!("{err}");
    let out = b.cli(2, &["get", &url, "-o", &bare_s]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("401"), "{err}");
    println!("{err}");
    assert!(
        !bare.exists() && !b.tb.dir.join("bare.tmp").exists(),
        "{err}"
    );

    // A host the agent is not configured for, and an agent that is not there.
    let other = format!("https://other.dfly.test/v2/team/get/blobs/{layer}");
    let out = b.cli(2, &["get", &other, "-o", &bare_s, "--creds", &creds]);
    let err = text(&out);
    assert!(
        !out.status.success() && err.contains("403") && err.contains("--registry"),
        "{err}"
    );
    println!("{err}");
    let out = b.cli(
        2,
        &[
            "get",
            &url,
            "-o",
            &bare_s,
            "--creds",
            &creds,
            "--agent",
            "http://127.0.0.1:1",
        ],
    );
    let err = text(&out);
    assert!(
        !out.status.success() && err.contains("no agent answers at http://127.0.0.1:1"),
        "{err}"
    );
    println!("{err}");
}
