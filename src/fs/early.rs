//! The first request of each layer's open, started while the image is still being pulled: as
//! soon as the manifest is known ([`crate::pull::pull_with`]), [`Layers::start_early`] starts
//! for the first [`super::PARALLEL_OPENS`] layers whatever their open will ask for first — the
//! index blob the manifest pins (`[index] published`), else the eStargz footer or the
//! zstd:chunked TOC its annotations pin — beside the config's fetch, which would otherwise
//! come first. A mount then answers one round trip sooner.
//!
//! The opens decide as before ([`Layers::index`]): they take a held answer where they would
//! have made the same request ([`crate::registry::Early`]), and check it as they check their
//! own — the index blob against its pinned digest (by the client) and then against the layer,
//! a footer and TOC against the TOC's pin. A layer whose index is already stored gets no
//! request. Nothing here decides what is trusted; a wrong guess (an open that takes another
//! path, or a pull that then refuses the image) costs one request, dropped when the layers
//! are open or the pull failed ([`Layers::clear_early`]). Mounts of one chain of an image
//! (the snapshotter's) start nothing early: they may open fewer layers.

use std::collections::BTreeMap;

use oci_spec::image::ImageManifest;

use crate::image::Compression;
use crate::layer::estargz::{FOOTER_SIZE, TOC_DIGEST_ANNOTATION};
use crate::layer::zstd_chunked;
use crate::reference::Reference;
use crate::registry::MAX_INDEX_BLOB;

use super::indexing::INDEX_ANNOTATION;
use super::Layers;

impl Layers {
    /// Starts the first request of the opens of `manifest`'s first layers (of `reference`'s
    /// repository), to be taken by those opens.
    pub fn start_early(&self, reference: &Reference, manifest: &ImageManifest) {
        let mut started = 0;
        for layer in manifest.layers() {
            if started == super::PARALLEL_OPENS {
                break;
            }
            let Ok(blob) = crate::digest::parse(layer.digest().as_ref()) else {
                continue;
            };
            if self.indexes.has(&blob, None) {
                continue;
            }
            let annotations: BTreeMap<String, String> = layer
                .annotations()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            let parse = |key: &str| {
                annotations
                    .get(key)
                    .and_then(|a| crate::digest::parse(a).ok())
            };
            let (client, reference) = (self.client.clone(), reference.clone());
            // The index blob the manifest pins, as `find` takes it first.
            if let Some(pin) = parse(INDEX_ANNOTATION).filter(|_| self.settings.published) {
                if !self.indexes.has(&blob, Some(&pin)) {
                    let key = (pin.clone(), None);
                    self.early.start(key, async move {
                        client
                            .fetch_blob((&reference, &pin), Some(MAX_INDEX_BLOB))
                            .await
                    });
                    started += 1;
                }
                continue;
            }
            // Else the TOC's first read: an eStargz footer, a zstd:chunked TOC.
            let size = layer.size();
            let (pin, range) = match Compression::of_layer(layer.media_type().as_ref()) {
                Some(Compression::Gzip) if size >= FOOTER_SIZE => {
                    match parse(TOC_DIGEST_ANNOTATION) {
                        Some(pin) => (pin, (size - FOOTER_SIZE, FOOTER_SIZE)),
                        None => continue,
                    }
                }
                // Within the bounds its open checks before reading it.
                Some(Compression::Zstd) => match zstd_chunked::toc_location(&annotations) {
                    Ok(Some(at))
                        if at.offset.checked_add(at.length).is_some_and(|e| e <= size)
                            && at.length <= self.settings.max_toc_bytes
                            && at.uncompressed <= self.settings.max_toc_bytes =>
                    {
                        (at.checksum, (at.offset, at.length))
                    }
                    _ => continue,
                },
                _ => continue,
            };
            if self.indexes.has(&blob, Some(&pin)) {
                continue;
            }
            let key = (blob.clone(), Some(range));
            self.early.start(key, async move {
                client
                    .read_range((&reference, &blob), range.0, range.1)
                    .await
            });
            started += 1;
        }
    }

    /// Drops the requests started early that no open took.
    pub fn clear_early(&self) {
        self.early.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use oci_spec::image::Digest;
    use serde_json::json;
    use tokio::sync::Notify;

    use crate::cache::{Cache, DiskChunks};
    use crate::fs::tests::{files, push, REPO};
    use crate::fs::{ImageView, Layers};
    use crate::image::{media, Platform};
    use crate::reference::Reference;
    use crate::registry::fake::FakeRegistry;
    use crate::registry::{At, Fetched, Registry, RegistryFuture};
    use crate::store::Store;

    /// Answers the config's fetch only once another blob request has started (or after 5 s,
    /// noting that it waited in vain): a pull that asks for nothing else before its config
    /// is caught.
    struct ConfigLast {
        inner: Arc<FakeRegistry>,
        config: Digest,
        other: Notify,
        in_vain: AtomicBool,
    }

    impl Registry for ConfigLast {
        fn resolve<'a>(&'a self, reference: &'a Reference) -> RegistryFuture<'a, Fetched> {
            self.inner.resolve(reference)
        }
        fn fetch_manifest<'a>(&'a self, at: At<'a>) -> RegistryFuture<'a, Fetched> {
            self.inner.fetch_manifest(at)
        }
        fn fetch_blob<'a>(&'a self, at: At<'a>, cap: Option<u64>) -> RegistryFuture<'a, Vec<u8>> {
            Box::pin(async move {
                if *at.1 == self.config {
                    let waited =
                        tokio::time::timeout(Duration::from_secs(5), self.other.notified());
                    if waited.await.is_err() {
                        self.in_vain.store(true, Ordering::SeqCst);
                    }
                } else {
                    self.other.notify_one();
                }
                self.inner.fetch_blob(at, cap).await
            })
        }
        fn read_range<'a>(
            &'a self,
            at: At<'a>,
            offset: u64,
            len: u64,
        ) -> RegistryFuture<'a, Vec<u8>> {
            self.other.notify_one();
            self.inner.read_range(at, offset, len)
        }
        fn referrers<'a>(
            &'a self,
            subject: At<'a>,
            kind: &'a str,
        ) -> RegistryFuture<'a, Option<Vec<u8>>> {
            self.inner.referrers(subject, kind)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mounts_pull_fetches_the_pinned_index_beside_the_config_and_its_open_takes_it() {
        let registry = Arc::new(FakeRegistry::new());
        let (blob, layer) = push(&registry, &files());
        // Build the layer's index once, and publish it pinned by a second manifest (`v2`),
        // as `stratafs index push --bind` does.
        let built = tempfile::tempdir().unwrap();
        let store = Store::open(built.path()).unwrap();
        let v1: Reference = format!("registry.test/{REPO}:v1").parse().unwrap();
        let record = crate::pull::pull(&*registry, &store, &v1, &Platform::host(), &|_| {})
            .await
            .unwrap();
        let cache = |root: &std::path::Path| {
            Arc::new(Cache::new(Arc::new(DiskChunks::open(root).unwrap()), 8))
        };
        let layers = Layers::new(built.path(), registry.clone(), cache(built.path()));
        let (index, windows) = layers.publishable(&record).await.unwrap().remove(0);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &serde_json::to_vec(&index).unwrap()).unwrap();
        let pin = registry.add_blob(REPO, &gz.finish().unwrap());
        if let Some(w) = windows {
            registry.add_blob(REPO, &w);
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": media::OCI_CONFIG, "digest": record.config.digest, "size": record.config.size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer, "size": blob.len(),
                        "annotations": {super::INDEX_ANNOTATION: pin.to_string()}}],
        }))
        .unwrap();
        registry.add_manifest(REPO, "v2", media::OCI_MANIFEST, &manifest);

        // A fresh store pulls v2 and opens it, as `stratafs mount` does.
        let fresh = tempfile::tempdir().unwrap();
        let client = Arc::new(ConfigLast {
            inner: registry.clone(),
            config: record.config.digest.clone(),
            other: Notify::new(),
            in_vain: AtomicBool::new(false),
        });
        let layers = Layers::new(fresh.path(), client.clone(), cache(fresh.path()));
        let v2: Reference = format!("registry.test/{REPO}:v2").parse().unwrap();
        let before = registry.requests();
        let record = crate::pull::pull_with(
            &*client,
            &Store::open(fresh.path()).unwrap(),
            &v2,
            &Platform::host(),
            &|_| {},
            &|manifest| layers.start_early(&v2, manifest),
        )
        .await
        .unwrap();
        assert!(
            !client.in_vain.load(Ordering::SeqCst),
            "the config was fetched before any request of the layer's open started"
        );
        let view = ImageView::open(&layers, &record).await.unwrap();
        assert_eq!(view.readers()[0].index().published.as_ref(), Some(&pin));
        // The config and the index once each: the open asked for no second copy.
        assert_eq!(registry.requests().blobs - before.blobs, 2);
        assert_eq!(registry.requests().ranges, before.ranges);
    }
}
