//! Real zstd:chunked images, made by the real tool: a gzip image is converted by
//! `skopeo copy --dest-compress-format zstd:chunked` (Debian's skopeo) from one tag of a real
//! registry to another, then read with stratafs. The index must come from the layer's TOC (one
//! range read, checked against the manifest-checksum annotation), a small file must cost a few
//! KiB of layer data, every file must read back exactly, whiteouts must apply — and a TOC whose
//! checksum annotation does not match is refused with nothing served.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

/// Over containers/storage's chunking threshold, so the file is stored as several chunks.
const BIG: usize = 6 * 1024 * 1024 + 12_345;
const POSITION: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
const CHECKSUM: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];

fn test_image() -> (Image, BTreeMap<String, Vec<u8>>) {
    let big = bytes(31, BIG);
    let lower = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello from the lower layer\n", 0o644)
        .file("etc/gone", b"whited out by the upper layer\n", 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/big", &big, 0o755)
        .symlink("bin", "usr/bin")
        .hardlink("usr/bin/big-link", "usr/bin/big")
        .file("empty", b"", 0o600)
        .build(Compression::Gzip);
    let upper = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello from the upper layer\n", 0o644)
        .whiteout("etc/gone")
        .file("etc/added", b"added on top\n", 0o644)
        .file("usr/bin/tool", &bytes(32, 100_000), 0o755)
        .build(Compression::Gzip);
    let image = ImageBuilder::new()
        .layer(lower)
        .layer(upper)
        .build(ManifestFlavour::Oci);
    let mut expected = BTreeMap::new();
    expected.insert(
        "etc/hello".to_string(),
        b"hello from the upper layer\n".to_vec(),
    );
    expected.insert("etc/added".into(), b"added on top\n".to_vec());
    expected.insert("usr/bin/big".into(), big.clone());
    expected.insert("usr/bin/big-link".into(), big);
    expected.insert("usr/bin/tool".into(), bytes(32, 100_000));
    expected.insert("empty".into(), Vec::new());
    (image, expected)
}

fn annotation<'a>(layer: &'a serde_json::Value, keys: &[&str; 2]) -> Option<&'a str> {
    keys.iter().find_map(|k| layer["annotations"][*k].as_str())
}

#[test]
fn images_converted_by_skopeo_read_lazily_and_exactly() {
    // Fails, rather than skips, without skopeo: `.ci/setup` installs it.
    assert!(
        Command::new("skopeo").arg("--version").output().is_ok(),
        "`skopeo` not found (Debian package skopeo, see .ci/setup)"
    );
    let reg = Registry::start(RegistryOpts::default());
    let (image, expected) = test_image();
    reg.push_image("conv/app", "gzip", &image, &Auth::None);
    let dst = format!("{}/conv/app:zc", reg.addr());
    let (_layout, _) =
        common::skopeo::convert_zstd_chunked(&format!("{}/conv/app:gzip", reg.addr()), &dst);

    // The converted image really is zstd:chunked.
    let resp = reg
        .get_manifest("conv/app", "zc", &Auth::None)
        .expect_status(200, "converted manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let layers = manifest["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 2, "{manifest}");
    for layer in &layers {
        assert_eq!(
            layer["mediaType"],
            oci_media_type(Compression::Zstd),
            "{layer}"
        );
        assert!(annotation(layer, &POSITION).is_some(), "{layer}");
        assert!(annotation(layer, &CHECKSUM).is_some(), "{layer}");
    }
    let digests: Vec<String> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();

    // A small file from a fresh store: the TOCs and one frame, by range.
    let fresh = Stratafs::new();
    let mark = reg.log_mark();
    assert_eq!(fresh.cat(&dst, "/etc/added"), expected["etc/added"]);
    let fetched: Vec<AccessEntry> = reg
        .access_log_since(mark)
        .into_iter()
        .filter(|e| e.method == "GET" && digests.iter().any(|d| e.path.ends_with(d.as_str())))
        .collect();
    let bytes_fetched: u64 = fetched.iter().map(|e| e.bytes).sum();
    eprintln!(
        "zstd:chunked: {bytes_fetched} layer bytes in {} requests for one small file",
        fetched.len()
    );
    common::registry::assert_small_toc_read(&fetched, &digests[0]);

    // Every file reads back exactly; the whiteout applies; links are links.
    let cli = Stratafs::new();
    for (path, content) in &expected {
        assert!(cli.cat(&dst, path) == *content, "{path} differs");
    }
    assert_eq!(cli.ls(&dst, "/etc"), ["added", "hello"]);
    // Indexed from the TOC, with the large file in several verified chunks.
    let hex = digests[0].trim_start_matches("sha256:");
    // Stored under the TOC checksum that pins it (only images with that annotation use it).
    let pinned: Vec<_> = std::fs::read_dir(cli.root().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{hex}@sha256-"))
        })
        .collect();
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&pinned[0]).unwrap()).unwrap();
    assert_eq!(index["format"], "zstd-chunked");
    let spans = index["spans"].as_array().unwrap();
    assert!(spans.len() >= 5, "{} spans", spans.len());
    assert!(spans.iter().all(|s| s["fetch"] == "zstd"), "{spans:?}");
    let long = cli.ok(&["ls", "-l", &dst, "/"]);
    assert!(long.contains("bin -> usr/bin"), "{long}");
    let long = cli.ok(&["ls", "-l", &dst, "/usr/bin"]);
    let big_line = long.lines().find(|l| l.ends_with(" big")).unwrap();
    let fields: Vec<&str> = big_line.split_whitespace().collect();
    assert_eq!(
        fields[..2],
        ["-rwxr-xr-x", "2"],
        "mode and hard links: {big_line}"
    );

    // The same layers under a manifest whose checksum annotation is wrong: refused.
    let mut bad = manifest.clone();
    for layer in bad["layers"].as_array_mut().unwrap() {
        for key in CHECKSUM {
            if layer["annotations"][key].is_string() {
                layer["annotations"][key] = serde_json::Value::String(
                    "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                        .into(),
                );
            }
        }
    }
    let bad_bytes = serde_json::to_vec(&bad).unwrap();
    push_manifest(
        &reg.url(),
        "conv/app",
        "bad",
        manifest["mediaType"].as_str().unwrap_or(OCI_MANIFEST),
        &bad_bytes,
        &Auth::None,
    );
    let victim = Stratafs::new();
    let err = victim.fail(&["cat", &format!("{}/conv/app:bad", reg.addr()), "/etc/added"]);
    assert!(err.contains("checksum"), "{err}");
}
