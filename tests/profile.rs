//! Startup profiles, end to end on the real registry and real FUSE mounts: a mount records
//! what its workload reads first; `profile push` binds the profile to the image; a cold mount
//! on a fresh store replays it — the registry serves the profile's ranges before the workload
//! reads anything, and the workload's reads then need no request; a hostile profile is ignored
//! with a clear log line and never changes a byte served; a profile's pack carries its whole
//! replay in fewer bytes than the layer's ranges, and a hostile pack (bytes that do not verify,
//! frames that do not decode, a pack larger than what it replaces) changes no byte served and
//! is logged; a later mount's file read by passthrough (its reads unseen) adds to the merged
//! profile only if no recording saw any of it read.

mod common;

use common::mount::MountGuard;
use common::*;

const FILES: usize = 12;
const FILE: usize = 1 << 20;
/// Uncompressed bytes per index span: a file's spans hold up to a span more at each end.
const SPAN: usize = 256 << 10;

/// One gzip layer of twelve 1 MiB files (half random bytes: they compress to about half).
fn image() -> Image {
    let mut b = LayerBuilder::new().dir("data", 0o755);
    for i in 0..FILES {
        b = b.file(
            &format!("data/f{i:02}"),
            &bytes(100 + i as u64, FILE),
            0o644,
        );
    }
    ImageBuilder::new()
        .layer(b.build(Compression::Gzip))
        .build(ManifestFlavour::Oci)
}

/// A registry with [`image`] pushed as `repo:v1` and its index bound by `index push --bind`:
/// the registry, the reference, and the layer's digest.
fn published(repo: &str) -> (Registry, String, String) {
    publish(repo, image())
}

/// As [`published`], with `image`.
fn publish(repo: &str, image: Image) -> (Registry, String, String) {
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image(repo, "v1", &image, &Auth::None);
    let reference = format!("{}/{repo}:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);
    (reg, reference, image.layers[0].digest.clone())
}

/// A fresh store whose mount of `reference` ran `work` and was unmounted: it recorded what
/// `work` read first.
fn recorded(reference: &str, work: fn(&MountGuard)) -> Stratafs {
    let recorder = Stratafs::new();
    let guard = MountGuard::lazy(&recorder, reference, "info");
    work(&guard);
    recorder.ok(&["umount", guard.dir.to_str().unwrap()]);
    recorder
}

/// The workload: three files far apart in the layer.
const READ: [usize; 3] = [2, 7, 10];

fn workload(guard: &MountGuard) {
    for i in READ {
        let got = std::fs::read(guard.path(&format!("/data/f{i:02}"))).unwrap();
        assert!(got == bytes(100 + i as u64, FILE), "data/f{i:02} differs");
    }
}

#[test]
fn a_recorded_profile_is_pushed_and_replayed_by_a_cold_mount_before_the_workload_reads() {
    let (reg, reference, layer) = published("profile/app");

    // Record: a mount notes the units its workload reads first, saved at unmount.
    let recorder = recorded(&reference, workload);
    let profile: serde_json::Value =
        serde_json::from_str(&recorder.ok(&["profile", "show", "--json", &reference])).unwrap();
    let ranges = profile["ranges"].as_array().unwrap();
    assert!(
        (READ.len()..=2 * READ.len()).contains(&ranges.len()),
        "{profile}"
    );
    assert!(
        ranges.iter().all(|r| r["layer"] == layer.as_str()),
        "{profile}"
    );
    let recorded: u64 = ranges.iter().map(|r| r["len"].as_u64().unwrap()).sum();
    let most = (READ.len() * (FILE + 2 * SPAN)) as u64;
    assert!(
        recorded >= (READ.len() * FILE) as u64 && recorded <= most,
        "{profile}"
    );
    // In the order first read: f02's ranges, then f07's, then f10's (within a file the
    // kernel's read-ahead may touch its spans in any order, so a range may start before
    // the one recorded before it, but never by as much as a file).
    let offsets: Vec<u64> = ranges
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[1] + FILE as u64 > w[0]),
        "{offsets:?}"
    );
    assert_eq!(offsets.iter().min(), offsets.first(), "{offsets:?}");
    assert_eq!(offsets.iter().max(), offsets.last(), "{offsets:?}");
    assert!(
        offsets.last().unwrap() - offsets[0] > 7 * FILE as u64,
        "{offsets:?}"
    );

    // The replay from the layers' ranges (a pack, which replaces them, is tested below).
    let out = recorder.ok(&["profile", "push", "--no-pack", &reference]);
    assert!(out.contains("profile") && !out.contains("pack"), "{out}");

    // A cold mount on a fresh store finds the bound profile and fetches its ranges at once,
    // before the workload reads anything.
    let cold = Stratafs::new();
    let mark = reg.log_mark();
    let guard = MountGuard::lazy(&cold, &reference, "info");
    // Replay ends with its last fetch verified and cached; wait for that rather than a time.
    cold.wait_for_mount_log("profile replayed");
    let before = reg.log_mark();
    workload(&guard);
    assert_eq!(
        reg.blob_bytes_since(before, &layer),
        0,
        "the workload's reads were fetched again: {:#?}",
        reg.access_log_since(before)
    );
    // Only the profile's spans: at least the files' compressed bytes (half of each file is
    // random), at most the recorded spans' (compressed, they are no larger).
    let replayed = reg.blob_bytes_since(mark, &layer);
    assert!(
        replayed >= (READ.len() * FILE / 2) as u64 && replayed <= recorded + recorded / 50,
        "replay fetched {replayed} bytes for {recorded} recorded"
    );
    cold.ok(&["umount", guard.dir.to_str().unwrap()]);
}

/// A workload that reads 4 KiB here and there in three files.
fn scattered_workload(guard: &MountGuard) {
    use std::os::unix::fs::FileExt;
    for i in READ {
        let file = std::fs::File::open(guard.path(&format!("/data/f{i:02}"))).unwrap();
        let want = bytes(100 + i as u64, FILE);
        for at in [0, 300_000, 600_000, 900_000] {
            let mut got = vec![0; 4096];
            file.read_exact_at(&mut got, at as u64).unwrap();
            assert!(got == want[at..at + 4096], "data/f{i:02} differs at {at}");
        }
    }
}

#[test]
fn profile_push_shapes_the_indexes_so_that_a_replay_fetches_blocks_not_whole_spans() {
    let (reg, reference, layer) = published("profile/shaped");
    let recorder = recorded(&reference, scattered_workload);
    let out = recorder.ok(&[
        "profile",
        "push",
        "--no-pack",
        "--tag",
        "shaped",
        &reference,
    ]);
    assert!(
        out.contains("the indexes of 1 layers with spans shaped to it"),
        "{out}"
    );
    let out = recorder.ok(&[
        "profile",
        "push",
        "--keep-indexes",
        "--no-pack",
        "--tag",
        "coarse",
        &reference,
    ]);
    assert!(!out.contains("spans shaped"), "{out}");

    // Both pin the same profile; only `shaped` pins another index than the one bound.
    let pins = |tag: &str| {
        let m = reg.get_manifest("profile/shaped", tag, &Auth::None);
        let m: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        let index = m["layers"][0]["annotations"]["io.stratafs.index.digest"].to_string();
        (
            index,
            m["annotations"]["io.stratafs.profile.digest"].to_string(),
        )
    };
    let (bound, none) = pins("v1");
    let (coarse, profile) = pins("coarse");
    let (shaped, same) = pins("shaped");
    assert_eq!((coarse.as_str(), none.as_str()), (bound.as_str(), "null"));
    assert_ne!(shaped, bound);
    assert_eq!(same, profile);

    // A cold mount of each, on a fresh store: the replay fetches all the workload reads.
    let replayed = |tag: &str| {
        let cold = Stratafs::new();
        let mark = reg.log_mark();
        let at = format!("{}/profile/shaped:{tag}", reg.addr());
        let guard = MountGuard::lazy(&cold, &at, "info");
        cold.wait_for_mount_log("profile replayed");
        let (replayed, before) = (reg.blob_bytes_since(mark, &layer), reg.log_mark());
        scattered_workload(&guard);
        assert_eq!(
            reg.blob_bytes_since(before, &layer),
            0,
            "{tag}: the workload's reads were fetched again: {:#?}",
            reg.access_log_since(before)
        );
        cold.ok(&["umount", guard.dir.to_str().unwrap()]);
        replayed
    };
    let (coarse, shaped) = (replayed("coarse"), replayed("shaped"));
    // The layer's deflate blocks here hold about 16 KiB of output; spans are 64 KiB and
    // more, and where the profile reads, shaped spans 32 KiB and more.
    assert!(
        shaped > 0 && shaped * 4 < coarse * 3,
        "shaped spans: {shaped} bytes replayed, coarse: {coarse}"
    );
}

#[test]
fn a_hostile_profile_wastes_nothing_and_changes_no_byte() {
    let (reg, reference, layer) = published("profile/hostile");

    // A publisher's profile naming another layer, and absurd offsets and sizes.
    let publisher = Stratafs::new();
    let pulled = publisher.pull_json(&reference, &[]);
    let chain = pulled["chain_id"].as_str().unwrap().replace(':', "-");
    let other = format!("sha256:{}", "ab".repeat(32));
    let hostile = serde_json::json!({"version": 1, "ranges": [
        {"layer": other, "offset": 0, "len": 1u64 << 40},
        {"layer": layer, "offset": u64::MAX - 5, "len": 100},
        {"layer": layer, "offset": 1u64 << 50, "len": 1u64 << 50},
        {"layer": "not a digest", "offset": 0, "len": 10},
    ]});
    let dir = publisher.root().join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{chain}.json")), hostile.to_string()).unwrap();
    publisher.ok(&["profile", "push", &reference]);

    let cold = Stratafs::new();
    let mark = reg.log_mark();
    let guard = MountGuard::lazy(&cold, &reference, "info");
    cold.wait_for_mount_log("profile replayed");
    let log = cold.mount_logs();
    assert!(
        log.contains("ignored ranges") && log.contains("ignored=4"),
        "{log}"
    );
    assert_eq!(
        reg.blob_bytes_since(mark, &layer),
        0,
        "a hostile profile fetched"
    );
    workload(&guard);
    cold.ok(&["umount", guard.dir.to_str().unwrap()]);
}

/// `len` bytes of text: numbered lines of words (they compress, as most of an image does).
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 10] = [
        "import", "numpy", "def", "return", "self", "value", "class", "lambda", "None", "print",
    ];
    let mut out = Vec::with_capacity(len + 128);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut line = 0u64;
    while out.len() < len {
        line += 1;
        out.extend_from_slice(format!("{line:06}").as_bytes());
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(b' ');
            out.extend_from_slice(WORDS[(x % 10) as usize].as_bytes());
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// One gzip layer of twelve 1 MiB text files.
fn text_image() -> Image {
    let mut b = LayerBuilder::new().dir("data", 0o755);
    for i in 0..FILES {
        b = b.file(&format!("data/f{i:02}"), &text(100 + i as u64, FILE), 0o644);
    }
    ImageBuilder::new()
        .layer(b.build(Compression::Gzip))
        .build(ManifestFlavour::Oci)
}

/// [`workload`] over [`text_image`].
fn text_workload(guard: &MountGuard) {
    for i in READ {
        let got = std::fs::read(guard.path(&format!("/data/f{i:02}"))).unwrap();
        assert!(got == text(100 + i as u64, FILE), "data/f{i:02} differs");
    }
}

/// The pack named by the profile that `repo:tag`'s manifest pins (`null` if none).
fn pack_of(reg: &Registry, repo: &str, tag: &str) -> serde_json::Value {
    let m = reg.get_manifest(repo, tag, &Auth::None);
    let m: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    let digest = m["annotations"]["io.stratafs.profile.digest"]
        .as_str()
        .expect("a pinned profile")
        .to_string();
    let blob = common::push::get_blob(&reg.url(), repo, &digest, None, &Auth::None)
        .expect_status(200, "profile blob")
        .body;
    let profile: serde_json::Value =
        serde_json::from_slice(&zstd::decode_all(&blob[..]).unwrap()).unwrap();
    profile["pack"].clone()
}

/// A cold mount of `reference` on a fresh store, once its replay ended: the mount, its
/// store, and the registry's log mark from before the mount.
fn replayed(reg: &Registry, reference: &str) -> (MountGuard, Stratafs, usize) {
    let cold = Stratafs::new();
    let mark = reg.log_mark();
    let guard = MountGuard::lazy(&cold, reference, "info");
    cold.wait_for_mount_log("profile replayed");
    (guard, cold, mark)
}

#[test]
fn a_published_pack_carries_the_replay_in_fewer_bytes_than_the_layer_ranges() {
    let (reg, reference, layer) = publish("profile/pack", text_image());
    let recorder = recorded(&reference, text_workload);
    let out = recorder.ok(&["profile", "push", "--tag", "packed", &reference]);
    assert!(out.contains("its pack ("), "{out}");
    recorder.ok(&[
        "profile",
        "push",
        "--no-pack",
        "--tag",
        "ranges",
        &reference,
    ]);
    let pack = pack_of(&reg, "profile/pack", "packed");
    let (digest, size) = (
        pack["digest"].as_str().unwrap(),
        pack["size"].as_u64().unwrap(),
    );
    assert!(
        pack["frames"].as_array().is_some_and(|f| !f.is_empty()),
        "{pack}"
    );
    assert_eq!(
        pack_of(&reg, "profile/pack", "ranges"),
        serde_json::Value::Null
    );

    // Without the pack: the replay fetches the profile's spans from the layer.
    let at = |tag: &str| format!("{}/profile/pack:{tag}", reg.addr());
    let (guard, cold, mark) = replayed(&reg, &at("ranges"));
    let ranges = reg.blob_bytes_since(mark, &layer);
    cold.ok(&["umount", guard.dir.to_str().unwrap()]);

    // With it: the pack, fetched once and whole, and not one byte of the layer; then the
    // workload reads every byte it reads from the cache, verified.
    let (guard, cold, mark) = replayed(&reg, &at("packed"));
    assert_eq!(reg.blob_bytes_since(mark, digest), size);
    assert_eq!(
        reg.blob_bytes_since(mark, &layer),
        0,
        "the replay fetched from the layer: {:#?}",
        reg.access_log_since(mark)
    );
    let log = cold.mount_logs();
    assert!(
        log.contains("profile replayed") && !log.contains("pack_spans=0"),
        "{log}"
    );
    let before = reg.log_mark();
    text_workload(&guard);
    assert!(
        reg.access_log_since(before)
            .iter()
            .all(|e| !e.path.contains("/blobs/")),
        "the workload's reads were fetched: {:#?}",
        reg.access_log_since(before)
    );
    cold.ok(&["umount", guard.dir.to_str().unwrap()]);
    // The same store, its cache emptied, replays the profile it kept from that mount: with
    // the pack again, not the layer's ranges.
    cold.ok(&["cache", "prune", "--max-size", "0"]);
    let mark = reg.log_mark();
    let replays = cold.mount_logs().matches("profile replayed").count();
    let guard = MountGuard::lazy(&cold, &at("packed"), "info");
    cold.wait_for_mount_logs("profile replayed", replays + 1);
    assert_eq!(reg.blob_bytes_since(mark, digest), size);
    assert_eq!(
        reg.blob_bytes_since(mark, &layer),
        0,
        "the stored profile's replay fetched from the layer: {:#?}",
        reg.access_log_since(mark)
    );
    text_workload(&guard);
    cold.ok(&["umount", guard.dir.to_str().unwrap()]);
    // zstd at level 19 against the layer's gzip, for the same spans.
    assert!(
        ranges > 0 && size * 10 < ranges * 9,
        "pack {size} bytes, the layer's ranges {ranges}"
    );
}

/// A hostile pack's frame: its bytes, for the bytes of spans it declares.
type FrameBytes = fn(u64) -> Vec<u8>;

/// Pins, under `repo:tag` (a manifest of a hostile publisher's own), the profile `repo:v1`
/// pins with its pack's frames replaced by `frame(bytes of spans)`; returns that pack.
fn hostile_pack(reg: &Registry, repo: &str, tag: &str, frame: FrameBytes) -> serde_json::Value {
    let mut pack = pack_of(reg, repo, "v1");
    let mut blob = Vec::new();
    for f in pack["frames"].as_array_mut().unwrap() {
        let out: u64 = f["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[2].as_u64().unwrap())
            .sum();
        let bytes = frame(out);
        f["len"] = bytes.len().into();
        blob.extend_from_slice(&bytes);
    }
    pack["size"] = blob.len().into();
    pack["digest"] = common::push::push_blob(&reg.url(), repo, &blob, &Auth::None).into();
    let m = reg.get_manifest(repo, "v1", &Auth::None);
    let mut manifest: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    let pinned = manifest["annotations"]["io.stratafs.profile.digest"]
        .as_str()
        .unwrap()
        .to_string();
    let profile = common::push::get_blob(&reg.url(), repo, &pinned, None, &Auth::None).body;
    let mut profile: serde_json::Value =
        serde_json::from_slice(&zstd::decode_all(&profile[..]).unwrap()).unwrap();
    profile["pack"] = pack.clone();
    let profile = zstd::encode_all(profile.to_string().as_bytes(), 3).unwrap();
    manifest["annotations"]["io.stratafs.profile.digest"] =
        common::push::push_blob(&reg.url(), repo, &profile, &Auth::None).into();
    let media_type = manifest["mediaType"].as_str().unwrap().to_string();
    common::push::push_manifest(
        &reg.url(),
        repo,
        tag,
        &media_type,
        manifest.to_string().as_bytes(),
        &Auth::None,
    );
    assert_eq!(pack_of(reg, repo, tag), pack);
    pack
}

#[test]
fn a_pack_whose_bytes_do_not_verify_changes_no_byte() {
    let (reg, reference, layer) = publish("profile/badpack", text_image());
    let publisher = recorded(&reference, text_workload);
    publisher.ok(&["profile", "push", &reference]);
    // The same spans, but zeros: frames that decode, to bytes of the wrong digest; frames
    // that are not zstd at all; and a pack larger than the layer bytes it would replace.
    let cases: [(&str, FrameBytes, &str); 3] = [
        (
            "zeros",
            |out| zstd::bulk::compress(&vec![0u8; out as usize], 19).unwrap(),
            "profile pack: spans not used",
        ),
        (
            "garbage",
            |out| bytes(7, (out / 16) as usize),
            "profile pack: frame unusable",
        ),
        (
            "big",
            |out| bytes(7, out as usize),
            "profile pack not used: a pack of",
        ),
    ];
    for (tag, frame, says) in cases {
        let pack = hostile_pack(&reg, "profile/badpack", tag, frame);
        let at = format!("{}/profile/badpack:{tag}", reg.addr());
        let (guard, cold, mark) = replayed(&reg, &at);
        let log = cold.mount_logs();
        assert!(log.contains(says), "{tag}: {log}");
        if tag == "big" {
            let digest = pack["digest"].as_str().unwrap();
            assert_eq!(
                reg.blob_bytes_since(mark, digest),
                0,
                "the big pack was fetched"
            );
        }
        // The spans came from the layer instead, and every byte read is the image's.
        assert!(reg.blob_bytes_since(mark, &layer) > 0, "{tag}");
        text_workload(&guard);
        cold.ok(&["umount", guard.dir.to_str().unwrap()]);
    }
}

/// Returns once the mount whose metrics are at `addr` has had every open file released (a
/// close's RELEASE reaches the daemon after `close` returned).
fn all_released(addr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fuse_ops(addr, "release") != fuse_ops(addr, "open") {
        assert!(
            std::time::Instant::now() < deadline,
            "opens not released after 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A mount of `reference` on `cli`'s store, its logs at debug level and its metrics served
/// (at the returned address), once its background fill has cached every layer.
fn mount_filled(cli: &Stratafs, reference: &str) -> (MountGuard, String) {
    let guard = MountGuard::new(Some(cli.root()));
    let metrics = format!("127.0.0.1:{}", free_port());
    cli.ok(&[
        "--log-level",
        "info,stratafs=debug",
        "mount",
        "--metrics-address",
        &metrics,
        reference,
        guard.dir.to_str().unwrap(),
    ]);
    cli.wait_for_mount_log("background fetch done");
    (guard, metrics)
}

#[test]
fn a_file_opened_again_while_open_gets_its_local_copy_and_then_passes_through() {
    let (_reg, reference, _) = published("profile/held");
    let cli = Stratafs::new();
    let (guard, metrics) = mount_filled(&cli, &reference);
    let dir = guard.dir.to_str().unwrap();
    // A program holding a library open while it (or another) opens it again: the second
    // open asks for the local copy as a second open after a close does.
    let held = std::fs::File::open(guard.path("data/f03")).unwrap();
    let again = std::fs::File::open(guard.path("data/f03")).unwrap();
    cli.wait_for_mount_log("local copy made path=data/f03");
    drop((held, again));
    all_released(&metrics);
    // The next open passes through to the copy: its reads never reach the daemon.
    let reads = fuse_ops(&metrics, "read");
    assert!(std::fs::read(guard.path("data/f03")).unwrap() == bytes(103, FILE));
    assert_eq!(
        fuse_ops(&metrics, "read"),
        reads,
        "reads reached the daemon"
    );
    cli.ok(&["umount", dir]);
}

#[test]
fn a_file_read_by_passthrough_keeps_the_part_an_earlier_recording_saw_read() {
    use std::io::Read;
    let (_reg, reference, _) = published("profile/pass");
    let cli = Stratafs::new();
    let ranges = || -> Vec<u64> {
        let shown: serde_json::Value =
            serde_json::from_str(&cli.ok(&["profile", "show", "--json", &reference])).unwrap();
        shown["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["len"].as_u64().unwrap())
            .collect()
    };

    // Record: the workload reads a page in the middle of f05 (a span of its own, shared with
    // no other file).
    let guard = MountGuard::lazy(&cli, &reference, "info");
    let mut page = [0u8; 4096];
    let mut f05 = std::fs::File::open(guard.path("data/f05")).unwrap();
    std::io::Seek::seek(&mut f05, std::io::SeekFrom::Start((FILE / 2) as u64)).unwrap();
    f05.read_exact(&mut page).unwrap();
    assert!(page[..] == bytes(105, FILE)[FILE / 2..FILE / 2 + 4096]);
    drop(f05);
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
    let first = ranges().len();

    // A later mount of the same store replays that profile and fills the cache in the
    // background; f05 and f08, cached whole, are opened three times each: the second open
    // has a local copy made (whether or not the first one's release has reached the daemon
    // yet), the third is served by passthrough (its reads unseen here) once no open of the
    // file is left: a close's RELEASE reaches the daemon after `close` returns, so the test
    // waits for the daemon to count as many releases as opens.
    let (guard, metrics) = mount_filled(&cli, &reference);
    let dir = guard.dir.to_str().unwrap();
    for f in ["data/f05", "data/f08"] {
        for _ in 0..2 {
            drop(std::fs::File::open(guard.path(f)).unwrap());
        }
        cli.wait_for_mount_log(&format!("local copy made path={f}"));
        all_released(&metrics);
        drop(std::fs::File::open(guard.path(f)).unwrap());
    }
    cli.ok(&["umount", dir]);

    // The merged profile adds f08 whole (no recording has seen any of it read), not the rest
    // of f05, of which the earlier recording saw a page read.
    let merged = ranges();
    let added: u64 = merged[first..].iter().sum();
    assert!(
        (FILE as u64..=(FILE + SPAN) as u64).contains(&added),
        "{added} bytes added to the profile, in {:?}\n{}",
        &merged[first..],
        cli.mount_logs()
    );
}
