//! Content-addressed piece store on disk: blobs by sha256 digest, written in
//! pieces that survive an agent restart, every piece checked when read, the
//! whole blob checked before it is served as complete, LRU eviction between
//! watermarks. The decisions live in the pure [`accounting`], [`bitmap`] and
//! [`layout`] modules; this one does the IO, synchronously (callers use
//! `spawn_blocking`), and never holds more than about one piece in memory.
//!
//! # API
//!
//! - [`Store::open`]`(state_dir, capacity, max_piece_size)` scans `<state_dir>/blobs/`.
//!   A blob's piece size follows from its size ([`piece_size_for`]), so every
//!   node cuts a blob the same way.
//! - [`Store::get`] a complete blob as a [`BlobReader`] (pinned while any clone
//!   of it or of its [`Chunks`] lives), whose [`BlobReader::read_range`] yields
//!   verified chunks.
//! - [`Store::begin`] a new or resumed blob as a [`BlobWriter`]: space is
//!   reserved up front (evicting as needed, or [`StoreError::NoSpace`]); at most
//!   one writer per digest ([`StoreError::Busy`]). [`BlobWriter::write_piece`]
//!   in any order, then [`BlobWriter::commit`]. A writer dropped without commit
//!   leaves its pieces for the next `begin`, in this run or the next.
//! - [`Store::remove`] after a [`StoreError::Corrupt`] read.
//!
//! Every error leaves the store consistent, so the caller can fall back to
//! streaming from the origin.
//!
//! # On disk
//!
//! ```text
//! <state_dir>/blobs/<hex>         complete blob (the commit is one rename of <hex>.part)
//! <state_dir>/blobs/<hex>.part    partial blob, allocated at full size
//! <state_dir>/blobs/<hex>.meta    size, piece size, piece bitmap, per-piece sha256 (see layout)
//! <state_dir>/blobs/*.tmp         being created; removed at open
//! ```
//!
//! Write order makes every crash point recoverable: a piece's data is synced
//! before its sum, its sum before its bitmap bit; a meta file appears (by
//! rename) only after its `.part`; data is unlinked before its meta. At open,
//! data without a meta file, a meta file without data, and anything that does
//! not check out (length, header, incomplete bitmap for a complete blob) are
//! removed. Partial blobs written with another piece size (another
//! `max_piece_size`, or an older rule) are dropped rather than resumed. A
//! complete blob's mtime is its last use, so LRU order
//! survives restarts (approximately: touching it is best effort).

mod accounting;
mod layout;

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, warn};

use accounting::{Accounting, Refused};
use damselfly_core::vocab::Bitmap;
use layout::{HEADER_LEN, Header, SUM_LEN};

use damselfly_core::vocab::{BadDigest, Digest};

/// Default piece size: what peers exchange and what a resume loses at most.
pub const DEFAULT_PIECE_SIZE: u64 = 4 * 1024 * 1024;
/// Read buffer for verifying a whole blob at commit.
const VERIFY_BUF: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Out of cache capacity, or the disk itself is full (ENOSPC, EDQUOT).
    #[error("no space in the cache: {0}")]
    NoSpace(String),
    #[error("{0}: another download of this blob is running")]
    Busy(Digest),
    #[error("{0}: already complete")]
    AlreadyComplete(Digest),
    #[error("{digest}: piece {piece} does not match its checksum")]
    Corrupt { digest: Digest, piece: u64 },
    #[error("blob content is {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    BadDigest(#[from] BadDigest),
    #[error("{digest}: {missing} pieces still missing")]
    Incomplete { digest: Digest, missing: u64 },
    #[error("{digest}: piece {index} has {len} bytes, expected {expected}")]
    PieceLength {
        digest: Digest,
        index: u64,
        len: u64,
        expected: u64,
    },
    #[error("{digest}: no piece {index} (the blob has {pieces})")]
    NoSuchPiece {
        digest: Digest,
        index: u64,
        pieces: u64,
    },
    #[error("{digest}: piece {index} is not held yet")]
    MissingPiece { digest: Digest, index: u64 },
    #[error("range {start}..{end} is outside a blob of {size} bytes")]
    OutOfRange { start: u64, end: u64, size: u64 },
    #[error("{}: {reason}", path.display())]
    BadMeta { path: PathBuf, reason: String },
    #[error("piece size must be at least 1 byte")]
    PieceSizeZero,
}

/// Attaches the path, and turns a full disk into [`StoreError::NoSpace`] so
/// callers treat it like a full cache.
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            StoreError::NoSpace(format!("{}: {source}", path.display()))
        }
        _ => StoreError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn bad_meta(path: &Path, reason: impl ToString) -> StoreError {
    StoreError::BadMeta {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The cache's size and contents, as `/status` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub capacity: u64,
    /// Complete and partial blobs (partial ones at full size).
    pub used_bytes: u64,
    /// Complete blobs.
    pub blobs: usize,
    /// Blobs being downloaded, or left partial for a resume.
    pub partial: usize,
}

/// A handle to the store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: PathBuf,
    max_piece_size: u64,
    state: Mutex<State>,
}

struct State {
    acct: Accounting<Digest>,
    last_tick: u64,
}

impl State {
    /// Wall-clock nanoseconds, so ticks compare with file mtimes, forced to
    /// increase so that LRU order within one run is exact.
    fn tick(&mut self) -> u64 {
        self.last_tick = now_nanos().max(self.last_tick + 1);
        self.last_tick
    }
}

fn now_nanos() -> u64 {
    nanos(SystemTime::now())
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

#[derive(Default)]
struct Found {
    data: bool,
    part: bool,
    meta: bool,
}

/// The smallest piece a blob is cut into, whatever its size: below this the
/// cost of a request (a stream, a read, a hash, a tracker bit) outweighs the
/// shorter hop.
pub const MIN_PIECE_SIZE: u64 = 256 * 1024;

/// A blob of `size` bytes is cut into pieces of this size: about 64 of them
/// (a power of two from `size / 64`), at least [`MIN_PIECE_SIZE`], at most
/// `max`. A fresh piece is relayed node to node whole, so each hop costs its
/// size over the link rate: small blobs get small pieces and reach the last
/// node soon after the first, while large blobs keep large pieces and their
/// piece count (so tracker bitmaps and hash lists) bounded. 12 MiB: 256 KiB
/// pieces; 48 MiB: 1 MiB; 256 MiB and up: `max` (4 MiB by default).
pub fn piece_size_for(size: u64, max: u64) -> u64 {
    (size / 64)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .max(MIN_PIECE_SIZE)
        .min(max)
        .max(1)
}

impl Store {
    /// Opens (creating) `<state_dir>/blobs/`, loads what is there into the
    /// accounting, removes leftovers, and evicts if `capacity` is now exceeded.
    pub fn open(state_dir: &Path, capacity: u64, max_piece_size: u64) -> Result<Store, StoreError> {
        if max_piece_size == 0 {
            return Err(StoreError::PieceSizeZero);
        }
        let blobs = state_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        // Private layers live here: only the agent (root) may read them, whatever
        // mode an older version gave the directory or its files.
        fs::set_permissions(&blobs, fs::Permissions::from_mode(0o700)).map_err(io_err(&blobs))?;
        let inner = Arc::new(Inner {
            blobs,
            max_piece_size,
            state: Mutex::new(State {
                acct: Accounting::new(capacity),
                last_tick: 0,
            }),
        });
        let store = Store { inner };
        store.scan()?;
        let mut st = store.inner.lock();
        let (n, used) = (st.acct.len(), st.acct.used());
        store.inner.evict(&mut st);
        info!(
            dir = %store.inner.blobs.display(),
            blobs = n,
            used,
            capacity,
            evicted = n - st.acct.len(),
            "store opened"
        );
        drop(st);
        Ok(store)
    }

    fn scan(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut found = std::collections::BTreeMap::<Digest, Found>::new();
        let dir = fs::read_dir(&inner.blobs).map_err(io_err(&inner.blobs))?;
        for entry in dir {
            let entry = entry.map_err(io_err(&inner.blobs))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                warn!(path = %path.display(), "unexpected file in the store; left alone");
                continue;
            };
            if name.ends_with(".tmp") {
                debug!(path = %path.display(), "removing leftover temp file");
                remove_if_present(&path)?;
                continue;
            }
            let (hex, ext) = name.split_once('.').unwrap_or((name, ""));
            let digest = match hex.parse::<Digest>() {
                // `parse` also takes "sha256:<hex>"; only the bare spelling is ours.
                Ok(d) if d.hex() == hex => d,
                _ => {
                    warn!(path = %path.display(), "unexpected file in the store; left alone");
                    continue;
                }
            };
            let f = found.entry(digest).or_default();
            match ext {
                "" => f.data = true,
                "part" => f.part = true,
                "meta" => f.meta = true,
                _ => warn!(path = %path.display(), "unexpected file in the store; left alone"),
            }
        }
        for (digest, f) in found {
            self.load(&digest, f)?;
        }
        sync_dir(&inner.blobs)
    }

    /// Brings one digest's files found at open into the accounting, or
    /// removes them.
    fn load(&self, digest: &Digest, f: Found) -> Result<(), StoreError> {
        let inner = &self.inner;
        let (data, part, meta) = (
            inner.data_path(digest),
            inner.part_path(digest),
            inner.meta_path(digest),
        );
        let checked = if f.meta {
            match read_meta(&meta) {
                Ok((_, header, bitmap)) => Some((header, bitmap)),
                Err(e) => {
                    warn!(error = %e, "dropping blob with an unreadable meta file");
                    None
                }
            }
        } else {
            None
        };
        let mut st = inner.lock();
        if let Some((header, bitmap)) = &checked {
            if f.data {
                if bitmap.is_complete() && file_len(&data)? == header.size {
                    if f.part {
                        remove_if_present(&part)?;
                    }
                    st.acct.insert(*digest, header.size, true, mtime(&data)?);
                    return Ok(());
                }
                warn!(%digest, "dropping complete blob that does not match its meta file");
                remove_if_present(&data)?;
            }
            if f.part {
                if header.piece_size == inner.piece_size_for(header.size)
                    && file_len(&part)? == header.size
                {
                    debug!(%digest, held = bitmap.held(), pieces = bitmap.pieces(), "partial blob kept for resume");
                    st.acct.insert(*digest, header.size, false, mtime(&meta)?);
                    return Ok(());
                }
                info!(%digest, "dropping partial blob of another piece size or length");
            }
        }
        drop(st);
        inner.delete_files(digest)
    }

    /// Digests of the complete blobs held (to re-announce after a restart).
    pub fn complete(&self) -> Vec<Digest> {
        let Ok(dir) = fs::read_dir(&self.inner.blobs) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let d = name.parse::<Digest>().ok()?;
                (d.hex() == name).then_some(d)
            })
            .collect()
    }

    /// The largest piece size: that of blobs of 256 × it and more.
    pub fn max_piece_size(&self) -> u64 {
        self.inner.max_piece_size
    }

    pub fn capacity(&self) -> u64 {
        self.inner.lock().acct.capacity()
    }

    /// Bytes of complete and partial blobs (partial ones at full size).
    pub fn used_bytes(&self) -> u64 {
        self.inner.lock().acct.used()
    }

    /// What the cache holds, from the accounting (no disk access).
    pub fn usage(&self) -> Usage {
        let st = self.inner.lock();
        let (mut blobs, mut partial) = (0, 0);
        for (_, e) in st.acct.iter() {
            if e.complete {
                blobs += 1;
            } else {
                partial += 1;
            }
        }
        Usage {
            capacity: st.acct.capacity(),
            used_bytes: st.acct.used(),
            blobs,
            partial,
        }
    }

    /// A complete blob, pinned and marked used; `None` if there is none (or
    /// its files cannot be opened, which is logged).
    pub fn get(&self, digest: &Digest) -> Option<BlobReader> {
        let generation = {
            let mut st = self.inner.lock();
            let t = st.tick();
            st.acct.pin(digest, t)?
        };
        let pin = Pin {
            inner: self.inner.clone(),
            digest: *digest,
            generation,
            writing: false,
        };
        match BlobReader::open(pin) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(%digest, error = %e, "cached blob cannot be opened; treating as absent");
                None
            }
        }
    }

    /// Piece `index` of a blob still being written (by whichever writer),
    /// verified against its recorded sum; `None` if this store does not hold
    /// that piece of an incomplete blob. Reads the bitmap from disk, where a
    /// bit is set only after its piece and sum are durable, so a piece being
    /// written is never served half done.
    pub fn partial_piece(&self, digest: &Digest, index: u64) -> Option<Result<Bytes, StoreError>> {
        if self.inner.lock().acct.get(digest)?.complete {
            return None;
        }
        // Any failure to open is a race with commit or discard: not held here.
        let (meta, header, bitmap) = read_meta(&self.inner.meta_path(digest)).ok()?;
        if index >= header.pieces() {
            return Some(Err(StoreError::NoSuchPiece {
                digest: *digest,
                index,
                pieces: header.pieces(),
            }));
        }
        if !bitmap.get(index) {
            return None;
        }
        let part = self.inner.part_path(digest);
        let data = File::open(&part).ok()?;
        Some(read_verified(&data, &meta, &header, digest, index, &part).map(Bytes::from))
    }

    /// Starts or resumes writing `digest`, `size` bytes long. A partial blob of
    /// another size is discarded first; a partial blob that cannot be resumed
    /// is discarded and the error returned.
    pub fn begin(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let inner = &self.inner;
        let (generation, resumed) = {
            let mut st = inner.lock();
            let t = st.tick();
            let mut resumed = None;
            match st.acct.get(digest).copied() {
                Some(e) if e.complete => return Err(StoreError::AlreadyComplete(*digest)),
                Some(e) if e.writing => return Err(StoreError::Busy(*digest)),
                Some(e) if e.size != size => {
                    info!(%digest, old = e.size, new = size, "size changed; restarting partial blob");
                    st.acct.remove(digest);
                    inner.delete_files(digest)?;
                }
                Some(_) => resumed = Some(st.acct.resume(digest, t).expect("checked above")),
                None => {}
            }
            match resumed {
                Some(g) => (g, true),
                None => match st.acct.reserve(*digest, size, t) {
                    Ok(r) => {
                        for victim in &r.evicted {
                            debug!(digest = %victim, "evicted to make room");
                            log_err(inner.delete_files(victim));
                        }
                        (r.generation, false)
                    }
                    Err(e @ Refused::NoSpace { .. }) => {
                        return Err(StoreError::NoSpace(format!("{digest}: {e}")));
                    }
                    Err(e) => unreachable!("reserve after checks: {e}"),
                },
            }
        };
        let pin = Pin {
            inner: inner.clone(),
            digest: *digest,
            generation,
            writing: true,
        };
        let opened = if resumed {
            self.open_partial(digest, size)
        } else {
            self.create_partial(digest, size)
        };
        match opened {
            Ok((data, meta, header, bitmap)) => {
                debug!(%digest, resumed, held = bitmap.held(), pieces = bitmap.pieces(), "writing blob");
                Ok(BlobWriter {
                    pin,
                    data,
                    meta,
                    header,
                    bitmap,
                })
            }
            Err(e) => {
                // Our pin keeps everyone else off these files until discarded.
                log_err(inner.discard(digest));
                drop(pin);
                Err(e)
            }
        }
    }

    fn create_partial(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<(File, File, Header, Bitmap), StoreError> {
        let inner = &self.inner;
        let part = inner.part_path(digest);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .map_err(io_err(&part))?;
        allocate(&data, size).map_err(io_err(&part))?;
        let header = Header {
            size,
            piece_size: inner.piece_size_for(size),
        };
        let tmp = inner.meta_tmp_path(digest);
        let meta = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // Zeros are "no piece held"; the sums region stays sparse until written.
        meta.write_all_at(&header.encode(), 0)
            .and_then(|()| meta.set_len(header.meta_len()))
            .and_then(|()| meta.sync_all())
            .map_err(io_err(&tmp))?;
        let path = inner.meta_path(digest);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&inner.blobs)?;
        Ok((data, meta, header, Bitmap::new(header.pieces())))
    }

    fn open_partial(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<(File, File, Header, Bitmap), StoreError> {
        let inner = &self.inner;
        let path = inner.meta_path(digest);
        let (meta, header, bitmap) = read_meta(&path)?;
        if header.size != size || header.piece_size != inner.piece_size_for(size) {
            return Err(bad_meta(&path, "size or piece size changed"));
        }
        let part = inner.part_path(digest);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&part)
            .map_err(io_err(&part))?;
        Ok((data, meta, header, bitmap))
    }

    /// Drops a blob and its files, e.g. after [`StoreError::Corrupt`]. Readers
    /// still open keep reading the unlinked files. [`StoreError::Busy`] while
    /// a writer holds it. Removing an absent blob is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let mut st = self.inner.lock();
        if st.acct.get(digest).is_some_and(|e| e.writing) {
            return Err(StoreError::Busy(*digest));
        }
        st.acct.remove(digest);
        self.inner.delete_files(digest)
    }
}

impl Inner {
    fn piece_size_for(&self, size: u64) -> u64 {
        piece_size_for(size, self.max_piece_size)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the accounting consistent before any
        // call that could panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn data_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    fn part_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.part", d.hex()))
    }

    fn meta_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.meta", d.hex()))
    }

    fn meta_tmp_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.meta.tmp", d.hex()))
    }

    /// Unlinks every file of `d`, data before meta (a meta file alone is
    /// garbage at the next open; data alone would be too, but costs space).
    /// Callers hold the lock, so a new writer cannot create files meanwhile.
    fn delete_files(&self, d: &Digest) -> Result<(), StoreError> {
        let mut first = Ok(());
        for p in [
            self.data_path(d),
            self.part_path(d),
            self.meta_path(d),
            self.meta_tmp_path(d),
        ] {
            if let Err(e) = remove_if_present(&p) {
                first = first.and(Err(e));
            }
        }
        first
    }

    fn discard(&self, d: &Digest) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.acct.remove(d);
        self.delete_files(d)
    }

    fn evict(&self, st: &mut State) {
        for victim in st.acct.evict_candidates() {
            st.acct.remove(&victim);
            debug!(digest = %victim, "evicted");
            log_err(self.delete_files(&victim));
        }
    }
}

fn log_err(r: Result<(), StoreError>) {
    if let Err(e) = r {
        warn!(error = %e, "store cleanup failed");
    }
}

fn remove_if_present(p: &Path) -> Result<(), StoreError> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(p)(e)),
        _ => Ok(()),
    }
}

fn file_len(p: &Path) -> Result<u64, StoreError> {
    Ok(fs::metadata(p).map_err(io_err(p))?.len())
}

fn mtime(p: &Path) -> Result<u64, StoreError> {
    let m = fs::metadata(p).map_err(io_err(p))?;
    Ok(m.modified().map_or(0, nanos))
}

/// Makes renames and unlinks in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Claims the blocks now, so a full disk shows up at `begin` rather than
/// halfway through the download.
fn allocate(f: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the descriptor belongs to `f`, which outlives the call.
    match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        // Filesystems without fallocate: a sparse file still has the right length.
        libc::EOPNOTSUPP | libc::EINVAL => f.set_len(size),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Opens a meta file and checks its header, length and bitmap.
fn read_meta(path: &Path) -> Result<(File, Header, Bitmap), StoreError> {
    let meta = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut head = [0u8; HEADER_LEN as usize];
    meta.read_exact_at(&mut head, 0)
        .map_err(|e| bad_meta(path, e))?;
    let header = Header::decode(&head).map_err(|e| bad_meta(path, e))?;
    let len = meta.metadata().map_err(io_err(path))?.len();
    if len != header.meta_len() {
        return Err(bad_meta(
            path,
            format!("{len} bytes, expected {}", header.meta_len()),
        ));
    }
    let mut bits = vec![0u8; header.bitmap_len() as usize];
    meta.read_exact_at(&mut bits, header.bitmap_offset())
        .map_err(io_err(path))?;
    let bitmap = Bitmap::from_bytes(header.pieces(), &bits).map_err(|e| bad_meta(path, e))?;
    Ok((meta, header, bitmap))
}

/// Reads piece `index` and checks it against the sum recorded when it was
/// written.
fn read_verified(
    data: &File,
    meta: &File,
    header: &Header,
    digest: &Digest,
    index: u64,
    path: &Path,
) -> Result<Vec<u8>, StoreError> {
    let (start, end) = header.piece_range(index);
    let mut buf = vec![0u8; (end - start) as usize];
    data.read_exact_at(&mut buf, start).map_err(io_err(path))?;
    let mut sum = [0u8; SUM_LEN as usize];
    meta.read_exact_at(&mut sum, header.sum_offset(index))
        .map_err(io_err(path))?;
    if Sha256::digest(&buf)[..] != sum[..] {
        return Err(StoreError::Corrupt {
            digest: *digest,
            piece: index,
        });
    }
    Ok(buf)
}

/// A pin on an accounting entry, released on drop (along with the writer
/// mark, for a writer that did not commit).
struct Pin {
    inner: Arc<Inner>,
    digest: Digest,
    generation: u64,
    writing: bool,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if self.writing {
            st.acct.end_write(&self.digest, self.generation, false);
        }
        st.acct.unpin(&self.digest, self.generation);
        // This pin may have been all that held use above the high watermark.
        self.inner.evict(&mut st);
    }
}

/// Writes one blob. Not committed until [`BlobWriter::commit`]; dropped
/// before that, its pieces stay on disk for a later `begin`.
pub struct BlobWriter {
    pin: Pin,
    data: File,
    meta: File,
    header: Header,
    bitmap: Bitmap,
}

impl BlobWriter {
    pub fn digest(&self) -> Digest {
        self.pin.digest
    }

    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn piece_size(&self) -> u64 {
        self.header.piece_size
    }

    pub fn pieces(&self) -> u64 {
        self.header.pieces()
    }

    /// Byte range `[start, end)` of piece `index` in the blob.
    pub fn piece_range(&self, index: u64) -> (u64, u64) {
        self.header.piece_range(index)
    }

    pub fn has_piece(&self, index: u64) -> bool {
        self.bitmap.get(index)
    }

    pub fn missing_pieces(&self) -> Vec<u64> {
        self.bitmap.missing().collect()
    }

    fn check_index(&self, index: u64) -> Result<(), StoreError> {
        if index >= self.pieces() {
            return Err(StoreError::NoSuchPiece {
                digest: self.pin.digest,
                index,
                pieces: self.pieces(),
            });
        }
        Ok(())
    }

    /// Stores piece `index` (its full length; only the last one is short) and
    /// records its sha256, which it returns. Durable when this returns (a
    /// crash may still lose the piece's bit, never leave a bit without its
    /// bytes and sum). A piece already held is left as it is.
    pub fn write_piece(&mut self, index: u64, data: &[u8]) -> Result<[u8; 32], StoreError> {
        let sum: [u8; 32] = Sha256::digest(data).into();
        self.write_hashed_piece(index, data, sum)?;
        Ok(sum)
    }

    /// [`Self::write_piece`] for bytes whose sha256 the caller has just
    /// computed (to check them against a trusted one): `sum` is recorded as
    /// given, not computed a second time. A wrong `sum` is caught when the
    /// piece is read, like a disk that lost it.
    pub fn write_hashed_piece(
        &mut self,
        index: u64,
        data: &[u8],
        sum: [u8; 32],
    ) -> Result<(), StoreError> {
        self.check_index(index)?;
        let (start, end) = self.header.piece_range(index);
        if data.len() as u64 != end - start {
            return Err(StoreError::PieceLength {
                digest: self.pin.digest,
                index,
                len: data.len() as u64,
                expected: end - start,
            });
        }
        if self.has_piece(index) {
            return Ok(());
        }
        let part = self.pin.inner.part_path(&self.pin.digest);
        self.data
            .write_all_at(data, start)
            .and_then(|()| self.data.sync_data())
            .map_err(io_err(&part))?;
        let meta = self.pin.inner.meta_path(&self.pin.digest);
        self.meta
            .write_all_at(&sum, self.header.sum_offset(index))
            .and_then(|()| self.meta.sync_data())
            .map_err(io_err(&meta))?;
        // The bit goes last, once bytes and sum are on disk: a set bit must
        // never stand for a sum that did not reach it. Not synced itself: a
        // crash may lose it (the piece is fetched again), and readers see it
        // at once (page cache). That is one sync in three saved per piece.
        let (at, byte) = self.bitmap.byte_with(index);
        self.meta
            .write_all_at(&[byte], self.header.bitmap_offset() + at as u64)
            .map_err(io_err(&meta))?;
        self.bitmap.set(index);
        Ok(())
    }

    /// The recorded sha256 of every piece held, `None` for the rest: what a
    /// resumed download announces before it fetches anything.
    pub fn held_hashes(&self) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        let meta = self.pin.inner.meta_path(&self.pin.digest);
        (0..self.pieces())
            .map(|i| {
                if !self.has_piece(i) {
                    return Ok(None);
                }
                let mut sum = [0u8; 32];
                self.meta
                    .read_exact_at(&mut sum, self.header.sum_offset(i))
                    .map_err(io_err(&meta))?;
                Ok(Some(sum))
            })
            .collect()
    }

    /// The bitmap of pieces held, in the tracker's layout.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// A piece already held, verified; for serving a client from the pieces
    /// a resumed download already has.
    pub fn read_piece(&self, index: u64) -> Result<Bytes, StoreError> {
        self.check_index(index)?;
        if !self.has_piece(index) {
            return Err(StoreError::MissingPiece {
                digest: self.pin.digest,
                index,
            });
        }
        let part = self.pin.inner.part_path(&self.pin.digest);
        read_verified(
            &self.data,
            &self.meta,
            &self.header,
            &self.pin.digest,
            index,
            &part,
        )
        .map(Bytes::from)
    }

    /// Checks every piece against its sum and the whole blob against its
    /// digest, then makes it complete (one rename) and returns it as a
    /// reader. On [`StoreError::Corrupt`] or [`StoreError::DigestMismatch`]
    /// the blob is discarded; on [`StoreError::Incomplete`] or IO errors its
    /// pieces stay for a later `begin`.
    pub fn commit(self) -> Result<BlobReader, StoreError> {
        self.finish(true)
    }

    /// [`Self::commit`] for a writer whose caller hashed, in order, exactly
    /// the bytes it wrote and found the blob's digest (a swarm download does,
    /// for its client): the blob is not read back and hashed a second time.
    pub fn commit_verified(self) -> Result<BlobReader, StoreError> {
        self.finish(false)
    }

    fn finish(self, read_back: bool) -> Result<BlobReader, StoreError> {
        let BlobWriter {
            mut pin,
            data,
            meta,
            header,
            bitmap,
        } = self;
        let digest = pin.digest;
        let inner = pin.inner.clone();
        if !bitmap.is_complete() {
            return Err(StoreError::Incomplete {
                digest,
                missing: bitmap.pieces() - bitmap.held(),
            });
        }
        let part = inner.part_path(&digest);
        let checked = if read_back {
            verify(&data, &meta, &header, &digest, &part)
        } else {
            Ok(())
        };
        match checked {
            Ok(()) => {}
            Err(e @ (StoreError::Corrupt { .. } | StoreError::DigestMismatch { .. })) => {
                warn!(%digest, error = %e, "discarding downloaded blob");
                log_err(inner.discard(&digest));
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        data.sync_all().map_err(io_err(&part))?;
        {
            let mut st = inner.lock();
            let path = inner.data_path(&digest);
            fs::rename(&part, &path).map_err(io_err(&path))?;
            st.acct.end_write(&digest, pin.generation, true);
            let t = st.tick();
            st.acct.touch(&digest, t);
        }
        pin.writing = false;
        // Were the rename lost in a crash, the blob would come back as a
        // partial with every piece held, and be verified again on commit.
        log_err(sync_dir(&inner.blobs));
        debug!(%digest, size = header.size, "blob committed");
        Ok(BlobReader(Arc::new(ReaderInner {
            path: inner.data_path(&digest),
            pin,
            data,
            meta,
            header,
        })))
    }
}

/// Streams the whole blob once, checking each piece's sum and the digest.
fn verify(
    data: &File,
    meta: &File,
    header: &Header,
    digest: &Digest,
    path: &Path,
) -> Result<(), StoreError> {
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; VERIFY_BUF.min(header.piece_size as usize).max(1)];
    for index in 0..header.pieces() {
        let (start, end) = header.piece_range(index);
        let mut piece = Sha256::new();
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            data.read_exact_at(&mut buf[..n], at)
                .map_err(io_err(path))?;
            piece.update(&buf[..n]);
            whole.update(&buf[..n]);
            at += n as u64;
        }
        let mut sum = [0u8; SUM_LEN as usize];
        meta.read_exact_at(&mut sum, header.sum_offset(index))
            .map_err(io_err(path))?;
        if piece.finalize()[..] != sum[..] {
            return Err(StoreError::Corrupt {
                digest: *digest,
                piece: index,
            });
        }
    }
    let actual = Digest(whole.finalize().into());
    if actual != *digest {
        return Err(StoreError::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(())
}

/// A complete blob. Clones share one pin, held until the last clone and the
/// last [`Chunks`] are gone.
#[derive(Clone)]
pub struct BlobReader(Arc<ReaderInner>);

struct ReaderInner {
    pin: Pin,
    data: File,
    meta: File,
    header: Header,
    path: PathBuf,
}

impl BlobReader {
    fn open(pin: Pin) -> Result<Self, StoreError> {
        let path = pin.inner.data_path(&pin.digest);
        let data = File::open(&path).map_err(io_err(&path))?;
        let meta_path = pin.inner.meta_path(&pin.digest);
        let (meta, header, _) = read_meta(&meta_path)?;
        // The mtime is the last use seen by the next `open`; not worth an error.
        let _ = data.set_modified(SystemTime::now());
        Ok(Self(Arc::new(ReaderInner {
            pin,
            data,
            meta,
            header,
            path,
        })))
    }

    pub fn digest(&self) -> Digest {
        self.0.pin.digest
    }

    pub fn size(&self) -> u64 {
        self.0.header.size
    }

    /// The blob's own piece size (that of the store when it was written).
    pub fn piece_size(&self) -> u64 {
        self.0.header.piece_size
    }

    pub fn pieces(&self) -> u64 {
        self.0.header.pieces()
    }

    /// Piece `index`, verified; for serving peers.
    pub fn read_piece(&self, index: u64) -> Result<Bytes, StoreError> {
        let r = &self.0;
        if index >= r.header.pieces() {
            return Err(StoreError::NoSuchPiece {
                digest: r.pin.digest,
                index,
                pieces: r.header.pieces(),
            });
        }
        read_verified(&r.data, &r.meta, &r.header, &r.pin.digest, index, &r.path).map(Bytes::from)
    }

    /// The stored sha256 of every piece, in order: what the tracker is told,
    /// so peers can verify what they fetch from us.
    pub fn piece_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        let r = &self.0;
        (0..r.header.pieces())
            .map(|i| {
                let mut sum = [0u8; 32];
                r.meta
                    .read_exact_at(&mut sum, r.header.sum_offset(i))
                    .map_err(io_err(&r.path))?;
                Ok(sum)
            })
            .collect()
    }

    /// Bytes `[start, end)` as chunks of at most one piece, each piece
    /// verified as it is read. The first error ends the stream; on
    /// [`StoreError::Corrupt`] the caller should [`Store::remove`] the blob.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Chunks, StoreError> {
        if start > end || end > self.size() {
            return Err(StoreError::OutOfRange {
                start,
                end,
                size: self.size(),
            });
        }
        Ok(Chunks {
            reader: self.clone(),
            pos: start,
            end,
        })
    }
}

/// Iterator over verified chunks of a [`BlobReader`]; owns a clone of it, so
/// it can move into a blocking task.
pub struct Chunks {
    reader: BlobReader,
    pos: u64,
    end: u64,
}

impl Iterator for Chunks {
    type Item = Result<Bytes, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let ps = self.reader.piece_size();
        let index = self.pos / ps;
        let piece_start = index * ps;
        match self.reader.read_piece(index) {
            Ok(piece) => {
                let piece_end = piece_start + piece.len() as u64;
                let stop = self.end.min(piece_end);
                let chunk =
                    piece.slice((self.pos - piece_start) as usize..(stop - piece_start) as usize);
                self.pos = stop;
                Some(Ok(chunk))
            }
            Err(e) => {
                self.pos = self.end;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
