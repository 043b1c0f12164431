//! What the cache holds for each layer of the pulled images: the one place that counts a
//! layer's cached spans and bytes and the bytes fetched for it (`cache stats`, its `--watch`
//! view, and anything else reporting progress read it from here).
//!
//! Reading is side-effect free: it looks at the stored images, the stored layer indexes
//! ([`IndexStore::get_any`]), the chunk store (`contains`, no chunk is read) and the fetched
//! counters the mount daemons keep under `cache/fetched/`. Memory: one index at a time.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cache::ChunkStore;
use crate::layer::{IndexStore, LayerError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("reading the image store")]
    Store(#[source] StoreError),
    #[error("reading the index of layer {0}")]
    Index(String, #[source] Box<LayerError>),
    #[error("layer digest {0} in the image store is not a digest")]
    Digest(String),
    #[error("reading the chunk cache's usage")]
    Chunks(#[source] std::io::Error),
}

/// One layer blob of the pulled images (the JSON shape of `cache stats --json`'s `layers`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LayerStatus {
    pub digest: String,
    /// Names of the images that have the layer.
    pub images: Vec<String>,
    /// Compressed size (the blob).
    pub blob_size: u64,
    /// Whether an index is stored (without one, nothing of it is cached).
    pub indexed: bool,
    /// Uncompressed size.
    pub size: u64,
    pub spans: usize,
    pub cached_spans: usize,
    /// Uncompressed bytes cached.
    pub cached_bytes: u64,
    pub complete: bool,
    /// Compressed bytes read from registries for it so far.
    pub fetched_bytes: u64,
}

/// Every layer of every stored image, by digest.
pub fn layers(store: &Store, chunks: &dyn ChunkStore) -> Result<Vec<LayerStatus>, StatusError> {
    let indexes = IndexStore::new(store.root());
    let mut layers: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
    for image in store.images.list().map_err(StatusError::Store)? {
        for layer in &image.layers {
            let row = layers
                .entry(layer.digest.to_string())
                .or_insert((Vec::new(), layer.size));
            row.0.push(image.name.clone());
        }
    }
    let fetched_dir = crate::store::Layout::new(store.root()).fetched();
    let mut out = Vec::with_capacity(layers.len());
    for (digest, (images, blob_size)) in layers {
        let parsed =
            crate::digest::parse(&digest).map_err(|_| StatusError::Digest(digest.clone()))?;
        let index = indexes
            .get_any(&parsed)
            .map_err(|e| StatusError::Index(digest.clone(), Box::new(e)))?;
        let (mut spans, mut cached_spans, mut size, mut cached_bytes) = (0, 0, 0, 0);
        if let Some(i) = &index {
            spans = i.spans.len();
            size = i.size;
            for s in i.spans.iter().filter(|s| chunks.contains(&s.digest)) {
                cached_spans += 1;
                cached_bytes += s.out_len;
            }
        }
        let fetched_bytes =
            crate::fs::fetched_total(&fetched_dir, digest.trim_start_matches("sha256:"));
        out.push(LayerStatus {
            images,
            blob_size,
            indexed: index.is_some(),
            size,
            spans,
            cached_spans,
            cached_bytes,
            complete: index.is_some() && cached_spans == spans,
            fetched_bytes,
            digest,
        });
    }
    Ok(out)
}

/// What `cache stats` reports (serialized: its `--json` shape, docs/cli.md): chunks and bytes
/// on disk against the cap, every layer, and the mounts of the store.
#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    pub chunks: u64,
    pub bytes: u64,
    pub max_size: u64,
    pub layers: Vec<LayerStatus>,
    pub mounts: Vec<MountStatus>,
    /// Each layer's fetch rate (bytes/s) since the previous report of a watch.
    #[serde(skip)]
    pub rates: Option<BTreeMap<String, f64>>,
}

/// A mount of the store, as `cache stats` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MountStatus {
    pub mountpoint: std::path::PathBuf,
    pub image: String,
    pub pid: u32,
    pub holder: Option<u32>,
    pub layers: Vec<String>,
    /// Fetches its daemon has in flight (asked of its metrics endpoint, if it serves one and
    /// the report asked).
    #[serde(skip)]
    pub in_flight: Option<f64>,
}

impl CacheReport {
    /// The cache of `ctx`'s store now. `in_flight`: ask each mount's daemon what it is
    /// fetching (up to half a second per daemon with a metrics endpoint).
    pub fn collect(
        ctx: &crate::context::Context,
        in_flight: bool,
    ) -> Result<CacheReport, StatusError> {
        let (chunks, bytes) = ctx.chunks.usage().map_err(StatusError::Chunks)?;
        let mounts = crate::daemon::mounts(ctx.store.root())
            .into_iter()
            .map(|m| MountStatus {
                in_flight: if in_flight {
                    fetches_in_flight(&m)
                } else {
                    None
                },
                mountpoint: m.mountpoint,
                image: m.image,
                pid: m.pid,
                holder: m.holder,
                layers: m.layers,
            });
        Ok(CacheReport {
            chunks,
            bytes,
            max_size: ctx.cache_cap,
            layers: layers(&ctx.store, ctx.chunks.as_ref())?,
            mounts: mounts.collect(),
            rates: None,
        })
    }

    /// Adds each layer's fetch rate since `before`, taken `seconds` earlier.
    pub fn with_rates_since(mut self, before: &CacheReport, seconds: f64) -> CacheReport {
        self.rates = Some(fetch_rates(&before.layers, &self.layers, seconds));
        self
    }
}

/// Each layer's fetch rate in bytes per second between two reports `seconds` apart (a layer
/// new in `now` counts from zero).
pub fn fetch_rates(
    before: &[LayerStatus],
    now: &[LayerStatus],
    seconds: f64,
) -> BTreeMap<String, f64> {
    now.iter()
        .map(|l| {
            let was = before.iter().find(|b| b.digest == l.digest);
            let delta = l
                .fetched_bytes
                .saturating_sub(was.map_or(l.fetched_bytes, |b| b.fetched_bytes));
            (l.digest.clone(), delta as f64 / seconds.max(1e-3))
        })
        .collect()
}

/// How many fetches the daemon of mount `record` has in flight, asked of its metrics endpoint
/// (none when it serves no metrics or does not answer within half a second).
pub fn fetches_in_flight(record: &crate::daemon::MountRecord) -> Option<f64> {
    let text = crate::metrics::scrape(
        record.metrics.as_deref()?,
        std::time::Duration::from_millis(500),
    )
    .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("stratafs_fetches_in_flight ")?
            .parse::<f64>()
            .ok()
    })
}
