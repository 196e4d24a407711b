//! The harness itself: what it makes, it removes, also when a run was killed.

use std::{fs, path::PathBuf, process::Command};

use damselfly_testbed::{
    Agent, Testbed,
    testbed::{BPFFS_ROOT, cgroup2_root},
};

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn a_testbed_with_an_agent_leaves_nothing_behind() {
    let (names, paths) = {
        let tb = Testbed::new(2).unwrap();
        let mut agent = Agent::start(&tb, tb.node(1), &[]).unwrap();
        // A SIGKILLed agent leaves its pins: the testbed must remove them too.
        agent.kill();
        let names: Vec<String> = std::iter::once(tb.hub.clone())
            .chain(tb.nodes.iter().map(|n| n.name.clone()))
            .collect();
        let mut paths: Vec<PathBuf> = tb
            .nodes
            .iter()
            .flat_map(|n| [n.cgroup.clone(), n.hosts.clone()])
            .collect();
        paths.push(PathBuf::from(BPFFS_ROOT).join(&tb.node(1).name));
        paths.push(tb.dir.clone());
        assert!(
            paths.iter().all(|p| p.exists()),
            "the testbed made all of {paths:?}"
        );
        (names, paths)
    };
    for n in &names {
        assert!(!netns_exists(n), "netns {n} left");
    }
    for p in &paths {
        assert!(!p.exists(), "{} left", p.display());
    }
}

#[test]
fn leftovers_of_a_dead_run_are_swept_at_start() {
    // A pid that certainly belonged to a process that is gone now.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let name = format!("dfly-{dead}-0-n1");

    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    let cgroup = cgroup2_root().unwrap().join(&name);
    let etc = PathBuf::from("/etc/netns").join(&name);
    let pins = PathBuf::from(BPFFS_ROOT).join(&name);
    let tmp = std::env::temp_dir().join(&name);
    for d in [&cgroup, &etc, &pins, &tmp] {
        fs::create_dir_all(d).unwrap();
    }

    let _tb = Testbed::new(1).unwrap();
    assert!(!netns_exists(&name), "stale netns {name} not swept");
    for d in [&cgroup, &etc, &pins, &tmp] {
        assert!(!d.exists(), "stale {} not swept", d.display());
    }
}

#[test]
fn two_agents_on_one_machine_steer_only_their_own_node() {
    let tb = Testbed::new(3).unwrap();
    let srv = tb.node(3).clone();
    let _server =
        damselfly_testbed::agent::start_server(&tb, &srv, &[srv.addr4(80)], &[], None).unwrap();
    let a1 = Agent::start(&tb, tb.node(1), &[]).unwrap();
    let a2 = Agent::start(&tb, tb.node(2), &[]).unwrap();
    let url = format!("http://{}/bytes/1000", srv.addr4(80));
    for (client, hits) in [(1, (1.0, 0.0)), (2, (1.0, 1.0)), (2, (1.0, 2.0))] {
        let r = damselfly_testbed::agent::probe_get(tb.node(client), "ctr", &url, None).unwrap();
        assert_eq!((r.error, r.status), (None, 200));
        assert_eq!((a1.steered(80).unwrap(), a2.steered(80).unwrap()), hits);
    }
    // Each instance has its own pins.
    for n in [1, 2] {
        assert!(
            PathBuf::from(BPFFS_ROOT)
                .join(&tb.node(n).name)
                .join("counters")
                .exists()
        );
    }
}

#[test]
fn links_can_be_shaped() {
    let tb = Testbed::new(1).unwrap();
    let node = tb.node(1);
    node.shape(&tb.hub, 50).unwrap();
    for (ns, dev) in [
        (node.name.as_str(), "eth0".to_string()),
        (tb.hub.as_str(), "n1".to_string()),
    ] {
        let out = Command::new("tc")
            .args(["-n", ns, "qdisc", "show", "dev", &dev])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("tbf") && text.contains("rate 50Mbit"),
            "{ns}/{dev}: {text}"
        );
    }
}
