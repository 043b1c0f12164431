//! Spans whose bytes arrive from elsewhere than the layer's blob (a startup profile's pack,
//! `profile::pack`): claimed as a fetch's run claims its spans, so that a read of one waits
//! for the delivery instead of fetching it again, and cached only if the bytes are exactly the
//! span's (its length and its digest in the index). Whatever is not delivered, a read fetches
//! from the blob as usual once the claim is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{budget, LayerReader, RunGuard, RunSignal};
use crate::cache::CacheError;

/// Spans of one layer claimed for a delivery, released (their waiters woken) when dropped.
pub struct Delivery<'a> {
    _runs: Vec<RunGuard<'a>>,
    claimed: Vec<usize>,
}

impl Delivery<'_> {
    /// Whether span `i` was claimed (it was missing and no run was fetching it).
    pub fn holds(&self, i: usize) -> bool {
        self.claimed.binary_search(&i).is_ok()
    }
}

impl LayerReader {
    /// The span that starts at `offset` and holds exactly `len` bytes, if the index has one.
    pub fn span_exactly(&self, offset: u64, len: u64) -> Option<usize> {
        let i = self.index.span_at(offset)?;
        let span = &self.index.spans[i];
        (span.out_offset == offset && span.out_len == len).then_some(i)
    }

    /// Claims those of `spans` (indexes of this layer's spans, any order) that are neither
    /// cached nor being fetched, for bytes that will be [delivered](Self::deliver): until the
    /// claim is dropped, a read of one of them waits for it.
    pub fn claim_delivery(&self, spans: &[usize]) -> Delivery<'_> {
        let mut wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| i < self.index.spans.len() && !self.span_cached(i))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut inflight = self.inflight.lock().unwrap();
        wanted.retain(|i| !inflight.contains_key(i));
        // One run per stretch of consecutive spans, as a fetch's run would be.
        let mut runs = Vec::new();
        let mut at = 0;
        while at < wanted.len() {
            let mut end = at;
            while end + 1 < wanted.len() && wanted[end + 1] == wanted[end] + 1 {
                end += 1;
            }
            let done = RunSignal::new();
            for &j in &wanted[at..=end] {
                inflight.insert(j, done.clone());
            }
            crate::metrics::metrics().fetches_in_flight.inc();
            runs.push(RunGuard {
                reader: self,
                spans: wanted[at]..=wanted[end],
                done,
            });
            at = end + 1;
        }
        Delivery {
            _runs: runs,
            claimed: wanted,
        }
    }

    /// Caches `data` as span `i` if it is exactly that span's bytes (length and digest);
    /// returns whether it was. The caller runs this where blocking is allowed (it writes the
    /// chunk to disk).
    pub fn deliver(&self, i: usize, data: Vec<u8>) -> Result<bool, CacheError> {
        let Some(span) = self.index.spans.get(i) else {
            return Ok(false);
        };
        if data.len() as u64 != span.out_len || crate::digest::verify(&span.digest, &data).is_err()
        {
            crate::metrics::metrics().verification_failures.inc();
            return Ok(false);
        }
        self.cache.insert(&span.digest, Arc::new(data))?;
        self.known_cached[i].store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Compressed bytes of the layer's blob that hold `offset..offset + len`.
    pub fn compressed_size(&self, offset: u64, len: u64) -> u64 {
        budget::compressed_size(&self.index, offset, len)
    }
}
