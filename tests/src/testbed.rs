//! Nodes as network namespaces on a bridge, each with its own cgroup.
//!
//! Layout of one testbed with tag `dfly-<pid>-<n>`:
//! - namespace `<tag>-hub` holds bridge `br0`;
//! - node `i` is namespace `<tag>-n<i>` with `eth0` = 10.213.0.(10+i)/24 and
//!   fd00:213::(10+i)/64, its veth peer `n<i>` enslaved to `br0`, and cgroup
//!   `<cgroup2>/<tag>-n<i>`;
//! - per-node `/etc/netns/<ns>/hosts`, bind-mounted over /etc/hosts for
//!   processes started in the node (the real /etc/hosts is never touched).

use std::{
    ffi::CString,
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

pub const PREFIX: &str = "dfly-";
const NETNS_DIR: &str = "/run/netns";
const ETC_NETNS: &str = "/etc/netns";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/damselfly";

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Testbed {
    pub tag: String,
    pub hub: String,
    pub nodes: Vec<Node>,
    /// Network namespaces of pods made with [`Testbed::pod`].
    pods: Vec<String>,
    /// Scratch space for this run (certificates, logs, state dirs).
    pub dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    /// Namespace name; also the agent instance name on this node.
    pub name: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub cgroup: PathBuf,
    pub hosts: PathBuf,
}

impl Testbed {
    /// A testbed with `n` nodes. Requires root, iproute2 and cgroup v2.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        preflight()?;
        sweep_stale();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&tag);
        let mut tb = Testbed {
            hub: format!("{tag}-hub"),
            tag,
            nodes: Vec::new(),
            pods: Vec::new(),
            dir,
        };
        // From here on, Drop cleans up whatever was made, also on error.
        fs::create_dir_all(&tb.dir)?;
        tb.build(n)?;
        Ok(tb)
    }

    fn build(&mut self, n: usize) -> anyhow::Result<()> {
        let cg_root = cgroup2_root()?;
        ip(&["netns", "add", &self.hub])?;
        ip(&["-n", &self.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &self.hub, "link", "set", "br0", "up"])?;
        ip(&["-n", &self.hub, "link", "set", "lo", "up"])?;
        for i in 1..=n {
            let name = format!("{}-n{i}", self.tag);
            let node = Node {
                index: i,
                ip4: Ipv4Addr::new(10, 213, 0, 10 + i as u8),
                ip6: Ipv6Addr::new(0xfd00, 0x213, 0, 0, 0, 0, 0, 10 + i as u16),
                cgroup: cg_root.join(&name),
                hosts: Path::new(ETC_NETNS).join(&name).join("hosts"),
                name,
            };
            // Record first so a failure below still cleans this node up.
            self.nodes.push(node.clone());
            ip(&["netns", "add", &node.name])?;
            let peer = format!("n{i}");
            ip(&[
                "link", "add", "eth0", "netns", &node.name, "type", "veth", "peer", "name", &peer,
                "netns", &self.hub,
            ])?;
            ip(&["-n", &self.hub, "link", "set", &peer, "master", "br0", "up"])?;
            ip(&["-n", &node.name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{}/24", node.ip4),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{}/64", node.ip6),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &node.name, "link", "set", "eth0", "up"])?;
            fs::create_dir_all(&node.cgroup)
                .with_context(|| format!("creating cgroup {}", node.cgroup.display()))?;
            fs::create_dir_all(node.hosts.parent().expect("has parent"))?;
            fs::write(
                &node.hosts,
                "127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
            )?;
        }
        Ok(())
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Add `name` to every node's /etc/hosts.
    pub fn add_host(&self, name: &str, addr: IpAddr) -> anyhow::Result<()> {
        for n in &self.nodes {
            let mut f = fs::OpenOptions::new().append(true).open(&n.hosts)?;
            writeln!(f, "{addr} {name}")?;
        }
        Ok(())
    }

    /// A pod on node `i`: a network namespace of its own (only `lo`, with
    /// 10.99.`i`.1/32 added: reachable from nowhere else)
    /// inside the node's cgroup, as every pod's processes are. Commands run
    /// in it through the returned [`Node`].
    pub fn pod(&mut self, i: usize) -> anyhow::Result<Node> {
        let node = self.node(i).clone();
        let name = format!("{}-pod", node.name);
        self.pods.push(name.clone());
        ip(&["netns", "add", &name])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        // On `lo` (this kernel has no dummy links): still not a loopback
        // address, so a connect to it is one the programs would steer.
        let ip4 = Ipv4Addr::new(10, 99, i as u8, 1);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip4}/32"),
            "dev",
            "lo",
        ])?;
        Ok(Node { name, ip4, ..node })
    }

    pub fn cleanup(&mut self) {
        for pod in self.pods.drain(..) {
            let _ = quiet_ip(&["netns", "del", &pod]);
        }
        for node in &self.nodes {
            remove_node(&node.name, &node.cgroup);
        }
        self.nodes.clear();
        let _ = quiet_ip(&["netns", "del", &self.hub]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Node {
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// A command that runs inside this node: its network namespace, its
    /// cgroup, and its /etc/hosts. /sys stays the host's (unlike `ip netns
    /// exec`), so an agent started this way sees the real cgroup tree and bpffs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        self.command_at(program, None, &[])
    }

    /// [`Node::command`] with `mounts` made, in order, in the command's
    /// private mount namespace: they go away with it, and the host never sees them.
    pub fn command_with(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        mounts: &[Mount],
    ) -> anyhow::Result<Command> {
        self.command_at(program, None, mounts)
    }

    /// [`Node::command`] in a new mount namespace made from the one `mnt_ns`
    /// names (`/proc/PID/ns/mnt`) instead of ours, as a container runtime
    /// makes a container's: what propagates between the two is what that
    /// namespace's mounts say (a shared /sys/fs/bpf there is a hostPath with
    /// `mountPropagation: Bidirectional`). With `None`, ours, everything made
    /// a slave so nothing mounted in the node reaches us.
    pub fn command_from(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        mnt_ns: Option<&Path>,
    ) -> anyhow::Result<Command> {
        self.command_at(program, mnt_ns, &[])
    }

    fn command_at(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        mnt_ns: Option<&Path>,
        mounts: &[Mount],
    ) -> anyhow::Result<Command> {
        let netns = fs::File::open(Path::new(NETNS_DIR).join(&self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        let mnt_ns = mnt_ns
            .map(|p| fs::File::open(p).with_context(|| format!("opening {}", p.display())))
            .transpose()?;
        let procs = CString::new(
            self.cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes());
        let mut all = vec![RawMount {
            source: c(&self.hosts)?,
            target: CString::new("/etc/hosts")?,
            fstype: None,
            flags: libc::MS_BIND,
            data: None,
        }];
        for m in mounts {
            all.push(match m {
                Mount::Bind { src, dst } => RawMount {
                    source: c(src)?,
                    target: c(dst)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                Mount::Overlay { dir, upper, work } => RawMount {
                    source: CString::new("overlay")?,
                    target: c(dir)?,
                    fstype: Some(CString::new("overlay")?),
                    flags: 0,
                    data: Some(CString::new(format!(
                        "lowerdir={},upperdir={},workdir={}",
                        dir.display(),
                        upper.display(),
                        work.display()
                    ))?),
                },
            });
        }
        let root = CString::new("/")?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe syscalls on data prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                let entered = match &mnt_ns {
                    Some(ns) => libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) == 0,
                    None => true,
                };
                if !entered
                    || libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                    || libc::unshare(libc::CLONE_NEWNS) != 0
                    || (mnt_ns.is_none()
                        && libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_SLAVE | libc::MS_REC,
                            std::ptr::null(),
                        ) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                for m in &all {
                    let opt =
                        |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
                    if libc::mount(
                        m.source.as_ptr(),
                        m.target.as_ptr(),
                        opt(&m.fstype),
                        m.flags,
                        opt(&m.data).cast(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Start `cmd` (from [`Node::command`]) with stdout and stderr going to `log`.
    pub fn spawn(&self, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {}", self.name))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Run a closure with this thread inside the node's network namespace
    /// (on a fresh thread: setns is per thread, and ours stays where it is).
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let netns = fs::File::open(Path::new(NETNS_DIR).join(&self.name))?;
        std::thread::spawn(move || {
            // SAFETY: plain syscall on an open fd.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::Error::from(std::io::Error::last_os_error()).context("setns"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// `GET path` over plain HTTP/1.0 from inside the node; returns (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let path = path.to_string();
        self.in_netns(move || -> anyhow::Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP head")?;
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status code")?;
            Ok((code, body.to_string()))
        })?
    }

    /// Shape this node's link both ways (token bucket at `mbit` Mbit/s).
    pub fn shape(&self, hub: &str, mbit: u32) -> anyhow::Result<()> {
        let rate = format!("{mbit}mbit");
        for (ns, dev) in [
            (self.name.as_str(), "eth0".to_string()),
            (hub, format!("n{}", self.index)),
        ] {
            ip_cmd(
                "tc",
                &[
                    "-n", ns, "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", &rate,
                    "burst", "256kb", "latency", "50ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Bytes this node has sent and received on its link (from the veth counters).
    pub fn link_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let read = |what: &str| -> anyhow::Result<u64> {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.name, "cat"])
                .arg(format!("/sys/class/net/eth0/statistics/{what}"))
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
        };
        Ok((read("tx_bytes")?, read("rx_bytes")?))
    }
}

/// A mount for [`Node::command_with`].
#[derive(Clone, Debug)]
pub enum Mount {
    /// `src` bound over `dst`, which must exist.
    Bind { src: PathBuf, dst: PathBuf },
    /// An overlay over the directory `dir`: the process sees what is there,
    /// and what it writes there lands in `upper` instead (`work` is
    /// overlayfs's scratch dir, on the same filesystem as `upper`).
    Overlay {
        dir: PathBuf,
        upper: PathBuf,
        work: PathBuf,
    },
}

impl Mount {
    /// [`Mount::Overlay`] over `dir`, its upper and work dirs made under
    /// `scratch`: the process's writes to `dir` (or anything it creates
    /// below) stay in the test's dir.
    pub fn overlay(dir: impl Into<PathBuf>, scratch: &Path) -> anyhow::Result<Self> {
        let dir: PathBuf = dir.into();
        ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        let name = dir.to_string_lossy().trim_matches('/').replace('/', "_");
        let base = scratch.join("overlays").join(name);
        let (upper, work) = (base.join("upper"), base.join("work"));
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        Ok(Self::Overlay { dir, upper, work })
    }
}

/// A [`Mount`] as mount(2) takes it, built before fork.
struct RawMount {
    source: CString,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
    data: Option<CString>,
}

/// A process started in a node. Killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// A child started elsewhere, writing to `log`.
    pub fn new(child: Child, log: PathBuf) -> Self {
        Proc {
            child: Some(child),
            log,
        }
    }

    /// Not started yet: a placeholder whose log may not exist.
    pub fn none(log: PathBuf) -> Self {
        Proc { child: None, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain syscall.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap: when this returns the process and its fds are gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait up to `limit` for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("already reaped")?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("process {} did not exit within {limit:?}", c.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fail with a message naming what is missing, never skip.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the testbed needs root (network namespaces, cgroups, eBPF)"
    );
    for tool in ["ip", "tc"] {
        ensure!(
            Command::new(tool).arg("-V").output().is_ok(),
            "the testbed needs `{tool}` (apt-get install iproute2; `cargo xtask setup` does it)"
        );
    }
    cgroup2_root()?;
    ensure_bpffs()
}

/// The nodes' agents pin under /sys/fs/bpf, where the tests and bpftool look
/// for them. Each agent runs in a mount namespace of its own (a slave of
/// ours), so a bpffs it mounted there would stay invisible to us: mount it
/// here first, as systemd does at boot on most distributions and as
/// `cargo xtask setup` does on the host. The agent's own mounting is tested
/// on its own (tests/bpffs.rs).
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = fs::read_to_string("/proc/self/mounts")?.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if !mounted {
        let bpf = CString::new("bpf")?;
        let dir = CString::new("/sys/fs/bpf")?;
        // SAFETY: NUL-terminated strings; no data argument.
        if unsafe {
            libc::mount(
                bpf.as_ptr(),
                dir.as_ptr(),
                bpf.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("the testbed needs bpffs at /sys/fs/bpf and could not mount it");
        }
        eprintln!("testbed: mounted bpffs at /sys/fs/bpf (it was not mounted)");
    }
    Ok(())
}

pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("the testbed needs a cgroup2 mount (none in /proc/mounts)")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_cmd("ip", args)
}

fn ip_cmd(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet_ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kill everything in a node's cgroup, then remove the cgroup, netns, hosts
/// file and any bpffs pins an agent of that name left (a SIGKILLed agent does).
fn remove_node(name: &str, cgroup: &Path) {
    kill_cgroup(cgroup);
    let _ = quiet_ip(&["netns", "del", name]);
    let _ = fs::remove_dir_all(Path::new(ETC_NETNS).join(name));
    let _ = fs::remove_dir_all(Path::new(BPFFS_ROOT).join(name));
    let _ = fs::remove_dir(BPFFS_ROOT);
}

fn kill_cgroup(cgroup: &Path) {
    // Retry the rmdir itself: a killed task leaves cgroup.procs a moment
    // before the cgroup stops counting it (EBUSY in between), and a zombie
    // stays until its parent reaps it.
    for _ in 0..250 {
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain syscall. Reaping is the parent's business; an
            // orphaned zombie leaves the cgroup once init reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match fs::remove_dir(cgroup) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return,
        }
    }
}

/// The pid of the run that made `name` (`dfly-<pid>-...`), if it has that shape.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Remove what runs that died without cleaning up left: namespaces, cgroups,
/// hosts files, bpffs pins and temp dirs whose owner pid is gone.
pub fn sweep_stale() {
    sweep(is_stale);
}

/// Remove everything run `pid` made. For a run's own SIGINT/SIGTERM handler:
/// the signal arrives while the objects are owned by another thread's stack,
/// so their Drop never runs.
pub fn sweep_run(pid: u32) {
    sweep(|name| owner_pid(name) == Some(pid));
}

fn sweep(selected: impl Fn(&str) -> bool) {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| selected(n))
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Ok(root) = cgroup2_root() {
        for n in names(&root) {
            kill_cgroup(&root.join(n));
        }
    }
    for n in names(Path::new(NETNS_DIR)) {
        let _ = quiet_ip(&["netns", "del", &n]);
    }
    for n in names(Path::new(ETC_NETNS)) {
        let _ = fs::remove_dir_all(Path::new(ETC_NETNS).join(n));
    }
    for n in names(Path::new(BPFFS_ROOT)) {
        let _ = fs::remove_dir_all(Path::new(BPFFS_ROOT).join(n));
    }
    let _ = fs::remove_dir(BPFFS_ROOT);
    for n in names(&std::env::temp_dir()) {
        let _ = fs::remove_dir_all(std::env::temp_dir().join(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("dfly-1234-0-n1"), Some(1234));
        assert_eq!(owner_pid("dfly-1234-0-hub"), Some(1234));
        assert_eq!(owner_pid("dfly-x-0"), None);
        assert_eq!(owner_pid("other-1234"), None);
    }

    #[test]
    fn our_own_objects_are_never_stale() {
        let mine = format!("{PREFIX}{}-9-n1", std::process::id());
        assert!(!is_stale(&mine));
    }
}
