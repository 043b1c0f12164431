//! How a layer reader fetches: how far a fetch reaches past the spans a read needs (the
//! sequential read-ahead, a TOC layer's minimum, the run of missing spans), one run of spans
//! in one range request — decoded and verified span by span — and the gzip checkpoint windows
//! a run starts from.

use super::decode::{decode, fetch_range, LowerPriority, SpanResult};
use super::want::{max_padded, Want, MAX_COALESCED, READAHEAD, READAHEAD_BYTES};
use super::{LayerReader, ReadError};
use crate::cache::CacheError;
use crate::layer::{gzip, Fetch};

impl LayerReader {
    /// Where a sequential reader's fetch of span `i` reaches to: the spans after it, as far as
    /// they end within [`READAHEAD_BYTES`] of its end — for a layer indexed by its TOC, at
    /// most [`READAHEAD`] of them (its spans are file chunks; none after a 4 MiB eStargz chunk,
    /// which would hold that much more for one read).
    pub(super) fn readahead_end(&self, i: usize) -> u64 {
        let spans = &self.index.spans;
        let cap = spans[i].out_offset + spans[i].out_len + READAHEAD_BYTES;
        let most = match self.index.format {
            crate::layer::IndexFormat::Stream => spans.len(),
            _ => READAHEAD,
        };
        let last = (i + 1..=(i + most).min(spans.len() - 1))
            .take_while(|&j| spans[j].out_offset + spans[j].out_len <= cap)
            .last()
            .unwrap_or(i);
        spans[last].out_offset + 1
    }

    /// Where a fetch of span `i` should reach to, at least: far enough that it carries
    /// `MIN_TOC_FETCH` compressed bytes for a TOC-indexed layer, and `MIN_MISS_FETCH` for a
    /// read of a stream-indexed one (0: no minimum), but, in a TOC-indexed layer, not over a
    /// span that would take it past [`max_padded`] of that minimum.
    pub(super) fn min_fetch_end(&self, i: usize, want: Want) -> u64 {
        let spans = &self.index.spans;
        let min = want.min_reach(self.index.format);
        if min == 0 {
            return 0;
        }
        let Some((start, _)) = fetch_range(&spans[i].fetch) else {
            return 0;
        };
        // In a layer indexed by its TOC a span is a file's chunk: one that would take the
        // fetch past the most padding may make it is a large file's, rarely read next.
        let most = match self.index.format {
            crate::layer::IndexFormat::Stream => u64::MAX,
            _ => max_padded(min),
        };
        let j = self.reach_last(i, min, |k| {
            fetch_range(&spans[k].fetch).is_some_and(|(_, end)| end.saturating_sub(start) <= most)
        });
        spans[j].out_offset + 1
    }

    /// The last span of a fetch from span `i` that carries at least `min` compressed bytes:
    /// the next span comes along while the fetch is short of them and `may_take` allows it.
    pub(super) fn reach_last(&self, i: usize, min: u64, may_take: impl Fn(usize) -> bool) -> usize {
        let spans = &self.index.spans;
        let start = fetch_range(&spans[i].fetch).map_or(0, |r| r.0);
        let mut j = i;
        while j + 1 < spans.len()
            && fetch_range(&spans[j].fetch).is_some_and(|(_, end)| end.saturating_sub(start) < min)
            && may_take(j + 1)
        {
            j += 1;
        }
        j
    }

    /// The last span of the run of uncached, fetchable spans starting at `i` that a read
    /// ending at `until` needs (see [`min_fetch_end`](Self::min_fetch_end)), bounded by
    /// [`MAX_COALESCED`].
    pub(super) fn missing_run_end(&self, i: usize, until: u64) -> usize {
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
    /// A gzip run takes the window of its first span's checkpoint from the end of the span
    /// before when that span is cached (so it is the layer's real output, whatever an index
    /// says), otherwise from the window file, read alongside the span bytes. A light
    /// checkpoint has no window there: a run from one whose span before is not cached starts
    /// at the anchor before it instead (or after the last cached span in between), and the
    /// spans before `first` it decodes are cached too. Later spans of the run take their
    /// windows from the output just decoded.
    pub(super) async fn fetch_run(
        &self,
        first: usize,
        last: usize,
        ahead: bool,
    ) -> Result<Vec<SpanResult>, CacheError> {
        let from = self.run_start(first, false);
        match self.fetch_from(from, first, last, ahead).await? {
            Some(results) => Ok(results),
            // The span before a light checkpoint was evicted meanwhile: from the anchor.
            None => self
                .fetch_from(self.run_start(first, true), first, last, ahead)
                .await?
                .ok_or_else(|| self.mismatch("a light checkpoint has no anchor before it")),
        }
    }

    /// Where a run of spans from `first` starts: before any light checkpoints whose span
    /// before is not cached (all of them when `anchor`), back to their anchor.
    pub(super) fn run_start(&self, first: usize, anchor: bool) -> usize {
        let mut from = first;
        while from > 0
            && self.checkpoint_of(from).is_some_and(|cp| cp.light)
            && (anchor || !self.span_cached(from - 1))
        {
            from -= 1;
        }
        from
    }

    /// A run fetching a span that the run of span `i` would start from or decode through (the
    /// spans back to an anchor while the span before is not cached), if any: waiting for it
    /// saves fetching its bytes again.
    pub(super) fn run_before(&self, i: usize) -> Option<std::sync::Arc<super::RunSignal>> {
        let from = self.run_start(i, false);
        let inflight = self.inflight.lock().unwrap();
        (from..i).rev().find_map(|k| inflight.get(&k).cloned())
    }

    /// [`fetch_run`](Self::fetch_run) from span `from` (at most `first`); results for
    /// `first..=last`. `None`: the span before `from`, at a light checkpoint, was evicted.
    async fn fetch_from(
        &self,
        from: usize,
        first: usize,
        last: usize,
        ahead: bool,
    ) -> Result<Option<Vec<SpanResult>>, CacheError> {
        let blob = &self.index.blob;
        let spans = &self.index.spans[from..=last];
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
        let needs = self.checkpoint_of(from).filter(|cp| cp.window_size() > 0);
        let before_cached = needs.is_some() && from > 0 && self.span_cached(from - 1);
        let data = async {
            // A small fetch ahead of reads shares its request with those starting with it.
            let read = match ahead && end - base <= super::together::SMALL {
                true => self.together.read(&self.source, base, end - base).await,
                false => self.source.read_range(base, end - base).await,
            };
            read.map_err(|source| {
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
                self.index.spans[from - 1].digest.clone(),
            );
            tokio::task::spawn_blocking(move || cache.peek(&digest))
                .await
                .expect("cache peek task")
        };
        let window = async {
            match needs {
                Some(cp) if !before_cached && !cp.light => self.read_window(cp).await.map(Some),
                _ => Ok(None),
            }
        };
        let started = std::time::Instant::now();
        let (bytes, before, window) = tokio::join!(data, before, window);
        let (bytes, before, mut window) = (bytes?, before?, window?);
        // The layer range fetched (`offset..end`, uncompressed), tagged by the span of what
        // asked for it (`read`, `open`, `siblings`, `neighbours`): bench/coldstart.sh's
        // KEEP_LOGS runs tell from these which fetches the workload used.
        let tail = &spans[spans.len() - 1];
        tracing::debug!(
            blob = %&blob.digest()[..12], offset = spans[0].out_offset, end = tail.out_offset + tail.out_len,
            spans = spans.len(), bytes = end - base, ms = started.elapsed().as_millis() as u64, "fetched"
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
                if cp.light {
                    return Ok(None);
                }
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
            let spans = &index.spans[from..=last];
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
                let mut result = decode(&index, span, raw, before);
                // No window because the span before it, which was to give it, failed: say so.
                let no_window = matches!(&result, Err(CacheError::Read(e))
                    if matches!(e.downcast_ref(), Some(ReadError::NoWindowAtHand { .. })));
                if let (true, Some(Err(prev))) = (no_window, k.checked_sub(1).map(|p| &results[p]))
                {
                    result = Err(ReadError::Verification {
                        blob: index.blob.to_string(),
                        offset: span.out_offset,
                        what: "the span before it, whose output is its window".to_string(),
                        detail: prev.to_string(),
                    }
                    .into());
                }
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
        let (mut results, lie) = decoded.await.expect("decode task");
        if let Some(detail) = lie {
            return Err(self.mismatch(&detail));
        }
        let rest = results.split_off(first - from);
        // The spans before `first` came along: kept if they verified and were missing.
        crate::cache::blocking(|| -> Result<(), CacheError> {
            for (j, data) in (from..first).zip(results) {
                // Asking the cache, not the marks: the span before a light checkpoint may be
                // here because it was evicted.
                if let (Ok(data), false) = (data, self.span_stored(j)) {
                    self.cache
                        .insert(&self.index.spans[j].digest, std::sync::Arc::new(data))?;
                    self.known_cached[j].store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(())
        })?;
        Ok(Some(rest))
    }

    /// The gzip checkpoint span `i` starts from, if it is fetched from one.
    pub(super) fn checkpoint_of(&self, i: usize) -> Option<&gzip::Checkpoint> {
        match &self.index.spans[i].fetch {
            Fetch::Gzip { checkpoint, .. } => self.index.checkpoints.get(*checkpoint as usize),
            _ => None,
        }
    }

    /// The window of checkpoint `cp`, read from the layer's window file and inflated.
    pub(super) async fn read_window(&self, cp: &gzip::Checkpoint) -> Result<Vec<u8>, CacheError> {
        let blob = &self.index.blob;
        let Some(source) = &self.windows else {
            return Err(ReadError::NoWindowFile {
                blob: blob.to_string(),
            }
            .into());
        };
        let (at, len) = (cp.window_at, cp.window_len);
        let ahead = match self.window_ahead(at, len).await {
            Some(answer) => Some(answer),
            None => self.window_together(at, len).await,
        };
        let raw = match ahead {
            Some(answer) => answer,
            None => {
                tracing::debug!(blob = %&blob.digest()[..12], at, len, "window");
                source.read_range(at, len).await
            }
        }
        .map_err(|source| ReadError::WindowSource {
            blob: blob.to_string(),
            source,
        })?;
        let window = crate::layer::inflate(&raw)
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
