//! Small fetches ahead of reads that start at the same moment go in one request.
//!
//! A walk's batch, an open's pieces or a group of a profile's pieces start several fetches of
//! one layer at once, each a range request of its own — and each request costs the registry
//! as much as a large one (on the cold-start benchmark's registry, about 4.4 ms of CPU against
//! about 0.2 ms per further range of one request). Where the layer's source asks for several
//! ranges in one request ([`BlobSource::ranges_together`]), a fetch ahead of reads of at most
//! [`SMALL`] compressed bytes registers its range here; the first to register starts a
//! flusher task that waits one turn of the runtime (no timer) and asks for all those
//! registered meanwhile with [`BlobSource::read_ranges`], at most [`BATCH_BYTES`] and
//! [`BATCH_RANGES`] per request (one alone is a plain range read, as before). Reads that a
//! process waits for never wait here: their request goes at once.
//!
//! The requests run in tasks of their own, so a fetch that is dropped leaves no other
//! waiting, and a request that fails gives its error to each fetch in it (none asks again:
//! the registry client has retried already). Nothing is trusted more for it: each fetch
//! checks its bytes against its span digests as before.

use std::sync::{Arc, Mutex, OnceLock};

use crate::source::{BlobSource, SourceError};

/// Largest fetch (compressed bytes) that waits for others to share its request.
pub(super) const SMALL: u64 = 256 << 10;
/// Compressed bytes per shared request at most (the first range's bytes wait for the rest).
const BATCH_BYTES: u64 = 1 << 20;
/// Ranges per shared request at most.
const BATCH_RANGES: usize = 32;

/// The answer to one range of a shared request, once the request ends: its bytes, or the
/// request's error (each waiter gets it).
pub(super) struct Answer {
    answer: OnceLock<Result<Vec<u8>, Arc<SourceError>>>,
    done: tokio::sync::Semaphore,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            answer: OnceLock::new(),
            // No permits: waiters wait until it is closed.
            done: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Answer {
    /// Sets the answer and wakes every waiter.
    pub(super) fn set(&self, answer: Result<Vec<u8>, Arc<SourceError>>) {
        let _ = self.answer.set(answer);
        self.done.close();
    }

    /// The answer, once set.
    pub(super) async fn get(&self) -> Result<Vec<u8>, SourceError> {
        let _ = self.done.acquire().await;
        match self.answer.get() {
            Some(Ok(data)) => Ok(data.clone()),
            Some(Err(e)) => Err(SourceError::Shared(e.clone())),
            None => unreachable!("closed only once answered"),
        }
    }

    /// Whether it is set.
    pub(super) fn is_set(&self) -> bool {
        self.done.is_closed()
    }
}

/// Each of `n` ranges' answer from `answer`, the result of one request for all of them.
pub(super) fn split(
    answer: Result<Vec<Vec<u8>>, SourceError>,
    n: usize,
) -> Vec<Result<Vec<u8>, Arc<SourceError>>> {
    match answer {
        Ok(data) if data.len() == n => data.into_iter().map(Ok).collect(),
        Ok(_) => {
            let e = Arc::new(SourceError::Io {
                what: "several ranges in one request".into(),
                source: std::io::Error::other("answered another number of ranges"),
            });
            vec![Err(e); n]
        }
        Err(e) => vec![Err(Arc::new(e)); n],
    }
}

type Registered = (u64, u64, Arc<Answer>);

/// The ranges of one blob registered and not requested yet.
#[derive(Default)]
pub(super) struct Together {
    pending: Arc<Mutex<Vec<Registered>>>,
}

impl Together {
    /// `len` bytes at `offset` of `source`, in one request with the other ranges registered
    /// before the next turn of the runtime (alone where the source asks for one range per
    /// request).
    pub(super) async fn read(
        &self,
        source: &Arc<dyn BlobSource>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        if !source.ranges_together() {
            return source.read_range(offset, len).await;
        }
        let slot = Arc::new(Answer::default());
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.is_empty() {
                let (pending, source) = (self.pending.clone(), source.clone());
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    let batch = std::mem::take(&mut *pending.lock().unwrap());
                    let groups = groups(batch);
                    futures_util::future::join_all(groups.iter().map(|g| request(&*source, g)))
                        .await;
                });
            }
            pending.push((offset, len, slot.clone()));
        }
        slot.get().await
    }
}

/// `batch` cut into requests of at most [`BATCH_BYTES`] and [`BATCH_RANGES`], in blob order.
fn groups(mut batch: Vec<Registered>) -> Vec<Vec<Registered>> {
    batch.sort_by_key(|(offset, ..)| *offset);
    let mut out: Vec<Vec<Registered>> = Vec::new();
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

/// One request for `group`'s ranges (a plain range read for one), which then answers each.
async fn request(source: &dyn BlobSource, group: &[Registered]) {
    let answer = match group {
        [(offset, len, _)] => source.read_range(*offset, *len).await.map(|d| vec![d]),
        _ => {
            let ranges: Vec<(u64, u64)> = group.iter().map(|(o, l, _)| (*o, *l)).collect();
            source.read_ranges(&ranges).await
        }
    };
    for ((_, _, slot), answer) in group.iter().zip(split(answer, group.len())) {
        slot.set(answer);
    }
}
