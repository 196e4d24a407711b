//! `dfly-probe`: the test client and origin server. Plain std + rustls, one
//! thread per connection: small enough to trust as a measuring stick.
//!
//! Server routes: `GET /bytes/<n>[?seed=<s>]` answers `n` deterministic bytes
//! (see [`crate::body`]); `GET /peer` answers the client address it sees.
//! Two other ways to serve (see [`Serve`]): every request redirected to
//! https on the same host (port 80 of most HTTPS registries and ingresses),
//! or every connection and request written down and answered 200 (a server
//! that says yes to anything, which records all it was sent).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::body;

/// What `dfly-probe get` prints (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GetResult {
    pub status: u16,
    pub bytes: u64,
    pub sha256: String,
    /// The peer as `getpeername` reports it inside the client.
    pub peer: String,
    pub millis: u64,
    pub error: Option<String>,
    /// Response headers, names lowercased.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Set this thread's comm (what the kernel programs match), as `ctr` would have it.
pub fn set_comm(name: &str) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) } != 0 {
        bail!("prctl(PR_SET_NAME): {}", io::Error::last_os_error());
    }
    Ok(())
}

struct Url {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Url> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("URL must start with http:// or https://: {url}");
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').context("unclosed [")?;
        let port = p
            .strip_prefix(':')
            .map(str::parse)
            .transpose()?
            .unwrap_or(default_port);
        (h.to_string(), port)
    } else if let Some((h, p)) = authority.rsplit_once(':') {
        (h.to_string(), p.parse()?)
    } else {
        (authority.to_string(), default_port)
    };
    Ok(Url {
        tls,
        host,
        port,
        path: path.to_string(),
    })
}

/// How `dfly-probe get` makes its request.
#[derive(Debug, Clone, Default)]
pub struct Get {
    /// `GET` unless set (`HEAD`: the body is not read).
    pub method: Option<String>,
    /// Extra request headers, `Name: value`.
    pub headers: Vec<String>,
    /// Connect here instead of where the URL's host resolves, keeping the
    /// URL's host as `Host` and SNI (what any process may do).
    pub connect: Option<SocketAddr>,
    /// The only roots trusted for https.
    pub ca: Option<std::path::PathBuf>,
}

/// GET `url`, hashing the body as it streams. TLS verifies against `ca` only.
pub fn get(url: &str, ca: Option<&Path>) -> anyhow::Result<GetResult> {
    request(
        url,
        &Get {
            ca: ca.map(Path::to_path_buf),
            ..Get::default()
        },
    )
}

/// One request as `how` says, hashing the body as it streams.
pub fn request(url: &str, how: &Get) -> anyhow::Result<GetResult> {
    let started = Instant::now();
    let u = parse_url(url)?;
    let addr = match how.connect {
        Some(a) => a,
        None => (u.host.as_str(), u.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", u.host))?
            .next()
            .context("no address")?,
    };
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let peer = tcp.peer_addr()?.to_string();
    let extra: String = how.headers.iter().map(|h| format!("{h}\r\n")).collect();
    let method = how.method.as_deref().unwrap_or("GET");
    let head = method == "HEAD";
    let request = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dfly-probe\r\nConnection: close\r\n{extra}\r\n",
        u.path, u.host
    );
    let mut result = if u.tls {
        let ca = how.ca.as_deref().context("https needs --ca")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut BufReader::new(std::fs::File::open(ca)?)) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(u.host.clone())?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request.as_bytes())?;
        read_response(BufReader::new(tls), head)?
    } else {
        let mut tcp = tcp;
        tcp.write_all(request.as_bytes())?;
        read_response(BufReader::new(tcp), head)?
    };
    result.peer = peer;
    result.millis = started.elapsed().as_millis() as u64;
    Ok(result)
}

/// Status, headers and the body's length and sha256 (none after a HEAD).
fn read_response(mut r: impl BufRead, head: bool) -> anyhow::Result<GetResult> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length: Option<u64> = None;
    let mut headers = std::collections::BTreeMap::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed inside the response head");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse()?);
            }
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    // A HEAD's Content-Length is the GET's: no body follows.
    if !head {
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                // rustls reports a peer that closed without close_notify; the length check below decides.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            };
            h.update(&buf[..n]);
            total += n as u64;
        }
    }
    if let Some(len) = length
        && total != len
        && !head
    {
        bail!("body truncated: {total} of {len} bytes");
    }
    Ok(GetResult {
        status,
        bytes: total,
        sha256: body::hex(&h.finalize()),
        headers,
        ..Default::default()
    })
}

/// What `dfly-probe serve` answers.
#[derive(Debug, Clone, Default)]
pub enum Serve {
    /// `/bytes/<n>` and `/peer`.
    #[default]
    Bytes,
    /// Every request: 301 to `https://<Host without port><target>`.
    RedirectHttps,
    /// Every connection and request appended to this file as a JSON
    /// [`Record`] line; every request answered 200.
    Record(std::path::PathBuf),
}

/// One line a [`Serve::Record`] server writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The listening address that accepted the connection.
    pub listener: String,
    /// The connecting address.
    pub peer: String,
    pub tls: bool,
    /// `None`: the connection was accepted (before any byte of it was read).
    pub request: Option<Recorded>,
}

/// A request head as a [`Serve::Record`] server read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a [`Serve::Record`] server has written so far.
pub fn records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("record {l:?}")))
        .collect()
}

/// Serve plain HTTP on `http` and TLS on `https` (with `tls` = cert and key PEM files) forever.
pub fn serve(
    http: &[SocketAddr],
    https: &[SocketAddr],
    tls: Option<(&Path, &Path)>,
    how: &Serve,
) -> anyhow::Result<()> {
    let record = match how {
        Serve::Record(path) => Some(Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ))),
        _ => None,
    };
    let ctx = |tls| {
        Arc::new(Listener {
            how: how.clone(),
            tls,
            record: record.clone(),
        })
    };
    let mut handles = Vec::new();
    for &addr in http {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let ctx = ctx(None);
        handles.push(std::thread::spawn(move || accept_loop(l, ctx)));
    }
    if !https.is_empty() {
        let (cert, key) = tls.context("--https needs --cert and --key")?;
        let certs = rustls_pemfile::certs(&mut BufReader::new(std::fs::File::open(cert)?))
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut BufReader::new(std::fs::File::open(key)?))?
            .context("no private key")?;
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)?,
        );
        for &addr in https {
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            let ctx = ctx(Some(config.clone()));
            handles.push(std::thread::spawn(move || accept_loop(l, ctx)));
        }
    }
    println!("ready");
    io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// What every connection of one listening socket shares.
struct Listener {
    how: Serve,
    tls: Option<Arc<rustls::ServerConfig>>,
    record: Option<Arc<std::sync::Mutex<std::fs::File>>>,
}

impl Listener {
    fn write(&self, r: &Record) {
        if let Some(f) = &self.record
            && let Ok(line) = serde_json::to_string(r)
        {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
        }
    }
}

fn accept_loop(l: TcpListener, ctx: Arc<Listener>) {
    let listener = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    for stream in l.incoming().flatten() {
        let (ctx, listener) = (ctx.clone(), listener.clone());
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let mut record = Record {
                listener,
                peer: peer.clone(),
                tls: ctx.tls.is_some(),
                request: None,
            };
            ctx.write(&record);
            let served = match &ctx.tls {
                Some(cfg) => rustls::ServerConnection::new(cfg.clone())
                    .map_err(io::Error::other)
                    .and_then(|c| respond(rustls::StreamOwned::new(c, stream), &ctx.how, &peer)),
                None => respond(stream, &ctx.how, &peer),
            };
            if let Ok(Some(req)) = served {
                record.request = Some(req);
                ctx.write(&record);
            }
        });
    }
}

/// Answers one request; returns its head.
fn respond<S: Read + Write>(stream: S, how: &Serve, peer: &str) -> io::Result<Option<Recorded>> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let req = Recorded {
        method,
        target: path.clone(),
        headers,
    };
    let mut w = r.into_inner();
    match how {
        Serve::Record(_) => {
            let body = b"recorded\n";
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if req.method != "HEAD" {
                w.write_all(body)?;
            }
        }
        Serve::RedirectHttps => {
            // Without the port: https is on its own default port.
            let host = strip_port(req.header("host").unwrap_or_default());
            write!(
                w,
                "HTTP/1.1 301 Moved Permanently\r\nLocation: https://{host}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
        Serve::Bytes => serve_bytes(&mut w, &path, peer)?,
    }
    w.flush()?;
    Ok(Some(req))
}

/// `host[:port]` or `[v6][:port]` without the port.
fn strip_port(authority: &str) -> &str {
    match authority.find(']') {
        Some(end) if authority.starts_with('[') => &authority[..=end],
        _ => authority.split(':').next().unwrap_or_default(),
    }
}

fn serve_bytes(w: &mut impl Write, path: &str, peer: &str) -> io::Result<()> {
    if path == "/peer" {
        let body = peer.as_bytes();
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        w.write_all(body)?;
    } else if let Some(rest) = path.strip_prefix("/bytes/") {
        let (n, q) = rest.split_once('?').unwrap_or((rest, ""));
        let Ok(len) = n.parse::<u64>() else {
            return not_found(w);
        };
        let seed = q
            .strip_prefix("seed=")
            .and_then(|s| s.parse().ok())
            .unwrap_or(len);
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            body::fill(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
    } else {
        return not_found(w);
    }
    Ok(())
}

fn not_found(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_v6() {
        let u = parse_url("https://origin.dfly.test/bytes/10").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("origin.dfly.test", 443, "/bytes/10")
        );
        let u = parse_url("http://[fd00:213::12]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("fd00:213::12", 8080, "/")
        );
        assert!(parse_url("ftp://x").is_err());
    }

    fn start(how: Serve) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let record = match &how {
            Serve::Record(p) => Some(Arc::new(std::sync::Mutex::new(
                std::fs::File::create(p).unwrap(),
            ))),
            _ => None,
        };
        let ctx = Arc::new(Listener {
            how,
            tls: None,
            record,
        });
        std::thread::spawn(move || accept_loop(l, ctx));
        addr
    }

    #[test]
    fn server_and_client_agree_on_loopback() {
        let addr = start(Serve::Bytes);
        let r = get(&format!("http://{addr}/bytes/100000?seed=5"), None).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes, 100_000);
        assert_eq!(r.sha256, body::sha256(5, 100_000));
        assert_eq!(r.peer, addr.to_string());
        let r = get(&format!("http://{addr}/nope"), None).unwrap();
        assert_eq!(r.status, 404);
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("r.io:80"), "r.io");
        assert_eq!(strip_port("r.io"), "r.io");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("[fd00::1]"), "[fd00::1]");
    }

    #[test]
    fn port_80_redirects_to_https_on_the_same_host() {
        let addr = start(Serve::RedirectHttps);
        for (host, want) in [
            ("registry.dfly.test", "https://registry.dfly.test/v2/x"),
            ("registry.dfly.test:80", "https://registry.dfly.test/v2/x"),
        ] {
            let r = request(
                &format!("http://{host}/v2/x"),
                &Get {
                    connect: Some(addr),
                    ..Get::default()
                },
            )
            .unwrap();
            assert_eq!(r.status, 301);
            assert_eq!(r.headers.get("location").map(String::as_str), Some(want));
        }
    }

    #[test]
    fn a_recording_server_writes_down_connections_and_heads() {
        let file = std::env::temp_dir().join(format!("dfly-{}-probe-record", std::process::id()));
        let addr = start(Serve::Record(file.clone()));
        let how = Get {
            method: Some("HEAD".into()),
            headers: vec!["Authorization: Basic x".into()],
            connect: Some(addr),
            ca: None,
        };
        let r = request("http://registry.dfly.test/v2/", &how).unwrap();
        assert_eq!((r.status, r.bytes), (200, 0));
        assert_eq!(
            r.headers.get("content-length").map(String::as_str),
            Some("9")
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let recs = loop {
            let recs = records(&file).unwrap();
            if recs.len() == 2 || Instant::now() > deadline {
                break recs;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&file);
        assert_eq!(recs.len(), 2, "{recs:?}");
        assert!(recs[0].request.is_none() && !recs[0].tls);
        let req = recs[1].request.as_ref().unwrap();
        assert_eq!((req.method.as_str(), req.target.as_str()), ("HEAD", "/v2/"));
        assert_eq!(req.header("Host"), Some("registry.dfly.test"));
        assert_eq!(req.header("authorization"), Some("Basic x"));
    }
}
