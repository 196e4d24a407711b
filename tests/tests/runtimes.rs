//! End-to-end: Docker Engine and Podman, the runtimes besides containerd that
//! the agent steers by default, pull a private image through their node's
//! agent, and the other runtime on the next node takes it from the first
//! node through the swarm. The first node trusts the node CA the way `damselfly
//! ca install` hands it to these runtimes (certs.d), the second through its
//! roots bundle.

use std::{
    fs,
    time::{Duration, Instant},
};

use damselfly_testbed::{
    Agent, Testbed,
    cluster::Cluster,
    docker::Dockerd,
    image::{Image, Pulled},
    origin::Origin,
    pki::TestCa,
    podman::Podman,
    testbed::Proc,
    trust::Trust,
};

const REGISTRY: &str = "registry.dfly.test";
const USER: &str = "alice";
const PASSWORD: &str = "s3cret";
const MB: u64 = 1000 * 1000;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Docker,
    Podman,
}

enum Runtime {
    Docker(Dockerd),
    Podman(Podman),
}

impl Kind {
    fn etc_dir(self) -> &'static str {
        match self {
            Self::Docker => damselfly_testbed::docker::ETC_DIR,
            Self::Podman => damselfly_testbed::podman::ETC_DIR,
        }
    }
}

impl Runtime {
    fn start(kind: Kind, tb: &Testbed, agent: &Agent, trust: &Trust) -> Self {
        match kind {
            Kind::Docker => Self::Docker(Dockerd::start(tb, &agent.node, trust).unwrap()),
            Kind::Podman => Self::Podman(Podman::new(tb, &agent.node, trust).unwrap()),
        }
    }

    fn login(&self) -> anyhow::Result<()> {
        match self {
            Self::Docker(d) => d.login(REGISTRY, USER, PASSWORD),
            Self::Podman(p) => p.login(REGISTRY, USER, PASSWORD),
        }
    }

    fn pull(&self, reference: &str) -> anyhow::Result<()> {
        match self {
            Self::Docker(d) => d.pull(reference),
            Self::Podman(p) => p.pull(reference),
        }
    }

    fn inspect(&self, reference: &str) -> Pulled {
        match self {
            Self::Docker(d) => d.inspect(reference),
            Self::Podman(p) => p.inspect(reference),
        }
        .unwrap()
    }

    fn log_text(&self) -> String {
        match self {
            Self::Docker(d) => d.log_text(),
            Self::Podman(_) => String::new(),
        }
    }
}

/// Nodes 1 and 2 pull (agent + runtime); node 3 runs the private origin and
/// the tracker. Fields drop in order: runtimes before agents before the testbed.
struct Bed {
    runtimes: Vec<Runtime>,
    trusts: Vec<Trust>,
    agents: Vec<Agent>,
    _tracker: Proc,
    origin: Origin,
    tb: Testbed,
}

fn bed(kinds: [Kind; 2]) -> Bed {
    let tb = Testbed::new(3).expect("testbed");
    let public_ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, 3, REGISTRY, &public_ca, Some((USER, PASSWORD))).unwrap();
    let cluster = Cluster::start(&tb, 3).unwrap();
    let agents: Vec<Agent> = (1..=2)
        .map(|i| {
            let mut flags = origin.agent_flags();
            flags.extend(cluster.agent_flags(&tb, i).unwrap());
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Agent::start(&tb, tb.node(i), &flags).unwrap()
        })
        .collect();
    // The first node's runtime has only the public CA in its roots: the node
    // CA reaches it through certs.d alone.
    let trusts = vec![
        Trust::certs_d(&tb, &agents[0], &origin.ca_pem).unwrap(),
        Trust::bundle(&tb, &agents[1], &public_ca).unwrap(),
    ];
    let runtimes = kinds
        .iter()
        .zip(&agents)
        .zip(&trusts)
        .map(|((&kind, agent), trust)| Runtime::start(kind, &tb, agent, trust))
        .collect();
    Bed {
        runtimes,
        trusts,
        agents,
        _tracker: cluster.tracker,
        origin,
        tb,
    }
}

fn m(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap()
}

/// Node 1 pulls from the origin through its agent, then node 2, with the
/// other runtime, pulls the same image and the origin sends no blob byte.
fn first_from_the_origin_second_from_the_first(kinds: [Kind; 2]) {
    let started = Instant::now();
    let mut b = bed(kinds);
    let img = Image::build_and_push(&b.tb, &b.origin, "private/app", "v1", &[3 * MB, 2 * MB], 31)
        .unwrap();
    let ready = started.elapsed();

    // Node 1's runtime trusts the node CA through certs.d alone, which it
    // reads at every request: with the registry's entry moved away it refuses
    // the agent's certificate; with it back (no runtime restart) the pull
    // below is terminated by the agent and cached, which it could not be
    // without that trust.
    let certs_d = b.trusts[0].certs_d_dir(kinds[0].etc_dir()).unwrap();
    let (entry, aside) = (certs_d.join(REGISTRY), certs_d.join("moved-away"));
    fs::rename(&entry, &aside).unwrap();
    let refused = b.runtimes[0].login().unwrap_err();
    assert!(
        format!("{refused:#}").contains("certificate signed by unknown authority"),
        "{refused:#}"
    );
    // Podman may have two handshakes under way when the first alert comes.
    assert!(
        b.agents[0]
            .metric(r#"damselfly_intercept_connections_total{mode="tls-refused"}"#)
            .unwrap()
            >= 1.0
    );
    fs::rename(&aside, &entry).unwrap();
    // The agent splices a client that refused its certificate for ten
    // minutes (fail open); a restarted agent offers it again at once.
    b.agents[0].restart().unwrap();

    let diagnose = |i: usize| {
        format!(
            "{:?} on node {}:\n{}\nagent:\n{}",
            kinds[i],
            i + 1,
            b.runtimes[i].log_text(),
            b.agents[i].log_text()
        )
    };

    let t = Instant::now();
    b.runtimes[0].login().unwrap();
    b.runtimes[0]
        .pull(&img.reference)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", diagnose(0)));
    let first = t.elapsed();
    assert_eq!(b.runtimes[0].inspect(&img.reference), img.pulled());
    b.agents[0].wait_cached(&img.blob_digests());
    let from_origin = b
        .origin
        .wait_blob_bytes(img.total_blob_bytes, Duration::from_secs(5));
    assert!(
        from_origin >= img.total_blob_bytes,
        "the origin sent {from_origin} of {} blob bytes",
        img.total_blob_bytes
    );
    assert!(
        m(
            &b.agents[0],
            "damselfly_blob_bytes_total{source=\"origin\"}"
        ) >= img.total_blob_bytes as f64,
        "node 1's pull did not go through its agent:\n{}",
        b.agents[0].metrics().unwrap()
    );
    // Announcements follow the commit; give them a moment to reach the tracker.
    std::thread::sleep(Duration::from_millis(500));

    let t = Instant::now();
    b.runtimes[1].login().unwrap();
    b.runtimes[1]
        .pull(&img.reference)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", diagnose(1)));
    let second = t.elapsed();
    assert_eq!(b.runtimes[1].inspect(&img.reference), img.pulled());
    b.agents[1].wait_cached(&img.blob_digests());
    let after = b
        .origin
        .wait_blob_bytes(from_origin + 1, Duration::from_secs(1));
    let from_peers = m(&b.agents[1], "damselfly_blob_bytes_total{source=\"peer\"}");
    eprintln!(
        "{kinds:?}: set-up {ready:.1?}; node 1 pulled in {first:.1?}, origin sent {from_origin} \
         blob bytes (image {}); node 2 pulled in {second:.1?}, origin sent {} more, peers {from_peers}",
        img.total_blob_bytes,
        after - from_origin
    );
    assert_eq!(
        after,
        from_origin,
        "node 2 took blob bytes from the origin:\n{}\n{}",
        b.agents[1].metrics().unwrap(),
        diagnose(1)
    );
    assert!(
        from_peers >= img.total_blob_bytes as f64,
        "node 2 got {from_peers} bytes from peers"
    );

    // What `ca install` wrote, `ca uninstall` takes away.
    let left = b.trusts[0].uninstall(&b.agents[0]).unwrap();
    assert!(left.is_empty(), "left after ca uninstall: {left:?}");
}

#[test]
fn docker_pulls_from_the_origin_then_podman_on_the_next_node_from_it() {
    first_from_the_origin_second_from_the_first([Kind::Docker, Kind::Podman]);
}

#[test]
fn podman_pulls_from_the_origin_then_docker_on_the_next_node_from_it() {
    first_from_the_origin_second_from_the_first([Kind::Podman, Kind::Docker]);
}
