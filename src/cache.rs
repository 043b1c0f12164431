//! The chunk cache: verified, uncompressed spans of layers, on disk and in memory.
//!
//! Fifth stage of the pipeline. Chunks are content-addressed by the sha256 of their bytes, so
//! every image that uses a layer (or the same bytes in another layer) shares them. On disk a
//! chunk is written to a temp file and renamed into place — a crash leaves no half-written
//! chunk under a chunk's name — and a process verifies a chunk file when it first loads it, so
//! a damaged file is dropped and fetched again rather than served. Once a process has verified
//! a chunk (fetched it, or loaded it whole), later reads load just the bytes they need from the
//! file ([`Cache::read_range`]) until the file is found short or missing. In memory an LRU
//! keeps hot chunks; concurrent misses on one chunk cause one fetch (single-flight). Disk work
//! is done off the async workers ([`blocking`]).

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use oci_spec::image::Digest;

/// Where chunks persist. Implementations need not verify; [`Cache`] does.
pub trait ChunkStore: Send + Sync {
    /// The stored bytes for `digest`, if any.
    fn get(&self, digest: &Digest) -> std::io::Result<Option<Vec<u8>>>;
    /// Stores `data` under `digest` atomically; false if it was stored already (and was left
    /// as it is).
    fn put(&self, digest: &Digest, data: &[u8]) -> std::io::Result<bool>;
    /// Whether `digest` is stored (without reading it).
    fn contains(&self, digest: &Digest) -> bool;
    /// Drops `digest` (absent is fine).
    fn remove(&self, digest: &Digest) -> std::io::Result<()>;
    /// Bytes `range` of the stored chunk (fewer if it is shorter), unverified; `touch` marks it
    /// recently used. The default loads the whole chunk.
    fn get_range(
        &self,
        digest: &Digest,
        range: Range<usize>,
        touch: bool,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let _ = touch;
        Ok(self.get(digest)?.map(|d| {
            let end = range.end.min(d.len());
            d[range.start.min(end)..end].to_vec()
        }))
    }
}

/// Runs disk work from async code without stalling the runtime's other tasks: on a
/// multi-threaded runtime the worker hands its tasks to another thread meanwhile
/// (`block_in_place`); elsewhere (a current-thread runtime in unit tests, plain threads) it
/// just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Chunks as files `<dir>/<hex>`, written through `<tmp>`, optionally capped in size.
pub struct DiskChunks {
    dir: PathBuf,
    tmp: PathBuf,
    cap: Option<u64>,
    /// Bytes on disk as far as this process knows (`UNKNOWN` until first needed).
    usage: Arc<AtomicU64>,
    pruning: Arc<AtomicBool>,
}

const UNKNOWN: u64 = u64::MAX;

impl DiskChunks {
    /// The chunk directory of a store root (`<root>/cache/chunks`), uncapped.
    pub fn open(root: &std::path::Path) -> std::io::Result<DiskChunks> {
        let layout = crate::store::Layout::new(root);
        let (dir, tmp) = (layout.chunks(), layout.tmp());
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&tmp)?;
        Ok(DiskChunks {
            dir,
            tmp,
            cap: None,
            usage: Arc::new(AtomicU64::new(UNKNOWN)),
            pruning: Arc::default(),
        })
    }

    /// Caps the cache at `max_bytes`: when a write takes it over, least recently used chunks
    /// are removed in the background down to 90% of the cap. Works while images are mounted:
    /// an evicted chunk is fetched again when next read.
    pub fn with_cap(mut self, max_bytes: Option<u64>) -> DiskChunks {
        self.cap = max_bytes;
        self
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.digest())
    }

    /// Bytes on disk as this process accounts them (no directory walk), once known.
    fn tracked_usage(&self) -> Option<u64> {
        Some(self.usage.load(Ordering::Relaxed)).filter(|&u| u != UNKNOWN)
    }

    /// Bytes on disk: as accounted, or by a directory walk until this process knows (`None`
    /// if the walk fails). For gauges refreshed often.
    pub fn usage_bytes(&self) -> Option<u64> {
        self.tracked_usage()
            .or_else(|| self.usage().ok().map(|u| u.1))
    }

    /// (chunks, bytes) on disk.
    pub fn usage(&self) -> std::io::Result<(u64, u64)> {
        let files = list_chunks(&self.dir)?;
        Ok((files.len() as u64, files.iter().map(|f| f.1).sum()))
    }

    /// Removes least recently used chunks until at most `max_bytes` remain; returns
    /// (chunks removed, bytes freed).
    pub fn prune(&self, max_bytes: u64) -> std::io::Result<(u64, u64)> {
        let (removed, freed, left) = prune_dir(&self.dir, max_bytes)?;
        self.usage.store(left, Ordering::Relaxed);
        Ok((removed, freed))
    }

    /// Accounts for `added` bytes and starts a background prune if over the cap.
    fn account(&self, added: u64) {
        let Some(cap) = self.cap else { return };
        if self.usage.load(Ordering::Relaxed) == UNKNOWN {
            let total = list_chunks(&self.dir).map_or(0, |f| f.iter().map(|c| c.1).sum());
            let _ =
                self.usage
                    .compare_exchange(UNKNOWN, total, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            self.usage.fetch_add(added, Ordering::Relaxed);
        }
        if self.usage.load(Ordering::Relaxed) > cap && !self.pruning.swap(true, Ordering::AcqRel) {
            let (dir, usage, pruning) =
                (self.dir.clone(), self.usage.clone(), self.pruning.clone());
            std::thread::spawn(move || {
                match prune_dir(&dir, cap / 10 * 9) {
                    Ok((removed, freed, left)) => {
                        tracing::debug!(removed, freed, left, "cache pruned to its cap");
                        usage.store(left, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "cache prune failed"),
                }
                pruning.store(false, Ordering::Release);
            });
        }
    }
}

/// Chunk files with size and modification time, and the whole files assembled from chunks
/// for FUSE passthrough in the sibling directory `files` (see [`FILES_DIR`]), which count
/// towards the cap and are evicted alike.
fn list_chunks(
    dir: &std::path::Path,
) -> std::io::Result<Vec<(PathBuf, u64, std::time::SystemTime)>> {
    let mut out = list_dir(dir)?;
    if let Some(files) = dir.parent().map(|p| p.join(FILES_DIR)) {
        match list_dir(&files) {
            Ok(f) => out.extend(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Directory (beside `chunks`) of whole files assembled from verified chunks.
pub const FILES_DIR: &str = "files";

fn list_dir(dir: &std::path::Path) -> std::io::Result<Vec<(PathBuf, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push((entry.path(), meta.len(), meta.modified()?));
    }
    Ok(out)
}

/// Removes the least recently used chunks of `dir` until at most `max_bytes` remain.
/// Returns (removed, freed, bytes left).
fn prune_dir(dir: &std::path::Path, max_bytes: u64) -> std::io::Result<(u64, u64, u64)> {
    let mut files = list_chunks(dir)?;
    files.sort_by_key(|f| f.2);
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let (mut removed, mut freed) = (0, 0);
    for (path, size, _) in files {
        if total <= max_bytes {
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= size;
                removed += 1;
                freed += size;
                crate::metrics::metrics().cache_evictions.inc();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= size,
            Err(e) => return Err(e),
        }
    }
    Ok((removed, freed, total))
}

impl ChunkStore for DiskChunks {
    fn get(&self, digest: &Digest) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let Some(mut file) = open_chunk(&self.path(digest))? else {
            return Ok(None);
        };
        let mut data = Vec::with_capacity(file.metadata().map_or(0, |m| m.len() as usize));
        file.read_to_end(&mut data)?;
        // The modification time orders eviction: least recently used first.
        let _ = file.set_modified(std::time::SystemTime::now());
        Ok(Some(data))
    }

    fn get_range(
        &self,
        digest: &Digest,
        range: Range<usize>,
        touch: bool,
    ) -> std::io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let Some(file) = open_chunk(&self.path(digest))? else {
            return Ok(None);
        };
        let mut data = vec![0; range.len()];
        let mut got = 0;
        while got < data.len() {
            match file.read_at(&mut data[got..], (range.start + got) as u64)? {
                0 => break,
                n => got += n,
            }
        }
        data.truncate(got);
        if touch {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
        Ok(Some(data))
    }

    fn put(&self, digest: &Digest, data: &[u8]) -> std::io::Result<bool> {
        use std::io::Write;
        let path = self.path(digest);
        if path.exists() {
            return Ok(false);
        }
        // No fsync (unlike `store::commit_file`): a chunk lost or damaged by a crash fails
        // verification and is fetched again.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp)?;
        tmp.write_all(data)?;
        tmp.persist(path).map_err(|e| e.error)?;
        self.account(data.len() as u64);
        Ok(true)
    }

    fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    fn remove(&self, digest: &Digest) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The chunk file at `path`, open for reading; `None` if there is none.
fn open_chunk(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache i/o for {digest}: {source}")]
    Io {
        digest: Digest,
        source: std::io::Error,
    },
    /// Getting the chunk's bytes failed: the layer reader's typed error
    /// ([`crate::layer::reader::ReadError`]), carried as the source.
    #[error(transparent)]
    Read(Box<dyn std::error::Error + Send + Sync>),
    /// The failure of a fetch this caller waited for instead of fetching itself: every caller
    /// of one failed fetch gets its error (not a fetch of its own, with a retry budget of its
    /// own, after it).
    #[error(transparent)]
    Shared(Arc<CacheError>),
}

impl CacheError {
    /// This error, to be handed to everyone who waited for the same fetch.
    pub fn shared(self) -> Arc<CacheError> {
        match self {
            CacheError::Shared(e) => e,
            e => Arc::new(e),
        }
    }

    /// The local I/O error behind this one, if any (its errno is the caller's answer).
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            CacheError::Io { source, .. } => Some(source),
            CacheError::Shared(e) => e.io(),
            CacheError::Read(_) => None,
        }
    }
}

/// One fetch of a chunk under way: later callers wait for `lock`, then take the chunk from
/// the cache or, if the fetch failed, its error.
#[derive(Default)]
struct Flight {
    lock: tokio::sync::Mutex<()>,
    failed: std::sync::OnceLock<Arc<CacheError>>,
}

/// Counters of what the cache did.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub fetches: AtomicU64,
    pub corrupt_dropped: AtomicU64,
    /// Published indexes caught describing something other than their layer (a checkpoint
    /// window, or the tree once the layer was complete).
    pub index_mismatches: AtomicU64,
}

/// The in-memory LRU of chunks, bounded in chunks and in bytes.
struct Memory {
    lru: lru::LruCache<Digest, Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl Memory {
    fn put(&mut self, digest: Digest, data: Arc<Vec<u8>>) {
        self.bytes += data.len();
        if let Some((_, old)) = self.lru.push(digest, data) {
            self.bytes -= old.len();
        }
        // The newest chunk stays even if it alone is over the budget.
        while self.bytes > self.budget && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn get(&mut self, digest: &Digest) -> Option<&Arc<Vec<u8>>> {
        self.lru.get(digest)
    }

    fn peek(&self, digest: &Digest) -> Option<&Arc<Vec<u8>>> {
        self.lru.peek(digest)
    }

    fn contains(&self, digest: &Digest) -> bool {
        self.lru.contains(digest)
    }

    fn pop(&mut self, digest: &Digest) {
        if let Some(old) = self.lru.pop(digest) {
            self.bytes -= old.len();
        }
    }
}

/// Memory LRU over a [`ChunkStore`], with single-flight fetching.
pub struct Cache {
    store: Arc<dyn ChunkStore>,
    /// Most bytes one streaming pass may add (see [`Cache::pass_budget`]).
    pass_budget: u64,
    memory: Mutex<Memory>,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Chunks on disk this process has verified (see [`read_range`](Self::read_range)).
    verified: Mutex<HashMap<[u8; 32], Verified>>,
    pub stats: CacheStats,
}

/// A chunk on disk this process has verified: its length, and when this process last marked
/// the file recently used.
struct Verified {
    len: u64,
    touched: std::time::Instant,
}

/// Most chunks remembered as verified (at most about 8 MiB of map; 64 Ki chunks of 256 KiB
/// are 16 GiB of cache): past it the set starts again empty, and chunks are verified again on
/// load.
const MAX_VERIFIED: usize = 64 << 10;

/// How often a chunk read by range is marked recently used on disk (its modification time,
/// which orders eviction), at most.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The 32 bytes of a sha256 digest (`None` for other algorithms: no fast path).
fn key(digest: &Digest) -> Option<[u8; 32]> {
    if digest.algorithm() != &oci_spec::image::DigestAlgorithm::Sha256 {
        return None;
    }
    let mut k = [0; 32];
    hex::decode_to_slice(digest.digest(), &mut k).ok()?;
    Some(k)
}

impl Cache {
    /// A cache keeping up to `memory_chunks` chunks in memory (and no more than
    /// [`with_memory_budget`](Self::with_memory_budget) bytes of them).
    pub fn new(store: Arc<dyn ChunkStore>, memory_chunks: usize) -> Cache {
        Cache {
            store,
            pass_budget: u64::MAX,
            memory: Mutex::new(Memory {
                lru: lru::LruCache::new(NonZeroUsize::new(memory_chunks.max(1)).expect("non-zero")),
                bytes: 0,
                budget: usize::MAX,
            }),
            flights: Mutex::default(),
            verified: Mutex::default(),
            stats: CacheStats::default(),
        }
    }

    /// Notes that the chunk on disk under `digest` holds `len` bytes that hash to it.
    fn note_verified(&self, digest: &Digest, len: usize) {
        let Some(k) = key(digest) else { return };
        let mut verified = self.verified.lock().unwrap();
        if verified.len() >= MAX_VERIFIED && !verified.contains_key(&k) {
            verified.clear();
        }
        let touched = std::time::Instant::now();
        verified.insert(
            k,
            Verified {
                len: len as u64,
                touched,
            },
        );
    }

    fn forget_verified(&self, digest: &Digest) {
        if let Some(k) = key(digest) {
            self.verified.lock().unwrap().remove(&k);
        }
    }

    /// Whether the chunk is in memory (reading it then needs no disk).
    pub fn in_memory(&self, digest: &Digest) -> bool {
        self.memory.lock().unwrap().contains(digest)
    }

    /// Whether the chunk is on disk, `len` bytes long, and verified by this process, as far as
    /// this process knows (no I/O): [`read_range`](Self::read_range) may read it by range.
    pub fn verified_on_disk(&self, digest: &Digest, len: u64) -> bool {
        key(digest).is_some_and(|k| {
            self.verified
                .lock()
                .unwrap()
                .get(&k)
                .is_some_and(|v| v.len == len)
        })
    }

    /// As [`read_range`](Self::read_range), from memory only (no I/O).
    pub fn read_memory(&self, digest: &Digest, len: u64, range: Range<usize>) -> Option<Vec<u8>> {
        let mut memory = self.memory.lock().unwrap();
        let d = memory.get(digest)?;
        if d.len() as u64 != len || range.start > range.end || range.end > d.len() {
            return None;
        }
        self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
        crate::metrics::metrics().cache_hit("memory");
        Some(d[range].to_vec())
    }

    /// Bytes `range` of the chunk under `digest`, which the caller's index says holds `len`
    /// bytes, when they can be had without fetching or verifying: from memory, or read from
    /// disk if this process has verified that chunk file already (only the range is read; the
    /// file is not hashed again). `None` otherwise: [`get_or_fetch`](Self::get_or_fetch) it.
    /// A chunk of another length, or a file found short or missing, is `None` too (and the
    /// file is verified again on its next load). Does disk I/O: call it through [`blocking`].
    pub fn read_range(
        &self,
        digest: &Digest,
        len: u64,
        range: Range<usize>,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        if let Some(d) = self.read_memory(digest, len, range.clone()) {
            return Ok(Some(d));
        }
        let Some(k) = key(digest) else {
            return Ok(None);
        };
        let touch = {
            let mut verified = self.verified.lock().unwrap();
            match verified.get_mut(&k) {
                Some(v) if v.len == len && range.start <= range.end && range.end as u64 <= len => {
                    let due = v.touched.elapsed() >= TOUCH_EVERY;
                    if due {
                        v.touched = std::time::Instant::now();
                    }
                    due
                }
                _ => return Ok(None),
            }
        };
        let want = range.len();
        let data = self
            .store
            .get_range(digest, range, touch)
            .map_err(|source| CacheError::Io {
                digest: digest.clone(),
                source,
            })?;
        match data {
            Some(d) if d.len() == want => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::metrics().cache_hit("disk");
                Ok(Some(d))
            }
            _ => {
                self.forget_verified(digest);
                Ok(None)
            }
        }
    }

    /// Limits what one streaming pass over a whole layer may add to the cache (half the cap, so
    /// a layer that decompresses to more than the cache can hold — a compression bomb among
    /// them — cannot flush everything else or overrun the cap while the pass runs).
    pub fn with_pass_budget(mut self, bytes: u64) -> Cache {
        self.pass_budget = bytes;
        self
    }

    /// Keeps at most `bytes` of chunks in memory (the least recently used go first).
    pub fn with_memory_budget(self, bytes: u64) -> Cache {
        self.memory.lock().unwrap().budget = usize::try_from(bytes).unwrap_or(usize::MAX);
        self
    }

    /// Most bytes one streaming pass may add.
    pub fn pass_budget(&self) -> u64 {
        self.pass_budget
    }

    /// Drops a chunk from memory and disk (absent is fine).
    pub fn remove(&self, digest: &Digest) -> Result<(), CacheError> {
        self.memory.lock().unwrap().pop(digest);
        self.forget_verified(digest);
        self.store.remove(digest).map_err(|source| CacheError::Io {
            digest: digest.clone(),
            source,
        })
    }

    /// Whether the chunk is in memory or on disk.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.memory.lock().unwrap().contains(digest) || self.store.contains(digest)
    }

    /// Adds a chunk whose bytes the caller has verified against `digest`.
    pub fn insert(&self, digest: &Digest, data: Arc<Vec<u8>>) -> Result<(), CacheError> {
        // A file already there was written by someone else: not verified by this process.
        let stored = self
            .store
            .put(digest, &data)
            .map_err(|source| CacheError::Io {
                digest: digest.clone(),
                source,
            })?;
        if stored {
            self.note_verified(digest, data.len());
        }
        self.memory.lock().unwrap().put(digest.clone(), data);
        Ok(())
    }

    /// Stores a chunk on disk only (used while streaming a whole layer).
    pub fn insert_cold(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let stored = self
            .store
            .put(digest, data)
            .map_err(|source| CacheError::Io {
                digest: digest.clone(),
                source,
            })?;
        if stored {
            self.note_verified(digest, data.len());
        }
        Ok(())
    }

    /// The chunk from memory or disk, verified; `None` if absent (or damaged, which is dropped).
    pub fn lookup(&self, digest: &Digest) -> Result<Option<Arc<Vec<u8>>>, CacheError> {
        if let Some(d) = self.memory.lock().unwrap().get(digest) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().cache_hit("memory");
            return Ok(Some(d.clone()));
        }
        let io = |source| CacheError::Io {
            digest: digest.clone(),
            source,
        };
        let Some(data) = self.store.get(digest).map_err(io)? else {
            return Ok(None);
        };
        if crate::digest::verify(digest, &data).is_err() {
            tracing::warn!(%digest, "dropping damaged cache chunk");
            self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().cache_corrupt_chunks.inc();
            self.forget_verified(digest);
            self.store.remove(digest).map_err(io)?;
            return Ok(None);
        }
        self.note_verified(digest, data.len());
        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
        crate::metrics::metrics().cache_hit("disk");
        let data = Arc::new(data);
        self.memory
            .lock()
            .unwrap()
            .put(digest.clone(), data.clone());
        Ok(Some(data))
    }

    /// The chunk's bytes, verified, without promoting it in (or adding it to) the memory LRU:
    /// for whole-layer scans that should not evict hot chunks.
    pub fn peek(&self, digest: &Digest) -> Result<Option<Arc<Vec<u8>>>, CacheError> {
        if let Some(d) = self.memory.lock().unwrap().peek(digest) {
            return Ok(Some(d.clone()));
        }
        let io = |source| CacheError::Io {
            digest: digest.clone(),
            source,
        };
        let data = self
            .store
            .get(digest)
            .map_err(io)?
            .filter(|data| crate::digest::verify(digest, data).is_ok());
        match &data {
            Some(d) => self.note_verified(digest, d.len()),
            None => self.forget_verified(digest),
        }
        Ok(data.map(Arc::new))
    }

    /// The chunk, fetched by `fetch` on a miss — once, however many callers miss at the same
    /// time: if that fetch fails, each of them gets its error. `fetch` must return bytes it has
    /// verified against `digest`.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        digest: &Digest,
        fetch: F,
    ) -> Result<Arc<Vec<u8>>, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, CacheError>>,
    {
        // A memory hit needs no disk: no hand-off of this worker for it.
        let hit = if self.in_memory(digest) {
            self.lookup(digest)?
        } else {
            blocking(|| self.lookup(digest))?
        };
        if let Some(d) = hit {
            return Ok(d);
        }
        let flight = self
            .flights
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default()
            .clone();
        let _guard = flight.lock.lock().await;
        if let Some(e) = flight.failed.get() {
            return Err(CacheError::Shared(e.clone()));
        }
        let result = async {
            if let Some(d) = blocking(|| self.lookup(digest))? {
                return Ok(d);
            }
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().cache_misses.inc();
            let data = Arc::new(fetch().await?);
            blocking(|| self.insert(digest, data.clone()))?;
            Ok(data)
        }
        .await
        .map_err(|e: CacheError| {
            let e = e.shared();
            let _ = flight.failed.set(e.clone());
            CacheError::Shared(e)
        });
        self.flights.lock().unwrap().remove(digest);
        result
    }
}

#[cfg(test)]
mod tests;
