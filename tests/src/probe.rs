//! `dfly-probe`: the test client and origin server. Plain std + rustls, one
//! thread per connection: small enough to trust as a measuring stick.
//!
//! Server routes: `GET /bytes/<n>[?seed=<s>]` answers `n` deterministic bytes
//! (see [`crate::body`]); `GET /peer` answers the client address it sees.

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

/// GET `url`, hashing the body as it streams. TLS verifies against `ca` only.
pub fn get(url: &str, ca: Option<&Path>) -> anyhow::Result<GetResult> {
    get_with(url, ca, &[])
}

/// [`get`] with extra request headers (`Name: value`).
pub fn get_with(url: &str, ca: Option<&Path>, extra: &[String]) -> anyhow::Result<GetResult> {
    let started = Instant::now();
    let u = parse_url(url)?;
    let addr = (u.host.as_str(), u.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", u.host))?
        .next()
        .context("no address")?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let peer = tcp.peer_addr()?.to_string();
    let extra: String = extra.iter().map(|h| format!("{h}\r\n")).collect();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dfly-probe\r\nConnection: close\r\n{extra}\r\n",
        u.path, u.host
    );
    let mut result = if u.tls {
        let ca = ca.context("https needs --ca")?;
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
        read_response(BufReader::new(tls))?
    } else {
        let mut tcp = tcp;
        tcp.write_all(request.as_bytes())?;
        read_response(BufReader::new(tcp))?
    };
    result.peer = peer;
    result.millis = started.elapsed().as_millis() as u64;
    Ok(result)
}

fn read_response(mut r: impl BufRead) -> anyhow::Result<GetResult> {
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
    if let Some(len) = length
        && total != len
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

/// Serve plain HTTP on `http` and TLS on `https` (with `tls` = cert and key PEM files) forever.
pub fn serve(
    http: &[SocketAddr],
    https: &[SocketAddr],
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for &addr in http {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        handles.push(std::thread::spawn(move || accept_loop(l, None)));
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
            let config = config.clone();
            handles.push(std::thread::spawn(move || accept_loop(l, Some(config))));
        }
    }
    println!("ready");
    io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn accept_loop(l: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    for stream in l.incoming().flatten() {
        let tls = tls.clone();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let _ = match tls {
                Some(cfg) => rustls::ServerConnection::new(cfg)
                    .map_err(io::Error::other)
                    .and_then(|c| respond(rustls::StreamOwned::new(c, stream), &peer)),
                None => respond(stream, &peer),
            };
        });
    }
}

fn respond<S: Read + Write>(stream: S, peer: &str) -> io::Result<()> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
    }
    let mut w = r.into_inner();
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
    w.flush()
}

fn not_found(mut w: impl Write) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    w.flush()
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

    #[test]
    fn server_and_client_agree_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || accept_loop(l, None));
        let r = get(&format!("http://{addr}/bytes/100000?seed=5"), None).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes, 100_000);
        assert_eq!(r.sha256, body::sha256(5, 100_000));
        assert_eq!(r.peer, addr.to_string());
        let r = get(&format!("http://{addr}/nope"), None).unwrap();
        assert_eq!(r.status, 404);
    }
}
