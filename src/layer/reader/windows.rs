//! Checkpoint windows fetched ahead, many in one request.
//!
//! A fetch of gzip spans whose span before is not cached starts from a checkpoint, and reads
//! that checkpoint's window (about 1.4 KB compressed) from the layer's window file beside the
//! spans' bytes: a request of its own, which costs the registry as much as a large one. Where
//! the window file's source asks for several ranges in one request
//! ([`BlobSource::ranges_together`]):
//!
//! - a caller that knows the fetches it is about to start (a profile's replay) asks for their
//!   windows first with [`LayerReader::prefetch_windows`]: one request for all of them;
//! - windows that fetches ask for at the same moment share one request
//!   ([`LayerReader::window_together`]): the first registers a flusher task that waits one
//!   turn of the runtime (no timer) and requests all those registered meanwhile.
//!
//! Each fetch then takes its window from here, waiting for the request if it is still under
//! way. The requests run in tasks of their own, so a fetch that is dropped (a read that timed
//! out) leaves no other waiting; a request that fails gives its error to every fetch waiting
//! for it (none asks again: the registry client has retried already). A source that cannot
//! (a local window file, a registry that answers one range per request, a blob read from a
//! redirect's location) is read one window per fetch, as before.
//!
//! Nothing is trusted more for it: a window is inflated and checked for size as before, and a
//! span decoded with a wrong window fails its digest. Bound: the windows held ahead, fetched
//! and not yet taken, are at most [`HELD`] compressed bytes per layer; those whose span was
//! cached meanwhile (no fetch will take them) are dropped when more are asked for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::together::{split, Answer};
use super::LayerReader;
use crate::source::{BlobSource, SourceError};

/// Compressed window bytes a layer holds ahead at most.
const HELD: u64 = 1 << 20;

/// One window asked for: its answer, once its request ends.
struct Flight {
    /// The span that a fetch would start from this checkpoint: once it is cached, nobody will
    /// take the window (`usize::MAX`: asked for by a fetch under way).
    span: usize,
    len: u64,
    answer: Answer,
}

impl Flight {
    fn new(span: usize, len: u64) -> Arc<Flight> {
        Arc::new(Flight {
            span,
            len,
            answer: Answer::default(),
        })
    }
}

/// A window asked for, by its offset in the window file.
type Asked = (u64, Arc<Flight>);

/// The windows of one layer asked for, by their offset in the window file.
#[derive(Default)]
pub(super) struct Ahead(Arc<Shared>);

#[derive(Default)]
struct Shared {
    flights: Mutex<HashMap<u64, Arc<Flight>>>,
    /// Windows fetches asked for that no request carries yet: the flusher task requests them.
    pending: Mutex<Vec<Asked>>,
}

impl Shared {
    /// Requests `asked` in a task of its own (so no waiter depends on its caller) and ends each
    /// flight with its window or the request's error.
    fn request(
        self: &Arc<Self>,
        source: Arc<dyn BlobSource>,
        asked: Vec<Asked>,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.clone();
        tokio::spawn(async move {
            let ranges: Vec<(u64, u64)> = asked.iter().map(|(at, f)| (*at, f.len)).collect();
            let answers = split(source.read_ranges(&ranges).await, asked.len());
            let mut flights = shared.flights.lock().unwrap();
            for ((at, flight), answer) in asked.iter().zip(answers) {
                // A failed one is forgotten: later fetches ask again.
                if answer.is_err() && flights.get(at).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                    flights.remove(at);
                }
                flight.answer.set(answer);
            }
        })
    }
}

impl LayerReader {
    /// The window file's source, if it asks for several ranges in one request.
    fn windows_together(&self) -> Option<&Arc<dyn BlobSource>> {
        self.windows.as_ref().filter(|s| s.ranges_together())
    }

    /// Fetches ahead, in one request, the checkpoint windows that fetches of the missing spans
    /// of `ranges` (layer data: offset, length) would read from the window file. The windows
    /// are claimed and their request started when this is called, so fetches started after
    /// the call wait for it instead of reading them again; the returned future waits for it.
    /// A source that cannot ask for several ranges at once gets nothing ahead.
    pub fn prefetch_windows(
        &self,
        ranges: &[(u64, u64)],
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let request = self.windows_together().and_then(|source| {
            let claimed = self.claim_windows(ranges);
            if claimed.is_empty() {
                return None;
            }
            tracing::debug!(blob = %&self.index.blob.digest()[..12], windows = claimed.len(), "windows ahead");
            Some(self.windows_ahead.0.request(source.clone(), claimed))
        });
        async move {
            if let Some(request) = request {
                let _ = request.await;
            }
        }
    }

    /// The compressed window at `at` (`len` bytes) of the window file, requested together with
    /// the windows other fetches of this layer ask for at the same moment (those started
    /// together, as a walk's or an open's, need theirs together). `None`: the source asks for
    /// one range per request (read it alone).
    pub(super) async fn window_together(
        &self,
        at: u64,
        len: u64,
    ) -> Option<Result<Vec<u8>, SourceError>> {
        let source = self.windows_together()?.clone();
        let shared = &self.windows_ahead.0;
        let flight = {
            let mut flights = shared.flights.lock().unwrap();
            match flights.get(&at).filter(|f| f.len == len) {
                Some(f) => f.clone(),
                None => {
                    let flight = Flight::new(usize::MAX, len);
                    flights.insert(at, flight.clone());
                    let mut pending = shared.pending.lock().unwrap();
                    if pending.is_empty() {
                        // The flusher: runs after the fetches started with this one.
                        let (shared, source) = (shared.clone(), source.clone());
                        tokio::spawn(async move {
                            tokio::task::yield_now().await;
                            let asked = std::mem::take(&mut *shared.pending.lock().unwrap());
                            if !asked.is_empty() {
                                let _ = shared.request(source, asked).await;
                            }
                        });
                    }
                    pending.push((at, flight.clone()));
                    flight
                }
            }
        };
        let answer = flight.answer.get().await;
        let mut flights = shared.flights.lock().unwrap();
        if flights.get(&at).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&at);
        }
        Some(answer)
    }

    /// The windows fetches of `ranges` would read, not held or under way yet: registered.
    fn claim_windows(&self, ranges: &[(u64, u64)]) -> Vec<Asked> {
        // Which checkpoints, worked out before taking the lock (it asks the cache).
        let mut wanted = Vec::new();
        for &(offset, len) in ranges {
            let mut previous_missing = false;
            for i in self.spans_over(offset, len).map_while(|i| i) {
                let missing = !self.span_cached(i);
                if missing && !previous_missing {
                    let from = self.run_start(i, false);
                    match self.checkpoint_of(from) {
                        Some(cp)
                            if cp.window_size() > 0
                                && !cp.light
                                && (from == 0 || !self.span_cached(from - 1)) =>
                        {
                            wanted.push((from, cp.window_at, cp.window_len))
                        }
                        _ => {}
                    }
                }
                previous_missing = missing;
            }
        }
        let mut flights = self.windows_ahead.0.flights.lock().unwrap();
        // Windows whose span was cached meanwhile: no fetch will take them.
        flights.retain(|_, f| {
            !f.answer.is_set()
                || (f.span != usize::MAX
                    && !self.known_cached[f.span].load(std::sync::atomic::Ordering::Relaxed))
        });
        let mut held: u64 = flights.values().map(|f| f.len).sum();
        let mut claimed = Vec::new();
        for (from, at, len) in wanted {
            if flights.contains_key(&at) || held + len > HELD {
                continue;
            }
            held += len;
            let flight = Flight::new(from, len);
            flights.insert(at, flight.clone());
            claimed.push((at, flight));
        }
        claimed.sort_by_key(|(at, _)| *at);
        claimed
    }

    /// The compressed window at `at` of the window file if it was asked for ahead (waiting
    /// for its request): taken, so it is held no longer. `None`: not asked for ahead.
    pub(super) async fn window_ahead(
        &self,
        at: u64,
        len: u64,
    ) -> Option<Result<Vec<u8>, SourceError>> {
        let flight = {
            let mut flights = self.windows_ahead.0.flights.lock().unwrap();
            let found = flights
                .get(&at)
                .filter(|f| f.len == len && f.span != usize::MAX)?;
            let found = found.clone();
            flights.remove(&at);
            found
        };
        Some(flight.answer.get().await)
    }
}
