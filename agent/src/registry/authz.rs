//! Remembered "yes" answers from the origin: a client's credential may read
//! a repository's blobs. Keyed by (registry, repository, sha256 of the
//! `Authorization` header) so a credential is never stored, only its hash;
//! kept at most [`TTL`]. Pure: the caller passes the clock.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

pub const TTL: Duration = Duration::from_secs(60);
/// Bound on remembered answers; the oldest go first when full.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    registry: String,
    repo: String,
    credential: [u8; 32],
}

#[derive(Debug, Default)]
pub struct AuthzCache {
    allowed_until: HashMap<Key, Instant>,
}

impl AuthzCache {
    fn key(registry: &str, repo: &str, authorization: Option<&[u8]>) -> Key {
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
            registry: registry.to_ascii_lowercase(),
            repo: repo.to_string(),
            credential: h.finalize().into(),
        }
    }

    pub fn is_allowed(
        &self,
        registry: &str,
        repo: &str,
        authorization: Option<&[u8]>,
        now: Instant,
    ) -> bool {
        self.allowed_until
            .get(&Self::key(registry, repo, authorization))
            .is_some_and(|&until| now < until)
    }

    pub fn allow(
        &mut self,
        registry: &str,
        repo: &str,
        authorization: Option<&[u8]>,
        now: Instant,
    ) {
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
            .insert(Self::key(registry, repo, authorization), now + TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_is_per_credential_repo_and_registry_and_expires() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        c.allow("r.io", "team/app", Some(b"Bearer abc"), t0);
        assert!(c.is_allowed(
            "R.IO",
            "team/app",
            Some(b"Bearer abc"),
            t0 + Duration::from_secs(59)
        ));
        assert!(!c.is_allowed("r.io", "team/app", Some(b"Bearer abc"), t0 + TTL));
        assert!(!c.is_allowed("r.io", "team/app", Some(b"Bearer xyz"), t0));
        assert!(!c.is_allowed("r.io", "team/app", None, t0));
        assert!(!c.is_allowed("r.io", "team/other", Some(b"Bearer abc"), t0));
        assert!(!c.is_allowed("q.io", "team/app", Some(b"Bearer abc"), t0));
    }

    #[test]
    fn no_credential_and_empty_credential_differ() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        c.allow("r.io", "x", None, t0);
        assert!(c.is_allowed("r.io", "x", None, t0));
        assert!(!c.is_allowed("r.io", "x", Some(b""), t0));
    }

    #[test]
    fn stays_bounded() {
        let mut c = AuthzCache::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ENTRIES + 10) {
            c.allow(
                "r.io",
                &format!("repo{i}"),
                None,
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert!(c.allowed_until.len() <= MAX_ENTRIES);
        assert!(c.is_allowed(
            "r.io",
            &format!("repo{}", MAX_ENTRIES + 9),
            None,
            t0 + Duration::from_secs(1)
        ));
    }
}
