//! A throwaway "public" CA for test origins, so clients verify real chains
//! without touching the machine's trust store.

use std::{fs, path::Path};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for DNS names and/or IP addresses.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<Issued> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Write `<stem>.crt` and `<stem>.key` into `dir`; returns their paths.
    pub fn write(
        &self,
        dir: &Path,
        stem: &str,
    ) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
        let crt = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        fs::write(&crt, &self.cert_pem)?;
        fs::write(&key, &self.key_pem)?;
        Ok((crt, key))
    }
}
