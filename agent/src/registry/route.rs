//! Which requests are blob fetches. Pure. Anything that is not exactly a
//! well-formed `GET|HEAD /v2/<name>/blobs/sha256:<64 hex>` goes to the origin
//! untouched: the origin owns every error about malformed names or digests.

use hyper::Method;

use crate::oci::valid_repo;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Blob {
        repo: String,
        /// 64 lowercase hex characters.
        hex: String,
        head: bool,
    },
    Other,
}

pub fn route(method: &Method, path: &str) -> Route {
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Route::Other,
    };
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Other;
    };
    let Some((repo, digest)) = rest.rsplit_once("/blobs/") else {
        return Route::Other;
    };
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Route::Other;
    };
    if hex.len() != 64
        || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        || !valid_repo(repo)
    {
        return Route::Other;
    }
    Route::Blob {
        repo: repo.to_string(),
        hex: hex.to_string(),
        head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn blobs_are_recognised() {
        let r = route(
            &Method::GET,
            &format!("/v2/library/node/blobs/sha256:{HEX}"),
        );
        assert_eq!(
            r,
            Route::Blob {
                repo: "library/node".into(),
                hex: HEX.into(),
                head: false
            }
        );
        let r = route(
            &Method::HEAD,
            &format!("/v2/a.b_c__d--e/f/blobs/sha256:{HEX}"),
        );
        assert!(matches!(r, Route::Blob { head: true, .. }));
    }

    #[test]
    fn everything_else_is_other() {
        for (m, p) in [
            (Method::GET, "/v2/".to_string()),
            (Method::GET, "/v2/library/node/manifests/16".to_string()),
            (Method::PUT, format!("/v2/x/blobs/sha256:{HEX}")),
            (Method::POST, "/v2/x/blobs/uploads/".to_string()),
            (Method::GET, format!("/v2/x/blobs/sha512:{HEX}")),
            (Method::GET, format!("/v2/x/blobs/sha256:{}", &HEX[1..])),
            (
                Method::GET,
                format!("/v2/x/blobs/sha256:{}", HEX.to_uppercase()),
            ),
            (Method::GET, format!("/v2/UPPER/blobs/sha256:{HEX}")),
            (Method::GET, format!("/v2/a..b/blobs/sha256:{HEX}")),
            (Method::GET, format!("/v2/-a/blobs/sha256:{HEX}")),
            (Method::GET, format!("/v2//blobs/sha256:{HEX}")),
            (Method::GET, format!("/v2/a___b/blobs/sha256:{HEX}")),
            (Method::GET, "/token?scope=x".to_string()),
        ] {
            assert_eq!(route(&m, &p), Route::Other, "{m} {p}");
        }
    }
}
