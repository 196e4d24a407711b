//! The IO side against a real directory, with 1 KiB pieces to stay fast.

use super::*;

const PS: u64 = 1024;

/// A `dfly-` temporary directory, removed when dropped.
struct TempDir(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    fn new(label: &str) -> Self {
        let t = tempfile::Builder::new()
            .prefix(&format!("dfly-{label}-"))
            .tempdir()
            .expect("a temporary directory");
        Self(t.path().to_path_buf(), t)
    }
}

fn blob(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn piece(data: &[u8], i: u64) -> &[u8] {
    let s = (i * PS) as usize;
    &data[s..(s + PS as usize).min(data.len())]
}

fn read_all(r: &BlobReader, start: u64, end: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    for chunk in r.read_range(start, end)? {
        let chunk = chunk?;
        assert!(chunk.len() as u64 <= PS, "at most one piece per chunk");
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Writes and commits `data` as a complete blob.
fn put(store: &Store, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    let mut w = store.begin(&d, data.len() as u64).unwrap();
    for i in w.missing_pieces() {
        w.write_piece(i, piece(data, i)).unwrap();
    }
    w.commit().unwrap();
    d
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send_sync::<BlobReader>();
    send::<BlobWriter>();
    send::<Chunks>();
}

#[test]
fn pieces_out_of_order_then_commit_and_read() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(5 * 1024 + 300, 1);
    let d = Digest::of(&data);
    let mut w = store.begin(&d, data.len() as u64).unwrap();
    assert_eq!(w.pieces(), 6);
    assert_eq!(w.missing_pieces(), vec![0, 1, 2, 3, 4, 5]);
    for i in [3, 0, 5, 1, 4, 2] {
        w.write_piece(i, piece(&data, i)).unwrap();
        assert!(w.has_piece(i));
    }
    assert!(w.missing_pieces().is_empty());
    assert_eq!(&w.read_piece(5).unwrap()[..], piece(&data, 5));
    assert!(store.get(&d).is_none(), "not served before commit");
    let r = w.commit().unwrap();
    assert_eq!(read_all(&r, 0, r.size()).unwrap(), data);
    assert_eq!(
        read_all(&r, 1000, 3000).unwrap(),
        &data[1000..3000],
        "a range across pieces"
    );
    assert!(read_all(&r, 7, 7).unwrap().is_empty());
    assert!(matches!(
        r.read_range(0, r.size() + 1),
        Err(StoreError::OutOfRange { .. })
    ));
    drop(r);

    assert!(dir.0.join("blobs").join(d.hex()).is_file());
    assert!(
        dir.0
            .join("blobs")
            .join(format!("{}.meta", d.hex()))
            .is_file()
    );
    assert!(
        !dir.0
            .join("blobs")
            .join(format!("{}.part", d.hex()))
            .exists()
    );
    assert_eq!(store.used_bytes(), data.len() as u64);
    assert!(matches!(
        store.begin(&d, data.len() as u64),
        Err(StoreError::AlreadyComplete(_))
    ));

    // A complete blob survives a restart.
    drop(store);
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    assert_eq!(store.used_bytes(), data.len() as u64);
    let r = store.get(&d).unwrap();
    assert_eq!(read_all(&r, 0, r.size()).unwrap(), data);
}

#[test]
fn bad_pieces_are_refused() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(1500, 2);
    let mut w = store.begin(&Digest::of(&data), 1500).unwrap();
    assert!(matches!(
        w.write_piece(2, &data[..1]),
        Err(StoreError::NoSuchPiece { .. })
    ));
    assert!(matches!(
        w.write_piece(1, &data[..1000]),
        Err(StoreError::PieceLength { expected: 476, .. })
    ));
    assert!(matches!(
        w.read_piece(0),
        Err(StoreError::MissingPiece { .. })
    ));
    w.write_piece(0, &data[..1024]).unwrap();
    assert!(matches!(
        w.commit(),
        Err(StoreError::Incomplete { missing: 1, .. })
    ));
}

#[test]
fn resumes_after_a_restart() {
    let dir = TempDir::new("store");
    let data = blob(4 * 1024 + 10, 3);
    let d = Digest::of(&data);
    {
        let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
        let mut w = store.begin(&d, data.len() as u64).unwrap();
        w.write_piece(0, piece(&data, 0)).unwrap();
        w.write_piece(2, piece(&data, 2)).unwrap();
        assert!(matches!(
            store.begin(&d, data.len() as u64),
            Err(StoreError::Busy(_))
        ));
        // The agent is killed here: nothing is committed or cleaned up.
    }
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    assert_eq!(
        store.used_bytes(),
        data.len() as u64,
        "partial keeps its reservation"
    );
    assert!(store.get(&d).is_none());
    let mut w = store.begin(&d, data.len() as u64).unwrap();
    assert!(w.has_piece(0) && w.has_piece(2));
    assert_eq!(w.missing_pieces(), vec![1, 3, 4]);
    assert_eq!(&w.read_piece(2).unwrap()[..], piece(&data, 2));
    w.write_piece(4, piece(&data, 4)).unwrap();
    // Dropped again within the run: the next writer resumes too.
    drop(w);
    let mut w = store.begin(&d, data.len() as u64).unwrap();
    assert_eq!(w.missing_pieces(), vec![1, 3]);
    for i in w.missing_pieces() {
        w.write_piece(i, piece(&data, i)).unwrap();
    }
    let r = w.commit().unwrap();
    assert_eq!(read_all(&r, 0, r.size()).unwrap(), data);
}

#[test]
fn a_partial_of_another_size_restarts() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(3000, 4);
    let d = Digest::of(&data);
    let mut w = store.begin(&d, 5000).unwrap();
    w.write_piece(0, &blob(1024, 9)).unwrap();
    drop(w);
    let w = store.begin(&d, 3000).unwrap();
    assert_eq!(w.missing_pieces(), vec![0, 1, 2]);
    assert_eq!(store.used_bytes(), 3000);
}

#[test]
fn usage_counts_complete_and_partial_blobs() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let empty = Usage {
        capacity: 1 << 20,
        used_bytes: 0,
        blobs: 0,
        partial: 0,
    };
    assert_eq!(store.usage(), empty);
    let (a, b) = (blob(3000, 5), blob(2000, 6));
    let mut w = store.begin(&Digest::of(&a), 3000).unwrap();
    for i in 0..3 {
        w.write_piece(i, piece(&a, i)).unwrap();
    }
    drop(w.commit().unwrap());
    let mut w = store.begin(&Digest::of(&b), 2000).unwrap();
    w.write_piece(0, piece(&b, 0)).unwrap();
    drop(w);
    assert_eq!(
        store.usage(),
        Usage {
            used_bytes: 5000,
            blobs: 1,
            partial: 1,
            ..empty
        }
    );
}

#[test]
fn a_corrupted_piece_is_detected_on_read() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(4 * 1024, 5);
    let d = put(&store, &data);

    let path = dir.0.join("blobs").join(d.hex());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 2 * PS + 17).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 2 * PS + 17).unwrap();
    drop(f);

    let r = store.get(&d).unwrap();
    let mut chunks = r.read_range(0, r.size()).unwrap();
    assert_eq!(&chunks.next().unwrap().unwrap()[..], piece(&data, 0));
    assert_eq!(&chunks.next().unwrap().unwrap()[..], piece(&data, 1));
    assert!(matches!(
        chunks.next(),
        Some(Err(StoreError::Corrupt { piece: 2, .. }))
    ));
    assert!(
        chunks.next().is_none(),
        "the stream ends at the first error"
    );
    // A range that avoids the bad piece still reads.
    assert_eq!(read_all(&r, 3 * PS, 4 * PS).unwrap(), piece(&data, 3));
    assert!(matches!(
        read_all(&r, 2 * PS + 100, 2 * PS + 101),
        Err(StoreError::Corrupt { piece: 2, .. })
    ));

    // The caller removes it while still holding the reader.
    store.remove(&d).unwrap();
    assert!(store.get(&d).is_none());
    assert!(!path.exists());
    assert_eq!(store.used_bytes(), 0);
    // And may refetch at once; the old reader's pin does not leak onto the new blob.
    let w = store.begin(&d, data.len() as u64).unwrap();
    drop(r);
    drop(w);
    let w = store.begin(&d, data.len() as u64).unwrap();
    drop(w);
}

#[test]
fn a_wrong_digest_is_never_served() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(2500, 6);
    let claimed = Digest::of(b"something else");
    let mut w = store.begin(&claimed, data.len() as u64).unwrap();
    for i in w.missing_pieces() {
        w.write_piece(i, piece(&data, i)).unwrap();
    }
    match w.commit() {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, Digest::of(&data));
        }
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
    assert!(store.get(&claimed).is_none());
    assert_eq!(store.used_bytes(), 0);
    assert_eq!(
        fs::read_dir(dir.0.join("blobs")).unwrap().count(),
        0,
        "data discarded"
    );
    // A fresh start, not a resume of the bad pieces.
    let w = store.begin(&claimed, data.len() as u64).unwrap();
    assert_eq!(w.missing_pieces().len(), 3);
}

#[test]
fn a_piece_changed_on_disk_before_commit_is_caught() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(2048, 7);
    let d = Digest::of(&data);
    let mut w = store.begin(&d, 2048).unwrap();
    w.write_piece(0, piece(&data, 0)).unwrap();
    w.write_piece(1, piece(&data, 1)).unwrap();
    let part = dir.0.join("blobs").join(format!("{}.part", d.hex()));
    let f = OpenOptions::new().write(true).open(&part).unwrap();
    f.write_all_at(b"x", 5).unwrap();
    assert!(matches!(
        w.read_piece(0),
        Err(StoreError::Corrupt { piece: 0, .. })
    ));
    assert!(matches!(
        w.commit(),
        Err(StoreError::Corrupt { piece: 0, .. })
    ));
    assert!(store.get(&d).is_none());
    assert!(!part.exists());
}

#[test]
fn eviction_spares_pinned_blobs() {
    let dir = TempDir::new("store");
    // 10 KiB: evict above 9.5 KiB down to 8.5 KiB.
    let store = Store::open(&dir.0, 10 * 1024, PS).unwrap();
    let a = blob(4096, 10);
    let b = blob(4096, 11);
    let c = blob(4096, 12);
    let da = put(&store, &a);
    let reading_a = store.get(&da).unwrap();
    let db = put(&store, &b);
    drop(store.get(&db).unwrap());
    // LRU order is now a (pinned by a reader), then b.
    let dc = Digest::of(&c);
    let mut wc = store.begin(&dc, 4096).unwrap();
    assert!(store.get(&db).is_none(), "b made room");
    assert!(!dir.0.join("blobs").join(db.hex()).exists());
    assert_eq!(read_all(&reading_a, 0, 4096).unwrap(), a, "a was spared");
    assert_eq!(store.used_bytes(), 8192);

    // a is read, c is being written: nothing can go.
    let d = blob(4096, 13);
    let dd = Digest::of(&d);
    assert!(matches!(
        store.begin(&dd, 4096),
        Err(StoreError::NoSpace(_))
    ));
    assert_eq!(store.used_bytes(), 8192, "a refusal changes nothing");

    drop(reading_a);
    assert!(
        store.get(&da).is_some(),
        "below high: unpinning evicts nothing"
    );
    for i in wc.missing_pieces() {
        wc.write_piece(i, piece(&c, i)).unwrap();
    }
    drop(wc.commit().unwrap());
    // a is now the least recently used unpinned blob.
    let wd = store.begin(&dd, 4096).unwrap();
    assert!(store.get(&da).is_none());
    assert!(store.get(&dc).is_some());
    drop(wd);
}

#[test]
fn begin_fails_cleanly_when_a_blob_cannot_fit() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 4096, PS).unwrap();
    let big = Digest::of(b"big");
    assert!(matches!(
        store.begin(&big, 4097),
        Err(StoreError::NoSpace(_))
    ));
    assert_eq!(store.used_bytes(), 0);
    assert_eq!(fs::read_dir(dir.0.join("blobs")).unwrap().count(), 0);
    drop(store.begin(&big, 4096).unwrap());
}

#[test]
fn open_cleans_up_garbage_and_evicts_over_capacity() {
    let dir = TempDir::new("store");
    let (x, y) = (blob(3000, 20), blob(3000, 21));
    let (dx, dy) = {
        let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
        (put(&store, &x), put(&store, &y))
    };
    // Make x the older one on disk.
    let old = SystemTime::now() - std::time::Duration::from_secs(3600);
    File::options()
        .write(true)
        .open(dir.0.join("blobs").join(dx.hex()))
        .unwrap()
        .set_modified(old)
        .unwrap();

    let stray = Digest::of(b"stray");
    let lonely = Digest::of(b"lonely");
    let b = dir.0.join("blobs");
    fs::write(b.join(format!("{}.meta.tmp", stray.hex())), b"half").unwrap();
    fs::write(b.join(format!("{}.part", stray.hex())), b"no meta").unwrap();
    fs::write(b.join(format!("{}.meta", lonely.hex())), b"no data").unwrap();
    fs::write(b.join("README"), b"not ours").unwrap();

    // 5 KiB holds only one of the two 3000-byte blobs: the older goes.
    let store = Store::open(&dir.0, 5 * 1024, PS).unwrap();
    let mut names: Vec<String> = fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expect = vec!["README".to_string(), dy.hex(), format!("{}.meta", dy.hex())];
    expect.sort();
    assert_eq!(names, expect);
    assert!(store.get(&dx).is_none());
    assert_eq!(store.used_bytes(), 3000);
}

#[test]
fn a_partial_with_another_piece_size_is_dropped_at_open() {
    let dir = TempDir::new("store");
    let data = blob(3000, 30);
    let d = Digest::of(&data);
    {
        let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
        let mut w = store.begin(&d, 3000).unwrap();
        w.write_piece(0, piece(&data, 0)).unwrap();
    }
    let store = Store::open(&dir.0, 1 << 20, 2 * PS).unwrap();
    assert_eq!(store.used_bytes(), 0);
    assert_eq!(fs::read_dir(dir.0.join("blobs")).unwrap().count(), 0);
}

#[test]
fn empty_blob() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1024, PS).unwrap();
    let d = Digest::of(b"");
    let w = store.begin(&d, 0).unwrap();
    assert!(w.missing_pieces().is_empty());
    let r = w.commit().unwrap();
    assert_eq!(r.size(), 0);
    assert!(read_all(&r, 0, 0).unwrap().is_empty());
    drop(r);
    drop(store);
    let store = Store::open(&dir.0, 1024, PS).unwrap();
    assert!(store.get(&d).is_some());
}

#[test]
fn zero_piece_size_is_refused() {
    let dir = TempDir::new("store");
    assert!(matches!(
        Store::open(&dir.0, 1024, 0),
        Err(StoreError::PieceSizeZero)
    ));
}

#[test]
fn a_full_disk_is_no_space() {
    let p = Path::new("/x");
    for errno in [libc::ENOSPC, libc::EDQUOT] {
        let e = io_err(p)(io::Error::from_raw_os_error(errno));
        assert!(matches!(e, StoreError::NoSpace(_)), "{e}");
    }
    let e = io_err(p)(io::Error::from_raw_os_error(libc::EIO));
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
}

#[test]
fn pieces_of_a_blob_being_written_are_served_verified() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(3 * 1024 + 10, 7);
    let d = Digest::of(&data);
    assert!(store.partial_piece(&d, 0).is_none(), "unknown blob");
    let mut w = store.begin(&d, data.len() as u64).unwrap();
    assert!(store.partial_piece(&d, 1).is_none(), "not written yet");
    let sum = w.write_piece(1, piece(&data, 1)).unwrap();
    assert_eq!(sum, <[u8; 32]>::from(Sha256::digest(piece(&data, 1))));
    assert_eq!(
        &store.partial_piece(&d, 1).unwrap().unwrap()[..],
        piece(&data, 1)
    );
    assert!(matches!(
        store.partial_piece(&d, 9),
        Some(Err(StoreError::NoSuchPiece { .. }))
    ));
    assert_eq!(w.held_hashes().unwrap(), vec![None, Some(sum), None, None]);

    // A flipped byte on disk is caught, not served.
    let part = dir.0.join("blobs").join(format!("{}.part", d.hex()));
    let f = OpenOptions::new().write(true).open(&part).unwrap();
    f.write_all_at(&[piece(&data, 1)[5] ^ 1], PS + 5).unwrap();
    assert!(matches!(
        store.partial_piece(&d, 1),
        Some(Err(StoreError::Corrupt { .. }))
    ));
    f.write_all_at(&piece(&data, 1)[5..6], PS + 5).unwrap();

    for i in [0, 2, 3] {
        w.write_piece(i, piece(&data, i)).unwrap();
    }
    w.commit().unwrap();
    // Complete now: the partial view no longer answers; the reader does.
    assert!(store.partial_piece(&d, 1).is_none());
    assert_eq!(
        &store.get(&d).unwrap().read_piece(1).unwrap()[..],
        piece(&data, 1)
    );
}

#[test]
fn cached_blobs_are_readable_by_the_agent_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("store");
    // A directory an older version (or the umask) left open to everyone.
    let blobs = dir.0.join("blobs");
    fs::create_dir_all(&blobs).unwrap();
    fs::set_permissions(&blobs, fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&blobs), 0o700);
    put(&store, &blob(3 * 1024, 7));
    for entry in fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[test]
fn a_blob_is_cut_into_about_64_pieces_of_256_kib_to_the_maximum() {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    let max = 4 * MIB;
    for (size, piece) in [
        (0, 256 * KIB),
        (1, 256 * KIB),
        (12 * MIB, 256 * KIB),
        (12 * MIB + 1, 256 * KIB),
        (48 * MIB, MIB),
        (100 * MIB, 2 * MIB),
        (256 * MIB, 4 * MIB),
        (3 << 30, 4 * MIB),
        (u64::MAX, 4 * MIB),
    ] {
        assert_eq!(piece_size_for(size, max), piece, "{size} bytes");
    }
    // The maximum wins over the minimum (tests run with tiny pieces).
    assert_eq!(piece_size_for(10 * MIB, 100), 100);
    // The rule holds for every blob the store begins, so nodes agree.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30, max).unwrap();
    let w = store.begin(&Digest::of(b"x"), 48 * MIB).unwrap();
    assert_eq!(w.piece_size(), MIB);
    assert_eq!(w.pieces(), 48);
}

/// A piece written with the sum its caller computed is recorded as given;
/// a wrong one is caught when the piece is read, as a disk fault would be.
/// `commit_verified` trusts the caller's digest check and does not read the
/// blob back: `commit` catches the same wrong piece, `commit_verified` does
/// not, and reading still does.
#[test]
fn hashed_pieces_are_checked_on_read_and_commit_verified_skips_the_read_back() {
    let dir = TempDir::new("store");
    let store = Store::open(&dir.0, 1 << 20, PS).unwrap();
    let data = blob(3 * 1024, 7);
    let d = Digest::of(&data);
    let write = |wrong: bool| {
        let mut w = store.begin(&d, data.len() as u64).unwrap();
        for i in w.missing_pieces() {
            let mut sum: [u8; 32] = Sha256::digest(piece(&data, i)).into();
            if wrong && i == 1 {
                sum[0] ^= 1;
            }
            w.write_hashed_piece(i, piece(&data, i), sum).unwrap();
        }
        w
    };
    let w = write(true);
    assert!(matches!(
        w.read_piece(1),
        Err(StoreError::Corrupt { piece: 1, .. })
    ));
    assert!(matches!(
        w.commit(),
        Err(StoreError::Corrupt { piece: 1, .. })
    ));
    assert!(store.get(&d).is_none(), "discarded");

    let r = write(true).commit_verified().unwrap();
    assert_eq!(read_all(&r, 0, PS).unwrap(), piece(&data, 0));
    assert!(matches!(
        read_all(&r, PS, 2 * PS),
        Err(StoreError::Corrupt { piece: 1, .. })
    ));
    drop(r);
    store.remove(&d).unwrap();

    let r = write(false).commit_verified().unwrap();
    assert_eq!(read_all(&r, 0, r.size()).unwrap(), data);
}
