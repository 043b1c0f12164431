//! Prometheus metrics of a mount, scraped by a real Prometheus server and read back through
//! its HTTP API.

mod common;

use std::time::Duration;

use common::mount::{run, show, wait_mounted, MountGuard};
use common::*;

#[test]
fn prometheus_scrapes_a_mounts_metrics() {
    let data = bytes(9, 300_000);
    let layer = LayerBuilder::new()
        .dir("d", 0o755)
        .file("d/data", &data, 0o644)
        .build(Compression::Gzip);
    let (_reg, image, cli, guard, addr, out) = mounted_with_metrics("metrics/app", layer);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("http://{addr}/metrics")));
    assert!(std::fs::read(guard.path("/d/data")).unwrap() == data);

    let body = scrape(&addr);
    assert!(
        body.contains("stratafs_fuse_operations_total{op=\"read\"}"),
        "{body}"
    );
    // A close asks nothing of the daemon: the first FLUSH is answered ENOSYS, and the kernel
    // sends no more (a read-only tree has nothing to flush).
    for _ in 0..5 {
        assert!(std::fs::read(guard.path("/d/data")).unwrap() == data);
    }
    assert_eq!(fuse_ops(&addr, "flush"), 1, "FLUSH requests after 6 closes");
    let prometheus = Prometheus::start(&addr);
    let layer = &image.layers[0].digest;
    let fetched = prometheus.value(&format!(
        "stratafs_layer_fetched_bytes_total{{layer=\"{layer}\"}}"
    ));
    assert!(
        fetched > 0.0 && fetched <= image.layers[0].size() as f64,
        "{fetched}"
    );
    assert!(prometheus.value("sum(stratafs_fuse_operations_total{op=\"read\"})") >= 1.0);
    assert!(
        prometheus.value("sum(stratafs_read_duration_seconds_count{source=\"registry\"})") >= 1.0
    );
    assert!(prometheus.value("sum(stratafs_registry_requests_total{status=\"206\"})") >= 1.0);
    assert_eq!(
        prometheus.value(&format!("stratafs_layer_complete{{layer=\"{layer}\"}}")),
        1.0,
        "the whole (small) layer was read"
    );
    assert!(prometheus.value("stratafs_cache_cap_bytes") > 0.0);
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}

/// A one-layer image of `layer`, pushed to a fresh registry as `REPO:v1` with its indexes
/// bound (so a mount reads by range from the first read), and mounted without background
/// fill, its metrics served: the registry, the image, the store's CLI, the mount, the metrics
/// address and `stratafs mount`'s output.
fn mounted_with_metrics(
    repo: &str,
    layer: Layer,
) -> (
    Registry,
    Image,
    Stratafs,
    MountGuard,
    String,
    std::process::Output,
) {
    let reg = Registry::start(RegistryOpts::default());
    let image = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
    reg.push_image(repo, "v1", &image, &Auth::None);
    let reference = format!("{}/{repo}:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    let addr = format!("127.0.0.1:{}", free_port());
    let out = run(
        cli.command()
            .args(["mount", "-o", "nobackground", "--metrics-address", &addr])
            .arg(&reference)
            .arg(&guard.dir),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(wait_mounted(&guard.dir, Duration::from_secs(5)).is_some());
    (reg, image, cli, guard, addr, out)
}

/// The value of counter `name` at `addr` (0 before its first).
fn counter(addr: &str, name: &str) -> u64 {
    let prefix = format!("{name} ");
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until the mount at `addr` has answered `n` RELEASEs (the kernel sends a close's
/// RELEASE after `close` returns).
fn released(addr: &str, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fuse_ops(addr, "release") < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} RELEASEs not answered in 10 s"
        );
        std::thread::yield_now();
    }
}

/// A cached file reaches the kernel's page cache at its first open: a small file whose bytes
/// the daemon holds is handed over whole before the open is answered, and its reads then ask
/// the daemon nothing. It is handed over once per kernel inode: later opens are answered at
/// once; pages the kernel drops while it keeps the inode are read through the daemon; once
/// the kernel forgets the inode, the next open hands the file over again. Every byte read
/// back is the file's.
#[test]
fn a_cached_small_file_reaches_the_page_cache_once_per_kernel_inode() {
    let small = bytes(21, 150_000);
    let layer = LayerBuilder::new()
        .file("small", &small, 0o644)
        .build(Compression::Gzip);
    let (_reg, _image, cli, guard, addr, _) = mounted_with_metrics("pages/app", layer);
    let pushed = || counter(&addr, "stratafs_page_cache_pushed_bytes_total");
    let reads = || fuse_ops(&addr, "read");
    let path = guard.path("/small");

    // A first read fetches it (nothing cached at its open: nothing handed over).
    assert!(std::fs::read(&path).unwrap() == small);
    assert_eq!(pushed(), 0);
    released(&addr, 1);
    // The next open finds no handle open and all of it cached: the kernel has it before the
    // open returns.
    let before = reads();
    assert!(std::fs::read(&path).unwrap() == small);
    assert_eq!(pushed(), small.len() as u64);
    assert_eq!(
        reads(),
        before,
        "reads of the handed-over file that reached the daemon"
    );
    released(&addr, 2);
    // Opened again, its pages still there: not handed over again, and read from them.
    assert!(std::fs::read(&path).unwrap() == small);
    assert_eq!(pushed(), small.len() as u64, "handed over again");
    assert_eq!(
        reads(),
        before,
        "reads of the cached pages that reached the daemon"
    );
    released(&addr, 3);
    // Its pages dropped while the kernel keeps the inode: read through the daemon.
    let file = std::fs::File::open(&path).unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    drop(file);
    released(&addr, 4);
    assert!(std::fs::read(&path).unwrap() == small);
    assert!(
        reads() > before,
        "the dropped pages were not read through the daemon"
    );
    assert_eq!(pushed(), small.len() as u64);
    released(&addr, 5);
    // The kernel forgets the inode (unused dentries and inodes dropped): the next open hands
    // the file over again.
    let forgets = fuse_ops(&addr, "forget");
    std::fs::write("/proc/sys/vm/drop_caches", "2")
        .expect("dropping the kernel's dentries and inodes (root and a writable /proc/sys)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fuse_ops(&addr, "forget") == forgets {
        assert!(
            std::time::Instant::now() < deadline,
            "no FORGET answered in 10 s after the kernel dropped its inodes"
        );
        std::thread::yield_now();
    }
    let before = reads();
    assert!(std::fs::read(&path).unwrap() == small);
    assert_eq!(pushed(), 2 * small.len() as u64);
    assert_eq!(
        reads(),
        before,
        "reads of the file handed over again that reached the daemon"
    );
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}
