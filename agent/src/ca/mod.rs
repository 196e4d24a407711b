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
//!   .agent                         held (shared flock) by an agent signing with this CA
//! ```
//!
//! Each file is written to a temporary name (the key created 0600 from the
//! start) and renamed into place. A set torn by a crash (key and certificate
//! that do not match, a missing file) is re-created on the next start.
//!
//! # Who changes it
//!
//! The agent, on start ([`NodeCa::load_or_create`]), and `damselfly ca
//! rotate` ([`NodeCa::rotate`]); `ca install` too, but only while no agent
//! signs with it ([`NodeCa::for_install`]). `ca show` only reads
//! ([`NodeCa::stored`]). A running agent's resolver looks at the files every
//! [`LeafPolicy::recheck`] and switches to a CA that replaced them, dropping
//! its cached leaves, so a rotation needs no restart. For that to work, the
//! replacement must carry the agent's constraints: while the `.agent` lease
//! is held, `rotate` refuses a registry list that would change them, and
//! `install` installs the stored CA as it is.
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
//! stored constraints no longer match: the agent re-creates the CA with a
//! warning, and the new certificate must be installed on the host again.

mod constraints;
mod der;
mod distro;
mod leaf;
mod runtime;
mod trust;

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
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

use crate::origin::RegistryHosts;

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
    #[error(
        "no node CA in {}: the agent creates it on its first start (or `damselfly ca rotate` \
         does)",
        .0.display()
    )]
    NoCa(PathBuf),
    #[error(
        "an agent signs with the node CA in {}, and the registry list given here changes its \
         constraints ({}): the agent could not switch to such a CA. Give the agent's --registry \
         list (or stop the agent: it re-creates the CA for its own list when it starts)",
        dir.display(),
        constraints::difference(stored, given)
    )]
    InUse {
        dir: PathBuf,
        stored: Vec<String>,
        given: Vec<String>,
    },
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
    files: CaFiles,
    origin: CaOrigin,
    /// The files as loaded, so a resolver notices when they are replaced.
    stamp: Stamp,
    /// Marks the CA as signing in this process (see [`Lease`]).
    lease: Option<Arc<Lease>>,
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
            .field("cert_path", &self.files.cert())
            .field("permitted", &self.permitted)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The CA on disk as it is, for `damselfly ca show` (and `install` while an
/// agent signs with it): reading it changes nothing.
#[derive(Debug, Clone)]
pub struct StoredCa {
    pub cert_pem: String,
    pub cert_path: PathBuf,
    /// The permitted DNS subtrees recorded with it (constraints.txt).
    pub permitted: Vec<String>,
    /// What is wrong with the stored set, if anything: an agent replaces such
    /// a CA when it next starts.
    pub problem: Option<String>,
}

/// What `damselfly ca install` should trust.
#[derive(Debug)]
pub enum ForInstall {
    /// No agent signs with this state dir's CA: it was loaded, created or
    /// replaced for the given registry list exactly as the agent's next
    /// start would (the chart's init container runs just before it).
    Prepared(NodeCa),
    /// An agent signs with the stored CA: that one, unchanged, whatever the
    /// given registry list says.
    InUse(StoredCa),
}

impl NodeCa {
    /// The agent's CA under `<state_dir>/ca`, created if there is none, and
    /// replaced if the one there was made for a different registry list or
    /// is unusable. Holds the [`Lease`] while this value or a resolver made
    /// from it lives, so `damselfly ca` commands know an agent signs with it.
    pub fn load_or_create(state_dir: &Path, registries: &RegistryHosts) -> Result<Self, CaError> {
        let files = CaFiles::new(state_dir);
        let permitted = permitted_dns_subtrees(registries.patterns())?;
        let _lock = DirLock::take(&files.dir)?;
        let lease = Lease::hold(&files)?;
        let mut ca = Self::load_or_create_locked(files, registries, permitted)?;
        ca.lease = Some(Arc::new(lease));
        Ok(ca)
    }

    fn load_or_create_locked(
        files: CaFiles,
        registries: &RegistryHosts,
        permitted: Vec<String>,
    ) -> Result<Self, CaError> {
        let (issuer, origin) = match load(&files, &permitted)? {
            Stored::Valid(issuer) => {
                tighten_key_mode(&files.key())?;
                (*issuer, CaOrigin::Loaded)
            }
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
            stamp: files.stamp(),
            files,
            origin,
            lease: None,
        })
    }

    /// A new key and certificate, replacing the stored ones. A running agent
    /// switches to them within [`LeafPolicy::recheck`]; so that it can, a
    /// registry list whose constraints differ from those of the CA an agent
    /// signs with is refused ([`CaError::InUse`]).
    pub fn rotate(state_dir: &Path, registries: &RegistryHosts) -> Result<Self, CaError> {
        let files = CaFiles::new(state_dir);
        let permitted = permitted_dns_subtrees(registries.patterns())?;
        let _lock = DirLock::take(&files.dir)?;
        if Lease::held(&files)?
            && let Some(stored) = read_stored(&files)?
            && stored.permitted != permitted
        {
            return Err(CaError::InUse {
                dir: files.dir.clone(),
                stored: stored.permitted,
                given: permitted,
            });
        }
        let issuer = create(&files, &permitted)?;
        tracing::info!(dir = %files.dir.display(), "rotated the node CA");
        Ok(Self {
            issuer: Arc::new(issuer),
            registries: registries.clone(),
            permitted,
            stamp: files.stamp(),
            files,
            origin: CaOrigin::Replaced("rotated".into()),
            lease: None,
        })
    }

    /// The stored CA, read without creating, replacing or re-moding
    /// anything; [`CaError::NoCa`] if there is none.
    pub fn stored(state_dir: &Path) -> Result<StoredCa, CaError> {
        let files = CaFiles::new(state_dir);
        // Shared, so a rotation is not read half-written; absent, nothing
        // ever wrote here.
        let _lock = DirLock::shared(&files.dir)?;
        read_stored(&files)?.ok_or(CaError::NoCa(files.dir))
    }

    /// Does an agent sign with the CA under `state_dir` now (holds its
    /// lease)? Creates nothing: without a lease file no agent ever did.
    /// For `damselfly cleanup`, which must not delete a CA in use.
    pub fn in_use(state_dir: &Path) -> Result<bool, CaError> {
        Lease::held_if_present(&CaFiles::new(state_dir))
    }

    /// What `damselfly ca install` trusts: with no agent signing, the CA
    /// prepared for `registries` as the agent would; with one, the stored
    /// CA as it is (replacing it would leave the host trusting a CA the
    /// running agent does not sign with).
    pub fn for_install(
        state_dir: &Path,
        registries: &RegistryHosts,
    ) -> Result<ForInstall, CaError> {
        let files = CaFiles::new(state_dir);
        let permitted = permitted_dns_subtrees(registries.patterns())?;
        let _lock = DirLock::take(&files.dir)?;
        if Lease::held(&files)? {
            let dir = files.dir.clone();
            return Ok(ForInstall::InUse(
                read_stored(&files)?.ok_or(CaError::NoCa(dir))?,
            ));
        }
        Self::load_or_create_locked(files, registries, permitted).map(ForInstall::Prepared)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.issuer.pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.issuer.der
    }

    /// `<state-dir>/ca/ca.crt`.
    pub fn cert_path(&self) -> PathBuf {
        self.files.cert()
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
    /// nothing else), with the default [`LeafPolicy`]. It switches to a CA
    /// that replaces this one on disk (`damselfly ca rotate`).
    pub fn resolver(&self) -> LeafResolver {
        self.resolver_with(LeafPolicy::default())
    }

    /// [`Self::resolver`] with a chosen leaf lifetime, recheck and clock.
    pub fn resolver_with(&self, policy: LeafPolicy) -> LeafResolver {
        LeafResolver::new(
            self.issuer.clone(),
            Watch {
                files: self.files.clone(),
                permitted: self.permitted.clone(),
                stamp: self.stamp.clone(),
                _lease: self.lease.clone(),
            },
            self.registries.clone(),
            policy,
        )
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

/// Identity of the CA files when last loaded: device, inode, mtime and size
/// of each (absent: `None`). Every write is a rename of a new file, so a
/// replacement always changes the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp([Option<FileId>; 3]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    len: u64,
}

impl CaFiles {
    fn stamp(&self) -> Stamp {
        Stamp([self.cert(), self.key(), self.constraints()].map(|p| {
            fs::metadata(p).ok().map(|m| FileId {
                dev: m.dev(),
                ino: m.ino(),
                mtime: (m.mtime(), m.mtime_nsec()),
                len: m.len(),
            })
        }))
    }
}

/// What a resolver needs to notice that the CA was replaced on disk and to
/// load the new one.
pub(crate) struct Watch {
    files: CaFiles,
    permitted: Vec<String>,
    stamp: Stamp,
    _lease: Option<Arc<Lease>>,
}

impl Watch {
    /// The CA that replaced the loaded one on disk, if the files changed
    /// since the last call and hold a usable CA for the same constraints.
    /// A replacement that cannot be used is logged once and ignored: the
    /// old key keeps signing.
    pub(crate) fn replaced(&mut self) -> Option<Issuer> {
        if self.files.stamp() == self.stamp {
            return None;
        }
        let dir = self.files.dir.display().to_string();
        let _lock = match DirLock::shared(&self.files.dir) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::error!(%dir, error = %e, "the node CA changed on disk but could not be locked to read it");
                return None;
            }
        };
        self.stamp = self.files.stamp();
        match load(&self.files, &self.permitted) {
            Ok(Stored::Valid(issuer)) => {
                tracing::warn!(
                    %dir,
                    "the node CA was replaced on disk: new leaves are signed by it; the host must \
                     trust it (damselfly ca install, then restart the container runtime)"
                );
                Some(*issuer)
            }
            Ok(Stored::Missing) => {
                tracing::error!(
                    %dir,
                    "the node CA files are gone: still signing with the CA loaded before; \
                     restart the agent to create a new one"
                );
                None
            }
            Ok(Stored::Stale(why)) => {
                tracing::error!(
                    %dir,
                    %why,
                    "the node CA changed on disk but cannot be used: still signing with the CA \
                     loaded before, which hosts trusting the new files reject; run `damselfly ca \
                     rotate` with the agent's --registry list, or restart the agent (it replaces \
                     an unusable CA)"
                );
                None
            }
            Err(e) => {
                tracing::error!(%dir, error = %e, "reading the replaced node CA; still signing with the CA loaded before");
                None
            }
        }
    }
}

/// A shared `flock` on `<ca dir>/.agent`, held by every process that signs
/// leaves with the CA (the agent), for as long as it does. `damselfly ca`
/// commands test for it to avoid changing the CA's constraints under it.
pub(crate) struct Lease {
    _file: File,
}

impl Lease {
    fn path(files: &CaFiles) -> PathBuf {
        files.dir.join(".agent")
    }

    fn open(files: &CaFiles) -> Result<File, CaError> {
        let path = Self::path(files);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening", &path))
    }

    fn hold(files: &CaFiles) -> Result<Self, CaError> {
        let file = Self::open(files)?;
        flock(&file, libc::LOCK_SH).map_err(io_err("locking", &Self::path(files)))?;
        Ok(Self { _file: file })
    }

    /// Does some process (this one included) hold the lease now?
    fn held(files: &CaFiles) -> Result<bool, CaError> {
        Self::test(files, &Self::open(files)?)
    }

    /// [`Self::held`], creating nothing: `false` if there is no lease file.
    fn held_if_present(files: &CaFiles) -> Result<bool, CaError> {
        let path = Self::path(files);
        match File::open(&path) {
            Ok(file) => Self::test(files, &file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("opening", &path)(e)),
        }
    }

    fn test(files: &CaFiles, file: &File) -> Result<bool, CaError> {
        match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(io_err("locking", &Self::path(files))(e)),
        }
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; released when it is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The stored certificate and constraints (`None` without a ca.crt), and
/// what [`load`] would find wrong with the set.
fn read_stored(files: &CaFiles) -> Result<Option<StoredCa>, CaError> {
    let Some(cert_pem) = read_optional(&files.cert())? else {
        return Ok(None);
    };
    let permitted: Vec<String> = read_optional(&files.constraints())?
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let problem = match load(files, &permitted)? {
        Stored::Valid(_) => None,
        Stored::Stale(why) => Some(why),
        Stored::Missing => Some("incomplete set of CA files".into()),
    };
    Ok(Some(StoredCa {
        cert_pem,
        cert_path: files.cert(),
        permitted,
        problem,
    }))
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

/// A `flock` on `<ca dir>/.lock`: exclusive to create or replace the CA, so
/// an agent and a `damselfly ca` command starting together do not both
/// create one; shared to read it, so a replacement is not read half-written.
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
        flock(&f, libc::LOCK_EX).map_err(io_err("locking", &path))?;
        Ok(Self { _file: f })
    }

    /// Creates nothing: `None` if there is no lock file (then no CA was
    /// ever written here).
    fn shared(dir: &Path) -> Result<Option<Self>, CaError> {
        let path = dir.join(".lock");
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        flock(&f, libc::LOCK_SH).map_err(io_err("locking", &path))?;
        Ok(Some(Self { _file: f }))
    }
}

#[cfg(test)]
mod tests;

pub use constraints::difference;
pub use runtime::{RUNTIME_UNITS, RuntimeUnit, Systemd};
pub use trust::{CERTS_D, CertsDirs, CertsDirsChange, Installed, Removed, TrustStore};
