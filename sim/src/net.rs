//! The simulated network: links of fixed capacity (each node's uplink and
//! downlink, the origin's uplink) and flows (one piece, or one stretch of a
//! stream, from one uplink to one downlink) sharing them.
//!
//! Sharing is an approximation of max-min fairness that only looks two hops
//! away, so a flow starting or ending costs work on the links it touches
//! rather than on the whole network:
//!
//! - seen from link `L`, a flow asks for what it would get on its *other*
//!   link if that were shared equally (`capacity / flows there`);
//! - `L` is shared by water-filling those demands (a flow asking less than an
//!   equal share gets what it asks, the rest is split among the others);
//! - a flow's rate is the lesser of its shares on its two links.
//!
//! Every link thus carries at most its capacity. Compared with exact max-min
//! it can leave some capacity unused when a flow's other link is itself
//! shared with flows that are bottlenecked elsewhere (third hop), so it errs
//! slow, never fast. When a flow starts or ends on links `A` and `B`, the
//! shares are recomputed on `A`, `B` and the other links of their flows (the
//! only demands that changed), and rates for every flow on those links.

/// A link's index.
pub type LinkId = usize;
/// A flow's index; reused after the flow ends.
pub type FlowId = usize;

/// Rates below this (bytes/s) count as stalled: a link with no capacity.
const MIN_RATE: f64 = 1e-9;

#[derive(Debug, Clone)]
struct Link {
    capacity: f64,
    flows: Vec<FlowId>,
    /// Bytes sent over the link so far (settled flows only).
    sent: f64,
}

#[derive(Debug, Clone)]
struct Flow {
    up: LinkId,
    down: LinkId,
    /// Bytes left at `since`.
    remaining: f64,
    rate: f64,
    since: f64,
    share_up: f64,
    share_down: f64,
    /// Bumped whenever the finish time changes, so stale finish events are
    /// told apart.
    version: u64,
}

/// A flow's (new) expected finish, for the event queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub flow: FlowId,
    pub version: u64,
    /// Seconds; infinite while stalled.
    pub at: f64,
}

#[derive(Debug, Default)]
pub struct Net {
    links: Vec<Link>,
    flows: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    /// Scratch: links already in the set being recomputed (epoch marks).
    mark: Vec<u64>,
    epoch: u64,
    changed: Vec<Finish>,
    /// Versions are unique across flows, so a finish event of a flow that
    /// was removed never matches one that reuses its index.
    versions: u64,
}

impl Net {
    pub fn new() -> Self {
        Self::default()
    }

    /// A link of `capacity` bytes per second.
    pub fn add_link(&mut self, capacity: f64) -> LinkId {
        self.links.push(Link {
            capacity,
            flows: Vec::new(),
            sent: 0.0,
        });
        self.mark.push(0);
        self.links.len() - 1
    }

    /// Bytes sent over `link` up to `now` (flows still running included).
    pub fn sent(&self, link: LinkId, now: f64) -> f64 {
        let l = &self.links[link];
        l.sent
            + l.flows
                .iter()
                .filter_map(|&f| self.flows[f].as_ref())
                .map(|f| (f.rate * (now - f.since)).min(f.remaining))
                .sum::<f64>()
    }

    pub fn flows_on(&self, link: LinkId) -> usize {
        self.links[link].flows.len()
    }

    pub fn rate(&self, flow: FlowId) -> f64 {
        self.flows[flow].as_ref().map_or(0.0, |f| f.rate)
    }

    /// Starts `bytes` from `up` to `down` at `now`. The finish times that
    /// changed (this flow's among them) are in [`Self::take_changed`].
    pub fn start(&mut self, up: LinkId, down: LinkId, bytes: f64, now: f64) -> FlowId {
        let flow = Flow {
            up,
            down,
            remaining: bytes.max(0.0),
            rate: 0.0,
            since: now,
            share_up: 0.0,
            share_down: 0.0,
            version: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        self.links[up].flows.push(id);
        self.links[down].flows.push(id);
        self.recompute(up, down, now, Some(id));
        id
    }

    /// Ends `flow` at `now` (done, or aborted with what it sent so far);
    /// whether it was running.
    pub fn remove(&mut self, flow: FlowId, now: f64) -> bool {
        let Some(mut f) = self.flows.get_mut(flow).and_then(Option::take) else {
            return false;
        };
        settle(&mut f, now, &mut self.links);
        for l in [f.up, f.down] {
            let flows = &mut self.links[l].flows;
            if let Some(i) = flows.iter().position(|&x| x == flow) {
                flows.swap_remove(i);
            }
        }
        self.free.push(flow);
        self.recompute(f.up, f.down, now, None);
        true
    }

    /// Whether `version` is still the flow's current finish.
    pub fn is_current(&self, flow: FlowId, version: u64) -> bool {
        self.flows
            .get(flow)
            .and_then(Option::as_ref)
            .is_some_and(|f| f.version == version)
    }

    /// Finish times that changed since the last call.
    pub fn take_changed(&mut self) -> Vec<Finish> {
        std::mem::take(&mut self.changed)
    }

    fn recompute(&mut self, a: LinkId, b: LinkId, now: f64, new: Option<FlowId>) {
        self.epoch += 1;
        let epoch = self.epoch;
        let mut set: Vec<LinkId> = Vec::with_capacity(32);
        for l in [a, b] {
            if self.mark[l] != epoch {
                self.mark[l] = epoch;
                set.push(l);
            }
        }
        for l in [a, b] {
            for &f in &self.links[l].flows {
                let f = self.flows[f].as_ref().expect("listed flows live");
                let other = if f.up == l { f.down } else { f.up };
                if self.mark[other] != epoch {
                    self.mark[other] = epoch;
                    set.push(other);
                }
            }
        }
        for &l in &set {
            self.fill(l);
        }
        for &l in &set {
            for i in 0..self.links[l].flows.len() {
                let id = self.links[l].flows[i];
                let f = self.flows[id].as_mut().expect("listed flows live");
                let rate = f.share_up.min(f.share_down);
                if rate != f.rate || Some(id) == new {
                    settle(f, now, &mut self.links);
                    f.rate = rate;
                    self.versions += 1;
                    f.version = self.versions;
                    let at = if rate > MIN_RATE {
                        now + f.remaining / rate
                    } else {
                        f64::INFINITY
                    };
                    self.changed.push(Finish {
                        flow: id,
                        version: f.version,
                        at,
                    });
                }
            }
        }
    }

    /// Water-fills link `l` with its flows' demands (their equal share on
    /// their other link).
    fn fill(&mut self, l: LinkId) {
        let link = &self.links[l];
        let mut demands: Vec<(f64, FlowId)> = link
            .flows
            .iter()
            .map(|&id| {
                let f = self.flows[id].as_ref().expect("listed flows live");
                let other = if f.up == l { f.down } else { f.up };
                let o = &self.links[other];
                (o.capacity / o.flows.len().max(1) as f64, id)
            })
            .collect();
        demands.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut left = link.capacity;
        let mut n = demands.len();
        for (d, id) in demands {
            let share = d.min(left / n as f64);
            left -= share;
            n -= 1;
            let f = self.flows[id].as_mut().expect("listed flows live");
            if f.up == l {
                f.share_up = share;
            } else {
                f.share_down = share;
            }
        }
    }
}

/// Brings `f.remaining` to `now` at its current rate, counting the bytes on
/// its links.
fn settle(f: &mut Flow, now: f64, links: &mut [Link]) {
    let moved = (f.rate * (now - f.since)).clamp(0.0, f.remaining);
    f.remaining -= moved;
    f.since = now;
    links[f.up].sent += moved;
    links[f.down].sent += moved;
}
