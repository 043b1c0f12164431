//! Reading a layer's uncompressed tar stream at any offset, through the chunk cache.
//!
//! A read maps to the spans that cover it. Spans already cached are served from the cache;
//! runs of adjacent missing spans are fetched with one range request, each span's compressed
//! bytes checked against its digest, decompressed from its checkpoint and checked again before
//! it is cached or served. eStargz chunks ([`Fetch::Member`]) are inflated from their gzip
//! member's start and checked against their chunk digest.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Fetch, IndexFormat, LayerError, LayerIndex, Limits, DEFAULT_SPAN};
use crate::cache::{Cache, CacheError};
use crate::source::{BlobSource, SourceError};
use decode::fetch_range;
use want::Want;

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
    /// Room for fetches under way, shared with the mount's other layers.
    budgets: budget::Budgets,
    /// Spans a run in flight is fetching, each with that run's signal: a read of such a span
    /// waits for the run instead of fetching the same bytes again (single flight per range,
    /// not just per span).
    inflight: std::sync::Mutex<std::collections::HashMap<usize, Arc<RunSignal>>>,
    /// Where the layer's last read that fetched ended, and when (a tick of the mount's clock
    /// of such fetches; 0: never): background fill continues from there ([`Self::last_read`]).
    last_read: std::sync::Mutex<(u64, u64)>,
    /// Spans known to be cached (set when one is found or stored), so checks that a range or
    /// the whole layer is cached cost no `stat` for them. A span evicted later keeps its mark
    /// until a check that asks the cache (`is_stored`, the completeness check) finds it gone;
    /// meanwhile a read of it simply fetches it again.
    known_cached: Vec<std::sync::atomic::AtomicBool>,
    /// Checkpoint windows asked for ahead of the fetches that read them ([`windows`]).
    windows_ahead: windows::Ahead,
    /// Small fetches ahead of reads starting together, to share a request ([`together`]).
    together: together::Together,
}

/// How a run of spans in flight ends, for the reads waiting for it.
struct RunSignal {
    /// Closed when the run ends (however it ends).
    done: tokio::sync::Semaphore,
    /// Set if the fetch failed as a whole (the registry's answer after its retries): waiters
    /// return this error instead of fetching again, so a read waits for one retry budget, not
    /// one per run it queued behind. A run dropped unfinished sets nothing: waiters fetch.
    failed: std::sync::OnceLock<Arc<CacheError>>,
}

impl RunSignal {
    fn new() -> Arc<RunSignal> {
        Arc::new(RunSignal {
            done: tokio::sync::Semaphore::new(0),
            failed: std::sync::OnceLock::new(),
        })
    }

    fn ended() -> Arc<RunSignal> {
        let signal = RunSignal::new();
        signal.done.close();
        signal
    }
}

/// Unregisters a run's spans and wakes its waiters when the run ends (however it ends).
struct RunGuard<'a> {
    reader: &'a LayerReader,
    spans: std::ops::RangeInclusive<usize>,
    done: Arc<RunSignal>,
}

impl RunGuard<'_> {
    /// The run failed with `e`: its waiters get the same error.
    fn fail(&self, e: CacheError) -> CacheError {
        let e = e.shared();
        let _ = self.done.failed.set(e.clone());
        CacheError::Shared(e)
    }
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
        self.done.done.close();
    }
}

/// Entries after a read that [`LayerReader::neighbours_stop`] looks at for a shared object
/// (a neighbours' fetch of 256 KiB compressed holds far fewer files).
const NEIGHBOURS_SCAN: usize = 1024;

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
            budgets: budget::Budgets::default(),
            inflight: Default::default(),
            last_read: Default::default(),
            known_cached: (0..index.spans.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            windows_ahead: Default::default(),
            together: Default::default(),
            index,
        }
    }

    /// Shares `budgets` for fetches under way with the mount's other layers (else this reader
    /// has its own).
    pub fn with_budgets(mut self, budgets: budget::Budgets) -> Self {
        self.budgets = budgets;
        self
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
    /// itself is being fetched — or, when `after_cached`, with a closed one if a run that
    /// ended since the caller missed the cache stored span `i` (runs mark their spans cached
    /// before they release them), so the caller looks in the cache again instead of fetching.
    fn claim_run(
        &self,
        i: usize,
        until: u64,
        after_cached: bool,
    ) -> Result<(usize, RunGuard<'_>), Arc<RunSignal>> {
        let mut inflight = self.inflight.lock().unwrap();
        if let Some(done) = inflight.get(&i) {
            return Err(done.clone());
        }
        if after_cached && self.known_cached[i].load(Ordering::Relaxed) {
            return Err(RunSignal::ended());
        }
        let mut last = self.missing_run_end(i, until);
        if let Some(j) = (i + 1..=last).find(|j| inflight.contains_key(j)) {
            last = j - 1;
        }
        let done = RunSignal::new();
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

    /// Where the layer's last read that had to fetch ended, and the tick of the mount's clock
    /// of such fetches when it did (0: no read has fetched). The layer's next reads are often
    /// just after it (tar order keeps a directory's files together).
    pub fn last_read(&self) -> (u64, u64) {
        *self.last_read.lock().unwrap()
    }

    /// Whether span `i` is cached (memory or disk): from memory once it was seen cached.
    pub(crate) fn span_cached(&self, i: usize) -> bool {
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
        self.spans_over(offset, len).all(|i| i.is_some_and(&check))
    }

    /// The spans holding bytes `offset..offset + len`, in order; `None` (and nothing after
    /// it) where no span holds the next byte.
    fn spans_over(&self, offset: u64, len: u64) -> impl Iterator<Item = Option<usize>> + '_ {
        let end = (offset + len).min(self.index.size);
        let mut pos = Some(offset);
        std::iter::from_fn(move || {
            let at = pos.filter(|p| *p < end)?;
            let i = self.index.span_at(at);
            pos = i.map(|i| {
                let span = &self.index.spans[i];
                (span.out_offset + span.out_len).max(at + 1)
            });
            Some(i)
        })
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
    /// A miss fetches the spans the read needs (more if the reader is sequential) and, for a
    /// stream-indexed layer, the missing spans after them up to `MIN_MISS_FETCH` compressed
    /// bytes, in one request.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        self.read_with(offset, len, Want::Demand).await
    }

    /// As [`read`](Self::read), but a miss fetches only what the read needs (and the sequential
    /// read-ahead): for a caller that starts [`fetch_neighbours`](Self::fetch_neighbours) once
    /// the read is served, so the read waits for its own bytes only.
    pub async fn read_alone(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        self.read_with(offset, len, Want::DemandAlone).await
    }

    /// As [`read`](Self::read), but a miss fetches exactly the spans that hold the bytes —
    /// no neighbours, no read-ahead — and does not count as a read of the layer (its
    /// sequential read-ahead and the reads' budget are the reads' own): for a caller that
    /// reads a file's structure ahead of the program's reads of it (an ELF file's headers and
    /// dynamic section, whose neighbours in the layer are other files).
    pub async fn read_exact(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        self.read_hinted(offset, len, Want::Exact, None, true).await
    }

    /// As [`read`](Self::read) or, with `alone`, [`read_alone`](Self::read_alone), for a caller
    /// that knows whether this read continues its reader's previous one (an open file handle):
    /// a miss reads ahead when it does, whatever other files of the layer are read meanwhile
    /// (without such a caller, a miss right after the layer's previous fetch counts as one).
    pub async fn read_continuing(
        &self,
        offset: u64,
        len: u64,
        alone: bool,
        continues: bool,
    ) -> Result<Vec<u8>, CacheError> {
        let want = if alone {
            Want::DemandAlone
        } else {
            Want::Demand
        };
        self.read_hinted(offset, len, want, Some(continues), false)
            .await
    }

    /// As [`read`](Self::read), but every chunk loaded from disk is hashed again, never read
    /// by range ([`Cache::read_range`]): for bytes that are kept beyond this process (the
    /// passthrough copy of a file).
    pub async fn read_checked(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        self.read_with(offset, len, Want::Checked).await
    }

    /// Caches bytes `offset..offset + len` as a read alone would (at the reads' CPU priority):
    /// for an open, whose reads come next and wait for this fetch.
    pub async fn fetch_for_open(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        self.cache_range(offset, len, Want::DemandAlone).await
    }

    /// Fetches the missing spans that start at or after `end` (the end of a read or a file),
    /// up to `MIN_MISS_FETCH` compressed bytes, for a layer indexed as its tar stream: the
    /// files after a file read are often read next (tar order keeps a directory together).
    /// Nothing when the first such span is cached or being fetched already. Meant to run as
    /// its own request beside the demand read, so the read waits for its bytes alone.
    pub async fn fetch_neighbours(&self, end: u64) -> Result<(), CacheError> {
        let spans = &self.index.spans;
        if self.index.format != IndexFormat::Stream || !self.index.random_access() {
            return Ok(());
        }
        let Some(mut j) = self
            .index
            .span_at(end.min(self.index.size.saturating_sub(1)))
        else {
            return Ok(());
        };
        if spans[j].out_offset < end {
            j += 1; // that span holds the read's last bytes: the read fetches it
        }
        if j >= spans.len() || self.span_cached(j) || self.inflight.lock().unwrap().contains_key(&j)
        {
            return Ok(());
        }
        // Up to MIN_MISS_FETCH compressed bytes, but not into a shared object: nothing loads
        // one for lying next to a file read (see `neighbours_stop`).
        let stop = self.neighbours_stop(end);
        if spans[j].out_offset >= stop {
            return Ok(());
        }
        let last = self.reach_last(j, want::MIN_MISS_FETCH, |k| spans[k].out_offset < stop);
        let to = spans[last].out_offset + spans[last].out_len;
        self.cache_range(
            spans[j].out_offset,
            to - spans[j].out_offset,
            Want::Neighbours,
        )
        .await
    }

    /// Where a fetch of the neighbours of a read ending at `end` stops: at the data of the
    /// first shared object after `end` in the layer. A library or extension module is loaded
    /// when something names it, and its loads are fetched ahead from those names (`fs/elf.rs`,
    /// `fs/imports.rs`); read ahead as a neighbour, most of one is never read (on the
    /// cold-start benchmark, about 0.4 MB of compressed bytes per gzip run: glibc's gconv
    /// modules after its configuration files). Entries are in tar order; an index that lists
    /// them otherwise makes this guess wrong, which costs bandwidth only.
    fn neighbours_stop(&self, end: u64) -> u64 {
        let entries = &self.index.entries;
        let from = entries.partition_point(|e| e.offset < end);
        entries[from..]
            .iter()
            .take(NEIGHBOURS_SCAN)
            .find(|e| {
                e.kind == super::Kind::File
                    && e.size > 0
                    && super::is_shared_object(e.path.rsplit('/').next().unwrap_or(""))
            })
            .map_or(u64::MAX, |e| e.offset)
    }

    /// Caches bytes `offset..offset + len` (fetching exactly the spans that hold them: no
    /// sequential read-ahead), as a profile replay does ahead of the reads it predicts.
    /// Spans cached already are not loaded (nor verified) again.
    pub async fn prefetch(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        self.cache_range(offset, len, Want::Exact).await
    }

    /// Caches bytes `offset..offset + len` for files a walk predicts ([`Want::Walk`]): in a
    /// TOC-indexed layer the request reaches a little past them, over missing neighbours.
    pub async fn prefetch_walk(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        self.cache_range(offset, len, Want::Walk).await
    }

    /// A step of background fill: caches what is missing of `offset..offset + len` once no
    /// foreground fetch of the mount is under way, within the mount's background budget
    /// ([`budget`]: what a read that misses then waits behind is bounded). Returns the
    /// compressed bytes of the spans that were missing when it started fetching (0 when
    /// reads had cached them meanwhile).
    pub async fn fill(&self, offset: u64, len: u64) -> Result<u64, CacheError> {
        if self.is_cached(offset, len) {
            return Ok(0);
        }
        let bytes = budget::fetch_size(&self.index, offset, len, 0);
        self.budgets.foreground.idle().await;
        let _room = self.budgets.background.take(bytes).await;
        self.budgets.foreground.idle().await;
        let missing = self.missing_compressed(offset, len);
        if missing > 0 {
            self.read_with(offset, len, Want::Background).await?;
        }
        Ok(missing)
    }

    /// Compressed bytes of the spans holding `offset..offset + len` that are not cached.
    fn missing_compressed(&self, offset: u64, len: u64) -> u64 {
        self.spans_over(offset, len)
            .map_while(|i| i)
            .filter(|&i| !self.span_cached(i))
            .filter_map(|i| fetch_range(&self.index.spans[i].fetch))
            .map(|(a, b)| b - a)
            .sum()
    }

    /// Returns once no foreground fetch of the mount (reads', and those ahead of reads) is
    /// under way: when background fill may start a step.
    pub async fn foreground_idle(&self) {
        self.budgets.foreground.idle().await
    }

    /// Caches what is missing of `offset..offset + len` for a fetch no read waits for, within
    /// the mount's [budget](budget::Budgets) of such fetches.
    async fn cache_range(&self, offset: u64, len: u64, want: Want) -> Result<(), CacheError> {
        if self.is_cached(offset, len) {
            return Ok(());
        }
        let reach = want.min_reach(self.index.format);
        let bytes = budget::fetch_size(&self.index, offset, len, reach);
        let _room = self.budgets.ahead.take(bytes).await;
        // A read waiting for a large chunk gets the link first.
        self.budgets.foreground.no_large_read().await;
        self.read_hinted(offset, len, want, None, true)
            .await
            .map(drop)
    }

    async fn read_with(&self, offset: u64, len: u64, want: Want) -> Result<Vec<u8>, CacheError> {
        self.read_hinted(offset, len, want, None, false).await
    }

    /// `continues`: whether the read continues its reader's previous one, if the caller knows;
    /// `ahead`: whether no read waits for this fetch (an open's, a walk's, a replay's).
    async fn read_hinted(
        &self,
        offset: u64,
        len: u64,
        want: Want,
        continues: Option<bool>,
        ahead: bool,
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
        let end = (offset + len).min(self.index.size);
        let out = self.read_spans(offset..end, want, continues, ahead).await?;
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

    /// The bytes `range` of the layer (ending at its end at most).
    async fn read_spans(
        &self,
        range: std::ops::Range<u64>,
        want: Want,
        continues: Option<bool>,
        ahead: bool,
    ) -> Result<Vec<u8>, CacheError> {
        let (offset, end) = (range.start, range.end);
        if want != Want::Checked {
            if let Some(out) = self.read_cached(offset, end)? {
                return Ok(out);
            }
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
            let data = self.span(i, end, want, continues, ahead).await?;
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
    /// Span `i`, fetching it — and the missing spans after it up to `until` — if needed;
    /// `continues` as in [`read_continuing`](Self::read_continuing).
    async fn span(
        &self,
        i: usize,
        until: u64,
        want: Want,
        continues: Option<bool>,
        ahead: bool,
    ) -> Result<Arc<Vec<u8>>, CacheError> {
        let span = &self.index.spans[i];
        let data = self
            .cache
            .get_or_fetch(&span.digest, || async move {
                self.fetches.fetch_add(1, Ordering::Relaxed);
                let _busy = (want != Want::Background).then(|| self.budgets.foreground.enter());
                if span.fetch == Fetch::Cached {
                    return self.restream(i).await;
                }
                // A sequential reader's miss fetches READAHEAD more spans with this request:
                // one whose read continues its previous one (if the caller knows), else a
                // miss right after the layer's previous fetch. Not a fetch ahead of reads (an
                // open's of its file): it knows the bytes it wants, and one right after a read
                // of the file's first span only looks sequential (on the cold-start benchmark,
                // the open of `ld.so` after the kernel read its first span fetched 0.9 MB of
                // the libraries after it this way, 0.35 MB compressed, never read).
                let previous = self.last_fetched.load(Ordering::Relaxed);
                let demand = matches!(want, Want::Demand | Want::DemandAlone | Want::Checked);
                let sequential = !ahead
                    && continues.unwrap_or_else(|| previous != usize::MAX && i == previous + 1);
                let until = if demand && sequential {
                    until.max(self.readahead_end(i))
                } else {
                    until
                };
                let until = until.max(self.min_fetch_end(i, want));
                // A span at a light checkpoint is decoded from the span before it: while that
                // one (or one back to the anchor) is being fetched, wait for it rather than
                // fetch its bytes again (a few times at most: each wait ends a run). If that
                // run's request failed, so does this read (one retry budget for both).
                for _ in 0..4 {
                    let Some(run) = self.run_before(i) else {
                        break;
                    };
                    let _ = run.done.acquire().await; // an error: the run ended
                    if let Some(e) = run.failed.get() {
                        return Err(CacheError::Shared(e.clone()));
                    }
                }
                // Another run fetching span i: wait for it and take i from the cache, or that
                // run's error if it failed (if it was dropped unfinished or i did not verify,
                // fetch i here).
                let mut after_cached = true;
                let (last, run) = loop {
                    match self.claim_run(i, until, after_cached) {
                        Ok(claimed) => break claimed,
                        Err(run) => {
                            // Once only: a span marked cached but gone (evicted) is fetched.
                            after_cached = false;
                            let _ = run.done.acquire().await; // an error: the run ended
                            if let Some(d) = self.cache.lookup(&span.digest)? {
                                return Ok((*d).clone());
                            }
                            if let Some(e) = run.failed.get() {
                                return Err(CacheError::Shared(e.clone()));
                            }
                        }
                    }
                };
                // Only reads tell a sequential reader: a run fetched ahead of them must not
                // make the next miss look like one.
                let _room = if demand {
                    self.last_fetched.store(last, Ordering::Relaxed);
                    let end = self.index.spans[last].out_offset + self.index.spans[last].out_len;
                    *self.last_read.lock().unwrap() = (end, self.budgets.foreground.tick());
                    let bytes = budget::run_size(&self.index, i, last);
                    Some(self.budgets.reads.take(bytes).await)
                } else {
                    None
                };
                let _large = (demand
                    && !ahead
                    && budget::run_compressed(&self.index, i, last) >= budget::LARGE_READ)
                    .then(|| self.budgets.foreground.enter_large());
                let mut spans = match self.fetch_run(i, last, !demand).await {
                    Ok(spans) => spans.into_iter(),
                    Err(e) => return Err(run.fail(e)),
                };
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
            span: index
                .spans
                .first()
                .map_or(DEFAULT_SPAN, |s| s.out_len)
                .into(),
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
}

pub mod budget;
mod check;
mod decode;
mod deliver;
mod fetch;
mod ready;
mod stream;
mod together;
mod want;
mod windows;

pub(crate) use decode::LowerPriority;
pub use deliver::Claim;
pub use ready::Ready;
pub use stream::{stream_index, StreamSpec};
#[cfg(test)]
mod tests;
