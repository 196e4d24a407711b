//! Deleting the agent's `--state-dir` (the node CA with its private key, the
//! blob cache), and what makes `damselfly cleanup` refuse to.
//!
//! A wrong `--state-dir` must never cost the node anything else, so the
//! directory is deleted only if everything in it is something an agent makes:
//!
//! ```text
//! <state-dir>/ca/      ca.crt ca.key constraints.txt .lock .agent .<name>.tmp-<pid>
//! <state-dir>/blobs/   <sha256 hex>[.part|.meta]  *.tmp
//! ```
//!
//! (an empty directory qualifies too). Anything else, a symlink anywhere in
//! it, `/`, a relative path or one with `..` is refused, naming what did not
//! fit. Nothing is followed: entries are typed without following symlinks
//! and `std::fs::remove_dir_all` unlinks a symlink rather than descending.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

/// What a directory entry is, not following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `None` for a name that is not UTF-8 (never one of ours).
    pub name: Option<String>,
    pub kind: Kind,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to delete an empty --state-dir")]
    Empty,
    #[error("refusing to delete --state-dir {0}: give an absolute path")]
    Relative(PathBuf),
    #[error("refusing to delete --state-dir {0}: `..` is not allowed in it")]
    Parent(PathBuf),
    #[error("refusing to delete --state-dir {0}: that is the root directory")]
    Root(PathBuf),
    #[error(
        "refusing to delete --state-dir {0}: it is a symlink (never followed); give the \
         directory it points to"
    )]
    Symlink(PathBuf),
    #[error("refusing to delete --state-dir {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "refusing to delete --state-dir {dir}: it holds what a damselfly agent does not make \
         ({}); is it the agent's --state-dir? If so, remove those by hand and run cleanup again",
        strangers.join(", ")
    )]
    Strangers {
        dir: PathBuf,
        strangers: Vec<String>,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Refusal + 'a {
    move |source| Refusal::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// At most this many strangers are named in a refusal.
const NAMED: usize = 5;

/// The checks on the path itself, before anything is read.
pub fn check_path(dir: &Path) -> Result<(), Refusal> {
    if dir.as_os_str().is_empty() {
        return Err(Refusal::Empty);
    }
    if !dir.is_absolute() {
        return Err(Refusal::Relative(dir.to_path_buf()));
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(Refusal::Parent(dir.to_path_buf()));
    }
    if dir
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::CurDir))
    {
        return Err(Refusal::Root(dir.to_path_buf()));
    }
    Ok(())
}

const CA_FILES: &[&str] = &["ca.crt", "ca.key", "constraints.txt", ".lock", ".agent"];

fn is_ca_file(name: &str) -> bool {
    // `.<name>.tmp-<pid>`: a write the agent was killed in the middle of.
    CA_FILES.contains(&name) || (name.starts_with('.') && name.contains(".tmp-"))
}

fn is_blob_file(name: &str) -> bool {
    let (hex, ext) = name.split_once('.').unwrap_or((name, ""));
    let digest = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (digest && matches!(ext, "" | "part" | "meta")) || name.ends_with(".tmp")
}

/// Does the listing look like an agent's state dir? `ca` and `blobs` are
/// the listings of those subdirectories (empty if absent). Every entry
/// that does not fit is named in the refusal (up to [`NAMED`]).
pub fn check_entries(
    dir: &Path,
    top: &[Entry],
    ca: &[Entry],
    blobs: &[Entry],
) -> Result<(), Refusal> {
    let mut strangers = Vec::new();
    let describe = |prefix: &str, e: &Entry| {
        let name = e.name.as_deref().unwrap_or("(a name that is not UTF-8)");
        match e.kind {
            Kind::Symlink => format!("{prefix}{name} (a symlink)"),
            Kind::Dir => format!("{prefix}{name}/"),
            Kind::File | Kind::Other => format!("{prefix}{name}"),
        }
    };
    for e in top {
        let ours = e.kind == Kind::Dir && matches!(e.name.as_deref(), Some("ca" | "blobs"));
        if !ours {
            strangers.push(describe("", e));
        }
    }
    for (prefix, list, fits) in [
        ("ca/", ca, is_ca_file as fn(&str) -> bool),
        ("blobs/", blobs, is_blob_file),
    ] {
        for e in list {
            if !(e.kind == Kind::File && e.name.as_deref().is_some_and(fits)) {
                strangers.push(describe(prefix, e));
            }
        }
    }
    if strangers.is_empty() {
        return Ok(());
    }
    let more = strangers.len().saturating_sub(NAMED);
    strangers.truncate(NAMED);
    if more > 0 {
        strangers.push(format!("and {more} more"));
    }
    Err(Refusal::Strangers {
        dir: dir.to_path_buf(),
        strangers,
    })
}

/// What [`remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// There was no such directory: nothing to do.
    Absent,
    Removed {
        /// There was a `ca/` (the node CA and its private key).
        ca: bool,
        /// Files in `blobs/` and their bytes.
        blob_files: u64,
        blob_bytes: u64,
        /// Its contents went, but the directory is a mount point here
        /// (e.g. a hostPath mounted at that very path) and stays.
        mount_point: bool,
    },
}

/// Check `dir` (see the module doc) and delete it.
pub fn remove(dir: &Path) -> Result<Removed, Refusal> {
    check_path(dir)?;
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => return Err(Refusal::Symlink(dir.to_path_buf())),
        Ok(m) if !m.is_dir() => return Err(Refusal::NotADirectory(dir.to_path_buf())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Absent),
        Err(e) => return Err(io_err("reading", dir)(e)),
    }
    let top = list(dir)?;
    let has = |name: &str| {
        top.iter()
            .any(|e| e.kind == Kind::Dir && e.name.as_deref() == Some(name))
    };
    let sub = |name: &str| -> Result<Vec<Entry>, Refusal> {
        if has(name) {
            list(&dir.join(name))
        } else {
            Ok(Vec::new())
        }
    };
    let (ca, blobs) = (sub("ca")?, sub("blobs")?);
    check_entries(dir, &top, &ca, &blobs)?;

    let (blob_files, blob_bytes) = blob_usage(&dir.join("blobs"), &blobs);
    for name in ["ca", "blobs"] {
        if has(name) {
            let path = dir.join(name);
            fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
        }
    }
    let mount_point = match fs::remove_dir(dir) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(e) => return Err(io_err("removing", dir)(e)),
    };
    Ok(Removed::Removed {
        ca: has("ca"),
        blob_files,
        blob_bytes,
        mount_point,
    })
}

fn list(dir: &Path) -> Result<Vec<Entry>, Refusal> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        // DirEntry::file_type does not follow symlinks.
        let t = entry
            .file_type()
            .map_err(io_err("reading", &entry.path()))?;
        let kind = if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        out.push(Entry {
            name: entry.file_name().into_string().ok(),
            kind,
        });
    }
    Ok(out)
}

/// Files and bytes in `blobs/`, for the report (best effort: sizes only).
fn blob_usage(blobs_dir: &Path, entries: &[Entry]) -> (u64, u64) {
    let bytes = entries
        .iter()
        .filter_map(|e| e.name.as_deref())
        .filter_map(|n| fs::symlink_metadata(blobs_dir.join(n)).ok())
        .map(|m| m.len())
        .fold(0u64, u64::saturating_add);
    (entries.len() as u64, bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::testing::TempDir;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn file(name: &str) -> Entry {
        Entry {
            name: Some(name.into()),
            kind: Kind::File,
        }
    }

    fn dir(name: &str) -> Entry {
        Entry {
            name: Some(name.into()),
            kind: Kind::Dir,
        }
    }

    #[test]
    fn paths_that_are_never_a_state_dir() {
        assert!(matches!(check_path(Path::new("")), Err(Refusal::Empty)));
        for root in ["/", "//", "/./", "/."] {
            assert!(
                matches!(check_path(Path::new(root)), Err(Refusal::Root(_))),
                "{root}"
            );
        }
        assert!(matches!(
            check_path(Path::new("/var/lib/..")),
            Err(Refusal::Parent(_))
        ));
        assert!(matches!(
            check_path(Path::new("var/lib/damselfly")),
            Err(Refusal::Relative(_))
        ));
        check_path(Path::new("/var/lib/damselfly")).unwrap();
        check_path(Path::new("/host/var/lib/damselfly/")).unwrap();
    }

    #[test]
    fn only_what_an_agent_makes_is_accepted() {
        let d = Path::new("/s");
        check_entries(d, &[], &[], &[]).unwrap();
        let ca = [
            file("ca.crt"),
            file("ca.key"),
            file("constraints.txt"),
            file(".lock"),
            file(".agent"),
            file(".ca.key.tmp-42"),
        ];
        let blobs = [
            file(HEX),
            file(&format!("{HEX}.part")),
            file(&format!("{HEX}.meta")),
            file(&format!("{HEX}.meta.tmp")),
        ];
        check_entries(d, &[dir("ca"), dir("blobs")], &ca, &blobs).unwrap();
        check_entries(d, &[dir("blobs")], &[], &blobs).unwrap();

        let refused = |top: &[Entry], ca: &[Entry], blobs: &[Entry]| -> String {
            match check_entries(d, top, ca, blobs) {
                Err(e @ Refusal::Strangers { .. }) => e.to_string(),
                other => panic!("{other:?}"),
            }
        };
        // /etc, /var/lib: anything else at the top.
        let e = refused(&[dir("ca"), file("passwd"), dir("apt")], &[], &[]);
        assert!(e.contains("passwd, apt/") && e.contains("/s"), "{e}");
        // A directory someone else calls `ca`.
        let e = refused(&[dir("ca")], &[file("ca.crt"), file("index.txt")], &[]);
        assert!(e.contains("ca/index.txt") && !e.contains("ca.crt"), "{e}");
        // Symlinks are never ours, wherever they are.
        let link = Entry {
            name: Some("ca".into()),
            kind: Kind::Symlink,
        };
        assert!(refused(std::slice::from_ref(&link), &[], &[]).contains("ca (a symlink)"));
        let link = Entry {
            name: Some(HEX.into()),
            kind: Kind::Symlink,
        };
        assert!(refused(&[dir("blobs")], &[], &[link]).contains("(a symlink)"));
        // Not a digest, a subdirectory, a name that is not UTF-8.
        let e = refused(
            &[dir("blobs")],
            &[],
            &[
                file("ABCDEF"),
                file(&format!("{HEX}.bak")),
                dir("sub"),
                Entry {
                    name: None,
                    kind: Kind::File,
                },
            ],
        );
        assert!(
            e.contains("blobs/ABCDEF")
                && e.contains(".bak")
                && e.contains("blobs/sub/")
                && e.contains("not UTF-8"),
            "{e}"
        );
        // A long list is cut.
        let many: Vec<Entry> = (0..20).map(|i| file(&format!("f{i}"))).collect();
        let e = refused(&many, &[], &[]);
        assert!(e.contains("f4, and 15 more") && !e.contains("f5"), "{e}");
    }

    fn populate(state: &Path) {
        let registries = crate::origin::RegistryHosts::new(&[]).unwrap();
        drop(crate::ca::NodeCa::load_or_create(state, &registries).unwrap());
        fs::create_dir_all(state.join("blobs")).unwrap();
        fs::write(state.join("blobs").join(HEX), b"12345").unwrap();
        fs::write(state.join(format!("blobs/{HEX}.meta")), b"67").unwrap();
    }

    #[test]
    fn removes_a_real_state_dir_and_then_has_nothing_to_do() {
        let t = TempDir::new("cleanup-state");
        let state = t.join("state");
        populate(&state);
        let removed = remove(&state).unwrap();
        assert_eq!(
            removed,
            Removed::Removed {
                ca: true,
                blob_files: 2,
                blob_bytes: 7,
                mount_point: false,
            }
        );
        assert!(!state.exists());
        assert_eq!(remove(&state).unwrap(), Removed::Absent);
        fs::create_dir(&state).unwrap();
        assert!(matches!(
            remove(&state).unwrap(),
            Removed::Removed { ca: false, .. }
        ));
        assert!(!state.exists());
    }

    #[test]
    fn refuses_leaving_everything_in_place_and_never_follows_a_symlink() {
        let t = TempDir::new("cleanup-refuse");
        let state = t.join("state");
        populate(&state);
        let outside = t.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), b"x").unwrap();

        // A symlink inside: refused, and nothing at all is removed.
        symlink(&outside, state.join("blobs").join(HEX.replace('0', "1"))).unwrap();
        let e = remove(&state).unwrap_err().to_string();
        assert!(e.contains("(a symlink)"), "{e}");
        assert!(state.join("ca/ca.key").exists() && outside.join("precious").exists());

        // The state dir itself a symlink.
        fs::remove_file(state.join("blobs").join(HEX.replace('0', "1"))).unwrap();
        let link = t.join("link");
        symlink(&state, &link).unwrap();
        assert!(matches!(remove(&link), Err(Refusal::Symlink(_))));
        assert!(state.join("ca/ca.key").exists());

        // A file, and a directory with something else in it.
        assert!(matches!(
            remove(&state.join("ca/ca.crt")),
            Err(Refusal::NotADirectory(_))
        ));
        let e = remove(&outside).unwrap_err().to_string();
        assert!(e.contains("precious"), "{e}");
        assert!(outside.join("precious").exists());
        remove(&state).unwrap();
        assert!(outside.join("precious").exists());
    }
}
