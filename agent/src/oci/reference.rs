//! Image references (`host[:port]/repo[:tag][@digest]`, Docker's defaults)
//! and blob URLs (`https://host[:port]/v2/<repo>/blobs/sha256:<hex>`).

use std::fmt;

use crate::origin::OriginRef;

/// Docker's name for Docker Hub in references, and the host its API lives on.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("invalid image reference {0:?}: {1}")]
    Image(String, &'static str),
    #[error("invalid blob URL {0:?}: {1}")]
    BlobUrl(String, &'static str),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written (`docker.io` when none was), lowercase, with
    /// its port if one was given.
    pub registry: String,
    /// `library/`-prefixed for official Docker Hub images.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`; wins over the tag when both are given, as in Docker.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, RefError> {
        let bad = |why| RefError::Image(s.to_string(), why);
        if s.is_empty() || s.contains("://") {
            return Err(bad("expected host[:port]/repository[:tag][@sha256:digest]"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(bad("a digest is sha256: and 64 lowercase hex digits"));
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is the part after the last ':' that is past the last '/'
        // (a ':' before it is the registry's port).
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(bad(
                "a tag is 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
            ));
        }
        // Docker's rule: the first component names a registry only if it
        // looks like a host (has a '.' or a port, or is localhost).
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_ascii_lowercase(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_repo(&repository) {
            return Err(bad(
                "a repository is lowercase [a-z0-9] components joined by '/' (separators . _ __ -)",
            ));
        }
        if split_host_port(&registry).is_none() {
            return Err(bad("the registry's port is not a number"));
        }
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry API answers on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What goes after `/manifests/`: the digest if there is one, else the tag
    /// (`latest` when none was given).
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The tag to name the image by in a layout: the one given, or `latest`
    /// when the reference has neither tag nor digest.
    pub fn tag_or_default(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }

    pub fn origin(&self, scheme: &'static str) -> OriginRef {
        let (host, port) = split_host_port(self.api_host()).unwrap_or((self.api_host(), None));
        OriginRef::new(scheme, host, port.unwrap_or(default_port(scheme)))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// One blob at its registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobUrl {
    pub scheme: &'static str,
    /// Lowercase, without the port.
    pub host: String,
    pub port: u16,
    pub repo: String,
    /// 64 lowercase hex digits.
    pub hex: String,
}

impl BlobUrl {
    pub fn new(origin: &OriginRef, repo: &str, digest: &str) -> Result<Self, RefError> {
        let url = format!(
            "{}://{}/v2/{repo}/blobs/{digest}",
            origin.scheme,
            origin.authority()
        );
        Self::parse(&url)
    }

    pub fn parse(s: &str) -> Result<Self, RefError> {
        let bad = |why| RefError::BlobUrl(s.to_string(), why);
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            ("https", r)
        } else if let Some(r) = s.strip_prefix("http://") {
            ("http", r)
        } else {
            return Err(bad("expected http:// or https://"));
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no path; expected /v2/<repo>/blobs/sha256:<hex>"))?;
        if authority.contains('@') {
            return Err(bad("credentials do not go in the URL; use --creds"));
        }
        let (host, port) =
            split_host_port(authority).ok_or_else(|| bad("the port is not a number"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let path = format!("/{}", path.split(['?', '#']).next().unwrap_or_default());
        let (repo, digest) = path
            .strip_prefix("/v2/")
            .and_then(|p| p.rsplit_once("/blobs/"))
            .ok_or_else(|| bad("not a blob: expected /v2/<repo>/blobs/sha256:<hex>"))?;
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| bad("the digest is not sha256:<64 lowercase hex digits>"))?;
        if !valid_repo(repo) {
            return Err(bad("the repository name is not valid"));
        }
        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(default_port(scheme)),
            repo: repo.to_string(),
            hex: hex.to_string(),
        })
    }

    pub fn origin(&self) -> OriginRef {
        OriginRef::new(self.scheme, &self.host, self.port)
    }

    /// `/v2/<repo>/blobs/sha256:<hex>`.
    pub fn path(&self) -> String {
        format!("/v2/{}/blobs/sha256:{}", self.repo, self.hex)
    }

    pub fn digest(&self) -> String {
        format!("sha256:{}", self.hex)
    }
}

impl fmt::Display for BlobUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = self.origin();
        write!(f, "{}://{}{}", self.scheme, origin.authority(), self.path())
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// `host[:port]`; `None` if the port is not a number.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// The distribution spec's repository name grammar: path components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
pub(crate) fn valid_repo(repo: &str) -> bool {
    !repo.is_empty() && repo.len() <= 255 && repo.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", followed by an alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let x = r("busybox");
        assert_eq!(
            (
                x.registry.as_str(),
                x.repository.as_str(),
                x.tag.clone(),
                x.digest.clone()
            ),
            ("docker.io", "library/busybox", None, None)
        );
        assert_eq!(x.api_host(), "registry-1.docker.io");
        assert_eq!(x.manifest_ref(), "latest");
        assert_eq!(x.tag_or_default(), Some("latest"));
        assert_eq!(r("node:16").repository, "library/node");
        assert_eq!(r("node:16").tag.as_deref(), Some("16"));
        assert_eq!(r("bitnami/redis:7").repository, "bitnami/redis");
        assert_eq!(r("docker.io/redis").repository, "library/redis");
        assert_eq!(r("index.docker.io/redis").registry, "docker.io");
        assert_eq!(r("docker.io/redis").to_string(), "docker.io/library/redis");
    }

    #[test]
    fn registries_ports_tags_and_digests() {
        let x = r("Registry.Example:5000/team/app:v1.2");
        assert_eq!(x.registry, "registry.example:5000");
        assert_eq!(x.repository, "team/app");
        assert_eq!(x.tag.as_deref(), Some("v1.2"));
        let o = x.origin("https");
        assert_eq!((o.host.as_str(), o.port), ("registry.example", 5000));

        let x = r("localhost/app");
        assert_eq!(
            (x.registry.as_str(), x.repository.as_str()),
            ("localhost", "app")
        );
        assert_eq!(x.origin("http").port, 80);

        let x = r(&format!("ghcr.io/o/app:v1@sha256:{HEX}"));
        assert_eq!(x.manifest_ref(), format!("sha256:{HEX}"));
        assert_eq!(x.tag.as_deref(), Some("v1"));
        assert_eq!(x.tag_or_default(), Some("v1"));
        let x = r(&format!("ghcr.io/o/app@sha256:{HEX}"));
        assert_eq!(x.tag_or_default(), None);
        // A ':' in the host part is a port, not a tag.
        let x = r("reg.io:443/app");
        assert_eq!((x.registry.as_str(), x.tag), ("reg.io:443", None));
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "https://reg.io/app",
            "reg.io/App",
            "reg.io/app:",
            "reg.io/app:-x",
            "reg.io/app@sha1:abcd",
            "reg.io/app@sha256:abc",
            "reg.io:x/app",
            "reg.io/a//b",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid image reference"), "{e}");
        }
    }

    #[test]
    fn blob_urls() {
        let u = BlobUrl::parse(&format!(
            "https://Reg.IO:5000/v2/team/app/blobs/sha256:{HEX}"
        ))
        .unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            ("https", "reg.io", 5000)
        );
        assert_eq!(u.repo, "team/app");
        assert_eq!(u.digest(), format!("sha256:{HEX}"));
        assert_eq!(
            u.to_string(),
            format!("https://reg.io:5000/v2/team/app/blobs/sha256:{HEX}")
        );
        let u = BlobUrl::parse(&format!("http://reg.io/v2/app/blobs/sha256:{HEX}")).unwrap();
        assert_eq!(u.port, 80);
        assert_eq!(BlobUrl::new(&u.origin(), "app", &u.digest()).unwrap(), u);
        for bad in [
            format!("ftp://reg.io/v2/app/blobs/sha256:{HEX}"),
            format!("https://reg.io/v2/app/manifests/sha256:{HEX}"),
            "https://reg.io/v2/app/blobs/sha256:abc".to_string(),
            format!("https://u:p@reg.io/v2/app/blobs/sha256:{HEX}"),
            format!("https://reg.io:99999/v2/app/blobs/sha256:{HEX}"),
            "https://reg.io".to_string(),
        ] {
            assert!(BlobUrl::parse(&bad).is_err(), "{bad}");
        }
    }
}
