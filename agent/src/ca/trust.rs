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

/// File name of the CA in the distro's anchor directory.
pub const ANCHOR_NAME: &str = "damselfly-node-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "no known trust store under {root}: looked for Debian/Ubuntu (etc/debian_version, \
         usr/sbin/update-ca-certificates), SUSE (etc/pki/trust/anchors) and RHEL/Fedora \
         (etc/redhat-release, usr/bin/update-ca-trust); is --host-root the host's / ?"
    )]
    UnknownDistro { root: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` {outcome}")]
    Command { command: String, outcome: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TrustError + 'a {
    move |source| TrustError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Debian, Ubuntu (and Alpine): `update-ca-certificates`.
    Debian,
    /// SUSE: `update-ca-certificates` with anchors under /etc/pki/trust.
    Suse,
    /// RHEL, Fedora, Amazon Linux: `update-ca-trust`.
    Rhel,
}

impl Family {
    fn anchor_dir(self) -> &'static str {
        match self {
            Family::Debian => "usr/local/share/ca-certificates",
            Family::Suse => "etc/pki/trust/anchors",
            Family::Rhel => "etc/pki/ca-trust/source/anchors",
        }
    }

    fn update_argv(self) -> &'static [&'static str] {
        match self {
            Family::Debian | Family::Suse => &["update-ca-certificates"],
            Family::Rhel => &["update-ca-trust", "extract"],
        }
    }
}

/// What `install` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// This very CA was already there; nothing was run.
    AlreadyTrusted,
    /// Written (replacing a different damselfly CA if `replaced`) and the
    /// trust store updated.
    NewlyTrusted { replaced: bool },
}

/// What `uninstall` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Removed,
    NotInstalled,
}

/// The trust store of the host mounted at `root`.
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PathBuf,
    family: Family,
}

impl TrustStore {
    /// Recognise the distro family under `root` by its marker files.
    pub fn detect(root: &Path) -> Result<Self, TrustError> {
        let has = |p: &str| root.join(p).exists();
        let family = if has("etc/debian_version") {
            Family::Debian
        } else if root.join("etc/pki/trust/anchors").is_dir() {
            Family::Suse
        } else if has("usr/sbin/update-ca-certificates") {
            Family::Debian
        } else if has("etc/redhat-release") || has("usr/bin/update-ca-trust") {
            Family::Rhel
        } else {
            return Err(TrustError::UnknownDistro {
                root: root.to_path_buf(),
            });
        };
        Ok(Self {
            root: root.to_path_buf(),
            family,
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Where the CA goes, as seen from here (under the host root).
    pub fn anchor_path(&self) -> PathBuf {
        self.root.join(self.family.anchor_dir()).join(ANCHOR_NAME)
    }

    /// The distro's update command, chrooted into the host root unless that is `/`.
    pub fn update_command(&self) -> Vec<String> {
        in_host(&self.root, self.family.update_argv())
    }

    /// Is exactly `pem` installed?
    pub fn is_installed(&self, pem: &str) -> Result<bool, TrustError> {
        let path = self.anchor_path();
        match fs::read_to_string(&path) {
            Ok(s) => Ok(s == pem),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Install `pem` and run `update` (normally [`Self::update_command`]).
    /// If the update fails, the previous anchor file is put back, so a
    /// present file always means the store was updated with it.
    pub fn install(&self, pem: &str, update: &[String]) -> Result<Installed, TrustError> {
        let path = self.anchor_path();
        let previous = match fs::read_to_string(&path) {
            Ok(s) if s == pem => return Ok(Installed::AlreadyTrusted),
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let dir = path.parent().expect("anchor path has a parent");
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        write_public(&path, pem)?;
        if let Err(e) = run(update) {
            let _ = match &previous {
                Some(old) => write_public(&path, old),
                None => fs::remove_file(&path).map_err(io_err("removing", &path)),
            };
            return Err(e);
        }
        Ok(Installed::NewlyTrusted {
            replaced: previous.is_some(),
        })
    }

    /// Remove the damselfly CA (whichever one is there) and run `update`.
    pub fn uninstall(&self, update: &[String]) -> Result<Removed, TrustError> {
        let path = self.anchor_path();
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::NotInstalled),
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        run(update)?;
        Ok(Removed::Removed)
    }
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
pub fn is_node_ca(pem: &str) -> bool {
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
pub fn in_host(root: &Path, argv: &[&str]) -> Vec<String> {
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
pub fn run(argv: &[String]) -> Result<(), TrustError> {
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

    fn ok() -> Vec<String> {
        vec!["true".into()]
    }

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

    #[test]
    fn install_is_idempotent_and_a_failed_update_leaves_nothing() {
        let root = TempRoot::new("install");
        root.touch("etc/debian_version");
        let t = TrustStore::detect(&root.0).unwrap();
        let fail = vec!["false".to_string()];
        assert!(matches!(
            t.install(PEM, &fail),
            Err(TrustError::Command { .. })
        ));
        assert!(!t.anchor_path().exists());

        assert_eq!(
            t.install(PEM, &ok()).unwrap(),
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
            t.install(&other, &ok()).unwrap(),
            Installed::NewlyTrusted { replaced: true }
        );

        assert_eq!(t.uninstall(&ok()).unwrap(), Removed::Removed);
        assert!(!t.anchor_path().exists());
        assert_eq!(t.uninstall(&fail).unwrap(), Removed::NotInstalled);
    }

    fn node_ca_pem(state: &Path) -> String {
        let registries = crate::registry::RegistryHosts::new(&[]).unwrap();
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
