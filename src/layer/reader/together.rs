//! Small fetches ahead of reads that start at the same moment go in one request.
//!
//! A walk's batch, an open's pieces or a group of a profile's pieces start several fetches of
//! one layer at once, each a range request of its own — and each request costs the registry
//! as much as a large one (on the cold-start benchmark's registry, about 4.4 ms of CPU against
//! about 0.2 ms per further range of one request). A fetch ahead of reads of at most
//! [`SMALL`] compressed bytes registers its range here and waits one turn of the runtime (no
//! timer); the first of those registered meanwhile to run again asks for them all with one
//! [`BlobSource::read_ranges`] (several ranges per request where the registry can), at most
//! [`BATCH_BYTES`] and [`BATCH_RANGES`] per request. A fetch that finds itself alone sends its
//! own request, as before. Reads that a process waits for never wait here: their request goes
//! at once.
//!
//! Nothing is trusted more for it: each fetch checks its bytes against its span digests as
//! before, and if the shared request fails each reads its range alone (so its error is its
//! own).

use std::sync::{Arc, Mutex, OnceLock};

use crate::source::{BlobSource, SourceError};

/// Largest fetch (compressed bytes) that waits for others to share its request.
pub(super) const SMALL: u64 = 256 << 10;
/// Compressed bytes per shared request at most (the first range's bytes wait for the rest).
const BATCH_BYTES: u64 = 1 << 20;
/// Ranges per shared request at most.
const BATCH_RANGES: usize = 32;

/// One range waiting for its share of a request: set once it ends (`None`: it failed).
struct Slot {
    data: OnceLock<Option<Vec<u8>>>,
    done: tokio::sync::Semaphore,
}

/// The ranges of one blob registered and not requested yet.
#[derive(Default)]
pub(super) struct Together {
    pending: Mutex<Vec<(u64, u64, Arc<Slot>)>>,
}

impl Together {
    /// `len` bytes at `offset` of `source`, in one request with the other ranges registered
    /// before the next turn of the runtime; alone, or if that request failed, in its own.
    pub(super) async fn read(
        &self,
        source: &dyn BlobSource,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        let slot = Arc::new(Slot {
            data: OnceLock::new(),
            done: tokio::sync::Semaphore::new(0),
        });
        self.pending
            .lock()
            .unwrap()
            .push((offset, len, slot.clone()));
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *self.pending.lock().unwrap());
        match &batch[..] {
            [(.., only)] if Arc::ptr_eq(only, &slot) => {
                return source.read_range(offset, len).await;
            }
            [] => {}
            _ => {
                let groups = groups(batch);
                futures_util::future::join_all(groups.iter().map(|g| request(source, g))).await;
            }
        }
        let _ = slot.done.acquire().await;
        match slot.data.get().cloned().flatten() {
            Some(data) => Ok(data),
            None => source.read_range(offset, len).await,
        }
    }
}

/// `batch` cut into requests of at most [`BATCH_BYTES`] and [`BATCH_RANGES`], in blob order.
fn groups(mut batch: Vec<(u64, u64, Arc<Slot>)>) -> Vec<Vec<(u64, u64, Arc<Slot>)>> {
    batch.sort_by_key(|(offset, ..)| *offset);
    let mut out: Vec<Vec<(u64, u64, Arc<Slot>)>> = Vec::new();
    let mut bytes = 0;
    for item in batch {
        match out.last_mut() {
            Some(g) if g.len() < BATCH_RANGES && bytes + item.1 <= BATCH_BYTES => {
                bytes += item.1;
                g.push(item);
            }
            _ => {
                bytes = item.1;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// One request for `group`'s ranges (a plain range read for one), which it then ends.
async fn request(source: &dyn BlobSource, group: &[(u64, u64, Arc<Slot>)]) {
    let answer = match group {
        [(offset, len, _)] => source.read_range(*offset, *len).await.map(|d| vec![d]),
        _ => {
            let ranges: Vec<(u64, u64)> = group.iter().map(|(o, l, _)| (*o, *l)).collect();
            source.read_ranges(&ranges).await
        }
    };
    let mut data = match answer {
        Ok(data) if data.len() == group.len() => data.into_iter().map(Some).collect(),
        _ => vec![None; group.len()],
    };
    for ((_, _, slot), data) in group.iter().zip(data.iter_mut()) {
        let _ = slot.data.set(data.take());
        slot.done.close();
    }
}
