//! End-to-end: the node side of `helm uninstall`. The chart's post-delete
//! hook runs `damselfly cleanup` on every node and `damselfly cleanup-wait`
//! in a Job that holds the uninstall until they all say they are done.
//!
//! Real parts: the agent binary with its kernel programs and pins, `ca
//! install` as the chart's init container runs it, and a host root in
//! which the real `update-ca-certificates` runs (chrooted, as on a node):
//! this machine's /etc and /usr under overlays whose upper layers are the
//! test's, so the host's own trust store is never touched and what the
//! tools wrote can be read there. The waiter finds the cleanup instances
//! by a name in the node's /etc/hosts with one IPv4 and one IPv6 address,
//! as a headless Service's A and AAAA records give them.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use damselfly_testbed::{
    Agent, Mount, Node, Proc, Testbed, agent::damselfly_bin, testbed::BPFFS_ROOT,
};

const REGISTRY: &str = "registry.dfly.test";
const PORT: u16 = 7409;
/// What the headless Service's name stands for.
const SERVICE: &str = "dfly-cleanup";
const ANCHOR: &str = "damselfly-node-ca.crt";

/// A node's `/` for `--host-root`: the machine's /etc and /usr, each under
/// an overlay mounted in the command's own mount namespace, /dev bound in
/// (the update tool writes to /dev/null), the merged-/usr links, an empty
/// /tmp. Whatever the commands write there lands in `base`.
struct HostRoot {
    root: PathBuf,
    etc_upper: PathBuf,
    usr_upper: PathBuf,
    mounts: Vec<Mount>,
}

impl HostRoot {
    fn new(base: &Path) -> Self {
        let root = base.join("root");
        let mut mounts = Vec::new();
        let mut uppers = Vec::new();
        for dir in ["etc", "usr"] {
            let at = root.join(dir);
            let (upper, work) = (base.join(dir).join("upper"), base.join(dir).join("work"));
            for d in [&at, &upper, &work] {
                fs::create_dir_all(d).unwrap();
            }
            // The bind gives the overlay the machine's directory as its
            // lower layer at a path of the root's own.
            mounts.push(Mount::Bind {
                src: Path::new("/").join(dir),
                dst: at.clone(),
            });
            mounts.push(Mount::Overlay {
                dir: at,
                upper: upper.clone(),
                work,
            });
            uppers.push(upper);
        }
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        mounts.push(Mount::Bind {
            src: "/dev".into(),
            dst: root.join("dev"),
        });
        for link in ["bin", "sbin", "lib", "lib64"] {
            if let Ok(target) = fs::read_link(Path::new("/").join(link)) {
                symlink(target, root.join(link)).unwrap();
            }
        }
        assert!(
            Path::new("/usr/sbin/update-ca-certificates").exists(),
            "this test runs the real update-ca-certificates (apt-get install ca-certificates)"
        );
        let usr_upper = uppers.pop().unwrap();
        let etc_upper = uppers.pop().unwrap();
        Self {
            root,
            etc_upper,
            usr_upper,
            mounts,
        }
    }

    /// `damselfly` in `node`, seeing this host root.
    fn damselfly(&self, node: &Node) -> Command {
        let mut cmd = node
            .command_with(damselfly_bin().unwrap(), &self.mounts)
            .unwrap();
        // mktemp in the chroot: its own /tmp, not the test's TMPDIR.
        cmd.env_remove("TMPDIR");
        cmd
    }

    /// The bundle as update-ca-certificates last wrote it ("" if it never did).
    fn bundle(&self) -> String {
        fs::read_to_string(self.etc_upper.join("ssl/certs/ca-certificates.crt")).unwrap_or_default()
    }

    fn anchor(&self) -> PathBuf {
        self.usr_upper
            .join("local/share/ca-certificates")
            .join(ANCHOR)
    }

    fn certs_d(&self) -> Vec<PathBuf> {
        ["docker", "containers"]
            .iter()
            .map(|d| {
                self.etc_upper
                    .join(d)
                    .join("certs.d")
                    .join(REGISTRY)
                    .join(ANCHOR)
            })
            .collect()
    }
}

/// The base64 body of a PEM certificate: what a bundle holding it contains.
fn body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

fn bundle_has(bundle: &str, pem: &str) -> bool {
    bundle
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
        .contains(&body(pem))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_log(proc: &mut Proc, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.log_text().contains(needle) {
        assert!(
            proc.running() && Instant::now() < deadline,
            "never printed {needle:?}:\n{}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `damselfly cleanup` started in `node` through `cmd` (the bare binary),
/// with `host` (--host-root and such) before the common flags.
fn start_cleanup(
    tb: &Testbed,
    node: &Node,
    mut cmd: Command,
    host: &[&str],
    state: &Path,
    serve: &str,
) -> Proc {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    cmd.arg("cleanup")
        .args(host)
        .arg("--state-dir")
        .arg(state)
        .args(["--instance", &node.name, "--bpffs", "/sys/fs/bpf"])
        .args(["--serve", serve, "--wait-agent", "60s"])
        .env_remove("RUST_BACKTRACE");
    let log = tb.dir.join(format!(
        "cleanup-n{}-{}.log",
        node.index,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    node.spawn(cmd, &log).unwrap()
}

/// Polls `GET /healthz` until it answers; returns (status, body).
fn healthz(node: &Node, addr: std::net::SocketAddr, proc: &mut Proc) -> (u16, String) {
    wait_log(proc, "until SIGTERM");
    node.http_get(addr, "/healthz")
        .unwrap_or_else(|e| panic!("/healthz on {addr}: {e}\n{}", proc.log_text()))
}

fn cleanup_wait(node: &Node, timeout: &str) -> Output {
    let mut cmd = node.command(damselfly_bin().unwrap()).unwrap();
    cmd.args(["cleanup-wait", "--endpoint", &format!("{SERVICE}:{PORT}")])
        .args([
            "--period",
            "200ms",
            "--threshold",
            "3",
            "--timeout",
            timeout,
        ])
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd.output().unwrap()
}

#[test]
fn cleanup_leaves_nothing_on_the_node_and_cleanup_wait_tells_when_every_node_is_clean() {
    let tb = Testbed::new(2).expect("testbed");
    let (n1, n2) = (tb.node(1).clone(), tb.node(2).clone());
    let host = HostRoot::new(&tb.dir.join("host-n1"));
    let root = host.root.to_str().unwrap();
    // Where Agent::start keeps node 1's state.
    let state = tb.dir.join("state-n1");

    // The chart's init container: the CA created and installed before the agent starts.
    let out = host
        .damselfly(&n1)
        .args(["ca", "--registry", REGISTRY, "install", "--host-root", root])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "ca install: {}", text(&out));
    let pem = fs::read_to_string(state.join("ca/ca.crt")).unwrap();
    assert!(
        bundle_has(&host.bundle(), &pem),
        "ca install did not reach the bundle: {}",
        text(&out)
    );
    assert!(
        !bundle_has(
            &fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap(),
            &pem
        ),
        "the machine's own trust store was changed"
    );
    assert_eq!(fs::read_to_string(host.anchor()).unwrap(), pem);
    for f in host.certs_d() {
        assert_eq!(fs::read_to_string(&f).unwrap(), pem, "{}", f.display());
    }

    let mut agent = Agent::start(&tb, &n1, &["--registry", REGISTRY]).unwrap();
    assert_eq!(agent.state_dir, state);
    assert_eq!(
        fs::read_to_string(state.join("ca/ca.crt")).unwrap(),
        pem,
        "the agent replaced the CA"
    );
    let pins = Path::new(BPFFS_ROOT).join(&n1.name);
    assert!(
        pins.join("config").exists(),
        "no pins at {}",
        pins.display()
    );

    // The hook starts while the agent is still there (its pod terminating):
    // cleanup waits for it to let go of the state dir.
    let mut c1 = start_cleanup(
        &tb,
        &n1,
        host.damselfly(&n1),
        &["--host-root", root],
        &state,
        "0.0.0.0:7409",
    );
    wait_log(&mut c1, "waiting for it to stop");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        state.join("ca/ca.key").exists() && !c1.log_text().contains("[2/4]"),
        "cleanup went on while the agent held its CA:\n{}",
        c1.log_text()
    );
    // SIGKILL: the agent cannot remove its pins.
    agent.kill();

    let (status, answer) = healthz(&n1, n1.addr4(PORT), &mut c1);
    let log = c1.log_text();
    assert_eq!((status, answer.as_str()), (200, "clean\n"), "{log}");
    assert!(log.contains("the agent let go after"), "{log}");
    let bundle = host.bundle();
    assert!(
        !bundle.is_empty() && !bundle_has(&bundle, &pem),
        "the CA is still in the bundle:\n{log}"
    );
    assert!(!host.anchor().exists(), "{log}");
    for f in host.certs_d() {
        assert!(!f.exists(), "{} is still there:\n{log}", f.display());
    }
    assert!(!state.exists(), "the state dir is still there:\n{log}");
    assert!(!pins.exists(), "the pins are still there:\n{log}");

    // Another node whose cleanup refuses a state dir holding what no agent makes.
    // Its state dir is a mount point, as a hostPath mounted at the agent's path makes it.
    let host2 = tb.dir.join("host-n2");
    fs::create_dir_all(host2.join("etc")).unwrap();
    fs::write(host2.join("etc/debian_version"), "12\n").unwrap();
    let state2 = tb.dir.join("state-n2");
    fs::create_dir_all(&state2).unwrap();
    fs::write(state2.join("notes.txt"), "not the agent's").unwrap();
    let host2_str = host2.to_str().unwrap();
    let cleanup2 = |tb: &Testbed| {
        let own_mount = Mount::Bind {
            src: state2.clone(),
            dst: state2.clone(),
        };
        let cmd = n2
            .command_with(damselfly_bin().unwrap(), &[own_mount])
            .unwrap();
        let host = ["--host-root", host2_str, "--update-command", "true"];
        start_cleanup(tb, &n2, cmd, &host, &state2, "[::]:7409")
    };
    let mut c2 = cleanup2(&tb);
    let (status, answer) = healthz(&n2, n2.addr6(PORT), &mut c2);
    assert_eq!(status, 500, "{}", c2.log_text());
    assert!(
        answer.contains("state dir: refusing") && answer.contains("notes.txt"),
        "{answer}"
    );
    assert!(state2.join("notes.txt").exists());

    // The headless Service: one name, node 1's IPv4 and node 2's IPv6.
    tb.add_host(SERVICE, n1.ip4.into()).unwrap();
    tb.add_host(SERVICE, n2.ip6.into()).unwrap();
    let start = Instant::now();
    let out = cleanup_wait(&n1, "3s");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "--timeout 3s took {:?}",
        start.elapsed()
    );
    assert!(
        err.contains("cleanup not confirmed within 3s")
            && err.contains("1 of 2 not clean")
            && err.contains(&format!(
                "[{}]:{PORT} answered 500: state dir: refusing",
                n2.ip6
            ))
            && err.contains("notes.txt")
            && !err.contains(&n1.ip4.to_string()),
        "{}",
        text(&out)
    );

    // Node 2 put right, its cleanup pod restarted: every node is clean.
    fs::remove_file(state2.join("notes.txt")).unwrap();
    fs::create_dir_all(state2.join("ca")).unwrap();
    fs::write(state2.join("ca/ca.crt"), &pem).unwrap();
    fs::create_dir_all(state2.join("blobs")).unwrap();
    fs::write(state2.join("blobs").join("ab".repeat(32)), "a blob").unwrap();
    c2.kill();
    let mut c2 = cleanup2(&tb);
    assert_eq!(
        healthz(&n2, n2.addr6(PORT), &mut c2).0,
        200,
        "{}",
        c2.log_text()
    );
    // Emptied; the directory itself is the pod's mount point and stays.
    let log = c2.log_text();
    assert_eq!(fs::read_dir(&state2).unwrap().count(), 0, "{log}");
    assert!(
        log.contains("the node CA and its key, 1 cache files (6 bytes)")
            && log.contains("stays: it is a mount point here"),
        "{log}"
    );
    let out = cleanup_wait(&n1, "30s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("2 clean; done (3 in a row)"),
        "{}",
        text(&out)
    );

    // It serves until SIGTERM, then exits 0; a second run on the clean node is clean too.
    c1.signal(libc::SIGTERM);
    assert!(
        c1.wait_exit(Duration::from_secs(10)).unwrap().success(),
        "{}",
        c1.log_text()
    );
    let mut again = start_cleanup(
        &tb,
        &n1,
        host.damselfly(&n1),
        &["--host-root", root],
        &state,
        "0.0.0.0:7409",
    );
    let (status, answer) = healthz(&n1, n1.addr4(PORT), &mut again);
    let log = again.log_text();
    assert_eq!((status, answer.as_str()), (200, "clean\n"), "{log}");
    assert!(
        log.contains("no agent holds it")
            && log.contains("node CA not installed")
            && log.contains(&format!("{} is not there (nothing to do)", state.display()))
            && log.contains(&format!("{} is not there (nothing to do)", pins.display())),
        "{log}"
    );
}
