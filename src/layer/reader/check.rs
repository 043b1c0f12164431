//! The whole-layer check: once every span of a layer is cached, its bytes are hashed in order
//! against the diff_id, and a published index is compared entry by entry with the tar stream
//! the spans make (see [`LayerReader::check_complete`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{LayerReader, ReadError, UNCHECKED, VERIFIED, WRONG};
use crate::cache::{Cache, CacheError};
use crate::layer::{IndexFormat, LayerIndex};

impl LayerReader {
    /// Once every span of a layer indexed as its tar stream is cached, hashes them in order
    /// and compares the result with the layer's diff_id (from the verified config). Every span
    /// was checked against the index already; this checks the index against the layer — a
    /// published index whose spans do not add up to the layer is caught here, and the reader
    /// refuses further reads. For a published index the assembled tar stream is also parsed
    /// and every entry (path, type, mode, ids, size, data offset, link target, device numbers,
    /// xattrs, times) compared with the index: an index that arranges the layer's real bytes
    /// into other files is caught too.
    pub(crate) async fn check_complete(&self) -> Result<(), CacheError> {
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
                let parsed = crate::layer::tar::read_entries(&mut stream, u64::MAX, max);
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
    pub(super) fn mismatch(&self, detail: &str) -> CacheError {
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

    pub(super) fn wrong_index(&self) -> CacheError {
        ReadError::WrongIndex {
            blob: self.index.blob.to_string(),
            diff_id: self.index.diff_id.to_string(),
        }
        .into()
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
fn compare_entries(
    claimed: &[crate::layer::Entry],
    actual: &[crate::layer::Entry],
) -> Result<(), String> {
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
