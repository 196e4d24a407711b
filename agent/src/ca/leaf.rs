//! Leaf certificates per SNI, minted on demand and cached by name, signed by
//! whichever CA is on disk now: a replaced CA (`damselfly ca rotate`) takes
//! over within [`LeafPolicy::recheck`], without restarting the agent.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use time::{Duration, OffsetDateTime};

use super::{Issuer, Watch};
use crate::origin::RegistryHosts;

/// What "now" is; replaceable so tests can walk a leaf towards expiry.
pub(super) type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Lifetime and renewal of leaves.
#[derive(Clone)]
pub struct LeafPolicy {
    /// Validity of a leaf from the moment it is minted.
    pub lifetime: Duration,
    /// `notBefore` this far in the past, for clients whose clock is behind.
    pub backdate: Duration,
    /// Leaves kept in memory. Wildcard patterns admit unboundedly many names,
    /// so the cache is bounded; past it, the entry due soonest is dropped.
    pub max_cached: usize,
    /// How often a handshake looks at the CA files for a replacement (a
    /// few `stat`s; the files are read only when they changed).
    pub recheck: Duration,
    pub clock: Clock,
}

impl Default for LeafPolicy {
    fn default() -> Self {
        Self {
            lifetime: Duration::hours(24),
            backdate: Duration::minutes(5),
            max_cached: 1024,
            recheck: Duration::seconds(2),
            clock: Arc::new(OffsetDateTime::now_utc),
        }
    }
}

impl fmt::Debug for LeafPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafPolicy")
            .field("lifetime", &self.lifetime)
            .field("backdate", &self.backdate)
            .field("max_cached", &self.max_cached)
            .field("recheck", &self.recheck)
            .finish_non_exhaustive()
    }
}

struct Cached {
    key: Arc<CertifiedKey>,
    /// Once a third of the lifetime is left, the next handshake re-mints, so a
    /// leaf is never served close to its expiry.
    renew_at: OffsetDateTime,
}

/// A `rustls::server::ResolvesServerCert` that answers registry names with a
/// leaf signed by the node CA (chain: leaf, CA) and everything else with
/// `None`, which fails the handshake.
pub struct LeafResolver {
    registries: RegistryHosts,
    policy: LeafPolicy,
    state: Mutex<State>,
}

/// One lock for all of it: a replaced CA and the leaves it invalidates
/// change together.
struct State {
    issuer: Arc<Issuer>,
    watch: Watch,
    next_check: OffsetDateTime,
    cache: HashMap<String, Cached>,
}

impl fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.cached();
        f.debug_struct("LeafResolver")
            .field("registries", &self.registries.patterns())
            .field("policy", &self.policy)
            .field("cached", &cached)
            .finish_non_exhaustive()
    }
}

impl LeafResolver {
    pub(crate) fn new(
        issuer: Arc<Issuer>,
        watch: Watch,
        registries: RegistryHosts,
        policy: LeafPolicy,
    ) -> Self {
        let next_check = (policy.clock)() + policy.recheck;
        Self {
            registries,
            policy,
            state: Mutex::new(State {
                issuer,
                watch,
                next_check,
                cache: HashMap::new(),
            }),
        }
    }

    /// The leaf for `name` (an SNI), minting or renewing it as needed;
    /// `None` if `name` is not a registry or minting failed.
    pub fn leaf_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !self.registries.contains(&name) {
            tracing::debug!(%name, "no leaf: not a registry name");
            return None;
        }
        let now = (self.policy.clock)();
        // Minting under the lock is fine: it is a P-256 key and one signature,
        // and it keeps concurrent handshakes for one name from minting twice.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now >= state.next_check {
            state.next_check = now + self.policy.recheck;
            if let Some(issuer) = state.watch.replaced() {
                state.issuer = Arc::new(issuer);
                // Their chains end in the old CA, which clients stop trusting.
                state.cache.clear();
            }
        }
        let State { issuer, cache, .. } = &mut *state;
        if let Some(c) = cache.get(&name)
            && now < c.renew_at
        {
            return Some(c.key.clone());
        }
        let not_after = now + self.policy.lifetime;
        let key = match issuer.mint(&name, now - self.policy.backdate, not_after) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::error!(%name, error = %e, "minting a leaf certificate");
                return None;
            }
        };
        tracing::debug!(%name, %not_after, "minted a leaf certificate");
        if !cache.contains_key(&name) && cache.len() >= self.policy.max_cached {
            cache.retain(|_, c| now < c.renew_at);
            if cache.len() >= self.policy.max_cached
                && let Some(due) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.renew_at)
                    .map(|(n, _)| n.clone())
            {
                cache.remove(&due);
            }
        }
        cache.insert(
            name,
            Cached {
                key: key.clone(),
                renew_at: not_after - self.policy.lifetime / 3,
            },
        );
        Some(key)
    }

    /// Leaves currently cached.
    pub fn cached(&self) -> usize {
        self.state.lock().map(|s| s.cache.len()).unwrap_or(0)
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.leaf_for(client_hello.server_name()?)
    }
}
