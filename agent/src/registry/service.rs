//! Per-request routing of terminated registry connections.

use hyper::{Request, Response, body::Incoming};
use tracing::{Instrument, field, info_span};

use crate::{
    origin::{Body, OriginRef},
    registry::{
        blob::Blobs,
        proxy,
        route::{Route, route},
    },
};

pub struct RegistryService {
    pub blobs: Blobs,
}

impl RegistryService {
    pub fn upstream(&self) -> &crate::origin::OriginClient {
        &self.blobs.upstream
    }

    pub async fn handle(&self, req: Request<Incoming>, origin: &OriginRef) -> Response<Body> {
        match route(req.method(), req.uri().path()) {
            Route::Blob { repo, hex, .. } => {
                self.blobs.serve(req, origin, &repo, &hex).await.response
            }
            Route::Other => {
                // Manifests, tags, tokens: in the connection's trace. The
                // path only: a query may carry a token request's secrets.
                let span = info_span!(
                    "registry.forward",
                    method = req.method().as_str(),
                    path = req.uri().path(),
                    status = field::Empty,
                );
                let resp = proxy::forward(self.upstream(), origin, req)
                    .instrument(span.clone())
                    .await;
                span.record("status", resp.status().as_u16());
                resp
            }
        }
    }
}
