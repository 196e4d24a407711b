//! Fail open at TLS: never fail a pull because the client does not trust
//! the node CA. Registry connections are terminated with a node-CA leaf, so a
//! runtime whose trust store lacks the CA (a restart that failed, a unit we
//! do not know, a trust store we cannot write) would reject every one. Two
//! ways out, both splicing that client's connections to the origin untouched:
//!
//! - decided before terminating, where it can be known: a process that
//!   started before the node CA was written cannot have it among its roots
//!   (Go programs, containerd among them, load their roots once);
//! - learned from a refusal: a client that answers our certificate with an
//!   alert (Go sends "bad certificate") has its next connections to that host
//!   spliced for [`RETRY_AFTER`]; then one more handshake is tried, so a
//!   runtime that was restarted with the CA in its store comes back.
//!
//! Clients are told apart by their task name (`comm`): a runtime pulls from
//! one long-lived process (containerd, dockerd, crio), a CLI (ctr, skopeo)
//! from a new one each run, and either way one refusal per name and host is
//! the most a pull pays.

use std::{
    collections::HashMap,
    fs,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{steer::Client, telemetry::Stamp};

/// How long a refusal stands before the client is offered our certificate again.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(600);
/// Refusals remembered at most (oldest forgotten first): names and hosts come
/// from processes on the node, which may pick any.
const MAX_ENTRIES: usize = 1024;

/// Why a registry connection is spliced instead of terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untrusted {
    /// The client refused our certificate for this host not long ago.
    Refused,
    /// The client started before the node CA was written.
    StartedBeforeCa,
}

impl Untrusted {
    pub fn label(self) -> &'static str {
        match self {
            Untrusted::Refused => "splice-refused-ca",
            Untrusted::StartedBeforeCa => "splice-started-before-ca",
        }
    }
}

/// A client that refused the node CA, as `/status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub comm: String,
    pub host: String,
    pub seconds_ago: u64,
}

/// Whether a client (by name) trusts the node CA, as `/status` shows it:
/// from the latest TLS outcome the agent saw for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustVerdict {
    pub comm: String,
    pub verdict: Verdict,
    /// Why it is not trusted: `refused` (it answered our certificate with an
    /// alert) or `started-before-ca` (it cannot have the CA among its roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The registry host of that outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// When that outcome was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Stamp>,
    /// After a refusal: until when its connections to `host` are spliced
    /// (then it is offered our certificate again). A client that started
    /// before the CA is spliced until it restarts, so it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spliced_until: Option<Stamp>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Verdict {
    /// A handshake with our certificate completed.
    #[serde(rename = "trusted")]
    Trusted,
    /// It refused our certificate, or cannot have the CA: spliced.
    #[serde(rename = "not trusted")]
    NotTrusted,
    /// No TLS connection to a registry yet.
    #[serde(rename = "unknown")]
    Unknown,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Trusted => "trusted",
            Verdict::NotTrusted => "not trusted",
            Verdict::Unknown => "unknown",
        }
    }
}

/// The latest TLS outcome for one client name.
#[derive(Debug, Clone)]
enum Outcome {
    Trusted { host: String, at: Instant },
    Refused { host: String, at: Instant },
    StartedBeforeCa { host: String, at: Instant },
}

impl Outcome {
    fn at(&self) -> Instant {
        match self {
            Outcome::Trusted { at, .. }
            | Outcome::Refused { at, .. }
            | Outcome::StartedBeforeCa { at, .. } => *at,
        }
    }
}

pub struct ClientTrust {
    refused: Mutex<HashMap<(String, String), Instant>>,
    /// Per client name, for `/status`; kept apart from `refused`, which
    /// forgets a refusal when it is retried.
    outcomes: Mutex<HashMap<String, Outcome>>,
    /// When the node CA's certificate file was last written.
    ca_written: Option<SystemTime>,
    /// `/proc/<tgid>` names the client only if we share the kernel's pid
    /// namespace (the tgid comes from the kernel).
    proc_is_global: bool,
}

impl ClientTrust {
    pub fn new(ca_written: Option<SystemTime>, proc_is_global: bool) -> Self {
        Self {
            refused: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(HashMap::new()),
            ca_written,
            proc_is_global,
        }
    }

    /// `None`: terminate (try our certificate); else why not.
    pub fn check(&self, client: &Client, host: &str) -> Option<Untrusted> {
        self.check_at(client, host, Instant::now(), started(client))
    }

    fn check_at(
        &self,
        client: &Client,
        host: &str,
        now: Instant,
        started: Option<SystemTime>,
    ) -> Option<Untrusted> {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let key = (client.comm.clone(), host.to_string());
        match refused.get(&key) {
            Some(at) if now.duration_since(*at) < RETRY_AFTER => return Some(Untrusted::Refused),
            Some(_) => {
                refused.remove(&key);
            }
            None => {}
        }
        drop(refused);
        let before_ca = self.proc_is_global
            && matches!((started, self.ca_written), (Some(s), Some(ca)) if s < ca);
        if before_ca {
            self.note(
                &client.comm,
                Outcome::StartedBeforeCa {
                    host: host.to_string(),
                    at: now,
                },
            );
        }
        before_ca.then_some(Untrusted::StartedBeforeCa)
    }

    /// `client` completed a handshake with our certificate for `host`.
    pub fn trusted(&self, client: &Client, host: &str) {
        self.note(
            &client.comm,
            Outcome::Trusted {
                host: host.to_string(),
                at: Instant::now(),
            },
        );
    }

    fn note(&self, comm: &str, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        if outcomes.len() >= MAX_ENTRIES && !outcomes.contains_key(comm) {
            let oldest = outcomes
                .iter()
                .min_by_key(|(_, o)| o.at())
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                outcomes.remove(&k);
            }
        }
        outcomes.insert(comm.to_string(), outcome);
    }

    /// One verdict per client name: each of `comms` (the steered names),
    /// then any other name seen, by name.
    pub fn verdicts(&self, comms: &[String]) -> Vec<TrustVerdict> {
        self.verdicts_at(comms, Instant::now(), SystemTime::now())
    }

    fn verdicts_at(&self, comms: &[String], now: Instant, wall: SystemTime) -> Vec<TrustVerdict> {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let mut others: Vec<&String> = outcomes.keys().filter(|c| !comms.contains(c)).collect();
        others.sort();
        // Instants are monotonic; the wall clock is read once, here.
        let stamp =
            |at: Instant| Stamp::from(wall.checked_sub(now.duration_since(at)).unwrap_or(wall));
        comms
            .iter()
            .chain(others)
            .map(|comm| {
                let mut v = TrustVerdict {
                    comm: comm.clone(),
                    verdict: Verdict::Unknown,
                    reason: None,
                    host: None,
                    at: None,
                    spliced_until: None,
                };
                let Some(o) = outcomes.get(comm) else {
                    return v;
                };
                v.at = Some(stamp(o.at()));
                match o {
                    Outcome::Trusted { host, .. } => {
                        v.verdict = Verdict::Trusted;
                        v.host = Some(host.clone());
                    }
                    Outcome::Refused { host, at } => {
                        v.verdict = Verdict::NotTrusted;
                        v.reason = Some("refused".into());
                        v.host = Some(host.clone());
                        v.spliced_until = Some(Stamp::from(
                            wall + RETRY_AFTER.saturating_sub(now.duration_since(*at)),
                        ));
                    }
                    Outcome::StartedBeforeCa { host, .. } => {
                        v.verdict = Verdict::NotTrusted;
                        v.reason = Some("started-before-ca".into());
                        v.host = Some(host.clone());
                    }
                }
                v
            })
            .collect()
    }

    /// `client` answered our certificate for `host` with an alert.
    pub fn refused(&self, client: &Client, host: &str) {
        self.refused_at(client, host, Instant::now());
    }

    fn refused_at(&self, client: &Client, host: &str, now: Instant) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() >= MAX_ENTRIES {
            let oldest = refused
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                refused.remove(&k);
            }
        }
        refused.insert((client.comm.clone(), host.to_string()), now);
        drop(refused);
        self.note(
            &client.comm,
            Outcome::Refused {
                host: host.to_string(),
                at: now,
            },
        );
    }

    /// The refusals standing now, for `/status`.
    pub fn refusals(&self) -> Vec<Refusal> {
        let now = Instant::now();
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Refusal> = refused
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < RETRY_AFTER)
            .map(|((comm, host), at)| Refusal {
                comm: comm.clone(),
                host: host.clone(),
                seconds_ago: now.duration_since(*at).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| (&a.comm, &a.host).cmp(&(&b.comm, &b.host)));
        out
    }
}

/// Whether a failed handshake was the client refusing our certificate.
pub(super) fn is_refusal(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::AccessDenied
        ))
    )
}

/// When a process started, from `/proc/<tgid>/stat` (field 22, clock ticks
/// after boot). Boot is placed by the boot-time clock rather than `btime` in
/// `/proc/stat`, which is whole seconds: a runtime started just after the CA
/// must not look older than it.
fn started(client: &Client) -> Option<SystemTime> {
    let stat = fs::read_to_string(format!("/proc/{}/stat", client.tgid)).ok()?;
    // The name in parentheses may hold spaces: count fields after its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-parameter.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let since_boot = Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    );
    let boot = SystemTime::now().checked_sub(since_boot)?;
    Some(boot + Duration::from_millis(ticks * 1000 / hz))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn client(comm: &str) -> Client {
        Client {
            tgid: 1,
            comm: comm.into(),
        }
    }

    #[test]
    fn a_refusal_splices_that_name_and_host_until_it_is_retried() {
        let trust = ClientTrust::new(None, true);
        let t0 = Instant::now();
        let c = client("containerd");
        assert_eq!(trust.check_at(&c, "ghcr.io", t0, None), None);
        trust.refused_at(&c, "ghcr.io", t0);
        assert_eq!(
            trust.check_at(&c, "ghcr.io", t0 + Duration::from_secs(1), None),
            Some(Untrusted::Refused)
        );
        // Another host, another client: still offered our certificate.
        assert_eq!(trust.check_at(&c, "quay.io", t0, None), None);
        assert_eq!(
            trust.check_at(&client("dockerd"), "ghcr.io", t0, None),
            None
        );
        // After a while, one more try.
        assert_eq!(trust.check_at(&c, "ghcr.io", t0 + RETRY_AFTER, None), None);
    }

    #[test]
    fn a_client_older_than_the_ca_is_spliced_from_the_first_connection() {
        let ca = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let before = Some(ca - Duration::from_secs(5));
        let after = Some(ca + Duration::from_secs(5));
        let now = Instant::now();
        let trust = ClientTrust::new(Some(ca), true);
        let c = client("containerd");
        assert_eq!(
            trust.check_at(&c, "ghcr.io", now, before),
            Some(Untrusted::StartedBeforeCa)
        );
        assert_eq!(trust.check_at(&c, "ghcr.io", now, after), None);
        // In a pid namespace of its own the agent cannot tell whose /proc entry it read.
        let blind = ClientTrust::new(Some(ca), false);
        assert_eq!(blind.check_at(&c, "ghcr.io", now, before), None);
    }

    #[test]
    fn refusals_are_bounded() {
        let trust = ClientTrust::new(None, true);
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 10 {
            trust.refused_at(
                &client(&format!("p{i}")),
                "ghcr.io",
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(trust.refusals().len(), MAX_ENTRIES);
        // The oldest went first.
        assert_eq!(trust.check_at(&client("p0"), "ghcr.io", t0, None), None);
    }

    #[test]
    fn each_client_gets_the_verdict_of_its_latest_tls_outcome() {
        let ca = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let trust = ClientTrust::new(Some(ca), true);
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(2_000_000);
        trust.refused_at(&client("containerd"), "ghcr.io", t0);
        trust.trusted(&client("ctr"), "quay.io");
        let old = Some(ca - Duration::from_secs(1));
        trust.check_at(&client("dockerd"), "ghcr.io", t0, old);
        trust.trusted(&client("skopeo2"), "ghcr.io");
        let comms: Vec<String> = ["containerd", "ctr", "dockerd", "crio"]
            .map(String::from)
            .into();
        let later = t0 + Duration::from_secs(100);
        let v = trust.verdicts_at(&comms, later, wall);
        let names: Vec<&str> = v.iter().map(|v| v.comm.as_str()).collect();
        assert_eq!(names, ["containerd", "ctr", "dockerd", "crio", "skopeo2"]);

        assert_eq!(v[0].verdict, Verdict::NotTrusted);
        assert_eq!(v[0].reason.as_deref(), Some("refused"));
        assert_eq!(v[0].host.as_deref(), Some("ghcr.io"));
        assert_eq!(v[0].at, Some(Stamp::from(wall - Duration::from_secs(100))));
        assert_eq!(
            v[0].spliced_until,
            Some(Stamp::from(wall + RETRY_AFTER - Duration::from_secs(100)))
        );
        assert_eq!(v[1].verdict, Verdict::Trusted);
        assert_eq!(v[1].spliced_until, None);
        assert_eq!(v[2].verdict, Verdict::NotTrusted);
        assert_eq!(v[2].reason.as_deref(), Some("started-before-ca"));
        assert_eq!(v[2].spliced_until, None);
        assert_eq!(v[3].verdict, Verdict::Unknown);
        assert_eq!(v[3].at, None);

        // The runtime was restarted with the CA: its next handshake completes.
        trust.trusted(&client("containerd"), "ghcr.io");
        let v = trust.verdicts(&comms);
        assert_eq!(v[0].verdict, Verdict::Trusted);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json[0]["verdict"], "trusted");
        assert_eq!(json[2]["verdict"], "not trusted");
        assert_eq!(json[3]["verdict"], "unknown");
    }

    #[test]
    fn this_process_has_a_start_time() {
        let me = Client {
            tgid: std::process::id(),
            comm: String::new(),
        };
        let t = started(&me).expect("a start time");
        let now = SystemTime::now();
        assert!(t <= now + Duration::from_millis(20), "{t:?} after {now:?}");
        assert!(now.duration_since(t).unwrap_or_default() < Duration::from_secs(600));
    }

    #[test]
    fn certificate_alerts_are_refusals_other_errors_are_not() {
        let alert = |a| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            )
        };
        assert!(is_refusal(&alert(rustls::AlertDescription::BadCertificate)));
        assert!(is_refusal(&alert(rustls::AlertDescription::UnknownCA)));
        assert!(!is_refusal(&alert(
            rustls::AlertDescription::HandshakeFailure
        )));
        assert!(!is_refusal(&std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof
        )));
    }
}
