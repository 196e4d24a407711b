use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use ::time::{Duration, OffsetDateTime};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier as _},
    pki_types::{ServerName, UnixTime},
    server::ResolvesServerCert,
};
use x509_parser::{extensions::GeneralName, parse_x509_certificate};

use super::{leaf::Clock, *};

use crate::testing::TempDir as StateDir;

fn registries(extra: &[&str]) -> RegistryHosts {
    RegistryHosts::new(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &NodeCa) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    Arc::new(roots)
}

/// A TLS handshake in memory: a client trusting only `ca` against a server
/// whose certificates come from `resolver`.
fn handshake(
    ca: &NodeCa,
    resolver: Arc<dyn ResolvesServerCert>,
    sni: &str,
) -> Result<(), rustls::Error> {
    let client_cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    let server_cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut client = ClientConnection::new(Arc::new(client_cfg), name)?;
    let mut server = ServerConnection::new(Arc::new(server_cfg))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        server.read_tls(&mut &buf[..]).unwrap();
        let server_result = server.process_new_packets();
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        client.read_tls(&mut &buf[..]).unwrap();
        client.process_new_packets()?;
        server_result?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn created_once_then_reused_with_a_private_key_file() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let first = NodeCa::load_or_create(&dir.0, &r).unwrap();
    assert_eq!(first.origin(), &CaOrigin::Created);
    let second = NodeCa::load_or_create(&dir.0, &r).unwrap();
    assert_eq!(second.origin(), &CaOrigin::Loaded);
    assert_eq!(first.cert_pem(), second.cert_pem());
    assert_eq!(first.cert_path(), dir.0.join("ca/ca.crt"));
    assert_eq!(
        fs::read_to_string(dir.0.join("ca/ca.crt")).unwrap(),
        first.cert_pem()
    );

    let mode = |p: &str| fs::metadata(dir.0.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("ca/ca.key"), 0o600);
    assert_eq!(mode("ca"), 0o700);
    assert_eq!(mode("ca/ca.crt"), 0o644);
    // Nothing about the key leaks through Debug.
    assert!(!format!("{first:?}").contains("PRIVATE"));

    // A loosened key is tightened again, not rejected.
    fs::set_permissions(dir.0.join("ca/ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let third = NodeCa::load_or_create(&dir.0, &r).unwrap();
    assert_eq!(third.origin(), &CaOrigin::Loaded);
    assert_eq!(mode("ca/ca.key"), 0o600);

    // A leaf minted by a reloaded CA chains to the certificate created first.
    handshake(&first, Arc::new(third.resolver()), "ghcr.io").unwrap();
}

#[test]
fn certificate_carries_the_constraints_and_ca_extensions() {
    let dir = StateDir::new("ca");
    let ca = NodeCa::load_or_create(&dir.0, &registries(&["registry.dfly.test"])).unwrap();
    let (_, cert) = parse_x509_certificate(ca.cert_der()).unwrap();

    let nc = cert.name_constraints().unwrap().expect("name constraints");
    assert!(nc.critical);
    let permitted: Vec<&str> = nc
        .value
        .permitted_subtrees
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| match s.base {
            GeneralName::DNSName(d) => d,
            ref other => panic!("unexpected permitted subtree {other:?}"),
        })
        .collect();
    assert_eq!(
        permitted,
        [
            "amazonaws.com",
            "azurecr.io",
            "docker.io",
            "gcr.io",
            "ghcr.io",
            "mcr.microsoft.com",
            "nvcr.io",
            "pkg.dev",
            "public.ecr.aws",
            "quay.io",
            "registry.dfly.test",
            "registry.k8s.io",
        ]
    );
    assert_eq!(ca.permitted_subtrees(), permitted);
    let excluded = nc.value.excluded_subtrees.as_ref().unwrap();
    assert_eq!(excluded.len(), 2);
    assert!(
        excluded
            .iter()
            .all(|s| matches!(s.base, GeneralName::IPAddress(ip) if ip.iter().all(|b| *b == 0)))
    );

    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
        / (365 * 86400);
    assert!(years >= 9, "{years}");
    assert_eq!(
        der::not_after(ca.cert_der()).unwrap().unix_timestamp(),
        cert.validity().not_after.timestamp()
    );
    assert!(cert.subject().to_string().contains("CN=Damselfly node CA "));
}

#[test]
fn leaves_verify_for_registries_only() {
    let dir = StateDir::new("ca");
    let ca = NodeCa::load_or_create(&dir.0, &registries(&["registry.dfly.test"])).unwrap();
    let resolver = Arc::new(ca.resolver());
    for host in ["ghcr.io", "registry.dfly.test", "us.gcr.io", "GHCR.IO"] {
        handshake(&ca, resolver.clone(), host).unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    assert_eq!(resolver.cached(), 3, "ghcr.io and GHCR.IO share a leaf");
    for host in ["example.com", "a.b.gcr.io", "gcr.io.evil.com"] {
        assert!(handshake(&ca, resolver.clone(), host).is_err(), "{host}");
        assert!(resolver.leaf_for(host).is_none(), "{host}");
    }

    let leaf = resolver.leaf_for("ghcr.io").unwrap();
    assert_eq!(leaf.cert.len(), 2);
    assert_eq!(&leaf.cert[1], ca.cert_der());
    let (_, cert) = parse_x509_certificate(&leaf.cert[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(matches!(
        san.general_names[..],
        [GeneralName::DNSName("ghcr.io")]
    ));
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(
        lifetime,
        (Duration::hours(24) + Duration::minutes(5)).whole_seconds()
    );
}

/// The resolver refuses other names, but the CA key itself cannot vouch for
/// them either: webpki rejects a leaf the CA signed for a name (or an IP
/// address) outside its constraints, on a chain that is otherwise valid.
#[test]
fn webpki_enforces_the_name_constraints() {
    let dir = StateDir::new("ca");
    let ca = NodeCa::load_or_create(&dir.0, &registries(&[])).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
        .build()
        .unwrap();
    let verify = |name: &str| {
        let leaf = ca.mint_unchecked(name);
        verifier.verify_server_cert(
            &leaf.cert[0],
            &leaf.cert[1..],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
    };
    verify("ghcr.io").unwrap();
    verify("europe-docker.pkg.dev").unwrap();
    for outside in ["example.com", "ghcr.io.example.com", "10.0.0.1", "::1"] {
        let e = verify(outside).expect_err(outside);
        assert!(
            format!("{e:?}").contains("NameConstraint"),
            "{outside}: {e:?}"
        );
    }
}

#[test]
fn leaves_are_cached_and_renewed_before_expiry() {
    let dir = StateDir::new("ca");
    let ca = NodeCa::load_or_create(&dir.0, &registries(&[])).unwrap();
    let base = OffsetDateTime::now_utc();
    let offset = Arc::new(AtomicI64::new(0));
    let clock_offset = offset.clone();
    let resolver = ca.resolver_with(LeafPolicy {
        lifetime: Duration::hours(24),
        max_cached: 2,
        clock: Arc::new(move || base + Duration::seconds(clock_offset.load(Ordering::Relaxed))),
        ..LeafPolicy::default()
    });
    let at = |hours: i64| offset.store(hours * 3600, Ordering::Relaxed);

    let first = resolver.leaf_for("ghcr.io").unwrap();
    at(15);
    let cached = resolver.leaf_for("ghcr.io").unwrap();
    assert!(Arc::ptr_eq(&first, &cached), "9h left of 24h: still served");
    at(17);
    let renewed = resolver.leaf_for("ghcr.io").unwrap();
    assert!(!Arc::ptr_eq(&first, &renewed), "7h left: re-minted");
    let (_, cert) = parse_x509_certificate(&renewed.cert[0]).unwrap();
    assert_eq!(
        cert.validity().not_after.timestamp(),
        (base + Duration::hours(17 + 24)).unix_timestamp()
    );
    at(18);
    assert!(Arc::ptr_eq(
        &renewed,
        &resolver.leaf_for("ghcr.io").unwrap()
    ));

    // The cache is bounded.
    resolver.leaf_for("quay.io").unwrap();
    resolver.leaf_for("nvcr.io").unwrap();
    assert_eq!(resolver.cached(), 2);
}

#[test]
fn a_changed_registry_list_or_torn_files_replace_the_ca() {
    let dir = StateDir::new("ca");
    let defaults = registries(&[]);
    let first = NodeCa::load_or_create(&dir.0, &defaults).unwrap();

    let wider = registries(&["registry.dfly.test"]);
    let second = NodeCa::load_or_create(&dir.0, &wider).unwrap();
    assert!(matches!(second.origin(), CaOrigin::Replaced(why) if why.contains("registry list")));
    assert_ne!(first.cert_pem(), second.cert_pem());
    let stored = fs::read_to_string(dir.0.join("ca/constraints.txt")).unwrap();
    assert!(
        stored.lines().any(|l| l == "registry.dfly.test"),
        "{stored}"
    );
    // An extra registry that its parent already covers changes nothing.
    let covered = registries(&["registry.dfly.test", "mirror.gcr.io"]);
    let third = NodeCa::load_or_create(&dir.0, &covered).unwrap();
    assert_eq!(third.origin(), &CaOrigin::Loaded);
    assert_eq!(third.cert_pem(), second.cert_pem());

    // A key that does not belong to the certificate (a torn rotation).
    let other = StateDir::new("ca");
    NodeCa::load_or_create(&other.0, &wider).unwrap();
    fs::copy(other.0.join("ca/ca.key"), dir.0.join("ca/ca.key")).unwrap();
    let fourth = NodeCa::load_or_create(&dir.0, &wider).unwrap();
    assert!(matches!(fourth.origin(), CaOrigin::Replaced(why) if why.contains("do not match")));

    fs::remove_file(dir.0.join("ca/constraints.txt")).unwrap();
    let fifth = NodeCa::load_or_create(&dir.0, &wider).unwrap();
    assert!(matches!(fifth.origin(), CaOrigin::Replaced(_)));
    assert_eq!(
        NodeCa::load_or_create(&dir.0, &wider).unwrap().cert_pem(),
        fifth.cert_pem()
    );
}

#[test]
fn rotate_replaces_key_and_certificate() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let old = NodeCa::load_or_create(&dir.0, &r).unwrap();
    let old_key = fs::read(dir.0.join("ca/ca.key")).unwrap();
    let new = NodeCa::rotate(&dir.0, &r).unwrap();
    assert_ne!(old.cert_pem(), new.cert_pem());
    assert_ne!(old_key, fs::read(dir.0.join("ca/ca.key")).unwrap());
    let reloaded = NodeCa::load_or_create(&dir.0, &r).unwrap();
    assert_eq!(reloaded.origin(), &CaOrigin::Loaded);
    assert_eq!(reloaded.cert_pem(), new.cert_pem());
    // The old CA no longer vouches for the new leaves.
    assert!(handshake(&old, Arc::new(reloaded.resolver()), "ghcr.io").is_err());
    handshake(&new, Arc::new(reloaded.resolver()), "ghcr.io").unwrap();
    // No temporary files are left behind.
    let names: Vec<String> = fs::read_dir(dir.0.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
}

#[test]
fn unconstrainable_patterns_are_refused() {
    let dir = StateDir::new("ca");
    let e = NodeCa::load_or_create(&dir.0, &registries(&["registry.*"])).unwrap_err();
    assert!(matches!(e, CaError::Unconstrainable(_)), "{e}");
    assert!(!dir.0.join("ca/ca.key").exists());
}

#[test]
fn a_ca_close_to_expiry_is_replaced() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let permitted = permitted_dns_subtrees(r.patterns()).unwrap();
    let files = CaFiles::new(&dir.0);
    fs::create_dir_all(&files.dir).unwrap();
    let short = create_valid_for(&files, &permitted, Duration::days(10)).unwrap();
    let ca = NodeCa::load_or_create(&dir.0, &r).unwrap();
    assert!(
        matches!(ca.origin(), CaOrigin::Replaced(why) if why.contains("expires")),
        "{:?}",
        ca.origin()
    );
    assert_ne!(ca.cert_pem(), short.pem);
    assert_eq!(
        NodeCa::load_or_create(&dir.0, &r).unwrap().origin(),
        &CaOrigin::Loaded
    );
}

/// A clock that starts now and moves when told to (seconds).
fn manual_clock() -> (Clock, impl Fn(i64)) {
    let base = OffsetDateTime::now_utc();
    let offset = Arc::new(AtomicI64::new(0));
    let read = offset.clone();
    let clock: Clock = Arc::new(move || base + Duration::seconds(read.load(Ordering::Relaxed)));
    (clock, move |secs| offset.store(secs, Ordering::Relaxed))
}

#[test]
fn a_rotation_on_disk_reaches_the_running_resolver() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let old = NodeCa::load_or_create(&dir.0, &r).unwrap();
    let (clock, at) = manual_clock();
    let resolver = Arc::new(old.resolver_with(LeafPolicy {
        clock,
        ..LeafPolicy::default()
    }));
    let first = resolver.leaf_for("ghcr.io").unwrap();
    assert_eq!(&first.cert[1], old.cert_der());
    resolver.leaf_for("quay.io").unwrap();

    let new = NodeCa::rotate(&dir.0, &r).unwrap();
    at(1);
    assert!(
        Arc::ptr_eq(&first, &resolver.leaf_for("ghcr.io").unwrap()),
        "the files are looked at every 2 s, not on every handshake"
    );
    at(3);
    let leaf = resolver.leaf_for("ghcr.io").unwrap();
    assert_eq!(&leaf.cert[1], new.cert_der());
    assert_eq!(resolver.cached(), 1, "leaves of the old CA are dropped");
    handshake(&new, resolver.clone(), "ghcr.io").unwrap();
    assert!(handshake(&old, resolver.clone(), "ghcr.io").is_err());
}

#[test]
fn an_unusable_replacement_keeps_the_old_ca_signing() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let ca = NodeCa::load_or_create(&dir.0, &r).unwrap();
    let resolver = Arc::new(ca.resolver_with(LeafPolicy {
        recheck: Duration::ZERO,
        ..LeafPolicy::default()
    }));
    let first = resolver.leaf_for("ghcr.io").unwrap();

    // Someone writes a certificate that does not belong to the key.
    let other = StateDir::new("ca");
    let stranger = NodeCa::load_or_create(&other.0, &r).unwrap();
    fs::write(dir.0.join("ca/ca.crt"), stranger.cert_pem()).unwrap();
    assert!(Arc::ptr_eq(&first, &resolver.leaf_for("ghcr.io").unwrap()));
    handshake(&ca, resolver.clone(), "quay.io").unwrap();

    // A proper rotation after it is picked up.
    let new = NodeCa::rotate(&dir.0, &r).unwrap();
    handshake(&new, resolver.clone(), "ghcr.io").unwrap();
}

#[test]
fn while_an_agent_signs_its_constraints_stay() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let wider = registries(&["registry.dfly.test"]);
    let agent = NodeCa::load_or_create(&dir.0, &r).unwrap();
    let e = NodeCa::rotate(&dir.0, &wider).unwrap_err();
    assert!(matches!(e, CaError::InUse { .. }), "{e}");
    assert!(
        e.to_string().contains("registry.dfly.test") && e.to_string().contains("--registry"),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(dir.0.join("ca/ca.crt")).unwrap(),
        agent.cert_pem()
    );
    // The same list rotates: the agent can switch to that.
    let rotated = NodeCa::rotate(&dir.0, &r).unwrap();

    // The resolver holds the lease as long as it lives, not the NodeCa.
    let resolver = agent.resolver();
    drop(agent);
    assert!(NodeCa::rotate(&dir.0, &wider).is_err());
    // `install` takes the CA the agent signs with, whatever the list says.
    let ForInstall::InUse(stored) = NodeCa::for_install(&dir.0, &wider).unwrap() else {
        panic!("an agent signs with it")
    };
    assert_eq!(stored.cert_pem, rotated.cert_pem());
    assert_eq!(stored.permitted, rotated.permitted_subtrees());
    assert_eq!(stored.problem, None);

    drop(resolver);
    let replaced = NodeCa::rotate(&dir.0, &wider).unwrap();
    assert!(
        replaced
            .permitted_subtrees()
            .contains(&"registry.dfly.test".to_string())
    );
}

#[test]
fn install_without_an_agent_prepares_what_the_agent_will_load() {
    let dir = StateDir::new("ca");
    let r = registries(&[]);
    let ForInstall::Prepared(created) = NodeCa::for_install(&dir.0, &r).unwrap() else {
        panic!("no agent")
    };
    assert_eq!(created.origin(), &CaOrigin::Created);
    let wider = registries(&["registry.dfly.test"]);
    let ForInstall::Prepared(replaced) = NodeCa::for_install(&dir.0, &wider).unwrap() else {
        panic!("no agent")
    };
    assert!(matches!(replaced.origin(), CaOrigin::Replaced(why) if why.contains("registry list")));
    drop((created, replaced));
    let agent = NodeCa::load_or_create(&dir.0, &wider).unwrap();
    assert_eq!(agent.origin(), &CaOrigin::Loaded);
}

#[test]
fn stored_reads_without_changing_anything() {
    let dir = StateDir::new("ca");
    let e = NodeCa::stored(&dir.0).unwrap_err();
    assert!(matches!(e, CaError::NoCa(_)), "{e}");
    assert!(
        e.to_string().contains("first start") && e.to_string().contains("rotate"),
        "{e}"
    );
    assert!(!dir.0.join("ca").exists(), "nothing created");

    let ca = NodeCa::load_or_create(&dir.0, &registries(&["registry.dfly.test"])).unwrap();
    let key = dir.0.join("ca/ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let files = CaFiles::new(&dir.0);
    let before = files.stamp();
    let stored = NodeCa::stored(&dir.0).unwrap();
    assert_eq!(stored.cert_pem, ca.cert_pem());
    assert_eq!(stored.cert_path, dir.0.join("ca/ca.crt"));
    assert_eq!(stored.permitted, ca.permitted_subtrees());
    assert_eq!(stored.problem, None);
    assert_eq!(files.stamp(), before);
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "not even the key mode is touched");

    // A torn set is shown as it is, with what is wrong with it.
    let other = StateDir::new("ca");
    NodeCa::load_or_create(&other.0, &registries(&[])).unwrap();
    fs::copy(other.0.join("ca/ca.key"), &key).unwrap();
    let before = files.stamp();
    let stored = NodeCa::stored(&dir.0).unwrap();
    assert_eq!(stored.cert_pem, ca.cert_pem());
    assert!(
        stored
            .problem
            .as_deref()
            .unwrap_or("")
            .contains("do not match"),
        "{:?}",
        stored.problem
    );
    assert_eq!(files.stamp(), before);
}
