//! What is mounted where: the cgroup2 hierarchy and bpffs.

use std::{ffi::CString, fs, io, path::PathBuf};

/// First `cgroup2` mount point in `/proc/mounts` (`/sys/fs/cgroup` on usual
/// nodes, `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    find_mount(&mounts, "cgroup2").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount in /proc/mounts; pass --cgroup PATH",
        )
    })
}

fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape(dir)))
    })
}

/// /proc/mounts escapes spaces and friends as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where every agent pins its maps, and where `bpftool` and a restarted
/// agent look for them.
pub const BPFFS: &str = "/sys/fs/bpf";

/// What [`ensure_bpffs`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bpffs {
    /// Already mounted (systemd mounts it at boot on most distributions).
    Present,
    /// Not mounted in this mount namespace, so we mounted it.
    Mounted(MountedHere),
}

/// A bpffs we mounted ourselves, and whether anyone outside this mount
/// namespace will see the pins in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedHere {
    /// Our mount namespace (`mnt:[…]`) and PID 1's, as `/proc/*/ns/mnt` name them.
    pub ns: Option<String>,
    pub init_ns: Option<String>,
    /// The new mount is in a shared peer group (`shared:N` in mountinfo):
    /// the host sees it when /sys/fs/bpf is a hostPath with
    /// `mountPropagation: Bidirectional`.
    pub propagates: bool,
}

impl MountedHere {
    /// PID 1 lives in another mount namespace: a container, a test harness.
    pub fn foreign_ns(&self) -> bool {
        self.ns.is_none() || self.ns != self.init_ns
    }

    /// One sentence for the log: where the pins went, and what to do if
    /// nobody else can see them.
    pub fn explain(&self) -> String {
        let ns = self.ns.as_deref().unwrap_or("unknown");
        let init = self.init_ns.as_deref().unwrap_or("unknown");
        if !self.foreign_ns() {
            return format!(
                "bpffs was not mounted at {BPFFS}: mounted it in the host's mount namespace ({ns}), as systemd would at boot"
            );
        }
        if self.propagates {
            format!(
                "bpffs was not mounted at {BPFFS}: mounted it in this mount namespace ({ns}), which is not PID 1's ({init}); \
                 {BPFFS} is a shared mount, so the mount and the pins propagate to its peers (the host's, with mountPropagation: Bidirectional)"
            )
        } else {
            format!(
                "bpffs was not mounted at {BPFFS}: mounted it in this mount namespace ({ns}), which is not PID 1's ({init}), \
                 and {BPFFS} does not propagate out of it: bpftool and agents in other mount namespaces will not see the pins. \
                 Mount bpffs on the host (`mount -t bpf bpf {BPFFS}`, as systemd does) or give the agent {BPFFS} \
                 as a hostPath with mountPropagation: Bidirectional"
            )
        }
    }
}

/// Mount bpffs at /sys/fs/bpf unless it already is, and say what that means
/// for whoever looks for the pins.
pub fn ensure_bpffs() -> io::Result<Bpffs> {
    if mountinfo_entry(&fs::read_to_string("/proc/self/mountinfo")?, BPFFS)
        .is_some_and(|m| m.fstype == "bpf")
    {
        return Ok(Bpffs::Present);
    }
    fs::create_dir_all(BPFFS)?;
    let src = CString::new("bpf").expect("no NUL");
    let dst = CString::new(BPFFS).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let propagates = mountinfo_entry(&fs::read_to_string("/proc/self/mountinfo")?, BPFFS)
        .is_some_and(|m| m.shared);
    let ns_of = |pid: &str| {
        fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .map(|p| p.display().to_string())
    };
    Ok(Bpffs::Mounted(MountedHere {
        ns: ns_of("self"),
        init_ns: ns_of("1"),
        propagates,
    }))
}

#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    shared: bool,
}

/// The topmost mount at `dir` in a `/proc/PID/mountinfo` text (mounts
/// stack; the last line for a mount point is the one in effect).
fn mountinfo_entry(mountinfo: &str, dir: &str) -> Option<MountEntry> {
    mountinfo.lines().rev().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let (head, tail) = line.split_once(" - ")?;
        let mut f = head.split_whitespace();
        let point = f.nth(4)?;
        let shared = f.skip(1).any(|o| o.starts_with("shared:"));
        let fstype = tail.split_whitespace().next()?.to_string();
        (unescape(point) == dir).then_some(MountEntry { fstype, shared })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_cgroup2() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            find_mount(unified, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(find_mount("proc /proc proc rw 0 0\n", "cgroup2"), None);
    }

    #[test]
    fn topmost_mount_and_its_propagation_from_mountinfo() {
        let info = "23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw\n\
                    40 23 0:22 /fs/bpf /sys/fs/bpf rw shared:9 - sysfs sysfs rw\n\
                    41 40 0:50 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw\n\
                    42 27 0:51 / /mnt/with\\040space rw master:3 - tmpfs t rw\n";
        assert_eq!(
            mountinfo_entry(info, "/sys/fs/bpf"),
            Some(MountEntry {
                fstype: "bpf".into(),
                shared: true
            })
        );
        assert_eq!(
            mountinfo_entry(info, "/mnt/with space"),
            Some(MountEntry {
                fstype: "tmpfs".into(),
                shared: false
            })
        );
        assert_eq!(mountinfo_entry(info, "/sys/fs/cgroup"), None);
        // A private copy of /sys with no bpffs: the dir exists but is not bpf.
        let private = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n";
        assert_eq!(mountinfo_entry(private, "/sys/fs/bpf"), None);
    }

    #[test]
    fn a_mount_nobody_else_sees_says_how_to_fix_it() {
        let here = MountedHere {
            ns: Some("mnt:[4026532700]".into()),
            init_ns: Some("mnt:[4026531841]".into()),
            propagates: false,
        };
        let msg = here.explain();
        assert!(msg.contains("mnt:[4026532700]") && msg.contains("mnt:[4026531841]"));
        assert!(msg.contains("will not see the pins"), "{msg}");
        assert!(msg.contains("Bidirectional"), "{msg}");
        let shared = MountedHere {
            propagates: true,
            ..here.clone()
        };
        assert!(shared.explain().contains("propagate to its peers"));
        let host = MountedHere {
            init_ns: here.ns.clone(),
            ..here
        };
        assert!(!host.foreign_ns());
        assert!(host.explain().contains("host's mount namespace"));
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
