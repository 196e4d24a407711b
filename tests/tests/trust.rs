//! End-to-end: the trust boundaries of interception. A private layer
//! reaches only a client the origin registry would serve it to, whatever
//! scheme or endpoint the client asks through; and a process that names
//! itself `ctr` and sends a registry's name (HTTP `Host` on port 80, SNI on
//! 443) to an address of its choosing changes nothing for anyone else.
//!
//! Real parts only: the agent binary, kernel steering, `docker-registry`
//! over TLS with htpasswd auth whose port 80 answers everything with a
//! redirect to https (as most registries' and ingresses' port 80 does),
//! containerd, `damselfly preheat`, the swarm, and `dfly-probe` as the
//! client any process on a node could be.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use damselfly_testbed::{
    Agent, Proc, Testbed,
    agent::{damselfly_cli, probe_request, start_server_as},
    cluster::Cluster,
    containerd::Containerd,
    image::Image,
    origin::Origin,
    pki::TestCa,
    probe::{Get, GetResult, Record, Serve, records},
    trust::Trust,
};

const REGISTRY: &str = "registry.dfly.test";
const USER: &str = "alice";
const PASS: &str = "s3cret";
const MB: u64 = 1000 * 1000;
/// The agent's test-only switch that corrupts every piece it uploads
/// (`DAMSELFLY_TEST_CORRUPT_UPLOADS`, read in `agent/src/swarm/peer/server.rs`).
const CORRUPT_UPLOADS_ENV: &str = "DAMSELFLY_TEST_CORRUPT_UPLOADS";

/// Node 1: agent + containerd. Node 2: the private origin (TLS on 443,
/// redirects on 80) and, with a swarm, the tracker. With an attacker, node
/// 3 is the address the attacker chose; node 4 another node of the swarm,
/// whose agent corrupts every piece it uploads, so that node 1 has to take
/// pieces from the origin (the swarm's fallback).
struct Bed {
    agent: Agent,
    containerd: Containerd,
    /// What node 1's clients trust: the public CA and the node CA.
    roots: PathBuf,
    attacker: Option<Attacker>,
    peer: Option<Agent>,
    _cluster: Option<Cluster>,
    _port80: Proc,
    origin: Origin,
    tb: Testbed,
}

/// A server that answers 200 to everything and writes down every
/// connection and request it gets, on ports 80 and 443 of its own address
/// (a certificate for the registry's name from a CA nobody trusts).
struct Attacker {
    ip: IpAddr,
    file: PathBuf,
    _server: Proc,
}

impl Attacker {
    fn records(&self) -> Vec<Record> {
        records(&self.file).unwrap()
    }
}

impl Bed {
    fn new(attacked: bool) -> Self {
        let tb = Testbed::new(if attacked { 4 } else { 2 }).expect("testbed");
        let public_ca = TestCa::new("dfly test public CA").unwrap();
        let origin = Origin::start(&tb, 2, REGISTRY, &public_ca, Some((USER, PASS))).unwrap();
        let port80 = origin.redirect_port_80(&tb).unwrap();
        let cluster = attacked.then(|| Cluster::start(&tb, 2).unwrap());
        let flags = |node: usize| {
            let mut f = origin.agent_flags();
            if let Some(c) = &cluster {
                f.extend(c.agent_flags(&tb, node).unwrap());
            }
            f
        };
        let agent = Agent::start(&tb, tb.node(1), &strs(&flags(1))).unwrap();
        let trust = Trust::bundle(&tb, &agent, &public_ca).unwrap();
        let containerd = Containerd::start(&tb, tb.node(1), trust.roots()).unwrap();
        let (attacker, peer) = if attacked {
            let env = [(CORRUPT_UPLOADS_ENV, "1")];
            let peer = Agent::start_with_env(&tb, tb.node(4), &strs(&flags(4)), &env).unwrap();
            (Some(attacker(&tb)), Some(peer))
        } else {
            (None, None)
        };
        Self {
            agent,
            containerd,
            roots: trust.roots().to_path_buf(),
            attacker,
            peer,
            _cluster: cluster,
            _port80: port80,
            origin,
            tb,
        }
    }

    fn attacker(&self) -> &Attacker {
        self.attacker.as_ref().expect("a bed with an attacker")
    }

    /// A request from node 1 by a process named `ctr`.
    fn ctr(&self, method: &str, url: &str, auth: Option<&str>) -> GetResult {
        self.ctr_with(url, self.how(method, auth))
    }

    fn ctr_with(&self, url: &str, how: Get) -> GetResult {
        let r = probe_request(self.tb.node(1), "ctr", url, &how).unwrap();
        assert_eq!(r.error, None, "{url}: {r:?}\n{}", self.agent.log_text());
        r
    }

    fn how(&self, method: &str, auth: Option<&str>) -> Get {
        Get {
            method: Some(method.into()),
            headers: auth
                .map(|a| format!("Authorization: {a}"))
                .into_iter()
                .collect(),
            ca: Some(self.roots.clone()),
            connect: None,
        }
    }

    /// `GET /v1/fetch?url=URL` on node 1's agent.
    fn fetch(&self, url: &str, auth: Option<&str>) -> GetResult {
        let fetch = format!(
            "http://{}/v1/fetch?url={}",
            self.agent.admin,
            url.replace(':', "%3A").replace('/', "%2F")
        );
        let r =
            probe_request(self.tb.node(1), "dfly-test", &fetch, &self.how("GET", auth)).unwrap();
        assert_eq!(r.error, None, "{url}: {r:?}");
        r
    }

    /// Requests the origin completed so far with `method` (its own log).
    fn origin_requests(&self, method: &str) -> usize {
        self.origin
            .requests()
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    /// [`Bed::origin_requests`] once it reaches `at_least`, or after 5 s
    /// (the registry logs a request just after answering it).
    fn wait_origin_requests(&self, method: &str, at_least: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.origin_requests(method);
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn attacker(tb: &Testbed) -> Attacker {
    let node = tb.node(3);
    let ip = IpAddr::V4(node.ip4);
    let their_ca = TestCa::new("an attacker's CA").unwrap();
    let (crt, key) = their_ca
        .issue(&[REGISTRY])
        .unwrap()
        .write(&tb.dir, "attacker")
        .unwrap();
    let file = tb.dir.join("attacker.jsonl");
    let server = start_server_as(
        tb,
        node,
        &[SocketAddr::new(ip, 80)],
        &[SocketAddr::new(ip, 443)],
        Some((crt, key)),
        &Serve::Record(file.clone()),
    )
    .unwrap();
    Attacker {
        ip,
        file,
        _server: server,
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn m(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap()
}

fn cache_bytes(agent: &Agent) -> f64 {
    m(agent, "damselfly_blob_bytes_total{source=\"cache\"}")
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// What a client the origin refused may see: the origin's own answer,
/// nothing that says the node holds this blob or how big it is.
fn tells_nothing(r: &GetResult, size: u64, what: &str) {
    assert!(!(200..300).contains(&r.status), "{what}: {r:?}");
    assert!(r.bytes < 1000, "{what}: {} body bytes", r.bytes);
    for h in ["docker-content-digest", "x-damselfly-cache", "etag"] {
        assert!(!r.headers.contains_key(h), "{what}: {h} in {r:?}");
    }
    assert_ne!(
        r.headers.get("content-length"),
        Some(&size.to_string()),
        "{what}: {r:?}"
    );
}

/// Port 80 of the registry redirects everything to https; the agent used to
/// take that redirect for a yes (and remember it for https too), so any
/// process named `ctr` on the node, or any caller of `/v1/fetch`, got a
/// cached private layer with no credential at all.
#[test]
fn a_private_layer_goes_only_to_clients_the_origin_accepts_over_http_too() {
    let b = Bed::new(false);
    let img = Image::build_and_push(
        &b.tb,
        &b.origin,
        "private/app",
        "v1",
        &[10 * MB + MB / 2, MB],
        31,
    )
    .unwrap();
    b.containerd
        .ctr_pull(&img.reference, b.origin.creds())
        .unwrap();
    b.agent.wait_cached(&img.blob_digests());
    let (layer, size) = img.layers[0].clone();
    let path = format!("/v2/private/app/blobs/{layer}");
    let (http, https) = (
        format!("http://{REGISTRY}{path}"),
        format!("https://{REGISTRY}{path}"),
    );
    let cache0 = cache_bytes(&b.agent);

    let wrong = basic(USER, "wrong");
    for auth in [None, Some(wrong.as_str())] {
        for method in ["GET", "HEAD"] {
            // Port 80 answers what it answers everyone: its redirect.
            let r = b.ctr(method, &http, auth);
            assert_eq!(r.status, 301, "{method} {http} {auth:?}: {r:?}");
            assert_eq!(r.headers.get("location"), Some(&https));
            tells_nothing(&r, size, &format!("{method} {http} {auth:?}"));
            // And 443 its refusal, whatever port 80 was asked before.
            let r = b.ctr(method, &https, auth);
            assert_eq!(r.status, 401, "{method} {https} {auth:?}: {r:?}");
            tells_nothing(&r, size, &format!("{method} {https} {auth:?}"));
        }
        for url in [&http, &https] {
            let r = b.fetch(url, auth);
            tells_nothing(&r, size, &format!("/v1/fetch {url} {auth:?}"));
        }
    }
    assert_eq!(
        cache_bytes(&b.agent),
        cache0,
        "cached bytes went to a refused client"
    );

    // The origin serves alice after its redirect, so the cache does, on port
    // 80 and through /v1/fetch.
    let alice = basic(USER, PASS);
    let r = b.ctr("GET", &http, Some(&alice));
    assert_eq!((r.status, r.bytes), (200, size), "{r:?}");
    assert_eq!(format!("sha256:{}", r.sha256), layer);
    assert_eq!(cache_bytes(&b.agent), cache0 + size as f64);
    let r = b.fetch(&http, Some(&alice));
    assert_eq!((r.status, r.bytes), (200, size), "{r:?}");
    assert_eq!(
        r.headers.get("x-damselfly-cache").map(String::as_str),
        Some("hit")
    );
}

/// A yes is about one blob: alice may read `team/other`, but that
/// repository does not hold the private layer, and the origin says so.
#[test]
fn a_yes_for_a_repository_is_not_a_yes_for_a_blob_it_does_not_hold() {
    let b = Bed::new(false);
    let private =
        Image::build_and_push(&b.tb, &b.origin, "private/app", "v1", &[3 * MB], 33).unwrap();
    let other = Image::build_and_push(&b.tb, &b.origin, "team/other", "v1", &[MB], 34).unwrap();
    b.containerd
        .ctr_pull(&private.reference, b.origin.creds())
        .unwrap();
    b.agent.wait_cached(&private.blob_digests());
    let (layer, size) = private.layers[0].clone();
    let alice = basic(USER, PASS);

    let (theirs, their_size) = other.layers[0].clone();
    let r = b.ctr(
        "GET",
        &format!("https://{REGISTRY}/v2/team/other/blobs/{theirs}"),
        Some(&alice),
    );
    assert_eq!((r.status, r.bytes), (200, their_size), "{r:?}");
    let cache0 = cache_bytes(&b.agent);
    for method in ["GET", "HEAD"] {
        let url = format!("https://{REGISTRY}/v2/team/other/blobs/{layer}");
        let r = b.ctr(method, &url, Some(&alice));
        assert_eq!(r.status, 404, "{method} {url}: {r:?}");
        tells_nothing(&r, size, &format!("{method} {url}"));
    }
    assert_eq!(cache_bytes(&b.agent), cache0);
}

/// Which of the steered ports the attacker uses.
#[derive(Clone, Copy, Debug)]
enum Port {
    /// Plain HTTP, named by `Host`.
    Http,
    /// TLS, named by SNI (the client trusts the node CA: anyone on the node can read it).
    Tls,
}

/// A process named `ctr` sends the registry's name to the attacker's
/// address; then the node's runtime pulls (from the cache, and through the
/// swarm with a lying peer, so pieces come from the origin), and the agent
/// fetches and preheats on its own. All of it must reach the real origin;
/// the attacker must get nothing more than what its own client sent, and
/// never a credential.
fn a_chosen_address_changes_nothing_for_anyone_else(port: Port) {
    let mut b = Bed::new(true);
    let img =
        Image::build_and_push(&b.tb, &b.origin, "private/app", "v1", &[4 * MB, MB], 41).unwrap();
    let shared =
        Image::build_and_push(&b.tb, &b.origin, "private/shared", "v1", &[8 * MB], 42).unwrap();
    let alice = basic(USER, PASS);
    b.containerd
        .ctr_pull(&img.reference, b.origin.creds())
        .unwrap();
    b.agent.wait_cached(&img.blob_digests());
    // Node 4 takes the shared image's blobs through its own agent.
    let peer = b.peer.as_ref().unwrap();
    let peer_roots = b.tb.dir.join("bundle-n4.pem");
    std::fs::write(
        &peer_roots,
        std::fs::read_to_string(peer.state_dir.join("ca/ca.crt")).unwrap(),
    )
    .unwrap();
    for d in shared.blob_digests() {
        let url = format!("https://{REGISTRY}/v2/private/shared/blobs/{d}");
        let how = Get {
            ca: Some(peer_roots.clone()),
            ..b.how("GET", Some(&alice))
        };
        let r = probe_request(b.tb.node(4), "ctr", &url, &how).unwrap();
        assert_eq!((r.error.as_deref(), r.status), (None, 200), "{r:?}");
    }
    peer.wait_cached(&shared.blob_digests());
    // A fresh start: nothing pooled, nothing learned; the cache stays.
    b.containerd.remove_image(&img.reference).unwrap();
    b.agent.restart().unwrap();

    let attacker = b.attacker();
    let (scheme, dest) = match port {
        Port::Http => ("http", SocketAddr::new(attacker.ip, 80)),
        Port::Tls => ("https", SocketAddr::new(attacker.ip, 443)),
    };
    let (layer, size) = img.layers[0].clone();
    let sent = ["/v2/".to_string(), format!("/v2/private/app/blobs/{layer}")];
    for target in &sent {
        let how = Get {
            headers: vec!["X-Dfly-Attacker: 1".into()],
            connect: Some(dest),
            ..b.how("GET", None)
        };
        let r = b.ctr_with(&format!("{scheme}://{REGISTRY}{target}"), how);
        assert!(
            r.bytes != size && format!("sha256:{}", r.sha256) != layer,
            "the attacker got the cached private layer: {r:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let during = attacker.records();
    // Its own requests went where it sent them, and only those.
    let carried: Vec<&str> = during
        .iter()
        .filter_map(|r| r.request.as_ref())
        .map(|r| r.target.as_str())
        .collect();
    match port {
        Port::Http => assert_eq!(carried, sent, "{during:#?}"),
        // The agent does not trust its certificate: no request gets through.
        Port::Tls => assert!(carried.is_empty() && !during.is_empty(), "{during:#?}"),
    }

    // The agent's own requests, first (before any pull's connection could
    // set anything right again): /v1/fetch over either scheme, and preheat.
    // Each is authorized by the real origin (and the yes remembered for the
    // pull below).
    let heads0 = b.origin_requests("HEAD");
    for s in ["http", "https"] {
        let r = b.fetch(
            &format!("{s}://{REGISTRY}/v2/private/app/blobs/{layer}"),
            Some(&alice),
        );
        assert_eq!((r.status, r.bytes), (200, size), "{s}: {r:?}");
        assert_eq!(format!("sha256:{}", r.sha256), layer);
    }
    let admin = format!("http://{}", b.agent.admin);
    let creds = format!("{USER}:{PASS}");
    let ca = b.origin.ca_pem.display().to_string();
    let out = damselfly_cli(
        &b.tb,
        b.tb.node(1),
        &b.origin,
        &[
            "preheat",
            &img.reference,
            "--seed",
            &admin,
            "--creds",
            &creds,
            "--upstream-ca",
            &ca,
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        b.agent.log_text()
    );

    nothing_more(b.attacker(), &during, &sent, "the agent's own requests");
    let heads = b.wait_origin_requests("HEAD", heads0 + img.blob_digests().len());
    assert!(
        heads >= heads0 + img.blob_digests().len(),
        "the origin answered {} authorization HEADs",
        heads - heads0
    );

    // Later pulls on the node: from the cache, and through the swarm, whose
    // lying peer sends node 1 to the origin for pieces.
    let hits0 = m(&b.agent, "damselfly_blob_requests_total{result=\"hit\"}");
    b.containerd
        .cri_pull(&img.reference, b.origin.creds())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", b.agent.log_text()));
    let blobs = img.blob_digests().len();
    assert_eq!(
        m(&b.agent, "damselfly_blob_requests_total{result=\"hit\"}"),
        hits0 + blobs as f64
    );
    b.containerd
        .ctr_pull(&shared.reference, b.origin.creds())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", b.agent.log_text()));
    b.agent.wait_cached(&shared.blob_digests());
    let banned = m(
        &b.agent,
        "damselfly_pieces_total{source=\"peer\",result=\"banned\"}",
    );
    let from_origin = m(
        &b.agent,
        "damselfly_pieces_total{source=\"origin\",result=\"ok\"}",
    );
    assert!(
        banned >= 1.0 && from_origin >= 1.0,
        "node 1 never fell back from node 4 to the origin:\n{}",
        b.agent.metrics().unwrap()
    );

    nothing_more(b.attacker(), &during, &sent, "later pulls");
}

/// Nothing more than `during` reached the attacker's address since, and
/// nothing it ever got was the agent's own asking or carried a credential.
fn nothing_more(attacker: &Attacker, during: &[Record], sent: &[String], since: &str) {
    // It writes a request down once it has answered it.
    std::thread::sleep(Duration::from_millis(300));
    let after = attacker.records();
    for rec in &after {
        let Some(req) = &rec.request else { continue };
        assert_eq!(
            req.header("authorization"),
            None,
            "a credential reached the chosen address: {rec:?}"
        );
        assert!(
            req.method == "GET" && sent.contains(&req.target),
            "the agent asked this itself: {rec:?}"
        );
    }
    assert_eq!(
        after.len(),
        during.len(),
        "the chosen address got more with {since}: {:#?}",
        &after[during.len()..]
    );
}

#[test]
fn a_ctr_named_process_sending_the_registrys_host_on_port_80_elsewhere_changes_nothing() {
    a_chosen_address_changes_nothing_for_anyone_else(Port::Http);
}

#[test]
fn a_ctr_named_process_sending_the_registrys_sni_on_port_443_elsewhere_changes_nothing() {
    a_chosen_address_changes_nothing_for_anyone_else(Port::Tls);
}
