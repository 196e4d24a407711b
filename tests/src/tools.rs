//! Outside programs the harness runs: find them (or fail naming the Debian
//! package that has them) and give them a clean environment.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, bail};

use crate::testbed::{Mount, Node};

/// The path of `bin` in `$PATH`, or an error naming the package to install.
/// A missing tool fails the test; it never skips it.
pub fn need(bin: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| is_executable(p))
        .with_context(|| {
            format!(
                "the testbed needs `{bin}` (apt-get install {package}; `cargo xtask setup` does it)"
            )
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `skopeo` inside `node`, its scratch files under `scratch`: containers/image
/// keeps root's blob info cache in /var/lib/containers/cache, so an overlay
/// over /var/lib keeps it off the host, and TMPDIR its layer copies.
pub fn skopeo(node: &Node, scratch: &Path) -> anyhow::Result<Command> {
    let bin = need("skopeo", "skopeo")?;
    std::fs::create_dir_all(scratch)?;
    let mut cmd = node.command_with(bin, &[Mount::overlay("/var/lib", scratch)?])?;
    cmd.env("TMPDIR", scratch);
    Ok(cmd)
}

/// Trust exactly `bundle` (Go reads SSL_CERT_FILE and SSL_CERT_DIR; the
/// machine may set both for every process), and never go through a proxy:
/// a node can only reach addresses inside the testbed.
pub fn isolate_env(cmd: &mut Command, bundle: &Path, empty_dir: &Path) {
    cmd.env("SSL_CERT_FILE", bundle)
        .env("SSL_CERT_DIR", empty_dir);
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
}

/// Run to completion; an error carries the command line and its output.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Detach every mount at or under `dir` in this mount namespace, deepest
/// first, so removing `dir` cannot reach into a mounted filesystem.
pub fn unmount_under(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: plain syscall on a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let e = need("dfly-no-such-tool", "dfly-some-package").unwrap_err();
        assert!(
            e.to_string().contains("apt-get install dfly-some-package"),
            "{e}"
        );
        assert!(need("sh", "dash").is_ok());
    }
}
