//! Small header helpers shared by the blob path's requests and responses.

use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

/// The `Content-Length`, if present and a number.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The client's headers without its own `Range`/`If-Range`: the agent asks
/// for the bytes it needs itself.
pub fn without_range(h: &HeaderMap) -> HeaderMap {
    let mut h = h.clone();
    h.remove(header::RANGE);
    h.remove(header::IF_RANGE);
    h
}

/// A header value the agent formatted (digits, a digest, `bytes=…`).
pub fn value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Connection-scoped headers (RFC 9110 §7.6.1) never cross a proxy; `Host`
/// is carried by the URI's authority instead.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

pub fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !is_hop_by_hop(k) {
            to.append(k, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert("connection", "close".parse().unwrap());
        from.insert("host", "x".parse().unwrap());
        from.insert("authorization", "Bearer t".parse().unwrap());
        from.append("accept", "a".parse().unwrap());
        from.append("accept", "b".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        assert_eq!(to.len(), 3);
        assert!(to.get("connection").is_none() && to.get("host").is_none());
        assert_eq!(to.get_all("accept").iter().count(), 2);
    }
}
