//! Verbatim forwarding of a request to the origin, streaming both bodies.

use http_body_util::BodyExt;
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderName},
};
use tracing::debug;

use crate::origin::{Body, OriginClient, OriginError, OriginRef};

/// Connection-scoped headers (RFC 9110 §7.6.1) never cross a proxy; `Host`
/// is carried by the URI's authority instead.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
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

/// `req` as it came, to `origin` (a steered connection's own destination),
/// its answer back as it came.
pub async fn forward(
    upstream: &OriginClient,
    origin: &OriginRef,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = match origin.uri(pq) {
        Ok(u) => u,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
        }
    };
    let mut out = Request::builder().method(parts.method).uri(uri);
    if let Some(h) = out.headers_mut() {
        copy_headers(&parts.headers, h);
    }
    let out = match out.body(body.map_err(Into::into).boxed()) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match origin.upstream(upstream).send(out).await {
        Ok(resp) => relay(resp),
        Err(e) => {
            debug!(host = %origin.host, error = %e, "origin unreachable");
            origin_error(&e)
        }
    }
}

/// The origin's response as ours: status, end-to-end headers, streamed body.
pub fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(body.map_err(Into::into).boxed());
    *out.status_mut() = parts.status;
    copy_headers(&parts.headers, out.headers_mut());
    out
}

pub fn origin_error(e: &OriginError) -> Response<Body> {
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!("damselfly: origin unreachable: {e}"),
    )
}

pub fn error_response(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Full::new(bytes::Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
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
