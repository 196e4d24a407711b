//! `GET /v1/fetch?url=<blob URL>`: a blob through this agent, for `damselfly
//! get` and `preheat`. It takes the same path as an intercepted request (the
//! origin checks the caller's `Authorization` first; then cache, swarm or
//! origin), so a preheated seed and a pulling node share one cache.

use std::sync::Arc;

use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderValue},
};

use crate::{
    oci::{BlobUrl, percent_encode, query_param},
    origin::Body,
    origin::RegistryHosts,
    registry::{RegistryService, error_response},
};

pub(super) const PATH: &str = "/v1/fetch";
/// `hit` if the blob was complete in this agent's cache when the origin said
/// yes to the caller, else `miss`; absent without that yes.
pub const CACHE_HEADER: &str = "x-damselfly-cache";

/// Headers of the caller that mean something to the origin; the rest
/// (`Host`, the admin connection's own) stay here.
const PASSED: [header::HeaderName; 4] = [
    header::AUTHORIZATION,
    header::RANGE,
    header::IF_RANGE,
    header::USER_AGENT,
];

pub struct Fetcher {
    pub hosts: RegistryHosts,
    pub service: Arc<RegistryService>,
}

impl Fetcher {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(url) = query_param(req.uri().query(), "url") else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "damselfly: expected /v1/fetch?url=https://HOST[:PORT]/v2/REPO/blobs/sha256:HEX",
            );
        };
        let blob = match BlobUrl::parse(&url) {
            Ok(b) => b,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("damselfly: {e}")),
        };
        // Only what the agent would intercept: the endpoint must not become
        // a way to make the node fetch from arbitrary hosts.
        if !self.hosts.contains(&blob.host) {
            return error_response(
                StatusCode::FORBIDDEN,
                &format!(
                    "damselfly: {} is not a registry this agent serves (add it with --registry)",
                    blob.host
                ),
            );
        }
        let blobs = &self.service.blobs;
        let (mut parts, body) = req.into_parts();
        parts.uri = match blob.path().parse::<Uri>() {
            Ok(u) => u,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("damselfly: {e}")),
        };
        let mut headers = HeaderMap::new();
        for name in PASSED {
            for v in parts.headers.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        parts.headers = headers;
        let req = Request::from_parts(parts, body);
        let served = blobs
            .serve(req, &blob.origin(), &blob.repo, &blob.hex)
            .await;
        let mut resp = served.response;
        // Whether this node holds a blob is the blob's business too: only
        // for a caller the origin said yes to.
        if let Some(cached) = served.cached {
            resp.headers_mut().insert(
                CACHE_HEADER,
                HeaderValue::from_static(if cached { "hit" } else { "miss" }),
            );
        }
        resp
    }
}

/// The fetch URI for `blob` on the agent whose admin base URL is `agent`
/// (e.g. `http://127.0.0.1:7402`).
pub fn fetch_uri(agent: &str, blob: &BlobUrl) -> Result<Uri, hyper::http::uri::InvalidUri> {
    format!(
        "{}{PATH}?url={}",
        agent.trim_end_matches('/'),
        percent_encode(&blob.to_string())
    )
    .parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::query_param;

    #[test]
    fn fetch_uri_carries_the_blob_url() {
        let hex = "ab".repeat(32);
        let blob =
            BlobUrl::parse(&format!("https://reg.io:5000/v2/a/b/blobs/sha256:{hex}")).unwrap();
        let uri = fetch_uri("http://seed-0.damselfly-seed:7402/", &blob).unwrap();
        assert_eq!(uri.host(), Some("seed-0.damselfly-seed"));
        assert_eq!(uri.path(), PATH);
        let url = query_param(uri.query(), "url").unwrap();
        assert_eq!(BlobUrl::parse(&url).unwrap(), blob);
    }
}
