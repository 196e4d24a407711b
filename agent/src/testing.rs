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

/// Writes at `script` a stand-in for Debian's update-ca-certificates on the
/// host root `root`: it bundles the local CAs into
/// `etc/ssl/certs/ca-certificates.crt` as the real one does, since `ca
/// install` checks that the bundle holds the CA. For `--update-command`.
pub fn stand_in_update_ca_certificates(root: &Path, script: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let r = root.display();
    fs::write(
        script,
        format!(
            "#!/bin/sh\nmkdir -p {r}/etc/ssl/certs\n\
             cat /dev/null {r}/usr/local/share/ca-certificates/*.crt \
             > {r}/etc/ssl/certs/ca-certificates.crt 2>/dev/null\nexit 0\n"
        ),
    )
    .unwrap();
    fs::set_permissions(script, fs::Permissions::from_mode(0o755)).unwrap();
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

/// Loopback HTTP and HTTPS servers for unit tests that fake an origin at the
/// HTTP boundary: each records what it was asked and answers by a closure.
#[cfg(test)]
pub mod http {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{HeaderMap, Method, Request, Response, body::Incoming, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::{net::TcpListener, task::JoinHandle};

    /// One request a [`Server`] was sent.
    #[derive(Debug, Clone)]
    pub struct Seen {
        pub method: Method,
        /// Path and query.
        pub target: String,
        pub headers: HeaderMap,
    }

    type Answer = dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync;

    pub struct Server {
        pub addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        accepted: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Server {
        /// Serves on `addr` (port 0 for any), over TLS with `tls`.
        pub async fn start(
            addr: SocketAddr,
            tls: Option<Arc<rustls::ServerConfig>>,
            answer: impl Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
        ) -> std::io::Result<Self> {
            let listener = TcpListener::bind(addr).await?;
            let addr = listener.local_addr()?;
            let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
            let answer: Arc<Answer> = Arc::new(answer);
            let log = seen.clone();
            let accepted: Arc<AtomicUsize> = Arc::default();
            let count = accepted.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::Relaxed);
                    let (log, answer, tls) = (log.clone(), answer.clone(), tls.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let seen = Seen {
                                method: req.method().clone(),
                                target: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: req.headers().clone(),
                            };
                            let resp = answer(&seen);
                            log.lock().unwrap().push(seen);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        match tls {
                            Some(cfg) => {
                                let Ok(s) =
                                    tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                                else {
                                    return;
                                };
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    });
                }
            });
            Ok(Self {
                addr,
                seen,
                accepted,
                task,
            })
        }

        pub fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        /// TCP connections accepted, whether or not a request followed.
        pub fn connections(&self) -> usize {
            self.accepted.load(Ordering::Relaxed)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A reply with `status`, `headers` and an empty body.
    pub fn reply(status: u16, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
        let mut r = Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    }

    /// A throwaway CA: roots that trust it, and server configs for names it signs.
    pub struct Pki {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Default for Pki {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Pki {
        pub fn new() -> Self {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self { cert, key }
        }

        pub fn roots(&self) -> rustls::RootCertStore {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.cert.der().clone()).unwrap();
            roots
        }

        /// A server certificate for `names`, as a server config (h2 and http/1.1).
        pub fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &self.cert, &self.key)
                .unwrap();
            let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let mut cfg = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(cfg)
        }
    }
}
