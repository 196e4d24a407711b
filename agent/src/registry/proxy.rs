//! Verbatim forwarding of a request to the origin, streaming both bodies.

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use tracing::debug;

use crate::origin::{Body, OriginClient, OriginError, OriginRef, headers::copy_headers};

/// `req` as it came, to `origin` (a steered connection's own destination),
/// its answer back as it came.
pub(super) async fn forward(
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
pub(super) fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(body.map_err(Into::into).boxed());
    *out.status_mut() = parts.status;
    copy_headers(&parts.headers, out.headers_mut());
    out
}

pub(super) fn origin_error(e: &OriginError) -> Response<Body> {
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
