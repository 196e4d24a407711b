//! The built binary's errors for `agent --seed`, `get` and `preheat` that
//! need no network (the testbed's e2e tests cover the rest).

use std::process::{Command, Output};

use damselfly::testing::TempDir;

fn damselfly(home: &TempDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_damselfly"))
        .args(args)
        .env("HOME", home.path())
        .env_remove("RUST_BACKTRACE")
        .env_remove("DAMSELFLY_CREDS")
        .env_remove("DAMSELFLY_AGENT")
        .env_remove("DAMSELFLY_SEED_ADMIN")
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
