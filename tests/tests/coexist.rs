//! End-to-end: the agent's programs share the cgroup hooks with another
//! program, as on a node running Cilium's socket load balancer (a
//! cgroup/connect4 program that rewrites a service address to a backend).
//!
//! The other program here is a real one, built the way an operator would
//! meet it: assembled into an ELF object, loaded and attached with bpftool
//! (multi-attach, as Cilium does), and listed by `bpftool cgroup show` next
//! to ours. It rewrites VIP:80 to node 2's address, so a connect to the VIP
//! only reaches the server if that program ran, and is only counted as
//! steered if ours ran too.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use damselfly_testbed::{
    Agent, Node, Proc, Testbed,
    agent::{probe_get, start_server},
    body,
    testbed::BPFFS_ROOT,
};

/// The "service" address: routed nowhere, so only the rewrite reaches the server.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 213, 250, 9);

/// A socket load balancer on connect4: VIP:80 becomes `backend`:80.
/// `bpf_sock_addr.user_ip4` (offset 4) and `user_port` (offset 24) hold
/// network byte order, read here as little-endian u32s.
fn lb_source(backend: Ipv4Addr) -> String {
    let le = |ip: Ipv4Addr| u32::from_le_bytes(ip.octets());
    let port80 = u32::from(u16::from_le_bytes(80u16.to_be_bytes()));
    format!(
        r#"	.section	"cgroup/connect4","ax",@progbits
	.globl	dfly_test_lb4
	.type	dfly_test_lb4,@function
dfly_test_lb4:
	w2 = *(u32 *)(r1 + 4)
	if w2 != {vip:#x} goto .Lout
	w2 = *(u32 *)(r1 + 24)
	if w2 != {port80:#x} goto .Lout
	w2 = {backend:#x}
	*(u32 *)(r1 + 4) = w2
.Lout:
	r0 = 1
	exit
.Lend:
	.size	dfly_test_lb4, .Lend-dfly_test_lb4
	.section	"license","aw",@progbits
	.globl	_license
_license:
	.asciz	"GPL"
	.size	_license, 4
"#,
        vip = le(VIP),
        backend = le(backend),
    )
}

/// The load balancer, loaded and pinned; unpinned on drop (its attachment
/// goes with the node's cgroup).
struct ForeignLb {
    pin: PathBuf,
}

impl ForeignLb {
    fn load(tb: &Testbed, backend: Ipv4Addr) -> Self {
        let src = tb.dir.join("lb4.s");
        let obj = tb.dir.join("lb4.o");
        std::fs::write(&src, lb_source(backend)).unwrap();
        let mc = ["/usr/lib/llvm-22/bin/llvm-mc", "llvm-mc"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok())
            .expect("llvm-mc is needed (package llvm-22; `cargo xtask setup` installs it)");
        run(Command::new(mc)
            .args(["-triple", "bpfel", "-mattr=+alu32", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&src));
        std::fs::create_dir_all(BPFFS_ROOT).unwrap();
        // Named after the run, so the testbed's sweep removes it if we die.
        let pin = Path::new(BPFFS_ROOT).join(format!("{}-lb4", tb.tag));
        run(Command::new("bpftool")
            .args(["prog", "load"])
            .arg(&obj)
            .arg(&pin)
            .args(["type", "cgroup/connect4"]));
        Self { pin }
    }

    /// Attached with BPF_F_ALLOW_MULTI, as Cilium does: programs run in attach order.
    fn attach(&self, cgroup: &Path) {
        self.attach_with(cgroup, &["multi"]);
    }

    /// Attached with no flag: the hook is this program's alone.
    fn attach_exclusive(&self, cgroup: &Path) {
        self.attach_with(cgroup, &[]);
    }

    fn attach_with(&self, cgroup: &Path, flags: &[&str]) {
        run(Command::new("bpftool")
            .args(["cgroup", "attach"])
            .arg(cgroup)
            .args(["connect4", "pinned"])
            .arg(&self.pin)
            .args(flags));
    }
}

impl Drop for ForeignLb {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (bpftool and llvm-mc: `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Bed {
    lb: ForeignLb,
    _server: Proc,
    // Last: dropped after the processes and the pin.
    tb: Testbed,
}

/// Node 2 serves HTTP on :80; node 1's cgroup has the load balancer loaded.
fn bed() -> Bed {
    let tb = Testbed::new(2).expect("testbed");
    let srv = tb.node(2).clone();
    let server = start_server(&tb, &srv, &[srv.addr4(80)], &[], None).unwrap();
    let lb = ForeignLb::load(&tb, srv.ip4);
    Bed {
        lb,
        _server: server,
        tb,
    }
}

/// A steered client in node 1 fetches from the VIP, and the bytes are right.
fn fetch_through_vip(node: &Node, agent: &Agent) {
    const N: u64 = 1_000_000;
    let steered0 = agent.steered(80).unwrap();
    let spliced0 = agent.spliced().unwrap();
    let r = probe_get(node, "ctr", &format!("http://{VIP}/bytes/{N}"), None).unwrap();
    assert_eq!(r.error, None, "{}", agent.log_text());
    assert_eq!((r.status, r.bytes), (200, N));
    assert_eq!(r.sha256, body::sha256(N, N), "body changed in transit");
    assert_eq!(agent.steered(80).unwrap(), steered0 + 1.0, "not steered");
    assert_eq!(agent.spliced().unwrap(), spliced0 + 1.0, "not spliced");
}

fn connect4_programs(cgroup: &Path) -> Vec<String> {
    let text = run(Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup));
    text.lines()
        .filter(|l| l.contains("inet4_connect"))
        .map(|l| l.split_whitespace().last().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_socket_load_balancer_attached_first_rewrites_and_the_agent_steers_the_result() {
    let b = bed();
    let node = b.tb.node(1);
    b.lb.attach(&node.cgroup);
    // Without the agent the load balancer alone reaches the server.
    let direct = probe_get(node, "ctr", &format!("http://{VIP}/bytes/1000"), None).unwrap();
    assert_eq!((direct.error, direct.status), (None, 200));

    let agent = Agent::start(&b.tb, node, &[]).unwrap();
    // Both on the hook, in attach order: the load balancer runs first, so
    // ours sees node 2's address and steers that.
    assert_eq!(
        connect4_programs(&node.cgroup),
        ["dfly_test_lb4", "damselfly_conn4"]
    );
    fetch_through_vip(node, &agent);
}

#[test]
fn a_socket_load_balancer_attached_after_the_agent_still_balances_the_agents_upstream() {
    let b = bed();
    let node = b.tb.node(1);
    let mut agent = Agent::start(&b.tb, node, &[]).unwrap();
    b.lb.attach(&node.cgroup);
    // Ours runs first and sends the client to the agent (the load balancer
    // leaves a loopback destination alone); the agent's own connect to the
    // VIP is not steered, and the load balancer sends it to node 2.
    assert_eq!(
        connect4_programs(&node.cgroup),
        ["damselfly_conn4", "dfly_test_lb4"]
    );
    fetch_through_vip(node, &agent);

    // The agent leaves; the other program stays and keeps working.
    assert!(agent.terminate().unwrap().success());
    assert_eq!(connect4_programs(&node.cgroup), ["dfly_test_lb4"]);
    let r = probe_get(node, "ctr", &format!("http://{VIP}/bytes/1000"), None).unwrap();
    assert_eq!((r.error, r.status), (None, 200));
}

#[test]
fn a_program_holding_the_hook_exclusively_makes_the_agent_refuse_and_name_it() {
    let b = bed();
    let node = b.tb.node(1);
    b.lb.attach_exclusive(&node.cgroup);
    let err = format!(
        "{:#}",
        Agent::start(&b.tb, node, &[]).map(|_| ()).unwrap_err()
    );
    assert!(
        err.contains("damselfly_conn4")
            && err.contains("exclusively")
            && err.contains("bpftool cgroup show"),
        "{err}"
    );
    // Nothing of the agent's is left, and the other program still works.
    assert!(
        !Path::new(BPFFS_ROOT).join(&node.name).exists(),
        "pins left"
    );
    assert_eq!(connect4_programs(&node.cgroup), ["dfly_test_lb4"]);
    let text = run(Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&node.cgroup));
    assert!(!text.contains("damselfly"), "{text}");
    let r = probe_get(node, "ctr", &format!("http://{VIP}/bytes/1000"), None).unwrap();
    assert_eq!((r.error, r.status), (None, 200));
}
