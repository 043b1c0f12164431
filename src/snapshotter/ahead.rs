//! Layer indexes fetched ahead of the mount. When a `Prepare` pulls an image's metadata, the
//! indexes the image pins (published stratafs indexes, eStargz and zstd:chunked TOCs) are
//! requested as soon as its manifest is parsed, beside the config, and stored once checked —
//! exactly as a mount's open of those layers would ([`Layers::store_unbuilt`]). containerd
//! prepares the other layers and starts the container meanwhile; the image's mount, which
//! waits for these fetches ([`Ahead::wait`]) rather than repeating them, then finds its
//! indexes on disk.
//!
//! Nothing here decides what is trusted: the same checks run as in a mount, and a layer whose
//! index the image does not pin is left to the mount (it is never streamed here). A failed
//! fetch is logged and left to the mount, which tries again and reports the error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use oci_spec::image::ImageManifest;

use crate::cache::Cache;
use crate::config::IndexSettings;
use crate::fs::Layers;
use crate::image::ImageRecord;
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

    /// Stores the indexes `image` pins for its lazily servable layers, in the background (all
    /// layers at once, as the requests started early are). [`Ahead::wait`] waits for them.
    pub fn start(&self, image: &ImageRecord, fetch: Fetch) {
        let (image, layers) = (image.clone(), fetch.layers);
        let name = image.name.clone();
        let work = async move {
            let started = Instant::now();
            let servable = image
                .layers
                .iter()
                .filter(|l| crate::fs::lazily_servable(l) && !layers.streams(l));
            let stored = futures_util::future::join_all(servable.map(|layer| {
                let (image, layers) = (&image, &layers);
                async move {
                    match layers.store_unbuilt(image, layer).await {
                        Ok(stored) => stored,
                        Err(e) => {
                            tracing::warn!(image = %image.name, layer = %layer.digest, error = %e, "fetching the layer's index ahead of its mount failed (the mount tries again)");
                            false
                        }
                    }
                }
            }))
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

    /// Waits for the fetches of `image`'s indexes, if any are under way.
    pub async fn wait(&self, image: &str) {
        let running = self.running.lock().unwrap().get(image).cloned();
        if let Some(fetches) = running {
            fetches.await;
        }
    }
}
