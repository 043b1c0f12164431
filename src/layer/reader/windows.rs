//! Checkpoint windows fetched ahead, many in one request.
//!
//! A fetch of gzip spans whose span before is not cached starts from a checkpoint, and reads
//! that checkpoint's window (about 1.4 KB compressed) from the layer's window file beside the
//! spans' bytes: a request of its own, which costs the registry as much as a large one. A
//! caller that knows the fetches it is about to start (a profile's replay, a walk's batch)
//! asks for their windows first with [`LayerReader::prefetch_windows`]: one request for all of
//! them where the registry answers several ranges at once. Each fetch then takes its window
//! from here ([`LayerReader::window_ahead`]), waiting for the request if it is still under
//! way; a window not here, or whose request failed, is read alone as before.
//!
//! Nothing is trusted more for it: a window is inflated and checked for size as before, and a
//! span decoded with a wrong window fails its digest. Bound: the windows held, fetched and not
//! yet taken, are at most [`HELD`] compressed bytes per layer; those whose span was cached
//! meanwhile (no fetch will take them) are dropped when more are asked for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::LayerReader;

/// Compressed window bytes a layer holds ahead at most.
pub(super) const HELD: u64 = 1 << 20;

/// One window asked for ahead: set once its request ends (`None`: it failed).
struct Flight {
    /// The span that a fetch would start from this checkpoint: once it is cached, nobody will
    /// take the window.
    span: usize,
    len: u64,
    data: OnceLock<Option<Vec<u8>>>,
    done: tokio::sync::Semaphore,
}

/// The windows of one layer fetched ahead, by their offset in the window file.
#[derive(Default)]
pub(super) struct Ahead {
    flights: Mutex<HashMap<u64, Arc<Flight>>>,
    /// Windows fetches asked for and nobody has requested yet: the next of those fetches to
    /// run requests them all ([`LayerReader::window_together`]).
    pending: Mutex<Vec<(u64, Arc<Flight>)>>,
}

impl LayerReader {
    /// Fetches ahead, in as few requests as the registry allows, the checkpoint windows that
    /// fetches of the missing spans of `ranges` (layer data: offset, length) would read from
    /// the window file. The windows are claimed when this is called, so fetches started after
    /// the call wait for its request instead of reading them again; the returned future does
    /// the request. Failures are left to those fetches.
    pub fn prefetch_windows(
        &self,
        ranges: &[(u64, u64)],
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let claimed = self.claim_windows(ranges);
        async move {
            if claimed.is_empty() {
                return;
            }
            tracing::debug!(blob = %&self.index.blob.digest()[..12], windows = claimed.len(), "windows ahead");
            self.request_windows(&claimed).await;
        }
    }

    /// One request for the windows of `flights` (several ranges where the registry can),
    /// which it then ends; on failure their fetches read them alone.
    async fn request_windows(&self, flights: &[(u64, Arc<Flight>)]) {
        let Some(source) = &self.windows else { return };
        let asked: Vec<(u64, u64)> = flights.iter().map(|(at, f)| (*at, f.len)).collect();
        match source.read_ranges(&asked).await {
            Ok(data) if data.len() == flights.len() => {
                for ((_, flight), data) in flights.iter().zip(data) {
                    let _ = flight.data.set(Some(data));
                    flight.done.close();
                }
            }
            _ => {
                let mut map = self.windows_ahead.flights.lock().unwrap();
                for (at, flight) in flights {
                    let _ = flight.data.set(None);
                    flight.done.close();
                    if map.get(at).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                        map.remove(at);
                    }
                }
            }
        }
    }

    /// The compressed window at `at` (`len` bytes) of the window file, requested together with
    /// the windows other fetches of this layer ask for at the same moment (those started
    /// together, as a walk's or an open's, need theirs together): it waits one turn of the
    /// runtime — no timer — and the first of them to run again requests them all. `None`:
    /// no other fetch asked for one meanwhile, or that request failed (read it alone: its
    /// error is then the fetch's own).
    pub(super) async fn window_together(&self, at: u64, len: u64) -> Option<Vec<u8>> {
        let flight = {
            let mut map = self.windows_ahead.flights.lock().unwrap();
            match map.get(&at) {
                Some(f) => f.clone(),
                None => {
                    let flight = Arc::new(Flight {
                        span: usize::MAX,
                        len,
                        data: OnceLock::new(),
                        done: tokio::sync::Semaphore::new(0),
                    });
                    map.insert(at, flight.clone());
                    self.windows_ahead
                        .pending
                        .lock()
                        .unwrap()
                        .push((at, flight.clone()));
                    flight
                }
            }
        };
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *self.windows_ahead.pending.lock().unwrap());
        if let [(_, only)] = &batch[..] {
            if Arc::ptr_eq(only, &flight) {
                // Alone: read as before (a fetch that shares it meanwhile reads its own).
                let _ = flight.data.set(None);
                flight.done.close();
                let mut map = self.windows_ahead.flights.lock().unwrap();
                if map.get(&at).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                    map.remove(&at);
                }
                return None;
            }
        }
        if !batch.is_empty() {
            tracing::debug!(blob = %&self.index.blob.digest()[..12], windows = batch.len(), "windows together");
            self.request_windows(&batch).await;
        }
        let _ = flight.done.acquire().await;
        let mut map = self.windows_ahead.flights.lock().unwrap();
        if map.get(&at).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            map.remove(&at);
        }
        drop(map);
        flight
            .data
            .get()
            .cloned()
            .flatten()
            .filter(|d| d.len() as u64 == len)
    }

    /// The windows fetches of `ranges` would read, not held or under way yet: registered.
    fn claim_windows(&self, ranges: &[(u64, u64)]) -> Vec<(u64, Arc<Flight>)> {
        if self.windows.is_none() {
            return Vec::new();
        }
        let mut starts = Vec::new();
        for &(offset, len) in ranges {
            let mut previous_missing = false;
            for i in self.spans_over(offset, len).map_while(|i| i) {
                let missing = !self.span_cached(i);
                if missing && !previous_missing {
                    starts.push(i);
                }
                previous_missing = missing;
            }
        }
        let mut flights = self.windows_ahead.flights.lock().unwrap();
        // Windows whose span was cached meanwhile: no fetch will take them.
        flights.retain(|_, f| {
            !f.done.is_closed() || (f.span != usize::MAX && !self.span_cached(f.span))
        });
        let mut held: u64 = flights.values().map(|f| f.len).sum();
        let mut claimed = Vec::new();
        for first in starts {
            let from = self.run_start(first, false);
            let Some(cp) = self.checkpoint_of(from) else {
                continue;
            };
            if cp.window_size() == 0
                || cp.light
                || (from > 0 && self.span_cached(from - 1))
                || flights.contains_key(&cp.window_at)
                || held + cp.window_len > HELD
            {
                continue;
            }
            held += cp.window_len;
            let flight = Arc::new(Flight {
                span: from,
                len: cp.window_len,
                data: OnceLock::new(),
                done: tokio::sync::Semaphore::new(0),
            });
            flights.insert(cp.window_at, flight.clone());
            claimed.push((cp.window_at, flight));
        }
        claimed.sort_by_key(|(at, _)| *at);
        claimed
    }

    /// The compressed window at `at` of the window file if it was asked for ahead (waiting
    /// for its request): taken, so it is held no longer. `None`: read it alone.
    pub(super) async fn window_ahead(&self, at: u64, len: u64) -> Option<Vec<u8>> {
        let flight = self.windows_ahead.flights.lock().unwrap().remove(&at)?;
        if flight.len != len {
            return None;
        }
        let _ = flight.done.acquire().await;
        flight.data.get().cloned().flatten()
    }
}
