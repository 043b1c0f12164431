//! Registries that misbehave, against a real `docker-registry` process: one that answers 500 for
//! a layer's bytes (through a faulty reverse proxy in front of it) must give EIO within the
//! mount's read timeout, with the cause in the daemon's log, and serve again once it recovers;
//! and an eStargz TOC one image vouches for must never serve another image that has the same
//! layer blob but does not pin that TOC.
//!
//! Needs root and FUSE (test 1), and containerd with `ctr-remote` (test 2): a missing tool fails
//! the test.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mount::*;
use common::*;

/// A reverse proxy in front of a registry, one request per connection, that answers 500 to every
/// request for one blob while `failing` is set, and relays everything else.
struct FaultyProxy {
    port: u16,
    failing: Arc<AtomicBool>,
    /// 500s answered so far.
    failed: Arc<AtomicUsize>,
}

/// The body of the injected 500, so the daemon's log can be checked for the cause.
const INJECTED: &str = "injected by the test proxy";

impl FaultyProxy {
    fn start(upstream: String, blob: &str) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let failing = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let suffix = format!("/blobs/{blob}");
        let (f, n) = (failing.clone(), failed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (f, n, up, suffix) = (f.clone(), n.clone(), upstream.clone(), suffix.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &up, &suffix, &f, &n);
                });
            }
        });
        FaultyProxy {
            port,
            failing,
            failed,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Reads one request; answers 500 itself (a blob request while failing) or forwards it to
/// `upstream` with `Connection: close` and pipes the answer back.
fn relay(
    client: TcpStream,
    upstream: &str,
    suffix: &str,
    failing: &AtomicBool,
    failed: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let body = common::proxy::read_headers_and_body(&mut reader, &mut head)?;
    let mut client = client;
    if failing.load(Ordering::SeqCst) && path.ends_with(suffix) {
        failed.fetch_add(1, Ordering::SeqCst);
        let msg = format!(r#"{{"errors":[{{"code":"UNKNOWN","message":"{INJECTED}"}}]}}"#);
        write!(
            client,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        if method != "HEAD" {
            client.write_all(msg.as_bytes())?;
        }
        return client.shutdown(Shutdown::Write);
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    std::io::copy(&mut up, &mut client)?;
    client.shutdown(Shutdown::Both)
}

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

    proxy.failing.store(true, Ordering::SeqCst);
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
        proxy.failed.load(Ordering::SeqCst) > 0,
        "the proxy answered no 500: the read failed for another reason"
    );
    // The whole read, the kernel's immediate retry included, ends within the read timeout.
    assert!(
        elapsed < Duration::from_secs(READ_TIMEOUT + 1),
        "EIO only after {elapsed:?} with read_timeout={READ_TIMEOUT}"
    );
    eprintln!(
        "EIO after {elapsed:?} ({} answers of 500)",
        proxy.failed.load(Ordering::SeqCst)
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
    proxy.failing.store(false, Ordering::SeqCst);
    let failed = proxy.failed.load(Ordering::SeqCst);
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
    assert_eq!(proxy.failed.load(Ordering::SeqCst), failed);
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
        ctd.ctr_ok(&["images", "push", "--plain-http", &ref_a]);
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
