//! Registry credentials (`--creds`, a docker config.json) and the
//! `WWW-Authenticate` challenges of the distribution token flow.

use std::{collections::BTreeMap, path::Path};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("--creds: expected USER:PASSWORD")]
    Creds,
    #[error("reading docker config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("docker config {path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("docker config {path}: the auth entry for {host} is not base64 of user:password")]
    Entry { path: String, host: String },
}

/// A user name and password, sent as Basic or traded for a token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}:***)", self.user)
    }
}

impl Credential {
    /// `USER:PASSWORD` (the password may hold ':').
    pub fn parse(s: &str) -> Result<Self, CredsError> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Self {
                user: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err(CredsError::Creds),
        }
    }

    pub fn basic(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.user, self.password))
        )
    }

    /// The entry for `registry` (as in a reference: `docker.io`, `host:port`)
    /// in a docker config.json; `Ok(None)` if the file or the entry is absent.
    /// Credential helpers (`credsStore`) are not run.
    pub fn from_docker_config(path: &Path, registry: &str) -> Result<Option<Self>, CredsError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CredsError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let config: Config = serde_json::from_slice(&text).map_err(|source| CredsError::Json {
            path: path.display().to_string(),
            source,
        })?;
        // `docker login` writes Docker Hub under its v1 URL; other hosts bare
        // or with a scheme.
        let wanted: Vec<String> = if registry == "docker.io" {
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "docker.io",
                "registry-1.docker.io",
            ]
            .map(String::from)
            .to_vec()
        } else {
            vec![registry.to_string()]
        };
        let key = |k: &str| {
            k.trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_ascii_lowercase()
        };
        let entry = wanted.iter().find_map(|w| {
            config
                .auths
                .iter()
                .find(|(k, _)| *k == w || key(k) == key(w))
                .map(|(_, e)| e)
        });
        let Some(entry) = entry else { return Ok(None) };
        let bad = || CredsError::Entry {
            path: path.display().to_string(),
            host: registry.to_string(),
        };
        if let Some(auth) = &entry.auth {
            let raw = STANDARD.decode(auth.trim()).map_err(|_| bad())?;
            let pair = String::from_utf8(raw).map_err(|_| bad())?;
            return Self::parse(&pair).map(Some).map_err(|_| bad());
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(Some(Self {
                user: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercase: `basic`, `bearer`.
    pub scheme: String,
    /// Parameter names lowercase; values unquoted.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// RFC 9110 §11.6.1: `scheme p=v, p="v, w", scheme2 ...`. A scope holds
/// commas inside quotes (`repository:a:pull,push`), so this is a small
/// tokenizer, not a split.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize, set: &[u8]| {
        while *i < s.len() && set.contains(&s[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && !b" \t,=\"".contains(&s[*i]) {
            *i += 1;
        }
        header[start..*i].to_string()
    };
    loop {
        skip(&mut i, b" \t,");
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        if word.is_empty() {
            // A stray quote or '=': step over it.
            i += 1;
            continue;
        }
        skip(&mut i, b" \t");
        if i < s.len() && s[i] == b'=' {
            i += 1;
            skip(&mut i, b" \t");
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i += 1;
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn bearer_challenge_with_commas_in_quotes() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            c[0].param("scope"),
            Some("repository:library/busybox:pull,push")
        );
    }

    #[test]
    fn several_challenges_and_unquoted_values() {
        let c = parse_challenges(
            r#"Basic realm="dfly-test", Bearer realm=https://t/x , error="insufficient_scope""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("dfly-test"));
        assert_eq!(c[1].param("realm"), Some("https://t/x"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
        assert_eq!(
            parse_challenges(r#"Basic realm="a\"b""#)[0].param("realm"),
            Some("a\"b")
        );
        assert!(parse_challenges("").is_empty());
    }

    #[test]
    fn creds_and_docker_config() {
        let c = Credential::parse("u:p:with:colons").unwrap();
        assert_eq!(c.password, "p:with:colons");
        assert_eq!(
            c.basic(),
            format!("Basic {}", STANDARD.encode("u:p:with:colons"))
        );
        assert!(Credential::parse("nocolon").is_err());
        assert!(Credential::parse(":p").is_err());

        let dir = TempDir::new("dockercfg");
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{}"}},
                    "registry.example:5000": {{"auth": "{}"}},
                    "https://ghcr.io": {{"username": "g", "password": "h"}},
                    "broken.example": {{"auth": "!!"}}
                }}, "credsStore": "desktop"}}"#,
                STANDARD.encode("hub:secret"),
                STANDARD.encode("me:pw")
            ),
        )
        .unwrap();
        let get = |r| Credential::from_docker_config(&path, r);
        assert_eq!(get("docker.io").unwrap().unwrap().user, "hub");
        assert_eq!(
            get("registry.example:5000").unwrap().unwrap().password,
            "pw"
        );
        assert_eq!(get("ghcr.io").unwrap().unwrap().user, "g");
        assert!(get("quay.io").unwrap().is_none());
        assert!(get("broken.example").is_err());
        assert!(
            Credential::from_docker_config(&dir.path().join("absent.json"), "x")
                .unwrap()
                .is_none()
        );
        assert!(!format!("{:?}", get("docker.io").unwrap().unwrap()).contains("secret"));
    }
}
