//! The chunk cache: verified, uncompressed spans of layers, on disk and in memory.
//!
//! Fifth stage of the pipeline. Chunks are content-addressed by the sha256 of their bytes, so
//! every image that uses a layer (or the same bytes in another layer) shares them. On disk a
//! chunk is written to a temp file and renamed into place — a crash leaves no half-written
//! chunk under a chunk's name — and it is verified again whenever it is loaded, so a damaged
//! file is dropped and fetched again rather than served. In memory an LRU keeps hot chunks;
//! concurrent misses on one chunk cause one fetch (single-flight).

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use oci_spec::image::Digest;

/// Where chunks persist. Implementations need not verify; [`Cache`] does.
pub trait ChunkStore: Send + Sync {
    /// The stored bytes for `digest`, if any.
    fn get(&self, digest: &Digest) -> std::io::Result<Option<Vec<u8>>>;
    /// Stores `data` under `digest` atomically.
    fn put(&self, digest: &Digest, data: &[u8]) -> std::io::Result<()>;
    /// Whether `digest` is stored (without reading it).
    fn contains(&self, digest: &Digest) -> bool;
    /// Drops `digest` (absent is fine).
    fn remove(&self, digest: &Digest) -> std::io::Result<()>;
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
        let path = self.path(digest);
        match std::fs::read(&path) {
            Ok(d) => {
                // The modification time orders eviction: least recently used first.
                let _ = std::fs::File::open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Ok(Some(d))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, digest: &Digest, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.path(digest);
        if path.exists() {
            return Ok(());
        }
        // No fsync: a chunk lost or damaged by a crash fails verification and is fetched again.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp)?;
        tmp.write_all(data)?;
        tmp.persist(path).map_err(|e| e.error)?;
        self.account(data.len() as u64);
        Ok(())
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
    flights: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    pub stats: CacheStats,
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
            stats: CacheStats::default(),
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
        self.store
            .put(digest, &data)
            .map_err(|source| CacheError::Io {
                digest: digest.clone(),
                source,
            })?;
        self.memory.lock().unwrap().put(digest.clone(), data);
        Ok(())
    }

    /// Stores a chunk on disk only (used while streaming a whole layer).
    pub fn insert_cold(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        self.store
            .put(digest, data)
            .map_err(|source| CacheError::Io {
                digest: digest.clone(),
                source,
            })
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
            self.store.remove(digest).map_err(io)?;
            return Ok(None);
        }
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
        Ok(self
            .store
            .get(digest)
            .map_err(io)?
            .filter(|data| crate::digest::verify(digest, data).is_ok())
            .map(Arc::new))
    }

    /// The chunk, fetched by `fetch` on a miss — once, however many callers miss at the same
    /// time. `fetch` must return bytes it has verified against `digest`.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        digest: &Digest,
        fetch: F,
    ) -> Result<Arc<Vec<u8>>, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, CacheError>>,
    {
        if let Some(d) = self.lookup(digest)? {
            return Ok(d);
        }
        let flight = self
            .flights
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default()
            .clone();
        let _guard = flight.lock().await;
        let result = async {
            if let Some(d) = self.lookup(digest)? {
                return Ok(d);
            }
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().cache_misses.inc();
            let data = Arc::new(fetch().await?);
            self.insert(digest, data.clone())?;
            Ok(data)
        }
        .await;
        self.flights.lock().unwrap().remove(digest);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn single_flight_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
        let cache = Arc::new(Cache::new(store.clone(), 2));
        let data = b"chunk bytes".to_vec();
        let digest = crate::digest::sha256(&data);
        let calls = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls, data, digest) =
                    (cache.clone(), calls.clone(), data.clone(), digest.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(&digest, || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok(data)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(*t.await.unwrap(), b"chunk bytes");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one fetch for eight readers"
        );

        // A damaged file on disk is dropped, not served.
        let fresh = Cache::new(store.clone(), 2);
        std::fs::write(
            dir.path().join("cache/chunks").join(digest.digest()),
            b"chunk bytez",
        )
        .unwrap();
        assert!(fresh.lookup(&digest).unwrap().is_none());
        assert!(!store.contains(&digest));
        assert_eq!(fresh.stats.corrupt_dropped.load(Ordering::Relaxed), 1);
        // A temp file left by a crash is never looked at as a chunk.
        std::fs::write(dir.path().join("tmp/.tmpXYZ"), b"partial").unwrap();
        assert!(fresh.lookup(&digest).unwrap().is_none());
    }

    #[test]
    fn memory_keeps_to_its_byte_budget_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
        let cache = Cache::new(store, 64).with_memory_budget(2500);
        let chunks: Vec<(Digest, Arc<Vec<u8>>)> = (0..4u8)
            .map(|i| {
                let data = vec![i; 1000];
                (crate::digest::sha256(&data), Arc::new(data))
            })
            .collect();
        for (d, data) in &chunks {
            cache.insert(d, data.clone()).unwrap();
        }
        let memory = cache.memory.lock().unwrap();
        assert_eq!(memory.bytes, 2000);
        assert!(!memory.contains(&chunks[0].0) && !memory.contains(&chunks[1].0));
        assert!(memory.contains(&chunks[2].0) && memory.contains(&chunks[3].0));
        drop(memory);
        // Evicted from memory, still on disk.
        assert!(cache.contains(&chunks[0].0));
    }
}
