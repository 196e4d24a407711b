//! Steering programs. One function per hook; all policy lives in maps that the
//! agent fills, so these stay small enough to read against the verifier log.
//!
//! Flow: `connect4/6` rewrites an allowed connect to the agent's listener and
//! records the original destination under the socket cookie; `sock_ops` copies
//! that record to a key the agent can compute on accept (the client's local
//! address and port); `getpeername4/6` shows the client its original peer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod kernel;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("damselfly-ebpf is a BPF object: build it for bpfel-unknown-none");
}
