//! Background fetching: while an image is mounted, fill the cache with the rest of its layers.
//!
//! Runs beside the FUSE driver (seventh stage, on top of [`ImageView`]), in the daemon's
//! tokio runtime, from the moment of mount (or after `[mount] background_delay_secs`). It goes
//! through the same layer readers as foreground reads, so every byte is verified and single
//! flight applies: a file being read in the foreground and fetched in the background is
//! fetched once. Order: the eStargz prefetch landmark of every layer first (the files the
//! image's builder marked as read at start-up), then each layer from its start, in steps of
//! [`STEP`] bytes of layer data, a few under way at once.
//!
//! It keeps the link busy without getting in the foreground's way: a step starts only while
//! no read's fetch and no fetch ahead of reads (an open's, a read's neighbours, a profile's
//! replay) is under way in the mount, and the steps under way hold at most
//! [`BACKGROUND_BUDGET`](crate::layer::reader::budget::BACKGROUND_BUDGET) — so a read that
//! misses waits behind at most the compressed bytes of the steps already on the link (the bound
//! is stated in [`crate::layer::reader::budget`]). It keeps to a bandwidth cap if one is set,
//! skips layers without random access (streamed whole when indexed) and stops when the cache
//! cap could not hold the image.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fs::ImageView;

/// Bytes of layer data (uncompressed) per background step.
pub const STEP: u64 = 512 << 10;
/// Steps started at once at most (the background budget bounds what they hold).
const PARALLEL: usize = 4;

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
    let mut stopped = vec![false; view.readers().len()];
    let mut filled = vec![false; view.readers().len()];
    let mut steps = tokio::task::JoinSet::new();
    let mut settle = |done: Result<(usize, Result<u64, String>), tokio::task::JoinError>,
                      stopped: &mut [bool],
                      pacer: &mut Pacer| {
        match done {
            Ok((layer, Ok(bytes))) => {
                pacer.spent(bytes);
                report.bytes += bytes;
                filled[layer] |= bytes > 0;
            }
            Ok((layer, Err(e))) => {
                if !stopped[layer] {
                    let blob = &view.readers()[layer].index().blob;
                    tracing::warn!(%blob, error = %e, "background fetch stopped for this layer");
                }
                stopped[layer] = true;
            }
            Err(e) => tracing::warn!(error = %e, "background fetch step failed"),
        }
    };
    for (layer, start, end) in plan {
        let index = view.readers()[layer].index().clone();
        if !index.random_access() {
            continue;
        }
        let mut offset = start;
        while offset < end && !stopped[layer] {
            let len = STEP.min(end - offset);
            if !view.readers()[layer].is_cached(offset, len) {
                pacer.wait().await;
                while steps.len() >= PARALLEL {
                    let done = steps.join_next().await.expect("steps under way");
                    settle(done, &mut stopped, &mut pacer);
                }
                let view = view.clone();
                steps.spawn(async move {
                    let filled = view.readers()[layer].fill(offset, len).await;
                    (layer, filled.map_err(|e| e.to_string()))
                });
            }
            offset += len;
        }
    }
    while let Some(done) = steps.join_next().await {
        settle(done, &mut stopped, &mut pacer);
    }
    report.layers = filled.iter().filter(|f| **f).count();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(image = %view.name, bytes = report.bytes, seconds = report.seconds, "background fetch done");
    report
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
