//! Every check with a certificate made wrong on purpose (rcgen), and the
//! messages they give.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

use super::*;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        Self::with(name, |_| {})
    }

    fn with(name: &str, tweak: impl FnOnce(&mut CertificateParams)) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        tweak(&mut params);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A node certificate as the chart issues it, changed by `tweak`:
    /// (certificate PEM, key PEM).
    fn issue(&self, tweak: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(vec![PEER_SERVER_NAME.into(), "node-a".into()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "node-a");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(30);
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn check(ca: &str, cert: &str, key: &str) -> Result<ClusterPki, Problem> {
    check_at(ca, cert, key, UnixTime::now())
}

fn check_at(ca: &str, cert: &str, key: &str, now: UnixTime) -> Result<ClusterPki, Problem> {
    ClusterPki::from_pem(
        ca.as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        Role::Peer,
        now,
    )
}

/// The problem `tweak` causes in the node certificate.
fn cert_problem(tweak: impl FnOnce(&mut CertificateParams)) -> Problem {
    let ca = Ca::new("cluster");
    let (cert, key) = ca.issue(tweak);
    check(&ca.cert.pem(), &cert, &key).unwrap_err()
}

fn assert_problem(p: &Problem, part: Part, needles: &[&str]) {
    assert_eq!(p.part, part, "{p}");
    for n in needles {
        assert!(p.what.contains(n), "{n:?} not in: {p}");
    }
}

fn at(offset: Duration) -> UnixTime {
    let t = OffsetDateTime::now_utc() + offset;
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
}

#[test]
fn a_certificate_as_the_chart_issues_it_passes() {
    let ca = Ca::new("cluster");
    let (cert, key) = ca.issue(|_| {});
    let pki = check(&ca.cert.pem(), &cert, &key).unwrap();
    assert_eq!((pki.ca.len(), pki.chain.len()), (1, 1));
    // No keyUsage and no extendedKeyUsage at all is fine too (the testbed's certificates).
    let (cert, key) = ca.issue(|p| {
        p.key_usages.clear();
        p.extended_key_usages.clear();
    });
    check(&ca.cert.pem(), &cert, &key).unwrap();
}

#[test]
fn an_intermediate_after_the_node_certificate_chains_to_the_root() {
    let root = Ca::new("root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let intermediate = Ca {
        cert: params.signed_by(&key, &root.cert, &root.key).unwrap(),
        key,
    };
    let (cert, key) = intermediate.issue(|_| {});
    let chain = format!("{cert}{}", intermediate.cert.pem());
    check(&root.cert.pem(), &chain, &key).unwrap();
    // Without the intermediate, the root cannot vouch for it.
    let p = check(&root.cert.pem(), &cert, &key).unwrap_err();
    assert_problem(&p, Part::Cert, &["not issued by the cluster CA", "CN=root"]);
}

#[test]
fn no_peer_name_lists_the_names_it_has() {
    let p = cert_problem(|p| {
        p.subject_alt_names = vec![
            SanType::DnsName("foo".try_into().unwrap()),
            SanType::DnsName("bar".try_into().unwrap()),
            SanType::IpAddress("10.0.0.7".parse().unwrap()),
        ]
    });
    assert_problem(
        &p,
        Part::Cert,
        &[
            "no subjectAltName DNS:damselfly-peer (has: foo, bar, IP:10.0.0.7); the swarm's peers and the tracker verify that name",
        ],
    );
    let p = cert_problem(|p| p.subject_alt_names.clear());
    assert_problem(
        &p,
        Part::Cert,
        &[
            "no subjectAltName DNS:damselfly-peer",
            "no subjectAltName;",
            "CN=node-a",
        ],
    );
}

#[test]
fn key_and_extended_key_usage_must_allow_tls_both_ways() {
    let p = cert_problem(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]);
    assert_problem(&p, Part::Cert, &["extendedKeyUsage lacks clientAuth"]);
    let p = cert_problem(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]);
    assert_problem(
        &p,
        Part::Cert,
        &[
            "lacks serverAuth and clientAuth",
            "both a TLS server and a client",
        ],
    );
    let p = cert_problem(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]);
    assert_problem(&p, Part::Cert, &["lacks digitalSignature"]);
}

#[test]
fn a_ca_certificate_is_not_a_node_certificate() {
    let p = cert_problem(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert_problem(&p, Part::Cert, &["is a CA certificate"]);
}

#[test]
fn validity_is_checked_both_ways_for_certificate_and_ca() {
    let ca = Ca::with("cluster", |p| {
        p.not_after = OffsetDateTime::now_utc() + Duration::days(3)
    });
    let (cert, key) = ca.issue(|_| {});
    let ca = ca.cert.pem();
    check(&ca, &cert, &key).unwrap();

    // The node certificate lives 30 days, from an hour ago.
    let p = check_at(&ca, &cert, &key, at(-Duration::hours(2))).unwrap_err();
    assert_problem(&p, Part::Cert, &["CN=node-a is not valid before", "clock"]);
    // The CA outlives it by nothing here, so move the CA's end out of the way.
    let long = Ca::new("cluster");
    let (cert, key) = long.issue(|_| {});
    let p = check_at(&long.cert.pem(), &cert, &key, at(Duration::days(31))).unwrap_err();
    assert_problem(&p, Part::Cert, &["CN=node-a expired"]);

    let p = check_at(&ca, &cert, &key, at(Duration::days(4))).unwrap_err();
    assert_problem(&p, Part::Ca, &["CN=cluster expired"]);
}

#[test]
fn the_ca_must_be_a_ca_that_signs_certificates() {
    let ca = Ca::new("cluster");
    let (cert, key) = ca.issue(|_| {});
    // The node certificate given as the CA: the usual mix-up.
    let p = check(&cert, &cert, &key).unwrap_err();
    assert_problem(
        &p,
        Part::Ca,
        &[
            "CN=node-a is not a CA certificate",
            "looks like a node certificate",
        ],
    );

    let ca = Ca::with("cluster", |p| {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature]
    });
    let (cert, key) = ca.issue(|_| {});
    let p = check(&ca.cert.pem(), &cert, &key).unwrap_err();
    assert_problem(&p, Part::Ca, &["without keyCertSign"]);
}

#[test]
fn a_certificate_from_another_ca_is_named_with_both_issuers() {
    let ca = Ca::new("cluster");
    let (cert, key) = Ca::new("some other CA").issue(|_| {});
    let p = check(&ca.cert.pem(), &cert, &key).unwrap_err();
    assert_problem(
        &p,
        Part::Cert,
        &[
            "not issued by the cluster CA",
            "its issuer is CN=some other CA",
            "holds CN=cluster",
        ],
    );
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let ca = Ca::new("cluster");
    let (cert, _) = ca.issue(|_| {});
    let (_, other_key) = ca.issue(|_| {});
    let p = check(&ca.cert.pem(), &cert, &other_key).unwrap_err();
    assert_problem(
        &p,
        Part::Key,
        &["not the key of the certificate in --cluster-cert"],
    );
}

#[test]
fn unreadable_pem_names_the_part() {
    let ca = Ca::new("cluster");
    let (cert, key) = ca.issue(|_| {});
    let ca = ca.cert.pem();
    let p = check("", &cert, &key).unwrap_err();
    assert_problem(&p, Part::Ca, &["no CERTIFICATE block"]);
    let p = check(&ca, &key, &key).unwrap_err();
    assert_problem(&p, Part::Cert, &["no CERTIFICATE block"]);
    let p = check(&ca, &cert, &cert).unwrap_err();
    assert_problem(&p, Part::Key, &["not a PEM private key"]);
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let p = check(&ca, garbage, &key).unwrap_err();
    assert_problem(&p, Part::Cert, &["not X.509"]);
}

#[test]
fn files_are_named_in_the_message() {
    let dir = tempfile::Builder::new()
        .prefix("dfly-pki-")
        .tempdir()
        .unwrap();
    let dir = dir.path();
    let ca = Ca::new("cluster");
    let (cert, key) =
        ca.issue(|p| p.subject_alt_names = vec![SanType::DnsName("node-a".try_into().unwrap())]);
    let files = ClusterFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("node.crt"),
        key: dir.join("node.key"),
    };
    std::fs::write(&files.ca, ca.cert.pem()).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    let e = ClusterPki::load(&files, Role::Peer).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("--cluster-key {}: ", files.key.display())),
        "{e}"
    );
    std::fs::write(&files.key, key).unwrap();
    let e = ClusterPki::load(&files, Role::Peer)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "--cluster-cert {}: no subjectAltName DNS:damselfly-peer (has: node-a); the swarm's \
             peers and the tracker verify that name",
            files.cert.display()
        )
    );
}

#[test]
fn the_tracker_needs_its_own_name_and_server_auth_only() {
    let ca = Ca::new("cluster");
    let tracker = |tweak: fn(&mut CertificateParams)| {
        ca.issue(|p| {
            p.subject_alt_names = vec![SanType::DnsName(TRACKER_SERVER_NAME.try_into().unwrap())];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            tweak(p);
        })
    };
    let check_as = |role, (cert, key): (String, String)| {
        ClusterPki::from_pem(
            ca.cert.pem().as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            role,
            UnixTime::now(),
        )
    };
    check_as(Role::Tracker, tracker(|_| {})).unwrap();
    // Not a peer's: peers check damselfly-peer and want clientAuth.
    let p = check_as(Role::Peer, tracker(|_| {})).unwrap_err();
    assert_problem(&p, Part::Cert, &["no subjectAltName DNS:damselfly-peer"]);
    // And a peer's certificate is not the tracker's.
    let p = check_as(Role::Tracker, ca.issue(|_| {})).unwrap_err();
    assert_problem(
        &p,
        Part::Cert,
        &[
            "no subjectAltName DNS:damselfly-tracker (has: damselfly-peer, node-a)",
            "agents verify that name",
        ],
    );
    let p = check_as(
        Role::Tracker,
        tracker(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]),
    )
    .unwrap_err();
    assert_problem(
        &p,
        Part::Cert,
        &["lacks serverAuth", "the tracker is a TLS server"],
    );
}

#[test]
fn a_node_identity_is_what_the_certificate_names_beyond_the_shared_names() {
    let ca = Ca::new("cluster");
    let der = |names: &[&str]| {
        let (cert, key) = ca.issue(|p| {
            p.subject_alt_names = names
                .iter()
                .map(|n| SanType::DnsName((*n).try_into().unwrap()))
                .collect()
        });
        ClusterPki::parse(ca.cert.pem().as_bytes(), cert.as_bytes(), key.as_bytes())
            .unwrap()
            .chain
            .remove(0)
    };
    assert_eq!(node_identity(&der(&["damselfly-peer"])), None);
    assert_eq!(
        node_identity(&der(&["damselfly-peer", "node-b", "node-a.example"])),
        Some("node-a.example,node-b".into())
    );
    assert_eq!(
        node_identity(&der(&["DAMSELFLY-PEER", "damselfly-tracker"])),
        None
    );
}
