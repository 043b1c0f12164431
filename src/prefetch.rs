//! Background fetching: while an image is mounted, fill the cache with the rest of its layers.
//!
//! Runs beside the FUSE driver (seventh stage, on top of [`ImageView`]), in the daemon's
//! tokio runtime, from the moment of mount (or after `[mount] background_delay_secs`). It goes
//! through the same layer readers as foreground reads, so every byte is verified and single
//! flight applies: a file being read in the foreground and fetched in the background is
//! fetched once. Order: first what follows the reads — the missing bytes within [`FOLLOW`]
//! after where the mount's latest read that had to fetch ended (the next files read are often
//! the next ones in tar order) — then the eStargz prefetch landmark of every layer (the files
//! the image's builder marked as read at start-up), then each layer from its start; in steps
//! of [`STEP`] bytes of layer data, a few under way at once.
//!
//! It keeps the link busy without getting in the foreground's way: a step starts only while
//! no read's fetch and no fetch ahead of reads (an open's, a read's neighbours, a profile's
//! replay) is under way in the mount, and the steps under way hold at most
//! [`BACKGROUND_BUDGET`](crate::layer::reader::budget::BACKGROUND_BUDGET) — so a read that
//! misses waits behind at most the compressed bytes of the steps already on the link (the bound
//! is stated in [`crate::layer::reader::budget`]). It keeps to a bandwidth cap if one is set,
//! skips layers without random access (streamed whole when indexed) and stops when the cache
//! cap could not hold the image. A step that fails is tried again later, three times at most
//! (then its bytes are left to the reads); three failed steps in a row stop a layer's fill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fs::ImageView;

/// Bytes of layer data (uncompressed) per background step.
pub const STEP: u64 = 256 << 10;
/// How far past the latest read that fetched the fill looks first (bytes of layer data).
pub const FOLLOW: u64 = 8 << 20;
/// Steps under way at once at most (the background budget also bounds what they hold).
const PARALLEL: usize = 2;
/// Failed steps in a row after which a layer's fill stops; a step that fails is tried again
/// later, up to this many times in all.
const FAILURES: u32 = 3;

/// How background fetching behaves.
#[derive(Clone, Debug)]
pub struct PrefetchSettings {
    /// Compressed bytes per second at most (`None`: no cap).
    pub bandwidth: Option<u64>,
    /// Wait this long after mounting before starting.
    pub delay: Duration,
    /// The cache cap, if any: an image larger than it is not fetched whole.
    pub cache_cap: Option<u64>,
}

/// What a background fetch did.
#[derive(Debug, Default)]
pub struct PrefetchReport {
    pub layers: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Fetches every missing span of `view`'s layers.
pub async fn prefetch(view: Arc<ImageView>, settings: PrefetchSettings) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport::default();
    let total: u64 = view.readers().iter().map(|r| r.index().size).sum();
    if settings.cache_cap.is_some_and(|cap| cap < total) {
        tracing::info!(
            image = %view.name,
            "background fetch off: the image ({total} bytes) is larger than the cache cap"
        );
        return report;
    }
    tokio::time::sleep(settings.delay).await;
    let mut pacer = Pacer::new(settings.bandwidth);
    // Landmarks first, then everything; ranges already cached are skipped quickly.
    let mut plan: Vec<(usize, u64, u64)> = Vec::new();
    for (i, r) in view.readers().iter().enumerate() {
        if let Some(end) = r.index().prefetch_end {
            plan.push((i, 0, end));
        }
    }
    for (i, r) in view.readers().iter().enumerate() {
        plan.push((i, 0, r.index().size));
    }
    let layers = view.readers().len();
    let mut failures = vec![0u32; layers];
    let mut filled = vec![false; layers];
    let mut steps = tokio::task::JoinSet::new();
    let mut book = Book {
        stopped: vec![false; layers],
        ..Book::default()
    };
    let mut attempts: std::collections::HashMap<(usize, u64), u32> = Default::default();
    let mut settle = |done: Result<
        (tokio::task::Id, Result<u64, String>),
        tokio::task::JoinError,
    >,
                      book: &mut Book,
                      pacer: &mut Pacer| {
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            Err(e) => (e.id(), Err(e.to_string())),
        };
        let Some((layer, offset, len)) = book.under_way.remove(&id) else {
            return;
        };
        match result {
            Ok(bytes) => {
                failures[layer] = 0;
                pacer.spent(bytes);
                report.bytes += bytes;
                filled[layer] |= bytes > 0;
            }
            Err(e) => {
                failures[layer] += 1;
                let tried = attempts.entry((layer, offset)).or_default();
                *tried += 1;
                let blob = &view.readers()[layer].index().blob;
                if failures[layer] < FAILURES && *tried < FAILURES {
                    tracing::warn!(%blob, offset, error = %e, "background fetch step failed; tried again later");
                    book.retry.push((layer, offset, len));
                } else if failures[layer] < FAILURES {
                    tracing::warn!(%blob, offset, error = %e, "background fetch step failed {FAILURES} times; left to reads");
                    book.given_up.insert((layer, offset));
                } else if !book.stopped[layer] {
                    tracing::warn!(%blob, error = %e, "background fetch stopped for this layer after {FAILURES} failed steps in a row");
                }
                book.stopped[layer] |= failures[layer] >= FAILURES;
            }
        }
    };
    let mut plan = plan
        .into_iter()
        .filter(|(layer, _, _)| view.readers()[*layer].index().random_access());
    let mut planned: Option<(usize, u64, u64)> = plan.next();
    loop {
        while steps.len() >= PARALLEL {
            let done = steps.join_next_with_id().await.expect("steps under way");
            settle(done, &mut book, &mut pacer);
        }
        // Chosen once the foreground is idle, so the step follows the latest reads.
        if let Some(reader) = view.readers().first() {
            reader.foreground_idle().await;
        }
        let step = match near_reads(&view, &book) {
            Some(step) => Some(step),
            None => match book
                .retry
                .pop()
                .filter(|(l, o, _)| !book.stopped[*l] && !book.busy(*l, *o))
            {
                Some(step) => Some(step),
                None => next_planned(&view, &mut plan, &mut planned, &book),
            },
        };
        let Some((layer, offset, len)) = step else {
            // Nothing left but steps under way (whose ends may show more near the reads).
            match steps.join_next_with_id().await {
                Some(done) => {
                    settle(done, &mut book, &mut pacer);
                    continue;
                }
                None => break,
            }
        };
        pacer.wait().await;
        let view = view.clone();
        let step = steps.spawn(async move {
            let filled = view.readers()[layer].fill(offset, len).await;
            filled.map_err(|e| e.to_string())
        });
        book.under_way.insert(step.id(), (layer, offset, len));
    }
    report.layers = filled.iter().filter(|f| **f).count();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(image = %view.name, bytes = report.bytes, seconds = report.seconds, "background fetch done");
    report
}

/// The first missing step within [`FOLLOW`] after where the mount's latest read that fetched
/// ended, in that read's layer, if any.
fn near_reads(view: &ImageView, book: &Book) -> Option<(usize, u64, u64)> {
    let (layer, (end, _)) = view
        .readers()
        .iter()
        .map(|r| r.last_read())
        .enumerate()
        .filter(|(l, (_, tick))| *tick > 0 && !book.stopped[*l])
        .max_by_key(|(_, (_, tick))| *tick)?;
    let reader = &view.readers()[layer];
    let size = reader.index().size;
    let mut offset = end;
    while offset < size.min(end + FOLLOW) {
        let len = STEP.min(size - offset);
        if !book.busy(layer, offset) && !reader.is_cached(offset, len) {
            return Some((layer, offset, len));
        }
        offset += len;
    }
    None
}

/// The next missing step of the plan (landmarks, then whole layers), advancing it.
fn next_planned(
    view: &ImageView,
    plan: &mut impl Iterator<Item = (usize, u64, u64)>,
    planned: &mut Option<(usize, u64, u64)>,
    book: &Book,
) -> Option<(usize, u64, u64)> {
    loop {
        let (layer, offset, end) = (*planned)?;
        if offset >= end || book.stopped[layer] {
            *planned = plan.next();
            continue;
        }
        let len = STEP.min(end - offset);
        *planned = Some((layer, offset + len, end));
        if !book.busy(layer, offset) && !view.readers()[layer].is_cached(offset, len) {
            return Some((layer, offset, len));
        }
    }
}

/// What the fill keeps of its steps.
#[derive(Default)]
struct Book {
    /// Steps started and not yet settled, by task.
    under_way: std::collections::HashMap<tokio::task::Id, (usize, u64, u64)>,
    /// Steps (layer, offset) given up on, never chosen again.
    given_up: std::collections::HashSet<(usize, u64)>,
    /// Failed steps to try again.
    retry: Vec<(usize, u64, u64)>,
    /// Layers whose fill stopped.
    stopped: Vec<bool>,
}

impl Book {
    /// Whether the step at `offset` of `layer` is not to be chosen now: under way (at most
    /// [`PARALLEL`] steps), or given up on.
    fn busy(&self, layer: usize, offset: u64) -> bool {
        self.under_way
            .values()
            .any(|&(l, o, _)| (l, o) == (layer, offset))
            || self.given_up.contains(&(layer, offset))
    }
}

/// Keeps background fetching under a byte rate.
struct Pacer {
    rate: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    async fn wait(&mut self) {
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.window_bytes as f64 / rate as f64);
            let elapsed = self.window_start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
            if self.window_start.elapsed() > Duration::from_secs(10) {
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
        }
    }

    fn spent(&mut self, bytes: u64) {
        self.window_bytes += bytes;
    }
}
