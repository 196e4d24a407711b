use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use damselfly_common::{
    AF_INET, AF_INET6, COMM_LEN, Config, Counters, MAX_COMMS, MAX_PORTS, OrigDst, SockKey,
};

/// Return value that lets the syscall go on (cgroup sock_addr programs).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Live steered connections we can track at once, per node.
const MAX_CONNS: usize = 65536;

// BTF-defined maps: bpftool prints their keys and values by field name.
#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();
/// Destination port (host order) -> counter slot.
#[btf_map]
static PORTS: HashMap<u16, u32, { MAX_PORTS as usize }> = HashMap::new();
/// Allowed process names (`comm`, NUL padded).
#[btf_map]
static COMMS: HashMap<[u8; COMM_LEN], u8, { MAX_COMMS as usize }> = HashMap::new();
#[btf_map]
static EXCLUDE4: LpmTrie<[u8; 4], u8, 256> = LpmTrie::new();
#[btf_map]
static EXCLUDE6: LpmTrie<[u8; 16], u8, 256> = LpmTrie::new();
#[btf_map]
static COUNTERS: PerCpuArray<Counters, { MAX_PORTS as usize }> = PerCpuArray::new();
/// Socket cookie -> original destination; lives as long as the client may call getpeername.
#[btf_map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst, MAX_CONNS> = LruHashMap::new();
/// Client's local endpoint -> original destination; what the agent looks up on accept.
#[btf_map]
static ORIG_BY_ADDR: LruHashMap<SockKey, OrigDst, MAX_CONNS> = LruHashMap::new();

/// Why a connect to a steered port was left alone (counted as passed).
#[derive(Clone, Copy)]
enum Pass {
    /// A process in another network namespace (a pod's): our loopback
    /// listener is not there for it to reach.
    OtherNetns,
    Loopback,
    Excluded,
    NoListener,
    Process,
    TableFull,
}

impl Pass {
    #[inline(always)]
    fn reason(self) -> &'static str {
        match self {
            Pass::OtherNetns => "another network namespace",
            Pass::Loopback => "loopback",
            Pass::Excluded => "excluded destination",
            Pass::NoListener => "no listener of this family",
            Pass::Process => "process not in the steer list",
            Pass::TableFull => "connection table full",
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn damselfly_conn4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((cfg, slot)) = steerable(&ctx, sa) else {
        return ALLOW;
    };
    let dst = sa.user_ip4;
    let port = port_of(sa);
    let first = dst.to_ne_bytes();
    let orig = OrigDst {
        family: AF_INET,
        addr: [dst, 0, 0, 0],
        port,
        ..OrigDst::default()
    };
    // Cheapest checks first: most connects to a steered port that are not
    // steered are from processes not in the list.
    let decision = if first[0] == 127 {
        Err(Pass::Loopback)
    } else if EXCLUDE4.get(&Key::new(32, first)).is_some() {
        Err(Pass::Excluded)
    } else if cfg.listen4_port == 0 {
        Err(Pass::NoListener)
    } else {
        take(&ctx, cfg, orig)
    };
    match decision {
        Ok(()) => {
            sa.user_ip4 = cfg.listen4_addr;
            sa.user_port = u32::from(cfg.listen4_port.to_be());
            count(slot, true);
            log4(&ctx, None, dst, port);
        }
        Err(why) => {
            count(slot, false);
            log4(&ctx, Some(why), dst, port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn damselfly_conn6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((cfg, slot)) = steerable(&ctx, sa) else {
        return ALLOW;
    };
    let dst = read_ip6(sa);
    let port = port_of(sa);
    let orig = OrigDst {
        family: AF_INET6,
        addr: dst,
        port,
        ..OrigDst::default()
    };
    // An IPv4-mapped destination (::ffff:a.b.c.d) is an IPv4 one: the IPv4
    // loopback and exclusions apply to it.
    let mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == 0xffffu32.to_be();
    let v4 = dst[3].to_ne_bytes();
    let decision = if is_loopback6(&dst) || (mapped && v4[0] == 127) {
        Err(Pass::Loopback)
    } else if EXCLUDE6.get(&Key::new(128, words_to_bytes(&dst))).is_some()
        || (mapped && EXCLUDE4.get(&Key::new(32, v4)).is_some())
    {
        Err(Pass::Excluded)
    } else if cfg.listen6_port == 0 {
        Err(Pass::NoListener)
    } else {
        take(&ctx, cfg, orig)
    };
    match decision {
        Ok(()) => {
            write_ip6(sa, &cfg.listen6_addr);
            sa.user_port = u32::from(cfg.listen6_port.to_be());
            count(slot, true);
            log6(&ctx, None, &dst, port);
        }
        Err(why) => {
            count(slot, false);
            log6(&ctx, Some(why), &dst, port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn damselfly_peer4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original_of(&ctx) {
        if orig.family == AF_INET {
            sa.user_ip4 = orig.addr[0];
            sa.user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn damselfly_peer6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original_of(&ctx) {
        if orig.family == AF_INET6 {
            write_ip6(sa, &orig.addr);
            sa.user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

/// On the SYN of a steered connect, re-key its original destination by the
/// client's local endpoint, which is the peer address the agent sees on accept.
#[sock_ops]
pub fn damselfly_sops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 0;
    }
    let Some(orig) = original_of(&ctx) else {
        return 0;
    };
    // Every context field is read unconditionally and once, at a constant
    // offset: the verifier rejects a ctx pointer the compiler offsets on a branch.
    let ops = ctx.ops;
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).local_ip6),
            read_volatile(&raw const (*ops).local_port),
        )
    };
    let addr = match family {
        AF_INET => [ip4, 0, 0, 0],
        AF_INET6 => ip6,
        _ => return 0,
    };
    let key = SockKey {
        family,
        addr,
        // bpf_sock_ops.local_port is already in host byte order.
        port: port as u16,
        _pad: 0,
    };
    let _ = ORIG_BY_ADDR.insert(key, orig, u64::from(BPF_ANY));
    0
}

/// A TCP connect to a port in the set, from anyone but the agent: the config
/// and the port's counter slot. `None` means "not ours, don't count".
#[inline(always)]
fn steerable(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<(&'static Config, u32)> {
    if sa.type_ != SOCK_STREAM || (sa.protocol != 0 && sa.protocol != IPPROTO_TCP) {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The agent's own connects (to the origins it splices to) are not client
    // connects: neither steered nor counted.
    if tgid == cfg.agent_tgid {
        return None;
    }
    let slot = *unsafe { PORTS.get(port_of(sa)) }?;
    if cfg.agent_tgid == 0 {
        // Not started yet: the agent's probe connect names its tgid (the
        // global one, which the agent cannot know inside a pid namespace).
        // Until then nothing is steered: the agent's own connects must never be.
        if cfg.probe_cookie != 0
            && unsafe { bpf_get_socket_cookie(ctx.as_ptr()) } == cfg.probe_cookie
            && let Some(c) = CONFIG.get_ptr_mut(0)
        {
            unsafe { (*c).agent_tgid = tgid };
        }
        return None;
    }
    Some((cfg, slot))
}

#[inline(always)]
fn same_netns(ctx: &SockAddrContext, cfg: &Config) -> bool {
    cfg.netns_cookie == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
}

/// `user_ip6` word by word: the kernel only allows 4-byte context accesses
/// there, and a plain array copy may become a byte-wise memcpy.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&sa.user_ip6[0]),
            read_volatile(&sa.user_ip6[1]),
            read_volatile(&sa.user_ip6[2]),
            read_volatile(&sa.user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, w: &[u32; 4]) {
    unsafe {
        write_volatile(&mut sa.user_ip6[0], w[0]);
        write_volatile(&mut sa.user_ip6[1], w[1]);
        write_volatile(&mut sa.user_ip6[2], w[2]);
        write_volatile(&mut sa.user_ip6[3], w[3]);
    }
}

#[inline(always)]
fn port_of(sa: &bpf_sock_addr) -> u16 {
    // user_port holds the port in network byte order in its low 16 bits.
    u16::from_be(sa.user_port as u16)
}

/// The checks that need the process, then the record of the connection
/// (with who made it: the agent asks whether that client trusts its CA).
#[inline(always)]
fn take(ctx: &SockAddrContext, cfg: &Config, mut orig: OrigDst) -> Result<(), Pass> {
    let comm = bpf_get_current_comm().map_err(|_| Pass::Process)?;
    if unsafe { COMMS.get(comm) }.is_none() {
        return Err(Pass::Process);
    }
    if !same_netns(ctx, cfg) {
        return Err(Pass::OtherNetns);
    }
    orig.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    orig.comm = comm;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE
        .insert(cookie, &orig, u64::from(BPF_ANY))
        .map_err(|_| Pass::TableFull)
}

// The steering decision in the agent's log (aya-log, debug level). Logging
// is off unless the agent's log shows debug for `damselfly::kernel`: the
// agent writes the level into .rodata before loading, so with logging off the
// verifier proves `level_enabled` false and drops these calls entirely, comm
// lookup included; connect() costs what it did without them.

#[inline(always)]
fn log4<C: EbpfContext>(ctx: &C, why: Option<Pass>, dst: u32, port: u16) {
    if !level_enabled(Level::Debug) {
        return;
    }
    let (comm, len) = printable_comm();
    let comm = unsafe { core::str::from_utf8_unchecked(&comm[..len]) };
    match why {
        None => debug!(
            ctx,
            "steered: {} (pid {}) to {:i}:{}",
            comm,
            ctx.tgid(),
            u32::from_be(dst),
            port
        ),
        Some(why) => debug!(
            ctx,
            "not steered ({}): {} (pid {}) to {:i}:{}",
            why.reason(),
            comm,
            ctx.tgid(),
            u32::from_be(dst),
            port
        ),
    }
}

#[inline(always)]
fn log6<C: EbpfContext>(ctx: &C, why: Option<Pass>, dst: &[u32; 4], port: u16) {
    if !level_enabled(Level::Debug) {
        return;
    }
    let (comm, len) = printable_comm();
    let comm = unsafe { core::str::from_utf8_unchecked(&comm[..len]) };
    let dst = words_to_bytes(dst);
    match why {
        None => debug!(
            ctx,
            "steered: {} (pid {}) to [{:i}]:{}",
            comm,
            ctx.tgid(),
            dst,
            port
        ),
        Some(why) => debug!(
            ctx,
            "not steered ({}): {} (pid {}) to [{:i}]:{}",
            why.reason(),
            comm,
            ctx.tgid(),
            dst,
            port
        ),
    }
}

/// The task's name up to its NUL, printable ASCII only: a task names itself,
/// and the log's reader wants UTF-8, so anything else becomes `?`.
#[inline(always)]
fn printable_comm() -> ([u8; COMM_LEN], usize) {
    let mut comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    let mut len = COMM_LEN;
    let mut i = 0;
    while i < COMM_LEN {
        let c = comm[i];
        if c == 0 && len == COMM_LEN {
            len = i;
        }
        if !(0x20..0x7f).contains(&c) {
            comm[i] = b'?';
        }
        i += 1;
    }
    (comm, len)
}

#[inline(always)]
fn original_of<C: EbpfContext>(ctx: &C) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIG_BY_COOKIE.get(cookie) }.copied()
}

#[inline(always)]
fn count(slot: u32, steered: bool) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race us.
        let c = unsafe { &mut *c };
        if steered {
            c.steered += 1;
        } else {
            c.passed += 1;
        }
    }
}

#[inline(always)]
fn is_loopback6(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 1u32.to_be()
}

#[inline(always)]
fn words_to_bytes(a: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
