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
//! - while a read's fetch of at least [`LARGE_READ`] compressed bytes is under way, fetches
//!   ahead of reads start none of their requests ([`Foreground::no_large_read`]): such a
//!   fetch is bound by its share of the link, not by the round trip, and on the cold-start
//!   benchmark an eStargz chunk of `openblas` (1.7 MB) a read waited for took 0.3–0.7 s
//!   beside the import walk's requests. The requests already on the link finish; the waiting
//!   ones start when the large fetch ends.
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

/// A read's fetch of at least this many compressed bytes (an eStargz chunk of a large
/// library) has fetches ahead of reads wait before they start. Smaller ones do not: a read's
/// usual fetch (a gzip span and its neighbours, 256 KiB) is bound by the round trip, and
/// holding the link's other work back for it left it idle (gzip + index 4.55 s against 4.39 s
/// with 256 KiB here; with 1 MiB, 24 runs each, eStargz 4.44 against 4.57 s and gzip + index
/// 4.35 against 4.41 s).
pub const LARGE_READ: u64 = 1 << 20;

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
    under_way: Arc<Count>,
    /// Counts the reads' fetches, so the layer a read fetched from last is known
    /// ([`Foreground::tick`]).
    clock: Arc<std::sync::atomic::AtomicU64>,
    /// Reads' fetches of at least [`LARGE_READ`] compressed bytes under way.
    large_reads: Arc<Count>,
}

/// Fetches of one kind under way, and a wake-up for those waiting until there are none.
#[derive(Default)]
struct Count {
    n: AtomicUsize,
    none: Notify,
}

impl Count {
    fn enter(self: &Arc<Self>) -> Entered {
        self.n.fetch_add(1, Ordering::SeqCst);
        Entered(self.clone())
    }

    /// Returns once none is under way (at once if none is).
    async fn none(&self) {
        loop {
            let notified = self.none.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A fetch under way ([`Foreground::enter`], [`Foreground::enter_large`]), until dropped.
pub struct Entered(Arc<Count>);

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

impl Foreground {
    /// Notes a foreground fetch under way until the returned guard is dropped.
    pub fn enter(&self) -> Entered {
        self.under_way.enter()
    }

    /// Notes a read's fetch of at least [`LARGE_READ`] compressed bytes under way until the
    /// returned guard is dropped: fetches ahead of reads wait for it to end before they start.
    pub fn enter_large(&self) -> Entered {
        self.large_reads.enter()
    }

    /// Returns once no read's large fetch is under way (at once if none is).
    pub async fn no_large_read(&self) {
        self.large_reads.none().await
    }

    /// The next tick of the mount's clock of reads' fetches (from 1).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Returns once no foreground fetch is under way (at once if none is).
    pub async fn idle(&self) {
        self.under_way.none().await
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
    let decoded: u64 = index.spans[first..=last].iter().map(|s| s.out_len).sum();
    run_compressed(index, first, last) + decoded
}

/// Compressed bytes of a fetch of spans `first..=last` of `index`.
pub fn run_compressed(index: &LayerIndex, first: usize, last: usize) -> u64 {
    let spans = &index.spans[first..=last];
    let start = spans
        .first()
        .and_then(|s| fetch_range(&s.fetch))
        .map_or(0, |r| r.0);
    let stop = spans
        .last()
        .and_then(|s| fetch_range(&s.fetch))
        .map_or(start, |r| r.1);
    stop.saturating_sub(start)
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

    /// `wait` (spawned) is still waiting once the first of two guards is dropped, and ends
    /// once the second is.
    async fn waits_for_both<G>(
        (a, b): (G, G),
        wait: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let waiting = tokio::spawn(wait);
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one is still under way");
        drop(b);
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn background_waits_while_the_foreground_fetches() {
        let fg = Foreground::default();
        fg.idle().await; // nothing under way: at once
        let both = (fg.enter(), fg.enter());
        let fg2 = fg.clone();
        waits_for_both(both, async move { fg2.idle().await }).await;
    }

    #[tokio::test]
    async fn fetches_ahead_wait_while_a_large_read_fetches() {
        let fg = Foreground::default();
        fg.no_large_read().await; // none under way: at once
        let _small_reads = fg.enter(); // a read's ordinary fetch holds nothing back
        fg.no_large_read().await;
        let both = (fg.enter_large(), fg.enter_large());
        let fg2 = fg.clone();
        waits_for_both(both, async move { fg2.no_large_read().await }).await;
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
