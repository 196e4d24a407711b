//! The origin registry: Debian's `docker-registry` (distribution 2.8) with
//! TLS on port 443 in a node of its own, a certificate from the test public
//! CA, and optional htpasswd auth.
//!
//! What it sent is read from its own log: distribution logs one JSON line per
//! request (`"msg":"response completed"`) with `http.request.method`,
//! `http.request.uri`, `http.response.status` and `http.response.written`.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    agent,
    pki::TestCa,
    probe::Serve,
    testbed::{Node, Proc, Testbed},
    tools,
};

pub struct Origin {
    /// Host name clients use, e.g. `registry.dfly.test` (in every node's /etc/hosts).
    pub name: String,
    pub addr: SocketAddr,
    /// The node the registry runs in.
    pub node: Node,
    /// The test public CA (PEM) that issued the registry's certificate.
    pub ca_pem: PathBuf,
    /// A directory holding only `ca.crt`: for skopeo's `--*-cert-dir`.
    pub ca_dir: PathBuf,
    /// `(user, password)` when the registry is private.
    pub auth: Option<(String, String)>,
    /// HTTPS on 443, or plain HTTP on 80.
    pub tls: bool,
    /// Config, certificate, htpasswd, storage and log of this registry.
    pub dir: PathBuf,
    pub proc: Proc,
}

impl Origin {
    /// Start a registry named `name` on port 443 of node `node` (1-based, as
    /// [`Testbed::node`]) and add `name` to every node's /etc/hosts. With
    /// `auth`, the registry only answers that user (htpasswd, bcrypt).
    /// Returns once `GET /v2/` answers over TLS (200, or 401 with auth).
    pub fn start(
        tb: &Testbed,
        node: usize,
        name: &str,
        ca: &TestCa,
        auth: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        Self::launch(tb, node, name, ca, auth, true, None)
    }

    /// A pull-through cache of `upstream` (distribution's `proxy.remoteurl`)
    /// named `name` on port 443 of node `node`, trusting `upstream`'s CA for
    /// its own fetches: what a registry mirror or a Harbor proxy project runs.
    pub fn start_proxy(
        tb: &Testbed,
        node: usize,
        name: &str,
        ca: &TestCa,
        upstream: &Origin,
    ) -> anyhow::Result<Self> {
        Self::launch(tb, node, name, ca, None, true, Some(upstream))
    }

    /// The same registry over plain HTTP on port 80 (no auth).
    pub fn start_plain(tb: &Testbed, node: usize, name: &str, ca: &TestCa) -> anyhow::Result<Self> {
        Self::launch(tb, node, name, ca, None, false, None)
    }

    fn launch(
        tb: &Testbed,
        node: usize,
        name: &str,
        ca: &TestCa,
        auth: Option<(&str, &str)>,
        tls: bool,
        upstream: Option<&Origin>,
    ) -> anyhow::Result<Self> {
        let bin = tools::need("docker-registry", "docker-registry")?;
        let node = tb.node(node).clone();
        let dir = tb.dir.join(format!("origin-{name}"));
        let ca_dir = dir.join("ca");
        fs::create_dir_all(&ca_dir)?;
        let ca_pem = ca_dir.join("ca.crt");
        fs::write(&ca_pem, ca.pem())?;
        let (crt, key) = ca.issue(&[name])?.write(&dir, "server")?;
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let addr = node.addr4(if tls { 443 } else { 80 });

        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 cache:\n    blobdescriptor: inmemory\n\
             http:\n  addr: {addr}\n",
            storage = storage.display(),
        );
        if tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            ));
        }
        if let Some((user, pass)) = auth {
            let htpasswd = dir.join("htpasswd");
            // Cost 4 (the minimum): the registry checks it on every request.
            let hash = bcrypt::hash_with_result(pass, 4)?.format_for_version(bcrypt::Version::TwoY);
            fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: dfly-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(up) = upstream {
            let scheme = if up.tls { "https" } else { "http" };
            config.push_str(&format!("proxy:\n  remoteurl: {scheme}://{}\n", up.name));
        }
        let cfg = dir.join("config.yml");
        fs::write(&cfg, config)?;
        tb.add_host(name, node.ip4.into())?;

        let mut cmd = node.command(bin)?;
        if let Some(up) = upstream {
            tools::isolate_env(&mut cmd, &up.ca_pem, &up.ca_dir);
        }
        cmd.arg("serve").arg(&cfg);
        let mut proc = node.spawn(cmd, &dir.join("registry.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let want = if auth.is_some() { 401 } else { 200 };
        loop {
            if !proc.running() {
                bail!("docker-registry exited during start:\n{}", proc.log_text());
            }
            let status = if tls {
                tls_status(&node, addr, name, &ca_pem, "/v2/")
            } else {
                node.http_get(addr, "/v2/").map(|(code, _)| code)
            };
            match status {
                Ok(code) if code == want => break,
                Ok(code) => bail!("registry answered /v2/ with {code}, expected {want}"),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "registry not answering /v2/ after 20 s ({e:#}):\n{}",
                        proc.log_text()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        Ok(Self {
            name: name.to_string(),
            addr,
            node,
            ca_pem,
            ca_dir,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            tls,
            dir,
            proc,
        })
    }

    /// The agent flags that make it intercept this registry and trust its CA
    /// on the way to it: `--registry NAME --upstream-ca CA`.
    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            "--registry".into(),
            self.name.clone(),
            "--upstream-ca".into(),
            self.ca_pem.display().to_string(),
        ]
    }

    /// What port 80 of most HTTPS registries and ingresses is: a server on
    /// the registry's address answering every request with 301 to https on
    /// the same host and path. Runs until the returned process is dropped.
    pub fn redirect_port_80(&self, tb: &Testbed) -> anyhow::Result<Proc> {
        anyhow::ensure!(self.tls, "{} has no https to redirect to", self.name);
        agent::start_server_as(
            tb,
            &self.node,
            &[SocketAddr::new(self.addr.ip(), 80)],
            &[],
            None,
            &Serve::RedirectHttps,
        )
    }

    /// `name/repo:tag`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.name)
    }

    /// `(user, password)` borrowed, as the pull helpers take it.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Every request the registry completed so far, from its log.
    pub fn requests(&self) -> Vec<Request> {
        parse_log(&self.proc.log_text())
    }

    /// Body bytes of blob GETs the registry has sent so far (all statuses;
    /// an error body is a few hundred bytes at most).
    pub fn blob_bytes_sent(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.is_blob_get())
            .map(|r| r.written)
            .sum()
    }

    /// Number of blob GETs answered 200 or 206 so far.
    pub fn blob_gets(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is_blob_get() && matches!(r.status, 200 | 206))
            .count()
    }

    /// Poll [`Origin::blob_bytes_sent`] until it reaches `at_least` or
    /// `limit` passes (the registry logs a request just after its last byte,
    /// so right after a pull the count may lag by a few ms). Returns the count.
    pub fn wait_blob_bytes(&self, at_least: u64, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.blob_bytes_sent();
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes the origin's node has sent on its link (veth tx counter).
    pub fn link_bytes(&self) -> anyhow::Result<u64> {
        Ok(self.node.link_bytes()?.0)
    }

    /// Status of `GET path` over TLS from inside the registry's node,
    /// verifying the certificate against the test CA.
    pub fn get_status(&self, path: &str) -> anyhow::Result<u16> {
        tls_status(&self.node, self.addr, &self.name, &self.ca_pem, path)
    }
}

/// One line of the registry's request log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub written: u64,
}

impl Request {
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.uri.contains("/blobs/") && !self.uri.contains("/blobs/uploads")
    }
}

/// The completed requests in a distribution JSON log; other lines are skipped.
pub fn parse_log(text: &str) -> Vec<Request> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some(Request {
                method: v.get("http.request.method")?.as_str()?.to_string(),
                uri: v.get("http.request.uri")?.as_str()?.to_string(),
                status: v.get("http.response.status")?.as_u64()? as u16,
                written: v.get("http.response.written")?.as_u64()?,
            })
        })
        .collect()
}

/// `GET path` over TLS (HTTP/1.0) from inside `node`; returns the status code.
pub fn tls_status(
    node: &Node,
    addr: SocketAddr,
    name: &str,
    ca_pem: &std::path::Path,
    path: &str,
) -> anyhow::Result<u16> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = fs::read(ca_pem)?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n");
    node.in_netns(move || -> anyhow::Result<u16> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let conn = rustls::ClientConnection::new(Arc::new(config), server_name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request.as_bytes())?;
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = tls.read(&mut head[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        let text = String::from_utf8_lossy(&head[..n]);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status in {text:?}"))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_json_log_lines() {
        let log = r#"{"go.version":"go1.19.8","level":"info","msg":"listening on 10.0.0.1:443"}
{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/sha256:ab","http.response.status":200,"http.response.written":2097152,"msg":"response completed"}
10.0.0.2 - - [25/Nov/2026:19:01:12 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "ctr"
{"http.request.method":"HEAD","http.request.uri":"/v2/r/blobs/sha256:ab","http.response.status":200,"http.response.written":0,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/manifests/t","http.response.status":200,"http.response.written":500,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/uploads/x","http.response.status":204,"http.response.written":0,"msg":"response completed"}
"#;
        let reqs = parse_log(log);
        assert_eq!(reqs.len(), 4);
        let blob: u64 = reqs
            .iter()
            .filter(|r| r.is_blob_get())
            .map(|r| r.written)
            .sum();
        assert_eq!(blob, 2097152);
    }
}
