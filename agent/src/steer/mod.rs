//! Loads the kernel programs, fills their maps from [`Rules`], pins the maps
//! and attaches the programs to a cgroup.
//!
//! The links stay owned by this process (aya cannot pin cgroup links, and we
//! would not want to): when the agent exits for any reason the kernel drops
//! them and stops steering at once. That is the fail-open guarantee.

mod klog;
pub mod mounts;
mod rules;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use damselfly_common::{AF_INET, AF_INET6, Config, Counters, OrigDst, SockKey, maps, programs};
use serde::{Deserialize, Serialize};

pub use rules::Rules;

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("DAMSELFLY_EBPF_OBJECT"));

/// Root of all agents' pins; each instance owns one directory below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/damselfly";

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpffs at /sys/fs/bpf: {0}")]
    Bpffs(std::io::Error),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to {hook}: {source}{}", exclusive_hint(source))]
    Attach {
        name: &'static str,
        hook: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning map {name}: {source}")]
    Pin {
        name: &'static str,
        source: aya::pin::PinError,
    },
    #[error("the kernel object has no {0}")]
    Missing(&'static str),
    #[error("the agent's probe socket: {0}")]
    Probe(std::io::Error),
    #[error("reading the kernel programs' log: {0}")]
    KernelLog(String),
}

/// A steered connection as the kernel saw it being made.
#[derive(Debug, Clone)]
pub struct Original {
    /// Where the client was connecting.
    pub dest: SocketAddr,
    pub client: Client,
}

/// The process that made a steered connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    /// Thread-group id in the initial pid namespace.
    pub tgid: u32,
    /// The connecting thread's name (`comm`), as the steer list matched it.
    pub comm: String,
}

impl Client {
    fn from_kernel(tgid: u32, comm: &[u8]) -> Self {
        let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        Self {
            tgid,
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        }
    }
}

/// Where steered connects are sent: the agent's own listeners. A family
/// without a listener is not steered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listeners {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedProgram {
    pub name: String,
    pub id: u32,
    pub hook: String,
}

use crate::vocab::PortCounters;

/// The loaded, attached steering programs of one agent instance.
pub struct Steering {
    /// Owns the programs and their links; dropping it detaches everything.
    ebpf: Mutex<Option<Ebpf>>,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub rules: Rules,
    pub attached: Vec<AttachedProgram>,
    orig_by_addr: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    counters: PerCpuArray<MapData, Counters>,
    /// Forwards the programs' aya-log records while the log shows `damselfly::kernel` at debug.
    log_reader: Option<tokio::task::JoinHandle<()>>,
    /// This process as the kernel counts tgids (`u32::MAX`: unknown).
    agent_tgid: u32,
}

impl Steering {
    /// Load, configure, pin and attach. Stale pins of the same instance (an
    /// agent that was killed) are replaced.
    pub fn start(
        instance: &str,
        cgroup: &Path,
        rules: Rules,
        listeners: Listeners,
    ) -> Result<Self, SteerError> {
        match mounts::ensure_bpffs().map_err(SteerError::Bpffs)? {
            mounts::Bpffs::Present => {}
            mounts::Bpffs::Mounted(here) if here.foreign_ns() && !here.propagates => {
                tracing::warn!("{}", here.explain())
            }
            mounts::Bpffs::Mounted(here) => tracing::info!("{}", here.explain()),
        }
        let pin_dir = Path::new(BPFFS_ROOT).join(instance);
        remove_pins(&pin_dir).map_err(|source| SteerError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        fs::create_dir_all(&pin_dir).map_err(|source| SteerError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        // A start that fails from here on leaves no pins behind.
        let pins = PinsUntilStarted(&pin_dir);
        let cgroup_dir = fs::File::open(cgroup).map_err(|source| SteerError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;

        let kernel_log = tracing::enabled!(target: klog::TARGET, tracing::Level::DEBUG);
        let level = if kernel_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)?;
        let probe = Probe::new().map_err(SteerError::Probe)?;
        configure(&mut ebpf, &rules, listeners, &probe)?;
        // Logging off still creates the ring buffer; nobody needs to read it.
        let log_reader = if kernel_log {
            Some(klog::spawn_reader(&mut ebpf)?)
        } else {
            None
        };
        for name in maps::ALL {
            let map = ebpf.map(name).ok_or(SteerError::Missing(name))?;
            map.pin(pin_dir.join(name.to_ascii_lowercase()))
                .map_err(|source| SteerError::Pin { name, source })?;
        }

        let mut attached = Vec::new();
        // sock_ops first: a connect steered before it is attached could not be
        // looked up by the agent.
        {
            let name = programs::SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            let hook = "sock_ops";
            let prog_err = |source| SteerError::Program { name, source };
            prog.load().map_err(prog_err)?;
            prog.attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| SteerError::Attach { name, hook, source })?;
            let id = prog.info().map_err(prog_err)?.id();
            attached.push(AttachedProgram {
                name: name.into(),
                id,
                hook: hook.into(),
            });
        }
        for (name, hook) in [
            (programs::GETPEERNAME4, "cgroup/getpeername4"),
            (programs::GETPEERNAME6, "cgroup/getpeername6"),
            (programs::CONNECT4, "cgroup/connect4"),
            (programs::CONNECT6, "cgroup/connect6"),
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let prog_err = |source| SteerError::Program { name, source };
            prog.load().map_err(prog_err)?;
            prog.attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| SteerError::Attach { name, hook, source })?;
            let id = prog.info().map_err(prog_err)?.id();
            attached.push(AttachedProgram {
                name: name.into(),
                id,
                hook: hook.into(),
            });
        }

        // Nothing is steered until the kernel knows who the agent is.
        let agent_tgid = identify_agent(&mut ebpf, &probe, rules.ports[0])?;
        let orig_by_addr = take_map(&mut ebpf, maps::ORIG_BY_ADDR, HashMap::try_from)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS, PerCpuArray::try_from)?;
        std::mem::forget(pins);
        Ok(Self {
            ebpf: Mutex::new(Some(ebpf)),
            cgroup: cgroup.to_path_buf(),
            pin_dir,
            rules,
            attached,
            orig_by_addr: Mutex::new(orig_by_addr),
            counters,
            log_reader,
            agent_tgid,
        })
    }

    /// The destination a steered connection was headed for, found by the
    /// client's endpoint (our accepted socket's peer). The entry is consumed:
    /// a later unrelated connection from a reused port must not match it.
    pub fn take_original(&self, client: SocketAddr) -> Option<Original> {
        let key = sock_key(client);
        let mut map = self.orig_by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(Original {
            dest: orig_to_socket_addr(&orig)?,
            client: Client::from_kernel(orig.tgid, &orig.comm),
        })
    }

    /// Whether the tgids the kernel reports name entries of our `/proc`:
    /// only if we live in the initial pid namespace (`hostPID`).
    pub fn sees_global_pids(&self) -> bool {
        self.agent_tgid == std::process::id()
    }

    /// Connect counters per steered port, summed over CPUs.
    pub fn counters(&self) -> Vec<PortCounters> {
        self.rules
            .ports
            .iter()
            .enumerate()
            .map(|(slot, &port)| {
                let mut total = PortCounters {
                    port,
                    ..Default::default()
                };
                if let Ok(values) = self.counters.get(&(slot as u32), 0) {
                    for c in values.iter() {
                        total.steered += c.steered;
                        total.passed += c.passed;
                    }
                }
                total
            })
            .collect()
    }

    /// Detach (by dropping the links) and remove this instance's pins.
    pub fn shutdown(&self) -> std::io::Result<()> {
        drop(self.ebpf.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(reader) = &self.log_reader {
            reader.abort();
        }
        remove_pins(&self.pin_dir)?;
        // The shared root goes too once the last instance is gone.
        let _ = fs::remove_dir(BPFFS_ROOT);
        Ok(())
    }
}

/// A socket only the agent holds. Its cookie goes into the config; its one
/// connect tells the kernel the agent's tgid as the kernel counts them, which
/// the agent cannot know itself in a container without `hostPID`.
struct Probe {
    fd: std::os::fd::OwnedFd,
    cookie: u64,
    /// The agent's network namespace: only connects from it are steered.
    netns_cookie: u64,
}

impl Probe {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the fd is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let cookie = sockopt_u64(&fd, libc::SO_COOKIE)?;
        // SO_NETNS_COOKIE is Linux 5.14+; without it every namespace is steered, as before.
        let netns_cookie = sockopt_u64(&fd, 71).unwrap_or(0);
        Ok(Self {
            fd,
            cookie,
            netns_cookie,
        })
    }
}

fn sockopt_u64(fd: &std::os::fd::OwnedFd, opt: libc::c_int) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 out-parameter with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The probe's connect (to a steered port on loopback: refused or not, the
/// hook has run) lets the kernel record the agent's tgid in the config. If it
/// did not, the agent is outside the cgroup it steers and the programs never
/// see its connects: no tgid has to be excluded.
fn identify_agent(ebpf: &mut Ebpf, probe: &Probe, port: u16) -> Result<u32, SteerError> {
    use std::os::fd::AsRawFd;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in and its length; non-blocking, so this returns at once.
    unsafe {
        libc::connect(
            probe.fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let name = maps::CONFIG;
    let map_err = |source| SteerError::Map { name, source };
    let mut cfg: Array<_, Config> =
        Array::try_from(ebpf.map_mut(name).ok_or(SteerError::Missing(name))?).map_err(map_err)?;
    let mut config = cfg.get(&0, 0).map_err(map_err)?;
    if config.agent_tgid == 0 {
        tracing::info!(
            "the agent is outside the cgroup it steers: its own connects are never seen"
        );
        config.agent_tgid = u32::MAX;
        cfg.set(0, config, 0).map_err(map_err)?;
    } else {
        tracing::debug!(tgid = config.agent_tgid, "the kernel knows the agent");
    }
    Ok(config.agent_tgid)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, SteerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(SteerError::Missing(name))?;
    prog.try_into()
        .map_err(|source| SteerError::Program { name, source })
}

/// A BPF link shares its hook with every program attached with
/// BPF_F_ALLOW_MULTI (Cilium's, systemd's) and runs after those attached
/// before it; the kernel refuses it (EPERM) only where a program was attached
/// without that flag, claiming the hook for itself.
fn exclusive_hint(source: &aya::programs::ProgramError) -> &'static str {
    use aya::programs::ProgramError;
    match source {
        ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EPERM) => {
            "; another program holds this hook of the cgroup exclusively (attached without \
             BPF_F_ALLOW_MULTI): `bpftool cgroup show CGROUP` names it. Damselfly shares \
             hooks only with programs attached as multi (or as links)"
        }
        _ => "",
    }
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, SteerError> {
    let map = ebpf.take_map(name).ok_or(SteerError::Missing(name))?;
    convert(map).map_err(|source| SteerError::Map { name, source })
}

fn configure(
    ebpf: &mut Ebpf,
    rules: &Rules,
    listeners: Listeners,
    probe: &Probe,
) -> Result<(), SteerError> {
    fn map_mut<'a>(
        ebpf: &'a mut Ebpf,
        name: &'static str,
    ) -> Result<&'a mut aya::maps::Map, SteerError> {
        ebpf.map_mut(name).ok_or(SteerError::Missing(name))
    }
    let map_err = |name: &'static str| move |source| SteerError::Map { name, source };

    let mut config = Config {
        // Set by the kernel from the probe's connect (see `Probe`).
        agent_tgid: 0,
        probe_cookie: probe.cookie,
        netns_cookie: probe.netns_cookie,
        ..Default::default()
    };
    if let Some(SocketAddr::V4(a)) = listeners.v4 {
        config.listen4_addr = u32::from_ne_bytes(a.ip().octets());
        config.listen4_port = a.port();
    }
    if let Some(SocketAddr::V6(a)) = listeners.v6 {
        config.listen6_addr = ip6_words(a.ip());
        config.listen6_port = a.port();
    }
    let mut cfg: Array<_, Config> =
        Array::try_from(map_mut(ebpf, maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
    cfg.set(0, config, 0).map_err(map_err(maps::CONFIG))?;

    let mut ports: HashMap<_, u16, u32> =
        HashMap::try_from(map_mut(ebpf, maps::PORTS)?).map_err(map_err(maps::PORTS))?;
    for (slot, port) in rules.ports.iter().enumerate() {
        ports
            .insert(port, slot as u32, 0)
            .map_err(map_err(maps::PORTS))?;
    }

    let mut comms: HashMap<_, [u8; 16], u8> =
        HashMap::try_from(map_mut(ebpf, maps::COMMS)?).map_err(map_err(maps::COMMS))?;
    for key in rules.comm_keys() {
        comms.insert(key, 1, 0).map_err(map_err(maps::COMMS))?;
    }

    let mut ex4: LpmTrie<_, [u8; 4], u8> =
        LpmTrie::try_from(map_mut(ebpf, maps::EXCLUDE4)?).map_err(map_err(maps::EXCLUDE4))?;
    for (len, addr) in rules.exclude4() {
        ex4.insert(&Key::new(len, addr), 1, 0)
            .map_err(map_err(maps::EXCLUDE4))?;
    }
    let mut ex6: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(map_mut(ebpf, maps::EXCLUDE6)?).map_err(map_err(maps::EXCLUDE6))?;
    for (len, addr) in rules.exclude6() {
        ex6.insert(&Key::new(len, addr), 1, 0)
            .map_err(map_err(maps::EXCLUDE6))?;
    }
    Ok(())
}

/// Removes the pins on drop, unless forgotten once the agent has started.
struct PinsUntilStarted<'a>(&'a Path);

impl Drop for PinsUntilStarted<'_> {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(self.0) {
            tracing::warn!(dir = %self.0.display(), "removing the pins of a failed start: {e}");
        }
    }
}

/// Remove the pins in `dir` and `dir` itself; nothing to do if it is absent.
/// Also `damselfly cleanup`'s, for the pins a SIGKILLed agent left.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                fs::remove_file(entry?.path())?;
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// IPv6 address as four words holding the network-order bytes, as in
/// `struct bpf_sock_addr.user_ip6`.
fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn words_ip6(w: &[u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

pub fn sock_key(addr: SocketAddr) -> SockKey {
    match addr.ip() {
        IpAddr::V4(ip) => SockKey {
            family: AF_INET,
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port: addr.port(),
            _pad: 0,
        },
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            // A v4 client accepted on a dual-stack socket: the kernel keyed it as AF_INET.
            Some(v4) => sock_key(SocketAddr::new(IpAddr::V4(v4), addr.port())),
            None => SockKey {
                family: AF_INET6,
                addr: ip6_words(&ip),
                port: addr.port(),
                _pad: 0,
            },
        },
    }
}

pub fn orig_to_socket_addr(orig: &OrigDst) -> Option<SocketAddr> {
    let ip = match orig.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(orig.addr[0].to_ne_bytes())),
        AF_INET6 => IpAddr::V6(words_ip6(&orig.addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, orig.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_matches_kernel_layout() {
        let k = sock_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.family, AF_INET);
        // Network order in memory: first byte 127.
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 40000);
    }

    #[test]
    fn mapped_v4_is_keyed_as_v4() {
        let a = sock_key("[::ffff:127.0.0.1]:5".parse().unwrap());
        let b = sock_key("127.0.0.1:5".parse().unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn orig_round_trips_both_families() {
        for s in ["10.1.2.3:443", "[fd00::1:2]:80"] {
            let addr: SocketAddr = s.parse().unwrap();
            let k = sock_key(addr);
            let orig = OrigDst {
                family: k.family,
                addr: k.addr,
                port: k.port,
                ..OrigDst::default()
            };
            assert_eq!(orig_to_socket_addr(&orig), Some(addr));
        }
    }
}
