//! Whether the origin would serve a client a blob, and the "yes" answers
//! remembered. Pure: the caller asks the origin and passes the clock.
//!
//! A yes is about one blob at one registry endpoint (scheme, host and port:
//! a registry's port 80 and 443 may be different servers with different
//! rules) in one repository, for one credential. The digest is part of it:
//! registries link blobs to repositories, so a yes for one blob of a
//! repository says nothing about a digest that repository does not hold
//! (a token for a public repository must not reach a private layer through
//! it). A credential is never stored, only its sha256; a yes is kept at
//! most [`TTL`].

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use hyper::StatusCode;
use sha2::{Digest, Sha256};

pub(super) const TTL: Duration = Duration::from_secs(60);
/// Bound on remembered answers; the oldest go first when full.
const MAX_ENTRIES: usize = 4096;

/// What the origin's answer to the authorization HEAD, at the end of its
/// redirects, means for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// 2xx: the origin would serve this client this blob.
    Yes,
    /// 401, 403 or 404: it would not.
    Refused,
    /// Anything else (a 5xx, a redirect left unfollowed, 304 to a
    /// conditional request): not a yes, so nothing cached is served.
    No,
}

impl Verdict {
    pub(super) fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => Verdict::Yes,
            401 | 403 | 404 => Verdict::Refused,
            _ => Verdict::No,
        }
    }
}

/// The blob a yes is about.
#[derive(Debug, Clone, Copy)]
pub(super) struct Subject<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub repo: &'a str,
    /// The digest's 64 hex digits.
    pub hex: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    scheme: String,
    host: String,
    port: u16,
    repo: String,
    hex: String,
    credential: [u8; 32],
}

#[derive(Debug, Default)]
pub(super) struct AuthzCache {
    allowed_until: HashMap<Key, Instant>,
}

impl AuthzCache {
    fn key(subject: &Subject, authorization: Option<&[u8]>) -> Key {
        let mut h = Sha256::new();
        // "none" and an empty header must not collide with each other.
        match authorization {
            Some(a) => {
                h.update([1]);
                h.update(a);
            }
            None => h.update([0]),
        }
        Key {
            scheme: subject.scheme.to_ascii_lowercase(),
            host: subject.host.to_ascii_lowercase(),
            port: subject.port,
            repo: subject.repo.to_string(),
            hex: subject.hex.to_string(),
            credential: h.finalize().into(),
        }
    }

    pub(super) fn is_allowed(
        &self,
        subject: &Subject,
        authorization: Option<&[u8]>,
        now: Instant,
    ) -> bool {
        self.allowed_until
            .get(&Self::key(subject, authorization))
            .is_some_and(|&until| now < until)
    }

    pub(super) fn allow(&mut self, subject: &Subject, authorization: Option<&[u8]>, now: Instant) {
        if self.allowed_until.len() >= MAX_ENTRIES {
            self.allowed_until.retain(|_, &mut until| now < until);
            if self.allowed_until.len() >= MAX_ENTRIES {
                let oldest = self
                    .allowed_until
                    .iter()
                    .min_by_key(|(_, u)| **u)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.allowed_until.remove(&k);
                }
            }
        }
        self.allowed_until
            .insert(Self::key(subject, authorization), now + TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER_HEX: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn blob(repo: &str) -> Subject<'_> {
        Subject {
            scheme: "https",
            host: "r.io",
            port: 443,
            repo,
            hex: HEX,
        }
    }

    #[test]
    fn yes_is_per_credential_repo_and_registry_and_expires() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        c.allow(&blob("team/app"), Some(b"Bearer abc"), t0);
        let upper = Subject {
            host: "R.IO",
            ..blob("team/app")
        };
        assert!(c.is_allowed(&upper, Some(b"Bearer abc"), t0 + Duration::from_secs(59)));
        assert!(!c.is_allowed(&blob("team/app"), Some(b"Bearer abc"), t0 + TTL));
        assert!(!c.is_allowed(&blob("team/app"), Some(b"Bearer xyz"), t0));
        assert!(!c.is_allowed(&blob("team/app"), None, t0));
        assert!(!c.is_allowed(&blob("team/other"), Some(b"Bearer abc"), t0));
        let other_host = Subject {
            host: "q.io",
            ..blob("team/app")
        };
        assert!(!c.is_allowed(&other_host, Some(b"Bearer abc"), t0));
    }

    /// Port 80 of a registry may answer what its 443 would refuse (or be
    /// another server altogether): a yes from one is not a yes from the other.
    #[test]
    fn yes_is_per_scheme_and_port() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        let http = Subject {
            scheme: "http",
            port: 80,
            ..blob("team/app")
        };
        c.allow(&http, None, t0);
        assert!(c.is_allowed(&http, None, t0));
        assert!(!c.is_allowed(&blob("team/app"), None, t0));
        let http_on_443 = Subject {
            scheme: "http",
            ..blob("team/app")
        };
        assert!(!c.is_allowed(&http_on_443, None, t0));
        let https_on_5000 = Subject {
            port: 5000,
            ..blob("team/app")
        };
        assert!(!c.is_allowed(&https_on_5000, None, t0));
    }

    /// A credential that may read a repository is not a yes for a digest
    /// the repository does not hold (the origin answers 404 for it there).
    #[test]
    fn yes_is_per_blob() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        c.allow(&blob("public/app"), Some(b"Bearer public"), t0);
        let other = Subject {
            hex: OTHER_HEX,
            ..blob("public/app")
        };
        assert!(!c.is_allowed(&other, Some(b"Bearer public"), t0));
    }

    #[test]
    fn only_a_2xx_is_a_yes() {
        for (code, want) in [
            (200, Verdict::Yes),
            (206, Verdict::Yes),
            (301, Verdict::No),
            (302, Verdict::No),
            (304, Verdict::No),
            (307, Verdict::No),
            (308, Verdict::No),
            (400, Verdict::No),
            (401, Verdict::Refused),
            (403, Verdict::Refused),
            (404, Verdict::Refused),
            (429, Verdict::No),
            (500, Verdict::No),
            (503, Verdict::No),
        ] {
            assert_eq!(
                Verdict::of(StatusCode::from_u16(code).unwrap()),
                want,
                "{code}"
            );
        }
    }

    #[test]
    fn no_credential_and_empty_credential_differ() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        c.allow(&blob("x"), None, t0);
        assert!(c.is_allowed(&blob("x"), None, t0));
        assert!(!c.is_allowed(&blob("x"), Some(b""), t0));
    }

    #[test]
    fn stays_bounded() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        let repos: Vec<String> = (0..(MAX_ENTRIES + 10))
            .map(|i| format!("repo{i}"))
            .collect();
        for (i, repo) in repos.iter().enumerate() {
            c.allow(&blob(repo), None, t0 + Duration::from_millis(i as u64));
        }
        assert!(c.allowed_until.len() <= MAX_ENTRIES);
        assert!(c.is_allowed(
            &blob(&repos[MAX_ENTRIES + 9]),
            None,
            t0 + Duration::from_secs(1)
        ));
    }
}
