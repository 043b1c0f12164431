//! The service's rules, called directly (no gRPC, no containerd): error codes, mounts,
//! durability, and which layers become lazy.

use std::collections::BTreeMap;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tonic::Status;

use super::meta::Kind;
use super::resolve::{ResolveError, Resolver, CRI_IMAGE, CRI_LAYER, CRI_MANIFEST, LABEL_TARGET};
use super::service::Snapshotter;
use super::{Mounter, MounterError, SnapshotterError};
use crate::cache::ChunkStore;
use crate::digest::sha256;
use crate::image::{chain_ids, Descriptor, ImageRecord, LayerRecord, Platform};
use crate::registry::fake::FakeRegistry;
use crate::store::Store;

/// Records mounts instead of starting daemons.
#[derive(Default)]
struct FakeMounter {
    calls: Mutex<Vec<String>>,
    /// Signalled on each mount.
    mounted: tokio::sync::Notify,
}

impl Mounter for FakeMounter {
    fn mount(
        &self,
        image: &str,
        chain_id: &str,
        dir: &Path,
    ) -> std::result::Result<(), MounterError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("mount {image} {chain_id} {}", dir.display()));
        self.mounted.notify_one();
        Ok(())
    }
    fn unmount(&self, dir: &Path) -> std::result::Result<(), MounterError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unmount {}", dir.display()));
        Ok(())
    }
    /// Nothing is really mounted: every probe finds a plain directory.
    fn state(&self, _dir: &Path) -> crate::fuse::MountState {
        crate::fuse::MountState::None
    }
    fn detach(&self, _dir: &Path) {}
}

struct NoChunks;
impl ChunkStore for NoChunks {
    fn get(&self, _: &oci_spec::image::Digest) -> std::io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn put(&self, _: &oci_spec::image::Digest, _: &[u8]) -> std::io::Result<bool> {
        Ok(true)
    }
    fn contains(&self, _: &oci_spec::image::Digest) -> bool {
        false
    }
    fn remove(&self, _: &oci_spec::image::Digest) -> std::io::Result<()> {
        Ok(())
    }
}

fn snapshotter(dir: &Path) -> (Snapshotter, Arc<FakeMounter>) {
    snapshotter_over(dir, Arc::new(FakeRegistry::new()))
}

/// A snapshotter whose resolver pulls from `registry`.
fn snapshotter_over(dir: &Path, registry: Arc<FakeRegistry>) -> (Snapshotter, Arc<FakeMounter>) {
    let store = Store::open(dir).unwrap();
    let client = registry;
    let mounter = Arc::new(FakeMounter::default());
    let resolver = Resolver {
        store,
        client,
        index: Default::default(),
        platform: Platform::host(),
        // The stored images' plain zstd layers (100 bytes) just do not fit one pass.
        pass_budget: 100 * crate::fs::ZSTD_EXPANSION - 1,
        ahead: None,
    };
    let s = Snapshotter::open(resolver, mounter.clone(), Arc::new(NoChunks)).unwrap();
    (s, mounter)
}

/// The labels CRI gives a `Prepare` of `layer` of `image`, with the target ChainID if given.
fn cri_labels(image: &str, layer: &str, target: Option<&str>) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (CRI_IMAGE.to_string(), image.to_string()),
        (CRI_LAYER.to_string(), layer.to_string()),
    ]);
    if let Some(t) = target {
        labels.insert(LABEL_TARGET.to_string(), t.to_string());
    }
    labels
}

/// The ChainID of the first layer of `image`, which the resolver has pulled.
fn pulled_chain(s: &Snapshotter, image: &str) -> String {
    let record = s.resolver.store.images.get(image).unwrap().expect("pulled");
    record.layers[0].chain_id.to_string()
}

/// A snapshotter whose resolver pulls from `registry` and fetches pinned indexes ahead.
fn snapshotter_ahead(dir: &Path, registry: Arc<FakeRegistry>) -> (Snapshotter, Arc<FakeMounter>) {
    let (mut s, mounter) = snapshotter_over(dir, registry.clone());
    let chunks = crate::cache::DiskChunks::open(dir).unwrap();
    let cache = Arc::new(crate::cache::Cache::new(Arc::new(chunks), 8));
    s.resolver.ahead = Some(Arc::new(super::ahead::Ahead::new(
        dir.to_path_buf(),
        registry,
        cache,
        Default::default(),
    )));
    (s, mounter)
}

/// Stores an image (no registry involved) with one layer per media type; returns its
/// ChainIDs.
fn stored_image(store: &Store, name: &str, media_types: &[&str]) -> Vec<String> {
    let diff_ids: Vec<_> = (0..media_types.len())
        .map(|i| sha256(format!("diff {i}").as_bytes()))
        .collect();
    let chains = chain_ids(&diff_ids);
    let descriptor = |s: &str| Descriptor {
        media_type: s.into(),
        digest: sha256(s.as_bytes()),
        size: 1,
    };
    let layers = media_types
        .iter()
        .enumerate()
        .map(|(i, mt)| LayerRecord {
            digest: sha256(format!("blob {i}").as_bytes()),
            media_type: mt.to_string(),
            size: 100,
            annotations: BTreeMap::new(),
            diff_id: diff_ids[i].clone(),
            chain_id: chains[i].clone(),
            referrer_index: None,
        })
        .collect();
    store
        .images
        .put(&ImageRecord {
            name: name.into(),
            target: descriptor("target"),
            manifest: descriptor("manifest"),
            config: descriptor("config"),
            platform: Platform::host(),
            layers,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            labels: BTreeMap::new(),
        })
        .unwrap();
    chains.iter().map(|c| c.to_string()).collect()
}

fn code(e: SnapshotterError) -> tonic::Code {
    Status::from(e).code()
}

fn none() -> HashMap<String, String> {
    HashMap::new()
}

#[tokio::test]
async fn api_rules_match_containerds_snapshotters() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = snapshotter(dir.path());
    let m = s.create(Kind::Active, "a", "", none()).await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let again = s.create(Kind::Active, "a", "", none()).await.unwrap_err();
    assert_eq!(code(again), tonic::Code::AlreadyExists);
    // An active snapshot cannot be a parent; a missing one is not found.
    let e = s.create(Kind::Active, "b", "a", none()).await.unwrap_err();
    assert_eq!(code(e), tonic::Code::InvalidArgument);
    let e = s
        .create(Kind::Active, "b", "nope", none())
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::NotFound);
    // Commit: missing key, then for real, then a second time under a taken name.
    assert_eq!(
        code(s.commit("x", "missing", none()).unwrap_err()),
        tonic::Code::NotFound
    );
    std::fs::write(dir.path().join("snapshotter/snapshots/1/fs/f"), b"data").unwrap();
    s.commit("c", "a", none()).unwrap();
    assert_eq!(code(s.stat("a").unwrap_err()), tonic::Code::NotFound);
    let c = s.stat("c").unwrap();
    assert_eq!((c.kind, c.parent.as_str()), (Kind::Committed, ""));
    assert!(s.usage("c").await.unwrap().size >= 4);
    s.create(Kind::Active, "a2", "", none()).await.unwrap();
    assert_eq!(
        code(s.commit("c", "a2", none()).unwrap_err()),
        tonic::Code::AlreadyExists
    );
    // Commit of a committed snapshot.
    assert_eq!(
        code(s.commit("c2", "c", none()).unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    // Children: overlay mounts; the parent cannot be removed; Mounts of committed fails.
    let m = s.create(Kind::Active, "b", "c", none()).await.unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
    let v = s.create(Kind::View, "v", "c", none()).await.unwrap();
    assert_eq!(
        (v[0].r#type.as_str(), v[0].options[0].as_str()),
        ("bind", "ro")
    );
    assert_eq!(
        code(s.remove("c").await.unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(s.mounts("c").await.unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(s.mounts("b").await.unwrap(), m);
    // Labels: all, one key, removal of a key, and no other fields.
    let labels: HashMap<_, _> = [
        ("k1".to_string(), "1".to_string()),
        ("k2".into(), "2".into()),
    ]
    .into();
    s.update("b", labels, &[]).unwrap();
    let one: HashMap<_, _> = [("k1".to_string(), "one".to_string())].into();
    let b = s
        .update("b", one, &["labels.k1".into(), "labels.k2".into()])
        .unwrap();
    assert_eq!(
        b.labels,
        BTreeMap::from([("k1".to_string(), "one".to_string())])
    );
    let e = s.update("b", none(), &["parent".into()]).unwrap_err();
    assert_eq!(code(e), tonic::Code::InvalidArgument);
    assert_eq!(s.list(&["labels.k1==one".into()]).unwrap().len(), 1);
    assert_eq!(s.list(&["kind==committed".into()]).unwrap().len(), 1);
    assert_eq!(s.list(&[]).unwrap().len(), 4);
    // Removal, then Cleanup of a directory nothing owns.
    s.remove("b").await.unwrap();
    s.remove("v").await.unwrap();
    s.remove("c").await.unwrap();
    assert!(!dir.path().join("snapshotter/snapshots/1").exists());
    std::fs::create_dir_all(dir.path().join("snapshotter/snapshots/999/fs")).unwrap();
    s.cleanup().await.unwrap();
    assert!(!dir.path().join("snapshotter/snapshots/999").exists());
    assert!(
        dir.path().join("snapshotter/snapshots/2").exists(),
        "a2 kept"
    );
    // All of it survives a reopen.
    drop(s);
    let (s, _) = snapshotter(dir.path());
    assert_eq!(s.stat("a2").unwrap().kind, Kind::Active);
    assert_eq!(s.list(&[]).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_images_lazy_rootfs_is_mounted_as_soon_as_its_top_layer_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, mounter) = snapshotter(dir.path());
    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    let chains = stored_image(&s.resolver.store, "registry.test/app:v1", &[GZIP, GZIP]);
    let target = |c: &str| HashMap::from([(LABEL_TARGET.to_string(), c.to_string())]);
    let e = s
        .create(Kind::Active, "extract-1", "", target(&chains[0]))
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    assert!(
        mounter.calls.lock().unwrap().is_empty(),
        "a lower layer alone is not mounted"
    );
    let e = s
        .create(Kind::Active, "extract-2", &chains[0], target(&chains[1]))
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    // No container asked yet: the rootfs is mounted in the background.
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        mounter.mounted.notified(),
    )
    .await
    .expect("the top lazy layer is mounted without a request for its mounts");
    let top = dir.path().join(format!(
        "snapshotter/snapshots/{}/fs",
        s.stat(&chains[1]).unwrap().id
    ));
    assert_eq!(
        mounter.calls.lock().unwrap().as_slice(),
        [format!(
            "mount registry.test/app:v1 {} {}",
            chains[1],
            top.display()
        )]
    );
}

#[tokio::test]
async fn lazy_layers_from_labels_or_the_store_and_fallback_above_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let (s, mounter) = snapshotter(dir.path());
    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    let chains = stored_image(
        &s.resolver.store,
        "registry.test/app:v1",
        &[GZIP, GZIP, ZSTD, GZIP],
    );
    let target = |c: &str| HashMap::from([(LABEL_TARGET.to_string(), c.to_string())]);
    // Layer 1: found in the store by ChainID (plain `ctr pull` after `stratafs pull`).
    let e = s
        .create(Kind::Active, "extract-1", "", target(&chains[0]))
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    let l1 = s.stat(&chains[0]).unwrap();
    assert_eq!(l1.kind, Kind::Committed);
    assert_eq!(l1.labels.get(LABEL_TARGET), Some(&chains[0]));
    assert!(
        s.stat("extract-1").is_err(),
        "the key itself is not created"
    );
    // containerd finds it with this filter.
    let filter = format!(r#"labels."{LABEL_TARGET}"=={},parent=="""#, chains[0]);
    assert_eq!(s.list(&[filter]).unwrap().len(), 1);
    // Layer 2 by CRI labels naming the image and layer (a wrong digest is refused).
    let mut labels = target(&chains[1]);
    labels.insert(CRI_IMAGE.into(), "registry.test/app:v1".into());
    labels.insert(CRI_LAYER.into(), sha256(b"blob 0").to_string());
    s.create(Kind::Active, "extract-2", &chains[0], labels.clone())
        .await
        .unwrap();
    assert!(s.stat(&chains[1]).is_err(), "wrong layer digest: not lazy");
    let lower1 = dir.path().join("snapshotter/snapshots/1/fs");
    assert_eq!(
        std::mem::take(&mut *mounter.calls.lock().unwrap()),
        [format!(
            "mount registry.test/app:v1 {} {}",
            chains[0],
            lower1.display()
        )],
        "the ordinary snapshot stands on the lazy layer 1, mounted for it"
    );
    s.remove("extract-2").await.unwrap();
    labels.insert(CRI_LAYER.into(), sha256(b"blob 1").to_string());
    let e = s
        .create(Kind::Active, "extract-2", &chains[0], labels)
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    assert!(s.stat(&chains[1]).unwrap().lazy.is_some());
    assert!(
        mounter.calls.lock().unwrap().is_empty(),
        "nothing mounted yet"
    );
    // Layer 3 is zstd: ordinary prepare on the lazy layer 2, which gets mounted.
    let m = s
        .create(Kind::Active, "extract-3", &chains[1], target(&chains[2]))
        .await
        .unwrap();
    let lower = dir.path().join(format!(
        "snapshotter/snapshots/{}/fs",
        s.stat(&chains[1]).unwrap().id
    ));
    assert!(m[0]
        .options
        .iter()
        .any(|o| o == &format!("lowerdir={}", lower.display())));
    assert_eq!(
        mounter.calls.lock().unwrap().as_slice(),
        [format!(
            "mount registry.test/app:v1 {} {}",
            chains[1],
            lower.display()
        )]
    );
    s.commit(&chains[2], "extract-3", target(&chains[2]))
        .unwrap();
    // Layer 4 is gzip but stands on an applied layer: ordinary too.
    let m = s
        .create(Kind::Active, "extract-4", &chains[2], target(&chains[3]))
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    let lowers = m[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(
        lowers.matches(':').count(),
        1,
        "{lowers}: layer 3 then the lazy chain"
    );
    // Removing a lazy layer unmounts it (the fake's directory is not really mounted).
    s.remove("extract-4").await.unwrap();
    s.remove(&chains[2]).await.unwrap();
    s.remove(&chains[1]).await.unwrap();
    assert!(!lower.parent().unwrap().exists());
}

/// A plain zstd layer is lazy (streamed whole by its mount, served from the cache) when ten
/// times its compressed size fits one streaming pass of the cache; otherwise containerd
/// applies it, and the reason names the layer and the setting.
#[tokio::test]
async fn plain_zstd_is_lazy_when_it_fits_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = snapshotter(dir.path());
    const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    let chains = stored_image(&s.resolver.store, "registry.test/z:v1", &[ZSTD]);
    let no_labels = HashMap::new();
    let e = s
        .resolver
        .resolve(&chains[0], &no_labels)
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::TooLarge { size: 100, .. }), "{e}");
    assert!(e.to_string().contains("[cache] max_size"), "{e}");
    s.resolver.pass_budget = 100 * crate::fs::ZSTD_EXPANSION;
    let (lazy, top) = s.resolver.resolve(&chains[0], &no_labels).await.unwrap();
    assert_eq!((lazy.chain_id.as_str(), top), (chains[0].as_str(), true));
}

/// CRI's labels name an image not in the store: the resolver pulls its metadata (no layer
/// data) through the registry seam and finds the layer; labels naming another layer than the
/// one at the ChainID are refused.
#[tokio::test]
async fn the_resolver_pulls_labelled_images_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (_, layer) = crate::fs::tests::push(&registry, &crate::fs::tests::files());
    let (s, _) = snapshotter_over(dir.path(), registry.clone());
    let image = format!("registry.test/{}:v1", crate::fs::tests::REPO);
    let labels = |digest: &str| cri_labels(&image, digest, None);
    // The ChainID of a one-layer image is its diff_id: known only after the pull, so the
    // first call names a ChainID the image lacks.
    let e = s
        .resolver
        .resolve("sha256:0", &labels(layer.as_ref()))
        .await;
    assert!(matches!(e, Err(ResolveError::NoChain { .. })), "{e:?}");
    let chain = pulled_chain(&s, &image);
    let (lazy, top) = s
        .resolver
        .resolve(&chain, &labels(layer.as_ref()))
        .await
        .unwrap();
    assert_eq!(
        (lazy.image.as_str(), lazy.digest.as_str(), top),
        (image.as_str(), layer.as_ref(), true)
    );
    let r = registry.requests();
    assert_eq!(
        (r.blobs, r.ranges),
        (1, 0),
        "the config only, no layer data: {r:?}"
    );
    let other = sha256(b"another layer").to_string();
    let e = s.resolver.resolve(&chain, &labels(&other)).await;
    assert!(matches!(e, Err(ResolveError::WrongLayer { .. })), "{e:?}");
}

/// CRI names the manifest it resolved the tag to: the pull is pinned to it, so a tag moved in
/// between (a new image pushed under it) still gives the layers containerd unpacks, and a
/// stored record of what the tag names now is not taken for it.
#[tokio::test]
async fn a_cri_prepare_pulls_the_manifest_containerd_resolved_not_what_the_tag_names_now() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (_, layer) = crate::fs::tests::push(&registry, &crate::fs::tests::files());
    // A store that pulled the image by its tag before the tag moved.
    let earlier = tempfile::tempdir().unwrap();
    let resolved = crate::fs::tests::pull(&registry, earlier.path()).await;
    let chain = resolved.layers[0].chain_id.to_string();
    // The tag moves on to another image.
    let (_, moved) = crate::fs::tests::push(&registry, &[("other", b"moved on".to_vec())]);
    assert_ne!(moved, layer);
    let (s, _) = snapshotter_over(dir.path(), registry.clone());
    let image = format!("registry.test/{}:v1", crate::fs::tests::REPO);
    // Without the manifest's label: what the tag names now lacks the layer.
    let unpinned = cri_labels(&image, layer.as_ref(), None);
    let e = s.resolver.resolve(&chain, &unpinned).await;
    assert!(matches!(e, Err(ResolveError::NoChain { .. })), "{e:?}");
    assert!(s.resolver.store.images.get(&image).unwrap().is_some());
    // With it: that manifest, stored under the tag pinned to it.
    let mut pinned = unpinned.clone();
    pinned.insert(CRI_MANIFEST.into(), resolved.manifest.digest.to_string());
    let (lazy, top) = s.resolver.resolve(&chain, &pinned).await.unwrap();
    let name = format!("{image}@{}", resolved.manifest.digest);
    assert_eq!(
        (lazy.image.as_str(), lazy.digest.as_str(), top),
        (name.as_str(), layer.as_ref(), true)
    );
    let record = s.resolver.store.images.get(&name).unwrap().unwrap();
    assert_eq!(record.manifest.digest, resolved.manifest.digest);
    // Found in the store the next time: no second pull.
    let before = registry.requests();
    s.resolver.resolve(&chain, &pinned).await.unwrap();
    assert_eq!(registry.requests().manifests, before.manifests);
    // A record stored under the tag that is the labelled manifest's is taken as it is.
    let (s2, _) = snapshotter_over(earlier.path(), registry.clone());
    let before = registry.requests();
    let (lazy, _) = s2.resolver.resolve(&chain, &pinned).await.unwrap();
    assert_eq!(lazy.image, image);
    assert_eq!(registry.requests().manifests, before.manifests);
    // A label that is no digest is ignored.
    let mut bad = unpinned;
    bad.insert(CRI_MANIFEST.into(), "not a digest".into());
    let e = s.resolver.resolve(&chain, &bad).await;
    assert!(matches!(e, Err(ResolveError::NoChain { .. })), "{e:?}");
}

/// The index an image pins is fetched as soon as the first `Prepare` has pulled the image's
/// manifest, while containerd goes on, and the image's mount waits for it instead of asking
/// the registry again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_index_is_fetched_ahead_and_the_rootfs_mount_waits_for_it() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (record, pin) = crate::fs::tests::push_pinned_index(&registry).await;
    let (s, mounter) = snapshotter_ahead(dir.path(), registry.clone());
    let layer = &record.layers[0];
    let image = format!("registry.test/{}:v2", crate::fs::tests::REPO);
    let labels = cri_labels(&image, layer.digest.as_ref(), Some(layer.chain_id.as_ref()));
    let before = registry.requests();
    let held = registry.hold_blob(&pin);
    let prepared = s.create(Kind::Active, "extract-1", "", labels);
    let e = tokio::time::timeout(Duration::from_secs(20), prepared)
        .await
        .expect("the Prepare answers without waiting for the index")
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    // The only layer is the rootfs: its mount is due, but the index is still on its way.
    let early = tokio::time::timeout(Duration::from_millis(300), mounter.mounted.notified());
    assert!(
        early.await.is_err(),
        "the rootfs was mounted before the index fetched ahead was stored"
    );
    drop(held);
    tokio::time::timeout(Duration::from_secs(20), mounter.mounted.notified())
        .await
        .expect("the rootfs is mounted once the index is stored");
    let indexes = crate::layer::IndexStore::new(dir.path());
    assert!(indexes.has(&layer.digest, Some(&pin)), "index stored");
    let r = registry.requests();
    assert_eq!(
        (r.blobs - before.blobs, r.ranges - before.ranges),
        (2, 0),
        "the config and the index, once each: {r:?}"
    );
}

/// A layer whose image pins no index is left to its mount: fetching ahead never streams it
/// nor stores anything for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_without_a_pinned_index_is_not_fetched_ahead() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (_, blob) = crate::fs::tests::push(&registry, &crate::fs::tests::files());
    let (s, mounter) = snapshotter_ahead(dir.path(), registry.clone());
    let image = format!("registry.test/{}:v1", crate::fs::tests::REPO);
    let labels = |chain: &str| cri_labels(&image, blob.as_ref(), Some(chain));
    // The one layer's ChainID is known once pulled: the first Prepare pulls.
    let _ = s
        .create(Kind::Active, "probe", "", labels("sha256:0"))
        .await;
    let chain = pulled_chain(&s, &image);
    let e = s
        .create(Kind::Active, "extract-1", "", labels(&chain))
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    tokio::time::timeout(Duration::from_secs(20), mounter.mounted.notified())
        .await
        .expect("the rootfs is mounted");
    let r = registry.requests();
    assert_eq!(
        (r.blobs, r.ranges),
        (1, 0),
        "the config only, no layer data: {r:?}"
    );
    let indexes = crate::layer::IndexStore::new(dir.path());
    assert!(!indexes.has(&blob, None), "nothing stored for the layer");
}
