//! The bounds on what fetches hold while their bytes arrive and are decoded, across every
//! layer of a mount, so a mount's memory does not grow with the link's latency (on a slow link
//! each fetch takes longer, and more of them are under way at once):
//!
//! - fetches no read waits for (an open's fetch of its file, a read's neighbours, a profile's
//!   replay, background fill) take room for their compressed and decoded bytes before they
//!   claim any span, so a read never waits for a fetch that waits for room ([`AHEAD_BUDGET`]);
//! - reads' own fetches take room for their compressed and decoded bytes once they have
//!   claimed their run ([`READS_BUDGET`]): reads of large chunks (an eStargz chunk of a large
//!   `.so` is up to 4 MiB, and the kernel's readahead of a mapped file asks for several at
//!   once) then queue instead of piling up; they wait only for other reads.
//!
//! - background fill (the rest of the image, while mounted) gives way to every other fetch: a
//!   step starts only while no read's fetch and no fetch ahead of reads is under way
//!   ([`Foreground::idle`]), and its steps under way hold at most [`BACKGROUND_BUDGET`]
//!   compressed plus decoded bytes. So a read that misses shares the link with at most the
//!   compressed bytes of the steps already under way — under half of [`BACKGROUND_BUDGET`]
//!   (384 KiB: 31 ms at 100 Mbit/s, 0.16 s at 20 Mbit/s) — and the fill never starts a
//!   request while one of the foreground's is on the link. A step whose spans alone exceed
//!   the budget (a step covers whole spans, and an eStargz or zstd:chunked chunk of a large
//!   file is up to 4 MiB of layer data) takes the whole budget and runs alone: then the bound
//!   is that one step's compressed bytes.
//!
//! The link stays busy: each budget is many times the bandwidth-delay product of the links we
//! measure (100 Mbit/s × 20 ms is 250 KB), background fill's included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::decode::fetch_range;
use crate::layer::LayerIndex;

/// Compressed plus decoded bytes fetches ahead of reads may hold at once, per mount.
pub const AHEAD_BUDGET: u64 = 8 << 20;
/// Compressed plus decoded bytes reads' fetches may hold at once, per mount.
pub const READS_BUDGET: u64 = 16 << 20;
/// Compressed plus decoded bytes background fill's steps may hold at once, per mount: two
/// steps of [`crate::prefetch`]'s 256 KiB of layer data with their compressed bytes.
pub const BACKGROUND_BUDGET: u64 = 768 << 10;

/// The budget's unit: a permit is this many bytes.
const UNIT: u64 = 1 << 10;

/// A mount's budgets, shared by its layers' readers.
#[derive(Clone)]
pub struct Budgets {
    /// For fetches ahead of reads ([`AHEAD_BUDGET`]).
    pub ahead: Budget,
    /// For reads' own fetches ([`READS_BUDGET`]).
    pub reads: Budget,
    /// For background fill ([`BACKGROUND_BUDGET`]).
    pub background: Budget,
    /// Fetches under way that background fill gives way to.
    pub foreground: Foreground,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            ahead: Budget::new(AHEAD_BUDGET),
            reads: Budget::new(READS_BUDGET),
            background: Budget::new(BACKGROUND_BUDGET),
            foreground: Foreground::default(),
        }
    }
}

/// How many fetches of the foreground (reads', and those ahead of reads: an open's, a read's
/// neighbours, a profile's replay) are under way across a mount's layers.
#[derive(Clone, Default)]
pub struct Foreground {
    under_way: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    /// Counts the reads' fetches, so the layer a read fetched from last is known
    /// ([`Foreground::tick`]).
    clock: Arc<std::sync::atomic::AtomicU64>,
}

/// A foreground fetch under way, until dropped.
pub struct Busy(Foreground);

impl Foreground {
    /// Notes a foreground fetch under way until the returned guard is dropped.
    pub fn enter(&self) -> Busy {
        self.under_way.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// The next tick of the mount's clock of reads' fetches (from 1).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Returns once no foreground fetch is under way (at once if none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.under_way.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.under_way.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Room for bytes held by fetches under way.
#[derive(Clone)]
pub struct Budget {
    units: Arc<Semaphore>,
    total: u64,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Budget {
        let total = (bytes / UNIT).max(1);
        Budget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits for room for a fetch holding about `bytes` (a fetch larger than the whole budget
    /// waits for all of it); the room is given back when the permit is dropped.
    pub async fn take(&self, bytes: u64) -> OwnedSemaphorePermit {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total) as u32;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget is never closed")
    }
}

/// Compressed and decoded bytes a fetch of spans `first..=last` of `index` holds.
pub fn run_size(index: &LayerIndex, first: usize, last: usize) -> u64 {
    let spans = &index.spans[first..=last];
    let start = spans
        .first()
        .and_then(|s| fetch_range(&s.fetch))
        .map_or(0, |r| r.0);
    let stop = spans
        .last()
        .and_then(|s| fetch_range(&s.fetch))
        .map_or(start, |r| r.1);
    let decoded: u64 = spans.iter().map(|s| s.out_len).sum();
    stop.saturating_sub(start) + decoded
}

/// Compressed bytes of the spans holding uncompressed `offset..offset + len` of `index`.
pub fn compressed_size(index: &LayerIndex, offset: u64, len: u64) -> u64 {
    let end = (offset + len.max(1)).min(index.size);
    let (Some(first), Some(last)) = (index.span_at(offset), index.span_at(end.saturating_sub(1)))
    else {
        return 0;
    };
    let start = fetch_range(&index.spans[first].fetch).map_or(0, |r| r.0);
    let stop = fetch_range(&index.spans[last].fetch).map_or(start, |r| r.1);
    stop.saturating_sub(start)
}

/// Compressed and decoded bytes a fetch of uncompressed `offset..offset + len` of `index`
/// holds, at least `min` compressed bytes (a fetch that reaches past the spans asked for).
pub fn fetch_size(index: &LayerIndex, offset: u64, len: u64, min: u64) -> u64 {
    let end = (offset + len.max(1)).min(index.size);
    let (Some(first), Some(last)) = (index.span_at(offset), index.span_at(end.saturating_sub(1)))
    else {
        return min;
    };
    run_size(index, first, last) + min.saturating_sub(compressed_size(index, offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_waits_while_the_foreground_fetches() {
        let fg = Foreground::default();
        fg.idle().await; // nothing under way: at once
        let (a, b) = (fg.enter(), fg.enter());
        let waiting = tokio::spawn({
            let fg = fg.clone();
            async move { fg.idle().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one fetch is still under way");
        drop(b);
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn fetches_ahead_wait_for_room_and_a_large_one_takes_it_all() {
        let budget = Budget::new(64 << 10);
        let first = budget.take(40 << 10).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(40 << 10).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "no room while the first holds 40 of 64 KiB"
        );
        drop(first);
        let second = waiting.await.unwrap();
        drop(second);
        // Larger than the whole budget: takes all of it rather than waiting forever.
        let all = budget.take(1 << 30).await;
        assert_eq!(budget.units.available_permits(), 0);
        drop(all);
        assert_eq!(budget.units.available_permits(), 64);
    }
}
