//! `damselfly ca …` as a user runs it: the built binary, a temporary state dir
//! and a temporary fake host root. The trust-store update and the runtime
//! restart are always overridden: these tests never touch the machine's /etc.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
};

use damselfly::{
    ca::NodeCa,
    origin::RegistryHosts,
    testing::{TempDir, stand_in_update_ca_certificates},
};

/// A host root that looks like Debian running containerd, with a stand-in
/// for update-ca-certificates that builds the bundle as the real one does
/// (`ca install` checks that the CA is in it).
fn debian_root() -> TempDir {
    let root = TempDir::new("ca");
    fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    fs::write(root.join("etc/debian_version"), "13.0\n").unwrap();
    fs::write(root.join("etc/systemd/system/containerd.service"), "").unwrap();
    let update = root.join(UPDATE);
    fs::create_dir_all(update.parent().unwrap()).unwrap();
    stand_in_update_ca_certificates(&root.0, &update);
    root
}

/// The stand-in update, inside the stand-in root.
const UPDATE: &str = "usr/local/sbin/update-ca-certificates";

const ANCHOR: &str = "usr/local/share/ca-certificates/damselfly-node-ca.crt";

/// `damselfly ca ARGS` with a clean DAMSELFLY_* environment, the update
/// command replaced by the stand-in of the `--host-root` in ARGS, every
/// runtime unit there reported active, and the restart command by `restart`.
fn ca(state: &Path, args: &[&str], restart: &str) -> Output {
    let update = args
        .iter()
        .position(|a| *a == "--host-root")
        .map(|i| Path::new(args[i + 1]).join(UPDATE).display().to_string())
        .unwrap_or_else(|| "true".into());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_damselfly"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DAMSELFLY_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("ca")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("DAMSELFLY_CA_UPDATE_COMMAND", update)
        .env("DAMSELFLY_CA_UNIT_ACTIVE_COMMAND", "true")
        .env("DAMSELFLY_CA_RESTART_COMMAND", restart)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

/// (inode, mtime) of each CA file: what a change would alter.
fn stamps(state: &Path) -> Vec<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    ["ca.crt", "ca.key", "constraints.txt"]
        .iter()
        .map(|f| {
            let m = fs::metadata(state.join("ca").join(f)).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        })
        .collect()
}

#[test]
fn show_prints_what_is_there_and_changes_nothing() {
    let state = TempDir::new("ca");
    let err = failed(ca(&state.0, &["show"], "false"));
    assert!(
        err.contains("no node CA") && err.contains("first start") && err.contains("ca rotate"),
        "{err}"
    );
    assert!(!state.join("ca").exists(), "show created something");

    ok(ca(&state.0, &["rotate"], "false"));
    let before = stamps(&state.0);
    let first = ok(ca(&state.0, &["show"], "false"));
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
    assert!(!first.contains("PRIVATE"));
    assert_eq!(ok(ca(&state.0, &["show"], "false")), first);
    let mode = fs::metadata(state.join("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Another registry list than the CA's: the same PEM, a warning, no change.
    let out = ca(
        &state.0,
        &["show", "--registry", "registry.dfly.test"],
        "false",
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out), first);
    assert!(
        err.contains("warning") && err.contains("registry.dfly.test") && err.contains("--registry"),
        "{err}"
    );
    assert!(!err.contains("re-created"), "{err}");
    assert_eq!(stamps(&state.0), before);
}

#[test]
fn install_is_idempotent_and_uninstall_removes_it() {
    let state = TempDir::new("ca");
    let root = debian_root();
    // The stand-in restart gets the unit as its last argument.
    let marker = root.join("restarted-containerd");
    let restart_script = root.join("restart");
    fs::write(
        &restart_script,
        format!("#!/bin/sh\ntouch {}/restarted-$1\n", root.0.display()),
    )
    .unwrap();
    fs::set_permissions(&restart_script, fs::Permissions::from_mode(0o755)).unwrap();
    let restart = restart_script.display().to_string();
    let host = ["--host-root", root.0.to_str().unwrap()];

    let out = ok(ca(
        &state.0,
        &[&["install", "--restart-runtime"][..], &host].concat(),
        &restart,
    ));
    assert!(out.contains("newly trusted"), "{out}");
    assert!(out.contains("restarted containerd"), "{out}");
    assert!(marker.exists(), "containerd restarted once: {out}");
    let pem = ok(ca(&state.0, &["show"], "false"));
    assert_eq!(fs::read_to_string(root.join(ANCHOR)).unwrap(), pem);

    fs::remove_file(&marker).unwrap();
    let out = ok(ca(
        &state.0,
        &[&["install", "--restart-runtime"][..], &host].concat(),
        &restart,
    ));
    assert!(out.contains("already trusted"), "{out}");
    assert!(!marker.exists(), "not restarted when already trusted");

    let out = ok(ca(&state.0, &[&["uninstall"][..], &host].concat(), "false"));
    assert!(out.contains("removed"), "{out}");
    assert!(!root.join(ANCHOR).exists());
    let out = ok(ca(&state.0, &[&["uninstall"][..], &host].concat(), "false"));
    assert!(out.contains("not installed"), "{out}");
}

#[test]
fn a_failed_restart_says_how_to_do_it_by_hand() {
    let state = TempDir::new("ca");
    let root = debian_root();
    let out = ca(
        &state.0,
        &[
            "install",
            "--restart-runtime",
            "--host-root",
            root.0.to_str().unwrap(),
        ],
        "false",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = failed(out);
    assert!(stdout.contains("newly trusted"), "{stdout}");
    assert!(
        err.contains("restart failed for containerd")
            && err.contains("systemctl restart containerd"),
        "{err}"
    );
}

#[test]
fn a_failed_update_is_an_error_and_leaves_nothing_behind() {
    let state = TempDir::new("ca");
    let root = debian_root();
    let out = Command::new(env!("CARGO_BIN_EXE_damselfly"))
        .args(["ca", "install", "--host-root"])
        .arg(&root.0)
        .arg("--state-dir")
        .arg(&state.0)
        .args(["--update-command", "false"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`false` failed"), "{err}");
    assert!(!root.join(ANCHOR).exists());
}

#[test]
fn unknown_distro_is_a_clear_error() {
    let state = TempDir::new("ca");
    let root = TempDir::new("ca");
    let out = ca(
        &state.0,
        &["install", "--host-root", root.0.to_str().unwrap()],
        "false",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no known trust store")
            && err.contains("etc/debian_version")
            && err.contains("update-ca-trust"),
        "{err}"
    );
    assert!(fs::read_dir(&root.0).unwrap().next().is_none());
}

#[test]
fn rotate_then_install_replaces_the_trusted_ca() {
    let state = TempDir::new("ca");
    let root = debian_root();
    let host = ["--host-root", root.0.to_str().unwrap()];
    ok(ca(&state.0, &[&["install"][..], &host].concat(), "false"));
    let old = fs::read_to_string(root.join(ANCHOR)).unwrap();

    let out = ok(ca(&state.0, &["rotate"], "false"));
    assert!(
        out.contains(&state.join("ca/ca.crt").display().to_string()),
        "{out}"
    );
    assert!(out.contains("install"), "{out}");
    assert!(out.contains("no restart"), "{out}");
    let new = ok(ca(&state.0, &["show"], "false"));
    assert_ne!(new, old);

    let out = ok(ca(&state.0, &[&["install"][..], &host].concat(), "false"));
    assert!(out.contains("replacing an older damselfly CA"), "{out}");
    assert_eq!(fs::read_to_string(root.join(ANCHOR)).unwrap(), new);
}

#[test]
fn registries_from_env_shape_the_constraints() {
    let state = TempDir::new("ca");
    let out = Command::new(env!("CARGO_BIN_EXE_damselfly"))
        .args(["ca", "rotate", "--state-dir"])
        .arg(&state.0)
        .env("DAMSELFLY_REGISTRY", "registry.dfly.test,*.corp.example")
        .output()
        .unwrap();
    ok(out);
    let constraints = fs::read_to_string(state.join("ca/constraints.txt")).unwrap();
    let lines: Vec<&str> = constraints.lines().collect();
    assert!(lines.contains(&"registry.dfly.test"), "{constraints}");
    assert!(lines.contains(&"corp.example"), "{constraints}");
    assert!(lines.contains(&"ghcr.io"), "{constraints}");
}

/// This test process plays the running agent: it holds the node CA the way
/// `damselfly agent` does.
#[test]
fn under_a_running_agent_install_and_rotate_keep_its_constraints() {
    let state = TempDir::new("ca");
    let root = debian_root();
    let host = ["--host-root", root.0.to_str().unwrap()];
    let agent = NodeCa::load_or_create(&state.0, &RegistryHosts::new(&[]).unwrap()).unwrap();
    let before = stamps(&state.0);

    let other = ["--registry", "registry.dfly.test"];
    let out = ca(
        &state.0,
        &[&["install"][..], &host, &other].concat(),
        "false",
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        err.contains("the running agent signs with") && err.contains("registry.dfly.test"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(root.join(ANCHOR)).unwrap(),
        agent.cert_pem()
    );
    assert_eq!(stamps(&state.0), before);

    let err = failed(ca(&state.0, &[&["rotate"][..], &other].concat(), "false"));
    assert!(
        err.contains("an agent signs with the node CA") && err.contains("--registry"),
        "{err}"
    );
    assert_eq!(stamps(&state.0), before);
    // Its own list rotates; the agent picks that up.
    ok(ca(&state.0, &["rotate"], "false"));
    assert_ne!(stamps(&state.0), before);
}

#[test]
fn install_puts_the_ca_in_certs_d_for_exact_hosts_and_uninstall_takes_it_out() {
    let state = TempDir::new("ca");
    let root = debian_root();
    let registries = ["--registry", "registry.dfly.test,*.corp.example"];
    let host = ["--host-root", root.0.to_str().unwrap()];
    let out = ok(ca(
        &state.0,
        &[&registries[..], &["install"], &host].concat(),
        "false",
    ));
    assert!(out.contains("node CA in certs.d"), "{out}");
    let pem = ok(ca(
        &state.0,
        &[&registries[..], &["show"]].concat(),
        "false",
    ));
    for dir in ["etc/docker/certs.d", "etc/containers/certs.d"] {
        for host in ["registry.dfly.test", "registry-1.docker.io", "ghcr.io"] {
            let file = root.join(dir).join(host).join("damselfly-node-ca.crt");
            assert_eq!(
                fs::read_to_string(&file).unwrap(),
                pem,
                "{}",
                file.display()
            );
        }
        let names: Vec<String> = fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.contains('*') || n.contains("corp.example")),
            "a wildcard has no certs.d directory: {names:?}"
        );
    }

    let out = ok(ca(&state.0, &[&["uninstall"][..], &host].concat(), "false"));
    assert!(out.contains("removed from certs.d"), "{out}");
    assert!(!root.join("etc/docker").exists());
    assert!(!root.join("etc/containers").exists());
    assert!(root.join("etc/debian_version").exists());
}
