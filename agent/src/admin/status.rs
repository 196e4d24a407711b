//! What `/status` returns and `damselfly status` prints: steering (programs,
//! rules, counters), then what an operator asks first: is the tracker there,
//! which peers, how full is the cache, does the runtime trust the node CA,
//! and what went wrong lately. Everything comes from state the agent already
//! keeps; answering dials nothing and reads no disk.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::Admin;
use crate::telemetry::{InterceptTotals, LogEvent, Stamp};
use crate::{
    intercept::{Refusal, TrustVerdict},
    steer::{AttachedProgram, Rules},
    swarm::{PeerServer, Swarm},
    tracker::ReplicaHealth,
    vocab::PortCounters,
};

/// A peer that answered within this long counts as recently seen.
pub const PEERS_RECENT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    /// A seed steers nothing: cgroup, pins, programs and counters are empty.
    #[serde(default)]
    pub seed: bool,
    pub pid: u32,
    /// When the agent answered (the times below compare with it).
    #[serde(default = "Stamp::now")]
    pub time: Stamp,
    pub cgroup: String,
    pub pin_dir: String,
    pub listen: Vec<SocketAddr>,
    pub programs: Vec<AttachedProgram>,
    pub rules: Rules,
    pub counters: Vec<PortCounters>,
    pub intercept: InterceptTotals,
    /// Clients whose connections are spliced because they refused the node
    /// CA's certificate: the runtime does not trust the CA (yet).
    #[serde(default)]
    pub refused_ca: Vec<Refusal>,
    /// Each steered client's trust in the node CA; empty where no TLS is
    /// terminated (a seed, --splice-only).
    #[serde(default)]
    pub ca_trust: Vec<TrustVerdict>,
    /// Each `--tracker` replica; empty without one.
    #[serde(default)]
    pub tracker: Vec<ReplicaStatus>,
    /// `None` without a swarm (no --tracker, or no cache).
    #[serde(default)]
    pub peers: Option<PeerStatus>,
    /// `None` with --splice-only, or when the cache could not be opened.
    #[serde(default)]
    pub cache: Option<CacheStatus>,
    /// The agent's last WARN/ERROR log events, oldest first.
    #[serde(default)]
    pub last_errors: Vec<LogEvent>,
}

/// One tracker replica, as the agent's heartbeats and requests left it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub addr: String,
    /// The latest call to it succeeded.
    pub reachable: bool,
    /// It holds this agent's lease and announcements.
    pub registered: bool,
    #[serde(default)]
    pub last_ok: Option<Stamp>,
    #[serde(default)]
    pub last_error_at: Option<Stamp>,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl From<ReplicaHealth> for ReplicaStatus {
    fn from(h: ReplicaHealth) -> Self {
        let reachable = h.reachable();
        let (last_error_at, last_error) = match h.last_error {
            Some((at, e)) => (Some(at.into()), Some(e)),
            None => (None, None),
        };
        Self {
            addr: h.addr,
            reachable,
            registered: h.registered,
            last_ok: h.last_ok.map(Stamp::from),
            last_error_at,
            last_error,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// Peers this agent has dialled for pieces.
    pub known: usize,
    /// Of those, the ones that answered in the last [`PEERS_RECENT`].
    pub seen_recently: usize,
    /// Connections to peers (this agent fetching).
    pub connections_out: usize,
    /// Connections from peers (this agent serving).
    pub connections_in: usize,
    /// Peers being sent pieces now.
    pub serving: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheStatus {
    pub capacity_bytes: u64,
    /// Complete and partial blobs (partial ones at full size).
    pub used_bytes: u64,
    /// Complete blobs.
    pub blobs: usize,
    /// Blobs being downloaded or kept partial for a resume.
    pub partial_blobs: usize,
}

/// The swarm's parts `/status` reads.
pub struct SwarmParts {
    pub swarm: Arc<Swarm>,
    pub server: Arc<PeerServer>,
}

impl Admin {
    pub fn status(&self) -> Status {
        let mut s = Status {
            instance: self.instance.clone(),
            seed: self.steering.is_none(),
            pid: std::process::id(),
            time: Stamp::now(),
            cgroup: String::new(),
            pin_dir: String::new(),
            listen: self.listen.clone(),
            programs: Vec::new(),
            rules: Rules {
                ports: Vec::new(),
                comms: Vec::new(),
                exclude: Vec::new(),
            },
            counters: Vec::new(),
            intercept: self.metrics.intercept_totals(),
            refused_ca: Vec::new(),
            ca_trust: Vec::new(),
            tracker: Vec::new(),
            peers: None,
            cache: None,
            last_errors: self.recent.events(),
        };
        if let Some(st) = &self.steering {
            s.cgroup = st.cgroup.display().to_string();
            s.pin_dir = st.pin_dir.display().to_string();
            s.programs = st.attached.clone();
            s.rules = st.rules.clone();
            s.counters = st.counters();
            if let Some(t) = &self.trust {
                s.refused_ca = t.refusals();
                s.ca_trust = t.verdicts(&st.rules.comms);
            }
        }
        if let Some(p) = &self.swarm {
            s.tracker = p
                .swarm
                .tracker
                .health()
                .into_iter()
                .map(ReplicaStatus::from)
                .collect();
            let out = p.swarm.peers.counts(PEERS_RECENT);
            s.peers = Some(PeerStatus {
                known: out.known,
                seen_recently: out.seen_recently,
                connections_out: out.connected,
                connections_in: p.server.peers_connected(),
                serving: p.server.peers_serving(),
            });
        }
        s.cache = self.store.as_ref().map(|store| {
            let u = store.usage();
            CacheStatus {
                capacity_bytes: u.capacity,
                used_bytes: u.used_bytes,
                blobs: u.blobs,
                partial_blobs: u.partial,
            }
        });
        s
    }
}
