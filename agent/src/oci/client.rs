//! A registry client for the CLI: GETs that answer a 401 challenge the way
//! Docker does (Basic, or a Bearer token from the realm the registry names),
//! and manifest resolution down to one image per platform.

use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{
    HeaderMap, Method, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderValue},
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::{
    oci::{
        auth::{Challenge, Credential, parse_challenges},
        manifest::{ACCEPT, Descriptor, ImageManifest, Manifest, ManifestError, Platform},
        percent_encode,
        reference::Reference,
    },
    origin::OriginRef,
    origin::{OriginClient, OriginError},
    vocab::Digest,
};

/// Manifests are small; anything bigger is not one.
const MANIFEST_LIMIT: usize = 8 << 20;
/// Error bodies are read for their message only.
const ERROR_LIMIT: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{host} answered 401 Unauthorized: {message}{hint}")]
    Unauthorized {
        host: String,
        message: String,
        hint: &'static str,
    },
    #[error("{what} answered {status}: {message}")]
    Status {
        what: String,
        status: StatusCode,
        message: String,
    },
    #[error("cannot reach {what}")]
    Unreachable {
        what: String,
        #[source]
        source: OriginError,
    },
    #[error("token endpoint {realm}: {message}")]
    Token { realm: String, message: String },
    #[error("reading {what}: {message}")]
    Body { what: String, message: String },
    #[error("manifest of {what}: {source}")]
    Manifest {
        what: String,
        #[source]
        source: ManifestError,
    },
    #[error("manifest {want} from {what} has digest {got}: refusing it")]
    DigestMismatch {
        what: String,
        want: String,
        got: String,
    },
    #[error("{what} has no image for {want} (it has: {have}); pick one with --platform")]
    NoPlatform {
        what: String,
        want: String,
        have: String,
    },
    #[error("{what} is an index inside an index, which is not supported")]
    NestedIndex { what: String },
}

/// One manifest as the registry sent it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub media_type: String,
    pub bytes: Bytes,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub manifest: Manifest,
}

impl Fetched {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.bytes.len() as u64,
            platform: None,
            annotations: None,
        }
    }
}

/// One runnable image of a resolved reference.
#[derive(Debug, Clone)]
pub struct Image {
    /// As the index lists it (with its platform), or made from the manifest itself.
    pub descriptor: Descriptor,
    pub bytes: Bytes,
    pub manifest: ImageManifest,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    pub origin: OriginRef,
    /// The index, when the reference named one.
    pub index: Option<Fetched>,
    pub images: Vec<Image>,
}

impl Resolved {
    /// Config and layer descriptors of every image, each digest once.
    pub fn blobs(&self) -> Vec<Descriptor> {
        let mut seen = std::collections::HashSet::new();
        self.images
            .iter()
            .flat_map(|i| i.manifest.blobs())
            .filter(|d| seen.insert(d.digest.clone()))
            .cloned()
            .collect()
    }
}

pub enum Platforms {
    One(Platform),
    All,
}

pub struct RegistryClient {
    upstream: OriginClient,
    credential: Option<Credential>,
    /// The `Authorization` that worked last: Basic, or a Bearer token.
    auth: Mutex<Option<HeaderValue>>,
}

impl RegistryClient {
    pub fn new(upstream: OriginClient, credential: Option<Credential>) -> Self {
        let auth = credential
            .as_ref()
            .and_then(|c| HeaderValue::from_str(&c.basic()).ok());
        Self {
            upstream,
            credential,
            auth: Mutex::new(auth),
        }
    }

    /// What to send as `Authorization` on behalf of this client (to an agent
    /// that asks the origin with it).
    pub fn authorization(&self) -> Option<HeaderValue> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// GET `uri`, answering one 401 challenge. `what` names the server in
    /// errors. A response that is neither 2xx nor 401 is returned as is.
    pub async fn get(
        &self,
        what: &str,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, ClientError> {
        let mut tried_token = false;
        loop {
            let mut h = headers.clone();
            if let Some(a) = self.authorization() {
                h.insert(header::AUTHORIZATION, a);
            }
            let resp = self
                .upstream
                .fetch_following(Method::GET, uri.clone(), &h)
                .await
                .map_err(|source| ClientError::Unreachable {
                    what: what.to_string(),
                    source,
                })?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            let bearer = challenges.iter().find(|c| c.scheme == "bearer");
            match bearer {
                Some(c) if !tried_token => {
                    tried_token = true;
                    let token = self.token(c).await?;
                    *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
                }
                _ => return Err(self.unauthorized(what.to_string(), resp).await),
            }
        }
    }

    async fn unauthorized(&self, host: String, resp: Response<Incoming>) -> ClientError {
        ClientError::Unauthorized {
            host,
            message: error_message(resp).await,
            hint: if self.credential.is_some() {
                " (the credentials given were refused)"
            } else {
                " (pass --creds USER:PASSWORD, or --docker-config with an entry for this registry)"
            },
        }
    }

    /// The distribution token flow: GET realm?service=..&scope=.., with
    /// Basic credentials if we have them (anonymous tokens otherwise).
    async fn token(&self, c: &Challenge) -> Result<HeaderValue, ClientError> {
        let realm = c.param("realm").unwrap_or_default().to_string();
        let token_err = |message: String| ClientError::Token {
            realm: realm.clone(),
            message,
        };
        let mut query = Vec::new();
        for key in ["service", "scope"] {
            if let Some(v) = c.param(key) {
                query.push(format!("{key}={}", percent_encode(v)));
            }
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            realm.clone()
        } else {
            format!("{realm}{sep}{}", query.join("&"))
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| token_err("the challenge's realm is not a URL".into()))?;
        let mut h = HeaderMap::new();
        if let Some(basic) = self
            .credential
            .as_ref()
            .and_then(|c| HeaderValue::from_str(&c.basic()).ok())
        {
            h.insert(header::AUTHORIZATION, basic);
        }
        let resp = self
            .upstream
            .fetch_following(Method::GET, uri, &h)
            .await
            .map_err(|e| token_err(format!("{e}")))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.unauthorized(realm.clone(), resp).await);
            }
            s => return Err(token_err(format!("{s}: {}", error_message(resp).await))),
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(resp, ERROR_LIMIT).await.map_err(&token_err)?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| token_err(format!("not a token response: {e}")))?;
        let t = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_err("no token in the response".into()))?;
        HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| token_err("the token is not a valid header value".into()))
    }

    /// One manifest by tag or digest; a digest is checked against the bytes.
    pub async fn manifest(
        &self,
        origin: &OriginRef,
        repo: &str,
        reference: &str,
    ) -> Result<Fetched, ClientError> {
        let what = format!("{}/{repo}:{reference}", origin.authority());
        let what = what.replace(":sha256:", "@sha256:");
        let uri = origin
            .uri(&format!("/v2/{repo}/manifests/{reference}"))
            .map_err(|e| ClientError::Body {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
        let resp = self.get(&origin.authority(), uri, &h).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(ClientError::Status {
                what,
                status,
                message: error_message(resp).await,
            });
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_limited(resp, MANIFEST_LIMIT)
            .await
            .map_err(|message| ClientError::Body {
                what: what.clone(),
                message,
            })?;
        let digest = Digest(Sha256::digest(&bytes).into()).to_string();
        if reference.starts_with("sha256:") && reference != digest {
            return Err(ClientError::DigestMismatch {
                what,
                want: reference.to_string(),
                got: digest,
            });
        }
        let (media_type, manifest) =
            Manifest::parse(content_type.as_deref(), &bytes).map_err(|source| {
                ClientError::Manifest {
                    what: what.clone(),
                    source,
                }
            })?;
        Ok(Fetched {
            media_type,
            bytes,
            digest,
            manifest,
        })
    }

    /// The reference's manifest, and through an index the image(s) for `platforms`.
    pub async fn resolve(
        &self,
        reference: &Reference,
        scheme: &'static str,
        platforms: &Platforms,
    ) -> Result<Resolved, ClientError> {
        let origin = reference.origin(scheme);
        let repo = &reference.repository;
        let top = self
            .manifest(&origin, repo, reference.manifest_ref())
            .await?;
        let index = match &top.manifest {
            Manifest::Image(m) => {
                return Ok(Resolved {
                    origin,
                    index: None,
                    images: vec![Image {
                        descriptor: top.descriptor(),
                        bytes: top.bytes.clone(),
                        manifest: m.clone(),
                    }],
                });
            }
            Manifest::Index(i) => i.clone(),
        };
        let chosen: Vec<Descriptor> = match platforms {
            Platforms::One(p) => match index.select(p) {
                Some(d) => vec![d.clone()],
                None => {
                    return Err(ClientError::NoPlatform {
                        what: reference.to_string(),
                        want: p.to_string(),
                        have: index.platforms().join(", "),
                    });
                }
            },
            Platforms::All => index.images().cloned().collect(),
        };
        let mut images = Vec::new();
        for d in chosen {
            let m = self.manifest(&origin, repo, &d.digest).await?;
            let Manifest::Image(manifest) = m.manifest else {
                return Err(ClientError::NestedIndex {
                    what: reference.to_string(),
                });
            };
            images.push(Image {
                descriptor: d,
                bytes: m.bytes,
                manifest,
            });
        }
        Ok(Resolved {
            origin,
            index: Some(top),
            images,
        })
    }
}

/// The body, up to `limit` bytes.
pub(super) async fn read_limited(resp: Response<Incoming>, limit: usize) -> Result<Bytes, String> {
    Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

/// A registry error body (`{"errors":[{"code","message"}]}`) as one line,
/// else the start of the text, else the status's reason.
pub async fn error_message(resp: Response<Incoming>) -> String {
    let status = resp.status();
    let body = read_limited(resp, ERROR_LIMIT).await.unwrap_or_default();
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(&body) {
        let parts: Vec<String> = e
            .errors
            .into_iter()
            .map(|e| match (e.code, e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (c, m) => c.or(m).unwrap_or_default(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no message")
            .to_string()
    } else {
        text.chars().take(300).collect()
    }
}
