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

/// Mount bpffs at /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> io::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.next();
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    fs::create_dir_all("/sys/fs/bpf")?;
    let src = CString::new("bpf").expect("no NUL");
    let dst = CString::new("/sys/fs/bpf").expect("no NUL");
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
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
