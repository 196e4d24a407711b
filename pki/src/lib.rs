//! The cluster PKI: `--cluster-ca`, `--cluster-cert` and `--cluster-key`,
//! read and checked in one place ([`ClusterPki::load`]) by everything that
//! authenticates to other cluster members: the agent (its peers and its
//! tracker connections, [`Role::Peer`]) and `damselfly tracker`
//! ([`Role::Tracker`]).
//!
//! A mistake here does not fail loudly on its own: every peer handshake
//! fails, each fetch quietly falls back to the origin, and the swarm saves
//! nothing. So the files are checked before anything starts, as a peer will
//! check them, and the first problem is reported with the flag, the file and
//! the check:
//!
//! - `--cluster-ca`: PEM certificates, each a CA (basicConstraints CA:TRUE,
//!   keyCertSign if it has a keyUsage), valid now.
//! - `--cluster-cert`: the node certificate first (intermediates may follow),
//!   valid now, not a CA, with the DNS SAN of its role ([`PEER_SERVER_NAME`]
//!   or [`TRACKER_SERVER_NAME`]), and if it has a keyUsage,
//!   digitalSignature; if it has an extendedKeyUsage, serverAuth, and for a
//!   peer also clientAuth (every peer is both, and a client of the tracker).
//!   Then the whole chain is verified by webpki against the CA as the other
//!   side will: as a server for the role's name, and for a peer as a client.
//! - `--cluster-key`: a PEM private key (PKCS#1, PKCS#8 or SEC1: Helm's
//!   `genSignedCert` writes PKCS#1 RSA) that belongs to the certificate.

use std::{
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, InconsistentKeys, RootCertStore,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerifier as _},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, parse_x509_certificate, time::ASN1Time,
};

/// The name every peer certificate carries and every peer checks: peers are
/// dialled by address, so no per-node name could be verified. The tracker
/// requires it of its clients too.
pub const PEER_SERVER_NAME: &str = "damselfly-peer";

/// The name the tracker's certificate carries and agents check, whatever
/// address they dialled. Peer certificates do not carry it, so a node cannot
/// pose as the tracker to the others.
pub const TRACKER_SERVER_NAME: &str = "damselfly-tracker";

/// What a certificate is for: which name it must carry and which way it is
/// used in TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: a QUIC server and client to other peers, a client of the
    /// tracker.
    Peer,
    /// `damselfly tracker`: a TLS server only.
    Tracker,
}

impl Role {
    /// The DNS SAN the other side verifies.
    pub fn server_name(self) -> &'static str {
        match self {
            Role::Peer => PEER_SERVER_NAME,
            Role::Tracker => TRACKER_SERVER_NAME,
        }
    }

    /// Who verifies that name, for messages.
    fn verifiers(self) -> &'static str {
        match self {
            Role::Peer => "the swarm's peers and the tracker verify",
            Role::Tracker => "agents verify",
        }
    }
}

/// One of the three inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Ca,
    Cert,
    Key,
}

impl Part {
    /// The command-line flag that names it.
    pub fn flag(self) -> &'static str {
        match self {
            Part::Ca => "--cluster-ca",
            Part::Cert => "--cluster-cert",
            Part::Key => "--cluster-key",
        }
    }
}

/// What is wrong with one part, without its file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {what}", part.flag())]
pub struct Problem {
    pub part: Part,
    pub what: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    // The io::Error is in the message rather than a source, so that anyhow
    // does not print it twice.
    #[error("{} {}: {error}", part.flag(), path.display())]
    Read {
        part: Part,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{} {}: {what}", part.flag(), path.display())]
    Invalid {
        part: Part,
        path: PathBuf,
        what: String,
    },
}

/// Where the three parts are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClusterFiles {
    fn path(&self, part: Part) -> &Path {
        match part {
            Part::Ca => &self.ca,
            Part::Cert => &self.cert,
            Part::Key => &self.key,
        }
    }
}

/// The cluster CA and this node's certificate chain and key.
pub struct ClusterPki {
    pub ca: Vec<CertificateDer<'static>>,
    /// This node's certificate, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for ClusterPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPki")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl ClusterPki {
    /// Reads the three files and checks them for `role` (see the module
    /// doc). Every loader of the cluster PKI goes through here.
    pub fn load(files: &ClusterFiles, role: Role) -> Result<Self, PkiError> {
        let read = |part: Part| {
            let path = files.path(part);
            std::fs::read(path).map_err(|error| PkiError::Read {
                part,
                path: path.to_path_buf(),
                error,
            })
        };
        let (ca, cert, key) = (read(Part::Ca)?, read(Part::Cert)?, read(Part::Key)?);
        Self::from_pem(&ca, &cert, &key, role, UnixTime::now()).map_err(|p| PkiError::Invalid {
            path: files.path(p.part).to_path_buf(),
            part: p.part,
            what: p.what,
        })
    }

    /// [`Self::load`] from memory, checked as of `now`.
    pub fn from_pem(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        role: Role,
        now: UnixTime,
    ) -> Result<Self, Problem> {
        let pki = Self::parse(ca_pem, cert_pem, key_pem)?;
        pki.check(role, now)?;
        Ok(pki)
    }

    /// The cluster CA as a trust store.
    pub fn roots(&self) -> Result<Arc<RootCertStore>, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// PEM to DER and nothing more: for tests that need a PKI the check
    /// would refuse (a certificate from another CA, to be refused by peers).
    /// Everything else goes through [`Self::load`].
    pub fn parse(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Problem> {
        let ca = certs(Part::Ca, ca_pem)?;
        let chain = certs(Part::Cert, cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            problem(
                Part::Key,
                format!("not a PEM private key (PKCS#1, PKCS#8 or SEC1): {e}"),
            )
        })?;
        Ok(Self {
            ca,
            chain,
            key: Arc::new(key),
        })
    }

    fn check(&self, role: Role, now: UnixTime) -> Result<(), Problem> {
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let mut roots = RootCertStore::empty();
        let mut ca_subjects = Vec::new();
        for (i, der) in self.ca.iter().enumerate() {
            let ca = x509(Part::Ca, i, der)?;
            check_ca(&ca, now_secs)?;
            ca_subjects.push(ca.subject().to_string());
            roots.add(der.clone()).map_err(|e| {
                problem(
                    Part::Ca,
                    format!("{} is not usable as a trust anchor: {e}", ca.subject()),
                )
            })?;
        }
        let leaf = x509(Part::Cert, 0, &self.chain[0])?;
        check_leaf(&leaf, role, now_secs)?;
        self.check_key()?;
        let (who, whom) = match role {
            Role::Peer => ("a peer", "peers"),
            Role::Tracker => ("an agent", "agents"),
        };
        verify_chain(&self.chain, Arc::new(roots), role, now).map_err(|e| {
            let what = match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                    "not issued by the cluster CA (its issuer is {}; --cluster-ca holds {}); \
                     {whom} would refuse it",
                    leaf.issuer(),
                    ca_subjects.join(" and ")
                ),
                other => format!(
                    "does not verify against --cluster-ca as {who} checks it: {other}; {whom} \
                     would refuse it"
                ),
            };
            problem(Part::Cert, what)
        })
    }

    fn check_key(&self) -> Result<(), Problem> {
        let signing = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| problem(Part::Key, format!("unusable private key: {e}")))?;
        CertifiedKey::new(self.chain.clone(), signing)
            .keys_match()
            .map_err(|e| {
                let why = match e {
                    rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                        "their public keys differ".to_string()
                    }
                    other => other.to_string(),
                };
                problem(
                    Part::Key,
                    format!("not the key of the certificate in --cluster-cert ({why})"),
                )
            })
    }
}

/// The crypto every cluster TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn problem(part: Part, what: impl Into<String>) -> Problem {
    Problem {
        part,
        what: what.into(),
    }
}

fn certs(part: Part, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(part, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(problem(part, "no CERTIFICATE block in the PEM"));
    }
    Ok(certs)
}

fn x509<'a>(part: Part, index: usize, der: &'a [u8]) -> Result<X509Certificate<'a>, Problem> {
    parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| problem(part, format!("certificate {} is not X.509: {e}", index + 1)))
}

/// Outside its validity at `now`, webpki refuses a leaf and peers refuse a
/// CA's whole tree.
fn check_validity(part: Part, cert: &X509Certificate<'_>, now: i64) -> Result<(), Problem> {
    let (from, to) = (&cert.validity().not_before, &cert.validity().not_after);
    let now_shown = ASN1Time::from_timestamp(now)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| now.to_string());
    if now < from.timestamp() {
        return Err(problem(
            part,
            format!(
                "{} is not valid before {from} (this node's clock says {now_shown})",
                cert.subject()
            ),
        ));
    }
    if now > to.timestamp() {
        return Err(problem(
            part,
            format!("{} expired {to} (now {now_shown})", cert.subject()),
        ));
    }
    Ok(())
}

fn check_ca(ca: &X509Certificate<'_>, now: i64) -> Result<(), Problem> {
    let is_ca = matches!(ca.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(problem(
            Part::Ca,
            format!(
                "{} is not a CA certificate (no basicConstraints CA:TRUE){}",
                ca.subject(),
                if has_peer_name(ca) {
                    "; it looks like a node certificate: --cluster-ca takes the CA that issued it"
                } else {
                    ""
                }
            ),
        ));
    }
    if let Ok(Some(ku)) = ca.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(problem(
            Part::Ca,
            format!(
                "{} has keyUsage {} without keyCertSign: it cannot issue certificates",
                ca.subject(),
                ku.value
            ),
        ));
    }
    check_validity(Part::Ca, ca, now)
}

fn check_leaf(leaf: &X509Certificate<'_>, role: Role, now: i64) -> Result<(), Problem> {
    check_validity(Part::Cert, leaf, now)?;
    if matches!(leaf.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(problem(
            Part::Cert,
            format!(
                "{} is a CA certificate (basicConstraints CA:TRUE); --cluster-cert takes this \
                 node's certificate, issued by that CA",
                leaf.subject()
            ),
        ));
    }
    let name = role.server_name();
    if !has_dns_name(leaf, name) {
        let names = san_names(leaf);
        let has = if names.is_empty() {
            format!(
                "it has no subjectAltName; its subject {} is not used",
                leaf.subject()
            )
        } else {
            format!("has: {}", names.join(", "))
        };
        return Err(problem(
            Part::Cert,
            format!(
                "no subjectAltName DNS:{name} ({has}); {} that name",
                role.verifiers()
            ),
        ));
    }
    if let Ok(Some(ku)) = leaf.key_usage()
        && !ku.value.digital_signature()
    {
        return Err(problem(
            Part::Cert,
            format!(
                "keyUsage {} lacks digitalSignature, which TLS 1.3 handshakes sign with",
                ku.value
            ),
        ));
    }
    match leaf.extended_key_usage() {
        Ok(Some(eku)) => {
            let eku = eku.value;
            let missing: Vec<&str> = [
                ("serverAuth", eku.server_auth),
                ("clientAuth", eku.client_auth || role == Role::Tracker),
            ]
            .into_iter()
            .filter(|(_, has)| !has)
            .map(|(name, _)| name)
            .collect();
            if !missing.is_empty() {
                let why = match role {
                    Role::Peer => {
                        "every peer is both a TLS server and a client, so it needs serverAuth \
                         and clientAuth"
                    }
                    Role::Tracker => "the tracker is a TLS server, so it needs serverAuth",
                };
                return Err(problem(
                    Part::Cert,
                    format!(
                        "extendedKeyUsage lacks {}; {why} (or no extendedKeyUsage at all)",
                        missing.join(" and ")
                    ),
                ));
            }
        }
        Ok(None) => {}
        Err(e) => {
            return Err(problem(
                Part::Cert,
                format!("unreadable extendedKeyUsage: {e}"),
            ));
        }
    }
    Ok(())
}

fn has_peer_name(cert: &X509Certificate<'_>) -> bool {
    has_dns_name(cert, PEER_SERVER_NAME)
}

fn has_dns_name(cert: &X509Certificate<'_>, name: &str) -> bool {
    matches!(cert.subject_alternative_name(), Ok(Some(san))
        if san.value.general_names.iter().any(
            |n| matches!(n, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(name))))
}

/// The SAN entries, DNS names bare and the rest tagged, for messages.
fn san_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => (*d).to_string(),
            GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b)
                .map(IpAddr::from)
                .or_else(|_| <[u8; 16]>::try_from(*b).map(IpAddr::from))
            {
                Ok(ip) => format!("IP:{ip}"),
                Err(_) => "IP:?".into(),
            },
            GeneralName::RFC822Name(e) => format!("email:{e}"),
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect()
}

/// The chain as the other side verifies it: a client checks the server's
/// certificate for the role's name, and (peers only) a server checks the
/// client's.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: Arc<RootCertStore>,
    role: Role,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = (&chain[0], &chain[1..]);
    let as_server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    as_server.verify_server_cert(
        leaf,
        intermediates,
        &ServerName::try_from(role.server_name()).expect("a valid DNS name"),
        &[],
        now,
    )?;
    if role == Role::Tracker {
        return Ok(());
    }
    let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    as_client.verify_client_cert(leaf, intermediates, now)?;
    Ok(())
}

#[cfg(test)]
mod tests;

/// The server side of every cluster TLS endpoint (peers over QUIC, the
/// tracker over TCP): a client certificate must chain to the cluster CA
/// (webpki) and carry the DNS SAN [`PEER_SERVER_NAME`]. webpki alone checks
/// no name on a client certificate, so any certificate the cluster CA ever
/// signed (the tracker's, say) would otherwise pass for a peer.
pub fn peer_client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    Ok(Arc::new(NamedClientVerifier {
        inner,
        name: PEER_SERVER_NAME,
    }))
}

#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: &'static str,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let named = parse_x509_certificate(end_entity)
            .is_ok_and(|(_, cert)| has_dns_name(&cert, self.name));
        if !named {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What tells one node's certificate from another's: its subjectAltNames
/// other than the shared [`PEER_SERVER_NAME`] and [`TRACKER_SERVER_NAME`]
/// (DNS, URI and IP entries), sorted and joined with commas; `None` when it
/// has no other, as the chart's shared certificate has none. The tracker binds
/// a peer id to this identity when there is one (per-node certificates), and
/// to the caller's address otherwise.
pub fn node_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = parse_x509_certificate(cert).ok()?;
    let mut names: Vec<String> = san_names(&cert)
        .into_iter()
        .filter(|n| {
            !n.eq_ignore_ascii_case(PEER_SERVER_NAME)
                && !n.eq_ignore_ascii_case(TRACKER_SERVER_NAME)
        })
        .collect();
    names.sort();
    names.dedup();
    (!names.is_empty()).then(|| names.join(","))
}
