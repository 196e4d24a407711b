//! Server and client over loopback, with a throwaway cluster CA.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinSet;

use super::*;
use crate::{
    pki::{ClusterFiles, ClusterPki, Role},
    vocab::RateLimiter,
};

/// Checks a piece from a peer against the sha256 it should have.
fn verify_piece(data: &[u8], sha256: &[u8; 32]) -> Result<(), PeerError> {
    if Sha256::digest(data)[..] == sha256[..] {
        Ok(())
    } else {
        Err(PeerError::Mismatch)
    }
}

pub(crate) const PS: u64 = 64 * 1024;

use crate::testing::TempDir;

pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A peer certificate as the chart issues them: SAN `damselfly-peer`
    /// plus the node name, usable as server and client.
    fn peer(&self, node: &str) -> (String, String) {
        self.issue(&[PEER_SERVER_NAME, node])
    }

    /// A certificate for these SANs, usable as server and client.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Trusts this CA and holds a certificate issued by `issuer` (unchecked:
    /// some tests need one from another CA, for peers to refuse).
    pub(crate) fn tls(&self, issuer: &Ca, node: &str) -> PeerTls {
        self.tls_with(issuer.peer(node))
    }

    /// Trusts this CA and holds `(cert, key)`, unchecked.
    fn tls_with(&self, (cert, key): (String, String)) -> PeerTls {
        let pki =
            ClusterPki::parse(self.pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
        PeerTls::new(&pki).unwrap()
    }

    fn der(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }
}

pub(crate) fn blob(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

pub(crate) fn piece(data: &[u8], i: u64) -> &[u8] {
    let s = (i * PS) as usize;
    &data[s..(s + PS as usize).min(data.len())]
}

pub(crate) fn pieces(data: &[u8]) -> u64 {
    (data.len() as u64).div_ceil(PS)
}

/// A store in its own temp dir holding `data` as a complete blob.
struct Fixture {
    store: Store,
    digest: Digest,
    data: Vec<u8>,
    _dir: TempDir,
}

fn fixture(len: usize) -> Fixture {
    let dir = TempDir::new("peer");
    let store = Store::open(&dir.0, 1 << 30, PS).unwrap();
    let data = blob(len, 7);
    let digest = Digest::of(&data);
    let mut w = store.begin(&digest, data.len() as u64).unwrap();
    for i in w.missing_pieces() {
        w.write_piece(i, piece(&data, i)).unwrap();
    }
    w.commit().unwrap();
    Fixture {
        store,
        digest,
        data,
        _dir: dir,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn counter() -> (Arc<AtomicU64>, BytesHook) {
    let n = Arc::new(AtomicU64::new(0));
    let hook: BytesHook = {
        let n = n.clone();
        Arc::new(move |b| {
            n.fetch_add(b, Ordering::Relaxed);
        })
    };
    (n, hook)
}

pub(crate) fn server(
    tls: &PeerTls,
    source: Arc<dyn PieceSource>,
    f: impl FnOnce(&mut ServerConfig),
) -> PeerServer {
    let mut cfg = ServerConfig::new(loopback());
    cfg.corrupt_uploads = false;
    f(&mut cfg);
    PeerServer::bind(tls, source, cfg).unwrap()
}

pub(crate) fn client(tls: &PeerTls) -> PeerClient {
    let mut cfg = ClientConfig::new(loopback());
    cfg.request_timeout = Duration::from_secs(5);
    PeerClient::new(tls, cfg).unwrap()
}

/// Fetches every piece of `fx` at once; returns the bytes in order.
async fn fetch_all(c: &Arc<PeerClient>, addr: SocketAddr, fx: &Fixture) -> Vec<u8> {
    let mut set = JoinSet::new();
    for i in 0..pieces(&fx.data) {
        let (c, d) = (c.clone(), fx.digest);
        let len = piece(&fx.data, i).len() as u64;
        set.spawn(async move { (i, c.fetch_piece(addr, &d, i, len).await) });
    }
    let mut got = vec![Bytes::new(); pieces(&fx.data) as usize];
    while let Some(r) = set.join_next().await {
        let (i, bytes) = r.unwrap();
        let bytes = bytes.unwrap_or_else(|e| panic!("piece {i}: {e}"));
        let sum: [u8; 32] = Sha256::digest(piece(&fx.data, i)).into();
        verify_piece(&bytes, &sum).unwrap();
        got[i as usize] = bytes;
    }
    got.concat()
}

#[tokio::test]
async fn every_piece_concurrently_over_one_connection() {
    let ca = Ca::new("cluster");
    let fx = fixture(17 * PS as usize + 1000);
    let (out, out_hook) = counter();
    let srv = server(&ca.tls(&ca, "node-a"), Arc::new(fx.store.clone()), |c| {
        c.bytes_out = Some(out_hook);
        c.max_uploads = 32;
        c.max_uploads_per_peer = 32;
    });
    let (inn, in_hook) = counter();
    let mut cfg = ClientConfig::new(loopback());
    cfg.bytes_in = Some(in_hook);
    let c = Arc::new(PeerClient::new(&ca.tls(&ca, "node-b"), cfg).unwrap());

    assert_eq!(fetch_all(&c, srv.local_addr(), &fx).await, fx.data);
    assert_eq!(c.peers_connected(), 1);
    assert_eq!(srv.peers_connected(), 1, "one connection for all streams");
    assert_eq!(out.load(Ordering::Relaxed), fx.data.len() as u64);
    assert_eq!(inn.load(Ordering::Relaxed), fx.data.len() as u64);

    // A second round reuses it.
    assert_eq!(fetch_all(&c, srv.local_addr(), &fx).await, fx.data);
    assert_eq!(srv.peers_connected(), 1);
}

#[tokio::test]
async fn closed_connections_are_dialled_again() {
    let ca = Ca::new("cluster");
    let fx = fixture(2 * PS as usize);
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |_| {});
    let c = client(&ca.tls(&ca, "b"));
    let addr = srv.local_addr();
    let p0 = piece(&fx.data, 0);
    assert_eq!(c.fetch_piece(addr, &fx.digest, 0, PS).await.unwrap(), p0);
    let recent = Duration::from_secs(600);
    c.disconnect(addr);
    assert_eq!(c.peers_connected(), 0);
    assert_eq!(
        c.counts(recent).known,
        0,
        "a disconnected peer is forgotten"
    );
    assert_eq!(c.fetch_piece(addr, &fx.digest, 0, PS).await.unwrap(), p0);
    assert_eq!(c.peers_connected(), 1);

    // The peer restarts on the same address.
    srv.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.peers_connected(), 0);
    // Still known and recently seen, no longer connected.
    let counts = c.counts(recent);
    assert_eq!(
        (counts.known, counts.seen_recently, counts.connected),
        (1, 1, 0)
    );
    assert_eq!(c.counts(Duration::ZERO).seen_recently, 0);
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |cfg| {
        cfg.listen = addr
    });
    assert_eq!(
        c.fetch_piece(addr, &fx.digest, 1, PS).await.unwrap(),
        piece(&fx.data, 1)
    );
    assert_eq!(srv.peers_connected(), 1);
}

#[tokio::test]
async fn unauthenticated_peers_get_nothing() {
    let ca = Ca::new("cluster");
    let other = Ca::new("elsewhere");
    let fx = fixture(PS as usize);
    let (out, out_hook) = counter();
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.bytes_out = Some(out_hook)
    });
    let addr = srv.local_addr();

    let anonymous = client(&PeerTls::roots_only(&ca.der()).unwrap());
    let e = anonymous.fetch_piece(addr, &fx.digest, 0, PS).await;
    assert!(e.is_err(), "no client certificate: {e:?}");

    // Trusts the cluster CA, but its own certificate is from another.
    let foreign = client(&ca.tls(&other, "intruder"));
    let e = foreign.fetch_piece(addr, &fx.digest, 0, PS).await;
    assert!(e.is_err(), "foreign certificate: {e:?}");

    // And the other way round: a server the client's CA did not certify.
    let fake = server(
        &other.tls(&other, "fake"),
        Arc::new(fx.store.clone()),
        |_| {},
    );
    let c = client(&ca.tls(&ca, "b"));
    let e = c.fetch_piece(fake.local_addr(), &fx.digest, 0, PS).await;
    assert!(matches!(e, Err(PeerError::Connection(_))), "{e:?}");

    assert_eq!(out.load(Ordering::Relaxed), 0);
    assert_eq!(srv.peers_connected(), 0);
}

/// The cluster CA signs more than peers (the tracker's certificate, SAN
/// `damselfly-tracker`): only a certificate that names `damselfly-peer` is a
/// peer, on either side of the handshake.
#[tokio::test]
async fn a_cluster_certificate_without_the_peer_name_is_refused_both_ways() {
    let ca = Ca::new("cluster");
    let fx = fixture(PS as usize);
    let (out, out_hook) = counter();
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.bytes_out = Some(out_hook)
    });
    let not_a_peer = || ca.tls_with(ca.issue(&["damselfly-tracker", "node-x"]));

    let c = client(&not_a_peer());
    let e = c.fetch_piece(srv.local_addr(), &fx.digest, 0, PS).await;
    assert!(
        e.is_err(),
        "a client without the peer name was served {:?} bytes",
        e.map(|b| b.len())
    );
    assert_eq!(out.load(Ordering::Relaxed), 0);

    let fake = server(&not_a_peer(), Arc::new(fx.store.clone()), |_| {});
    let c = client(&ca.tls(&ca, "b"));
    let e = c.fetch_piece(fake.local_addr(), &fx.digest, 0, PS).await;
    assert!(matches!(e, Err(PeerError::Connection(_))), "{e:?}");

    // The same CA with the name: served.
    let c = client(&ca.tls(&ca, "c"));
    assert_eq!(
        c.fetch_piece(srv.local_addr(), &fx.digest, 0, PS)
            .await
            .unwrap(),
        fx.data
    );
}

/// A peer that opens streams, asks for pieces and never reads: its writes
/// stall, time out and reset, so the only upload slot and the memory are
/// free again within seconds, and a peer that reads is served, while the
/// stalling connection itself stays up (keep-alives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_does_not_pin_slots_or_memory() {
    const STREAMS: u64 = 12;
    const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
    let ca = Ca::new("cluster");
    let fx = fixture(STREAMS as usize * PS as usize);
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.max_upload_peers = Some(1);
        c.write_timeout = WRITE_TIMEOUT;
    });
    let addr = srv.local_addr();

    // Its QUIC stack takes 1 KiB per stream and nothing more until the
    // application reads, which it never does.
    let mut t = super::transport(IDLE_TIMEOUT, KEEP_ALIVE, 0);
    t.stream_receive_window(quinn::VarInt::from_u32(1024));
    let config = ca.tls(&ca, "stalling").client_config(Arc::new(t)).unwrap();
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(addr, PEER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let req = wire::Request {
            digest: fx.digest,
            index: i,
        };
        send.write_all(&req.encode()).await.unwrap();
        send.finish().unwrap();
        streams.push((send, recv));
    }
    let t0 = Instant::now();
    while srv.pieces_in_memory() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.peers_serving(), 1);
    assert_eq!(
        srv.pieces_in_memory(),
        2,
        "one connection holds at most max_uploads_per_peer pieces; the rest were answered busy"
    );

    // A peer that reads: busy while the stalling one holds the only slot,
    // then served.
    let good = client(&ca.tls(&ca, "good"));
    let t0 = Instant::now();
    let got = loop {
        match good.fetch_piece(addr, &fx.digest, 0, PS).await {
            Ok(b) => break b,
            Err(PeerError::Busy) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            t0.elapsed() < 3 * WRITE_TIMEOUT + Duration::from_secs(2),
            "still busy after {:?}: slots {} pieces in memory {}",
            t0.elapsed(),
            srv.peers_serving(),
            srv.pieces_in_memory()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("served after {:?}", t0.elapsed());
    assert_eq!(got, piece(&fx.data, 0));
    // The stalled requests are reset: everything comes back.
    let t0 = Instant::now();
    while srv.pieces_in_memory() > 0 || srv.peers_serving() > 0 {
        assert!(
            t0.elapsed() < 3 * WRITE_TIMEOUT + Duration::from_secs(2),
            "slots {} pieces in memory {}",
            srv.peers_serving(),
            srv.pieces_in_memory()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(conn.close_reason().is_none(), "the connection itself stays");
    drop(streams);
    endpoint.close(0u32.into(), b"done");
}

#[tokio::test]
async fn unknown_digest_or_piece_is_not_found() {
    let ca = Ca::new("cluster");
    let fx = fixture(PS as usize);
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |_| {});
    let c = client(&ca.tls(&ca, "b"));
    let addr = srv.local_addr();
    let e = c.fetch_piece(addr, &Digest::of(b"nope"), 0, PS).await;
    assert!(
        matches!(e, Err(PeerError::NotFound { index: 0, .. })),
        "{e:?}"
    );
    let e = c.fetch_piece(addr, &fx.digest, 1, PS).await;
    assert!(
        matches!(e, Err(PeerError::NotFound { index: 1, .. })),
        "{e:?}"
    );
    // A wrong expected length is caught before the body is read.
    let e = c.fetch_piece(addr, &fx.digest, 0, PS - 1).await;
    assert!(matches!(e, Err(PeerError::Length { .. })), "{e:?}");
    // The connection survives all of that.
    assert_eq!(
        c.fetch_piece(addr, &fx.digest, 0, PS).await.unwrap(),
        fx.data
    );
    assert_eq!(srv.peers_connected(), 1);
}

#[tokio::test]
async fn corrupt_uploads_switch_flips_bytes() {
    let ca = Ca::new("cluster");
    let fx = fixture(PS as usize + 10);
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.corrupt_uploads = true
    });
    let c = client(&ca.tls(&ca, "b"));
    for i in 0..2 {
        let want = piece(&fx.data, i);
        let got = c
            .fetch_piece(srv.local_addr(), &fx.digest, i, want.len() as u64)
            .await
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert_ne!(&got[..], want);
        let sum: [u8; 32] = Sha256::digest(want).into();
        assert!(matches!(verify_piece(&got, &sum), Err(PeerError::Mismatch)));
    }
}

/// Holds every request inside the source until opened, counting arrivals.
struct Gated {
    store: Store,
    open: Mutex<bool>,
    cv: Condvar,
    entered: AtomicUsize,
}

impl Gated {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl PieceSource for Gated {
    fn piece(&self, digest: &Digest, index: u64) -> Option<Result<Bytes, StoreError>> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let guard = self.open.lock().unwrap();
        drop(self.cv.wait_while(guard, |open| !*open).unwrap());
        self.store.piece(digest, index)
    }
}

/// Opens the gate on drop, so a failing test does not leave blocking
/// threads that the runtime would wait for forever.
struct OpenOnDrop(Arc<Gated>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A server whose source holds every request until opened, three clients,
/// and the first two clients' requests for piece 0 held inside the source.
struct TwoHeld {
    fx: Fixture,
    gated: Arc<Gated>,
    _open: OpenOnDrop,
    srv: PeerServer,
    addr: SocketAddr,
    peers: Vec<Arc<PeerClient>>,
    held: JoinSet<Result<Bytes, PeerError>>,
}

async fn two_held(pieces: u64, configure: impl FnOnce(&mut ServerConfig)) -> TwoHeld {
    let ca = Ca::new("cluster");
    let fx = fixture((pieces * PS) as usize);
    let gated = Arc::new(Gated {
        store: fx.store.clone(),
        open: Mutex::new(false),
        cv: Condvar::new(),
        entered: AtomicUsize::new(0),
    });
    let srv = server(&ca.tls(&ca, "a"), gated.clone(), configure);
    let addr = srv.local_addr();
    let peers: Vec<_> = (0..3)
        .map(|n| Arc::new(client(&ca.tls(&ca, &format!("peer-{n}")))))
        .collect();
    let mut held = JoinSet::new();
    for p in &peers[..2] {
        let (p, d) = (p.clone(), fx.digest);
        held.spawn(async move { p.fetch_piece(addr, &d, 0, PS).await });
    }
    let start = Instant::now();
    while gated.entered.load(Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    TwoHeld {
        fx,
        _open: OpenOnDrop(gated.clone()),
        gated,
        srv,
        addr,
        peers,
        held,
    }
}

impl TwoHeld {
    /// Lets the held requests through; they get piece 0.
    async fn release(&mut self) {
        self.gated.open();
        while let Some(r) = self.held.join_next().await {
            assert_eq!(r.unwrap().unwrap(), piece(&self.fx.data, 0));
        }
    }

    /// Waits until `busy` is false, at most 2 s.
    async fn until(&self, what: &str, busy: impl Fn(&PeerServer) -> bool) {
        let t0 = Instant::now();
        while busy(&self.srv) {
            assert!(t0.elapsed() < Duration::from_secs(2), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn a_third_peer_is_refused_while_two_are_served() {
    let mut t = two_held(1, |c| c.max_upload_peers = Some(2)).await;
    assert_eq!(t.srv.peers_serving(), 2);
    let e = t.peers[2].fetch_piece(t.addr, &t.fx.digest, 0, PS).await;
    assert!(matches!(e, Err(PeerError::Busy)), "{e:?}");

    t.release().await;
    // A slot is held until the peer has acknowledged the last byte.
    t.until("slots never freed", |s| s.peers_serving() > 0)
        .await;
    assert_eq!(
        t.peers[2]
            .fetch_piece(t.addr, &t.fx.digest, 0, PS)
            .await
            .unwrap(),
        t.fx.data
    );
}

/// Past `max_uploads_per_peer` for one peer, or `max_uploads` in all, a
/// request is answered busy at once (not queued), and served once an upload
/// ends.
#[tokio::test]
async fn requests_past_the_upload_limits_are_answered_busy_at_once() {
    let mut t = two_held(2, |c| {
        c.max_uploads = 2;
        c.max_uploads_per_peer = 1;
    })
    .await;
    assert_eq!(t.srv.pieces_in_memory(), 2);
    let quick = Duration::from_secs(2);
    let (addr, digest) = (t.addr, t.fx.digest);
    let again = tokio::time::timeout(quick, t.peers[0].fetch_piece(addr, &digest, 1, PS)).await;
    assert!(
        matches!(again, Ok(Err(PeerError::Busy))),
        "per peer: {again:?}"
    );
    let third = tokio::time::timeout(quick, t.peers[2].fetch_piece(addr, &digest, 1, PS)).await;
    assert!(
        matches!(third, Ok(Err(PeerError::Busy))),
        "in all: {third:?}"
    );

    t.release().await;
    t.until("uploads never ended", |s| s.pieces_in_memory() > 0)
        .await;
    assert_eq!(
        t.peers[2].fetch_piece(addr, &digest, 1, PS).await.unwrap(),
        piece(&t.fx.data, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rate_limit_bounds_throughput() {
    let rate = 2 * 1024 * 1024;
    let ca = Ca::new("cluster");
    let fx = fixture(48 * PS as usize); // 3 MiB: about 1.4 s at 2 MiB/s
    let limiter = Arc::new(RateLimiter::new(rate));
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.rate = Some(limiter);
        c.max_uploads = 48;
        c.max_uploads_per_peer = 48;
    });
    let c = Arc::new(client(&ca.tls(&ca, "b")));
    let start = Instant::now();
    assert_eq!(fetch_all(&c, srv.local_addr(), &fx).await, fx.data);
    let secs = start.elapsed().as_secs_f64();
    // The bucket starts full: its burst goes out at once.
    let burst = (rate / 10) as f64;
    let measured = (fx.data.len() as f64 - burst) / secs;
    let err = (measured - rate as f64).abs() / rate as f64;
    assert!(
        err < 0.25,
        "{measured:.0} B/s over {secs:.2} s, limit {rate}"
    );
}

/// The Helm chart's default PKI comes from Helm's `genCA`/`genSignedCert`:
/// RSA-2048 keys in PKCS#1 PEM, SAN `damselfly-peer`, server and client
/// auth. Made here the same way with the openssl CLI, they must pass the
/// startup check and carry a real handshake and a piece.
#[tokio::test]
async fn rsa_pkcs1_certificates_like_helms_work_for_peers() {
    let dir = TempDir::new("rsa");
    let d = &dir.0;
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl (apt package openssl) is needed for this test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=damselfly-ca",
        // genCA's key usages; `req -x509` adds basicConstraints CA:TRUE itself.
        "-addext",
        "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:damselfly-peer\nextendedKeyUsage=serverAuth,clientAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    for node in ["a", "b"] {
        let (key, csr, crt) = (
            format!("{node}.p8"),
            format!("{node}.csr"),
            format!("{node}.crt"),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=damselfly-peer",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        // genSignedCert writes "BEGIN RSA PRIVATE KEY" (PKCS#1).
        openssl(&[
            "rsa",
            "-in",
            &key,
            "-traditional",
            "-out",
            &format!("{node}.key"),
        ]);
    }
    let pkcs1 = std::fs::read_to_string(d.join("a.key")).unwrap();
    assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let tls = |node: &str| {
        let pki = ClusterPki::load(
            &ClusterFiles {
                ca: d.join("ca.crt"),
                cert: d.join(format!("{node}.crt")),
                key: d.join(format!("{node}.key")),
            },
            Role::Peer,
        )
        .unwrap_or_else(|e| panic!("node {node}: {e}"));
        PeerTls::new(&pki).unwrap()
    };
    let fx = fixture(2 * PS as usize + 10);
    let srv = server(&tls("a"), Arc::new(fx.store.clone()), |_| {});
    let c = client(&tls("b"));
    let got = c
        .fetch_piece(srv.local_addr(), &fx.digest, 1, PS)
        .await
        .unwrap();
    assert_eq!(got, piece(&fx.data, 1));
}

/// The next have for `l`'s blob within 2 s, if any.
async fn next_have(l: &mut HaveListener) -> Option<(SocketAddr, u64)> {
    tokio::time::timeout(Duration::from_secs(2), l.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn peers_that_asked_for_a_blob_hear_of_each_piece_stored_after() {
    let ca = Ca::new("cluster");
    let fx = fixture(4 * PS as usize);
    let (sent, sent_hook) = counter();
    let haves = Arc::new(Haves::new(Some(sent_hook)));
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.haves = haves.clone();
    });
    let addr = srv.local_addr();
    // This node fetches the blob (as far as the server's haves know).
    haves.start(fx.digest, 4, 1, false);
    let (asker, quiet) = (client(&ca.tls(&ca, "b")), client(&ca.tls(&ca, "c")));
    let (mut heard, mut unheard) = (asker.listen(fx.digest), quiet.listen(fx.digest));
    asker.fetch_piece(addr, &fx.digest, 0, PS).await.unwrap();
    // `quiet` is connected too, but asked for another blob.
    let other = Digest::of(b"other");
    let e = quiet.fetch_piece(addr, &other, 0, PS).await;
    assert!(matches!(e, Err(PeerError::NotFound { .. })), "{e:?}");

    haves.held(&fx.digest, 2);
    assert_eq!(next_have(&mut heard).await, Some((addr, 2)));
    assert_eq!(sent.load(Ordering::Relaxed), 1);
    assert_eq!(next_have(&mut unheard).await, None, "never asked for it");

    // A later listener for the blob replaces this one; dropping the old one
    // leaves it in place.
    let newer = asker.listen(fx.digest);
    drop(std::mem::replace(&mut heard, newer));
    haves.held(&fx.digest, 1);
    assert_eq!(next_have(&mut heard).await, Some((addr, 1)));

    // Over: no more haves for it, and none for a blob nobody fetches.
    haves.end(&fx.digest);
    haves.held(&fx.digest, 3);
    haves.held(&other, 0);
    assert_eq!(next_have(&mut heard).await, None);
}

#[tokio::test]
async fn a_node_fetching_from_the_origin_sends_each_held_piece_once_before_any_twice() {
    let ca = Ca::new("cluster");
    let fx = fixture(3 * PS as usize);
    let haves = Arc::new(Haves::default());
    let srv = server(&ca.tls(&ca, "a"), Arc::new(fx.store.clone()), |c| {
        c.haves = haves.clone();
    });
    let addr = srv.local_addr();
    haves.start(fx.digest, 3, 0, true);
    haves.held(&fx.digest, 0);
    haves.held(&fx.digest, 1);
    let (b, c) = (client(&ca.tls(&ca, "b")), client(&ca.tls(&ca, "c")));
    let d = fx.digest;
    assert_eq!(
        b.fetch_piece(addr, &d, 0, PS).await.unwrap(),
        piece(&fx.data, 0)
    );
    let e = c.fetch_piece(addr, &d, 0, PS).await;
    assert!(
        matches!(e, Err(PeerError::Busy)),
        "piece 1 went to nobody: {e:?}"
    );
    assert_eq!(
        c.fetch_piece(addr, &d, 1, PS).await.unwrap(),
        piece(&fx.data, 1)
    );
    // Every held piece went out once: copies again.
    assert_eq!(
        c.fetch_piece(addr, &d, 0, PS).await.unwrap(),
        piece(&fx.data, 0)
    );
    // Fetched: no longer seeding.
    haves.end(&fx.digest);
    assert!(b.fetch_piece(addr, &d, 1, PS).await.is_ok());
    assert!(c.fetch_piece(addr, &d, 1, PS).await.is_ok());
}
