//! End-to-end: the agent started where no bpffs is mounted, as on a fresh
//! machine (systemd is what usually mounts it, and not every node has it).
//!
//! A "host" here is a private mount namespace with /sys/fs/bpf unmounted;
//! the agent starts in a mount namespace made from it, as a container
//! runtime starts the DaemonSet's pod. With /sys/fs/bpf shared in the host
//! (a hostPath with `mountPropagation: Bidirectional`, what the chart
//! renders) the agent's mount and its pins show up on the host, where
//! bpftool finds them; without, the agent says why nobody will.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use damselfly_testbed::{Agent, Proc, Testbed, testbed::BPFFS_ROOT};

/// A process holding a private mount namespace in which /sys/fs/bpf is not
/// bpffs; `shared` makes /sys/fs/bpf a shared mount point there first.
struct Host {
    proc: Proc,
}

impl Host {
    fn new(tb: &Testbed, shared: bool) -> Host {
        let ready = tb.dir.join(format!("host-ready-{shared}"));
        let share = if shared {
            "mount --bind /sys/fs/bpf /sys/fs/bpf && mount --make-shared /sys/fs/bpf &&"
        } else {
            ""
        };
        let script = format!(
            "while umount -l /sys/fs/bpf 2>/dev/null; do :; done; \
             [ \"$(stat -f -c %T /sys/fs/bpf)\" != bpf_fs ] || {{ echo still bpffs >&2; exit 1; }}; \
             {share} touch {ready} && exec sleep 600",
            ready = ready.display()
        );
        let log = tb.dir.join(format!("host-{shared}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("unshare (util-linux) is needed");
        let mut proc = Proc::new(child, log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                proc.running() && Instant::now() < deadline,
                "the host namespace did not come up: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Host { proc }
    }

    fn mnt_ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.proc.pid()))
    }

    /// `cmd ARGS` in the host's mount namespace.
    fn run(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--mount={}", self.mnt_ns().display()))
            .arg("--")
            .arg(cmd)
            .args(args)
            .output()
            .expect("nsenter (util-linux) is needed")
    }
}

fn pins_of(agent: &Agent) -> PathBuf {
    Path::new(BPFFS_ROOT).join(&agent.node.name)
}

#[test]
fn agent_mounts_bpffs_and_its_pins_reach_a_host_that_shares_sys_fs_bpf() {
    let tb = Testbed::new(1).expect("testbed");
    let host = Host::new(&tb, true);
    let mut agent = Agent::start_from_mount_ns(&tb, tb.node(1), &[], &host.mnt_ns()).unwrap();

    let log = agent.log_text();
    assert!(
        log.contains("bpffs was not mounted at /sys/fs/bpf")
            && log.contains("which is not PID 1's")
            && log.contains("propagate to its peers"),
        "the agent did not say where it mounted bpffs:\n{log}"
    );
    // bpftool on the host finds the pinned counters.
    let pin = pins_of(&agent).join("counters");
    let dump = host.run(
        "bpftool",
        &["-j", "map", "dump", "pinned", pin.to_str().unwrap()],
    );
    assert!(
        dump.status.success(),
        "bpftool on the host does not find {}: {}",
        pin.display(),
        String::from_utf8_lossy(&dump.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert!(!entries.as_array().unwrap().is_empty(), "{entries}");

    // SIGTERM removes them there too.
    assert!(agent.terminate().unwrap().success());
    let left = host.run("test", &["-e", pins_of(&agent).to_str().unwrap()]);
    assert!(
        !left.status.success(),
        "pins left on the host after SIGTERM"
    );
}

#[test]
fn agent_says_why_its_pins_stay_invisible_when_sys_fs_bpf_does_not_propagate() {
    let tb = Testbed::new(1).expect("testbed");
    let host = Host::new(&tb, false);
    let agent = Agent::start_from_mount_ns(&tb, tb.node(1), &[], &host.mnt_ns()).unwrap();

    let log = agent.log_text();
    assert!(
        log.contains("WARN")
            && log.contains("does not propagate out of it")
            && log.contains("bpftool and agents in other mount namespaces will not see the pins")
            && log.contains("mountPropagation: Bidirectional"),
        "the agent did not say why its pins are invisible:\n{log}"
    );
    let seen = host.run("test", &["-e", pins_of(&agent).to_str().unwrap()]);
    assert!(!seen.status.success(), "the host sees pins it should not");
    // Steering itself does not need the host to see the pins.
    let (code, status) = agent.node.http_get(agent.admin, "/status").unwrap();
    assert_eq!(code, 200);
    assert!(status.contains("damselfly_conn4"), "{status}");
}
