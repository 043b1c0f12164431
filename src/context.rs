//! The assembled pipeline a command or a mount daemon works with, built once from the
//! configuration: the store, a registry client, the chunk store and cache, and layer access.
//! Dropping it saves the bytes fetched per layer (`cache stats`).

use std::sync::Arc;

use crate::cache::{Cache, DiskChunks};
use crate::config::Config;
use crate::fs::Layers;
use crate::image::{ImageRecord, Platform};
use crate::reference::{Reference, ReferenceError};
use crate::registry::RegistryClient;
use crate::store::{Store, StoreError};

/// What a context could not do.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("opening the chunk cache under {root}: {source}")]
    Chunks {
        root: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pull(#[from] crate::pull::PullError),
}

/// The store, a registry client, the cache and layer access, as the configuration says.
pub struct Context {
    pub config: Config,
    pub store: Store,
    pub client: Arc<RegistryClient>,
    pub chunks: Arc<DiskChunks>,
    pub layers: Layers,
    /// The cache cap in bytes (`[cache] max_size` resolved for this store).
    pub cache_cap: u64,
}

impl Context {
    pub fn new(store: Store, config: &Config, plain_http: bool) -> Result<Context, ContextError> {
        let client = Arc::new(RegistryClient::new(
            config.registry.clone(),
            config.hosts.clone(),
            plain_http,
        ));
        let cache_cap = config.cache.max_size.bytes(store.root());
        let chunks = Arc::new(
            DiskChunks::open(store.root())
                .map_err(|source| ContextError::Chunks {
                    root: store.root().to_path_buf(),
                    source,
                })?
                .with_cap(Some(cache_cap)),
        );
        let cache = Arc::new(
            Cache::new(chunks.clone(), config.cache.memory_chunks)
                .with_memory_budget(config.cache.memory_size)
                .with_pass_budget(cache_cap / 2),
        );
        let layers =
            Layers::new(store.root(), client.clone(), cache).with_settings(config.index.clone());
        Ok(Context {
            config: config.clone(),
            store,
            client,
            chunks,
            layers,
            cache_cap,
        })
    }

    /// The stored image for `reference`, pulling its metadata first if needed — or again, if
    /// `platform` is given and the stored record is for another platform (the record then
    /// names the platform asked for).
    pub async fn image(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<ImageRecord, ContextError> {
        self.resolve(reference, platform, false).await
    }

    /// [`image`](Self::image), for a caller about to open the image's layers: when the image
    /// is pulled now, the first request of each layer's open starts as soon as the manifest is
    /// known ([`Layers::start_early`](crate::fs::Layers::start_early)), beside the config. The
    /// caller opens the layers next ([`crate::fs::ImageView::open_chain`] drops what its opens
    /// did not take) or calls [`Layers::clear_early`](crate::fs::Layers::clear_early).
    pub async fn image_to_open(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<ImageRecord, ContextError> {
        self.resolve(reference, platform, true).await
    }

    async fn resolve(
        &self,
        reference: &str,
        platform: Option<&Platform>,
        early: bool,
    ) -> Result<ImageRecord, ContextError> {
        let reference: Reference = reference.parse()?;
        if let Some(r) = self.store.images.get(&reference.to_string())? {
            match platform {
                Some(p) if !p.matches(&r.platform) => tracing::info!(
                    image = %r.name,
                    stored = %r.platform,
                    wanted = %p,
                    "stored for another platform: resolving again"
                ),
                _ => return Ok(r),
            }
        }
        let host = Platform::host();
        let platform = platform.unwrap_or(&host);
        let start_early = |manifest: &oci_spec::image::ImageManifest| {
            if early {
                self.layers.start_early(&reference, manifest);
            }
        };
        let pulled = crate::pull::pull_with(
            self.client.as_ref(),
            &self.store,
            &reference,
            platform,
            &|_| {},
            &start_early,
        )
        .await;
        if pulled.is_err() {
            // No open will take what was started for an image the pull refused.
            self.layers.clear_early();
        }
        let image = pulled?;
        if self.fetch_published(&image).await > 0 {
            // The record now names the adopted indexes.
            if let Some(r) = self.store.images.get(&image.name)? {
                return Ok(r);
            }
        }
        Ok(image)
    }

    /// With `[index] unbound_referrers` (opt-in): adopts the indexes published as referrers of
    /// `image` for layers the image pins none for (best effort: without them, layers are
    /// indexed by streaming). Returns how many were adopted.
    pub async fn fetch_published(&self, image: &ImageRecord) -> usize {
        crate::publish::adopt_if_opted_in(
            self.client.as_ref(),
            &self.store,
            image,
            &self.config.index,
        )
        .await
    }
}

impl Drop for Context {
    /// Whatever the command did, the bytes it fetched are added to the per-layer totals.
    fn drop(&mut self) {
        if let Err(e) = self.layers.save_fetched() {
            tracing::warn!(error = %e, "could not save fetched-byte counts");
        }
    }
}
