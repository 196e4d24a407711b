//! The node CA: a name-constrained ECDSA P-256 CA kept under the state dir,
//! leaf certificates minted per SNI on demand ([`LeafResolver`]), and
//! install/remove in the host trust store ([`trust`]).
//!
//! # Files
//!
//! ```text
//! <state-dir>/ca/            0700
//!   ca.crt                   0644  the CA certificate (PEM); what `damselfly ca show` prints
//!   ca.key                   0600  its PKCS#8 private key (PEM); never logged or served
//!   constraints.txt          0644  the permitted DNS subtrees baked into ca.crt, one a line
//!   .lock                          serialises create/rotate between processes
//! ```
//!
//! Each file is written to a temporary name (the key created 0600 from the
//! start) and renamed into place. A set torn by a crash (key and certificate
//! that do not match, a missing file) is re-created on the next start.
//!
//! # Name constraints
//!
//! The CA can only vouch for registry names: its certificate carries a
//! critical X.509 name constraints extension whose permitted `dNSName`
//! subtrees come from the registry list, and which excludes every IPv4 and
//! IPv6 address (without that, an IP address SAN would be unconstrained). A
//! `dNSName` constraint covers a domain and everything below it and cannot
//! express "one label", so wildcard patterns widen to what follows their last
//! `*` label ([`constraints::subtree_for`]). For the default registries:
//!
//! | pattern                        | permitted subtree |
//! |--------------------------------|-------------------|
//! | `*.gcr.io` (and `gcr.io`)      | `gcr.io`          |
//! | `*.pkg.dev`                    | `pkg.dev`         |
//! | `*.dkr.ecr.*.amazonaws.com`    | `amazonaws.com`   |
//! | `*.azurecr.io`                 | `azurecr.io`      |
//! | `registry-1.docker.io`, `index.docker.io` | covered by `docker.io` |
//! | any exact host, e.g. `ghcr.io` | itself            |
//!
//! The constraints are the outer bound; the resolver mints leaves only for
//! names the registry list itself matches, so `us.gcr.io` gets a leaf and
//! `a.b.gcr.io` does not. A pattern ending in `*` (e.g. `registry.*`) has no
//! parent to constrain to and is refused.
//!
//! When the registry list changes between starts (a new `--registry`), the
//! stored constraints no longer match: the CA is re-created with a warning,
//! and the new certificate must be installed on the host again.

pub mod constraints;
mod der;
mod leaf;
pub mod trust;

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier as _},
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
        pem::PemObject as _,
    },
    sign::CertifiedKey,
};
use time::{Duration, OffsetDateTime};

pub use constraints::{Unconstrainable, permitted_dns_subtrees};
pub use leaf::{LeafPolicy, LeafResolver};

use crate::registry::RegistryHosts;

/// The node CA's subject is `O=Damselfly, CN=Damselfly node CA <key tag>`:
/// what tells it apart from other CAs in a directory it shares with them.
const CA_ORGANIZATION: &str = "Damselfly";
const CA_COMMON_NAME: &str = "Damselfly node CA";
/// How long a node CA is valid. Rotation is by hand (`damselfly ca rotate`).
const CA_VALIDITY: Duration = Duration::days(3650);
/// Backdating for clock skew between this node and whatever checks the cert.
const CA_BACKDATE: Duration = Duration::hours(1);
/// A stored CA that will not be valid this much longer is replaced on start,
/// so leaves never outlive it and the new CA can be installed in good time.
const CA_MIN_REMAINING: Duration = Duration::days(30);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Unconstrainable(#[from] Unconstrainable),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading a signing key: {0}")]
    SigningKey(#[from] rustls::Error),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Where [`NodeCa::load_or_create`] got its CA from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaOrigin {
    /// The stored CA, as it was.
    Loaded,
    /// There was none; a new one was created.
    Created,
    /// A stored CA was replaced (rotation, changed registry list, or a torn
    /// set of files): the new one must be installed again.
    Replaced(String),
}

/// The CA files under one state dir.
#[derive(Debug, Clone)]
struct CaFiles {
    dir: PathBuf,
}

impl CaFiles {
    fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("ca"),
        }
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    fn constraints(&self) -> PathBuf {
        self.dir.join("constraints.txt")
    }
}

/// The node CA. Cheap to share: the resolver holds the signing half by `Arc`.
pub struct NodeCa {
    issuer: Arc<Issuer>,
    registries: RegistryHosts,
    permitted: Vec<String>,
    cert_path: PathBuf,
    origin: CaOrigin,
}

/// What signs leaves: the CA key and an rcgen view of the CA certificate.
pub(crate) struct Issuer {
    /// Rebuilt from the key on load (rcgen cannot parse certificates without
    /// its x509-parser feature); only its subject and key identifier are used
    /// when signing, and both are derived from the key, so they match ca.crt.
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The stored certificate, as served in every chain.
    der: CertificateDer<'static>,
    pem: String,
}

impl fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCa")
            .field("cert_path", &self.cert_path)
            .field("permitted", &self.permitted)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// The CA under `<state_dir>/ca`, created if there is none (or if the one
    /// there was made for a different registry list).
    pub fn load_or_create(state_dir: &Path, registries: &RegistryHosts) -> Result<Self, CaError> {
        let files = CaFiles::new(state_dir);
        let permitted = permitted_dns_subtrees(registries.patterns())?;
        let _lock = DirLock::take(&files.dir)?;
        let (issuer, origin) = match load(&files, &permitted)? {
            Stored::Valid(issuer) => (*issuer, CaOrigin::Loaded),
            Stored::Missing => {
                tracing::info!(dir = %files.dir.display(), ?permitted, "creating the node CA");
                (create(&files, &permitted)?, CaOrigin::Created)
            }
            Stored::Stale(reason) => {
                tracing::warn!(
                    dir = %files.dir.display(),
                    %reason,
                    ?permitted,
                    "replacing the node CA: the new CA must be installed into the host trust store \
                     again (damselfly ca install) and the container runtime restarted"
                );
                (create(&files, &permitted)?, CaOrigin::Replaced(reason))
            }
        };
        Ok(Self {
            issuer: Arc::new(issuer),
            registries: registries.clone(),
            permitted,
            cert_path: files.cert(),
            origin,
        })
    }

    /// A new key and certificate, replacing the stored ones.
    pub fn rotate(state_dir: &Path, registries: &RegistryHosts) -> Result<Self, CaError> {
        let files = CaFiles::new(state_dir);
        let permitted = permitted_dns_subtrees(registries.patterns())?;
        let _lock = DirLock::take(&files.dir)?;
        let issuer = create(&files, &permitted)?;
        tracing::warn!(
            dir = %files.dir.display(),
            "rotated the node CA: install it again (damselfly ca install) and restart the \
             container runtime and the agent"
        );
        Ok(Self {
            issuer: Arc::new(issuer),
            registries: registries.clone(),
            permitted,
            cert_path: files.cert(),
            origin: CaOrigin::Replaced("rotated".into()),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.issuer.pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.issuer.der
    }

    /// `<state-dir>/ca/ca.crt`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The permitted DNS subtrees in the certificate's name constraints.
    pub fn permitted_subtrees(&self) -> &[String] {
        &self.permitted
    }

    pub fn origin(&self) -> &CaOrigin {
        &self.origin
    }

    /// A certificate resolver for `rustls::ServerConfig::with_cert_resolver`
    /// that mints leaves for the registry list this CA was made for (and
    /// nothing else), with the default [`LeafPolicy`].
    pub fn resolver(&self) -> LeafResolver {
        LeafResolver::new(
            self.issuer.clone(),
            self.registries.clone(),
            LeafPolicy::default(),
        )
    }

    /// [`Self::resolver`] with a chosen leaf lifetime and clock.
    pub fn resolver_with(&self, policy: LeafPolicy) -> LeafResolver {
        LeafResolver::new(self.issuer.clone(), self.registries.clone(), policy)
    }

    /// Mint a leaf for any name, bypassing the registry check: only for tests
    /// that show the name constraints stop what the resolver would refuse.
    #[cfg(test)]
    pub(crate) fn mint_unchecked(&self, name: &str) -> CertifiedKey {
        let now = OffsetDateTime::now_utc();
        self.issuer
            .mint(name, now - Duration::minutes(5), now + Duration::hours(1))
            .unwrap()
    }
}

impl Issuer {
    fn from_key(key: KeyPair, permitted: &[String]) -> Result<Self, CaError> {
        Self::from_key_valid_for(key, permitted, CA_VALIDITY)
    }

    fn from_key_valid_for(
        key: KeyPair,
        permitted: &[String],
        validity: Duration,
    ) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let cert = ca_params(&key, permitted, now, validity).self_signed(&key)?;
        let der = cert.der().clone();
        let pem = cert.pem();
        Ok(Self {
            cert,
            key,
            der,
            pem,
        })
    }

    /// Mint a leaf for `name` and verify it with webpki against this CA as
    /// the only root: proves the stored certificate and the rebuilt issuer
    /// agree and that the constraints admit `name`. (webpki ignores a trust
    /// anchor's own validity; [`der::not_after`] covers that.)
    fn self_check(&self, name: &str) -> Result<(), String> {
        let now = OffsetDateTime::now_utc();
        let leaf = self
            .mint(name, now - Duration::minutes(5), now + Duration::hours(1))
            .map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &server_name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A leaf for `name`, chain [leaf, CA].
    pub(crate) fn mint(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.der.clone()],
            signing,
        ))
    }
}

/// The CA certificate's parameters. Subject and key identifier depend only on
/// the key, so [`Issuer`] can rebuild an identical issuer on load.
fn ca_params(
    key: &KeyPair,
    permitted: &[String],
    now: OffsetDateTime,
    validity: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, CA_ORGANIZATION);
    // A short key fingerprint tells rotated CAs apart in a trust store listing.
    let raw = key.public_key_raw();
    let tag: String = raw
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect(),
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + validity;
    params
}

enum Stored {
    Valid(Box<Issuer>),
    Missing,
    /// Present but unusable for this registry list; the reason, for the log.
    Stale(String),
}

fn load(files: &CaFiles, permitted: &[String]) -> Result<Stored, CaError> {
    let (cert, key, constraints) = (files.cert(), files.key(), files.constraints());
    let cert_pem = read_optional(&cert)?;
    let key_pem = read_optional(&key)?;
    let stored = read_optional(&constraints)?;
    let (cert_pem, key_pem, stored) = match (cert_pem, key_pem, stored) {
        (None, None, None) => return Ok(Stored::Missing),
        (Some(c), Some(k), Some(s)) => (c, k, s),
        _ => return Ok(Stored::Stale("incomplete set of CA files".into())),
    };
    let stored: Vec<&str> = stored.lines().filter(|l| !l.is_empty()).collect();
    if stored != permitted {
        return Ok(Stored::Stale(format!(
            "the registry list changed: the stored CA permits {stored:?}"
        )));
    }
    let Ok(key_pair) = KeyPair::from_pem(&key_pem) else {
        return Ok(Stored::Stale("ca.key is not a PEM private key".into()));
    };
    if !key_pair.is_compatible(&PKCS_ECDSA_P256_SHA256) {
        return Ok(Stored::Stale("ca.key is not an ECDSA P-256 key".into()));
    }
    let Ok(der) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else {
        return Ok(Stored::Stale("ca.crt is not a PEM certificate".into()));
    };
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
    ))?;
    if CertifiedKey::new(vec![der.clone()], signing)
        .keys_match()
        .is_err()
    {
        return Ok(Stored::Stale("ca.crt and ca.key do not match".into()));
    }
    let Some(not_after) = der::not_after(&der) else {
        return Ok(Stored::Stale("ca.crt has no readable validity".into()));
    };
    if not_after < OffsetDateTime::now_utc() + CA_MIN_REMAINING {
        return Ok(Stored::Stale(format!("the stored CA expires {not_after}")));
    }
    let mut issuer = Issuer::from_key(key_pair, permitted)?;
    issuer.der = der;
    issuer.pem = cert_pem;
    if let Some(name) = permitted.first()
        && let Err(e) = issuer.self_check(name)
    {
        return Ok(Stored::Stale(format!(
            "the stored CA does not verify a leaf for {name}: {e}"
        )));
    }
    tighten_key_mode(&key)?;
    Ok(Stored::Valid(Box::new(issuer)))
}

fn create(files: &CaFiles, permitted: &[String]) -> Result<Issuer, CaError> {
    create_valid_for(files, permitted, CA_VALIDITY)
}

fn create_valid_for(
    files: &CaFiles,
    permitted: &[String],
    validity: Duration,
) -> Result<Issuer, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let key_pem = key.serialize_pem();
    let issuer = Issuer::from_key_valid_for(key, permitted, validity)?;
    // Key first, constraints last: a crash in between leaves a set that
    // load() sees as torn (key/cert mismatch or stale constraints).
    write_atomic(&files.dir, "ca.key", key_pem.as_bytes(), 0o600)?;
    write_atomic(&files.dir, "ca.crt", issuer.pem.as_bytes(), 0o644)?;
    let mut list = permitted.join("\n");
    list.push('\n');
    write_atomic(&files.dir, "constraints.txt", list.as_bytes(), 0o644)?;
    Ok(issuer)
}

fn read_optional(path: &Path) -> Result<Option<String>, CaError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Some(String::new())),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// A key file someone loosened is put back to 0600 rather than refused: the
/// agent is the only reader.
fn tighten_key_mode(path: &Path) -> Result<(), CaError> {
    let mode = fs::metadata(path)
        .map_err(io_err("reading", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "CA key was readable by others; setting 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting the mode of", path))?;
    }
    Ok(())
}

/// Write `dir/name` through a temporary file created with `mode`, so the
/// file is never visible half-written or with a wider mode.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let path = dir.join(name);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))?;
    Ok(())
}

/// An exclusive `flock` on `<ca dir>/.lock`, so an agent and a `damselfly ca`
/// command starting together do not both create a CA.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn take(dir: &Path) -> Result<Self, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating", dir))?;
        let path = dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        // SAFETY: flock on a descriptor we own; released when it is closed.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_err("locking", &path)(io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

#[cfg(test)]
mod tests;
