//! Lazy reads from a real registry: every file of every format read back exactly, small reads
//! fetch little, and faults (corruption, truncation, registry down, damaged cache files) give
//! errors — never wrong bytes.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use stratafs::cache::{Cache, DiskChunks};
use stratafs::fs::{ImageView, Layers};
use stratafs::registry::RegistryClient;
use stratafs::store::Store;

const LONG: &str = "names/a-name-that-is-much-longer-than-the-hundred-bytes-of-a-classic-tar-header-name-field-so-it-needs-pax-or-gnu.txt";
const UNICODE: &str = "names/ünïcødé-名前.txt";

/// Three layers (gzip, zstd, plain tar) exercising spans, whiteouts, opaque dirs and links.
/// Returns the image and the expected content of every regular file in the merged view.
fn tricky_image(flavour: ManifestFlavour) -> (Image, BTreeMap<String, Vec<u8>>) {
    let big = bytes(1, 3_500_000);
    let l0 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=base\n", 0o644)
        .file("etc/gone", b"whited out later", 0o644)
        .dir("usr/bin", 0o755)
        .file("usr/bin/big", &big, 0o755)
        .hardlink("usr/bin/big2", "usr/bin/big")
        .symlink("bin", "usr/bin")
        .dir("names", 0o755)
        .file("names/empty", b"", 0o644)
        .file(UNICODE, "grüße\n".as_bytes(), 0o644)
        .file(LONG, b"long name\n", 0o644)
        .dir("data", 0o755)
        .file("data/lower", b"hidden by the opaque dir above", 0o644)
        .build(Compression::Gzip);
    let l1 = LayerBuilder::new()
        .file("etc/os-release", b"ID=middle\n", 0o644)
        .whiteout("etc/gone")
        .file("usr/bin/zstd-file", &bytes(2, 1_500_000), 0o644)
        .build(Compression::Zstd);
    let l2 = LayerBuilder::new()
        .opaque("data")
        .dir("data", 0o755)
        .file("data/only-upper", &bytes(3, 100_000), 0o600)
        .file("plain.bin", &bytes(4, 2_500_000), 0o644)
        .build(Compression::None);
    let image = ImageBuilder::new()
        .layer(l0)
        .layer(l1)
        .layer(l2)
        .build(flavour);
    let mut expected = BTreeMap::new();
    expected.insert("etc/os-release".to_string(), b"ID=middle\n".to_vec());
    expected.insert("usr/bin/big".to_string(), big.clone());
    expected.insert("usr/bin/big2".to_string(), big);
    expected.insert("usr/bin/zstd-file".to_string(), bytes(2, 1_500_000));
    expected.insert("names/empty".to_string(), Vec::new());
    expected.insert(UNICODE.to_string(), "grüße\n".as_bytes().to_vec());
    expected.insert(LONG.to_string(), b"long name\n".to_vec());
    expected.insert("data/only-upper".to_string(), bytes(3, 100_000));
    expected.insert("plain.bin".to_string(), bytes(4, 2_500_000));
    (image, expected)
}

#[test]
fn every_file_reads_back_exactly_in_each_format() {
    for flavour in [ManifestFlavour::Oci, ManifestFlavour::Docker] {
        let reg = Registry::start(RegistryOpts::default());
        let (image, expected) = tricky_image(flavour);
        reg.push_image("lazy/tricky", "v1", &image, &Auth::None);
        let cli = Stratafs::new();
        let reference = format!("{}/lazy/tricky:v1", reg.addr());

        for (path, content) in &expected {
            assert!(cli.cat(&reference, path) == *content, "{path} differs");
        }
        // Overlay semantics as seen by ls.
        assert_eq!(
            cli.ls(&reference, "/etc"),
            ["os-release"],
            "whiteout hides etc/gone"
        );
        assert_eq!(
            cli.ls(&reference, "/data"),
            ["only-upper"],
            "opaque dir hides data/lower"
        );
        assert_eq!(
            cli.ls(&reference, "/"),
            ["bin", "data", "etc", "names", "plain.bin", "usr"]
        );
        let long = cli.ok(&["ls", "-l", &reference, "/"]);
        assert!(long.contains("bin -> usr/bin"), "{long}");
        let long = cli.ok(&["ls", "-l", &reference, "/usr/bin"]);
        let big_line = long.lines().find(|l| l.ends_with(" big")).unwrap();
        assert!(
            big_line.starts_with("-rwxr-xr-x   2 "),
            "hardlinked: {big_line}"
        );
        assert!(big_line.contains(" 3500000 "), "{big_line}");
        let data = cli.ok(&["ls", "-l", &reference, "/data"]);
        assert!(data.starts_with("-rw-------"), "{data}");

        let err = cli.fail(&["cat", &reference, "/etc/gone"]);
        assert!(
            err.contains("no such file") && err.contains("/etc/gone"),
            "{err}"
        );
        let err = cli.fail(&["cat", &reference, "/etc"]);
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn random_offsets_match_through_the_library() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, expected) = tricky_image(ManifestFlavour::Oci);
    reg.push_image("lazy/random", "v1", &image, &Auth::None);
    let cli = Stratafs::new();
    let reference = format!("{}/lazy/random:v1", reg.addr());
    cli.ok(&["pull", &reference]);
    // The index is built by streaming; then the cache is emptied so reads go to the registry.
    cli.ok(&["index", "build", &reference]);
    cli.ok(&["cache", "prune", "--max-size", "0"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(cli.root()).unwrap();
        let record = store.images.get(&reference).unwrap().unwrap();
        let client = Arc::new(RegistryClient::new(
            Default::default(),
            BTreeMap::new(),
            true,
        ));
        let chunks = Arc::new(DiskChunks::open(&cli.root()).unwrap());
        let layers = Layers::new(&cli.root(), client, Arc::new(Cache::new(chunks, 4)));
        let view = Arc::new(ImageView::open(&layers, &record).await.unwrap());
        let mut x = 12345u64;
        for (path, content) in &expected {
            let id = view.lookup(path).unwrap();
            for _ in 0..25 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                let off = if content.is_empty() {
                    0
                } else {
                    (x >> 20) % content.len() as u64
                };
                let len = (x >> 40) % 300_000 + 1;
                let got = view.read(id, off, len).await.unwrap();
                let end = (off + len).min(content.len() as u64) as usize;
                assert!(got == content[off as usize..end], "{path} at {off}+{len}");
            }
            assert!(view
                .read(id, content.len() as u64 + 10, 5)
                .await
                .unwrap()
                .is_empty());
        }
    });
}

/// A layer of many files, about 8 MiB compressed.
fn large_layer() -> (Image, Vec<(String, Vec<u8>)>) {
    let mut b = LayerBuilder::new().dir("files", 0o755);
    let mut files = Vec::new();
    for i in 0..400 {
        let content = bytes(100 + i, 20_000 + (i as usize * 37) % 20_000);
        let path = format!("files/f{i:03}");
        b = b.file(&path, &content, 0o644);
        files.push((path, content));
    }
    let image = ImageBuilder::new()
        .layer(b.build(Compression::Gzip))
        .build(ManifestFlavour::Oci);
    (image, files)
}

fn served(reg: &Registry, mark: usize) -> (usize, u64) {
    let log: Vec<_> = reg
        .access_log_since(mark)
        .into_iter()
        .filter(|e| e.path.contains("/blobs/") && e.user_agent.starts_with("stratafs/"))
        .collect();
    (log.len(), log.iter().map(|e| e.bytes).sum())
}

#[test]
fn a_small_read_from_a_large_layer_fetches_one_range() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    let blob_size = image.layers[0].size();
    reg.push_image("lazy/large", "v1", &image, &Auth::None);
    let cli = Stratafs::new();
    let reference = format!("{}/lazy/large:v1", reg.addr());

    let mark = reg.log_mark();
    let built: serde_json::Value =
        serde_json::from_str(&cli.ok(&["index", "build", "--json", &reference])).unwrap();
    let (_, streamed) = served(&reg, mark);
    assert_eq!(
        streamed,
        blob_size + image.config_size(),
        "one pass over the blob"
    );
    let spans = built[0]["spans"].as_u64().unwrap();
    assert!(spans >= 8, "{built}");

    cli.ok(&["cache", "prune", "--max-size", "0"]);
    let (path, content) = &files[200];
    let mark = reg.log_mark();
    assert!(cli.cat(&reference, path) == *content);
    let (requests, bytes) = served(&reg, mark);
    assert_eq!(requests, 1, "one range request");
    let stats: serde_json::Value =
        serde_json::from_str(&cli.ok(&["cache", "stats", "--json"])).unwrap();
    assert_eq!(
        stats["layers"][0]["fetched_bytes"].as_u64().unwrap(),
        blob_size + bytes,
        "stats count the streaming pass and the range read: {stats}"
    );
    // The span holding the file, and the spans after it up to 384 KiB compressed (a miss
    // brings its neighbours: see MIN_MISS_FETCH in src/layer/reader.rs).
    let per_span = blob_size / spans;
    assert!(
        bytes <= (384 << 10) + 2 * per_span,
        "{bytes} bytes for a {}-byte file (span ≈ {per_span})",
        content.len()
    );
    assert!(bytes * 5 < blob_size, "{bytes} of {blob_size}");

    // Read again: served from the cache, nothing fetched.
    let mark = reg.log_mark();
    assert!(cli.cat(&reference, path) == *content);
    assert_eq!(served(&reg, mark), (0, 0));
}

/// Path of a blob's data file in the registry's storage.
fn blob_file(reg: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    reg.data_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

#[test]
fn corrupt_or_truncated_blobs_are_never_served() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    reg.push_image("lazy/corrupt", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/corrupt:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &reference]);
    cli.ok(&["cache", "prune", "--max-size", "0"]);

    // Flip a byte in the middle of the blob, in the registry's own storage.
    let path = blob_file(&reg, &image.layers[0].digest);
    let original = std::fs::read(&path).unwrap();
    let mut bad = original.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    std::fs::write(&path, &bad).unwrap();

    let mut failed = 0;
    for (p, content) in &files {
        let out = cli.run(&["cat", &reference, p]);
        if out.status.success() {
            assert!(out.stdout == *content, "{p}: wrong bytes served");
        } else {
            failed += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("failed verification"), "{err}");
            assert!(
                out.stdout.is_empty(),
                "{p}: bytes served before verification"
            );
        }
    }
    assert!(
        failed > 0 && failed < files.len() / 4,
        "{failed} files hit the damaged span"
    );

    // A fresh store cannot index the damaged blob: the streaming pass checks the digest.
    let fresh = Stratafs::new();
    let err = fresh.fail(&["index", "build", &reference]);
    assert!(
        err.contains("blob digest mismatch") || err.contains("invalid deflate"),
        "{err}"
    );
    assert!(
        !fresh.root().join("layers").exists()
            || std::fs::read_dir(fresh.root().join("layers"))
                .unwrap()
                .count()
                == 0
    );

    // Truncated: the registry serves fewer bytes than the descriptor says.
    std::fs::write(&path, &original[..original.len() - 1000]).unwrap();
    let err = Stratafs::new().fail(&["index", "build", &reference]);
    assert!(
        err.contains(&image.layers[0].digest) && err.contains("short read"),
        "{err}"
    );
    std::fs::write(&path, &original).unwrap();
    assert!(
        cli.cat(&reference, &files[0].0) == files[0].1,
        "intact again"
    );
}

#[test]
fn registry_down_gives_an_error_then_reads_work_when_it_is_back() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    reg.push_image("lazy/down", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/down:v1", reg.addr());
    let mut cli = Stratafs::new();
    cli.set_config("[registry]\nretry_max_elapsed_secs = 2\nconnect_timeout_secs = 1\n");
    cli.ok(&["index", "build", &reference]);
    cli.ok(&["cache", "prune", "--max-size", "0"]);

    reg.stop();
    let started = std::time::Instant::now();
    let err = cli.fail(&["cat", &reference, &files[10].0]);
    assert!(err.contains(&reg.addr()), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "bounded"
    );
    reg.restart();
    assert!(cli.cat(&reference, &files[10].0) == files[10].1);
}

#[test]
fn damaged_cache_files_and_crash_leftovers_are_not_trusted() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    reg.push_image("lazy/crash", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/crash:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &reference]);

    // Damage every cached chunk (as a crash or a disk fault might) and leave a temp file.
    let chunks = cli.root().join("cache/chunks");
    for entry in std::fs::read_dir(&chunks).unwrap() {
        let p = entry.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        std::fs::write(&p, &data[..data.len() / 2]).unwrap();
    }
    std::fs::write(cli.root().join("tmp/.tmpCRASH"), b"half a chunk").unwrap();

    let mark = reg.log_mark();
    for (p, content) in files.iter().step_by(50) {
        assert!(cli.cat(&reference, p) == *content, "{p}");
    }
    let (requests, _) = served(&reg, mark);
    assert!(requests > 0, "damaged chunks were fetched again");
}

/// Bytes stratafs read of one blob since `mark`, and how many requests.
fn served_blob(reg: &Registry, mark: usize, digest: &str) -> (usize, u64) {
    let log: Vec<_> = reg
        .access_log_since(mark)
        .into_iter()
        .filter(|e| {
            e.path.ends_with(digest) && e.method == "GET" && e.user_agent.starts_with("stratafs/")
        })
        .collect();
    (log.len(), log.iter().map(|e| e.bytes).sum())
}

#[test]
fn bound_indexes_make_the_first_read_lazy() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    let layer = image.layers[0].digest.clone();
    reg.push_image("lazy/published", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/published:v1", reg.addr());

    // One machine builds the index (one streaming pass) and publishes it bound to the image:
    // the tag now names a manifest whose layer descriptor pins the index by digest.
    let publisher = Stratafs::new();
    let out = publisher.ok(&["index", "push", "--bind", &reference]);
    assert!(out.contains("with the indexes of 1 layers pinned"), "{out}");
    let bound = reg.get_manifest("lazy/published", "v1", &Auth::None);
    let manifest: serde_json::Value = serde_json::from_slice(&bound.body).unwrap();
    let pin = manifest["layers"][0]["annotations"]["io.stratafs.index.digest"]
        .as_str()
        .expect("the layer pins its index")
        .to_string();
    assert_ne!(sha256_digest(&bound.body), image.manifest_digest);
    assert!(reg.has_blob(&pin), "the index blob is in the repository");
    // Pushing again gives the same manifest (no timestamps): nothing changes.
    let again = publisher.ok(&["index", "push", "--bind", &reference]);
    assert_eq!(
        again.split_whitespace().nth(3),
        out.split_whitespace().nth(3),
        "{out}\n{again}"
    );

    // Another machine pulls: the manifest names the index, and neither layer data nor the
    // index is fetched by pull. The first read fetches the index, then one range.
    let user = Stratafs::new();
    let mark = reg.log_mark();
    let out = user.ok(&["pull", &reference]);
    assert!(
        out.contains("stratafs indexes pinned by the manifest for 1 of 1 layers"),
        "{out}"
    );
    assert_eq!(
        served_blob(&reg, mark, &layer),
        (0, 0),
        "pull reads no layer data"
    );
    assert_eq!(served_blob(&reg, mark, &pin).0, 0, "nor the index");
    let (path, content) = &files[123];
    assert!(user.cat(&reference, path) == *content);
    let (requests, bytes) = served_blob(&reg, mark, &layer);
    assert_eq!(requests, 1, "one range request");
    assert!(
        bytes * 4 < image.layers[0].size(),
        "{bytes} of {}",
        image.layers[0].size()
    );
    assert_eq!(served_blob(&reg, mark, &pin).0, 1, "the index, once");

    // With published indexes turned off, the layer is streamed whole instead.
    let mut strict = Stratafs::new();
    strict.set_config("[index]\npublished = false\n");
    let mark = reg.log_mark();
    assert!(strict.cat(&reference, path) == *content);
    assert_eq!(served_blob(&reg, mark, &layer).1, image.layers[0].size());
}

#[test]
fn unbound_referrer_indexes_are_used_only_by_opt_in() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    let layer = image.layers[0].digest.clone();
    reg.push_image("lazy/referrer", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/referrer:v1", reg.addr());
    let publisher = Stratafs::new();
    let out = publisher.ok(&["index", "push", &reference]);
    assert!(out.contains("pushed indexes of 1 layers"), "{out}");
    let hex = image.manifest_digest.strip_prefix("sha256:").unwrap();
    let tag = reg.get_manifest("lazy/referrer", &format!("sha256-{hex}"), &Auth::None);
    assert_eq!(tag.status, 200, "referrers tag index exists");
    assert!(
        tag.text().contains("application/vnd.stratafs.index.v1"),
        "{}",
        tag.text()
    );
    // Pushing again replaces nothing and duplicates nothing.
    publisher.ok(&["index", "push", &reference]);
    let tag = reg.get_manifest("lazy/referrer", &format!("sha256-{hex}"), &Auth::None);
    assert_eq!(
        tag.text()
            .matches("application/vnd.stratafs.index.v1")
            .count(),
        1,
        "{}",
        tag.text()
    );
    let (path, content) = &files[123];

    // By default nothing the image does not pin is used: the layer is streamed.
    let user = Stratafs::new();
    let mark = reg.log_mark();
    let out = user.ok(&["pull", &reference]);
    assert!(!out.contains("adopted"), "{out}");
    assert!(user.cat(&reference, path) == *content);
    assert_eq!(served_blob(&reg, mark, &layer).1, image.layers[0].size());

    // A user who opts in adopts it, with a warning, and reads by range.
    let mut optin = Stratafs::new();
    optin.set_config("[index]\nunbound_referrers = true\n");
    let mark = reg.log_mark();
    let pulled = optin.run(&["pull", &reference]);
    let (out, err) = (
        String::from_utf8_lossy(&pulled.stdout),
        String::from_utf8_lossy(&pulled.stderr),
    );
    assert!(
        out.contains("unbound referrer indexes adopted for 1 of 1 layers"),
        "{out}"
    );
    assert!(err.contains("does not pin"), "warned: {err}");
    assert!(optin.cat(&reference, path) == *content);
    let (requests, bytes) = served_blob(&reg, mark, &layer);
    assert_eq!(requests, 1, "one range request");
    assert!(bytes * 4 < image.layers[0].size());
}

#[test]
fn the_cache_cap_holds_while_reading_and_evicted_chunks_come_back() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    reg.push_image("lazy/capped", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/capped:v1", reg.addr());
    let mut cli = Stratafs::new();
    cli.set_config("[cache]\nmax_size = \"3M\"\nmemory_chunks = 1\n");
    let cap = 3u64 << 20;

    cli.ok(&["index", "build", &reference]);
    for (p, content) in files.iter().step_by(7) {
        assert!(cli.cat(&reference, p) == *content, "{p}");
    }
    // Pruning runs in the background: wait for it to settle under the cap.
    let stats = || -> serde_json::Value {
        serde_json::from_str(&cli.ok(&["cache", "stats", "--json"])).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats()["bytes"].as_u64().unwrap() > cap && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let s = stats();
    assert!(s["bytes"].as_u64().unwrap() <= cap, "{s}");
    let layer = &s["layers"][0];
    assert_eq!(layer["indexed"], true);
    assert_eq!(layer["complete"], false, "{s}");
    assert!(layer["cached_spans"].as_u64().unwrap() < layer["spans"].as_u64().unwrap());
    // Everything still reads correctly.
    let mark = reg.log_mark();
    for (p, content) in files.iter().step_by(3) {
        assert!(cli.cat(&reference, p) == *content, "{p}");
    }
    assert!(
        served(&reg, mark).0 > 0,
        "evicted chunks were fetched again"
    );
}

#[test]
fn a_complete_layer_is_served_from_disk_with_the_registry_down() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, expected) = tricky_image(ManifestFlavour::Oci);
    reg.push_image("lazy/offline", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/offline:v1", reg.addr());
    let mut cli = Stratafs::new();
    cli.set_config("[registry]\nretry_max_elapsed_secs = 1\nconnect_timeout_secs = 1\n");
    cli.ok(&["index", "build", &reference]);
    let stats: serde_json::Value =
        serde_json::from_str(&cli.ok(&["cache", "stats", "--json"])).unwrap();
    assert!(
        stats["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["complete"] == true),
        "{stats}"
    );

    reg.stop();
    for (path, content) in &expected {
        assert!(cli.cat(&reference, path) == *content, "{path} offline");
    }
    assert_eq!(cli.ls(&reference, "/etc"), ["os-release"]);
}

#[test]
fn index_verify_catches_a_hostile_published_index() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, files) = large_layer();
    reg.push_image("lazy/hostile", "v1", &image, &Auth::None);
    let reference = format!("{}/lazy/hostile:v1", reg.addr());

    // An honest publisher (unbound referrer): verify passes on a fresh store that opted in.
    let publisher = Stratafs::new();
    publisher.ok(&["index", "push", &reference]);
    let mut honest = Stratafs::new();
    honest.set_config("[index]\nunbound_referrers = true\n");
    let out = honest.ok(&["index", "verify", &reference]);
    assert!(
        out.contains("index matches the layer") && out.contains("400 files"),
        "{out}"
    );

    // A hostile publisher maps files/f001 onto the bytes of files/f002.
    let layer_hex = image.layers[0].digest.strip_prefix("sha256:").unwrap();
    let path = publisher.root().join(format!("layers/{layer_hex}.json"));
    let mut index: stratafs::layer::LayerIndex =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let target = index
        .entries
        .iter()
        .find(|e| e.path == "files/f002")
        .unwrap()
        .offset;
    index
        .entries
        .iter_mut()
        .find(|e| e.path == "files/f001")
        .unwrap()
        .offset = target;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(publisher.root()).unwrap();
        let record = store.images.get(&reference).unwrap().unwrap();
        let client = RegistryClient::new(Default::default(), BTreeMap::new(), true);
        let windows = stratafs::layer::IndexStore::new(&publisher.root())
            .windows_bytes(&index)
            .unwrap();
        stratafs::publish::push_indexes(&client, &record, &[(index, windows)])
            .await
            .unwrap();
    });

    // A default store never uses it.
    let safe = Stratafs::new();
    assert!(safe.cat(&reference, "/files/f001") == files[1].1);

    // A victim who opted in reads the wrong bytes: every span checks out, the tree is a lie...
    let mut victim = Stratafs::new();
    victim.set_config("[index]\nunbound_referrers = true\n");
    let out = victim.run(&["cat", &reference, "/files/f001"]);
    assert!(
        out.stdout != files[1].1,
        "the hostile index is in use: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...until verify compares it with the layer, replaces it, and says so.
    let err = victim.fail(&["index", "verify", &reference]);
    assert!(
        err.contains("does not match the layer") && err.contains("files/f001"),
        "{err}"
    );
    assert!(err.contains(&image.layers[0].digest), "{err}");
    assert!(
        victim.cat(&reference, "/files/f001") == files[1].1,
        "served correctly after verify"
    );
    victim.ok(&["index", "verify", &reference]);
}

#[test]
fn rmi_collects_the_files_of_layers_no_image_has() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, _) = large_layer();
    reg.push_image("lazy/gc-a", "v1", &image, &Auth::None);
    reg.push_image("lazy/gc-b", "v1", &image, &Auth::None);
    let (a, b) = (
        format!("{}/lazy/gc-a:v1", reg.addr()),
        format!("{}/lazy/gc-b:v1", reg.addr()),
    );
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &a]);
    cli.ok(&["pull", &b]);
    let hex = image.layers[0].digest.strip_prefix("sha256:").unwrap();
    let files = || -> Vec<String> {
        ["layers", "cache/fetched"]
            .iter()
            .flat_map(|d| std::fs::read_dir(cli.root().join(d)).into_iter().flatten())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(hex))
            .collect()
    };
    let windows = || -> usize {
        std::fs::read_dir(cli.root().join("layers/windows"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(files().len(), 2, "index and fetched counter: {:?}", files());
    assert_eq!(windows(), 1, "the index's window file");
    cli.ok(&["rmi", &a]);
    assert_eq!(files().len(), 2, "still used by b: {:?}", files());
    assert_eq!(windows(), 1, "still named by b's index");
    cli.ok(&["rmi", &b]);
    assert!(files().is_empty(), "{:?}", files());
    assert_eq!(windows(), 0, "no index names the window file");
}

/// A mount's serving process that has not spoken to the registry (its image pulled and its
/// layers cached by another process) readies its way there ahead of reads: one token for the
/// repository and four connections kept alive, by HEAD requests of the manifest.
#[test]
fn a_mount_of_an_image_pulled_earlier_readies_its_token_and_connections() {
    let tokens = TokenServer::start(TokenServerOpts::default());
    let reg = Registry::start(RegistryOpts {
        token: Some(tokens.auth_config()),
        ..Default::default()
    });
    let (image, expected) = tricky_image(ManifestFlavour::Oci);
    let push = Auth::Bearer(tokens.push_pull_token("lazy/warm"));
    reg.push_image("lazy/warm", "v1", &image, &push);
    let reference = format!("{}/lazy/warm:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &reference]);

    let (before, mark) = (tokens.token_requests(), reg.log_mark());
    let guard = mount::MountGuard::new(Some(cli.root()));
    cli.ok(&["mount", &reference, guard.dir.to_str().unwrap()]);
    let heads = |log: &[AccessEntry]| {
        log.iter()
            .filter(|e| {
                e.method == "HEAD"
                    && e.status == 200
                    && e.path.ends_with(&image.manifest_digest)
                    && e.user_agent.starts_with("stratafs/")
            })
            .count()
    };
    let log = reg.wait_access_log(mark, std::time::Duration::from_secs(20), |l| heads(l) >= 4);
    assert_eq!(heads(&log), 4, "{log:#?}");
    assert_eq!(
        tokens.token_requests() - before,
        1,
        "one token for the four: {:?}",
        &tokens.requests()[before..]
    );
    for (path, content) in &expected {
        assert!(
            std::fs::read(guard.path(path)).unwrap() == *content,
            "{path}"
        );
    }
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}
