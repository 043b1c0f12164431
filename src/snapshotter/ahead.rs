//! Layer indexes fetched ahead of the mount. When a `Prepare` pulls an image's metadata, the
//! indexes the image pins (published stratafs indexes, eStargz and zstd:chunked TOCs) are
//! fetched and stored once checked — exactly as a mount's open of those layers would
//! ([`Layers::store_unbuilt`]): the first [`PARALLEL_OPENS`] layers' first requests as soon as
//! the manifest is parsed, beside the config ([`Layers::start_early`]), the rest once the
//! pull is done, that many layers at a time. containerd prepares the other layers and starts
//! the container meanwhile; the image's mount, which waits for these fetches
//! ([`Ahead::wait`]) rather than repeating them, then finds its indexes on disk.
//!
//! Nothing here decides what is trusted: the same checks run as in a mount, and a layer whose
//! index the image does not pin is left to the mount (it is never streamed here). A failed
//! fetch is logged and left to the mount, which tries again and reports the error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use oci_spec::image::ImageManifest;

use crate::cache::Cache;
use crate::config::IndexSettings;
use crate::fs::{Layers, PARALLEL_OPENS};
use crate::image::{ImageRecord, LayerRecord};
use crate::reference::Reference;
use crate::registry::Registry;

/// Starts and tracks the index fetches of the images the snapshotter pulls.
pub struct Ahead {
    root: PathBuf,
    client: Arc<dyn Registry>,
    cache: Arc<Cache>,
    settings: IndexSettings,
    /// The fetches under way, by image name.
    running: Arc<Mutex<HashMap<String, Running>>>,
}

type Running = Shared<BoxFuture<'static, ()>>;

/// One image's fetches: made when its pull starts, [`Ahead::start`]ed when it ends.
pub struct Fetch {
    layers: Arc<Layers>,
}

impl Fetch {
    /// The manifest is parsed: starts each pinned index's request beside the config's.
    pub fn manifest_known(&self, reference: &Reference, manifest: &ImageManifest) {
        self.layers.start_early(reference, manifest);
    }

    /// The pull failed: drops the requests started early.
    pub fn abandon(self) {
        self.layers.clear_early();
    }
}

impl Ahead {
    pub fn new(
        root: PathBuf,
        client: Arc<dyn Registry>,
        cache: Arc<Cache>,
        settings: IndexSettings,
    ) -> Ahead {
        Ahead {
            root,
            client,
            cache,
            settings,
            running: Default::default(),
        }
    }

    /// A new image's fetches (its own early requests: two pulls at once keep theirs apart).
    pub fn fetch(&self) -> Fetch {
        let layers = Layers::new(&self.root, self.client.clone(), self.cache.clone())
            .with_settings(self.settings.clone());
        Fetch {
            layers: Arc::new(layers),
        }
    }

    /// Stores the indexes `image` pins for its lazily servable layers that have none stored, in
    /// the background, [`PARALLEL_OPENS`] layers at a time (each blob once), as a mount opens
    /// them: an image of hundreds of layers holds no more indexes in memory at once.
    /// [`Ahead::wait`] waits for them.
    pub fn start(&self, image: &ImageRecord, fetch: Fetch) {
        let (image, layers) = (Arc::new(image.clone()), fetch.layers);
        let name = image.name.clone();
        let work = async move {
            let started = Instant::now();
            let mut due: Vec<LayerRecord> = Vec::new();
            for l in &image.layers {
                let fetches = crate::fs::lazily_servable(l) && !layers.streams(l);
                if fetches
                    && !already_stored(&layers, l)
                    && !due.iter().any(|d| d.digest == l.digest)
                {
                    due.push(l.clone());
                }
            }
            let stored: Vec<bool> = futures_util::stream::iter(due)
                .map(|layer| store(layers.clone(), image.clone(), layer))
                .buffer_unordered(PARALLEL_OPENS)
                .collect()
                .await;
            layers.clear_early();
            let stored = stored.iter().filter(|s| **s).count();
            tracing::info!(image = %image.name, stored, ms = started.elapsed().as_millis() as u64, "layer indexes fetched ahead of the mount");
        };
        let shared = tokio::spawn(work).map(|_| ()).boxed().shared();
        self.running
            .lock()
            .unwrap()
            .insert(name.clone(), shared.clone());
        // Forgotten once done, unless a newer fetch of the image took its place.
        let running = self.running.clone();
        tokio::spawn(async move {
            shared.clone().await;
            let mut map = running.lock().unwrap();
            if map.get(&name).is_some_and(|s| s.ptr_eq(&shared)) {
                map.remove(&name);
            }
        });
    }

    /// Waits for the fetches of `image`'s indexes, if any are under way, for at most
    /// [`WAIT_MAX`] (the registry requests end sooner: they have timeouts of their own).
    pub async fn wait(&self, image: &str) {
        let running = self.running.lock().unwrap().get(image).cloned();
        if let Some(fetches) = running {
            if tokio::time::timeout(WAIT_MAX, fetches).await.is_err() {
                tracing::warn!(%image, "the layer indexes fetched ahead are still on their way: mounting without waiting for them");
            }
        }
    }
}

/// Stores the index `image` pins for `layer` ([`Layers::store_unbuilt`]); whether it is
/// stored now. A failure is logged and left to the mount, which tries again.
async fn store(layers: Arc<Layers>, image: Arc<ImageRecord>, layer: LayerRecord) -> bool {
    match layers.store_unbuilt(&image, &layer).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(image = %image.name, layer = %layer.digest, error = %e, "fetching the layer's index ahead of its mount failed (the mount tries again)");
            false
        }
    }
}

/// Longest a mount waits for its image's indexes fetched ahead.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Whether an index of `layer` is stored already, its own or one under a pin the image gives:
/// nothing to fetch (and nothing to read now: a stat each).
fn already_stored(layers: &Layers, layer: &LayerRecord) -> bool {
    let (indexes, blob) = (layers.indexes(), &layer.digest);
    indexes.has(blob, None)
        || crate::fs::pinned_index(layer).is_some_and(|(pin, _)| indexes.has(blob, Some(&pin)))
        || crate::fs::toc_pin(layer).is_some_and(|pin| indexes.has(blob, Some(&pin)))
}
