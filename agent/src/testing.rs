//! Helpers shared by this crate's unit tests and its integration tests
//! (`agent/tests`). Not used by the agent itself.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

/// `<tmp>/dfly-<pid>-<label>-<n>`, fresh, removed on drop (also when a test
/// panics). The pid in the name lets the testbed sweep what a killed run left.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "dfly-{}-{label}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("creating a temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A throwaway cluster CA issuing certificates the way the chart does, for
/// tests of everything that speaks the cluster's TLS.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("a CA certificate");
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for these SANs, server and client auth: (cert, key) PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid names");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// The PKI of a node holding `(cert, key)` and trusting this CA, unchecked
    /// (a test may want one that the startup check would refuse).
    pub fn pki(&self, (cert, key): (String, String)) -> crate::pki::ClusterPki {
        crate::pki::ClusterPki::parse(self.pem().as_bytes(), cert.as_bytes(), key.as_bytes())
            .expect("PEM")
    }

    /// An agent's: SAN `damselfly-peer` and the node name.
    pub fn peer(&self, node: &str) -> crate::pki::ClusterPki {
        self.pki(self.issue(&[crate::pki::PEER_SERVER_NAME, node]))
    }

    /// The tracker's: SAN `damselfly-tracker`.
    pub fn tracker(&self) -> crate::pki::ClusterPki {
        self.pki(self.issue(&[crate::pki::TRACKER_SERVER_NAME]))
    }

    /// Writes `<stem>.crt`, `<stem>.key` and `ca.crt` into `dir`, for a
    /// process that takes `--cluster-ca/--cluster-cert/--cluster-key`; returns
    /// those three flags with their values.
    pub fn write(&self, dir: &Path, stem: &str, (cert, key): (String, String)) -> Vec<String> {
        let (ca, crt, k) = (
            dir.join("ca.crt"),
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        fs::write(&ca, self.pem()).expect("writing the CA");
        fs::write(&crt, cert).expect("writing a certificate");
        fs::write(&k, key).expect("writing a key");
        [
            ("--cluster-ca", ca),
            ("--cluster-cert", crt),
            ("--cluster-key", k),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
    }
}
