//! The built binary's errors for `agent` (`--seed`, bad cluster
//! certificates), `get` and `preheat` that need no network (the testbed's
//! e2e tests cover the rest).

use std::process::{Command, Output};

use damselfly::testing::TempDir;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

fn damselfly(home: &TempDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_damselfly"))
        .args(args)
        .env("HOME", home.path())
        .env_remove("RUST_BACKTRACE")
        .env_remove("DAMSELFLY_CREDS")
        .env_remove("DAMSELFLY_AGENT")
        .env_remove("DAMSELFLY_SEED_ADMIN")
        .env_remove("DAMSELFLY_CLUSTER_CA")
        .env_remove("DAMSELFLY_CLUSTER_CERT")
        .env_remove("DAMSELFLY_CLUSTER_KEY")
        .output()
        .expect("running damselfly")
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_seed_needs_a_tracker() {
    let dir = TempDir::new("seedcli");
    let state = dir.path().join("state");
    let err = failure(&damselfly(
        &dir,
        &[
            "agent",
            "--seed",
            "--state-dir",
            state.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ],
    ));
    assert!(err.contains("--seed") && err.contains("--tracker"), "{err}");
}

/// A node certificate without SAN `damselfly-peer` stops the agent before
/// it creates its state dir or touches eBPF: `--steer-ports 0` would fail
/// the steering rules (before any program is loaded) if the check came later.
#[test]
fn an_agent_with_a_bad_cluster_certificate_refuses_to_start() {
    let dir = TempDir::new("pkicli");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "cluster");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["node-a".into(), "node-a.local".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (ca_pem, crt, key_pem) = (
        dir.join("ca.crt"),
        dir.join("bad.crt"),
        dir.join("node.key"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let state = dir.join("state");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = [
        "agent",
        "--instance",
        "dfly-pki-cli-test",
        "--state-dir",
        &path(&state),
        "--steer-ports",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--tracker",
        "127.0.0.1:1",
        "--cluster-ca",
        &path(&ca_pem),
        "--cluster-cert",
        &path(&crt),
        "--cluster-key",
        &path(&key_pem),
    ];
    let err = failure(&damselfly(&dir, &args));
    assert!(
        err.contains(&format!(
            "--cluster-cert {}: no subjectAltName DNS:damselfly-peer (has: node-a, \
             node-a.local); the swarm's peers and the tracker verify that name",
            crt.display()
        )),
        "{err}"
    );
    assert!(!state.exists(), "nothing was set up");

    // Without the key, the message names what is missing.
    let err = failure(&damselfly(&dir, &args[..args.len() - 2]));
    assert!(err.contains("missing: --cluster-key"), "{err}");
}

#[test]
fn get_explains_bad_input_and_a_missing_agent() {
    let dir = TempDir::new("getcli");
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let err = failure(&damselfly(&dir, &["get", "Reg.io/App:v1", "-o", out]));
    assert!(
        err.contains("invalid image reference \"Reg.io/App:v1\""),
        "{err}"
    );
    let err = failure(&damselfly(
        &dir,
        &["get", "https://reg.io/v2/app/manifests/v1", "-o", out],
    ));
    assert!(
        err.contains("invalid blob URL") && err.contains("not a blob"),
        "{err}"
    );
    let err = failure(&damselfly(
        &dir,
        &["get", "reg.io/app", "-o", out, "--creds", "nocolon"],
    ));
    assert!(err.contains("USER:PASSWORD"), "{err}");

    let url = format!(
        "https://registry-1.docker.io/v2/library/busybox/blobs/sha256:{}",
        "a".repeat(64)
    );
    let err = failure(&damselfly(
        &dir,
        &["get", &url, "-o", out, "--agent", "http://127.0.0.1:1"],
    ));
    assert!(
        err.contains("no agent answers at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("origin"), "{err}");
    assert!(!std::path::Path::new(out).exists());
    assert!(!std::path::Path::new(&format!("{out}.tmp")).exists());

    let err = failure(&damselfly(&dir, &["preheat", "reg.io/app"]));
    assert!(err.contains("--seed"), "{err}");
}

#[test]
fn the_tracker_refuses_to_start_without_its_own_certificate() {
    let dir = TempDir::new("tracker-cli");
    let ca = damselfly::testing::TestCa::new("cluster");
    // A peer's certificate: the tracker's must name damselfly-tracker.
    let flags = ca.write(dir.path(), "peer", ca.issue(&["damselfly-peer"]));
    let mut args = vec!["tracker", "--listen", "127.0.0.1:0"];
    args.extend(flags.iter().map(String::as_str));
    let err = failure(&damselfly(&dir, &args));
    assert!(
        err.contains(&format!(
            "--cluster-cert {}: no subjectAltName DNS:damselfly-tracker (has: damselfly-peer); \
             agents verify that name",
            dir.join("peer.crt").display()
        )),
        "{err}"
    );
    // No certificates at all: it serves TLS only.
    let err = failure(&damselfly(&dir, &["tracker", "--listen", "127.0.0.1:0"]));
    assert!(
        err.contains("damselfly tracker needs --cluster-ca, --cluster-cert and --cluster-key"),
        "{err}"
    );
}
