//! Classify the first bytes a client sends: a TLS ClientHello (and its SNI) or
//! an HTTP/1 request (and its Host). Pure; the caller keeps reading while the
//! answer is [`Peek::NeedMore`].

use rustls::server::Acceptor;

/// Stop peeking after this many bytes: a ClientHello or request head larger
/// than this is spliced without a name.
pub const PEEK_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    NeedMore,
    Tls { sni: Option<String> },
    Http { host: Option<String> },
    Other,
}

impl Peek {
    pub fn protocol(&self) -> &'static str {
        match self {
            Peek::Tls { .. } => "tls",
            Peek::Http { .. } => "http",
            Peek::NeedMore | Peek::Other => "other",
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Peek::Tls { sni } => sni.as_deref(),
            Peek::Http { host } => host.as_deref(),
            Peek::NeedMore | Peek::Other => None,
        }
    }
}

pub fn classify(buf: &[u8]) -> Peek {
    match buf.first() {
        None => Peek::NeedMore,
        // TLS record type 22: handshake.
        Some(0x16) => tls(buf),
        Some(b) if b.is_ascii_uppercase() => http(buf),
        Some(_) => Peek::Other,
    }
}

fn tls(buf: &[u8]) -> Peek {
    let mut acceptor = Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Peek::Other;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Peek::Tls {
            sni: accepted.client_hello().server_name().map(str::to_owned),
        },
        Ok(None) if buf.len() < PEEK_LIMIT => Peek::NeedMore,
        Ok(None) => Peek::Tls { sni: None },
        // Not a ClientHello rustls understands (e.g. SSLv2-style); still TLS-ish.
        Err(_) => Peek::Tls { sni: None },
    }
}

fn http(buf: &[u8]) -> Peek {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|h| h.trim().to_owned());
            Peek::Http { host }
        }
        Ok(httparse::Status::Partial) if buf.len() < PEEK_LIMIT => Peek::NeedMore,
        Ok(httparse::Status::Partial) => Peek::Http { host: None },
        Err(_) => Peek::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, produced by rustls's own client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_from_a_real_client_hello() {
        let hello = client_hello("registry.dfly.test");
        assert_eq!(
            classify(&hello),
            Peek::Tls {
                sni: Some("registry.dfly.test".into())
            }
        );
    }

    #[test]
    fn partial_client_hello_needs_more() {
        let hello = client_hello("a.example");
        for cut in [1, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), Peek::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn http_host_and_partial_head() {
        let req = b"GET /v2/ HTTP/1.1\r\nUser-Agent: x\r\nHost: registry.dfly.test:80\r\n\r\n";
        assert_eq!(
            classify(req),
            Peek::Http {
                host: Some("registry.dfly.test:80".into())
            }
        );
        assert_eq!(classify(&req[..20]), Peek::NeedMore);
        assert_eq!(
            classify(b"GET / HTTP/1.0\r\n\r\n"),
            Peek::Http { host: None }
        );
    }

    #[test]
    fn garbage_is_other_and_never_panics() {
        assert_eq!(classify(b"\x00\x01binary"), Peek::Other);
        assert_eq!(classify(b"GET \x01\x02 nonsense\r\n\r\n"), Peek::Other);
        assert_eq!(classify(b""), Peek::NeedMore);
        // A handshake record header with a bogus body.
        let junk = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        assert!(matches!(
            classify(&junk),
            Peek::Tls { sni: None } | Peek::Other
        ));
    }

    #[test]
    fn oversized_partial_head_stops_needing_more() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        while req.len() < PEEK_LIMIT {
            req.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_ne!(classify(&req), Peek::NeedMore);
    }
}
