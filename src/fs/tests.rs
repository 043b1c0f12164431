//! The pipeline from pull to reads over the in-process fake registry: what is fetched, and
//! that corrupt bytes from the registry are never served.

use std::io::Write;
use std::sync::Arc;

use flate2::write::GzEncoder;
use serde_json::json;

use super::*;
use crate::cache::{Cache, DiskChunks};

mod imports;
mod python;
use crate::image::{media, Platform};
use crate::reference::Reference;
use crate::registry::fake::FakeRegistry;
use crate::store::Store;

pub(crate) const REPO: &str = "test/app";

/// `len` incompressible bytes (xorshift from `seed`).
pub(super) fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// An image of one layer of `files` pushed to `registry` and opened lazily: the first open
/// streams the layer and stores its index; without the chunks, a second view of the same
/// store reads by range.
pub(crate) async fn lazy_view(
    registry: &Arc<FakeRegistry>,
    dir: &std::path::Path,
    files: &[(String, Vec<u8>)],
) -> ImageView {
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    push(registry, &files);
    drop(open(registry.clone(), dir).await.unwrap());
    std::fs::remove_dir_all(crate::store::Layout::new(dir).chunks()).unwrap();
    open(registry.clone(), dir).await.unwrap()
}

/// Whether all of the file at `path` in `view` is cached.
fn cached(view: &ImageView, path: &str) -> bool {
    let n = view.tree.node(view.lookup(path).unwrap());
    let (layer, offset) = n.data.unwrap();
    view.readers()[layer].is_cached(offset, n.size)
}

/// A gzip'd tar layer of `files` (path, contents); returns (blob, diff_id). Contents
/// `-> TARGET` make a symbolic link; ELF files are executable.
fn layer(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, oci_spec::image::Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        if let Some(target) = data.strip_prefix(b"-> ") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_link_name(std::str::from_utf8(target).unwrap())
                .unwrap();
            h.set_size(0);
            h.set_mode(0o777);
            h.set_cksum();
            tar.append_data(&mut h, path, &[][..]).unwrap();
            continue;
        }
        h.set_size(data.len() as u64);
        h.set_mode(if data.starts_with(b"\x7fELF") {
            0o755
        } else {
            0o644
        });
        h.set_cksum();
        tar.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = crate::digest::sha256(&tar);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Pushes an image of one layer of `files` to `registry` as `REPO:v1`; returns the layer blob.
pub(crate) fn push(
    registry: &FakeRegistry,
    files: &[(&str, Vec<u8>)],
) -> (Vec<u8>, oci_spec::image::Digest) {
    let (blob, diff_id) = layer(files);
    let host = Platform::host();
    let config = serde_json::to_vec(&json!({
        "architecture": host.architecture, "os": host.os,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_digest = registry.add_blob(REPO, &config);
    let layer_digest = registry.add_blob(REPO, &blob);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": blob.len()}],
    }))
    .unwrap();
    registry.add_manifest(REPO, "v1", media::OCI_MANIFEST, &manifest);
    (blob, layer_digest)
}

/// [`push`]es `REPO:v1` of [`files`], builds its layer's index in a scratch store and
/// publishes it pinned by a second manifest, `REPO:v2`, as `stratafs index push --bind` does.
/// Returns v1's record (from the scratch store) and the pinned index blob's digest.
pub(crate) async fn push_pinned_index(
    registry: &Arc<FakeRegistry>,
) -> (ImageRecord, oci_spec::image::Digest) {
    let (blob, layer) = push(registry, &files());
    let built = tempfile::tempdir().unwrap();
    let record = pull(registry, built.path()).await;
    let cache = Arc::new(Cache::new(
        Arc::new(DiskChunks::open(built.path()).unwrap()),
        8,
    ));
    let layers = Layers::new(built.path(), registry.clone(), cache);
    let (index, windows) = layers.publishable(&record).await.unwrap().remove(0);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&serde_json::to_vec(&index).unwrap()).unwrap();
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
                    "annotations": {INDEX_ANNOTATION: pin.to_string()}}],
    }))
    .unwrap();
    registry.add_manifest(REPO, "v2", media::OCI_MANIFEST, &manifest);
    (record, pin)
}

pub(crate) fn files() -> Vec<(&'static str, Vec<u8>)> {
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    vec![
        ("etc/hello", b"hello, world\n".to_vec()),
        ("usr/lib/big.so", big),
    ]
}

/// Pulls `REPO:v1` from `registry` into a store at `root`.
pub(crate) async fn pull(registry: &FakeRegistry, root: &std::path::Path) -> ImageRecord {
    let store = Store::open(root).unwrap();
    let reference: Reference = format!("registry.test/{REPO}:v1").parse().unwrap();
    crate::pull::pull(registry, &store, &reference, &Platform::host(), &|_| {})
        .await
        .unwrap()
}

/// Pulls `REPO:v1` and opens it, its layers read from `registry`.
pub(crate) async fn open(
    registry: Arc<FakeRegistry>,
    root: &std::path::Path,
) -> Result<ImageView, FsError> {
    let record = pull(&registry, root).await;
    let chunks = Arc::new(DiskChunks::open(root).unwrap());
    let layers = Layers::new(root, registry, Arc::new(Cache::new(chunks, 8)));
    ImageView::open(&layers, &record).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_fetches_no_layer_data_and_reads_come_from_the_verified_stream() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (blob, _) = push(&registry, &files());
    let store = Store::open(dir.path()).unwrap();
    let reference: Reference = format!("registry.test/{REPO}:v1").parse().unwrap();
    crate::pull::pull(
        registry.as_ref(),
        &store,
        &reference,
        &Platform::host(),
        &|_| {},
    )
    .await
    .unwrap();
    let pulled = registry.requests();
    assert_eq!(
        (pulled.manifests, pulled.blobs, pulled.ranges),
        (1, 1, 0),
        "{pulled:?}"
    );

    // No index is pinned: the layer is streamed once (by ranges), verified, and cached.
    let view = Arc::new(open(registry.clone(), dir.path()).await.unwrap());
    let opened = registry.requests();
    assert_eq!(
        opened.range_bytes,
        blob.len() as u64,
        "the whole blob, once: {opened:?}"
    );
    for (path, data) in files() {
        let id = view.lookup(path).unwrap();
        assert_eq!(
            view.read(id, 0, data.len() as u64).await.unwrap(),
            data,
            "{path}"
        );
    }
    assert_eq!(
        registry.requests().ranges,
        opened.ranges,
        "reads were served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_corrupted_in_the_registry_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (blob, digest) = push(&registry, &files());
    registry.corrupt(REPO, &digest, blob.len() / 2);
    let err = match open(registry.clone(), dir.path()).await {
        Ok(_) => panic!("a corrupted layer was opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&digest.to_string()) || err.contains("digest"),
        "{err}"
    );
    // Nothing of it is kept as verified: no index stored for the layer.
    let indexes = crate::layer::IndexStore::new(dir.path());
    assert!(
        indexes.get_any(&digest).unwrap().is_none(),
        "no index stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_range_reads_are_errors_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    push(&registry, &files());
    registry.fail_ranges(u64::MAX);
    assert!(open(registry.clone(), dir.path()).await.is_err());
    registry.fail_ranges(0);
    let view = Arc::new(open(registry, dir.path()).await.unwrap());
    let id = view.lookup("etc/hello").unwrap();
    assert_eq!(view.read(id, 0, 64).await.unwrap(), b"hello, world\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_fetches_the_small_files_of_its_directory_ahead_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    // Incompressible files, so each directory spans several 256 KiB spans.
    let mut tree: Vec<(String, Vec<u8>)> = Vec::new();
    tree.push(("other/before".into(), noise(1, 3 << 20)));
    for k in 0..24u32 {
        tree.push((format!("pkg/m{k:02}.pyc"), noise(100 + k, 40 << 10)));
    }
    tree.push((
        "pkg/_ext.cpython-311-x86_64-linux-gnu.so".into(),
        noise(8, 40 << 10),
    ));
    tree.push(("pkg/huge.so".into(), noise(7, 3 << 20)));
    tree.push(("other/after".into(), noise(2, 3 << 20)));
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let cached = |path: &str| cached(&view, path);
    assert!(!cached("pkg/m05.pyc"));
    let before = registry.requests();

    view.prefetch_file(view.lookup("pkg/m05.pyc").unwrap(), 8 << 20)
        .await;
    for k in 0..24 {
        assert!(cached(&format!("pkg/m{k:02}.pyc")), "pkg/m{k:02}.pyc");
    }
    // Not the large file of the directory, nor a small shared object (loaded only where
    // something names it), nor other directories' files.
    assert!(!cached("pkg/huge.so"));
    assert!(!cached("pkg/_ext.cpython-311-x86_64-linux-gnu.so"));
    assert!(!cached("other/before"), "other/before");
    assert!(!cached("other/after"), "other/after");
    let after = registry.requests();
    assert!(
        after.ranges - before.ranges <= 4,
        "the directory's files in a few requests: {before:?} -> {after:?}"
    );

    // Once per directory: another open there fetches no more siblings.
    view.prefetch_file(view.lookup("pkg/m20.pyc").unwrap(), 8 << 20)
        .await;
    assert_eq!(registry.requests().ranges, after.ranges);
}

/// An open starts no task once there is nothing for it to do: an open of its file went all
/// the way through and the file is still cached, and for a module, its process's command line
/// was read; with a replayed profile, never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_is_idle_once_an_open_of_its_file_went_through_and_its_process_was_followed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let module = "usr/lib/python3.11/__pycache__/m.cpython-311.pyc";
    // Apart in the layer (fillers elsewhere), so that only a directory fetch brings
    // `usr/share/small` along with `usr/share/data`.
    let files = vec![
        ("usr/share/small".to_string(), noise(4, 10 << 10)),
        ("filler/a".to_string(), noise(5, 1 << 20)),
        (module.to_string(), noise(1, 20 << 10)),
        ("filler/b".to_string(), noise(6, 1 << 20)),
        ("usr/share/data".to_string(), noise(2, 300 << 10)),
        ("filler/c".to_string(), noise(7, 1 << 20)),
        ("usr/share/read".to_string(), noise(3, 300 << 10)),
    ];
    let view = Arc::new(lazy_view(&registry, dir.path(), &files).await);
    view.follow_imports(true);
    let limit = 8 << 20;
    let node = |path: &str| view.lookup(path).unwrap();
    let (m, data, read) = (node(module), node("usr/share/data"), node("usr/share/read"));

    assert!(!view.open_is_idle(data, 0, limit), "nothing fetched yet");
    // An open whose directory fetch had no turn is not done: the next open takes it.
    let turns = view
        .sibling_fetches
        .try_acquire_many(super::SIBLING_FETCHES as u32)
        .unwrap();
    view.prefetch_file(data, limit).await;
    assert!(cached(&view, "usr/share/data"));
    assert!(!cached(&view, "usr/share/small"));
    assert!(
        !view.open_is_idle(data, 0, limit),
        "its directory is still to fetch"
    );
    drop(turns);
    view.prefetch_file(data, limit).await;
    assert!(cached(&view, "usr/share/small"));
    assert!(view.open_is_idle(data, 0, limit));
    // Cached by a read, never opened through: an open still has its part to play.
    view.read(read, 0, 300 << 10).await.unwrap();
    assert!(cached(&view, "usr/share/read"));
    assert!(!view.open_is_idle(read, 0, limit));

    // A module: idle for a process once that process's command line was read.
    view.prefetch_file(m, limit).await;
    assert!(view.open_is_idle(m, 0, limit));
    let pid = std::process::id();
    assert!(!view.open_is_idle(m, pid, limit));
    view.follow_command(m, pid, limit).await;
    assert!(view.open_is_idle(m, pid, limit));

    view.set_profiled();
    assert!(view.open_is_idle(read, pid + 1, limit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_of_bytecode_whose_imports_are_followed_fetches_no_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let mut tree: Vec<(String, Vec<u8>)> = Vec::new();
    for k in 0..8u32 {
        let name = format!("pkg/__pycache__/m{k}.cpython-311.pyc");
        tree.push((name, noise(100 + k, 200 << 10)));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let cached = |path: &str| cached(&view, path);
    let open = |k: u32| {
        view.lookup(&format!("pkg/__pycache__/m{k}.cpython-311.pyc"))
            .unwrap()
    };
    // Imports followed: the module names what it needs (here nothing: not real bytecode).
    // m0 lies well before m3 in the layer (neither its fetch nor its neighbours reach it).
    view.follow_imports(true);
    view.prefetch_file(open(3), 8 << 20).await;
    assert!(cached("pkg/__pycache__/m3.cpython-311.pyc"));
    assert!(!cached("pkg/__pycache__/m0.cpython-311.pyc"));
    // Not followed: the directory's files are the guess.
    view.follow_imports(false);
    view.prefetch_file(open(4), 8 << 20).await;
    assert!(cached("pkg/__pycache__/m0.cpython-311.pyc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_of_a_program_fetches_its_loader_and_libraries_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let elf = |interp, needed: &[&str], runpath, seed| {
        [
            super::elf::tests::elf(interp, needed, runpath),
            noise(seed, 200 << 10),
        ]
        .concat()
    };
    let link = |target: &str| format!("-> {target}").into_bytes();
    // Each file between incompressible fillers, so that no fetch of one reaches the next.
    let mut tree: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |path: &str, data: Vec<u8>| {
        let k = tree.len() as u32;
        tree.push((format!("filler/{k:02}"), noise(1000 + k, 3 << 20)));
        tree.push((path.to_string(), data));
    };
    add(
        "usr/bin/prog",
        elf(
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libfoo.so.1", "libbar.so.3"],
            Some("$ORIGIN/../lib/prog"),
            1,
        ),
    );
    add("lib64", link("usr/lib64"));
    add(
        "usr/lib64/ld-linux-x86-64.so.2",
        link("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
    );
    add(
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        elf(None, &[], None, 2),
    );
    add("etc/ld.so.cache", noise(3, 20 << 10));
    // Found through the program's RUNPATH ($ORIGIN), a symbolic link to the file.
    add("usr/lib/prog/libfoo.so.1", link("libfoo.so.1.2"));
    // Then libfoo itself; the others in the system's directories, libbaz only through libfoo.
    let libs: [(&str, &[&str]); 4] = [
        ("usr/lib/prog/libfoo.so.1.2", &["libbaz.so.2"]),
        ("usr/lib/x86_64-linux-gnu/libbar.so.3", &[]),
        ("usr/lib/x86_64-linux-gnu/libbaz.so.2", &["libmissing.so.9"]),
        ("usr/lib/x86_64-linux-gnu/libunused.so.1", &[]),
    ];
    for (seed, (path, needed)) in (4..).zip(libs) {
        add(path, elf(None, needed, None, seed));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let cached = |path: &str| cached(&view, path);
    assert!(!cached("usr/lib/prog/libfoo.so.1.2"));

    view.prefetch_file(view.lookup("usr/bin/prog").unwrap(), 8 << 20)
        .await;
    for path in [
        "usr/bin/prog",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "etc/ld.so.cache",
        "usr/lib/prog/libfoo.so.1.2",
        "usr/lib/x86_64-linux-gnu/libbar.so.3",
        "usr/lib/x86_64-linux-gnu/libbaz.so.2",
    ] {
        assert!(cached(path), "{path}");
    }
    assert!(!cached("usr/lib/x86_64-linux-gnu/libunused.so.1"));
    // Once per mount: another open of a library followed fetches nothing more.
    let before = registry.requests();
    view.prefetch_file(view.lookup("usr/lib/prog/libfoo.so.1.2").unwrap(), 8 << 20)
        .await;
    assert_eq!(registry.requests().ranges, before.ranges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_fetches_what_the_config_runs_first_and_the_user_databases() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let tree = start_fixture();
    let view = Arc::new(lazy_view(&registry, dir.path(), &tree).await);
    let cached = |path: &str| cached(&view, path);
    let hints = |program: &str| StartHints {
        program: Some(program.to_string()),
        path: vec!["/nowhere".into(), "/usr/bin".into()],
        working_dir: "/srv".into(),
        args: vec![program.to_string()],
        locale: None,
    };

    // A bare name found on the PATH: the program and what the loader opens for it.
    view.fetch_program(&hints("prog"), 8 << 20).await;
    for path in ["usr/bin/prog", "lib/ld.so", "usr/lib/libfoo.so.1"] {
        assert!(cached(path), "{path}");
    }
    for path in [
        "usr/bin/python3",
        "usr/bin/env",
        "usr/bin/other",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(!cached(path), "{path}");
    }
    // A script relative to the working directory: it, `env`, and the interpreter `env` runs.
    view.fetch_program(&hints("./run"), 8 << 20).await;
    for path in ["srv/run", "usr/bin/env", "usr/bin/python3"] {
        assert!(cached(path), "{path}");
    }
    assert!(!cached("usr/bin/other"));
    // No program once a startup profile replays: it knows better.
    view.set_profiled();
    let before = registry.requests();
    view.fetch_program(&hints("other"), 8 << 20).await;
    assert_eq!(registry.requests().ranges, before.ranges);
    assert!(!cached("usr/bin/other"));
    // But the user and group databases, which a profile recorded without a runtime lacks.
    view.fetch_user_databases().await;
    for path in ["etc/passwd", "etc/group"] {
        assert!(cached(path), "{path}");
    }
    assert!(!cached("usr/bin/other"));
}

/// Answers no range read until two have been asked for (or 5 s have passed, noting that it
/// waited in vain): fetches made one after another are caught.
struct TwoAtOnce {
    inner: Arc<FakeRegistry>,
    asked: tokio::sync::watch::Sender<usize>,
    in_vain: std::sync::atomic::AtomicBool,
}

impl crate::registry::Registry for TwoAtOnce {
    fn resolve<'a>(
        &'a self,
        reference: &'a Reference,
    ) -> crate::registry::RegistryFuture<'a, crate::registry::Fetched> {
        self.inner.resolve(reference)
    }
    fn fetch_manifest<'a>(
        &'a self,
        at: crate::registry::At<'a>,
    ) -> crate::registry::RegistryFuture<'a, crate::registry::Fetched> {
        self.inner.fetch_manifest(at)
    }
    fn fetch_blob<'a>(
        &'a self,
        at: crate::registry::At<'a>,
        cap: Option<u64>,
    ) -> crate::registry::RegistryFuture<'a, Vec<u8>> {
        self.inner.fetch_blob(at, cap)
    }
    fn read_range<'a>(
        &'a self,
        at: crate::registry::At<'a>,
        offset: u64,
        len: u64,
    ) -> crate::registry::RegistryFuture<'a, Vec<u8>> {
        Box::pin(async move {
            self.asked.send_modify(|n| *n += 1);
            let mut asked = self.asked.subscribe();
            let two = asked.wait_for(|n| *n >= 2);
            if tokio::time::timeout(std::time::Duration::from_secs(5), two)
                .await
                .is_err()
            {
                self.in_vain
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.read_range(at, offset, len).await
        })
    }
    fn referrers<'a>(
        &'a self,
        subject: crate::registry::At<'a>,
        kind: &'a str,
    ) -> crate::registry::RegistryFuture<'a, Option<Vec<u8>>> {
        self.inner.referrers(subject, kind)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_databases_are_fetched_both_at_once() {
    // `ctr run` reads /etc/group before the container exists: its fetch must not wait for
    // /etc/passwd's.
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    drop(lazy_view(&registry, dir.path(), &start_fixture()).await);
    let client = Arc::new(TwoAtOnce {
        inner: registry.clone(),
        asked: tokio::sync::watch::channel(0).0,
        in_vain: Default::default(),
    });
    let record = pull(&registry, dir.path()).await;
    let chunks = Arc::new(DiskChunks::open(dir.path()).unwrap());
    let layers = Layers::new(dir.path(), client.clone(), Arc::new(Cache::new(chunks, 8)));
    let view = ImageView::open(&layers, &record).await.unwrap();
    view.fetch_user_databases().await;
    for path in ["etc/passwd", "etc/group"] {
        assert!(cached(&view, path), "{path}");
    }
    assert_eq!(*client.asked.borrow(), 2);
    assert!(
        !client.in_vain.load(std::sync::atomic::Ordering::SeqCst),
        "one database's fetch waited for the other's"
    );
}

/// A program, its loader and library, others on the `PATH`, a script run through `env`,
/// and the user and group databases, each between incompressible fillers.
fn start_fixture() -> Vec<(String, Vec<u8>)> {
    // Larger than the small files an open fetches beside it from its directory.
    let elf = |needed: &[&str], seed| {
        [
            super::elf::tests::elf(Some("/lib/ld.so"), needed, None),
            noise(seed, 300 << 10),
        ]
        .concat()
    };
    // Each file between incompressible fillers, so that no fetch of one reaches the next.
    let mut tree: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |path: &str, data: Vec<u8>| {
        let k = tree.len() as u32;
        tree.push((format!("filler/{k:02}"), noise(1000 + k, 3 << 20)));
        tree.push((path.to_string(), data));
    };
    add("etc/group", b"root:x:0:\n".to_vec());
    add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec());
    add("lib/ld.so", elf(&[], 1));
    add("usr/bin/prog", elf(&["libfoo.so.1"], 2));
    add("usr/lib/libfoo.so.1", elf(&[], 3));
    add("usr/bin/python3", elf(&[], 4));
    add("usr/bin/env", elf(&[], 5));
    add(
        "srv/run",
        b"#!/usr/bin/env -S python3 -u\nprint(1)\n".to_vec(),
    );
    add("usr/bin/other", elf(&[], 6));
    tree
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_a_program_waits_for_the_first_to_follow_its_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let view = lazy_view(&registry, dir.path(), &start_fixture()).await;
    let cached = |path: &str| cached(&view, path);
    let prog = view.lookup("usr/bin/prog").unwrap();
    // The first follow claims the program at its first poll and waits for the registry; the
    // second, polled after it, returns only once the loader and library are in — after the
    // registry answers (the third).
    let held = registry.hold_ranges();
    let second = async {
        tokio::task::yield_now().await;
        view.fetch_needed(prog, 8 << 20).await;
        cached("lib/ld.so") && cached("usr/lib/libfoo.so.1")
    };
    let third = async {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        drop(held);
    };
    let (_, followed, ()) = tokio::join!(view.fetch_needed(prog, 8 << 20), second, third);
    assert!(
        followed,
        "the second open went on before the libraries were in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_command_line_has_the_modules_it_names_fetched_at_its_first_bytecode_open() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let site = "usr/local/lib/python3.11/dist-packages";
    let files = [
        "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc".to_string(),
        format!("{site}/pkg/__pycache__/__init__.cpython-311.pyc"),
        format!("{site}/pkg/__pycache__/mod.cpython-311.pyc"),
        format!("{site}/other/__pycache__/__init__.cpython-311.pyc"),
    ];
    let mut tree: Vec<(String, Vec<u8>)> = vec![
        (format!("{site}/pkg/__init__.py"), Vec::new()),
        (format!("{site}/other/__init__.py"), Vec::new()),
    ];
    for (k, path) in files.iter().enumerate() {
        tree.push((path.clone(), noise(10 + k as u32, 20 << 10)));
        tree.push((format!("filler/{k}"), noise(100 + k as u32, 1 << 20)));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    view.follow_imports(true);
    let cached = |path: &str| cached(&view, path);
    let opened = view.lookup(&files[0]).unwrap();

    // A process whose command line reads `python3 -c 'import pkg.mod; …'` (a shell, named so,
    // waiting for its standard input to close).
    let mut child = std::process::Command::new("sh")
        .arg0("python3")
        .args(["-c", "import pkg.mod; read line"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `spawn` returns once the child's exec has begun; its command line shows once the kernel
    // has set up the new program's arguments (a python that opens bytecode is long past it).
    let cmdline = format!("/proc/{}/cmdline", child.id());
    while std::fs::read(&cmdline).unwrap().is_empty() {
        std::thread::yield_now();
    }
    // Not a python command line (this test's): nothing.
    view.follow_command(opened, std::process::id(), 8 << 20)
        .await;
    assert!(!cached(&files[1]));

    view.follow_command(opened, child.id(), 8 << 20).await;
    assert!(cached(&files[1]), "pkg's __init__");
    assert!(cached(&files[2]), "pkg.mod");
    assert!(!cached(&files[3]), "a package the command does not name");
    // Once per process.
    let before = registry.requests();
    std::fs::remove_dir_all(crate::store::Layout::new(dir.path()).chunks()).unwrap();
    view.follow_command(opened, child.id(), 8 << 20).await;
    assert_eq!(registry.requests().ranges, before.ranges);
    drop(child.stdin.take());
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_opened_for_passthrough_is_recorded_whole_unless_the_replayed_profile_knows_it() {
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(usize, u64, u64)>>);
    impl ReadObserver for Seen {
        fn read(&self, layer: usize, _: &LayerIndex, offset: u64, len: u64) {
            self.0.lock().unwrap().push((layer, offset, len));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    const SIZE: u64 = 300 << 10; // several 64 KiB spans
    let tree: Vec<(String, Vec<u8>)> = ["lib/a.so", "lib/b.so", "lib/c.so", "lib/d.so"]
        .iter()
        .enumerate()
        .map(|(k, p)| (p.to_string(), noise(k as u32, SIZE as usize)))
        .collect();
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let seen = Arc::new(Seen::default());
    view.record_reads(seen.clone());
    let file = |p: &str| {
        let id = view.lookup(p).unwrap();
        let (layer, offset) = view.tree.node(id).data.unwrap();
        (id, layer, offset)
    };
    let (a, layer, a_at) = file("lib/a.so");
    let ((b, _, b_at), (c, _, c_at), (d, _, d_at)) =
        (file("lib/b.so"), file("lib/c.so"), file("lib/d.so"));
    // No profile replayed: all of it.
    view.note_read_whole(a);
    // The profile being replayed read a page in the middle of `a`; of `b` and `c` only bytes
    // of the spans they share with their neighbours (`b`'s first, `c`'s last: read for the
    // neighbours' sake, as far as anyone knows); nothing of `d`.
    let mut coverage = vec![std::collections::BTreeMap::new(); view.readers().len()];
    coverage[layer].insert(a_at + SIZE / 2, a_at + SIZE / 2 + 4096);
    coverage[layer].insert(b_at - 100, b_at + 10);
    coverage[layer].insert(c_at + SIZE - 10, d_at - 100);
    view.set_profile_coverage(coverage);
    for id in [a, b, c, d] {
        view.note_read_whole(id);
    }
    let whole = |at| (layer, at, SIZE);
    assert_eq!(
        *seen.0.lock().unwrap(),
        [whole(a_at), whole(b_at), whole(c_at), whole(d_at)]
    );
}
