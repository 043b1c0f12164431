//! Which image layer a `Prepare` with `containerd.io/snapshot.ref` asks for, and whether
//! stratafs can serve it lazily.
//!
//! The layer is found, in order, from the labels of the clients that pass them — the CRI plugin
//! (`containerd.io/snapshot/cri.image-ref`, `…/cri.layer-digest`, and `…/cri.manifest-digest`,
//! to which the pull of a tag is pinned) and `ctr-remote images rpull`
//! (`containerd.io/snapshot/remote/stargz.reference`, `…/stargz.digest`) — pulling the image's
//! metadata into the store if it is not there (no layer data), or else from the images already
//! in the store (`stratafs pull` done beforehand), by ChainID. Lazily servable: gzip (with or
//! without a published index; eStargz included), zstd:chunked and uncompressed tar layers, and
//! plain zstd layers that fit one streaming pass of the cache ([`crate::fs::fits_one_pass`]:
//! their mount streams them whole, in parallel, and serves them from the cache). Larger plain
//! zstd layers and unknown media types are not: containerd then downloads and applies them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::image::{ImageRecord, Platform};
use crate::reference::Reference;
use crate::registry::Registry;
use crate::store::Store;

use super::ahead::Ahead;
use super::meta::LazyLayer;

pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const CRI_IMAGE: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// The manifest containerd resolved the image to (CRI): the one pulled, whatever the tag names
/// by the time the `Prepare` comes.
pub const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const STARGZ_IMAGE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_LAYER: &str = "containerd.io/snapshot/remote/stargz.digest";

/// Finds the layers behind ChainIDs.
pub struct Resolver {
    pub store: Store,
    pub client: Arc<dyn Registry>,
    /// The `[index]` settings: adopt unbound referrer indexes when pulling only if opted in.
    pub index: crate::config::IndexSettings,
    pub platform: Platform,
    /// Bytes one streaming pass may keep in the cache (the mounts' [`crate::cache::Cache::pass_budget`]):
    /// decides whether a plain zstd layer is served lazily.
    pub pass_budget: u64,
    /// Fetches the layers' pinned indexes into the store from the moment a pulled manifest is
    /// parsed, for the image's mount to find ([`Ahead`]); `None` leaves them to the mount.
    pub ahead: Option<Arc<Ahead>>,
}

/// Why a layer is not served lazily (containerd then applies it itself).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no pulled image has this layer and no label names one")]
    NoImage,
    #[error("{image} has no layer with this ChainID")]
    NoChain { image: String },
    #[error("labels name layer {labelled}, but {image} has {actual} at this ChainID")]
    WrongLayer {
        labelled: String,
        image: String,
        actual: String,
    },
    #[error("labels name manifest {labelled}, but {image} resolves to {actual} for this platform")]
    WrongManifest {
        labelled: String,
        image: String,
        actual: String,
    },
    #[error("layer {digest} is {media_type}, which stratafs does not serve lazily")]
    NotLazy { digest: String, media_type: String },
    #[error("plain zstd layer {digest} ({size} bytes) may decode to more than the {budget} bytes one streaming pass may keep in the cache (half of [cache] max_size)")]
    TooLarge {
        digest: String,
        size: u64,
        budget: u64,
    },
    #[error("label names image {reference:?}: {source}")]
    BadReference {
        reference: String,
        #[source]
        source: crate::reference::ReferenceError,
    },
    #[error("pulling {reference}: {source}")]
    Pull {
        reference: String,
        #[source]
        source: Box<crate::pull::PullError>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Resolver {
    /// The lazily servable layer whose chain is `target`, and whether that chain is the image's
    /// whole rootfs (its top layer); or why there is none.
    pub async fn resolve(
        &self,
        target: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(LazyLayer, bool), ResolveError> {
        let reference = labels.get(CRI_IMAGE).or_else(|| labels.get(STARGZ_IMAGE));
        let digest = labels.get(CRI_LAYER).or_else(|| labels.get(STARGZ_LAYER));
        // Only beside CRI's own image label: a manifest of the image it names.
        let manifest = labels
            .get(CRI_IMAGE)
            .and_then(|_| labels.get(CRI_MANIFEST))
            .and_then(|d| match crate::digest::parse(d) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::debug!(label = %d, error = %e, "ignoring a manifest digest label that is not a digest");
                    None
                }
            });
        let image = match reference {
            Some(r) => self.image_named(r, manifest, target).await?,
            None => self
                .stored_with_chain(target)?
                .ok_or(ResolveError::NoImage)?,
        };
        let layer = image
            .layers
            .iter()
            .find(|l| l.chain_id.as_ref() == target)
            .ok_or_else(|| ResolveError::NoChain {
                image: image.name.clone(),
            })?;
        if let Some(d) = digest {
            if layer.digest.as_ref() != d.as_str() {
                return Err(ResolveError::WrongLayer {
                    labelled: d.clone(),
                    image: image.name.clone(),
                    actual: layer.digest.to_string(),
                });
            }
        }
        let top = image
            .layers
            .last()
            .is_some_and(|l| l.chain_id.as_ref() == target);
        if !crate::fs::fits_one_pass(layer, self.pass_budget) {
            // A known compression that does not fit is plain zstd.
            return Err(
                match crate::image::Compression::of_layer(&layer.media_type) {
                    Some(_) => ResolveError::TooLarge {
                        digest: layer.digest.to_string(),
                        size: layer.size,
                        budget: self.pass_budget,
                    },
                    None => ResolveError::NotLazy {
                        digest: layer.digest.to_string(),
                        media_type: layer.media_type.to_string(),
                    },
                },
            );
        }
        let lazy = LazyLayer {
            image: image.name.clone(),
            chain_id: target.to_string(),
            digest: layer.digest.to_string(),
        };
        Ok((lazy, top))
    }

    /// The image `reference` from the store, pulled (metadata only) if missing or if the stored
    /// record predates a tag move and lacks `target`. With `manifest` (the manifest containerd
    /// resolved the name to, from CRI's label) a record stored under the name is taken only if
    /// it is that manifest's, and the pull is pinned to it (`name:tag@digest`): the tag may
    /// have moved since containerd resolved it.
    async fn image_named(
        &self,
        reference: &str,
        manifest: Option<oci_spec::image::Digest>,
        target: &str,
    ) -> Result<ImageRecord, ResolveError> {
        let bad = |source| ResolveError::BadReference {
            reference: reference.to_string(),
            source,
        };
        let named: Reference = reference.parse().map_err(bad)?;
        let fits = |r: &ImageRecord| {
            r.layers.iter().any(|l| l.chain_id.as_ref() == target)
                && manifest.as_ref().is_none_or(|d| &r.manifest.digest == d)
        };
        // The image as named (`stratafs pull` beforehand stores it so), if it is the labelled
        // manifest: a manifest is known by its digest.
        if let Ok(Some(r)) = self.store.images.get(&named.to_string()) {
            if fits(&r) {
                return Ok(r);
            }
        }
        // Else pinned to the labelled manifest, which is what containerd unpacks: the tag's,
        // or for a name pinned to an index, its manifest for this platform.
        let parsed: Reference = match &manifest {
            Some(d) => {
                let tag = named.tag().map(|t| format!(":{t}")).unwrap_or_default();
                let pinned: Reference =
                    format!("{}{tag}@{d}", named.name()).parse().map_err(bad)?;
                if let Ok(Some(r)) = self.store.images.get(&pinned.to_string()) {
                    if fits(&r) {
                        return Ok(r);
                    }
                }
                pinned
            }
            None => named,
        };
        let fetch = self.ahead.as_ref().map(|a| a.fetch());
        let manifest_known = |manifest: &oci_spec::image::ImageManifest| {
            if let Some(f) = &fetch {
                f.manifest_known(&parsed, manifest);
            }
        };
        let pulled = crate::pull::pull_with(
            self.client.as_ref(),
            &self.store,
            &parsed,
            &self.platform,
            &|_| {},
            &manifest_known,
        )
        .await;
        let image = match pulled {
            Ok(image) => image,
            Err(source) => {
                if let Some(f) = fetch {
                    f.abandon();
                }
                // Not a design choice but a failure (a registry unreachable, plain HTTP not
                // allowed, credentials): said at the default log level.
                tracing::warn!(%reference, error = %source, "cannot pull the image's metadata: containerd applies its layers (not lazy)");
                return Err(ResolveError::Pull {
                    reference: reference.to_string(),
                    source: Box::new(source),
                });
            }
        };
        // Pinned to a manifest, the pull gives that manifest or fails; unless the label named
        // an index (containerd labels the manifest it unpacks).
        if let Some(d) = manifest.filter(|d| d != &image.manifest.digest) {
            if let Some(f) = fetch {
                f.abandon();
            }
            return Err(ResolveError::WrongManifest {
                labelled: d.to_string(),
                image: image.name.clone(),
                actual: image.manifest.digest.to_string(),
            });
        }
        let adopted = crate::publish::adopt_if_opted_in(
            self.client.as_ref(),
            &self.store,
            &image,
            &self.index,
        )
        .await;
        // Adopted referrer indexes are in the stored record: the fetches ahead read it.
        let image = match adopted {
            0 => image,
            _ => self
                .store
                .images
                .get(&image.name)
                .ok()
                .flatten()
                .unwrap_or(image),
        };
        if let (Some(ahead), Some(f)) = (&self.ahead, fetch) {
            ahead.start(&image, f);
        }
        Ok(image)
    }

    fn stored_with_chain(&self, target: &str) -> Result<Option<ImageRecord>, ResolveError> {
        let images = self.store.images.list()?;
        Ok(images
            .into_iter()
            .find(|i| i.layers.iter().any(|l| l.chain_id.as_ref() == target)))
    }
}
