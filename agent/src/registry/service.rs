//! Per-request routing of terminated registry connections.

use std::sync::Arc;

use hyper::{Request, Response, body::Incoming};

use crate::{
    admin::metrics::Metrics,
    registry::{
        proxy::{self, OriginRef},
        route::{Route, route},
    },
    upstream::{Body, Upstream},
};

pub struct RegistryService {
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
}

impl RegistryService {
    pub async fn handle(&self, req: Request<Incoming>, origin: &OriginRef) -> Response<Body> {
        match route(req.method(), req.uri().path()) {
            Route::Blob { .. } => {
                self.metrics.blob_request("passthrough");
                proxy::forward(&self.upstream, origin, req).await
            }
            Route::Other => proxy::forward(&self.upstream, origin, req).await,
        }
    }
}
