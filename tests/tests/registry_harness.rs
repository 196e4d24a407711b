//! The registry harness itself, with no Damselfly agent anywhere: a TLS
//! origin (docker-registry) in node 2, images built offline and pushed with
//! skopeo, and a stock containerd in node 1 pulling through ctr and CRI.

use std::{fs, path::Path, time::Duration};

use damselfly_testbed::{Containerd, Image, Origin, Testbed, pki::TestCa, tools};

const REGISTRY: &str = "registry.dfly.test";
const MB2: u64 = 2 * 1024 * 1024;
const SETTLE: Duration = Duration::from_secs(5);

struct Bed {
    // Fields drop in order: processes first, the testbed (and its dir) last.
    containerd: Containerd,
    image: Image,
    origin: Origin,
    tb: Testbed,
}

/// Node 1: containerd trusting the test CA. Node 2: the origin (with
/// `auth` when given) holding a 3 x 2 MiB image `REGISTRY/demo/app:v1`.
fn bed(auth: Option<(&str, &str)>) -> Bed {
    let tb = Testbed::new(2).expect("testbed");
    let ca = TestCa::new("dfly test public CA").unwrap();
    let origin = Origin::start(&tb, 2, REGISTRY, &ca, auth).expect("origin");
    let image =
        Image::build_and_push(&tb, &origin, "demo/app", "v1", &[MB2, MB2, MB2], 1).expect("image");
    let containerd = Containerd::start(&tb, tb.node(1), &origin.ca_pem).expect("containerd");
    Bed {
        containerd,
        image,
        origin,
        tb,
    }
}

#[test]
fn ctr_pulls_from_the_tls_origin_and_the_origin_counts_the_blob_bytes() {
    let b = bed(None);
    assert_eq!(b.origin.blob_bytes_sent(), 0, "pushing sends no blobs");
    let link0 = b.origin.link_bytes().unwrap();
    b.containerd
        .ctr_pull(&b.image.reference, None)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", b.containerd.log_text()));
    assert!(b.containerd.has_image(&b.image.reference).unwrap());
    let content = b.containerd.content().unwrap();
    for d in b.image.blob_digests() {
        assert!(content.contains(&d), "{d} not in the content store");
    }
    let sent = b.origin.wait_blob_bytes(b.image.total_blob_bytes, SETTLE);
    assert!(
        sent >= b.image.layer_bytes(),
        "origin sent {sent} blob bytes, image layers are {}",
        b.image.layer_bytes()
    );
    assert!(b.origin.blob_gets() >= 4, "{:?}", b.origin.requests());
    let link = b.origin.link_bytes().unwrap() - link0;
    assert!(link >= b.image.layer_bytes(), "origin link sent {link}");
}

#[test]
fn cri_pull_image_is_served_by_the_daemon() {
    let b = bed(None);
    let id = b
        .containerd
        .cri_pull(&b.image.reference, None)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", b.containerd.log_text()));
    assert_eq!(id, b.image.config_digest, "CRI returns the image id");
    assert!(b.containerd.has_image(&b.image.reference).unwrap());
    let sent = b.origin.wait_blob_bytes(b.image.total_blob_bytes, SETTLE);
    assert!(sent >= b.image.layer_bytes(), "origin sent {sent}");
    // The pull came from containerd in node 1.
    assert!(
        b.containerd.log_text().contains("PullImage"),
        "{}",
        b.containerd.log_text()
    );
}

#[test]
fn removing_an_image_makes_the_next_pull_download_it_again() {
    let b = bed(None);
    let r = &b.image.reference;
    b.containerd.cri_pull(r, None).unwrap();
    let first = b.origin.wait_blob_bytes(b.image.total_blob_bytes, SETTLE);
    assert!(first >= b.image.layer_bytes());

    b.containerd.remove_image(r).unwrap();
    assert!(!b.containerd.has_image(r).unwrap());
    assert!(
        b.containerd.images().unwrap().is_empty(),
        "CRI's extra names are gone too: {:?}",
        b.containerd.images().unwrap()
    );
    b.containerd.cri_pull(r, None).unwrap();
    let second = b
        .origin
        .wait_blob_bytes(first + b.image.total_blob_bytes, SETTLE);
    assert!(
        second - first >= b.image.layer_bytes(),
        "second CRI pull fetched {} blob bytes",
        second - first
    );

    // And the same through ctr.
    b.containerd.remove_image(r).unwrap();
    b.containerd.ctr_pull(r, None).unwrap();
    let third = b
        .origin
        .wait_blob_bytes(second + b.image.total_blob_bytes, SETTLE);
    assert!(
        third - second >= b.image.layer_bytes(),
        "ctr pull after removal fetched {} blob bytes",
        third - second
    );

    // Without removal, a pull downloads nothing new.
    b.containerd.ctr_pull(r, None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.origin.blob_bytes_sent() - third < b.image.layer_bytes());
}

#[test]
fn a_private_origin_serves_only_the_right_credentials() {
    let b = bed(Some(("alice", "s3cret")));
    assert_eq!(b.origin.get_status("/v2/").unwrap(), 401);
    let r = &b.image.reference;

    // Refused for the right reason (401), not for TLS or a name problem.
    let refused = |what: &str, res: anyhow::Result<()>| {
        let e = format!("{:#}", res.expect_err(&format!("{what} succeeded")));
        eprintln!("{what}: {e}");
        assert!(e.contains("401 Unauthorized"), "{what}: {e}");
    };
    refused("pull without credentials", b.containerd.ctr_pull(r, None));
    refused(
        "pull with a wrong password",
        b.containerd.ctr_pull(r, Some(("alice", "wrong"))),
    );
    refused(
        "CRI pull with a wrong user",
        b.containerd
            .cri_pull(r, Some(("mallory", "s3cret")))
            .map(drop),
    );
    refused(
        "CRI pull without credentials",
        b.containerd.cri_pull(r, None).map(drop),
    );
    assert!(!b.containerd.has_image(r).unwrap());
    assert_eq!(b.origin.blob_bytes_sent(), 0, "no blob left the origin");

    b.containerd
        .ctr_pull(r, b.origin.creds())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", b.containerd.log_text()));
    assert!(b.containerd.has_image(r).unwrap());
    b.containerd.remove_image(r).unwrap();
    let id = b.containerd.cri_pull(r, b.origin.creds()).unwrap();
    assert_eq!(id, b.image.config_digest);
    let sent = b.origin.wait_blob_bytes(2 * b.image.layer_bytes(), SETTLE);
    assert!(sent >= 2 * b.image.layer_bytes(), "origin sent {sent}");
}

#[test]
fn skopeo_copies_from_the_origin_inside_a_node() {
    let b = bed(None);
    let out = b.tb.dir.join("copied");
    let scratch = b.tb.dir.join("skopeo");
    let mut cmd = tools::skopeo(b.tb.node(1), &scratch).unwrap();
    // Trust via SSL_CERT_FILE only (no --src-cert-dir).
    let empty = b.tb.dir.join("no-certs");
    fs::create_dir_all(&empty).unwrap();
    tools::isolate_env(&mut cmd, &b.origin.ca_pem, &empty);
    cmd.args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("docker://{}", b.image.reference))
        .arg(format!("dir:{}", out.display()));
    tools::run(&mut cmd).unwrap();
    for (d, size) in &b.image.layers {
        let f = out.join(&d[7..]);
        assert_eq!(fs::metadata(&f).unwrap().len(), *size, "{}", f.display());
    }
    let manifest = fs::read(out.join("manifest.json")).unwrap();
    let digest = format!(
        "sha256:{}",
        damselfly_testbed::body::hex(&<sha2::Sha256 as sha2::Digest>::digest(&manifest))
    );
    assert_eq!(
        digest, b.image.manifest_digest,
        "the push kept our manifest"
    );
    assert!(b.origin.wait_blob_bytes(b.image.layer_bytes(), SETTLE) >= b.image.layer_bytes());

    // The test CA is needed: with the machine's roots only, the copy fails.
    let mut cmd = tools::skopeo(b.tb.node(1), &scratch).unwrap();
    tools::isolate_env(&mut cmd, Path::new("/dev/null"), &empty);
    cmd.args(["--insecure-policy", "inspect", "--raw"])
        .arg(format!("docker://{}", b.image.reference));
    assert!(tools::run(&mut cmd).is_err());
}

#[test]
fn a_bed_with_registry_and_containerd_leaves_nothing_behind() {
    let (tag, dir, pids) = {
        let b = bed(None);
        b.containerd.ctr_pull(&b.image.reference, None).unwrap();
        let pids = [b.containerd.proc.pid(), b.origin.proc.pid()];
        (b.tb.tag.clone(), b.tb.dir.clone(), pids)
    };
    for pid in pids {
        // Reaped by Proc's drop: not even a zombie is left.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
    }
    assert!(!dir.exists(), "{} left", dir.display());
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&tag));
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&tag), "mounts left:\n{mounts}");
    let cgroups = damselfly_testbed::testbed::cgroup2_root().unwrap();
    assert!(
        fs::read_dir(cgroups).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(&tag))
    );
}
