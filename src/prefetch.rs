//! Background fetching: while an image is mounted, fill the cache with the rest of its layers.
//!
//! Runs beside the FUSE driver (seventh stage, on top of [`ImageView`]), in the daemon's
//! tokio runtime. It goes through the same layer readers as foreground reads, so every byte
//! is verified and single-flight applies: a file being read in the foreground and fetched in
//! the background is fetched once. Order: the eStargz prefetch landmark of every layer first
//! (the files the image's builder marked as read at start-up), then each layer from its
//! start. It yields to the foreground — whenever reads came in during the last moment it
//! waits — and keeps to a bandwidth cap. It skips layers without random access (streamed whole
//! when indexed) and stops when the cache cap could not hold the image.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fs::ImageView;

/// Uncompressed bytes asked for per background read.
const STEP: u64 = 4 << 20;
/// How long the foreground must be quiet before background fetching goes on.
const QUIET: Duration = Duration::from_millis(300);

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

/// Fetches every missing span of `view`'s layers. `activity` counts foreground reads.
pub async fn prefetch(
    view: Arc<ImageView>,
    activity: Arc<AtomicU64>,
    settings: PrefetchSettings,
) -> PrefetchReport {
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
    let mut pacer = Pacer::new(settings.bandwidth, activity);
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
    for (layer, start, end) in plan {
        let reader = &view.readers()[layer];
        let index = reader.index();
        if !index.random_access() {
            continue;
        }
        let ratio = index.blob_size as f64 / index.size.max(1) as f64;
        let mut offset = start;
        let mut fetched_here = false;
        while offset < end {
            let len = STEP.min(end - offset);
            if !reader.is_cached(offset, len) {
                pacer.wait().await;
                if let Err(e) = reader.prefetch(offset, len).await {
                    tracing::warn!(blob = %index.blob, offset, error = %e, "background fetch stopped for this layer");
                    break;
                }
                let compressed = (len as f64 * ratio) as u64;
                pacer.spent(compressed);
                report.bytes += compressed;
                fetched_here = true;
            }
            offset += len;
        }
        if fetched_here {
            report.layers += 1;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(image = %view.name, bytes = report.bytes, seconds = report.seconds, "background fetch done");
    report
}

/// Keeps background fetching under a byte rate and out of the foreground's way.
struct Pacer {
    rate: Option<u64>,
    activity: Arc<AtomicU64>,
    seen: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl Pacer {
    fn new(rate: Option<u64>, activity: Arc<AtomicU64>) -> Pacer {
        let seen = activity.load(Ordering::Relaxed);
        Pacer {
            rate,
            activity,
            seen,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    async fn wait(&mut self) {
        // Foreground first: wait until no reads arrived for a moment.
        loop {
            let now = self.activity.load(Ordering::Relaxed);
            if now == self.seen {
                break;
            }
            self.seen = now;
            tokio::time::sleep(QUIET).await;
        }
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
