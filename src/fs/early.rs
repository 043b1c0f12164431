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
    use tokio::sync::Notify;

    use crate::cache::{Cache, DiskChunks};
    use crate::fs::tests::{push_pinned_index, REPO};
    use crate::fs::{ImageView, Layers};
    use crate::image::Platform;
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
        // An index of the layer, pinned by `v2`.
        let (record, pin) = push_pinned_index(&registry).await;
        let cache = |root: &std::path::Path| {
            Arc::new(Cache::new(Arc::new(DiskChunks::open(root).unwrap()), 8))
        };

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
