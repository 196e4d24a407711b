//! Builds the kernel programs (`agent-ebpf`) with the nightly toolchain and
//! bpf-linker, so `cargo build` of the agent always embeds a matching object.
//! `cargo xtask setup` installs both.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    // A target dir of its own: the outer cargo holds the lock on the workspace one.
    let target_dir = manifest_dir.join("../target/ebpf");
    for p in ["src", "Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "-p",
        "damselfly-ebpf",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir);
    // Whatever the outer (stable, host) build set must not leak into the BPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    // BTF for the maps (bpftool prints them by field name) and the programs.
    // bpf-linker makes it from full debug info, which every crate in the
    // object needs: aya-ebpf's memcpy without it gets a FUNC with a dangling
    // type and the kernel rejects the whole BTF.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().context(
        "running `rustup run nightly cargo build` for agent-ebpf (run `cargo xtask setup` first)",
    )?;
    if !status.success() {
        bail!(
            "building the kernel programs failed; they need the nightly toolchain with rust-src \
             and bpf-linker (`cargo xtask setup` installs both)"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/damselfly-ebpf");
    println!("cargo:rustc-env=DAMSELFLY_EBPF_OBJECT={}", object.display());
    Ok(())
}
