//! Per-request routing of terminated registry connections.

use hyper::{Request, Response, body::Incoming};

use crate::{
    registry::{
        blob::Blobs,
        proxy::{self, OriginRef},
        route::{Route, route},
    },
    upstream::Body,
};

pub struct RegistryService {
    pub blobs: Blobs,
}

impl RegistryService {
    pub fn upstream(&self) -> &crate::upstream::Upstream {
        &self.blobs.upstream
    }

    pub async fn handle(&self, req: Request<Incoming>, origin: &OriginRef) -> Response<Body> {
        match route(req.method(), req.uri().path()) {
            Route::Blob { repo, hex, .. } => self.blobs.serve(req, origin, &repo, &hex).await,
            Route::Other => proxy::forward(self.upstream(), origin, req).await,
        }
    }
}
