//! Types shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Every struct here is `#[repr(C)]` and crosses the user/kernel boundary
//! through a BPF map, so field order and padding are part of the ABI: change
//! both sides together.
#![no_std]

/// Map names; the agent pins each map under `/sys/fs/bpf/damselfly/<instance>/<name>`.
/// Kept at or below 15 bytes so `bpftool map show` prints them whole.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const PORTS: &str = "PORTS";
    pub const COMMS: &str = "COMMS";
    pub const EXCLUDE4: &str = "EXCLUDE4";
    pub const EXCLUDE6: &str = "EXCLUDE6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_ADDR: &str = "ORIG_BY_ADDR";
    pub const ALL: [&str; 8] = [
        CONFIG,
        PORTS,
        COMMS,
        EXCLUDE4,
        EXCLUDE6,
        COUNTERS,
        ORIG_BY_COOKIE,
        ORIG_BY_ADDR,
    ];
}

/// Program names (the ELF symbols), at most 15 bytes so `bpftool prog show` prints them whole.
pub mod programs {
    pub const CONNECT4: &str = "damselfly_conn4";
    pub const CONNECT6: &str = "damselfly_conn6";
    pub const GETPEERNAME4: &str = "damselfly_peer4";
    pub const GETPEERNAME6: &str = "damselfly_peer6";
    pub const SOCK_OPS: &str = "damselfly_sops";
}

/// Most ports in the steering set; one counter slot each.
pub const MAX_PORTS: u32 = 16;
/// Most process names in the allow-list.
pub const MAX_COMMS: u32 = 64;
/// Linux `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// The agent's view of itself, written once at start into `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Thread-group id of the agent as the kernel sees it (in the initial pid
    /// namespace): its sockets are never steered. 0 until the kernel has
    /// recorded it from the agent's probe connect; nothing is steered until then.
    pub agent_tgid: u32,
    /// Steering listener for IPv4 clients, address in network byte order.
    pub listen4_addr: u32,
    /// Steering listener for IPv6 clients, address words in network byte order.
    pub listen6_addr: [u32; 4],
    /// Listener ports in host byte order; 0 means "no listener of that family: don't steer".
    pub listen4_port: u16,
    pub listen6_port: u16,
    pub _pad: u32,
    /// Cookie of the agent's probe socket: a connect from it tells the kernel
    /// the agent's tgid (the agent may live in a pid namespace of its own and
    /// not know its global tgid). Only the agent holds that socket.
    pub probe_cookie: u64,
    /// Network namespace of the agent's listeners (`SO_NETNS_COOKIE`): only
    /// connects from that namespace are steered, as only they can reach a
    /// loopback listener there. 0: unknown (kernel < 5.14), don't check.
    pub netns_cookie: u64,
}

/// Where a steered connection was going. Addresses are in network byte order
/// (as in `struct bpf_sock_addr`); `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub family: u32,
    /// IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// A TCP endpoint, as the accepting agent sees its peer: the client's local
/// address and port. Same byte orders as [`OrigDst`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: u32,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Per-port connect counters (a per-CPU array slot; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connects rewritten to the agent.
    pub steered: u64,
    /// Connects to a port in the set left alone: process not allowed, destination
    /// excluded or loopback, or no listener of that family. The agent's own
    /// connects are in neither count.
    pub passed: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays with explicit padding fields.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Counters {}
}
