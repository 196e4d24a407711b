//! The host's trust store: put the node CA in, take it out.
//!
//! The agent runs in a container with the host's `/` mounted somewhere
//! (`/host` in the DaemonSet), so every path here is under a host root and
//! the distro's update tool runs chrooted into it.
//!
//! Besides the distro's store ([`TrustStore`], which containerd reads once at
//! start), the node CA goes into the per-registry directories Docker Engine
//! and containers/image (Podman, CRI-O) read on every pull ([`CertsDirs`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

pub(crate) use super::distro::Family;
use super::distro::{self, Detected, KNOWN_IDS, MARKERS};

/// File name of the CA in the distro's anchor directory (but Flatcar's,
/// [`Family::anchor_name`]) and in the runtimes' `certs.d` directories.
pub(super) const ANCHOR_NAME: &str = "damselfly-node-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "no known trust store under {root}: {os_release}: neither ID nor ID_LIKE is one of \
         {KNOWN_IDS}, and none of the marker files {markers} exists; is --host-root the host's / ?",
        markers = marker_list()
    )]
    UnknownDistro { root: PathBuf, os_release: String },
    #[error("refusing to install into {distro}'s trust store: {advice}")]
    Refused {
        distro: &'static str,
        advice: &'static str,
    },
    #[error(
        "{action} {path}: the file system is read-only, so this host's trust store cannot be \
         changed from here; trust the node CA (`damselfly ca show`) through the distro's own \
         configuration and run the agent without `ca install`"
    )]
    ReadOnly { action: &'static str, path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` {outcome}")]
    Command { command: String, outcome: String },
    #[error(
        "the CA is not in {bundle} after `{command}`, so TLS clients would not trust it; \
         {anchor} was taken back out"
    )]
    NotInBundle {
        bundle: PathBuf,
        command: String,
        anchor: PathBuf,
    },
    #[error(
        "the CA is still in {bundle} after `{command}`; {anchor} was put back, so that \
         `damselfly ca uninstall` tries again"
    )]
    StillInBundle {
        bundle: PathBuf,
        command: String,
        anchor: PathBuf,
    },
}

fn marker_list() -> String {
    MARKERS
        .iter()
        .map(|(m, _)| *m)
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TrustError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::EROFS) {
            TrustError::ReadOnly {
                action,
                path: path.to_path_buf(),
            }
        } else {
            TrustError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// What `install` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// This very CA was already there and in the bundle; nothing was run.
    AlreadyTrusted,
    /// Written (replacing a different damselfly CA if `replaced`), the
    /// trust store updated, and the CA found in its bundle.
    NewlyTrusted { replaced: bool },
}

/// What `uninstall` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Removed, the store updated, and the CA no longer in its bundle.
    Removed,
    NotInstalled,
}

/// The trust store of the host mounted at `root`.
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PathBuf,
    family: Family,
    by: String,
}

impl TrustStore {
    /// Recognise the distro under `root` ([`distro::detect`]); refuses one
    /// whose trust store is not changed through its files, and an unknown one.
    pub fn detect(root: &Path) -> Result<Self, TrustError> {
        let detected = distro::detect(root).map_err(|(path, e)| io_err("reading", &path)(e))?;
        match detected {
            Detected::Store { family, by } => Ok(Self {
                root: root.to_path_buf(),
                family,
                by,
            }),
            Detected::Refused(r) => Err(TrustError::Refused {
                distro: r.distro,
                advice: r.advice,
            }),
            Detected::Unknown { os_release } => Err(TrustError::UnknownDistro {
                root: root.to_path_buf(),
                os_release,
            }),
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// How the family was recognised (os-release fields or a marker file).
    pub fn recognised_by(&self) -> &str {
        &self.by
    }

    /// Where the CA goes, as seen from here (under the host root).
    pub fn anchor_path(&self) -> PathBuf {
        self.root
            .join(self.family.anchor_dir())
            .join(self.family.anchor_name())
    }

    /// The bundle the update writes, as seen from here.
    pub fn bundle_path(&self) -> PathBuf {
        self.root.join(self.family.bundle())
    }

    /// The distro's update command, chrooted into the host root unless that is `/`.
    pub fn update_command(&self) -> Vec<String> {
        in_host(&self.root, self.family.update_argv())
    }

    /// Is exactly `pem` installed, and in the bundle?
    pub fn is_installed(&self, pem: &str) -> Result<bool, TrustError> {
        let path = self.anchor_path();
        match fs::read_to_string(&path) {
            Ok(s) if s == pem => self.in_bundle(pem),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Does the bundle hold the certificate of `pem`? (No bundle: no.)
    pub fn in_bundle(&self, pem: &str) -> Result<bool, TrustError> {
        let Some(ours) = pem_bodies(pem).next() else {
            return Ok(false);
        };
        let bundle = self.bundle_path();
        match fs::read_to_string(&bundle) {
            Ok(text) => Ok(pem_bodies(&text).any(|b| b == ours)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("reading", &bundle)(e)),
        }
    }

    /// Install `pem`, run `update` (normally [`Self::update_command`]) and
    /// check that the bundle then holds it. If the update fails or the CA is
    /// not in the bundle, the previous anchor file is put back (none if it
    /// held this CA but the bundle did not), so a present file always means
    /// the store was updated with it, and a retry runs the update again.
    pub fn install(&self, pem: &str, update: &[String]) -> Result<Installed, TrustError> {
        let path = self.anchor_path();
        let previous = match fs::read_to_string(&path) {
            Ok(s) if s == pem && self.in_bundle(pem)? => return Ok(Installed::AlreadyTrusted),
            Ok(s) if s == pem => None,
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let dir = path.parent().expect("anchor path has a parent");
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        write_public(&path, pem)?;
        let outcome = run(update).and_then(|()| {
            if self.in_bundle(pem)? {
                Ok(())
            } else {
                Err(TrustError::NotInBundle {
                    bundle: self.bundle_path(),
                    command: update.join(" "),
                    anchor: path.clone(),
                })
            }
        });
        if let Err(e) = outcome {
            let _ = match &previous {
                Some(old) => write_public(&path, old),
                None => fs::remove_file(&path).map_err(io_err("removing", &path)),
            };
            // Let the store forget it again; the error to report is `e`.
            if matches!(e, TrustError::NotInBundle { .. }) {
                let _ = run(update);
            }
            return Err(e);
        }
        Ok(Installed::NewlyTrusted {
            replaced: previous.is_some(),
        })
    }

    /// Remove the damselfly CA (whichever one is there), run `update` and
    /// check that the bundle no longer holds it. On failure the anchor file
    /// is put back, so that a retry does not find "nothing installed".
    pub fn uninstall(&self, update: &[String]) -> Result<Removed, TrustError> {
        let path = self.anchor_path();
        let pem = match fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::NotInstalled),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        fs::remove_file(&path).map_err(io_err("removing", &path))?;
        let outcome = run(update).and_then(|()| {
            if self.in_bundle(&pem)? {
                Err(TrustError::StillInBundle {
                    bundle: self.bundle_path(),
                    command: update.join(" "),
                    anchor: path.clone(),
                })
            } else {
                Ok(())
            }
        });
        if let Err(e) = outcome {
            let _ = write_public(&path, &pem);
            return Err(e);
        }
        Ok(Removed::Removed)
    }
}

/// The base64 bodies of the `CERTIFICATE` blocks in `pem`, whitespace
/// removed: the same certificate has the same body whatever tool wrote the
/// bundle (line length, comments between blocks and other block types aside).
fn pem_bodies(pem: &str) -> impl Iterator<Item = String> + '_ {
    let mut lines = pem.lines().map(str::trim);
    std::iter::from_fn(move || {
        lines.find(|l| *l == "-----BEGIN CERTIFICATE-----")?;
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "-----END CERTIFICATE-----" {
                return Some(body);
            }
            body.extend(l.chars().filter(|c| !c.is_whitespace()));
        }
        None
    })
}

/// The per-registry CA directories, relative to the host root: Docker
/// Engine's, and containers/image's (Podman, CRI-O, Buildah, skopeo). Both
/// read `<dir>/<host>/*.crt` at every pull, on top of the system roots, so a
/// CA put there is trusted without restarting anything. (dockerd reads no
/// directory for Docker Hub, only the system roots.)
pub const CERTS_D: &[&str] = &["etc/docker/certs.d", "etc/containers/certs.d"];

/// What [`CertsDirs::install`] or [`CertsDirs::uninstall`] did, file by file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CertsDirsChange {
    /// Written: new, or replacing another node CA.
    pub written: Vec<PathBuf>,
    /// Already holding this CA.
    pub unchanged: Vec<PathBuf>,
    /// Node CAs removed: every one on uninstall; on install, those for hosts
    /// no longer intercepted.
    pub removed: Vec<PathBuf>,
}

/// The node CA in the runtimes' `certs.d` directories of the host at `root`.
///
/// The file is [`ANCHOR_NAME`], not `ca.crt`: a registry's own `ca.crt` there
/// stays as it is, and the runtime still needs it whenever it reaches the
/// registry directly (the agent down: fail open). Only files of that name
/// holding a Damselfly node CA ([`is_node_ca`]) are ever replaced or removed.
#[derive(Debug, Clone)]
pub struct CertsDirs {
    root: PathBuf,
}

impl CertsDirs {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// `<root>/<dir>/<host>/damselfly-node-ca.crt` for every [`CERTS_D`] dir.
    pub fn paths(&self, host: &str) -> Vec<PathBuf> {
        CERTS_D
            .iter()
            .map(|d| self.root.join(d).join(host).join(ANCHOR_NAME))
            .collect()
    }

    /// Put `pem` in every `certs.d` dir for each of `hosts` (exact names:
    /// a wildcard has no directory), and take node CAs out of the
    /// directories of hosts not among them.
    pub fn install(&self, pem: &str, hosts: &[&str]) -> Result<CertsDirsChange, TrustError> {
        let mut change = CertsDirsChange::default();
        for host in hosts {
            for path in self.paths(host) {
                match fs::read_to_string(&path) {
                    Ok(s) if s == pem => {
                        change.unchanged.push(path);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("reading", &path)(e)),
                }
                let dir = path.parent().expect("has a parent");
                fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
                write_public(&path, pem)?;
                change.written.push(path);
            }
        }
        change.removed = self.remove_node_cas(|host| !hosts.contains(&host))?;
        Ok(change)
    }

    /// Remove every node CA from the `certs.d` dirs, whichever hosts it was
    /// installed for.
    pub fn uninstall(&self) -> Result<CertsDirsChange, TrustError> {
        Ok(CertsDirsChange {
            removed: self.remove_node_cas(|_| true)?,
            ..CertsDirsChange::default()
        })
    }

    /// Remove the node CA files of the hosts `selected` picks, then every
    /// directory that leaves empty, up to `etc`: empty directories configure
    /// nothing, and install may have created all of them.
    fn remove_node_cas(&self, selected: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, TrustError> {
        let mut removed = Vec::new();
        for certs_d in CERTS_D {
            let certs_d = self.root.join(certs_d);
            let entries = match fs::read_dir(&certs_d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("listing", &certs_d)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("listing", &certs_d))?;
                let host = entry.file_name();
                if !host.to_str().is_some_and(&selected) {
                    continue;
                }
                let path = entry.path().join(ANCHOR_NAME);
                match fs::read_to_string(&path) {
                    Ok(s) if is_node_ca(&s) => {}
                    // Not ours (or unreadable): leave it.
                    _ => continue,
                }
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                let _ = fs::remove_dir(entry.path());
                removed.push(path);
            }
            // Only succeeds on an empty directory.
            let etc = self.root.join("etc");
            let mut dir = certs_d.as_path();
            while dir != etc && fs::remove_dir(dir).is_ok() {
                dir = dir.parent().expect("under the root");
            }
        }
        Ok(removed)
    }
}

/// Is `pem` exactly one certificate, a Damselfly node CA (by its subject)?
pub(super) fn is_node_ca(pem: &str) -> bool {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let [Ok(der)] = certs.as_slice() else {
        return false;
    };
    super::der::subject_attribute(der, super::der::ORGANIZATION).as_deref()
        == Some(super::CA_ORGANIZATION)
        && super::der::subject_attribute(der, super::der::COMMON_NAME)
            .is_some_and(|cn| cn.starts_with(super::CA_COMMON_NAME))
}

/// `argv` to run on the host at `root`: as is when `root` is `/`, else via chroot.
pub(super) fn in_host(root: &Path, argv: &[&str]) -> Vec<String> {
    let is_slash = root
        .canonicalize()
        .map(|r| r == Path::new("/"))
        .unwrap_or(false);
    let mut cmd = Vec::new();
    if !is_slash {
        cmd.push("chroot".to_string());
        cmd.push(root.display().to_string());
    }
    cmd.extend(argv.iter().map(|s| s.to_string()));
    cmd
}

/// Run `argv`, turning a failure into an error that carries its output.
pub(super) fn run(argv: &[String]) -> Result<(), TrustError> {
    let (command, out) = output(argv)?;
    if out.status.success() {
        tracing::debug!(%command, stdout = %String::from_utf8_lossy(&out.stdout), "ran");
        return Ok(());
    }
    Err(TrustError::Command {
        command,
        outcome: format!(
            "failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
    })
}

/// Run `argv` as a question: did it exit 0? An error only if it could not run.
pub(super) fn succeeds(argv: &[String]) -> Result<bool, TrustError> {
    Ok(output(argv)?.1.status.success())
}

fn output(argv: &[String]) -> Result<(String, std::process::Output), TrustError> {
    let command = argv.join(" ");
    let Some((prog, args)) = argv.split_first() else {
        return Err(TrustError::Command {
            command,
            outcome: "is empty".into(),
        });
    };
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| TrustError::Command {
            command: command.clone(),
            outcome: format!("could not start: {e}"),
        })?;
    Ok((command, out))
}

/// A certificate is public: 0644, through a rename so the update tool never
/// reads half a file.
fn write_public(path: &Path, contents: &str) -> Result<(), TrustError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, contents).map_err(io_err("writing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
        .map_err(io_err("setting the mode of", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempRoot(PathBuf);
    impl TempRoot {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("dfly-{}-trust-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn touch(&self, rel: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "").unwrap();
        }
    }
    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn families_are_recognised_by_their_markers() {
        for (marker, family, anchor) in [
            (
                "etc/debian_version",
                Family::Debian,
                "usr/local/share/ca-certificates",
            ),
            (
                "usr/sbin/update-ca-certificates",
                Family::Debian,
                "usr/local/share/ca-certificates",
            ),
            (
                "etc/redhat-release",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors",
            ),
            (
                "usr/bin/update-ca-trust",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors",
            ),
            (
                "etc/pki/trust/anchors/x",
                Family::Suse,
                "etc/pki/trust/anchors",
            ),
        ] {
            let root = TempRoot::new(&family_tag(marker));
            root.touch(marker);
            let t = TrustStore::detect(&root.0).unwrap();
            assert_eq!(t.family(), family, "{marker}");
            assert_eq!(t.anchor_path(), root.0.join(anchor).join(ANCHOR_NAME));
            assert_eq!(
                t.update_command()[..2],
                ["chroot", &root.0.display().to_string()]
            );
        }
        let root = TempRoot::new("none");
        let e = TrustStore::detect(&root.0).unwrap_err().to_string();
        assert!(
            e.contains("etc/debian_version") && e.contains("update-ca-trust"),
            "{e}"
        );
    }

    fn family_tag(marker: &str) -> String {
        marker.replace('/', "_")
    }

    #[test]
    fn host_slash_runs_directly() {
        assert_eq!(
            in_host(Path::new("/"), &["update-ca-trust", "extract"]),
            ["update-ca-trust", "extract"]
        );
    }

    /// A stand-in for the distro's update: the bundle becomes the anchor
    /// directory's files (of the family's name pattern), as the real tools
    /// rebuild it from their sources.
    fn rebuilds_bundle(t: &TrustStore) -> Vec<String> {
        let dir = t.anchor_path().parent().unwrap().to_path_buf();
        let bundle = t.bundle_path();
        let script = format!(
            "mkdir -p '{}' && : > '{b}' && for f in '{}'/damselfly-node-ca.*; do \
             if [ -f \"$f\" ]; then cat \"$f\" >> '{b}'; fi; done",
            bundle.parent().unwrap().display(),
            dir.display(),
            b = bundle.display()
        );
        vec!["sh".into(), "-c".into(), script]
    }

    #[test]
    fn install_is_idempotent_and_a_failed_update_leaves_nothing() {
        let root = TempRoot::new("install");
        root.touch("etc/debian_version");
        let t = TrustStore::detect(&root.0).unwrap();
        let ok = rebuilds_bundle(&t);
        let fail = vec!["false".to_string()];
        assert!(matches!(
            t.install(PEM, &fail),
            Err(TrustError::Command { .. })
        ));
        assert!(!t.anchor_path().exists());

        assert_eq!(
            t.install(PEM, &ok).unwrap(),
            Installed::NewlyTrusted { replaced: false }
        );
        assert_eq!(fs::read_to_string(t.anchor_path()).unwrap(), PEM);
        assert!(t.is_installed(PEM).unwrap());
        // The "update" would fail now, but nothing runs: it is already there.
        assert_eq!(t.install(PEM, &fail).unwrap(), Installed::AlreadyTrusted);

        let other = PEM.replace("AAAA", "BBBB");
        assert!(t.install(&other, &fail).is_err());
        assert_eq!(fs::read_to_string(t.anchor_path()).unwrap(), PEM);
        assert_eq!(
            t.install(&other, &ok).unwrap(),
            Installed::NewlyTrusted { replaced: true }
        );
        assert!(t.in_bundle(&other).unwrap() && !t.in_bundle(PEM).unwrap());

        assert_eq!(t.uninstall(&ok).unwrap(), Removed::Removed);
        assert!(!t.anchor_path().exists());
        assert!(!t.in_bundle(&other).unwrap());
        assert_eq!(t.uninstall(&fail).unwrap(), Removed::NotInstalled);
    }

    fn os_release_root(tag: &str, os_release: &str) -> TempRoot {
        let root = TempRoot::new(tag);
        root.touch("etc/os-release");
        fs::write(root.0.join("etc/os-release"), os_release).unwrap();
        root
    }

    #[test]
    fn every_supported_distro_is_recognised_by_its_os_release_and_installs_and_uninstalls() {
        for (os_release, family, anchor, bundle) in [
            (
                "ID=debian\nVERSION_ID=\"12\"\n",
                Family::Debian,
                "usr/local/share/ca-certificates/damselfly-node-ca.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ),
            (
                "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n",
                Family::Debian,
                "usr/local/share/ca-certificates/damselfly-node-ca.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ),
            (
                "ID=pop\nID_LIKE=\"ubuntu debian\"\n",
                Family::Debian,
                "usr/local/share/ca-certificates/damselfly-node-ca.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ),
            (
                "ID=alpine\nVERSION_ID=3.20.0\n",
                Family::Alpine,
                "usr/local/share/ca-certificates/damselfly-node-ca.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ),
            (
                "ID=\"rhel\"\nID_LIKE=\"fedora\"\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "ID=fedora\nVARIANT_ID=coreos\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "ID=\"almalinux\"\nID_LIKE=\"rhel centos fedora\"\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "ID=\"centos\"\nID_LIKE=\"rhel fedora\"\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "NAME=\"Amazon Linux\"\nID=\"amzn\"\nID_LIKE=\"fedora\"\n",
                Family::Rhel,
                "etc/pki/ca-trust/source/anchors/damselfly-node-ca.crt",
                "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            ),
            (
                "ID=\"sles\"\nID_LIKE=\"suse\"\n",
                Family::Suse,
                "etc/pki/trust/anchors/damselfly-node-ca.crt",
                "var/lib/ca-certificates/ca-bundle.pem",
            ),
            (
                "ID=\"opensuse-leap\"\nID_LIKE=\"suse opensuse\"\n",
                Family::Suse,
                "etc/pki/trust/anchors/damselfly-node-ca.crt",
                "var/lib/ca-certificates/ca-bundle.pem",
            ),
            (
                "NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nID_LIKE=coreos\n",
                Family::Flatcar,
                "etc/ssl/certs/damselfly-node-ca.pem",
                "etc/ssl/certs/ca-certificates.crt",
            ),
        ] {
            let root = os_release_root("os-release", os_release);
            let t = TrustStore::detect(&root.0).unwrap();
            assert_eq!(t.family(), family, "{os_release}");
            assert_eq!(t.anchor_path(), root.0.join(anchor), "{os_release}");
            assert_eq!(t.bundle_path(), root.0.join(bundle), "{os_release}");
            assert!(t.recognised_by().contains("os-release"), "{os_release}");
            assert_eq!(
                &t.update_command()[2..],
                family.update_argv(),
                "{os_release}"
            );
            let update = rebuilds_bundle(&t);
            assert_eq!(
                t.install(PEM, &update).unwrap(),
                Installed::NewlyTrusted { replaced: false },
                "{os_release}"
            );
            assert!(t.in_bundle(PEM).unwrap(), "{os_release}");
            assert_eq!(t.uninstall(&update).unwrap(), Removed::Removed);
            assert!(!t.in_bundle(PEM).unwrap(), "{os_release}");
        }
    }

    #[test]
    fn os_release_is_read_in_the_hosts_terms() {
        // /etc/os-release -> /usr/lib/os-release, absolute: the host's, not ours.
        let root = TempRoot::new("os-release-link");
        root.touch("usr/lib/os-release");
        fs::write(root.0.join("usr/lib/os-release"), "ID='alpine'\n").unwrap();
        fs::create_dir_all(root.0.join("etc")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/os-release", root.0.join("etc/os-release")).unwrap();
        assert_eq!(
            TrustStore::detect(&root.0).unwrap().family(),
            Family::Alpine
        );
        // No etc/os-release at all: usr/lib/os-release.
        fs::remove_file(root.0.join("etc/os-release")).unwrap();
        assert_eq!(
            TrustStore::detect(&root.0).unwrap().family(),
            Family::Alpine
        );
    }

    #[test]
    fn an_unknown_os_release_falls_back_to_markers_then_is_refused_naming_what_was_looked_for() {
        let root = os_release_root("unknown", "ID=plan9\nID_LIKE=\"bell\"\n");
        let e = TrustStore::detect(&root.0).unwrap_err().to_string();
        for looked_for in [
            "ID=\"plan9\"",
            "debian",
            "rhel",
            "flatcar",
            "etc/debian_version",
            "usr/bin/update-ca-trust",
            "--host-root",
        ] {
            assert!(e.contains(looked_for), "{looked_for} not in: {e}");
        }
        root.touch("etc/redhat-release");
        let t = TrustStore::detect(&root.0).unwrap();
        assert_eq!(t.family(), Family::Rhel);
        assert!(t.recognised_by().contains("etc/redhat-release"), "{t:?}");
    }

    #[test]
    fn read_only_distros_are_refused_with_what_to_do_instead() {
        for (os_release, says) in [
            ("ID=bottlerocket\n", ["Bottlerocket", "settings.pki"]),
            ("ID=talos\n", ["Talos", "TrustedRootsConfig"]),
        ] {
            let root = os_release_root("refused", os_release);
            // Even with a marker that would otherwise pick a family.
            root.touch("usr/sbin/update-ca-certificates");
            let e = TrustStore::detect(&root.0).unwrap_err();
            assert!(matches!(e, TrustError::Refused { .. }), "{e:?}");
            let e = e.to_string();
            for s in says.iter().chain(&["read-only", "damselfly ca show"]) {
                assert!(e.contains(s), "{s} not in: {e}");
            }
        }
    }

    #[test]
    fn a_read_only_file_system_is_named_with_its_path() {
        let path = Path::new("/host/usr/local/share/ca-certificates");
        let e = io_err("creating", path)(io::Error::from_raw_os_error(libc::EROFS));
        assert!(matches!(e, TrustError::ReadOnly { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("creating /host/usr/local/share/ca-certificates") && e.contains("read-only"),
            "{e}"
        );
        let other = io_err("creating", path)(io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(other, TrustError::Io { .. }), "{other:?}");
    }

    #[test]
    fn an_update_that_leaves_the_ca_out_of_the_bundle_fails_and_rolls_back() {
        let root = os_release_root("not-in-bundle", "ID=ubuntu\n");
        let t = TrustStore::detect(&root.0).unwrap();
        // Runs fine, writes a bundle, but without our CA.
        let forgetful = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "mkdir -p '{0}' && echo '# nothing' > '{0}/ca-certificates.crt'",
                t.bundle_path().parent().unwrap().display()
            ),
        ];
        let e = t.install(PEM, &forgetful).unwrap_err();
        assert!(matches!(e, TrustError::NotInBundle { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "the CA is not in {} after `sh -c",
                t.bundle_path().display()
            )),
            "{msg}"
        );
        assert!(!t.anchor_path().exists(), "the anchor was not taken out");

        // Replacing a trusted CA: the old one is put back.
        let good = rebuilds_bundle(&t);
        t.install(PEM, &good).unwrap();
        let other = PEM.replace("AAAA", "BBBB");
        assert!(t.install(&other, &forgetful).is_err());
        assert_eq!(fs::read_to_string(t.anchor_path()).unwrap(), PEM);

        // This CA's file there but not in the bundle: not "already trusted";
        // the update runs again (and here still fails, so the file goes).
        fs::write(t.bundle_path(), "").unwrap();
        assert!(!t.is_installed(PEM).unwrap());
        assert!(matches!(
            t.install(PEM, &forgetful),
            Err(TrustError::NotInBundle { .. })
        ));
        assert!(!t.anchor_path().exists());
        assert_eq!(
            t.install(PEM, &good).unwrap(),
            Installed::NewlyTrusted { replaced: false }
        );
    }

    #[test]
    fn an_uninstall_that_leaves_the_ca_in_the_bundle_fails_and_keeps_the_anchor() {
        let root = os_release_root("still-in-bundle", "ID=debian\n");
        let t = TrustStore::detect(&root.0).unwrap();
        t.install(PEM, &rebuilds_bundle(&t)).unwrap();
        let e = t.uninstall(&["true".to_string()]).unwrap_err();
        assert!(matches!(e, TrustError::StillInBundle { .. }), "{e:?}");
        assert!(e.to_string().contains("still in"), "{e}");
        assert_eq!(fs::read_to_string(t.anchor_path()).unwrap(), PEM);
        assert!(t.uninstall(&["false".to_string()]).is_err());
        assert_eq!(fs::read_to_string(t.anchor_path()).unwrap(), PEM);
        assert_eq!(t.uninstall(&rebuilds_bundle(&t)).unwrap(), Removed::Removed);
    }

    #[test]
    fn the_bundle_is_compared_by_certificate_body_whatever_its_layout() {
        let state = crate::testing::TempDir::new("trust-bundle-body");
        let ours = node_ca_pem(state.path());
        let root = os_release_root("bundle-body", "ID=rhel\n");
        let t = TrustStore::detect(&root.0).unwrap();
        fs::create_dir_all(t.bundle_path().parent().unwrap()).unwrap();
        // p11-kit style: comments, other certificates, other line lengths.
        let body: String = pem_bodies(&ours).next().unwrap();
        let rewrapped = body
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let bundle = format!(
            "# ACCVRAIZ1\n{}\n# Damselfly node CA\n-----BEGIN CERTIFICATE-----\n{rewrapped}\n-----END CERTIFICATE-----\n",
            other_ca_pem("someone else")
        );
        fs::write(t.bundle_path(), &bundle).unwrap();
        assert!(t.in_bundle(&ours).unwrap());
        fs::write(t.bundle_path(), other_ca_pem("someone else")).unwrap();
        assert!(!t.in_bundle(&ours).unwrap());
        fs::write(
            t.bundle_path(),
            format!(
                "-----BEGIN TRUSTED CERTIFICATE-----\n{body}\n-----END TRUSTED CERTIFICATE-----\n"
            ),
        )
        .unwrap();
        assert!(!t.in_bundle(&ours).unwrap(), "not a CERTIFICATE block");
    }

    fn node_ca_pem(state: &Path) -> String {
        let registries = crate::origin::RegistryHosts::new(&[]).unwrap();
        crate::ca::NodeCa::load_or_create(state, &registries)
            .unwrap()
            .cert_pem()
            .to_string()
    }

    fn other_ca_pem(cn: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    }

    #[test]
    fn only_a_damselfly_node_ca_is_one() {
        let state = crate::testing::TempDir::new("trust-is-ca");
        let ours = node_ca_pem(state.path());
        assert!(is_node_ca(&ours));
        assert!(!is_node_ca(&other_ca_pem("Damselfly node CA look-alike")));
        assert!(
            !is_node_ca(&format!("{ours}{ours}")),
            "a bundle is not our file"
        );
        assert!(!is_node_ca(PEM));
        assert!(!is_node_ca(""));
    }

    #[test]
    fn certs_d_holds_the_node_ca_for_each_exact_host_and_uninstall_takes_only_that() {
        let root = TempRoot::new("certs-d");
        let state = crate::testing::TempDir::new("trust-certs-d");
        let pem = node_ca_pem(state.path());
        let d = CertsDirs::new(&root.0);
        let file = |dir: &str, host: &str| root.0.join(dir).join(host).join(ANCHOR_NAME);
        // What the host already has: Docker's own config, a registry's own CA
        // under the usual name, and someone else's file under ours.
        root.touch("etc/docker/daemon.json");
        let registry_ca = other_ca_pem("a registry's own CA");
        let own = root.0.join("etc/docker/certs.d/ghcr.io/ca.crt");
        fs::create_dir_all(own.parent().unwrap()).unwrap();
        fs::write(&own, &registry_ca).unwrap();
        let foreign = file("etc/containers/certs.d", "other.example");
        fs::create_dir_all(foreign.parent().unwrap()).unwrap();
        fs::write(&foreign, &registry_ca).unwrap();

        let hosts = ["ghcr.io", "registry.dfly.test"];
        let change = d.install(&pem, &hosts).unwrap();
        assert_eq!(change.written.len(), 4, "{change:?}");
        assert!(change.removed.is_empty(), "{change:?}");
        for dir in CERTS_D {
            for host in hosts {
                assert_eq!(fs::read_to_string(file(dir, host)).unwrap(), pem);
            }
        }
        assert_eq!(fs::read_to_string(&own).unwrap(), registry_ca);
        assert_eq!(d.paths("ghcr.io")[0], file(CERTS_D[0], "ghcr.io"));

        let again = d.install(&pem, &hosts).unwrap();
        assert_eq!((again.written.len(), again.unchanged.len()), (0, 4));

        // A rotated CA replaces the old one; a host no longer intercepted loses it.
        fs::remove_dir_all(state.path()).unwrap();
        let rotated = node_ca_pem(state.path());
        assert_ne!(rotated, pem);
        let change = d.install(&rotated, &["ghcr.io"]).unwrap();
        assert_eq!(change.written.len(), 2, "{change:?}");
        assert_eq!(change.removed.len(), 2, "{change:?}");
        for dir in CERTS_D {
            assert_eq!(fs::read_to_string(file(dir, "ghcr.io")).unwrap(), rotated);
            assert!(!root.0.join(dir).join("registry.dfly.test").exists());
        }

        let change = d.uninstall().unwrap();
        assert_eq!(change.removed.len(), 2, "{change:?}");
        for dir in CERTS_D {
            assert!(!file(dir, "ghcr.io").exists());
        }
        // The registry's own CA, the file that is not a node CA and Docker's
        // config stay; only directories left empty went.
        assert_eq!(fs::read_to_string(&own).unwrap(), registry_ca);
        assert_eq!(fs::read_to_string(&foreign).unwrap(), registry_ca);
        assert!(root.0.join("etc/docker/daemon.json").exists());
        assert_eq!(d.uninstall().unwrap(), CertsDirsChange::default());

        fs::remove_dir_all(foreign.parent().unwrap()).unwrap();
        d.install(&pem, &hosts).unwrap();
        d.uninstall().unwrap();
        assert!(!root.0.join("etc/containers").exists());
        assert!(root.0.join("etc/docker/certs.d/ghcr.io/ca.crt").exists());
    }
}
