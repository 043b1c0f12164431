//! Spans whose bytes arrive from elsewhere than the layer's blob (a startup profile's pack,
//! `profile::pack`): claimed as a fetch's run claims its spans, so that a read of one waits
//! for the delivery instead of fetching it again, and cached only if the bytes are exactly the
//! span's (its length and its digest in the index). Whatever is not delivered, a read fetches
//! from the blob as usual once the claim is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{budget, LayerReader, RunGuard, RunSignal};
use crate::cache::CacheError;

/// A span of one layer claimed for a delivery: a read of it waits until this is dropped
/// (then finds it cached, or fetches it).
pub struct Claim<'a>(#[allow(dead_code)] RunGuard<'a>);

impl LayerReader {
    /// The span that starts at `offset` and holds exactly `len` bytes, if the index has one.
    pub fn span_exactly(&self, offset: u64, len: u64) -> Option<usize> {
        let i = self.index.span_at(offset)?;
        let span = &self.index.spans[i];
        (span.out_offset == offset && span.out_len == len).then_some(i)
    }

    /// Claims those of `spans` (indexes of this layer's spans) that are neither cached nor
    /// being fetched, each on its own, for bytes that will be [delivered](Self::deliver):
    /// until a span's claim is dropped, a read of it waits for it.
    pub fn claim_delivery(&self, spans: &[usize]) -> Vec<(usize, Claim<'_>)> {
        let wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| i < self.index.spans.len() && !self.span_cached(i))
            .collect();
        let mut inflight = self.inflight.lock().unwrap();
        let mut claims = Vec::with_capacity(wanted.len());
        for i in wanted {
            if inflight.contains_key(&i) {
                continue;
            }
            let done = RunSignal::new();
            inflight.insert(i, done.clone());
            crate::metrics::metrics().fetches_in_flight.inc();
            claims.push((
                i,
                Claim(RunGuard {
                    reader: self,
                    spans: i..=i,
                    done,
                }),
            ));
        }
        claims
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
