//! The token flow against a registry faked at the HTTP boundary: a real
//! HTTP server that answers like Docker Hub's registry and token service.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{
    auth::Credential,
    client::{ClientError, Platforms, RegistryClient},
    manifest::{OCI_INDEX, OCI_MANIFEST, Platform},
    percent_decode, percent_encode, query_param,
    reference::Reference,
};
use crate::origin::OriginClient;

const TOKEN: &str = "tok-123";

struct Fake {
    addr: SocketAddr,
    token_requests: Arc<AtomicUsize>,
}

fn manifest_json() -> String {
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c0","size":2},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l1","size":5}]}"#
        .to_string()
}

fn index_json(image_digest: &str) -> String {
    let host = Platform::host();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
          {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":9,"platform":{{"os":"plan9","architecture":"mips"}}}},
          {{"mediaType":"{OCI_MANIFEST}","digest":"{image_digest}","size":1,"platform":{{"os":"{}","architecture":"{}"}}}}]}}"#,
        "0".repeat(64),
        host.os,
        host.architecture
    )
}

/// `/v2/team/app/manifests/*` wants `Bearer tok-123`; `/token` gives it for
/// Basic `u:p` and the scope the challenge named. `/v2/basic/...` only does Basic.
async fn start_fake() -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = token_requests.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let counter = counter.clone();
                    async move { Ok::<_, Infallible>(answer(addr, &counter, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Fake {
        addr,
        token_requests,
    }
}

fn answer(addr: SocketAddr, tokens: &AtomicUsize, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let reply = |code: u16, headers: &[(&str, String)], body: String| {
        let mut r = Response::builder().status(code);
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    };
    let unauthorized =
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    let path = req.uri().path().to_string();
    if path == "/token" {
        tokens.fetch_add(1, Ordering::Relaxed);
        let q = req.uri().query();
        let ok_scope = query_param(q, "scope").as_deref() == Some("repository:team/app:pull")
            && query_param(q, "service").as_deref() == Some("fake registry");
        if auth == Credential::parse("u:p").unwrap().basic() && ok_scope {
            return reply(200, &[], format!(r#"{{"access_token":"{TOKEN}"}}"#));
        }
        return reply(401, &[], unauthorized.into());
    }
    if path.starts_with("/v2/basic/") {
        return reply(
            401,
            &[("www-authenticate", r#"Basic realm="fake""#.into())],
            unauthorized.into(),
        );
    }
    if auth != format!("Bearer {TOKEN}") {
        let challenge = format!(
            r#"Bearer realm="http://{addr}/token",service="fake registry",scope="repository:team/app:pull""#
        );
        return reply(401, &[("www-authenticate", challenge)], unauthorized.into());
    }
    let image = manifest_json();
    let image_digest = crate::vocab::Digest::of(image.as_bytes()).to_string();
    match path.as_str() {
        "/v2/team/app/manifests/v1" => reply(200, &[("content-type", OCI_MANIFEST.into())], image),
        "/v2/team/app/manifests/multi" => reply(
            200,
            &[("content-type", OCI_INDEX.into())],
            index_json(&image_digest),
        ),
        p if p == format!("/v2/team/app/manifests/{image_digest}") => {
            reply(200, &[("content-type", OCI_MANIFEST.into())], image)
        }
        _ => reply(
            404,
            &[],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#.into(),
        ),
    }
}

fn client(creds: Option<&str>) -> RegistryClient {
    RegistryClient::new(
        OriginClient::new(None).unwrap(),
        creds.map(|c| Credential::parse(c).unwrap()),
    )
}

#[tokio::test]
async fn bearer_challenge_is_answered_with_a_token_from_the_realm() {
    let fake = start_fake().await;
    let c = client(Some("u:p"));
    let r = Reference::parse(&format!("{}/team/app:v1", fake.addr)).unwrap();
    let host = Platforms::One(Platform::host());
    let resolved = c.resolve(&r, "http", &host).await.unwrap();
    assert_eq!(resolved.images.len(), 1);
    assert_eq!(resolved.images[0].manifest.layers[0].digest, "sha256:l1");
    assert_eq!(
        c.authorization().unwrap().to_str().unwrap(),
        format!("Bearer {TOKEN}")
    );
    // The token is kept: an index and its image take no new token.
    let r = Reference::parse(&format!("{}/team/app:multi", fake.addr)).unwrap();
    let resolved = c.resolve(&r, "http", &host).await.unwrap();
    assert!(resolved.index.is_some());
    assert_eq!(resolved.blobs().len(), 2);
    assert_eq!(fake.token_requests.load(Ordering::Relaxed), 1);

    let err = c
        .resolve(&r, "http", &Platforms::One("linux/s390x".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoPlatform { .. }), "{err}");
    assert!(
        err.to_string().contains(&Platform::host().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn refused_credentials_carry_the_registry_message() {
    let fake = start_fake().await;
    // Wrong password: the token endpoint refuses.
    let err = client(Some("u:wrong"))
        .resolve(
            &Reference::parse(&format!("{}/team/app:v1", fake.addr)).unwrap(),
            "http",
            &Platforms::All,
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("401") && text.contains("authentication required"),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");

    // A Basic-only registry and no credentials: say how to give some.
    let err = client(None)
        .resolve(
            &Reference::parse(&format!("{}/basic/app:v1", fake.addr)).unwrap(),
            "http",
            &Platforms::All,
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("401 Unauthorized") && text.contains("--creds"),
        "{text}"
    );

    let err = client(Some("u:p"))
        .resolve(
            &Reference::parse(&format!("{}/team/app:nope", fake.addr)).unwrap(),
            "http",
            &Platforms::All,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MANIFEST_UNKNOWN"), "{err}");
}

#[test]
fn percent_coding_round_trips() {
    let s = "https://r.io:5000/v2/a/b/blobs/sha256:ab?x=1&y=2 z";
    let enc = percent_encode(s);
    assert!(!enc.contains([':', '/', '?', '&', ' ']), "{enc}");
    assert_eq!(percent_decode(&enc).as_deref(), Some(s));
    assert_eq!(percent_decode("a%2"), None);
    assert_eq!(
        query_param(Some("a=1&url=https://r.io/x%20y&b"), "url").as_deref(),
        Some("https://r.io/x y")
    );
    assert_eq!(query_param(Some("b"), "b").as_deref(), Some(""));
    assert_eq!(query_param(None, "url"), None);
}
