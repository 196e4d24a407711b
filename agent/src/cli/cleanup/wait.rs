//! `damselfly cleanup-wait`: the chart's post-delete hook Job, which holds
//! `helm uninstall` until every node's `damselfly cleanup` says it is done.
//!
//! `--endpoint NAME:PORT` names a headless Service with
//! `publishNotReadyAddresses: true` that selects the cleanup pods, so NAME
//! resolves to every cleanup pod's address, ready or not. Each `--period`,
//! a round resolves NAME (A and AAAA) and asks each address for
//! `GET /healthz`; a round succeeds when NAME gives at least one address
//! and every one answers 200. `--threshold` successful rounds in a row end
//! the wait (a pod that has no address yet is not in the Service: the
//! streak gives it time to appear). At `--timeout` it fails, naming the
//! addresses that were not clean and what they last said.
//!
//! The decisions are the pure [`Rounds`]; the IO around it is bounded: a
//! resolution, a connect and a whole exchange each have a time limit, and
//! at most [`MAX_RESPONSE`] bytes of an answer are read.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::bail;
use clap::Args;
use futures_util::StreamExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{Instant, timeout, timeout_at},
};

use crate::cli::tracker::parse_duration;

/// A resolution of NAME.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Establishing one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Sending the request and reading the whole answer, once connected.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes of an answer read at most (head and body); the rest is not read.
pub const MAX_RESPONSE: usize = 4096;
/// Characters of an answer's body kept for the report.
const BODY_SHOWN: usize = 300;
/// Addresses asked at once.
const PARALLEL: usize = 32;
/// A failure that stays the same is printed again after this many rounds.
const REPEAT_EVERY: u64 = 30;

#[derive(Debug, Args)]
pub struct CleanupWaitArgs {
    /// NAME:PORT: a headless Service with publishNotReadyAddresses=true that
    /// selects the cleanup pods, and their --serve port ([IPv6]:PORT too).
    #[arg(long, env = "DAMSELFLY_CLEANUP_ENDPOINT", value_parser = Endpoint::parse)]
    pub endpoint: Endpoint,
    /// Time between the starts of two rounds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub period: Duration,
    /// Successful rounds in a row that end the wait.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub threshold: u32,
    /// Give up (exit 1) after this long, naming the addresses not clean.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Where the cleanup pods are asked: a DNS name or an address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(n) => write!(f, "{n}:{}", self.port),
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
        }
    }
}

impl Endpoint {
    /// `NAME:PORT`, `IPv4:PORT` or `[IPv6]:PORT`; the port is not 0.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("{s:?}: {why} (expected NAME:PORT, e.g. damselfly-cleanup:7409)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| bad("a bracketed IPv6 address needs ]:PORT"))?;
            let ip: Ipv6Addr = ip
                .parse()
                .map_err(|_| bad("not an IPv6 address in brackets"))?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (name, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            if name.contains(':') {
                return Err(bad("bracket an IPv6 address: [ADDR]:PORT"));
            }
            let host = match name.parse::<Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                Err(_) if is_dns_name(name) => Host::Name(name.to_string()),
                Err(_) => return Err(bad("not a DNS name")),
            };
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be 1-65535")),
            Ok(p) => p,
        };
        Ok(Self { host, port })
    }
}

/// Letters, digits and `-` in dot-separated labels of 1-63, 253 at most (a
/// final dot allowed): what a Service's DNS name is made of.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// What one address answered to `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// 200: that node is clean.
    Clean,
    /// Any other status, with (the start of) its body.
    Answered { status: u16, body: String },
    /// No answer: connect, timeout, or not HTTP.
    Failed(String),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Clean => f.write_str("clean"),
            Probe::Answered { status, body } if body.is_empty() => write!(f, "answered {status}"),
            Probe::Answered { status, body } => write!(f, "answered {status}: {body}"),
            Probe::Failed(e) => f.write_str(e),
        }
    }
}

/// One round: NAME did not resolve, or each address and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    Unresolved(String),
    Probed(Vec<(SocketAddr, Probe)>),
}

impl Round {
    /// At least one address, and every one clean.
    pub fn succeeded(&self) -> bool {
        match self {
            Round::Unresolved(_) => false,
            Round::Probed(all) => !all.is_empty() && all.iter().all(|(_, p)| *p == Probe::Clean),
        }
    }

    /// What kept this round from succeeding; `None` if it did.
    pub fn problem(&self, endpoint: &Endpoint) -> Option<String> {
        match self {
            Round::Unresolved(e) => Some(format!("{}: {e}", endpoint.host_str())),
            Round::Probed(all) if all.is_empty() => {
                Some(format!("{} resolved to no address", endpoint.host_str()))
            }
            Round::Probed(all) => {
                let dirty: Vec<String> = all
                    .iter()
                    .filter(|(_, p)| *p != Probe::Clean)
                    .map(|(a, p)| format!("{a} {p}"))
                    .collect();
                (!dirty.is_empty()).then(|| {
                    format!(
                        "{} of {} not clean: {}",
                        dirty.len(),
                        all.len(),
                        dirty.join("; ")
                    )
                })
            }
        }
    }
}

impl Endpoint {
    fn host_str(&self) -> String {
        match &self.host {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

/// Where the wait stands after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `threshold` successful rounds in a row: done.
    Done,
    /// This many successful rounds in a row so far (0: this one failed).
    Streak(u32),
}

/// The wait as a state machine over rounds: no sockets, no clock.
#[derive(Debug, Clone)]
pub struct Rounds {
    threshold: u32,
    streak: u32,
    rounds: u64,
    last: Option<Round>,
}

impl Rounds {
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            streak: 0,
            rounds: 0,
            last: None,
        }
    }

    pub fn record(&mut self, round: Round) -> Progress {
        self.rounds += 1;
        self.streak = if round.succeeded() {
            self.streak + 1
        } else {
            0
        };
        self.last = Some(round);
        if self.streak >= self.threshold {
            Progress::Done
        } else {
            Progress::Streak(self.streak)
        }
    }

    /// Why the wait is not over: for the message at `--timeout`.
    pub fn not_done(&self, endpoint: &Endpoint) -> String {
        match &self.last {
            None => "no round completed".into(),
            Some(last) => match last.problem(endpoint) {
                Some(p) => format!("last round ({} rounds): {p}", self.rounds),
                None => format!(
                    "every address was clean, but only {} of {} rounds in a row",
                    self.streak, self.threshold
                ),
            },
        }
    }
}

/// The addresses of `endpoint` now, deduplicated and sorted.
async fn resolve(endpoint: &Endpoint) -> Result<Vec<SocketAddr>, String> {
    let name = match &endpoint.host {
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, endpoint.port)]),
        Host::Name(n) => n.as_str(),
    };
    match timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((name, endpoint.port)),
    )
    .await
    {
        Err(_) => Err(format!(
            "no answer from the resolver within {RESOLVE_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("does not resolve: {e}")),
        Ok(Ok(addrs)) => Ok(addrs.collect::<BTreeSet<_>>().into_iter().collect()),
    }
}

/// `GET /healthz` on `addr`, bounded in time and size.
pub async fn probe(addr: SocketAddr) -> Probe {
    let mut stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => return Probe::Failed(format!("no connection within {CONNECT_TIMEOUT:?}")),
        Ok(Err(e)) => return Probe::Failed(format!("connecting: {e}")),
        Ok(Ok(s)) => s,
    };
    // HTTP/1.0: the answer ends with the connection, never chunked.
    let request = format!(
        "GET /healthz HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: damselfly-cleanup-wait\r\n\r\n"
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buf)
            .await?;
        Ok::<_, std::io::Error>(buf)
    };
    match timeout(EXCHANGE_TIMEOUT, exchange).await {
        Err(_) => Probe::Failed(format!("no whole answer within {EXCHANGE_TIMEOUT:?}")),
        Ok(Err(e)) => Probe::Failed(format!("exchanging: {e}")),
        Ok(Ok(buf)) => parse_answer(&buf),
    }
}

/// The status of an HTTP answer (at most [`MAX_RESPONSE`] bytes of it).
pub fn parse_answer(buf: &[u8]) -> Probe {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(head)) => match response.code {
            Some(200) => Probe::Clean,
            Some(status) => Probe::Answered {
                status,
                body: printable(&buf[head..], BODY_SHOWN),
            },
            None => Probe::Failed("an answer without a status".into()),
        },
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE => {
            Probe::Failed(format!("an answer whose head is over {MAX_RESPONSE} bytes"))
        }
        Ok(httparse::Status::Partial) => Probe::Failed("the answer ended in its head".into()),
        Err(e) => Probe::Failed(format!("not an HTTP answer: {e}")),
    }
}

/// Untrusted bytes for one line of a terminal: lines joined with "; ",
/// control characters replaced, at most `max` characters.
fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let mut out: String = joined
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(max)
        .collect();
    if joined.chars().count() > max {
        out.push('…');
    }
    out
}

async fn round(endpoint: &Endpoint) -> Round {
    let addrs = match resolve(endpoint).await {
        Ok(a) => a,
        Err(e) => return Round::Unresolved(e),
    };
    let mut probed: Vec<(SocketAddr, Probe)> = futures_util::stream::iter(addrs)
        .map(|a| async move { (a, probe(a).await) })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    probed.sort_by_key(|(a, _)| *a);
    Round::Probed(probed)
}

pub async fn run(args: CleanupWaitArgs) -> anyhow::Result<()> {
    let endpoint = &args.endpoint;
    println!(
        "waiting for every cleanup pod behind {endpoint} to answer 200 on /healthz, {} rounds \
         in a row (a round every {:?}, at most {:?})",
        args.threshold, args.period, args.timeout
    );
    let deadline = Instant::now() + args.timeout;
    let mut rounds = Rounds::new(args.threshold);
    let mut ticks = tokio::time::interval(args.period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = None;
    for n in 1.. {
        if timeout_at(deadline, ticks.tick()).await.is_err() {
            break;
        }
        let Ok(this) = timeout_at(deadline, round(endpoint)).await else {
            break;
        };
        let line = this.problem(endpoint);
        let count = match &this {
            Round::Probed(all) => all.len(),
            Round::Unresolved(_) => 0,
        };
        match rounds.record(this) {
            Progress::Done => {
                println!(
                    "round {n}: {count} clean; done ({} in a row)",
                    args.threshold
                );
                return Ok(());
            }
            Progress::Streak(s) if s > 0 => {
                println!(
                    "round {n}: {count} clean ({s} of {} in a row)",
                    args.threshold
                )
            }
            // The same failure every round says nothing new: now and then.
            Progress::Streak(_) if line == previous && n % REPEAT_EVERY != 0 => {}
            Progress::Streak(_) => {
                println!("round {n}: {}", line.as_deref().unwrap_or("not clean"))
            }
        }
        previous = line;
    }
    bail!(
        "cleanup not confirmed within {:?} at {endpoint}: {}",
        args.timeout,
        rounds.not_done(endpoint)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            ep("damselfly-cleanup:7409"),
            Endpoint {
                host: Host::Name("damselfly-cleanup".into()),
                port: 7409
            }
        );
        assert_eq!(
            ep("damselfly-cleanup.kube-system.svc.cluster.local.:1").host,
            Host::Name("damselfly-cleanup.kube-system.svc.cluster.local.".into())
        );
        assert_eq!(
            ep("10.0.0.1:80").host,
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        let v6 = ep("[fd00::12]:7409");
        assert_eq!(v6.host, Host::Ip("fd00::12".parse().unwrap()));
        assert_eq!(v6.to_string(), "[fd00::12]:7409");
        assert_eq!(ep("svc:7409").to_string(), "svc:7409");
        for bad in [
            "",
            "svc",
            "svc:",
            "svc:0",
            "svc:65536",
            ":7409",
            "fd00::12:7409",
            "[fd00::12]",
            "[fd00::12]7409",
            "[10.0.0.1]:80",
            "http://svc:7409",
            "svc/x:1",
            "-svc:1",
            "a..b:1",
            "under_score:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = Endpoint::parse("fd00::12:7409").unwrap_err();
        assert!(e.contains("[ADDR]:PORT"), "{e}");
        assert!(Endpoint::parse(&format!("{}:1", "a".repeat(64))).is_err());
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn clean(addrs: &[&str]) -> Round {
        Round::Probed(addrs.iter().map(|a| (addr(a), Probe::Clean)).collect())
    }

    #[test]
    fn threshold_rounds_in_a_row_of_all_clean_end_the_wait() {
        let mut r = Rounds::new(3);
        assert_eq!(r.record(clean(&["10.0.0.1:7409"])), Progress::Streak(1));
        assert_eq!(
            r.record(clean(&["10.0.0.1:7409", "[fd00::1]:7409"])),
            Progress::Streak(2)
        );
        assert_eq!(r.record(clean(&["10.0.0.1:7409"])), Progress::Done);

        let mut r = Rounds::new(1);
        assert_eq!(r.record(clean(&["10.0.0.1:7409"])), Progress::Done);
    }

    #[test]
    fn any_failure_starts_the_count_again() {
        let ep = ep("svc:7409");
        let mut r = Rounds::new(2);
        let dirty = Round::Probed(vec![
            (addr("10.0.0.1:7409"), Probe::Clean),
            (
                addr("[fd00::2]:7409"),
                Probe::Answered {
                    status: 500,
                    body: "state dir: refusing".into(),
                },
            ),
            (
                addr("10.0.0.3:7409"),
                Probe::Failed("connecting: refused".into()),
            ),
        ]);
        for failed in [
            dirty.clone(),
            Round::Probed(vec![]),
            Round::Unresolved("does not resolve: NXDOMAIN".into()),
        ] {
            assert_eq!(r.record(clean(&["10.0.0.1:7409"])), Progress::Streak(1));
            assert_eq!(r.record(failed), Progress::Streak(0));
        }
        let why = r.not_done(&ep);
        assert!(why.contains("svc: does not resolve: NXDOMAIN"), "{why}");

        r.record(Round::Probed(vec![]));
        assert!(r.not_done(&ep).contains("svc resolved to no address"));

        r.record(dirty);
        let why = r.not_done(&ep);
        assert!(
            why.contains("2 of 3 not clean")
                && why.contains("[fd00::2]:7409 answered 500: state dir: refusing")
                && why.contains("10.0.0.3:7409 connecting: refused")
                && !why.contains("10.0.0.1"),
            "{why}"
        );
        assert_eq!(r.record(clean(&["10.0.0.1:7409"])), Progress::Streak(1));
        assert!(r.not_done(&ep).contains("only 1 of 2"));
        assert_eq!(Rounds::new(2).not_done(&ep), "no round completed");
    }

    #[test]
    fn answers_are_read_for_their_status_and_a_printable_body() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nclean\n"),
            Probe::Clean
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 500 Internal\r\n\r\nstate dir: no\ntrust: \x1b[31mred\n"),
            Probe::Answered {
                status: 500,
                body: "state dir: no; trust: ?[31mred".into()
            }
        );
        let long = format!("HTTP/1.1 500 X\r\n\r\n{}", "e".repeat(1000));
        let Probe::Answered { body, .. } = parse_answer(long.as_bytes()) else {
            panic!()
        };
        assert_eq!(body.chars().count(), BODY_SHOWN + 1);
        assert!(matches!(parse_answer(b"SSH-2.0-x\r\n"), Probe::Failed(_)));
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\n"),
            Probe::Failed(_)
        ));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_RESPONSE));
        let Probe::Failed(e) = parse_answer(&huge.as_bytes()[..MAX_RESPONSE]) else {
            panic!()
        };
        assert!(e.contains("over 4096"), "{e}");
    }
}
