//! The simulated network: links of fixed capacity (each node's uplink and
//! downlink, the origin's uplink) and flows (one piece, or one stretch of a
//! stream, from one uplink to one downlink) sharing them.
//!
//! Sharing is max-min fair within the links a change touches: when a flow
//! starts or ends on links `A` and `B`, the set is `A`, `B` and the other
//! links of their flows; every flow on a link of the set gets its max-min
//! fair rate by progressive filling over the set, capped by what it was left
//! on its link outside the set. A link outside keeps its flows' rates as
//! they were, so no link ever carries more than its capacity, but capacity a
//! flow frees on a third-hop link is only handed out when that link is next
//! in a set: the model errs slow there, never fast. Work per change is
//! bounded by the flows on those links, not the network.

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
    /// Scratch: a marked link's place in the set.
    place: Vec<usize>,
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
        self.place.push(0);
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
                self.place[l] = set.len();
                set.push(l);
            }
        }
        for l in [a, b] {
            for &f in &self.links[l].flows {
                let f = self.flows[f].as_ref().expect("listed flows live");
                let other = if f.up == l { f.down } else { f.up };
                if self.mark[other] != epoch {
                    self.mark[other] = epoch;
                    self.place[other] = set.len();
                    set.push(other);
                }
            }
        }
        let in_set = |l: LinkId, mark: &[u64]| mark[l] == epoch;
        // Every flow on a link of the set, once, with its cap from the link
        // outside the set (its share there, unchanged).
        let mut flows: Vec<FlowId> = Vec::new();
        for &l in &set {
            for &id in &self.links[l].flows {
                let f = self.flows[id].as_ref().expect("listed flows live");
                // Listed under its uplink if that is in the set, else its downlink.
                let home = if in_set(f.up, &self.mark) {
                    f.up
                } else {
                    f.down
                };
                if home == l {
                    flows.push(id);
                }
            }
        }
        let caps: Vec<f64> = flows
            .iter()
            .map(|&id| {
                let f = self.flows[id].as_ref().expect("listed flows live");
                let mut cap = f64::INFINITY;
                if !in_set(f.up, &self.mark) {
                    cap = cap.min(f.share_up);
                }
                if !in_set(f.down, &self.mark) {
                    cap = cap.min(f.share_down);
                }
                cap
            })
            .collect();
        // Progressive filling over the set: raise every unfrozen flow alike
        // until a link of the set is full or a flow reaches its cap.
        let (mark, place) = (&self.mark, &self.place);
        let pos = |l: LinkId| (mark[l] == epoch).then(|| place[l]);
        let ends: Vec<[Option<usize>; 2]> = flows
            .iter()
            .map(|&id| {
                let f = self.flows[id].as_ref().expect("listed flows live");
                [pos(f.up), pos(f.down)]
            })
            .collect();
        let mut left: Vec<f64> = set.iter().map(|&l| self.links[l].capacity).collect();
        let mut active: Vec<usize> = vec![0; set.len()];
        for e in &ends {
            for i in e.iter().flatten() {
                active[*i] += 1;
            }
        }
        let mut rates = vec![0.0; flows.len()];
        let mut frozen = vec![false; flows.len()];
        let mut unfrozen = flows.len();
        while unfrozen > 0 {
            let mut inc = f64::INFINITY;
            for (i, &n) in active.iter().enumerate() {
                if n > 0 {
                    inc = inc.min(left[i] / n as f64);
                }
            }
            for k in 0..flows.len() {
                if !frozen[k] {
                    inc = inc.min(caps[k] - rates[k]);
                }
            }
            let inc = inc.max(0.0);
            for k in 0..flows.len() {
                if !frozen[k] {
                    rates[k] += inc;
                    for i in ends[k].iter().flatten() {
                        left[*i] -= inc;
                    }
                }
            }
            let full: Vec<bool> = set
                .iter()
                .enumerate()
                .map(|(i, &l)| left[i] <= self.links[l].capacity * 1e-12)
                .collect();
            for k in 0..flows.len() {
                if frozen[k] {
                    continue;
                }
                let capped = caps[k].is_finite() && caps[k] - rates[k] <= caps[k] * 1e-12;
                if capped || ends[k].iter().flatten().any(|&i| full[i]) {
                    frozen[k] = true;
                    unfrozen -= 1;
                    for i in ends[k].iter().flatten() {
                        active[*i] -= 1;
                    }
                }
            }
        }
        for (k, &id) in flows.iter().enumerate() {
            let (up_in, down_in) = (ends[k][0].is_some(), ends[k][1].is_some());
            let f = self.flows[id].as_mut().expect("listed flows live");
            let rate = rates[k];
            // A link of the set leaves the flow what it takes now: later
            // changes elsewhere may not raise it past that on this link.
            if up_in {
                f.share_up = rate;
            }
            if down_in {
                f.share_down = rate;
            }
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

/// Brings `f.remaining` to `now` at its current rate, counting the bytes on
/// its links.
fn settle(f: &mut Flow, now: f64, links: &mut [Link]) {
    let moved = (f.rate * (now - f.since)).clamp(0.0, f.remaining);
    f.remaining -= moved;
    f.since = now;
    links[f.up].sent += moved;
    links[f.down].sent += moved;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish_of(changes: &[Finish], flow: FlowId) -> f64 {
        changes
            .iter()
            .rev()
            .find(|f| f.flow == flow)
            .expect("a finish for the flow")
            .at
    }

    #[test]
    fn a_single_flow_runs_at_its_slower_link() {
        let mut net = Net::new();
        let up = net.add_link(100.0);
        let down = net.add_link(40.0);
        let f = net.start(up, down, 400.0, 1.0);
        assert_eq!(net.rate(f), 40.0);
        assert_eq!(finish_of(&net.take_changed(), f), 11.0);
    }

    #[test]
    fn two_flows_sharing_a_link_each_get_half() {
        let mut net = Net::new();
        let up = net.add_link(100.0);
        let (d1, d2) = (net.add_link(1000.0), net.add_link(1000.0));
        let a = net.start(up, d1, 1000.0, 0.0);
        let b = net.start(up, d2, 500.0, 0.0);
        assert_eq!((net.rate(a), net.rate(b)), (50.0, 50.0));
        let changes = net.take_changed();
        assert_eq!(finish_of(&changes, b), 10.0);
        // b ends at 10 s having sent 500; a sent 500 too and now has the link.
        assert!(net.remove(b, 10.0));
        assert_eq!(net.rate(a), 100.0);
        assert_eq!(finish_of(&net.take_changed(), a), 15.0);
        assert_eq!(net.sent(up, 10.0), 1000.0);
    }

    #[test]
    fn a_flow_held_back_elsewhere_leaves_the_rest_to_the_others() {
        let mut net = Net::new();
        let up = net.add_link(100.0);
        let slow = net.add_link(10.0);
        let fast = net.add_link(1000.0);
        let a = net.start(up, slow, 1.0e6, 0.0);
        let b = net.start(up, fast, 1.0e6, 0.0);
        assert_eq!(net.rate(a), 10.0);
        assert_eq!(net.rate(b), 90.0);
    }

    #[test]
    fn no_link_carries_more_than_its_capacity() {
        let mut net = Net::new();
        let links: Vec<LinkId> = (0..6)
            .map(|i| net.add_link(10.0 * (i + 1) as f64))
            .collect();
        let mut flows = Vec::new();
        for (k, (a, b)) in [(0, 1), (0, 2), (3, 1), (4, 1), (0, 5), (3, 5), (2, 4)]
            .into_iter()
            .enumerate()
        {
            flows.push((net.start(links[a], links[b], 1e9, k as f64), a, b));
        }
        for &l in &links {
            let load: f64 = flows
                .iter()
                .filter(|(_, a, b)| links[*a] == l || links[*b] == l)
                .map(|(f, _, _)| net.rate(*f))
                .sum();
            assert!(load <= 10.0 * (l + 1) as f64 + 1e-9, "link {l}: {load}");
        }
    }

    #[test]
    fn a_removed_flows_finish_never_matches_a_reused_index() {
        let mut net = Net::new();
        let (u, d) = (net.add_link(1.0), net.add_link(1.0));
        let a = net.start(u, d, 10.0, 0.0);
        let old = finish_of(&net.take_changed(), a);
        let old_version = net.flows[a].as_ref().unwrap().version;
        net.remove(a, 1.0);
        let b = net.start(u, d, 10.0, 1.0);
        assert_eq!(a, b, "the index is reused");
        assert!(!net.is_current(b, old_version));
        assert!(old < f64::INFINITY);
    }
}
