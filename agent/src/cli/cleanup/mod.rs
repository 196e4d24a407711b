//! `damselfly cleanup`: what `helm uninstall` runs on every node (the chart's
//! post-delete hook DaemonSet) so that nothing of Damselfly stays behind:
//!
//! 1. wait until no agent holds the state dir (the node CA's lease), at most
//!    `--wait-agent`, then go on with a warning;
//! 2. take the node CA out of the host's trust store and certs.d, exactly
//!    as `damselfly ca uninstall` does;
//! 3. delete `--state-dir` (the CA's private key, the blob cache), only if
//!    it looks like one ([`state_dir`]);
//! 4. remove the maps a killed agent left pinned under
//!    `<bpffs>/damselfly/<instance>`, and `damselfly/` if that empties it.
//!
//! Every step runs whatever the others did, and each is a no-op on a clean
//! node, so running it again is safe. Then it serves `GET /healthz` on
//! `--serve` until SIGTERM: 200 `clean` if every step succeeded, else 500
//! with what failed. The pod's readiness probe and `damselfly cleanup-wait`
//! (the hook Job, [`wait`]) read it.

pub mod state_dir;
pub mod wait;

pub use wait::CleanupWaitArgs;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};

use super::{ca::HostArgs, parse_instance, tracker::parse_duration};
use crate::{ca::NodeCa, steer};
use state_dir::Removed;

/// How often the agent's lease is looked at while waiting for it.
const LEASE_POLL: Duration = Duration::from_millis(250);
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// One connection's whole life: a probe asks once.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// The agent's state dir, deleted (the node CA's key, the blob cache).
    /// Give it under --host-root (e.g. /host/var/lib/damselfly) so that the
    /// directory itself goes too, not only what is in it.
    #[arg(
        long,
        env = "DAMSELFLY_STATE_DIR",
        default_value = "/var/lib/damselfly"
    )]
    pub state_dir: PathBuf,
    /// The agent's instance name: its pins are BPFFS/damselfly/NAME.
    #[arg(long, env = "DAMSELFLY_INSTANCE", default_value = "default", value_parser = parse_instance)]
    pub instance: String,
    /// Where the host's bpffs is mounted.
    #[arg(long, env = "DAMSELFLY_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Serve GET /healthz here when done, until SIGTERM.
    #[arg(long, env = "DAMSELFLY_CLEANUP_SERVE", default_value = "0.0.0.0:7409")]
    pub serve: SocketAddr,
    /// Wait at most this long for a running agent to let go of the state
    /// dir; then clean up anyway, with a warning.
    #[arg(long, env = "DAMSELFLY_WAIT_AGENT", default_value = "60s", value_parser = parse_duration)]
    pub wait_agent: Duration,
}

/// The steps' failures: none means clean.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub failures: Vec<String>,
}

impl Outcome {
    fn step(&mut self, name: &str, result: anyhow::Result<()>) {
        if let Err(e) = result {
            let failure = format!("{name}: {e:#}");
            println!("FAILED {failure}");
            self.failures.push(failure);
        }
    }

    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }

    /// What /healthz answers.
    pub fn answer(&self) -> (StatusCode, String) {
        if self.is_clean() {
            (StatusCode::OK, "clean\n".into())
        } else {
            let mut body = self.failures.join("\n");
            body.push('\n');
            (StatusCode::INTERNAL_SERVER_ERROR, body)
        }
    }
}

pub async fn run(args: CleanupArgs) -> anyhow::Result<()> {
    // Before any step: a port we cannot serve on would hide the outcome.
    let listener = TcpListener::bind(args.serve)
        .await
        .with_context(|| format!("binding --serve {}", args.serve))?;
    let outcome = tokio::task::spawn_blocking(move || clean(&args))
        .await
        .context("the cleanup steps panicked")?;
    if outcome.is_clean() {
        println!(
            "clean; /healthz answers 200 on {} until SIGTERM",
            listener.local_addr()?
        );
    } else {
        println!(
            "NOT clean ({} failed); /healthz answers 500 on {} until SIGTERM",
            outcome.failures.len(),
            listener.local_addr()?
        );
    }
    serve(listener, Arc::new(outcome)).await
}

/// The four steps, in order, each reported on stdout.
pub fn clean(args: &CleanupArgs) -> Outcome {
    let mut outcome = Outcome::default();
    println!(
        "[1/4] waiting for the agent to let go of {}",
        args.state_dir.display()
    );
    wait_for_agent(&args.state_dir, args.wait_agent);
    println!("[2/4] removing the node CA from the host's trust store and certs.d");
    outcome.step("trust store", super::ca::uninstall(&args.host));
    println!("[3/4] deleting the state dir {}", args.state_dir.display());
    outcome.step("state dir", remove_state_dir(&args.state_dir));
    let pins = args.bpffs.join("damselfly");
    println!(
        "[4/4] removing the agent's pins {}",
        pins.join(&args.instance).display()
    );
    outcome.step("pins", remove_pins(&args.bpffs, &args.instance));
    outcome
}

/// Polls the node CA's lease until no agent holds it or `limit` passes;
/// never fails: a stuck agent must not keep the node from being cleaned.
fn wait_for_agent(state_dir: &Path, limit: Duration) {
    let start = Instant::now();
    let mut said = false;
    loop {
        match NodeCa::in_use(state_dir) {
            Ok(false) if said => {
                println!(
                    "the agent let go after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            Ok(false) => {
                println!("no agent holds it");
                return;
            }
            Ok(true) if start.elapsed() >= limit => {
                println!(
                    "WARNING: an agent still holds {} after {limit:?} (--wait-agent); cleaning \
                     up anyway: that agent has lost its CA and cache",
                    state_dir.join("ca/.agent").display()
                );
                return;
            }
            Ok(true) => {
                if !said {
                    println!(
                        "an agent holds the node CA ({}): waiting for it to stop, at most \
                         {limit:?}",
                        state_dir.join("ca/.agent").display()
                    );
                    said = true;
                }
                std::thread::sleep(LEASE_POLL);
            }
            Err(e) => {
                println!("WARNING: cannot tell whether an agent runs ({e}); going on");
                return;
            }
        }
    }
}

fn remove_state_dir(dir: &Path) -> anyhow::Result<()> {
    match state_dir::remove(dir)? {
        Removed::Absent => println!("{} is not there (nothing to do)", dir.display()),
        Removed::Removed {
            ca,
            blob_files,
            blob_bytes,
            mount_point,
        } => {
            println!(
                "deleted {}: {}{blob_files} cache files ({blob_bytes} bytes)",
                dir.display(),
                if ca { "the node CA and its key, " } else { "" },
            );
            if mount_point {
                println!(
                    "the empty directory {} stays: it is a mount point here (give --state-dir \
                     under --host-root for it to go too)",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn remove_pins(bpffs: &Path, instance: &str) -> anyhow::Result<()> {
    let root = bpffs.join("damselfly");
    let dir = root.join(instance);
    if !dir.exists() {
        println!("{} is not there (nothing to do)", dir.display());
        if !is_bpffs(bpffs) {
            println!(
                "note: {} is not a bpffs here, so no pin could be found: mount the host's \
                 /sys/fs/bpf there",
                bpffs.display()
            );
        }
    } else {
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        steer::remove_pins(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("removed {} ({n} pinned maps)", dir.display());
    }
    match std::fs::remove_dir(&root) {
        Ok(()) => println!("removed {} (no other instance left)", root.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            println!("{} stays: other instances' pins are in it", root.display())
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", root.display())),
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own, with a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Answers /healthz with `outcome` until SIGTERM or SIGINT.
async fn serve(listener: TcpListener, outcome: Arc<Outcome>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            permit = slots.clone().acquire_owned() => permit?,
        };
        let (stream, _) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a /healthz connection");
                    continue;
                }
            },
        };
        let outcome = outcome.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let outcome = outcome.clone();
                async move { Ok::<_, Infallible>(route(&req, &outcome)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
    println!("stopping (signal)");
    Ok(())
}

fn route(req: &Request<Incoming>, outcome: &Outcome) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => outcome.answer(),
        (_, "/healthz") => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
        _ => (StatusCode::NOT_FOUND, "only /healthz here\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        testing::TempDir,
    };

    #[test]
    fn flags_and_defaults() {
        let Command::Cleanup(a) = Cli::try_parse_from(["damselfly", "cleanup"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.host.host_root, PathBuf::from("/"));
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/damselfly"));
        assert_eq!(a.instance, "default");
        assert_eq!(a.bpffs, PathBuf::from("/sys/fs/bpf"));
        assert_eq!(a.serve, "0.0.0.0:7409".parse().unwrap());
        assert_eq!(a.wait_agent, Duration::from_secs(60));
        assert!(
            Cli::try_parse_from(["damselfly", "cleanup", "--instance", "../x"]).is_err(),
            "the instance becomes a path"
        );
        let Command::CleanupWait(w) = Cli::try_parse_from([
            "damselfly",
            "cleanup-wait",
            "--endpoint",
            "damselfly-cleanup:7409",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(w.period, Duration::from_secs(2));
        assert_eq!(w.threshold, 3);
        assert_eq!(w.timeout, Duration::from_secs(600));
        assert!(Cli::try_parse_from(["damselfly", "cleanup-wait"]).is_err());
        assert!(
            Cli::try_parse_from([
                "damselfly",
                "cleanup-wait",
                "--endpoint",
                "s:1",
                "--threshold",
                "0"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_lease_is_seen_while_an_agent_holds_it_and_nothing_is_created() {
        let t = TempDir::new("cleanup-lease");
        let state = t.join("state");
        assert!(!NodeCa::in_use(&state).unwrap());
        assert!(!state.exists(), "looking created the state dir");
        let registries = crate::origin::RegistryHosts::new(&[]).unwrap();
        let ca = NodeCa::load_or_create(&state, &registries).unwrap();
        assert!(NodeCa::in_use(&state).unwrap());
        // Bounded: an agent that never stops does not stop the cleanup.
        let start = Instant::now();
        wait_for_agent(&state, Duration::from_millis(300));
        assert!(start.elapsed() >= Duration::from_millis(300));
        drop(ca);
        assert!(!NodeCa::in_use(&state).unwrap());
    }

    fn args(host_root: &Path, state: &Path, bpffs: &Path) -> CleanupArgs {
        CleanupArgs {
            host: HostArgs {
                host_root: host_root.to_path_buf(),
                update_command: Some("true".into()),
            },
            state_dir: state.to_path_buf(),
            instance: "dfly-test".into(),
            bpffs: bpffs.to_path_buf(),
            serve: "127.0.0.1:0".parse().unwrap(),
            wait_agent: Duration::from_millis(100),
        }
    }

    #[test]
    fn every_step_runs_and_a_second_run_is_clean() {
        let t = TempDir::new("cleanup-steps");
        let (host, state, bpffs) = (t.join("host"), t.join("state"), t.join("bpffs"));
        std::fs::create_dir_all(host.join("etc")).unwrap();
        std::fs::write(host.join("etc/debian_version"), "12\n").unwrap();
        let registries = crate::origin::RegistryHosts::new(&[]).unwrap();
        let pem = NodeCa::load_or_create(&state, &registries)
            .unwrap()
            .cert_pem()
            .to_string();
        let store = crate::ca::TrustStore::detect(&host).unwrap();
        // The anchor as `ca install` leaves it (the real update runs end to end).
        let anchor = store.anchor_path();
        std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
        std::fs::write(&anchor, &pem).unwrap();
        crate::ca::CertsDirs::new(&host)
            .install(&pem, &["registry.dfly.test"])
            .unwrap();
        // Pins as a killed agent leaves them (plain files stand in for them).
        let pins = bpffs.join("damselfly/dfly-test");
        std::fs::create_dir_all(&pins).unwrap();
        std::fs::write(pins.join("config"), "").unwrap();

        let outcome = clean(&args(&host, &state, &bpffs));
        assert_eq!(outcome, Outcome::default());
        assert_eq!(outcome.answer(), (StatusCode::OK, "clean\n".into()));
        assert!(!store.anchor_path().exists());
        assert!(!host.join("etc/docker").exists());
        assert!(!state.exists());
        assert!(!bpffs.join("damselfly").exists());
        assert!(host.join("etc/debian_version").exists());

        assert!(clean(&args(&host, &state, &bpffs)).is_clean());
    }

    #[test]
    fn a_failed_step_does_not_stop_the_others_and_is_answered_with_500() {
        let t = TempDir::new("cleanup-fail");
        let (host, state, bpffs) = (t.join("host"), t.join("state"), t.join("bpffs"));
        std::fs::create_dir_all(&host).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("notes.txt"), "mine").unwrap();
        let pins = bpffs.join("damselfly/dfly-test");
        std::fs::create_dir_all(&pins).unwrap();
        std::fs::create_dir_all(bpffs.join("damselfly/other")).unwrap();

        let outcome = clean(&args(&host, &state, &bpffs));
        assert_eq!(outcome.failures.len(), 2, "{outcome:?}");
        let (status, body) = outcome.answer();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            body.starts_with("trust store: no known trust store"),
            "{body}"
        );
        assert!(
            body.contains("\nstate dir: refusing to delete --state-dir")
                && body.contains("notes.txt"),
            "{body}"
        );
        assert!(state.join("notes.txt").exists());
        // The pins still went; the other instance's stay.
        assert!(!pins.exists() && bpffs.join("damselfly/other").exists());
    }
}
