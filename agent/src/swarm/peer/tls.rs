//! Mutual TLS between peers, from the cluster CA (`--cluster-ca`) and this
//! node's certificate and key (`--cluster-cert`, `--cluster-key`), PEM.
//!
//! # Names
//!
//! Peers are dialled by address, and a node's certificate cannot be made to
//! name every address it may be reached at, so authentication is "holds a
//! key certified by the cluster CA", not "is that particular node":
//!
//! - The server requires a client certificate chaining to the cluster CA
//!   and carrying the DNS SAN [`PEER_SERVER_NAME`] (`damselfly-peer`):
//!   [`crate::pki::peer_client_verifier`], since webpki checks no name on a
//!   client certificate and the tracker's, from the same CA, is no peer's.
//! - The client verifies the server's chain against the cluster CA and checks
//!   it for the same fixed name, whatever address it dialled.
//!
//! So every peer certificate carries the DNS SAN `damselfly-peer` (the node
//! name may be added for logs) and, since each peer is both server and
//! client, the extended key usages serverAuth and clientAuth (or none). The
//! cluster CA should be used for nothing else: anything it signs may join the
//! swarm. TLS 1.3 only, as QUIC requires; ALPN [`ALPN`]. [`ClusterPki::load`]
//! checks all of this before the agent starts.

use std::sync::Arc;

use quinn::{
    TransportConfig,
    crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig},
};
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};

use crate::pki::PEER_SERVER_NAME;
use crate::pki::{ClusterPki, peer_client_verifier, provider};

pub(super) const ALPN: &[u8] = b"damselfly/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("cluster CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Quic(#[from] NoInitialCipherSuite),
    #[error("a peer server needs a certificate and key")]
    NoIdentity,
}

/// The cluster CA and this node's identity; cheap to clone.
#[derive(Clone)]
pub struct PeerTls {
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
}

#[derive(Clone)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl PeerTls {
    /// From the cluster PKI, which [`ClusterPki::load`] has checked.
    pub fn new(pki: &ClusterPki) -> Result<Self, TlsError> {
        let mut tls = Self::roots_only(&pki.ca)?;
        tls.identity = Some(Identity {
            chain: pki.chain.clone(),
            key: pki.key.clone(),
        });
        Ok(tls)
    }

    /// Trusts the cluster CA but has no certificate of its own: servers
    /// refuse it. For tests of exactly that.
    pub(crate) fn roots_only(ca: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c.clone())?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            identity: None,
        })
    }

    /// TLS 1.3, a client certificate chaining to the cluster CA required;
    /// for QUIC ([`PeerTls::server_config`]) and the admin server's HTTPS.
    pub fn tls_server(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let id = self.identity.as_ref().ok_or(TlsError::NoIdentity)?;
        let verifier = peer_client_verifier(self.roots.clone())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain.clone(), id.key.clone_key())?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// TLS 1.3 with this node's certificate (if any), checking the server's
    /// chain against the cluster CA for [`PEER_SERVER_NAME`], whatever name or
    /// address was dialled (see the module docs).
    pub fn tls_client(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(PeerNameVerifier(
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider()).build()?,
        ));
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut tls = match &self.identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    pub fn server_config(
        &self,
        transport: Arc<TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.tls_server(ALPN)?;
        let mut config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        config.transport_config(transport);
        Ok(config)
    }

    pub fn client_config(
        &self,
        transport: Arc<TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.tls_client(ALPN)?;
        let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        config.transport_config(transport);
        Ok(config)
    }
}

/// WebPKI server verification against the cluster CA, for the fixed name
/// [`PEER_SERVER_NAME`] instead of the one dialled: a peer or seed is reached
/// by whatever address or DNS name the cluster gives it, and its certificate
/// names none of them.
#[derive(Debug)]
struct PeerNameVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for PeerNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(PEER_SERVER_NAME).expect("a valid DNS name");
        self.0
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
