//! Hostile publishers and hostile layers, against the real registry: a forged index published
//! for a shared layer (in another repository, another registry, or as an unbound referrer)
//! never changes what another image serves; with the opt-in, the whole-layer check catches a
//! forged tree; header, TOC and compression bombs end with a clear error inside a memory bound
//! and within the cache cap.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use common::*;
use sha2::{Digest as _, Sha256};
use stratafs::layer::{Kind, LayerIndex};
use stratafs::registry::RegistryClient;
use stratafs::store::Store;

/// Peak memory a bomb may cost the process that meets it.
const MEMORY_BOUND: u64 = 256 << 20;

/// A layer of 200 text-like files of 10–30 KB (several 1 MiB spans) and a `bin/sh`.
fn victim_layer() -> (Layer, Vec<(String, Vec<u8>)>) {
    let mut b = LayerBuilder::new()
        .dir("files", 0o755)
        .dir("bin", 0o755)
        .file("bin/sh", b"#!/bin/true\n", 0o755);
    let mut files = Vec::new();
    for i in 0..200u64 {
        let len = 10_000 + (i as usize * 7_919) % 20_000;
        let content: Vec<u8> = format!("file {i}: ")
            .bytes()
            .chain(
                bytes(i + 100, len)
                    .iter()
                    .map(|b| b"abcdefgh "[(*b % 9) as usize]),
            )
            .collect();
        let path = format!("files/f{i:03}");
        b = b.file(&path, &content, 0o644);
        files.push((path, content));
    }
    (b.build(Compression::Gzip), files)
}

fn reference(reg: &Registry, repo: &str) -> String {
    format!("{}/{repo}:v1", reg.addr())
}

/// The index `cli` built for layer `hex` from the layer itself.
fn built_index(cli: &Stratafs, hex: &str) -> LayerIndex {
    let path = cli.root().join(format!("layers/{hex}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The index an attacker publishes: `files/f001` shows the bytes of `files/f002`, `bin/sh` is
/// setuid and a world-writable block device appears.
fn forge(mut index: LayerIndex) -> LayerIndex {
    let f002 = index
        .entries
        .iter()
        .find(|e| e.path == "files/f002")
        .unwrap()
        .clone();
    let f001 = index
        .entries
        .iter_mut()
        .find(|e| e.path == "files/f001")
        .unwrap();
    (f001.offset, f001.size) = (f002.offset, f002.size);
    index
        .entries
        .iter_mut()
        .find(|e| e.path == "bin/sh")
        .unwrap()
        .mode |= 0o4000;
    let mut dev = f002.clone();
    (dev.path, dev.kind, dev.mode, dev.size) = (
        "bin/disk".into(),
        Kind::Block { major: 8, minor: 0 },
        0o666,
        0,
    );
    index.entries.push(dev);
    index
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// `index` with the window file it names, as kept in `cli`'s store.
fn with_windows(cli: &Stratafs, index: LayerIndex) -> stratafs::publish::Publishable {
    let windows = stratafs::layer::IndexStore::new(&cli.root())
        .windows_bytes(&index)
        .unwrap();
    (index, windows)
}

/// Publishes `index` bound to the image `reference` as stored by `cli` (its manifest pushed
/// again, pinning the index).
fn bind(cli: &Stratafs, reference: &str, index: LayerIndex) {
    runtime().block_on(async {
        let store = Store::open(cli.root()).unwrap();
        let record = store.images.get(reference).unwrap().unwrap();
        let client = RegistryClient::new(Default::default(), BTreeMap::new(), true);
        let index = with_windows(cli, index);
        stratafs::publish::bind_indexes(&client, &store, &record, &[index], "v1")
            .await
            .unwrap();
    });
}

/// Publishes `index` as an unbound referrer of the image `reference` as stored by `cli`.
fn refer(cli: &Stratafs, reference: &str, index: LayerIndex) {
    runtime().block_on(async {
        let store = Store::open(cli.root()).unwrap();
        let record = store.images.get(reference).unwrap().unwrap();
        let client = RegistryClient::new(Default::default(), BTreeMap::new(), true);
        stratafs::publish::push_indexes(&client, &record, &[with_windows(cli, index)])
            .await
            .unwrap();
    });
}

/// A victim image and an attacker's image sharing its layer, in another repository of the
/// victim's registry and in a second registry; the attacker binds a forged index to its own
/// images and publishes it as a referrer of the victim's. Returns (victim reference, the
/// attacker's references, the victim's files).
type Files = Vec<(String, Vec<u8>)>;

fn poisoned(reg: &Registry, other: &Registry) -> (String, Vec<String>, Files) {
    let (layer, files) = victim_layer();
    let hex = layer.digest.strip_prefix("sha256:").unwrap().to_string();
    let victim = ImageBuilder::new()
        .layer(layer.clone())
        .build(ManifestFlavour::Oci);
    let evil = ImageBuilder::new()
        .env("EVIL=1")
        .layer(layer)
        .build(ManifestFlavour::Oci);
    reg.push_image("victim/app", "v1", &victim, &Auth::None);
    reg.push_image("evil/app", "v1", &evil, &Auth::None);
    other.push_image("evil/app", "v1", &evil, &Auth::None);
    let victim_ref = reference(reg, "victim/app");
    let evil_refs = vec![reference(reg, "evil/app"), reference(other, "evil/app")];

    let attacker = Stratafs::new();
    attacker.ok(&["index", "build", &evil_refs[0]]);
    let forged = forge(built_index(&attacker, &hex));
    for r in &evil_refs {
        attacker.ok(&["pull", r]);
        bind(&attacker, r, forged.clone());
    }
    attacker.ok(&["pull", &victim_ref]);
    refer(&attacker, &victim_ref, forged);
    (victim_ref, evil_refs, files)
}

fn assert_victim_intact(host: &Stratafs, victim: &str, files: &[(String, Vec<u8>)]) {
    for (path, content) in files {
        assert!(host.cat(victim, path) == *content, "{path} of the victim");
    }
    let bin = host.ok(&["ls", "-l", victim, "/bin"]);
    assert!(!bin.contains("disk"), "{bin}");
    assert!(bin.contains("-rwxr-xr-x") && !bin.contains("rws"), "{bin}");
}

#[test]
fn a_forged_index_for_a_shared_layer_never_changes_another_image() {
    let (reg, other) = (
        Registry::start(RegistryOpts::default()),
        Registry::start(RegistryOpts::default()),
    );
    let (victim, evil, files) = poisoned(&reg, &other);

    // The host pulls the attacker's images first: their manifests pin the forged index, so
    // their publisher decides what *they* show (the forged tree is in the store).
    let host = Stratafs::new();
    for r in &evil {
        let out = host.ok(&["pull", r]);
        assert!(out.contains("pinned by the manifest for 1 of 1"), "{out}");
        assert!(
            host.cat(r, "/files/f001") == files[2].1,
            "the attacker's own image"
        );
        assert!(host.ok(&["ls", r, "/bin"]).contains("disk"));
    }
    // The victim's image pins nothing: its tree and bytes are its own.
    let out = host.ok(&["pull", &victim]);
    assert!(!out.contains("pinned") && !out.contains("adopted"), "{out}");
    assert_victim_intact(&host, &victim, &files);

    // Same on a host that meets the victim first and the attacker's image after.
    let other_host = Stratafs::new();
    assert_victim_intact(&other_host, &victim, &files);
    other_host.ok(&["ls", &evil[1], "/"]);
    assert_victim_intact(&other_host, &victim, &files);
}

#[test]
fn with_unbound_referrers_the_whole_layer_check_catches_a_forged_tree() {
    let (reg, other) = (
        Registry::start(RegistryOpts::default()),
        Registry::start(RegistryOpts::default()),
    );
    let (victim, _, files) = poisoned(&reg, &other);
    let mut host = Stratafs::new();
    host.set_config("[index]\nunbound_referrers = true\n");
    let out = host.ok(&["pull", &victim]);
    assert!(
        out.contains("unbound referrer indexes adopted for 1 of 1"),
        "{out}"
    );
    // Until the layer is complete, the opted-in referrer decides (that is what opting in means).
    assert!(host.cat(&victim, "/files/f001") == files[2].1);

    // Reading the whole layer completes it: the tar stream is parsed and compared with the
    // index, and the layer stops being served, with the entry named.
    let mut args = vec!["cat".to_string(), victim.clone()];
    args.extend(files.iter().map(|(p, _)| format!("/{p}")));
    args.push("/bin/sh".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = host.fail(&args);
    assert!(err.contains("does not describe the layer"), "{err}");
    let stats: serde_json::Value =
        serde_json::from_str(&host.ok(&["cache", "stats", "--json"])).unwrap();
    assert_eq!(stats["layers"][0]["complete"], true, "{stats}");
    // A later command meets the complete layer on its first read and refuses it too.
    let err = host.fail(&["cat", &victim, "/files/f003"]);
    assert!(err.contains("does not describe the layer"), "{err}");
    let err = host.fail(&["index", "verify", &victim]);
    assert!(err.contains("does not match the layer"), "{err}");
    assert_victim_intact(&host, &victim, &files);
}

/// Pushes a one-layer image whose layer is `blob` (gzip) with `diff_id` and the layer
/// descriptor `annotations`; returns its reference.
fn push_layer(
    reg: &Registry,
    repo: &str,
    blob: Vec<u8>,
    diff_id: String,
    annotations: serde_json::Value,
) -> String {
    let layer = Layer {
        digest: sha256_digest(&blob),
        diff_id,
        blob,
        media_type: oci_media_type(Compression::Gzip).to_string(),
        compression: Compression::Gzip,
    };
    let mut image = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
    let mut manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    manifest["layers"][0]["annotations"] = annotations;
    image.manifest = serde_json::to_vec(&manifest).unwrap();
    image.manifest_digest = sha256_digest(&image.manifest);
    reg.push_image(repo, "v1", &image, &Auth::None);
    reference(reg, repo)
}

/// A gzip writer that also hashes what it is given (the diff_id).
struct Layering {
    gz: flate2::write::GzEncoder<Vec<u8>>,
    hash: Sha256,
}

impl Layering {
    fn new() -> Layering {
        Layering {
            gz: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
            hash: Sha256::new(),
        }
    }
    fn put(&mut self, data: &[u8]) {
        self.hash.update(data);
        self.gz.write_all(data).unwrap();
    }
    fn entry(&mut self, mut header: tar::Header, data: &[u8]) {
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.put(header.as_bytes());
        self.put(data);
        self.put(&vec![0; (512 - data.len() % 512) % 512]);
    }
    fn finish(mut self) -> (Vec<u8>, String) {
        self.put(&[0; 1024]);
        let diff_id = format!("sha256:{}", hex::encode(self.hash.finalize()));
        (self.gz.finish().unwrap(), diff_id)
    }
}

fn file_header(path: &str) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

#[test]
fn a_gnu_long_name_bomb_is_refused_inside_the_memory_bound() {
    let reg = Registry::start(RegistryOpts::default());
    // A 1 GiB "long name" (about 1 MB of gzip), then an ordinary file.
    let mut layer = Layering::new();
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(1 << 30);
    h.set_cksum();
    layer.put(h.as_bytes());
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..1024 {
        layer.put(&chunk);
    }
    layer.entry(file_header("after"), b"after the bomb\n");
    let (blob, diff_id) = layer.finish();
    assert!(blob.len() < 8 << 20, "{} bytes", blob.len());
    let bomb = push_layer(&reg, "bomb/longname", blob, diff_id, serde_json::json!({}));

    let host = Stratafs::new();
    let (out, peak) = host.run_peak(&["ls", &bomb, "/"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("GNU long name") && err.contains("1048576"),
        "{err}"
    );
    assert!(peak <= MEMORY_BOUND, "peak {peak} bytes");
    eprintln!("long-name bomb: peak {} MiB", peak >> 20);
    // Nothing of the refused layer is kept: no index, no chunks.
    assert_eq!(
        std::fs::read_dir(host.root().join("layers")).map_or(0, |d| d.count()),
        0
    );
    let stats: serde_json::Value =
        serde_json::from_str(&host.ok(&["cache", "stats", "--json"])).unwrap();
    assert_eq!(stats["bytes"], 0, "{stats}");
}

/// An eStargz-shaped blob whose TOC lists `count` copies of `entry` (no file data), written
/// as it is generated (the test process stays small: the peak measured is the child's alone).
/// Returns (blob, diff_id, TOC digest).
fn estargz_with_toc(count: usize, entry: &[u8]) -> (Vec<u8>, String, String) {
    let (prefix, suffix) = (br#"{"version":1,"entries":["#, b"]}");
    let len = prefix.len() + count * entry.len() + count.saturating_sub(1) + suffix.len();
    let mut h = file_header("stargz.index.json");
    h.set_size(len as u64);
    h.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let (mut tar_hash, mut toc_hash) = (Sha256::new(), Sha256::new());
    let mut put = |data: &[u8], toc: bool| {
        gz.write_all(data).unwrap();
        tar_hash.update(data);
        if toc {
            toc_hash.update(data);
        }
    };
    put(h.as_bytes(), false);
    put(prefix, true);
    let mut chunk = Vec::with_capacity(1 << 20);
    for i in 0..count {
        if i > 0 {
            chunk.push(b',');
        }
        chunk.extend_from_slice(entry);
        if chunk.len() >= 1 << 20 {
            put(&chunk, true);
            chunk.clear();
        }
    }
    put(&chunk, true);
    put(suffix, true);
    put(&vec![0; (512 - len % 512) % 512], false);
    let diff_id = format!("sha256:{}", hex::encode(tar_hash.finalize()));
    let toc_digest = format!("sha256:{}", hex::encode(toc_hash.finalize()));
    let mut blob = gz.finish().unwrap();
    // The footer: an empty gzip member whose extra field says where the TOC member starts.
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{:016x}STARGZ", 0).as_bytes());
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(footer.len(), 51);
    blob.extend_from_slice(&footer);
    (blob, diff_id, toc_digest)
}

#[test]
fn estargz_toc_bombs_are_refused_inside_the_memory_bound() {
    let reg = Registry::start(RegistryOpts::default());
    // 20 million empty entries (far over the TOC size limit), and two million `{}` (small
    // JSON, over the entry limit).
    for (name, count, entry, expect) in [
        (
            "bomb/toc-size",
            20_000_000,
            &br#"{"name":"d","type":"dir"}"#[..],
            "max_toc_bytes",
        ),
        ("bomb/toc-entries", 2_000_000, &b"{}"[..], "max_entries"),
    ] {
        let (blob, diff_id, toc_digest) = estargz_with_toc(count, entry);
        let annotations =
            serde_json::json!({ "containerd.io/snapshot/stargz/toc.digest": toc_digest });
        let size = blob.len();
        let bomb = push_layer(&reg, name, blob, diff_id, annotations);
        let host = Stratafs::new();
        let (out, peak) = host.run_peak(&["ls", &bomb, "/"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(err.contains(expect), "{name}: {err}");
        assert!(peak <= MEMORY_BOUND, "{name}: peak {peak} bytes");
        eprintln!("{name}: {size} byte blob, peak {} MiB", peak >> 20);
    }
}

/// A tar of one `size`-byte file of distinct 1 MiB blocks (a counter, then zeros, offset by
/// `seed`): megabytes of gzip, gigabytes of output.
fn compression_bomb(size: u64, seed: u64) -> (Vec<u8>, String) {
    let mut layer = Layering::new();
    let mut h = file_header("bomb");
    h.set_size(size);
    h.set_cksum();
    layer.put(h.as_bytes());
    let mut block = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        block[..8].copy_from_slice(&(i + seed).to_le_bytes());
        layer.put(&block);
    }
    layer.finish()
}

#[test]
fn a_compression_bomb_stays_within_the_cache_cap() {
    let reg = Registry::start(RegistryOpts::default());
    let cap = 64u64 << 20;
    let config = format!("[cache]\nmax_size = {cap}\n");
    // A genuine (if silly) layer: indexed and listed, but the pass keeps at most half the cap.
    let (blob, diff_id) = compression_bomb(1 << 30, 0);
    let blob_size = blob.len();
    let honest = push_layer(&reg, "bomb/big", blob, diff_id, serde_json::json!({}));
    let mut host = Stratafs::new();
    host.set_config(&config);
    // Streaming a layer takes seconds: a command says what it fetched when piped (no bar).
    let out = host.run(&["ls", &honest, "/"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bomb\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening") && err.contains("1 layers indexed") && err.contains("fetched in"),
        "{err}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&host.ok(&["cache", "stats", "--json"])).unwrap();
    let bytes = stats["bytes"].as_u64().unwrap();
    assert!(
        bytes > 0 && bytes <= cap / 2,
        "{bytes} bytes cached from {blob_size}: {stats}"
    );

    // The same with a diff_id that lies: refused, and nothing of it stays in the cache.
    let (blob, _) = compression_bomb(1 << 30, 1 << 20);
    let lie = push_layer(
        &reg,
        "bomb/lie",
        blob,
        sha256_digest(b"not this"),
        serde_json::json!({}),
    );
    let mut host = Stratafs::new();
    host.set_config(&config);
    let err = host.fail(&["ls", &lie, "/"]);
    assert!(err.contains("diff_id mismatch"), "{err}");
    let stats: serde_json::Value =
        serde_json::from_str(&host.ok(&["cache", "stats", "--json"])).unwrap();
    assert_eq!(stats["bytes"], 0, "{stats}");
}

#[test]
fn a_forged_checkpoint_window_is_caught() {
    let reg = Registry::start(RegistryOpts::default());
    let (layer, _) = victim_layer();
    let hex = layer.digest.strip_prefix("sha256:").unwrap().to_string();
    let blob = layer.blob.clone();
    let evil = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
    reg.push_image("evil/window", "v1", &evil, &Auth::None);
    let evil_ref = reference(&reg, "evil/window");
    let attacker = Stratafs::new();
    attacker.ok(&["index", "build", &evil_ref]);
    let mut index = built_index(&attacker, &hex);

    // Span k starts from a checkpoint with a window; forge the window (a new window file) and
    // give the span the digest of what the inflater then makes of it.
    let k = (1..index.spans.len())
        .find(|&k| match &index.spans[k].fetch {
            stratafs::layer::Fetch::Gzip { checkpoint, .. } => {
                index.checkpoints[*checkpoint as usize].window_len > 0
            }
            _ => false,
        })
        .expect("a span after a windowed checkpoint");
    let stratafs::layer::Fetch::Gzip {
        checkpoint,
        in_start,
        in_end,
        ..
    } = index.spans[k].fetch.clone()
    else {
        unreachable!()
    };
    let store = stratafs::layer::IndexStore::new(&attacker.root());
    let mut file = store.windows_bytes(&index).unwrap().unwrap();
    let cp = &mut index.checkpoints[checkpoint as usize];
    let at = cp.window_at as usize..(cp.window_at + cp.window_len) as usize;
    let mut window = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::DeflateDecoder::new(&file[at]),
        &mut window,
    )
    .unwrap();
    window.iter_mut().for_each(|b| *b ^= 0x55);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&window).unwrap();
    let deflated = enc.finish().unwrap();
    (cp.window_at, cp.window_len) = (file.len() as u64, deflated.len() as u64);
    file.extend_from_slice(&deflated);
    let raw = &blob[in_start as usize..in_end as usize];
    let out = stratafs::layer::gzip::decode_span(cp, &window, raw, index.spans[k].out_len as usize)
        .unwrap();
    index.spans[k].digest = stratafs::digest::sha256(&out);
    let forged_windows = stratafs::digest::sha256(&file);
    std::fs::write(store.windows_path(&forged_windows), &file).unwrap();
    index.windows = Some(stratafs::layer::Windows {
        digest: forged_windows,
        size: file.len() as u64,
    });
    bind(&attacker, &evil_ref, index.clone());

    // A file wholly inside span k-1, then one wholly inside span k.
    let inside = |s: &stratafs::layer::Span| {
        let e = index
            .entries
            .iter()
            .find(|e| {
                e.path.starts_with("files/")
                    && e.offset > s.out_offset
                    && e.offset + e.size < s.out_offset + s.out_len
            })
            .unwrap();
        format!("/{}", e.path)
    };
    let (before, after) = (inside(&index.spans[k - 1]), inside(&index.spans[k]));
    let host = Stratafs::new();
    // Reading the file before span k fetches span k with it (a miss brings its neighbours):
    // span k's window is then the real output before it, not the forged file's, so its bytes
    // fail the digest the forger gave it although its compressed bytes verify — the index is
    // refused as a whole, and no forged byte is served.
    let err = host.fail(&["cat", &evil_ref, &before]);
    assert!(
        err.contains("does not describe the layer")
            && err.contains("failed verification")
            && err.contains(&hex),
        "{err}"
    );
    let err = host.fail(&["cat", &evil_ref, &after]);
    assert!(err.contains("does not describe the layer"), "{err}");
}
