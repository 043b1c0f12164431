//! The bound on fetches ahead of reads: how many compressed bytes the fetches that no read is
//! waiting for (an open's fetch of its file, a read's neighbours, a profile's replay,
//! background fill) may have in flight at once, across every layer of a mount.
//!
//! Without it, what such fetches hold grows with the link's latency rather than with what
//! the workload reads: on a slow link every open's pieces are still arriving when the next
//! opens start theirs (an eStargz cold import over 20 Mbit/s peaked at 73 MiB). A fetch ahead
//! takes its share before it claims any span, so a read never waits for a fetch that waits
//! for budget; reads themselves take none. The link stays busy: the budget is many times the
//! bandwidth-delay product of any link we measure (100 Mbit/s × 20 ms is 250 KB).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::decode::fetch_range;
use crate::layer::LayerIndex;

/// Compressed bytes fetches ahead of reads may have in flight at once, per mount.
pub const AHEAD_BUDGET: u64 = 8 << 20;

/// The budget's unit: a permit is this many bytes.
const UNIT: u64 = 1 << 10;

/// A mount's budget of compressed bytes in flight for fetches ahead of reads, shared by its
/// layers' readers.
#[derive(Clone)]
pub struct AheadBudget {
    units: Arc<Semaphore>,
    total: u64,
}

impl Default for AheadBudget {
    fn default() -> Self {
        AheadBudget::new(AHEAD_BUDGET)
    }
}

impl AheadBudget {
    /// A budget of `bytes` in flight.
    pub fn new(bytes: u64) -> AheadBudget {
        let total = (bytes / UNIT).max(1);
        AheadBudget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits for room for a fetch of about `bytes` compressed bytes (a fetch larger than the
    /// whole budget waits for all of it); the room is given back when the permit is dropped.
    pub async fn take(&self, bytes: u64) -> OwnedSemaphorePermit {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total) as u32;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget is never closed")
    }
}

/// Compressed bytes a fetch of uncompressed `offset..offset + len` of `index` reads, at least
/// `min` (a fetch that reaches past the spans asked for).
pub fn compressed_size(index: &LayerIndex, offset: u64, len: u64, min: u64) -> u64 {
    let end = (offset + len.max(1)).min(index.size);
    let (Some(first), Some(last)) = (index.span_at(offset), index.span_at(end.saturating_sub(1)))
    else {
        return min;
    };
    let start = fetch_range(&index.spans[first].fetch).map_or(0, |r| r.0);
    let stop = fetch_range(&index.spans[last].fetch).map_or(start, |r| r.1);
    stop.saturating_sub(start).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetches_ahead_wait_for_room_and_a_large_one_takes_it_all() {
        let budget = AheadBudget::new(64 << 10);
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
