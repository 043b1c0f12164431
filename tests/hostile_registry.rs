//! Registries that misbehave, against a real `docker-registry` process: one that answers 500 for
//! a layer's bytes (through a faulty reverse proxy in front of it) must give EIO within the
//! mount's read timeout, with the cause in the daemon's log, and serve again once it recovers;
//! an eStargz TOC one image vouches for must never serve another image that has the same
//! layer blob but does not pin that TOC; and a mount of layers without any index returns
//! while they stream, serves nothing before they are verified, and nothing of a corrupt one.
//!
//! Needs root and FUSE (test 1), and containerd with `ctr-remote` (test 2): a missing tool fails
//! the test.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::faulty::{FaultyProxy, INJECTED};
use common::mount::*;
use common::*;

/// `stratafs mount --plain-http -o OPTS REF DIR`; asserts the mount is there.
fn mount(cli: &Stratafs, reference: &str, dir: &Path, opts: &str) {
    let mut cmd = cli.command();
    cmd.args(["mount", "--plain-http", "-o", opts])
        .arg(reference)
        .arg(dir);
    let out = run(&mut cmd, MOUNT_TIMEOUT);
    assert!(out.status.success(), "stratafs mount: {}", show(&out));
    assert!(
        wait_mounted(dir, Duration::from_secs(5)).is_some(),
        "no fuse.stratafs mount on {}: {:?}",
        dir.display(),
        mount_at(dir)
    );
}

/// Every daemon log of the store (`<root>/logs/*`), concatenated.
fn mount_logs(root: &Path) -> String {
    std::fs::read_dir(root.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

#[test]
fn a_registry_answering_500_gives_eio_within_the_read_timeout() {
    const READ_TIMEOUT: u64 = 4;
    let reg = Registry::start(RegistryOpts::default());
    let big = bytes(7, 2_000_000 + 4321);
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello\n", 0o644)
        .dir("data", 0o755)
        .file("data/small", &bytes(8, 30_000), 0o644)
        .file("data/big", &big, 0o644)
        .build(Compression::Gzip);
    let image = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
    let blob = image.layers[0].digest.clone();
    reg.push_image("hostile/five-hundred", "v1", &image, &Auth::None);

    // Everything goes through the proxy, which relays faithfully until told to fail.
    let proxy = FaultyProxy::start(reg.addr(), &blob);
    let reference = format!("{}/hostile/five-hundred:v1", proxy.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", "--plain-http", &reference]);
    cli.ok(&["cache", "prune", "--max-size", "0"]);

    let guard = MountGuard::new(Some(cli.root()));
    let opts = format!("read_timeout={READ_TIMEOUT},nobackground");
    mount(&cli, &reference, &guard.dir, &opts);
    let file = guard.path("data/big");
    let meta = std::fs::metadata(&file).expect("stat data/big (metadata is local)");
    assert_eq!(meta.len(), big.len() as u64);

    proxy.faults.failing.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let p = file.clone();
    let result = within(Duration::from_secs(60), move || std::fs::read(p))
        .expect("read still blocked 60 s after the registry started answering 500");
    let elapsed = started.elapsed();
    match result {
        Ok(got) => panic!(
            "read {} bytes of data/big while every layer request got 500 and the cache was \
             pruned",
            got.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "data/big: {e}"),
    }
    assert!(
        proxy.faults.failed.load(Ordering::SeqCst) > 0,
        "the proxy answered no 500: the read failed for another reason"
    );
    // The whole read, the kernel's immediate retry included, ends within the read timeout.
    assert!(
        elapsed < Duration::from_secs(READ_TIMEOUT + 1),
        "EIO only after {elapsed:?} with read_timeout={READ_TIMEOUT}"
    );
    eprintln!(
        "EIO after {elapsed:?} ({} answers of 500)",
        proxy.faults.failed.load(Ordering::SeqCst)
    );

    // The daemon's log names the cause: the registry's 500, not a timeout.
    let deadline = Instant::now() + Duration::from_secs(5);
    let cause = loop {
        let logs = mount_logs(&cli.root());
        let line = logs
            .lines()
            .find(|l| l.contains("read failed") && l.contains("500") && l.contains(INJECTED))
            .map(str::to_string);
        match line {
            Some(l) => break l,
            None if Instant::now() > deadline => {
                panic!("no `read failed` line naming the 500 in the daemon log:\n{logs}")
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(!cause.contains("within the read timeout"), "{cause}");
    eprintln!("daemon log: {cause}");

    // The registry recovers: a fresh open and read gets the right bytes.
    proxy.faults.failing.store(false, Ordering::SeqCst);
    let failed = proxy.faults.failed.load(Ordering::SeqCst);
    let p = file.clone();
    let again = within(Duration::from_secs(60), move || std::fs::read(p))
        .expect("read hangs after the registry recovered");
    match again {
        Ok(got) => assert!(got == big, "data/big: wrong bytes after recovery"),
        Err(e) => panic!(
            "data/big after the registry recovered: {e}\ndaemon log:\n{}",
            mount_logs(&cli.root())
        ),
    }
    assert_eq!(proxy.faults.failed.load(Ordering::SeqCst), failed);
    assert!(mount_at(&guard.dir).is_some(), "the mount went away");
    let out = run(
        cli.command().arg("umount").arg(&guard.dir),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stratafs umount: {}", show(&out));
}

/// Layer annotation eStargz converters put on every converted layer.
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

#[test]
fn an_estargz_toc_trusted_for_one_image_never_serves_another() {
    if let Some(why) = Containerd::unavailable() {
        panic!("containerd cannot run: {why}");
    }
    assert!(
        std::process::Command::new("ctr-remote")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "`ctr-remote` not found (Debian package stargz-snapshotter, see .ci/setup)"
    );
    let reg = Registry::start(RegistryOpts::default());
    let files: BTreeMap<&str, Vec<u8>> = [
        ("etc/hello", b"hello from the shared layer\n".to_vec()),
        ("data/medium", bytes(21, 300_000)),
        ("data/big", bytes(22, 3_000_000)),
    ]
    .into_iter()
    .collect();
    let mut layer = LayerBuilder::new().dir("etc", 0o755).dir("data", 0o755);
    for (path, content) in &files {
        layer = layer.file(path, content, 0o644);
    }
    let image = ImageBuilder::new()
        .layer(layer.build(Compression::Gzip))
        .build(ManifestFlavour::Oci);
    reg.push_image("hostile/a", "gzip", &image, &Auth::None);
    let src = format!("{}/hostile/a:gzip", reg.addr());
    let ref_a = format!("{}/hostile/a:esgz", reg.addr());
    {
        // Fetch without unpacking (see mount_conformance.rs), convert, push.
        let ctd = Containerd::start();
        ctd.ctr_ok(&["content", "fetch", "--plain-http", &src]);
        ctd.ctr_remote_ok(&["image", "convert", "--estargz", "--oci", &src, &ref_a]);
        ctd.push_plain_http(&ref_a);
    }
    let resp = reg
        .get_manifest("hostile/a", "esgz", &Auth::None)
        .expect_status(200, "converted manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    let blob = layers[0]["digest"].as_str().unwrap().to_string();
    let blob_size = layers[0]["size"].as_u64().unwrap();
    let toc = layers[0]["annotations"][TOC_DIGEST]
        .as_str()
        .unwrap_or_else(|| panic!("not an eStargz layer: {manifest}"))
        .to_string();

    // Image B: the same config and layer blob in another repository, no layer annotations.
    let config = manifest["config"]["digest"].as_str().unwrap();
    for digest in [config, blob.as_str()] {
        let data = get_blob(&reg.url(), "hostile/a", digest, None, &Auth::None)
            .expect_status(200, digest)
            .body;
        assert_eq!(
            push_blob(&reg.url(), "hostile/b", &data, &Auth::None),
            digest
        );
    }
    let mut plain = manifest.clone();
    plain["layers"][0]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let plain = serde_json::to_vec(&plain).unwrap();
    push_manifest(
        &reg.url(),
        "hostile/b",
        "plain",
        OCI_MANIFEST,
        &plain,
        &Auth::None,
    );
    let ref_b = format!("{}/hostile/b:plain", reg.addr());

    let cli = Stratafs::new();
    let layer_gets = |mark: usize| -> Vec<AccessEntry> {
        reg.access_log_since(mark)
            .into_iter()
            .filter(|e| {
                e.method == "GET"
                    && e.user_agent.starts_with("stratafs/")
                    && e.path.ends_with(&blob)
            })
            .collect()
    };
    let hex = blob.strip_prefix("sha256:").unwrap();
    let layers_dir = cli.root().join("layers");
    let verified = layers_dir.join(format!("{hex}.json"));
    let from_toc = layers_dir.join(format!(
        "{hex}@sha256-{}.json",
        toc.strip_prefix("sha256:").unwrap()
    ));
    let listing = || -> Vec<String> {
        std::fs::read_dir(&layers_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };

    // A: indexed from its TOC with small range reads.
    let mark = reg.log_mark();
    assert_eq!(cli.ls(&ref_a, "/"), ["data", "etc"]);
    let gets = layer_gets(mark);
    let fetched: u64 = gets.iter().map(|e| e.bytes).sum();
    assert!(
        !gets.is_empty() && gets.iter().all(|e| e.status == 206),
        "A's ls reads its TOC by range: {gets:#?}"
    );
    assert!(
        fetched < 64 * 1024,
        "{fetched} of {blob_size} bytes for A's TOC"
    );
    assert!(
        from_toc.is_file(),
        "no {}: {:?}",
        from_toc.display(),
        listing()
    );
    assert!(!verified.exists(), "{:?}", listing());

    // B: does not pin the TOC, so its first use streams the whole blob from B's repository.
    let mark = reg.log_mark();
    let listed_b = cli.ls(&ref_b, "/");
    let gets = layer_gets(mark);
    assert!(
        gets.iter().all(|e| e.path.starts_with("/v2/hostile/b/")),
        "B read the layer through A's repository: {gets:#?}"
    );
    let streamed: u64 = gets.iter().map(|e| e.bytes).sum();
    assert_eq!(
        streamed, blob_size,
        "B's first open is served from A's TOC-derived index instead of one streaming pass \
         over the verified blob: {gets:#?}"
    );
    eprintln!("ls of B: {listed_b:?}");
    for dir in ["data", "etc"] {
        assert!(listed_b.iter().any(|n| n == dir), "{listed_b:?}");
    }
    for (path, content) in &files {
        assert!(cli.cat(&ref_b, path) == *content, "B: {path} differs");
    }
    assert!(
        verified.is_file(),
        "no {}: {:?}",
        verified.display(),
        listing()
    );
    assert!(
        from_toc.is_file(),
        "no {}: {:?}",
        from_toc.display(),
        listing()
    );
}

/// A two-layer image without any index: a base layer with a large file, a small top layer.
fn streamed_image(repo: &str, reg: &Registry) -> (Image, Vec<u8>) {
    let big = bytes(11, 3_000_000 + 77);
    let base = LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/big", &big, 0o644)
        .file("data/small", b"base\n", 0o644)
        .build(Compression::Gzip);
    let top = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello from the top\n", 0o644)
        .build(Compression::Gzip);
    let image = ImageBuilder::new()
        .layer(base)
        .layer(top)
        .build(ManifestFlavour::Oci);
    reg.push_image(repo, "v1", &image, &Auth::None);
    (image, big)
}

#[test]
fn a_mount_without_an_index_returns_while_its_layers_stream() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, big) = streamed_image("stream/held", &reg);
    let base = image.layers[0].digest.clone();
    // The base layer's bytes are held back until the test lets them through.
    let proxy = FaultyProxy::start(reg.addr(), &base);
    proxy.hold();
    let reference = format!("{}/stream/held:v1", proxy.addr());
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    let mut cmd = cli.command();
    cmd.args([
        "--log-level",
        "info",
        "mount",
        "--plain-http",
        "-o",
        "nobackground",
    ])
    .arg(&reference)
    .arg(&guard.dir);
    let out = run(&mut cmd, MOUNT_TIMEOUT);
    assert!(out.status.success(), "stratafs mount: {}", show(&out));
    let out = String::from_utf8_lossy(&out.stdout);
    // Returned with not one byte of the base layer delivered: the mount did not wait for it.
    assert_eq!(proxy.faults.blob_bytes.load(Ordering::SeqCst), 0);
    assert!(out.contains("without an index stream now"), "{out}");
    assert!(wait_mounted(&guard.dir, Duration::from_secs(5)).is_some());
    // The root answers at once; names wait for the layers.
    assert!(std::fs::metadata(&guard.dir).unwrap().is_dir());
    let (top, data) = (guard.path("etc/hello"), guard.path("data/big"));
    let reader = std::thread::spawn(move || (std::fs::read(top), std::fs::read(data)));
    proxy.wait_for_held_request();
    // The base layer cannot have been verified: nothing of the image may have been served.
    assert!(
        !reader.is_finished(),
        "a read finished before the base layer was delivered: {:?}",
        reader
            .join()
            .map(|(a, b)| (a.map(|v| v.len()), b.map(|v| v.len())))
    );
    proxy.release();
    let (hello, data) = reader.join().unwrap();
    assert_eq!(hello.unwrap(), b"hello from the top\n");
    assert!(data.unwrap() == big, "data/big differs");
    let logs = cli.mount_logs();
    assert!(logs.contains("layers open"), "{logs}");
}

#[test]
fn a_corrupt_layer_without_an_index_fails_reads_keeps_nothing_and_recovers() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, big) = streamed_image("stream/corrupt", &reg);
    let base = image.layers[0].digest.clone();
    let proxy = FaultyProxy::start(reg.addr(), &base);
    proxy.faults.corrupting.store(true, Ordering::SeqCst);
    let reference = format!("{}/stream/corrupt:v1", proxy.addr());
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    mount(&cli, &reference, &guard.dir, "nobackground");
    for path in ["etc/hello", "data/big", "data/small"] {
        let p = guard.path(path);
        let got = within(Duration::from_secs(60), move || std::fs::read(p))
            .expect("read still blocked after 60 s");
        match got {
            Ok(got) => panic!("{path}: served {} bytes of a corrupt image", got.len()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "{path}: {e}"),
        }
    }
    assert!(proxy.faults.blob_bytes.load(Ordering::SeqCst) > 0);
    let logs = cli.mount_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("could not be opened"))
        .unwrap_or_else(|| panic!("no line on the failed layers:\n{logs}"));
    assert!(line.contains(&base) && line.contains("mismatch"), "{line}");
    eprintln!("{line}");
    // Nothing of the refused layer is kept: no index.
    let hex = base.strip_prefix("sha256:").unwrap();
    let kept = || -> Vec<String> {
        std::fs::read_dir(cli.root().join("layers"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(hex))
            .collect()
    };
    assert!(kept().is_empty(), "{:?}", kept());

    // The registry serves the right bytes again: a later request opens the layers again (each
    // request until then fails at once), and every byte is right.
    proxy.faults.corrupting.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    let hello = loop {
        match std::fs::read(guard.path("etc/hello")) {
            Ok(got) => break got,
            Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "etc/hello: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "still failing 30 s after the registry recovered"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(hello, b"hello from the top\n");
    assert!(
        std::fs::read(guard.path("data/big")).unwrap() == big,
        "data/big differs"
    );
    assert!(!kept().is_empty(), "the verified layer's index is kept");
}

/// A mount of a [`streamed_image`] through a proxy that holds its base layer's bytes, once
/// the daemon asks for them. Fields drop in order: the mount goes first.
struct HeldStream {
    guard: MountGuard,
    cli: Stratafs,
    proxy: FaultyProxy,
    _reg: Registry,
    /// The daemon's processes.
    pids: Vec<u32>,
}

fn held_stream(repo: &str) -> HeldStream {
    let reg = Registry::start(RegistryOpts::default());
    let (image, _) = streamed_image(repo, &reg);
    let proxy = FaultyProxy::start(reg.addr(), &image.layers[0].digest);
    proxy.hold();
    let reference = format!("{}/{repo}:v1", proxy.addr());
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    mount(&cli, &reference, &guard.dir, "nobackground");
    proxy.wait_for_held_request();
    let pids = daemon_pids(&guard.dir);
    assert!(!pids.is_empty(), "no daemon serves {}", guard.dir.display());
    HeldStream {
        guard,
        cli,
        proxy,
        _reg: reg,
        pids,
    }
}

#[test]
fn unmounting_while_layers_stream_ends_the_daemon() {
    let HeldStream {
        guard,
        cli,
        proxy,
        pids,
        ..
    } = &held_stream("stream/gone");
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
    assert!(
        wait_gone(pids, Duration::from_secs(20)),
        "daemon still alive: {pids:?}"
    );
    assert!(mount_at(&guard.dir).is_none());
    proxy.release();
}

/// `umount -l` from outside, while reads wait for the layers (and so hold every dispatch
/// thread): the waiting reads fail, the mount goes, and the daemon ends — without waiting for
/// the layers to finish streaming.
#[test]
fn an_outside_lazy_umount_while_reads_wait_for_the_layers_ends_them_and_the_daemon() {
    let HeldStream {
        guard, proxy, pids, ..
    } = &held_stream("stream/detached");
    // More readers than the mount has dispatch threads (4).
    let readers: Vec<_> = [
        "data/big",
        "data/small",
        "etc/hello",
        "etc/none",
        "data",
        "etc",
    ]
    .iter()
    .map(|p| {
        let p = guard.path(p);
        std::thread::spawn(move || std::fs::metadata(&p).and_then(|_| std::fs::read(&p)))
    })
    .collect();
    let umount = std::process::Command::new("umount")
        .arg("-l")
        .arg(&guard.dir)
        .status()
        .unwrap();
    assert!(umount.success(), "umount -l: {umount}");
    for r in readers {
        let got = within(Duration::from_secs(20), move || r.join().unwrap())
            .expect("a read still waits 20 s after the mount was detached");
        assert!(got.is_err(), "a read of a detached mount was served");
    }
    assert!(
        wait_gone(pids, Duration::from_secs(20)),
        "daemon still alive: {pids:?}"
    );
    assert!(mount_at(&guard.dir).is_none());
    assert_eq!(
        proxy.faults.blob_bytes.load(Ordering::SeqCst),
        0,
        "the layer was never served"
    );
    proxy.release();
}

#[test]
fn a_serving_process_killed_while_layers_stream_is_replaced() {
    let reg = Registry::start(RegistryOpts::default());
    let (image, big) = streamed_image("stream/killed", &reg);
    let proxy = FaultyProxy::start(reg.addr(), &image.layers[0].digest);
    proxy.hold();
    let reference = format!("{}/stream/killed:v1", proxy.addr());
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    mount(&cli, &reference, &guard.dir, "nobackground");
    let p = guard.path("data/big");
    let reader = std::thread::spawn(move || std::fs::read(p));
    proxy.wait_for_held_request();
    let old = cli.serving(&guard.dir).expect("a serving process").0;
    kill(old, "KILL");
    assert!(
        wait_gone(&[old], Duration::from_secs(10)),
        "{old} still alive"
    );
    // The holder starts a process that streams the layers again and answers the read the
    // dead one had taken.
    proxy.release();
    let got = within(Duration::from_secs(60), move || reader.join().unwrap())
        .expect("read still blocked 60 s after the serving process was replaced");
    assert!(got.expect("read data/big") == big, "data/big differs");
    let new = cli.serving(&guard.dir).expect("a serving process").0;
    assert_ne!(new, old);
    assert!(alive(new));
}
