//! One simulated rollout: `nodes` agents pulling the same image at once,
//! driving the real [`Scheduler`] and the real tracker [`State`] on a
//! simulated clock and the [`Net`] model.
//!
//! What each simulated agent does is what the agent's code does, step for
//! step (the file each imitates is named where it is):
//!
//! - `acquire/mod.rs`, `swarm/mod.rs`: every layer blob starts with one
//!   `find_and_join`; the node the tracker names nobody to leads and fetches
//!   the whole blob from the origin in one streaming GET, in order; the rest
//!   follow and run the swarm driver.
//! - `acquire/driver.rs`: a follower's loop: carry out the scheduler's
//!   actions, deliver in order (`set_read_position`), then wait for one
//!   event: a piece request ending, a tracker answer, or
//!   `next_deadline()` (1 s when there is none). The tracker is asked every
//!   `refresh_every` after the last answer; listed peers' bitmaps go to
//!   `update_peer`, peers no longer listed to `remove_peer`, newly agreed
//!   hashes to `set_hash_known`.
//! - `swarm/progress.rs`: pieces are announced at once on the first change,
//!   then at most every `announce_every` after the last announcement's
//!   answer; at the end the last state, then the complete blob.
//! - `swarm/peer/server.rs`: a node serves at most `max_uploads` requests in
//!   all, `max_uploads_per_peer` to one node and `max_upload_peers` distinct
//!   nodes; a request beyond answers busy at once. An upload slot is held
//!   until the requester acknowledges the last byte.
//! - `swarm/peer/haves.rs`: a node fetching a layer tells the downloads that
//!   asked it for that layer (busy or not; at most `MAX_ASKERS`) of each
//!   piece it stores, half a round trip later; a follower takes a have from
//!   a peer the tracker named, for a piece whose hash it knows, and polls if
//!   it could ask for it. The leader, until its stream is done, answers busy
//!   a piece it has sent while it holds one it has sent to nobody.
//! - containerd pulls `concurrent_layers` layers at once, in order.
//!
//! Not modelled: node failures (and the takeover election), the registry's
//! own round trips (manifest, HEAD), CPU and disk, TCP/QUIC slow start and
//! loss, the tracker's own queueing (its calls take no simulated time; their
//! wall-clock cost is measured instead).

use std::{
    cmp::Ordering,
    collections::{BTreeSet, BinaryHeap, HashMap},
    time::{Duration, Instant},
};

use damselfly_core::{
    rollout,
    sched::{Action, Config, PeerId, Scheduler, Source},
    vocab::{Bitmap, Digest, PieceHash},
};
use damselfly_store::piece_size_for;
use damselfly_tracker::{Announce, Caller, DEFAULT_MAX_PEERS, Found, Limits, PeerInfo, State};

use crate::net::{FlowId, LinkId, Net};

/// Everything one run is given.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub image_bytes: u64,
    pub layers: u64,
    /// The largest piece size; a layer's own is `piece_size_for(size, this)`.
    pub piece_size: u64,
    /// Each node's uplink and downlink, Mbit/s.
    pub node_mbit: u32,
    /// The origin's uplink, Mbit/s.
    pub origin_mbit: u32,
    /// Round trip of one hop (node–node, node–origin, node–tracker).
    pub latency: Duration,
    pub seed: u64,
    /// Nodes start uniformly within this much of t = 0.
    pub jitter: Duration,
    /// Layers a node pulls at once (containerd: 3).
    pub concurrent_layers: usize,
    pub refresh_every: Duration,
    pub announce_every: Duration,
    pub heartbeat: Duration,
    pub max_uploads: usize,
    pub max_uploads_per_peer: usize,
    pub max_upload_peers: usize,
    pub config: Config,
    /// Peers asked of the tracker per find (the agent asks 0: the tracker's
    /// default, 32; the tracker answers at most 64). A what-if knob.
    pub max_peers: usize,
    /// Holders the tracker names per blob (`Limits::max_peers_per_digest`;
    /// past it announcements are refused and those nodes go unnamed).
    pub max_holders: usize,
    /// What-if (not in the agent): a holder answers busy, even with a slot
    /// free, a node already receiving this many transfers (peer pieces and
    /// origin streams), so its slots go to nodes that receive little. The
    /// agent would need the asker to say how many it receives.
    pub fed_limit: Option<usize>,
    /// Print a line per simulated second (time, nodes done, wall time).
    pub progress: bool,
    /// ... and a census of the downloads under way (see [`Sim::census`]).
    pub census: bool,
}

/// Why a holder answered busy (see [`Stats::busy_peers`]).
enum Busy {
    Peers,
    PerPeer,
    Uploads,
    Seeding,
}

/// Counts that explain a run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Piece requests to peers, and how many were answered busy.
    pub peer_requests: u64,
    pub busy: u64,
    /// Why: the holder serves `max_upload_peers` others, this node's
    /// `max_uploads_per_peer` already, `max_uploads` in all (or the asker
    /// receives `fed_limit` transfers already), or a leader
    /// holds pieces it has sent to nobody (seeding).
    pub busy_peers: u64,
    pub busy_per_peer: u64,
    pub busy_uploads: u64,
    pub busy_seeding: u64,
    /// Range requests to the origin (followers), and pieces the leaders
    /// streamed.
    pub origin_requests: u64,
    pub streamed_pieces: u64,
    /// Requests the schedulers cancelled (duplicates, timeouts, peers gone).
    pub cancels: u64,
    /// Peers a follower stopped hearing of in a `find` answer (not listed any
    /// more: `remove_peer`, their requests cancelled).
    pub unlisted: u64,
    /// Deadlines already past when set (the driver would poll again at once).
    pub spins: u64,
    pub events: u64,
    pub scheduler_calls: u64,
    /// Wall-clock time inside scheduler and tracker calls.
    pub scheduler_wall: Duration,
    pub tracker_wall: Duration,
    /// Announces and joins the tracker refused (its limits).
    pub tracker_refusals: u64,
    /// Nodes that uploaded at least one piece, and the share of all
    /// uploaded pieces the busiest 32 of them served.
    pub uploaders: usize,
    pub top32_share: f64,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per node: from its start to its last layer done, seconds.
    pub pull_s: Vec<f64>,
    pub origin_bytes: f64,
    /// Bytes every node's downlink received, useless duplicates and aborted
    /// transfers included.
    pub received_bytes: f64,
    pub image_bytes: u64,
    pub t_star_s: f64,
    /// Tracker calls per simulated second (find incl. join, announce,
    /// heartbeat), second by second.
    pub rpcs: Vec<[u32; 3]>,
    pub stats: Stats,
}

impl Outcome {
    pub fn rpcs_peak(&self) -> u32 {
        self.rpcs.iter().map(|r| r.iter().sum()).max().unwrap_or(0)
    }

    pub fn peak_of(&self, kind: usize) -> u32 {
        self.rpcs.iter().map(|r| r[kind]).max().unwrap_or(0)
    }
}

/// Nanoseconds since the start.
type Time = u64;

fn ns(d: Duration) -> Time {
    d.as_nanos() as Time
}

fn secs(t: Time) -> f64 {
    t as f64 / 1e9
}

type ReqId = usize;
type DlId = usize;

enum Ev {
    Start(usize),
    JoinAt(DlId),
    JoinAnswer(DlId, Option<Box<Found>>),
    StreamStart(DlId),
    StreamArrive(DlId, u64),
    FlowDone(FlowId, u64),
    ReqArrive(ReqId),
    Have(DlId, u32, u64),
    BusyReply(ReqId),
    Deliver(ReqId),
    ResetArrive(ReqId),
    Release { server: usize, client: usize },
    Wake(DlId, u64),
    RefreshSend(DlId),
    FindAt(DlId),
    News(DlId, Option<Box<Found>>),
    AnnounceAt(DlId, Box<(Vec<u8>, Vec<PieceHash>)>, bool),
    AnnounceDone(DlId, bool),
    AnnounceIdle(DlId),
    Heartbeat(usize),
}

struct Entry {
    at: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // Earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ToServer,
    Serving(FlowId),
    /// Bytes or a busy answer on their way back.
    Back,
}

struct Req {
    dl: DlId,
    piece: u64,
    from: Source,
    phase: Phase,
    cancelled: bool,
    /// Events and flows still naming it; freed at 0.
    refs: u32,
}

#[derive(Clone, Copy)]
enum FlowUse {
    Req(ReqId),
    Stream(DlId, u64),
}

struct Node {
    up: LinkId,
    down: LinkId,
    uploads: usize,
    /// Requests being answered, per requesting node.
    serving: HashMap<usize, usize>,
    started: Time,
    next_layer: usize,
    layers_done: usize,
    done_at: Option<Time>,
    /// Pieces uploaded to other nodes.
    served: u64,
    /// This node's download of each layer it started.
    dl_of: HashMap<usize, DlId>,
    /// Per layer, the downloads that asked this node for it (told of each
    /// piece it stores).
    askers: HashMap<usize, Vec<DlId>>,
}

#[derive(Default)]
struct Announcing {
    /// In an RPC or sleeping after one.
    busy: bool,
    /// Pieces held as last told.
    told: u64,
    /// The download is over: flush, then announce the complete blob.
    finishing: bool,
    over: bool,
}

struct Dl {
    node: usize,
    layer: usize,
    pieces: u64,
    size: u64,
    sched: Option<Scheduler>,
    held: Bitmap,
    hash_known: Vec<bool>,
    /// Every peer ever listed (the driver's `PeerTable`).
    seen: BTreeSet<u32>,
    open: HashMap<(u64, Source), ReqId>,
    read_pos: u64,
    done: bool,
    finished: bool,
    wake: u64,
    ann: Announcing,
    /// Leading: streaming the layer from the origin for the swarm.
    seeding: bool,
    /// Pieces sent to some peer, and how many held are not (leaders only).
    sent: Vec<bool>,
    held_unsent: u64,
}

pub struct Sim {
    p: Params,
    t0: Instant,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Entry>,
    net: Net,
    flow_use: Vec<Option<FlowUse>>,
    origin: LinkId,
    nodes: Vec<Node>,
    ids: Vec<String>,
    callers: Vec<Caller>,
    layer_sizes: Vec<u64>,
    digests: Vec<Digest>,
    dls: Vec<Dl>,
    reqs: Vec<Option<Req>>,
    free_reqs: Vec<ReqId>,
    tracker: State,
    rpcs: Vec<[u32; 3]>,
    stats: Stats,
    nodes_done: usize,
    /// At the last census: its time and what each node's uplink and
    /// downlink had sent by then.
    census_prev: (Time, Vec<(f64, f64)>),
}

/// `haves::MAX_ASKERS`.
const MAX_ASKERS: usize = 64;

const FIND: usize = 0;
const ANNOUNCE: usize = 1;
const HEARTBEAT: usize = 2;

/// SplitMix64: a small deterministic generator for start times and phases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max)`.
    fn below(&mut self, max: u64) -> u64 {
        if max == 0 { 0 } else { self.next() % max }
    }
}

fn piece_hash(layer: usize, piece: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&(layer as u64).to_le_bytes());
    h[8..16].copy_from_slice(&piece.to_le_bytes());
    h[31] = 1;
    h
}

/// Hashes the tracker now agrees on that the driver lacked.
fn take_hashes(known: &mut [bool], s: &mut Scheduler, found: &Found) {
    for (i, h) in found.hashes.iter().enumerate() {
        if h.is_some() && !known[i] {
            known[i] = true;
            s.set_hash_known(i as u64, true);
        }
    }
}

fn node_of(id: &str) -> Option<usize> {
    id.strip_prefix('n')?.parse().ok()
}

fn bytes_per_s(mbit: u32) -> f64 {
    f64::from(mbit) * 1e6 / 8.0
}

/// Runs one rollout to the end.
pub fn run(p: &Params) -> anyhow::Result<Outcome> {
    anyhow::ensure!(p.nodes > 0, "no nodes");
    anyhow::ensure!(
        p.layers > 0 && p.image_bytes >= p.layers,
        "an image of {} bytes cannot have {} layers",
        p.image_bytes,
        p.layers
    );
    anyhow::ensure!(p.piece_size > 0, "piece size must be positive");
    let mut sim = Sim::new(p.clone());
    sim.run(Time::MAX);
    Ok(sim.outcome())
}

impl Sim {
    fn new(p: Params) -> Self {
        let t0 = Instant::now();
        let mut net = Net::new();
        let origin = net.add_link(bytes_per_s(p.origin_mbit));
        let mut rng = Rng(p.seed);
        let mut tracker = State::with_limits(
            p.heartbeat,
            Limits {
                max_peers_per_digest: p.max_holders,
                ..Limits::default()
            },
        );
        let mut nodes = Vec::with_capacity(p.nodes);
        let mut ids = Vec::with_capacity(p.nodes);
        let mut callers = Vec::with_capacity(p.nodes);
        let mut queue = BinaryHeap::new();
        let mut seq = 0;
        let mut push = |queue: &mut BinaryHeap<Entry>, at: Time, ev: Ev| {
            seq += 1;
            queue.push(Entry { at, seq, ev });
        };
        for i in 0..p.nodes {
            let up = net.add_link(bytes_per_s(p.node_mbit));
            let down = net.add_link(bytes_per_s(p.node_mbit));
            let id = format!("n{i}");
            let caller = Caller::Identity(id.clone());
            let info = PeerInfo {
                id: id.clone(),
                quic_addr: format!("10.{}.{}.{}:4433", i >> 16, (i >> 8) & 255, i & 255),
                node: id.clone(),
                zone: String::new(),
                upload_capacity: bytes_per_s(p.node_mbit) as u64,
            };
            // Agents run before the rollout: registered, not counted.
            tracker
                .register(&caller, info, 0, t0)
                .expect("the default limits take every simulated node");
            let start = rng.below(ns(p.jitter));
            push(&mut queue, start, Ev::Start(i));
            let phase = rng.below(ns(p.heartbeat).max(1));
            push(&mut queue, phase, Ev::Heartbeat(i));
            nodes.push(Node {
                up,
                down,
                uploads: 0,
                serving: HashMap::new(),
                started: start,
                next_layer: 0,
                layers_done: 0,
                done_at: None,
                served: 0,
                dl_of: HashMap::new(),
                askers: HashMap::new(),
            });
            ids.push(id);
            callers.push(caller);
        }
        let layer_sizes = rollout::layer_sizes(p.image_bytes, p.layers);
        let digests = (0..layer_sizes.len())
            .map(|l| Digest::of(format!("damselfly-sim layer {l}").as_bytes()))
            .collect();
        Self {
            t0,
            now: 0,
            seq,
            queue,
            net,
            flow_use: Vec::new(),
            origin,
            nodes,
            ids,
            callers,
            layer_sizes,
            digests,
            dls: Vec::new(),
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            tracker,
            rpcs: Vec::new(),
            stats: Stats::default(),
            nodes_done: 0,
            census_prev: (0, Vec::new()),
            p,
        }
    }

    fn at(&self, t: Time) -> Instant {
        self.t0 + Duration::from_nanos(t)
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn half(&self) -> Time {
        ns(self.p.latency) / 2
    }

    fn count_rpc(&mut self, kind: usize) {
        let s = (self.now / 1_000_000_000) as usize;
        if self.rpcs.len() <= s {
            self.rpcs.resize(s + 1, [0; 3]);
        }
        self.rpcs[s][kind] += 1;
    }

    /// Until every node is done, or the next event is past `end`.
    fn run(&mut self, end: Time) {
        let wall = Instant::now();
        let mut next_report = 1_000_000_000;
        while self.nodes_done < self.nodes.len() {
            if self.queue.peek().is_none_or(|e| e.at > end) {
                break;
            }
            let Some(e) = self.queue.pop() else { break };
            if self.p.progress && e.at >= next_report {
                eprintln!(
                    "  t = {:.0} s: {} of {} nodes done, origin {:.2} x the image, {} events, wall {:.1} s (scheduler {:.1} s, tracker {:.1} s)",
                    secs(next_report),
                    self.nodes_done,
                    self.nodes.len(),
                    self.net.sent(self.origin, secs(self.now)) / self.p.image_bytes as f64,
                    self.stats.events,
                    wall.elapsed().as_secs_f64(),
                    self.stats.scheduler_wall.as_secs_f64(),
                    self.stats.tracker_wall.as_secs_f64(),
                );
                next_report += 1_000_000_000;
                if self.p.census {
                    eprintln!("{}", self.census());
                }
            }
            self.now = e.at;
            self.stats.events += 1;
            self.handle(e.ev);
        }
    }

    /// Why followers' downlinks sit idle: per layer, the downloads under
    /// way, pieces held and hashes known (means) and requests out; then the
    /// downloads with no request out, those of them for which a peer they
    /// have been told of truly holds a piece they lack (hash known), and of
    /// those, how many such peers have an upload slot free. Many idle with
    /// free holders means the scheduler does not know or is backing off.
    fn census(&mut self) -> String {
        let links = self.link_use();
        let mut layers = Vec::new();
        for l in 0..self.layer_sizes.len() {
            let ds: Vec<&Dl> = self
                .dls
                .iter()
                .filter(|d| d.layer == l && !d.finished && d.sched.is_some())
                .collect();
            let n = ds.len().max(1) as u64;
            let held: u64 = ds.iter().map(|d| d.held.held()).sum();
            let known: u64 = ds
                .iter()
                .map(|d| d.hash_known.iter().filter(|k| **k).count() as u64)
                .sum();
            let out: usize = ds
                .iter()
                .filter_map(|d| d.sched.as_ref())
                .map(Scheduler::in_flight)
                .sum();
            layers.push(format!(
                "layer {l}: {} following, held {}, hashes {}, requests out {out}",
                ds.len(),
                held / n,
                known / n
            ));
        }
        let (mut idle, mut could, mut free) = (0, 0, 0);
        for d in self.dls.iter().filter(|d| !d.finished) {
            if d.sched.as_ref().is_none_or(|s| s.in_flight() != 0) {
                continue;
            }
            idle += 1;
            let holders: Vec<usize> = d
                .seen
                .iter()
                .map(|&id| id as usize)
                .filter(|&id| {
                    self.nodes[id].dl_of.get(&d.layer).is_some_and(|&sd| {
                        let h = &self.dls[sd].held;
                        (0..d.pieces)
                            .any(|i| h.get(i) && !d.held.get(i) && d.hash_known[i as usize])
                    })
                })
                .collect();
            if !holders.is_empty() {
                could += 1;
                free += usize::from(
                    holders
                        .iter()
                        .any(|&id| self.nodes[id].uploads < self.p.max_uploads),
                );
            }
        }
        format!(
            "    {}\n    idle: {idle} downloads with no request out; {could} of them know a peer holding a piece they lack, {free} one with an upload slot free\n    {links}",
            layers.join("; ")
        )
    }

    /// How full the nodes' links were since the last census, and the upload
    /// slots taken now: slots full while links are not means transfers held
    /// back at the other end (a receiver with many requests out).
    fn link_use(&mut self) -> String {
        let now = secs(self.now);
        let sent: Vec<(f64, f64)> = self
            .nodes
            .iter()
            .map(|n| (self.net.sent(n.up, now), self.net.sent(n.down, now)))
            .collect();
        let (since, prev) = std::mem::replace(&mut self.census_prev, (self.now, sent.clone()));
        // Bytes each node's uplink and downlink moved since then.
        let moved: Vec<(f64, f64)> = sent
            .iter()
            .enumerate()
            .map(|(i, &(up, down))| {
                let (up0, down0) = prev.get(i).copied().unwrap_or_default();
                (up - up0, down - down0)
            })
            .collect();
        let capacity =
            f64::from(self.p.node_mbit) * 1e6 / 8.0 * secs(self.now.saturating_sub(since));
        let percent = |bytes: f64, nodes: usize| {
            if nodes == 0 || capacity <= 0.0 {
                0.0
            } else {
                bytes / (capacity * nodes as f64) * 100.0
            }
        };
        let all = self.nodes.len();
        let leaders: BTreeSet<usize> = self
            .dls
            .iter()
            .filter(|d| d.seeding && !d.finished)
            .map(|d| d.node)
            .collect();
        let slots: usize = self.nodes.iter().map(|n| n.uploads).sum();
        let leading = if leaders.is_empty() {
            String::new()
        } else {
            let up: f64 = leaders.iter().map(|&l| moved[l].0).sum();
            format!(" (leaders' {:.0} %)", percent(up, leaders.len()))
        };
        let (up, down) = moved
            .iter()
            .fold((0.0, 0.0), |(u, d), &(mu, md)| (u + mu, d + md));
        format!(
            "links since the last census: uplinks {:.0} % used{leading}, downlinks {:.0} %; upload slots taken {slots} of {}",
            percent(up, all),
            percent(down, all),
            all * self.p.max_uploads,
        )
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(node) => {
                let n = self.p.concurrent_layers.max(1).min(self.layer_sizes.len());
                for _ in 0..n {
                    self.start_layer(node);
                }
            }
            Ev::JoinAt(dl) => {
                let (node, layer, size) = {
                    let d = &self.dls[dl];
                    (d.node, d.layer, d.size)
                };
                let join = Some((size, self.piece_size(size)));
                let found = self.find(node, layer, join).unwrap_or_else(|_| {
                    self.stats.tracker_refusals += 1;
                    None
                });
                let at = self.now + self.half();
                self.push(at, Ev::JoinAnswer(dl, found.map(Box::new)));
            }
            Ev::JoinAnswer(dl, found) => match found.filter(|f| !f.peers.is_empty()) {
                None => {
                    // Nobody else: this node leads, one GET from the origin.
                    let d = &mut self.dls[dl];
                    d.seeding = true;
                    d.sent = vec![false; d.pieces as usize];
                    let at = self.now + self.half();
                    self.push(at, Ev::StreamStart(dl));
                }
                Some(f) => self.follow(dl, *f),
            },
            Ev::StreamStart(dl) => self.stream_piece(dl, 0),
            Ev::StreamArrive(dl, piece) => {
                self.stats.streamed_pieces += 1;
                self.keep(dl, piece);
                let d = &mut self.dls[dl];
                while d.read_pos < d.pieces && d.held.get(d.read_pos) {
                    d.read_pos += 1;
                }
                if d.read_pos == d.pieces {
                    self.dl_finished(dl);
                }
            }
            Ev::FlowDone(flow, version) => {
                if !self.net.is_current(flow, version) {
                    return;
                }
                self.net.remove(flow, secs(self.now));
                self.apply_net();
                let Some(u) = self.flow_use[flow].take() else {
                    return;
                };
                match u {
                    FlowUse::Stream(dl, piece) => {
                        let at = self.now + self.half();
                        self.push(at, Ev::StreamArrive(dl, piece));
                        if piece + 1 < self.dls[dl].pieces {
                            self.stream_piece(dl, piece + 1);
                        }
                    }
                    FlowUse::Req(r) => {
                        let (cancelled, from, dl) = {
                            let q = self.req_mut(r);
                            q.phase = Phase::Back;
                            (q.cancelled, q.from, q.dl)
                        };
                        if !cancelled {
                            if let Source::Peer(server) = from {
                                self.nodes[server.0 as usize].served += 1;
                            }
                            self.req_mut(r).refs += 1;
                            let at = self.now + self.half();
                            self.push(at, Ev::Deliver(r));
                        }
                        if let Source::Peer(server) = from {
                            let client = self.dls[dl].node;
                            let at = self.now + ns(self.p.latency);
                            self.push(
                                at,
                                Ev::Release {
                                    server: server.0 as usize,
                                    client,
                                },
                            );
                        }
                        self.unref(r);
                    }
                }
            }
            Ev::ReqArrive(r) => self.req_arrive(r),
            Ev::Have(dl, peer, piece) => self.on_have(dl, peer, piece),
            Ev::BusyReply(r) => {
                let (cancelled, dl, piece, from) = {
                    let q = self.req_mut(r);
                    (q.cancelled, q.dl, q.piece, q.from)
                };
                self.unref(r);
                if cancelled {
                    return;
                }
                self.dls[dl].open.remove(&(piece, from));
                let Source::Peer(peer) = from else { return };
                let now = self.at(self.now);
                let actions = self.sched_call(dl, |s| s.on_busy(piece, peer, now));
                self.after(dl, actions, None);
            }
            Ev::Deliver(r) => {
                let (cancelled, dl, piece, from) = {
                    let q = self.req_mut(r);
                    (q.cancelled, q.dl, q.piece, q.from)
                };
                self.unref(r);
                if cancelled || self.dls[dl].finished {
                    return;
                }
                self.dls[dl].open.remove(&(piece, from));
                if from == Source::Origin {
                    self.dls[dl].hash_known[piece as usize] = true;
                }
                let now = self.at(self.now);
                let len = self.piece_len(dl, piece);
                let actions = self.sched_call(dl, |s| s.on_piece(piece, from, len, now, true));
                self.after(dl, actions, Some(piece));
            }
            Ev::ResetArrive(r) => {
                if let Phase::Serving(flow) = self.req_mut(r).phase {
                    self.net.remove(flow, secs(self.now));
                    self.apply_net();
                    self.flow_use[flow] = None;
                    let (from, dl) = {
                        let q = self.req_mut(r);
                        q.phase = Phase::Back;
                        (q.from, q.dl)
                    };
                    if let Source::Peer(server) = from {
                        let client = self.dls[dl].node;
                        self.release(server.0 as usize, client);
                    }
                    // The flow's reference.
                    self.unref(r);
                }
                self.unref(r);
            }
            Ev::Release { server, client } => self.release(server, client),
            Ev::Wake(dl, version) => {
                let d = &self.dls[dl];
                if d.finished || d.wake != version {
                    return;
                }
                let now = self.at(self.now);
                let actions = self.sched_call(dl, |s| s.poll(now));
                self.after(dl, actions, None);
            }
            Ev::RefreshSend(dl) => {
                if !self.dls[dl].finished {
                    let at = self.now + self.half();
                    self.push(at, Ev::FindAt(dl));
                }
            }
            Ev::FindAt(dl) => {
                let (node, layer) = (self.dls[dl].node, self.dls[dl].layer);
                let found = self.find(node, layer, None);
                let at = self.now + self.half();
                self.push(at, Ev::News(dl, found.ok().flatten().map(Box::new)));
            }
            Ev::News(dl, found) => {
                if self.dls[dl].finished {
                    return;
                }
                // As often as the tracker's pace allows.
                let wait = found.as_ref().map_or(self.p.refresh_every, |f| {
                    f.refresh_after.max(self.p.refresh_every)
                });
                if let Some(f) = found.filter(|f| !f.peers.is_empty()) {
                    self.on_news(dl, *f);
                }
                if !self.dls[dl].finished {
                    let at = self.now + ns(wait);
                    self.push(at, Ev::RefreshSend(dl));
                }
            }
            Ev::AnnounceAt(dl, held, last) => {
                let (node, layer, size) = {
                    let d = &self.dls[dl];
                    (d.node, d.layer, d.size)
                };
                let (bitmap, hashes) = *held;
                let a = Announce {
                    digest: self.digests[layer],
                    size,
                    piece_size: self.piece_size(size),
                    hashes,
                    bitmap,
                };
                let t = Instant::now();
                let r = self.tracker.announce(
                    &self.callers[node],
                    &self.ids[node],
                    a,
                    self.at(self.now),
                );
                self.stats.tracker_wall += t.elapsed();
                if r.is_err() {
                    self.stats.tracker_refusals += 1;
                }
                self.count_rpc(ANNOUNCE);
                let at = self.now + self.half();
                self.push(at, Ev::AnnounceDone(dl, last));
            }
            Ev::AnnounceDone(dl, last) => {
                let d = &mut self.dls[dl];
                if last {
                    d.ann.over = true;
                } else if d.ann.finishing {
                    // The flush went out: now the complete blob.
                    self.send_announce(dl, true);
                } else {
                    let pace = self.tracker.pace(&self.digests[d.layer]);
                    let at = self.now + ns(pace.max(self.p.announce_every));
                    self.push(at, Ev::AnnounceIdle(dl));
                }
            }
            Ev::AnnounceIdle(dl) => {
                let d = &mut self.dls[dl];
                d.ann.busy = false;
                if d.ann.finishing {
                    self.finish_announcing(dl);
                } else if d.held.held() != d.ann.told {
                    self.send_announce(dl, false);
                }
            }
            Ev::Heartbeat(node) => {
                let t = Instant::now();
                let uploads = self.nodes[node].uploads as u32;
                let _ = self.tracker.heartbeat(
                    &self.callers[node],
                    &self.ids[node],
                    uploads,
                    self.at(self.now),
                );
                self.stats.tracker_wall += t.elapsed();
                self.count_rpc(HEARTBEAT);
                let at = self.now + ns(self.p.heartbeat);
                self.push(at, Ev::Heartbeat(node));
            }
        }
    }

    fn piece_len(&self, dl: DlId, piece: u64) -> u64 {
        let d = &self.dls[dl];
        let ps = self.piece_size(d.size);
        d.size.saturating_sub(piece * ps).min(ps)
    }

    /// A layer's piece size, as the agent's store cuts it.
    fn piece_size(&self, size: u64) -> u64 {
        piece_size_for(size, self.p.piece_size)
    }

    fn start_layer(&mut self, node: usize) {
        let layer = self.nodes[node].next_layer;
        if layer >= self.layer_sizes.len() {
            return;
        }
        self.nodes[node].next_layer += 1;
        let size = self.layer_sizes[layer];
        let pieces = size.div_ceil(self.piece_size(size));
        let dl = self.dls.len();
        self.nodes[node].dl_of.insert(layer, dl);
        self.dls.push(Dl {
            node,
            layer,
            pieces,
            size,
            sched: None,
            held: Bitmap::new(pieces),
            hash_known: vec![false; pieces as usize],
            seen: BTreeSet::new(),
            open: HashMap::new(),
            read_pos: 0,
            done: false,
            finished: false,
            wake: 0,
            ann: Announcing::default(),
            seeding: false,
            sent: Vec::new(),
            held_unsent: 0,
        });
        let at = self.now + self.half();
        self.push(at, Ev::JoinAt(dl));
    }

    /// Streams piece `piece` of a leader's GET: its bytes follow the last
    /// piece's at once.
    fn stream_piece(&mut self, dl: DlId, piece: u64) {
        let len = self.piece_len(dl, piece) as f64;
        let down = self.nodes[self.dls[dl].node].down;
        let flow = self.net.start(self.origin, down, len, secs(self.now));
        self.set_use(flow, FlowUse::Stream(dl, piece));
        self.apply_net();
    }

    fn set_use(&mut self, flow: FlowId, u: FlowUse) {
        if self.flow_use.len() <= flow {
            self.flow_use.resize(flow + 1, None);
        }
        self.flow_use[flow] = Some(u);
    }

    /// Queues the finish events of flows whose rate changed.
    fn apply_net(&mut self) {
        for f in self.net.take_changed() {
            if f.at.is_finite() {
                let at = (f.at * 1e9).ceil() as Time;
                self.push(at.max(self.now), Ev::FlowDone(f.flow, f.version));
            }
        }
    }

    /// The join named peers: run the swarm driver (`Run::start`).
    fn follow(&mut self, dl: DlId, found: Found) {
        let (size, pieces) = (self.dls[dl].size, self.dls[dl].pieces);
        let mut sched = Scheduler::new(
            size,
            self.piece_size(size),
            Bitmap::new(pieces).as_bytes(),
            self.p.config.clone(),
        )
        .expect("positive piece size");
        let d = &mut self.dls[dl];
        for c in &found.peers {
            if let Some(id) = node_of(&c.id) {
                d.seen.insert(id as u32);
                let _ = sched.add_peer(PeerId(id as u32), &c.bitmap);
            }
        }
        for i in 0..pieces as usize {
            let known = found.hashes.get(i).is_some_and(Option::is_some);
            d.hash_known[i] = known;
            sched.set_hash_known(i as u64, known);
        }
        d.sched = Some(sched);
        let now = self.at(self.now);
        let actions = self.sched_call(dl, |s| s.poll(now));
        self.after(dl, actions, None);
        let at = self.now + ns(self.p.refresh_every);
        self.push(at, Ev::RefreshSend(dl));
    }

    /// One find (and join, with the blob's geometry) at the tracker, timed
    /// and counted; `Err`: refused.
    fn find(
        &mut self,
        node: usize,
        layer: usize,
        join: Option<(u64, u64)>,
    ) -> Result<Option<Found>, ()> {
        let t = Instant::now();
        let found = self.tracker.find_and_join(
            &self.callers[node],
            &self.digests[layer],
            &self.ids[node],
            "",
            self.p.max_peers,
            join,
            self.at(self.now),
        );
        self.stats.tracker_wall += t.elapsed();
        self.count_rpc(FIND);
        found.map_err(drop)
    }

    fn sched_call(
        &mut self,
        dl: DlId,
        f: impl FnOnce(&mut Scheduler) -> Vec<Action>,
    ) -> Vec<Action> {
        let t = Instant::now();
        let s = self.dls[dl]
            .sched
            .as_mut()
            .expect("followers have a scheduler");
        let out = f(s);
        self.stats.scheduler_wall += t.elapsed();
        self.stats.scheduler_calls += 1;
        out
    }

    /// `Run::on_news`: listed peers' bitmaps, unlisted ones removed, new
    /// hashes, then a poll.
    fn on_news(&mut self, dl: DlId, found: Found) {
        let now = self.at(self.now);
        let t = Instant::now();
        let d = &mut self.dls[dl];
        let s = d.sched.as_mut().expect("followers have a scheduler");
        // Hashes first, as the agent does: a peer's unlisting polls.
        take_hashes(&mut d.hash_known, s, &found);
        let full = found.peers.len() >= DEFAULT_MAX_PEERS;
        let mut listed = BTreeSet::new();
        for c in &found.peers {
            if let Some(id) = node_of(&c.id) {
                let id = id as u32;
                d.seen.insert(id);
                listed.insert(id);
                let _ = s.update_peer(PeerId(id), &c.bitmap);
            }
        }
        let mut actions = Vec::new();
        let live: BTreeSet<u32> = s.live_peers().map(|p| p.0).collect();
        for &id in d.seen.iter().filter(|_| !full) {
            if !listed.contains(&id) && live.contains(&id) {
                self.stats.unlisted += 1;
                actions.extend(s.remove_peer(PeerId(id), now));
            }
        }
        actions.extend(s.poll(now));
        self.stats.scheduler_wall += t.elapsed();
        self.stats.scheduler_calls += 1;
        self.after(dl, actions, None);
    }

    /// One turn of the driver's loop after an event: act, deliver, and wait
    /// for the next deadline. `arrived`: the piece whose bytes just came.
    fn after(&mut self, dl: DlId, actions: Vec<Action>, arrived: Option<u64>) {
        for a in actions {
            match a {
                Action::Request { piece, from } => self.request(dl, piece, from),
                Action::Cancel { piece, from } => self.cancel(dl, piece, from),
                Action::Completed(piece) => {
                    if arrived == Some(piece) {
                        self.keep(dl, piece);
                    }
                }
                Action::Done => self.dls[dl].done = true,
                Action::Banned(_) | Action::Dropped(_) => {}
            }
        }
        let d = &mut self.dls[dl];
        let before = d.read_pos;
        while d.read_pos < d.pieces && d.held.get(d.read_pos) {
            d.read_pos += 1;
        }
        if d.read_pos != before {
            let pos = d.read_pos;
            d.sched
                .as_mut()
                .expect("followers have a scheduler")
                .set_read_position(pos);
        }
        if d.done && d.read_pos == d.pieces {
            self.dl_finished(dl);
            return;
        }
        let deadline = d
            .sched
            .as_ref()
            .expect("followers have a scheduler")
            .next_deadline()
            .map(|t| ns(t.saturating_duration_since(self.t0)));
        let mut at = deadline.unwrap_or(self.now + 1_000_000_000);
        if at <= self.now {
            // The driver would poll again at once; a tenth of a millisecond
            // stands for that.
            self.stats.spins += 1;
            at = self.now + 100_000;
        }
        d.wake += 1;
        let v = d.wake;
        self.push(at, Ev::Wake(dl, v));
    }

    /// A piece is kept: written, told to the peers that asked (haves),
    /// announced (progress), counted.
    fn keep(&mut self, dl: DlId, piece: u64) {
        let (node, layer) = (self.dls[dl].node, self.dls[dl].layer);
        let at = self.now + self.half();
        let askers = self.nodes[node].askers.get(&layer).cloned();
        for w in askers.into_iter().flatten() {
            if !self.dls[w].finished {
                self.push(at, Ev::Have(w, node as u32, piece));
            }
        }
        let d = &mut self.dls[dl];
        if d.seeding && !d.sent[piece as usize] {
            d.held_unsent += 1;
        }
        d.held.set(piece);
        if !d.ann.busy {
            self.send_announce(dl, false);
        }
    }

    fn send_announce(&mut self, dl: DlId, last: bool) {
        let d = &mut self.dls[dl];
        d.ann.busy = true;
        d.ann.told = d.held.held();
        let hashes = (0..d.pieces)
            .map(|i| d.held.get(i).then(|| piece_hash(d.layer, i)))
            .collect();
        let held = Box::new((d.held.as_bytes().to_vec(), hashes));
        let at = self.now + self.half();
        self.push(at, Ev::AnnounceAt(dl, held, last));
    }

    /// `Progress::finish`: after the sleep under way, the last partial state
    /// if it changed, then the complete blob.
    fn finish_announcing(&mut self, dl: DlId) {
        let d = &mut self.dls[dl];
        if d.ann.busy || d.ann.over {
            return;
        }
        if d.held.held() != d.ann.told {
            self.send_announce(dl, false);
        } else {
            self.send_announce(dl, true);
        }
    }

    fn dl_finished(&mut self, dl: DlId) {
        let d = &mut self.dls[dl];
        if d.finished {
            return;
        }
        d.finished = true;
        d.seeding = false;
        d.ann.finishing = true;
        d.sched = None;
        let node = d.node;
        let open: Vec<ReqId> = d.open.drain().map(|(_, r)| r).collect();
        for r in open {
            self.cancel_req(r);
        }
        self.finish_announcing(dl);
        let n = &mut self.nodes[node];
        n.layers_done += 1;
        if n.layers_done == self.layer_sizes.len() {
            n.done_at = Some(self.now);
            self.nodes_done += 1;
        } else {
            self.start_layer(node);
        }
    }

    fn new_req(&mut self, q: Req) -> ReqId {
        match self.free_reqs.pop() {
            Some(id) => {
                self.reqs[id] = Some(q);
                id
            }
            None => {
                self.reqs.push(Some(q));
                self.reqs.len() - 1
            }
        }
    }

    fn req_mut(&mut self, r: ReqId) -> &mut Req {
        self.reqs[r].as_mut().expect("referenced requests live")
    }

    fn unref(&mut self, r: ReqId) {
        let q = self.req_mut(r);
        q.refs -= 1;
        if q.refs == 0 {
            self.reqs[r] = None;
            self.free_reqs.push(r);
        }
    }

    fn request(&mut self, dl: DlId, piece: u64, from: Source) {
        match from {
            Source::Origin => self.stats.origin_requests += 1,
            Source::Peer(_) => self.stats.peer_requests += 1,
        }
        let r = self.new_req(Req {
            dl,
            piece,
            from,
            phase: Phase::ToServer,
            cancelled: false,
            refs: 1,
        });
        self.dls[dl].open.insert((piece, from), r);
        let at = self.now + self.half();
        self.push(at, Ev::ReqArrive(r));
    }

    fn cancel(&mut self, dl: DlId, piece: u64, from: Source) {
        if let Some(r) = self.dls[dl].open.remove(&(piece, from)) {
            self.cancel_req(r);
        }
    }

    /// The driver aborts the request: its stream is reset, which reaches the
    /// server half a round trip later.
    fn cancel_req(&mut self, r: ReqId) {
        self.stats.cancels += 1;
        let q = self.req_mut(r);
        q.cancelled = true;
        if matches!(q.phase, Phase::Serving(_)) {
            q.refs += 1;
            let at = self.now + self.half();
            self.push(at, Ev::ResetArrive(r));
        }
    }

    fn req_arrive(&mut self, r: ReqId) {
        let (cancelled, dl, piece, from) = {
            let q = self.req_mut(r);
            (q.cancelled, q.dl, q.piece, q.from)
        };
        if cancelled {
            // Its reset follows on the same path: nothing is served.
            self.unref(r);
            return;
        }
        let client = self.dls[dl].node;
        let (up, down) = match from {
            Source::Origin => (self.origin, self.nodes[client].down),
            Source::Peer(server) => {
                let server = server.0 as usize;
                let layer = self.dls[dl].layer;
                let fetching = self.nodes[server].dl_of.get(&layer).copied();
                // Busy or not, it trades this layer: tell it of our pieces.
                if fetching.is_some_and(|sd| !self.dls[sd].finished) {
                    let askers = self.nodes[server].askers.entry(layer).or_default();
                    if askers.len() < MAX_ASKERS && !askers.contains(&dl) {
                        askers.push(dl);
                    }
                }
                let p = &self.p;
                let n = &self.nodes[server];
                let mine = n.serving.get(&client).copied().unwrap_or(0);
                let full_peers = mine == 0 && n.serving.len() >= p.max_upload_peers;
                // `may_send` counts a yes as sent: ask it only if nothing else refuses.
                let cause = if full_peers {
                    Some(Busy::Peers)
                } else if mine >= p.max_uploads_per_peer {
                    Some(Busy::PerPeer)
                } else if n.uploads >= p.max_uploads
                    || p.fed_limit
                        .is_some_and(|k| self.net.flows_on(self.nodes[client].down) >= k)
                {
                    Some(Busy::Uploads)
                } else if !fetching.is_none_or(|sd| self.may_send(sd, piece)) {
                    Some(Busy::Seeding)
                } else {
                    None
                };
                if let Some(cause) = cause {
                    let s = &mut self.stats;
                    *match cause {
                        Busy::Peers => &mut s.busy_peers,
                        Busy::PerPeer => &mut s.busy_per_peer,
                        Busy::Uploads => &mut s.busy_uploads,
                        Busy::Seeding => &mut s.busy_seeding,
                    } += 1;
                    self.stats.busy += 1;
                    self.req_mut(r).phase = Phase::Back;
                    let at = self.now + self.half();
                    self.push(at, Ev::BusyReply(r));
                    return;
                }
                let n = &mut self.nodes[server];
                n.uploads += 1;
                *n.serving.entry(client).or_default() += 1;
                (n.up, self.nodes[client].down)
            }
        };
        let len = self.piece_len(dl, piece) as f64;
        let flow = self.net.start(up, down, len, secs(self.now));
        self.set_use(flow, FlowUse::Req(r));
        // The request's own reference now belongs to the flow.
        self.req_mut(r).phase = Phase::Serving(flow);
        self.apply_net();
    }

    /// `Haves::may_send`, then `sending`: a leader sends every piece it holds once before
    /// any twice; a yes counts the piece as sent.
    fn may_send(&mut self, server_dl: DlId, piece: u64) -> bool {
        let d = &mut self.dls[server_dl];
        if !d.seeding {
            return true;
        }
        let sent = &mut d.sent[piece as usize];
        if *sent {
            return d.held_unsent == 0;
        }
        *sent = true;
        d.held_unsent -= 1;
        true
    }

    /// `Run::on_have`: from a peer the tracker named, for a piece whose hash
    /// is known; a poll only if the scheduler could ask for it now.
    fn on_have(&mut self, dl: DlId, peer: u32, piece: u64) {
        let d = &mut self.dls[dl];
        let known = d.hash_known.get(piece as usize) == Some(&true);
        let Some(s) = d.sched.as_mut().filter(|_| !d.finished) else {
            return;
        };
        if !known || !d.seen.contains(&peer) {
            return;
        }
        let t = Instant::now();
        s.peer_has(PeerId(peer), piece);
        let ask = s.could_ask(PeerId(peer), piece);
        self.stats.scheduler_wall += t.elapsed();
        if ask {
            let now = self.at(self.now);
            let actions = self.sched_call(dl, |s| s.poll(now));
            self.after(dl, actions, None);
        }
    }

    fn release(&mut self, server: usize, client: usize) {
        let n = &mut self.nodes[server];
        n.uploads -= 1;
        if let Some(c) = n.serving.get_mut(&client) {
            *c -= 1;
            if *c == 0 {
                n.serving.remove(&client);
            }
        }
    }

    fn outcome(&self) -> Outcome {
        let mut served: Vec<u64> = self.nodes.iter().map(|n| n.served).collect();
        served.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = served.iter().sum();
        let mut stats = self.stats.clone();
        stats.uploaders = served.iter().filter(|&&s| s > 0).count();
        stats.top32_share = served.iter().take(32).sum::<u64>() as f64 / total.max(1) as f64;
        let pull_s = self
            .nodes
            .iter()
            .map(|n| n.done_at.map_or(f64::INFINITY, |d| secs(d - n.started)))
            .collect();
        let now = secs(self.now);
        let received = self.nodes.iter().map(|n| self.net.sent(n.down, now)).sum();
        Outcome {
            pull_s,
            origin_bytes: self.net.sent(self.origin, now),
            received_bytes: received,
            image_bytes: self.p.image_bytes,
            t_star_s: rollout::t_star(
                self.p.image_bytes,
                self.p.origin_mbit,
                self.p.node_mbit,
                self.p.nodes,
            ),
            rpcs: self.rpcs.clone(),
            stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(nodes: usize, image: u64, layers: u64) -> Params {
        Params {
            nodes,
            image_bytes: image,
            layers,
            piece_size: 4 << 20,
            node_mbit: 250,
            origin_mbit: 50,
            latency: Duration::from_millis(1),
            seed: 7,
            jitter: Duration::from_millis(50),
            concurrent_layers: 3,
            refresh_every: Duration::from_millis(250),
            announce_every: Duration::from_millis(200),
            heartbeat: Duration::from_secs(5),
            max_uploads: 4,
            max_uploads_per_peer: 2,
            max_upload_peers: 16,
            config: Config::production(),
            max_peers: 0,
            max_holders: Limits::default().max_peers_per_digest,
            fed_limit: None,
            progress: false,
            census: false,
        }
    }

    #[test]
    fn one_node_takes_the_origins_time_plus_two_round_trips() {
        let mut p = params(1, 24 << 20, 1);
        p.latency = Duration::from_millis(100);
        p.jitter = Duration::ZERO;
        let o = run(&p).unwrap();
        // Join (one round trip), the GET (half), the last byte back (half).
        let expect = 0.2 + (24 << 20) as f64 * 8.0 / 50e6;
        assert!(
            (o.pull_s[0] - expect).abs() < 1e-3,
            "{} vs {expect}",
            o.pull_s[0]
        );
        assert!((o.origin_bytes - (24 << 20) as f64).abs() < 1.0);
    }

    #[test]
    fn the_census_counts_the_followers_under_way_and_none_after() {
        let mut sim = Sim::new(params(8, 48 << 20, 1));
        sim.run(2_000_000_000);
        let mid = sim.census();
        assert!(mid.contains("layer 0: 7 following"), "{mid}");
        sim.run(Time::MAX);
        let end = sim.census();
        assert!(end.contains("layer 0: 0 following"), "{end}");
        assert!(end.contains("idle: 0 downloads"), "{end}");
        assert!(
            mid.contains("links since the last census: uplinks") && mid.contains("(leaders' "),
            "{mid}"
        );
        // No holder serves more than its 4 at once.
        let taken: usize = mid
            .split("upload slots taken ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{mid}"));
        assert!((1..=32).contains(&taken), "{mid}");
    }

    #[test]
    fn a_fed_limit_turns_away_askers_that_receive_enough() {
        let base = params(4, 48 << 20, 1);
        let plain = run(&base).unwrap();
        // One transfer at a time per node: asking while one arrives is
        // refused, so more answers are busy, and still every node finishes
        // from one origin copy.
        let mut one = base.clone();
        one.fed_limit = Some(1);
        let fed = run(&one).unwrap();
        assert!(
            fed.stats.busy > plain.stats.busy,
            "{} vs {}",
            fed.stats.busy,
            plain.stats.busy
        );
        assert!(fed.pull_s.iter().all(|t| t.is_finite()), "{:?}", fed.pull_s);
        assert!(fed.origin_bytes < fed.image_bytes as f64 * 1.05);
        // Every holder refusing everyone holds no follower up for longer
        // than its patience: it takes its pieces from the origin.
        let mut none = base.clone();
        none.fed_limit = Some(0);
        let refused = run(&none).unwrap();
        assert_eq!(refused.stats.busy, refused.stats.peer_requests);
        assert!(
            refused.pull_s.iter().all(|t| t.is_finite()),
            "{:?}",
            refused.pull_s
        );
        assert!(refused.origin_bytes > fed.origin_bytes * 2.0);
    }

    #[test]
    fn eight_nodes_all_finish_from_one_origin_copy_and_the_run_repeats() {
        let p = params(8, 48 << 20, 4);
        let o = run(&p).unwrap();
        assert!(o.pull_s.iter().all(|t| t.is_finite()), "{:?}", o.pull_s);
        let mut sorted = o.pull_s.clone();
        sorted.sort_by(f64::total_cmp);
        let (p50, p99, max) = (
            crate::report::percentile(&sorted, 0.5),
            crate::report::percentile(&sorted, 0.99),
            sorted[7],
        );
        assert!(p50 <= p99 && p99 <= max);
        let ratio = o.origin_bytes / o.image_bytes as f64;
        assert!(ratio >= 0.999, "origin sent less than the image: {ratio}");
        // No node beats the bound, and the swarm spares the origin.
        assert!(
            sorted[0] >= o.t_star_s * 0.999,
            "{} < T* {}",
            sorted[0],
            o.t_star_s
        );
        assert!(ratio < 2.0, "origin {ratio} x the image");
        assert!(o.rpcs_peak() > 0);
        let again = run(&p).unwrap();
        assert_eq!(again.pull_s, o.pull_s, "same seed, same run");
        let mut other = p.clone();
        other.seed = 8;
        assert_ne!(run(&other).unwrap().pull_s, o.pull_s, "the seed matters");
    }
}
