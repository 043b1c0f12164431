//! Reading a layer's uncompressed tar stream at any offset, through the chunk cache.
//!
//! A read maps to the spans that cover it. Spans already cached are served from the cache;
//! runs of adjacent missing spans are fetched with one range request, each span's compressed
//! bytes checked against its digest, decompressed from its checkpoint and checked again before
//! it is cached or served. eStargz chunks ([`Fetch::Member`]) are inflated from their gzip
//! member's start and checked against their chunk digest.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{build_index, gzip, Fetch, IndexFormat, LayerError, LayerIndex, Limits, DEFAULT_SPAN};
use crate::cache::{Cache, CacheError};
use crate::image::Compression;
use crate::source::{BlobSource, SequentialReader, SourceError};

/// Why bytes of a layer could not be read; every message names the layer blob.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("layer {blob}: no span at offset {offset}")]
    NoSpan { blob: String, offset: u64 },
    #[error("layer {blob}: the index it is read with does not describe the layer (diff_id {diff_id}): not served (run `stratafs index verify`, or build the index locally)")]
    WrongIndex { blob: String, diff_id: String },
    #[error("{0}")]
    Stream(#[source] LayerError),
    #[error("layer {blob}: span at {offset} is missing after streaming the layer again")]
    Lost { blob: String, offset: u64 },
    #[error("layer {blob}: span at {offset} is not in the cache and this layer has no random access (stream it again with `stratafs index build`)")]
    NoRandomAccess { blob: String, offset: u64 },
    #[error("layer {blob}: {source}")]
    Source {
        blob: String,
        #[source]
        source: SourceError,
    },
    #[error("layer {blob}: the window file of its index is missing (build the index again: `stratafs index build`)")]
    NoWindowFile { blob: String },
    #[error("layer {blob}: checkpoint window: {source}")]
    WindowSource {
        blob: String,
        #[source]
        source: SourceError,
    },
    #[error("layer {blob}: the window of the checkpoint at {offset} in its window file is not a {size}-byte window")]
    BadWindow {
        blob: String,
        offset: u64,
        size: usize,
    },
    #[error("layer {blob}: span at {offset} failed verification ({what}): {detail}")]
    Verification {
        blob: String,
        offset: u64,
        what: String,
        detail: String,
    },
    #[error("layer {blob}: span at {offset}: its checkpoint window is not at hand")]
    NoWindowAtHand { blob: String, offset: u64 },
}

impl From<ReadError> for CacheError {
    fn from(e: ReadError) -> CacheError {
        CacheError::Read(Box::new(e))
    }
}

/// Range size and parallelism of a whole-layer streaming pass (4 MiB in flight per layer: far
/// above the bandwidth-delay product of the links we serve — 250 KB at 100 Mbit/s and 20 ms,
/// or at 1 Gbit/s and 2 ms — and a bound on memory while the layers of an image stream side
/// by side).
const STREAM_CHUNK: u64 = 1 << 20;
const STREAM_PARALLEL: usize = 4;

/// What a streaming pass needs to know about the layer.
pub struct StreamSpec {
    pub compression: Compression,
    pub blob: oci_spec::image::Digest,
    pub diff_id: oci_spec::image::Digest,
    pub blob_size: u64,
    pub span: u64,
    pub limits: Limits,
    /// Where to keep the window file of a gzip layer (`None`: not kept, as when a layer
    /// without random access is streamed again only to refill the cache).
    pub windows: Option<super::IndexStore>,
}

/// Streams a whole blob once (parallel range requests), builds its index — verified against the
/// blob digest and diff_id — and puts its spans into the cache on the way, up to the cache's
/// [`Cache::pass_budget`]. Chunks the pass added are removed again if the pass fails (a blob or
/// diff_id mismatch, a tar error, a limit): nothing of a layer that did not verify is kept.
/// A plain zstd layer (no random access: served from the cache only) that does not fit the
/// budget is refused.
pub async fn stream_index(
    source: Arc<dyn BlobSource>,
    spec: StreamSpec,
    cache: Arc<Cache>,
) -> Result<LayerIndex, LayerError> {
    let reader = SequentialReader::new(
        source,
        tokio::runtime::Handle::current(),
        STREAM_CHUNK,
        STREAM_PARALLEL,
    );
    tokio::task::spawn_blocking(move || {
        let budget = cache.pass_budget();
        let mut added = Vec::new();
        let (mut kept, mut dropped) = (0u64, false);
        let mut windows_file = spec.windows.as_ref().map(|s| s.new_windows()).transpose()?;
        let mut windows: Box<dyn std::io::Write> = match &mut windows_file {
            Some(f) => Box::new(std::io::BufWriter::new(f.as_file_mut())),
            None => Box::new(std::io::sink()),
        };
        let mut result = build_index(
            reader,
            spec.compression,
            &spec.blob,
            &spec.diff_id,
            spec.blob_size,
            spec.span,
            &mut |digest, data| {
                if cache.contains(digest) {
                    return Ok(());
                }
                if kept + data.len() as u64 > budget {
                    dropped = true;
                    return Ok(());
                }
                cache
                    .insert_cold(digest, data)
                    .map_err(std::io::Error::other)?;
                kept += data.len() as u64;
                added.push(digest.clone());
                Ok(())
            },
            &mut windows,
            &spec.limits,
        );
        let flushed = windows.flush();
        drop(windows);
        if let (Ok(index), Some(store), Some(file)) = (&result, &spec.windows, windows_file) {
            let kept = flushed
                .map_err(|e| LayerError::Store {
                    path: file.path().to_path_buf(),
                    detail: e.to_string(),
                })
                .and_then(|()| store.keep_windows(file, index.windows.as_ref()));
            if let Err(e) = kept {
                result = Err(e);
            }
        }
        if dropped && spec.compression == Compression::Zstd {
            if let Ok(index) = &result {
                result = Err(LayerError::Corrupt {
                    blob: spec.blob.clone(),
                    detail: format!(
                        "a plain zstd layer is served from the cache only, and its {} bytes do not fit the {budget} bytes one layer may use (half the cache cap): raise [cache] max_size",
                        index.size
                    ),
                });
            }
        }
        if result.is_err() {
            for digest in &added {
                if let Err(e) = cache.remove(digest) {
                    tracing::warn!(error = %e, "could not drop a chunk of a failed pass");
                }
            }
        }
        result
    })
    .await
    .expect("index build task")
}

/// Spans fetched ahead of a sequential reader.
const READAHEAD: usize = 4;

/// Upper bound on the bytes one coalesced range request fetches.
const MAX_COALESCED: u64 = 16 << 20;

/// Fewest compressed bytes a fetch from a layer indexed by its TOC (eStargz, zstd:chunked)
/// reads while the chunks after the one missed are missing too. Those spans are single file
/// chunks, often a few KiB, and a program that loads file after file from one directory (as
/// `import` does) would otherwise pay a round trip for each; tar order keeps a directory's
/// files together. 512 KiB is about two round trips' worth of transfer at 100 Mbit/s and 20 ms.
const MIN_TOC_FETCH: u64 = 512 << 10;

/// Fewest compressed bytes a demand miss of a layer indexed as its tar stream fetches while
/// the spans after the one missed are missing too. Spans are small (256 KiB of tar, so a miss
/// costs little beyond what it reads), but programs read file after file in tar order (an
/// `import` walks a package's directory), and each miss costs a round trip: a miss brings the
/// neighbours too, about one and a half round trips' worth of transfer at 100 Mbit/s and
/// 20 ms. On the cold-start benchmark 384 KiB kept the bytes fetched within 1.5× the files'
/// compressed size (512 KiB: 1.6×, no faster). Profile replay reads exactly what it asks for.
const MIN_MISS_FETCH: u64 = 384 << 10;

/// Lowers the calling thread's CPU priority (nice 10) until dropped, then restores it (when
/// the process may: raising it back needs CAP_SYS_NICE, which root has). For work done ahead
/// of reads, so that it yields the CPU to the requests a workload is waiting for.
struct LowerPriority {
    tid: libc::id_t,
    before: libc::c_int,
}

impl LowerPriority {
    fn new() -> LowerPriority {
        // SAFETY: plain syscalls on this thread's own id; no memory is shared.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let before = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, before.max(10));
            LowerPriority { tid, before }
        }
    }
}

impl Drop for LowerPriority {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, self.tid, self.before);
        }
    }
}

/// Lazy reads of one layer.
pub struct LayerReader {
    index: Arc<LayerIndex>,
    source: Arc<dyn BlobSource>,
    /// The index's window file (gzip checkpoint windows), local or in the registry.
    windows: Option<Arc<dyn BlobSource>>,
    cache: Arc<Cache>,
    restreaming: tokio::sync::Mutex<()>,
    /// The last span of the previous fetch, to spot sequential misses (`usize::MAX`: none).
    last_fetched: std::sync::atomic::AtomicUsize,
    /// Whole-layer check: UNCHECKED until every span is cached, then VERIFIED or WRONG.
    completeness: std::sync::atomic::AtomicU8,
    /// Fetches this reader made (a read that fetched may have completed the layer).
    fetches: std::sync::atomic::AtomicU64,
    /// A published index is checked on the first read too (its layer may be complete already).
    first_read: std::sync::atomic::AtomicBool,
    /// Where a published index that passed the whole-layer check is stored again, under its
    /// own pin, as checked (`published` cleared), so later opens need not check it again.
    remember: Option<super::IndexStore>,
    /// Spans a run in flight is fetching, each with that run's "done" signal (a semaphore
    /// closed when the run ends): a read of such a span waits for the run instead of fetching
    /// the same bytes again (single flight per range, not just per span).
    inflight: std::sync::Mutex<std::collections::HashMap<usize, Arc<tokio::sync::Semaphore>>>,
    /// Spans known to be cached (set when one is found or stored), so checks that a range or
    /// the whole layer is cached cost no `stat` for them. A span evicted later keeps its mark
    /// until a check that asks the cache (`is_stored`, the completeness check) finds it gone;
    /// meanwhile a read of it simply fetches it again.
    known_cached: Vec<std::sync::atomic::AtomicBool>,
}

/// Unregisters a run's spans and wakes its waiters when the run ends (however it ends).
struct RunGuard<'a> {
    reader: &'a LayerReader,
    spans: std::ops::RangeInclusive<usize>,
    done: Arc<tokio::sync::Semaphore>,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        crate::metrics::metrics().fetches_in_flight.dec();
        let mut inflight = self.reader.inflight.lock().unwrap();
        for j in self.spans.clone() {
            if inflight.get(&j).is_some_and(|d| Arc::ptr_eq(d, &self.done)) {
                inflight.remove(&j);
            }
        }
        self.done.close();
    }
}

const UNCHECKED: u8 = 0;
const VERIFIED: u8 = 1;
const WRONG: u8 = 2;

impl LayerReader {
    pub fn new(index: Arc<LayerIndex>, source: Arc<dyn BlobSource>, cache: Arc<Cache>) -> Self {
        LayerReader {
            source,
            windows: None,
            cache,
            restreaming: tokio::sync::Mutex::new(()),
            last_fetched: std::sync::atomic::AtomicUsize::new(usize::MAX),
            completeness: std::sync::atomic::AtomicU8::new(UNCHECKED),
            fetches: std::sync::atomic::AtomicU64::new(0),
            first_read: std::sync::atomic::AtomicBool::new(true),
            remember: None,
            inflight: Default::default(),
            known_cached: (0..index.spans.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            index,
        }
    }

    /// Reads checkpoint windows from `windows`, the index's window file.
    pub fn with_windows(mut self, windows: Option<Arc<dyn BlobSource>>) -> Self {
        self.windows = windows;
        self
    }

    /// Stores a published index that passes the whole-layer check in `store`, under the pin
    /// it is kept by (never as the layer's shared index), marked checked.
    pub fn remembering_checks_in(mut self, store: super::IndexStore) -> Self {
        self.remember = Some(store);
        self
    }

    /// Claims the run of missing spans from `i` (up to `until`, stopping before any span
    /// another run is fetching) for this fetch; `Err` with that run's signal if span `i`
    /// itself is being fetched.
    fn claim_run(
        &self,
        i: usize,
        until: u64,
    ) -> Result<(usize, RunGuard<'_>), Arc<tokio::sync::Semaphore>> {
        let mut inflight = self.inflight.lock().unwrap();
        if let Some(done) = inflight.get(&i) {
            return Err(done.clone());
        }
        let mut last = self.missing_run_end(i, until);
        if let Some(j) = (i + 1..=last).find(|j| inflight.contains_key(j)) {
            last = j - 1;
        }
        let done = Arc::new(tokio::sync::Semaphore::new(0));
        for j in i..=last {
            inflight.insert(j, done.clone());
        }
        crate::metrics::metrics().fetches_in_flight.inc();
        Ok((
            last,
            RunGuard {
                reader: self,
                spans: i..=last,
                done,
            },
        ))
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    /// Whether span `i` is cached (memory or disk): from memory once it was seen cached.
    fn span_cached(&self, i: usize) -> bool {
        if self.known_cached[i].load(Ordering::Relaxed) {
            return true;
        }
        let cached = self.cache.contains(&self.index.spans[i].digest);
        if cached {
            self.known_cached[i].store(true, Ordering::Relaxed);
        }
        cached
    }

    /// Whether span `i` is in the cache now (asking the cache; a span found evicted loses its
    /// mark, so the cheap checks stop taking it for cached).
    fn span_stored(&self, i: usize) -> bool {
        let stored = self.cache.contains(&self.index.spans[i].digest);
        self.known_cached[i].store(stored, Ordering::Relaxed);
        stored
    }

    /// Like [`is_cached`](Self::is_cached), but asking the cache for every span (no marks):
    /// for callers that must not fetch when the answer is yes.
    pub fn is_stored(&self, offset: u64, len: u64) -> bool {
        self.every_span(offset, len, |i| self.span_stored(i))
    }

    /// Whether `check` holds for every span holding bytes `offset..offset + len`.
    fn every_span(&self, offset: u64, len: u64, check: impl Fn(usize) -> bool) -> bool {
        let end = (offset + len).min(self.index.size);
        let mut pos = offset;
        while pos < end {
            let Some(i) = self.index.span_at(pos) else {
                return false;
            };
            if !check(i) {
                return false;
            }
            let span = &self.index.spans[i];
            pos = (span.out_offset + span.out_len).max(pos + 1);
        }
        true
    }

    /// Uncompressed bytes of the layer that are cached (memory or disk).
    pub fn cached_bytes(&self) -> u64 {
        (0..self.index.spans.len())
            .filter(|i| self.span_cached(*i))
            .map(|i| self.index.spans[i].out_len)
            .sum()
    }

    /// Whether every span holding bytes `offset..offset + len` is cached (memory or disk), so
    /// reading them needs no network.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        self.every_span(offset, len, |i| self.span_cached(i))
    }

    /// Reads up to `len` bytes at uncompressed offset `offset` (fewer at the end of the stream).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        self.read_with(offset, len, true).await
    }

    /// Caches bytes `offset..offset + len` (fetching exactly the spans that hold them: no
    /// sequential read-ahead), as a profile replay does ahead of the reads it predicts.
    /// Spans cached already are not loaded (nor verified) again.
    pub async fn prefetch(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        self.cache_range(offset, len, false).await
    }

    /// Caches bytes `offset..offset + len` as a read would fetch them (with the spans after,
    /// up to [`MIN_MISS_FETCH`]): for a fetch started ahead of a read that is about to come.
    pub async fn fetch_ahead(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        self.cache_range(offset, len, true).await
    }

    async fn cache_range(&self, offset: u64, len: u64, readahead: bool) -> Result<(), CacheError> {
        if self.is_cached(offset, len) {
            return Ok(());
        }
        self.read_with(offset, len, readahead).await.map(drop)
    }

    async fn read_with(
        &self,
        offset: u64,
        len: u64,
        readahead: bool,
    ) -> Result<Vec<u8>, CacheError> {
        if self.completeness.load(Ordering::Relaxed) == WRONG {
            return Err(self.wrong_index());
        }
        if self.index.published.is_some() && self.first_read.swap(false, Ordering::Relaxed) {
            self.check_complete().await?;
        }
        let started = std::time::Instant::now();
        let fetches_before = self.fetches.load(Ordering::Relaxed);
        let disk_before = self.cache.stats.disk_hits.load(Ordering::Relaxed);
        let out = self.read_spans(offset, len, readahead).await?;
        // Where the bytes came from, as far as counters tell (a concurrent read of the same
        // layer can blur it): fetched, loaded from disk, or all in memory.
        let source = if self.fetches.load(Ordering::Relaxed) != fetches_before {
            "registry"
        } else if self.cache.stats.disk_hits.load(Ordering::Relaxed) != disk_before {
            "disk"
        } else {
            "memory"
        };
        crate::metrics::metrics().read(source, started.elapsed().as_secs_f64());
        if source == "registry" {
            self.check_complete().await?;
        }
        Ok(out)
    }

    async fn read_spans(
        &self,
        offset: u64,
        len: u64,
        readahead: bool,
    ) -> Result<Vec<u8>, CacheError> {
        let end = (offset + len).min(self.index.size);
        if let Some(out) = self.read_cached(offset, end)? {
            return Ok(out);
        }
        let mut out = Vec::with_capacity((end.saturating_sub(offset)) as usize);
        let mut pos = offset;
        while pos < end {
            let i = self.index.span_at(pos).ok_or_else(|| {
                CacheError::from(ReadError::NoSpan {
                    blob: self.index.blob.to_string(),
                    offset: pos,
                })
            })?;
            let span = &self.index.spans[i];
            let data = self.span(i, end, readahead).await?;
            if data.len() as u64 != span.out_len {
                // Only an index that gives a span the digest of other bytes gets here.
                return Err(self.mismatch(&format!(
                    "span at {} holds {} bytes where the index says {}",
                    span.out_offset,
                    data.len(),
                    span.out_len
                )));
            }
            let from = (pos - span.out_offset) as usize;
            let to = ((end - span.out_offset) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            pos = span.out_offset + to as u64;
        }
        Ok(out)
    }

    /// Bytes `offset..end` if every span holding them can be read without a fetch or a
    /// verification ([`Cache::read_range`]: in memory, or on disk and verified by this process
    /// already): only the bytes asked for are read from disk. `None`: take the full path.
    fn read_cached(&self, offset: u64, end: u64) -> Result<Option<Vec<u8>>, CacheError> {
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Some(i) = self.index.span_at(pos) else {
                return Ok(None);
            };
            let span = &self.index.spans[i];
            let to = end.min(span.out_offset + span.out_len);
            if to <= pos {
                return Ok(None);
            }
            pieces.push((
                i,
                (pos - span.out_offset) as usize..(to - span.out_offset) as usize,
            ));
            pos = to;
        }
        let read = || -> Result<Option<Vec<u8>>, CacheError> {
            let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
            for (i, range) in &pieces {
                let span = &self.index.spans[*i];
                match self
                    .cache
                    .read_range(&span.digest, span.out_len, range.clone())?
                {
                    Some(d) => out.extend_from_slice(&d),
                    None => return Ok(None),
                }
            }
            Ok(Some(out))
        };
        let in_memory = pieces
            .iter()
            .all(|(i, _)| self.cache.in_memory(&self.index.spans[*i].digest));
        if in_memory {
            read()
        } else {
            crate::cache::blocking(read)
        }
    }

    /// Span `i`, fetching it — and the missing spans after it up to `until` — if needed.
    async fn span(
        &self,
        i: usize,
        until: u64,
        readahead: bool,
    ) -> Result<Arc<Vec<u8>>, CacheError> {
        let span = &self.index.spans[i];
        let data = self
            .cache
            .get_or_fetch(&span.digest, || async move {
                self.fetches.fetch_add(1, Ordering::Relaxed);
                if span.fetch == Fetch::Cached {
                    return self.restream(i).await;
                }
                // A miss right after the previous fetch means a sequential reader: fetch
                // READAHEAD more spans with this request.
                let previous = self.last_fetched.load(Ordering::Relaxed);
                let until = if readahead && previous != usize::MAX && i == previous + 1 {
                    let ahead = (i + READAHEAD).min(self.index.spans.len() - 1);
                    until.max(self.index.spans[ahead].out_offset + 1)
                } else {
                    until
                };
                let until = until.max(self.min_fetch_end(i, readahead));
                // Another run fetching span i: wait for it and take i from the cache (or, if
                // that run failed or i did not verify, fetch it here).
                let (last, _run) = loop {
                    match self.claim_run(i, until) {
                        Ok(claimed) => break claimed,
                        Err(done) => {
                            let _ = done.acquire().await; // an error: the run ended
                            if let Some(d) = self.cache.lookup(&span.digest)? {
                                return Ok((*d).clone());
                            }
                        }
                    }
                };
                self.last_fetched.store(last, Ordering::Relaxed);
                let mut spans = self.fetch_run(i, last, !readahead).await?.into_iter();
                let first = spans.next().expect("the run holds span i")?;
                // The others came along: kept if they verified; one that did not is fetched
                // (and reported) again when it is read itself.
                crate::cache::blocking(|| -> Result<(), CacheError> {
                    for (j, data) in (i + 1..=last).zip(spans) {
                        match data {
                            Ok(data) => {
                                self.cache
                                    .insert(&self.index.spans[j].digest, Arc::new(data))?;
                                self.known_cached[j].store(true, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                    Ok(())
                })?;
                Ok(first)
            })
            .await?;
        self.known_cached[i].store(true, Ordering::Relaxed);
        Ok(data)
    }

    /// Once every span of a layer indexed as its tar stream is cached, hashes them in order
    /// and compares the result with the layer's diff_id (from the verified config). Every span
    /// was checked against the index already; this checks the index against the layer — a
    /// published index whose spans do not add up to the layer is caught here, and the reader
    /// refuses further reads. For a published index the assembled tar stream is also parsed
    /// and every entry (path, type, mode, ids, size, data offset, link target, device numbers,
    /// xattrs, times) compared with the index: an index that arranges the layer's real bytes
    /// into other files is caught too.
    async fn check_complete(&self) -> Result<(), CacheError> {
        let index = &self.index;
        if index.format != IndexFormat::Stream
            || self.completeness.load(Ordering::Relaxed) != UNCHECKED
            || !(0..index.spans.len()).all(|i| self.span_cached(i))
            // The marks say complete: make sure (evictions clear marks), once per try.
            || !(0..index.spans.len()).all(|i| self.span_stored(i))
        {
            return Ok(());
        }
        let (index, cache, remember) = (
            self.index.clone(),
            self.cache.clone(),
            self.remember.clone(),
        );
        let verdict = tokio::task::spawn_blocking(
            move || -> Result<Option<Result<(), String>>, CacheError> {
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                for span in &index.spans {
                    match cache.peek(&span.digest)? {
                        Some(data) => sha2::Digest::update(&mut hasher, &*data),
                        None => return Ok(None), // evicted meanwhile: check another time
                    }
                }
                let actual = hex::encode(sha2::Digest::finalize(hasher));
                if actual != index.diff_id.digest() {
                    return Ok(Some(Err(format!(
                        "its bytes do not hash to its diff_id {}",
                        index.diff_id
                    ))));
                }
                if index.published.is_none() {
                    return Ok(Some(Ok(())));
                }
                let stream = CachedStream {
                    index: &index,
                    cache: &cache,
                    span: 0,
                    data: Arc::new(Vec::new()),
                    at: 0,
                    evicted: false,
                };
                let max = index.entries.len() + 1;
                let mut stream = stream;
                let parsed = super::tar::read_entries(&mut stream, u64::MAX, max);
                if stream.evicted {
                    return Ok(None);
                }
                let verdict = match parsed {
                    Err(e) => Err(format!("its tar stream does not parse: {e}")),
                    Ok(entries) => compare_entries(&index.entries, &entries),
                };
                // A checked published index is *not* stored as the layer's own (its diff_id
                // and the bytes behind it came from the image that pinned it, not from the
                // blob digest): it stays under that image's pin, marked checked.
                if let (Ok(()), Some(store), Some(pin)) = (&verdict, remember, &index.published) {
                    let mut checked = (*index).clone();
                    checked.published = None;
                    if let Err(e) = store.put(&checked, Some(pin)) {
                        tracing::warn!(error = %e, "could not record the checked index");
                    }
                }
                Ok(Some(verdict))
            },
        )
        .await
        .expect("completeness check task")?;
        match verdict {
            Some(Ok(())) => self.completeness.store(VERIFIED, Ordering::Relaxed),
            Some(Err(detail)) => return Err(self.mismatch(&detail)),
            None => {}
        }
        Ok(())
    }

    /// Marks the index wrong for good: logs it (naming layer and detail), counts it, and
    /// returns the error every later read gets.
    fn mismatch(&self, detail: &str) -> CacheError {
        if self.completeness.swap(WRONG, Ordering::Relaxed) != WRONG {
            self.cache
                .stats
                .index_mismatches
                .fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().index_mismatches.inc();
            tracing::error!(
                blob = %self.index.blob,
                published = ?self.index.published.as_ref().map(|d| d.to_string()),
                "the index does not describe the layer: {detail}; the layer is not served"
            );
        }
        self.wrong_index()
    }

    fn wrong_index(&self) -> CacheError {
        ReadError::WrongIndex {
            blob: self.index.blob.to_string(),
            diff_id: self.index.diff_id.to_string(),
        }
        .into()
    }

    /// For layers without random access: streams the whole layer again (once, however many
    /// readers miss) to refill the cache, then returns span `i`.
    async fn restream(&self, i: usize) -> Result<Vec<u8>, CacheError> {
        let digest = &self.index.spans[i].digest;
        let _one_at_a_time = self.restreaming.lock().await;
        if let Some(d) = self.cache.lookup(digest)? {
            return Ok((*d).clone());
        }
        let index = &self.index;
        tracing::info!(blob = %index.blob, "span evicted from a layer without random access: streaming it again");
        let spec = StreamSpec {
            compression: index.compression,
            blob: index.blob.clone(),
            diff_id: index.diff_id.clone(),
            blob_size: index.blob_size,
            span: index.spans.first().map_or(DEFAULT_SPAN, |s| s.out_len),
            limits: Limits {
                max_entries: Limits::default().max_entries.max(index.entries.len()),
                ..Limits::default()
            },
            windows: None,
        };
        stream_index(self.source.clone(), spec, self.cache.clone())
            .await
            .map_err(ReadError::Stream)?;
        match self.cache.lookup(digest)? {
            Some(d) => Ok((*d).clone()),
            None => Err(CacheError::from(ReadError::Lost {
                blob: index.blob.to_string(),
                offset: self.index.spans[i].out_offset,
            })),
        }
    }

    /// Where a fetch of span `i` should reach to, at least: far enough that it carries
    /// [`MIN_TOC_FETCH`] compressed bytes for a TOC-indexed layer, and [`MIN_MISS_FETCH`] for
    /// a demand miss (`readahead`) of a stream-indexed one (0: no minimum).
    fn min_fetch_end(&self, i: usize, readahead: bool) -> u64 {
        let spans = &self.index.spans;
        let min = match self.index.format {
            IndexFormat::Estargz | IndexFormat::ZstdChunked => MIN_TOC_FETCH,
            IndexFormat::Stream if readahead => MIN_MISS_FETCH,
            IndexFormat::Stream => return 0,
        };
        let Some((start, _)) = fetch_range(&spans[i].fetch) else {
            return 0;
        };
        let mut j = i;
        while j + 1 < spans.len()
            && fetch_range(&spans[j].fetch).is_some_and(|(_, end)| end.saturating_sub(start) < min)
        {
            j += 1;
        }
        spans[j].out_offset + 1
    }

    /// The last span of the run of uncached, fetchable spans starting at `i` that a read
    /// ending at `until` needs (see [`min_fetch_end`](Self::min_fetch_end)), bounded by
    /// [`MAX_COALESCED`].
    fn missing_run_end(&self, i: usize, until: u64) -> usize {
        let spans = &self.index.spans;
        let start = fetch_range(&spans[i].fetch).map_or(0, |r| r.0);
        let mut last = i;
        while last + 1 < spans.len()
            && spans[last + 1].out_offset < until
            && !self.span_cached(last + 1)
        {
            match fetch_range(&spans[last + 1].fetch) {
                Some((_, end)) if end.saturating_sub(start) <= MAX_COALESCED => last += 1,
                _ => break,
            }
        }
        last
    }

    /// Fetches spans `first..=last` with one range request and verifies each: the outer error
    /// is the request's, the inner ones each span's.
    ///
    /// A gzip run that starts at a checkpoint with a window takes the window from the end of
    /// the span before when that span is cached (so it is the layer's real output, whatever
    /// an index says), otherwise from the window file, read alongside the span bytes. Later
    /// spans of the run take theirs from the output just decoded.
    async fn fetch_run(
        &self,
        first: usize,
        last: usize,
        ahead: bool,
    ) -> Result<Vec<SpanResult>, CacheError> {
        let blob = &self.index.blob;
        let spans = &self.index.spans[first..=last];
        let ranges: Vec<(u64, u64)> = spans
            .iter()
            .map(|s| {
                fetch_range(&s.fetch).ok_or_else(|| {
                    CacheError::from(ReadError::NoRandomAccess {
                        blob: blob.to_string(),
                        offset: s.out_offset,
                    })
                })
            })
            .collect::<Result<_, _>>()?;
        // Spans are in blob order; the minimum still guards against an index that is not.
        let base = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let end = ranges.iter().map(|r| r.1).max().unwrap_or(base);
        let needs = self.checkpoint_of(first).filter(|cp| cp.window_size() > 0);
        let before_cached = needs.is_some() && first > 0 && self.span_cached(first - 1);
        let data = async {
            self.source
                .read_range(base, end - base)
                .await
                .map_err(|source| {
                    CacheError::from(ReadError::Source {
                        blob: blob.to_string(),
                        source,
                    })
                })
        };
        let before = async {
            if !before_cached {
                return Ok(None);
            }
            let (cache, digest) = (
                self.cache.clone(),
                self.index.spans[first - 1].digest.clone(),
            );
            tokio::task::spawn_blocking(move || cache.peek(&digest))
                .await
                .expect("cache peek task")
        };
        let window = async {
            match needs {
                Some(cp) if !before_cached => self.read_window(cp).await.map(Some),
                _ => Ok(None),
            }
        };
        let started = std::time::Instant::now();
        let (bytes, before, window) = tokio::join!(data, before, window);
        let (bytes, before, mut window) = (bytes?, before?, window?);
        tracing::debug!(
            blob = %&blob.digest()[..12], offset = spans[0].out_offset, spans = spans.len(),
            bytes = end - base, ms = started.elapsed().as_millis() as u64, "fetched"
        );
        // The first span's window: the end of the span before (the layer's real output), else
        // the window file's word for it.
        let mut first_window = None;
        let mut real_window = true;
        if let Some(cp) = needs {
            first_window = before
                .as_deref()
                .and_then(|b| cp.window_from(b))
                .map(<[u8]>::to_vec);
            if first_window.is_none() {
                real_window = false;
                // The span before was evicted meanwhile: read the window after all.
                if window.is_none() {
                    window = Some(self.read_window(cp).await?);
                }
                first_window = window;
            }
        }
        // Decompressing and hashing is CPU work: one blocking task for the whole run.
        let index = self.index.clone();
        // For a fetch ahead of reads (profile replay, an open), at a lower CPU priority: the
        // reads being served meanwhile come first on a busy machine.
        let decoded = tokio::task::spawn_blocking(move || {
            let _lowered = ahead.then(LowerPriority::new);
            let spans = &index.spans[first..=last];
            // A published index whose gzip span does not verify although its compressed bytes
            // do and its window is the real output before it: the index is wrong.
            let mut lie = None;
            let mut results: Vec<SpanResult> = Vec::with_capacity(spans.len());
            for (k, (span, (start, stop))) in spans.iter().zip(ranges).enumerate() {
                let raw = &bytes[(start - base) as usize..(stop - base) as usize];
                // Each later span's window is the end of the output just decoded (spans are
                // at least a window long, but the last).
                let before = match k {
                    0 => first_window.as_deref(),
                    _ => results[k - 1].as_deref().ok(),
                };
                let result = decode(&index, span, raw, before);
                if let (Err(e), Some(_), Fetch::Gzip { in_digest, .. }) =
                    (&result, &index.published, &span.fetch)
                {
                    let window_real = if k == 0 {
                        real_window
                    } else {
                        before.is_some()
                    };
                    if window_real && crate::digest::verify(in_digest, raw).is_ok() {
                        lie.get_or_insert_with(|| e.to_string());
                    }
                }
                results.push(result);
            }
            (results, lie)
        });
        let (results, lie) = decoded.await.expect("decode task");
        if let Some(detail) = lie {
            return Err(self.mismatch(&detail));
        }
        Ok(results)
    }

    /// The gzip checkpoint span `i` starts from, if it is fetched from one.
    fn checkpoint_of(&self, i: usize) -> Option<&gzip::Checkpoint> {
        match &self.index.spans[i].fetch {
            Fetch::Gzip { checkpoint, .. } => self.index.checkpoints.get(*checkpoint as usize),
            _ => None,
        }
    }

    /// The window of checkpoint `cp`, read from the layer's window file and inflated.
    async fn read_window(&self, cp: &gzip::Checkpoint) -> Result<Vec<u8>, CacheError> {
        let blob = &self.index.blob;
        let Some(source) = &self.windows else {
            return Err(ReadError::NoWindowFile {
                blob: blob.to_string(),
            }
            .into());
        };
        let raw = source
            .read_range(cp.window_at, cp.window_len)
            .await
            .map_err(|source| ReadError::WindowSource {
                blob: blob.to_string(),
                source,
            })?;
        let window = super::inflate(&raw)
            .ok()
            .filter(|w| w.len() == cp.window_size())
            .ok_or_else(|| {
                crate::metrics::metrics().verification_failures.inc();
                ReadError::BadWindow {
                    blob: blob.to_string(),
                    offset: cp.out_offset,
                    size: cp.window_size(),
                }
            })?;
        Ok(window)
    }
}

/// The uncompressed stream of a complete layer, read span by span from the cache without
/// promoting the chunks; `evicted` is set if a span went missing meanwhile.
struct CachedStream<'a> {
    index: &'a LayerIndex,
    cache: &'a Cache,
    span: usize,
    data: Arc<Vec<u8>>,
    at: usize,
    evicted: bool,
}

impl std::io::Read for CachedStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.data.len() {
            let Some(span) = self.index.spans.get(self.span) else {
                return Ok(0);
            };
            match self
                .cache
                .peek(&span.digest)
                .map_err(std::io::Error::other)?
            {
                Some(d) => self.data = d,
                None => {
                    self.evicted = true;
                    return Err(std::io::Error::other("span evicted"));
                }
            }
            self.span += 1;
            self.at = 0;
        }
        let n = buf.len().min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Compares the entries an index claims with those the layer's tar stream holds.
fn compare_entries(claimed: &[super::Entry], actual: &[super::Entry]) -> Result<(), String> {
    for (i, real) in actual.iter().enumerate() {
        match claimed.get(i) {
            Some(c) if c == real => {}
            Some(c) => {
                return Err(format!(
                    "entry /{} differs: index {c:?}, layer {real:?}",
                    real.path
                ))
            }
            None => return Err(format!("the index lacks entry /{}", real.path)),
        }
    }
    if claimed.len() > actual.len() {
        return Err(format!(
            "the index has {} entries, the layer {}",
            claimed.len(),
            actual.len()
        ));
    }
    Ok(())
}

/// Span `span` of `index` from its fetched (compressed) bytes `raw`, verified; `before` is
/// output known to precede the span (a gzip span's checkpoint window is taken from it).
fn decode(index: &LayerIndex, span: &super::Span, raw: &[u8], before: Option<&[u8]>) -> SpanResult {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        crate::metrics::metrics().verification_failures.inc();
        CacheError::from(ReadError::Verification {
            blob: index.blob.to_string(),
            offset: span.out_offset,
            what: what.to_string(),
            detail: e.to_string(),
        })
    };
    let data = match &span.fetch {
        Fetch::Range { .. } => raw.to_vec(),
        Fetch::Gzip {
            checkpoint,
            in_digest,
            ..
        } => {
            crate::digest::verify(in_digest, raw).map_err(|e| bad("compressed bytes", &e))?;
            let cp = &index.checkpoints[*checkpoint as usize];
            let window = match cp.window_size() {
                0 => &[][..],
                _ => before.and_then(|b| cp.window_from(b)).ok_or_else(|| {
                    CacheError::from(ReadError::NoWindowAtHand {
                        blob: index.blob.to_string(),
                        offset: span.out_offset,
                    })
                })?,
            };
            gzip::decode_span(cp, window, raw, span.out_len as usize)
                .map_err(|e| bad("decompression", &e))?
        }
        Fetch::Member { skip, .. } => {
            gzip::decode_member(raw, *skip as usize, span.out_len as usize)
                .map_err(|e| bad("decompression", &e))?
        }
        Fetch::Zstd { .. } => {
            decode_zstd(raw, span.out_len).map_err(|e| bad("decompression", &e))?
        }
        Fetch::Cached => unreachable!("cache-only spans are streamed, not fetched"),
    };
    crate::digest::verify(&span.digest, &data).map_err(|e| bad("uncompressed bytes", &e))?;
    Ok(data)
}

type SpanResult = Result<Vec<u8>, CacheError>;

/// The first `len` bytes decompressed from the zstd frames in `raw` (frames after the ones
/// holding them, such as the next entry's tar header, are not decoded).
fn decode_zstd(raw: &[u8], len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(len as usize);
    zstd::stream::read::Decoder::new(raw)?
        .take(len)
        .read_to_end(&mut out)?;
    if out.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("zstd frames hold {} of {len} bytes", out.len()),
        ));
    }
    Ok(out)
}

fn fetch_range(fetch: &Fetch) -> Option<(u64, u64)> {
    match fetch {
        Fetch::Range { in_start, in_end }
        | Fetch::Gzip {
            in_start, in_end, ..
        }
        | Fetch::Member {
            in_start, in_end, ..
        }
        | Fetch::Zstd { in_start, in_end } => Some((*in_start, *in_end)),
        Fetch::Cached => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DiskChunks;
    use crate::layer::build_index;
    use crate::source::{FaultySource, FileSource};
    use std::io::Write;

    /// A gzip layer holding one 2 MiB file, indexed with 64 KiB spans, read through a counting
    /// source.
    fn setup(
        dir: &std::path::Path,
    ) -> (LayerReader, Arc<FaultySource<FileSource>>, u64, u64, usize) {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..2usize << 20)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Half random, half text: compressible like real files, with many deflate blocks.
                if i % 2 == 0 {
                    (x >> 56) as u8
                } else {
                    b'a' + (i % 23) as u8
                }
            })
            .collect();
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", &data[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        let blob = e.finish().unwrap();
        let digest = crate::digest::sha256(&blob);
        let mut windows = Vec::new();
        let index = build_index(
            &blob[..],
            Compression::Gzip,
            &digest,
            &crate::digest::sha256(&tar),
            blob.len() as u64,
            64 << 10,
            &mut |_, _| Ok(()),
            &mut windows,
            &crate::layer::Limits::default(),
        )
        .unwrap();
        std::fs::write(dir.join("windows"), &windows).unwrap();
        let windows = Arc::new(
            FileSource::open(dir.join("windows"), index.windows.clone().unwrap().digest).unwrap(),
        );
        let path = dir.join("blob");
        std::fs::write(&path, &blob).unwrap();
        let source = Arc::new(FaultySource::new(FileSource::open(&path, digest).unwrap()));
        let cache = Arc::new(Cache::new(Arc::new(DiskChunks::open(dir).unwrap()), 1024));
        let (offset, size, spans) = (
            index.entries[0].offset,
            index.entries[0].size,
            index.spans.len(),
        );
        let reader =
            LayerReader::new(Arc::new(index), source.clone(), cache).with_windows(Some(windows));
        (reader, source, offset, size, spans)
    }

    #[tokio::test]
    async fn a_complete_layer_is_checked_against_its_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let (honest, _, offset, size, _) = setup(dir.path());
        let all = honest.read(offset, size).await.unwrap();
        assert_eq!(all.len() as u64, size);
        assert_eq!(honest.completeness.load(Ordering::Relaxed), VERIFIED);

        // The same spans under an index that claims another diff_id: reading the last span
        // completes the layer, the check fails, and the reader refuses to go on.
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, offset, size, _) = setup(dir.path());
        let mut lying = (*reader.index).clone();
        lying.diff_id = crate::digest::sha256(b"some other layer");
        let cache = reader.cache.clone();
        let reader = LayerReader::new(Arc::new(lying), source, cache);
        let err = reader.read(offset, size).await.unwrap_err().to_string();
        assert!(err.contains("does not describe the layer"), "{err}");
        assert_eq!(
            reader.cache.stats.index_mismatches.load(Ordering::Relaxed),
            1
        );
        let err = reader.read(offset, 10).await.unwrap_err().to_string();
        assert!(err.contains("index verify"), "{err}");
    }

    #[tokio::test]
    async fn a_published_index_is_checked_span_by_span_and_as_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, offset, size, _) = setup(dir.path());
        let mut published = (*reader.index).clone();
        published.published = Some(crate::digest::sha256(b"index blob"));
        let honest = Arc::new(published.clone());
        let cache = reader.cache.clone();
        // An honest published index: the complete layer verifies, and the index is stored
        // again under its pin, marked checked.
        let store_dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(store_dir.path().join("tmp")).unwrap();
        let store = crate::layer::IndexStore::new(store_dir.path());
        let r = LayerReader::new(honest.clone(), source.clone(), cache.clone())
            .with_windows(reader.windows.clone())
            .remembering_checks_in(store.clone());
        let mut pos = 0;
        while pos < size {
            let got = r.read(offset + pos, 100 << 10).await.unwrap();
            pos += got.len() as u64;
        }
        assert_eq!(r.completeness.load(Ordering::Relaxed), VERIFIED);
        let pin = honest.published.clone().unwrap();
        let kept = store
            .get(&honest.blob, Some(&pin))
            .unwrap()
            .expect("stored");
        assert!(kept.published.is_none(), "marked checked");
        assert!(
            store.get(&honest.blob, None).unwrap().is_none(),
            "not as the shared index"
        );

        // A forged window (and the span digest to match what it makes): never used while the
        // span before is at hand, whose output is the real window — the span fails its digest
        // although its compressed bytes verify, so the index is refused as a whole.
        let mut forged = published.clone();
        let k = forged
            .spans
            .iter()
            .position(|s| {
                matches!(&s.fetch, Fetch::Gzip { checkpoint, .. }
                if forged.checkpoints[*checkpoint as usize].window_len > 0)
            })
            .unwrap();
        let Fetch::Gzip {
            checkpoint,
            in_start,
            in_end,
            ..
        } = forged.spans[k].fetch.clone()
        else {
            unreachable!()
        };
        let cp = &mut forged.checkpoints[checkpoint as usize];
        let real = r.read_window(cp).await.unwrap();
        let window: Vec<u8> = real.iter().map(|b| b ^ 0x55).collect();
        let mut file = std::fs::read(dir.path().join("windows")).unwrap();
        let deflated = crate::layer::deflate(&window);
        (cp.window_at, cp.window_len) = (file.len() as u64, deflated.len() as u64);
        file.extend_from_slice(&deflated);
        let raw = source
            .read_range(in_start, in_end - in_start)
            .await
            .unwrap();
        let out = gzip::decode_span(cp, &window, &raw, forged.spans[k].out_len as usize).unwrap();
        forged.spans[k].digest = crate::digest::sha256(&out);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forged"), &file).unwrap();
        forged.windows = Some(crate::layer::Windows {
            digest: crate::digest::sha256(&file),
            size: file.len() as u64,
        });
        let windows: Arc<dyn BlobSource> = Arc::new(
            FileSource::open(dir.path().join("forged"), crate::digest::sha256(&file)).unwrap(),
        );
        let fresh = Arc::new(Cache::new(
            Arc::new(DiskChunks::open(dir.path()).unwrap()),
            1024,
        ));
        let r = LayerReader::new(Arc::new(forged.clone()), source.clone(), fresh.clone())
            .with_windows(Some(windows));
        r.prefetch(forged.spans[k - 1].out_offset, 10)
            .await
            .unwrap();
        let err = r
            .read(forged.spans[k].out_offset, 10)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not describe the layer"), "{err}");
        assert_eq!(fresh.stats.index_mismatches.load(Ordering::Relaxed), 1);

        // The same index claiming another entry list: caught at the first read of the
        // complete layer, counted, and refused from then on.
        let mut lying = published.clone();
        lying.entries[0].mode ^= 0o4000;
        let r = LayerReader::new(Arc::new(lying), source.clone(), cache.clone());
        let err = r.read(offset, 10).await.unwrap_err().to_string();
        assert!(err.contains("does not describe the layer"), "{err}");
        assert_eq!(cache.stats.index_mismatches.load(Ordering::Relaxed), 1);
        assert!(r.read(offset, 10).await.is_err());
    }

    #[tokio::test]
    async fn a_read_of_a_span_another_run_is_fetching_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, _, _, spans) = setup(dir.path());
        assert!(spans > 6);
        source.set_faults(crate::source::Faults {
            delay: Some(std::time::Duration::from_millis(200)),
            ..Default::default()
        });
        let reader = Arc::new(reader);
        let end = {
            let s = &reader.index().spans[5];
            s.out_offset + s.out_len
        };
        // Reader A fetches spans 0..=5 with one request...
        let a = {
            let r = reader.clone();
            tokio::spawn(async move { r.read(0, end).await.map(|d| d.len() as u64) })
        };
        while source.started() == 0 {
            tokio::task::yield_now().await;
        }
        // ...and reader B, wanting bytes of span 3 while that request is in flight, waits
        // for it instead of fetching them again.
        let at = reader.index().spans[3].out_offset + 10;
        assert_eq!(reader.read(at, 100).await.unwrap().len(), 100);
        assert_eq!(a.await.unwrap().unwrap(), end);
        assert_eq!(source.counts().0, 1, "one range request for both readers");
        // A span the run did not cover is fetched by whoever needs it.
        let beyond = reader.index().spans[6].out_offset;
        reader.read(beyond, 10).await.unwrap();
        assert_eq!(source.counts().0, 2);
    }

    #[tokio::test]
    async fn sequential_misses_read_ahead_and_random_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, offset, size, spans) = setup(dir.path());
        assert!(spans >= 12, "{spans} spans");
        // A FUSE-like sequential reader: 16 KiB at a time.
        let mut pos = 0;
        while pos < size {
            let got = reader.read(offset + pos, 16 << 10).await.unwrap();
            pos += got.len() as u64;
        }
        let (sequential_reads, _) = source.counts();
        assert!(
            (sequential_reads as usize) * 3 < spans,
            "{sequential_reads} range reads for {spans} spans"
        );

        // Scattered single-span prefetches (profile replay) on a fresh cache fetch one span
        // each, nothing ahead.
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, _, _, spans) = setup(dir.path());
        for k in [spans - 2, 3, spans / 2, 7, 1] {
            let at = reader.index().spans[k].out_offset + 100;
            reader.prefetch(at, 10).await.unwrap();
        }
        let (reads, bytes) = source.counts();
        assert_eq!(reads, 5);
        let max_span = reader
            .index()
            .spans
            .iter()
            .map(|s| match s.fetch {
                Fetch::Gzip {
                    in_start, in_end, ..
                } => in_end - in_start,
                _ => 0,
            })
            .max()
            .unwrap();
        assert!(bytes <= 5 * max_span, "{bytes} bytes");

        // A demand miss brings the spans after it too, up to MIN_MISS_FETCH compressed bytes:
        // a read of span 1 then covers span 3, and nothing is fetched twice.
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, _, _, spans) = setup(dir.path());
        for k in [1, 3, spans / 2, spans - 2] {
            let at = reader.index().spans[k].out_offset + 100;
            reader.read(at, 10).await.unwrap();
        }
        let (reads, bytes) = source.counts();
        assert!(max_span * 3 < MIN_MISS_FETCH, "spans of {max_span} bytes");
        assert_eq!(reads, 3, "1 (with 3), half-way, the end");
        assert!(bytes <= 3 * (MIN_MISS_FETCH + max_span), "{bytes} bytes");
        assert!(bytes >= 2 * MIN_MISS_FETCH, "{bytes} bytes");
    }
}
