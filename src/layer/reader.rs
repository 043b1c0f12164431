//! Reading a layer's uncompressed tar stream at any offset, through the chunk cache.
//!
//! A read maps to the spans that cover it. Spans already cached are served from the cache;
//! runs of adjacent missing spans are fetched with one range request, each span's compressed
//! bytes checked against its digest, decompressed from its checkpoint and checked again before
//! it is cached or served.

use std::sync::Arc;

use super::{gzip, Fetch, LayerIndex};
use crate::cache::{Cache, CacheError};
use crate::source::BlobSource;

/// Upper bound on the bytes one coalesced range request fetches.
const MAX_COALESCED: u64 = 16 << 20;

/// Lazy reads of one layer.
pub struct LayerReader {
    index: Arc<LayerIndex>,
    source: Arc<dyn BlobSource>,
    cache: Arc<Cache>,
}

impl LayerReader {
    pub fn new(index: Arc<LayerIndex>, source: Arc<dyn BlobSource>, cache: Arc<Cache>) -> Self {
        LayerReader {
            index,
            source,
            cache,
        }
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    /// Reads up to `len` bytes at uncompressed offset `offset` (fewer at the end of the stream).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, CacheError> {
        let end = (offset + len).min(self.index.size);
        let mut out = Vec::with_capacity((end.saturating_sub(offset)) as usize);
        let mut pos = offset;
        while pos < end {
            let i = self.index.span_at(pos).ok_or_else(|| {
                CacheError::Fetch(format!(
                    "layer {}: no span at offset {pos}",
                    self.index.blob
                ))
            })?;
            let span = &self.index.spans[i];
            let data = self.span(i, end).await?;
            let from = (pos - span.out_offset) as usize;
            let to = ((end - span.out_offset) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            pos = span.out_offset + to as u64;
        }
        Ok(out)
    }

    /// Span `i`, fetching it — and the missing spans after it up to `until` — if needed.
    async fn span(&self, i: usize, until: u64) -> Result<Arc<Vec<u8>>, CacheError> {
        let span = &self.index.spans[i];
        self.cache
            .get_or_fetch(&span.digest, || async move {
                let last = self.missing_run_end(i, until);
                let mut spans = self.fetch_run(i, last).await?;
                let first = spans.remove(0);
                for (j, data) in (i + 1..=last).zip(spans) {
                    self.cache
                        .insert(&self.index.spans[j].digest, Arc::new(data))?;
                }
                Ok(first)
            })
            .await
    }

    /// The last span of the run of uncached, fetchable spans starting at `i` that a read
    /// ending at `until` needs, bounded by [`MAX_COALESCED`].
    fn missing_run_end(&self, i: usize, until: u64) -> usize {
        let spans = &self.index.spans;
        let start = fetch_range(&spans[i].fetch).map_or(0, |r| r.0);
        let mut last = i;
        while last + 1 < spans.len()
            && spans[last + 1].out_offset < until
            && !self.cache.contains(&spans[last + 1].digest)
        {
            match fetch_range(&spans[last + 1].fetch) {
                Some((_, end)) if end - start <= MAX_COALESCED => last += 1,
                _ => break,
            }
        }
        last
    }

    /// Fetches spans `first..=last` with one range request and verifies each.
    async fn fetch_run(&self, first: usize, last: usize) -> Result<Vec<Vec<u8>>, CacheError> {
        let blob = &self.index.blob;
        let spans = &self.index.spans[first..=last];
        let ranges: Vec<(u64, u64)> = spans
            .iter()
            .map(|s| {
                fetch_range(&s.fetch).ok_or_else(|| {
                    CacheError::Fetch(format!(
                        "layer {blob}: span at {} is not in the cache and this layer has no random access (stream it again with `stratafs index build`)",
                        s.out_offset
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let base = ranges[0].0;
        let end = ranges.iter().map(|r| r.1).max().unwrap_or(base);
        let bytes = self
            .source
            .read_range(base, end - base)
            .await
            .map_err(|e| CacheError::Fetch(format!("layer {blob}: {e}")))?;
        let mut out = Vec::with_capacity(spans.len());
        for (span, (start, stop)) in spans.iter().zip(ranges) {
            let raw = &bytes[(start - base) as usize..(stop - base) as usize];
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                CacheError::Fetch(format!(
                    "layer {blob}: span at {} failed verification ({what}): {e}",
                    span.out_offset
                ))
            };
            let data = match &span.fetch {
                Fetch::Range { .. } => raw.to_vec(),
                Fetch::Gzip {
                    checkpoint,
                    in_digest,
                    ..
                } => {
                    crate::digest::verify(in_digest, raw)
                        .map_err(|e| bad("compressed bytes", &e))?;
                    let cp = self.index.checkpoints[*checkpoint as usize].clone();
                    let (raw, len) = (raw.to_vec(), span.out_len as usize);
                    tokio::task::spawn_blocking(move || gzip::decode_span(&cp, &raw, len))
                        .await
                        .expect("decode task")
                        .map_err(|e| bad("decompression", &e))?
                }
                Fetch::Cached => unreachable!("filtered above"),
            };
            crate::digest::verify(&span.digest, &data)
                .map_err(|e| bad("uncompressed bytes", &e))?;
            out.push(data);
        }
        Ok(out)
    }
}

fn fetch_range(fetch: &Fetch) -> Option<(u64, u64)> {
    match fetch {
        Fetch::Range { in_start, in_end }
        | Fetch::Gzip {
            in_start, in_end, ..
        } => Some((*in_start, *in_end)),
        Fetch::Cached => None,
    }
}
