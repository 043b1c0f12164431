//! Prometheus metrics of a mount, scraped by a real Prometheus server and read back through
//! its HTTP API.

mod common;

use std::time::Duration;

use common::mount::{run, show, wait_mounted, MountGuard};
use common::*;

#[test]
fn prometheus_scrapes_a_mounts_metrics() {
    let reg = Registry::start(RegistryOpts::default());
    let data = bytes(9, 300_000);
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("d", 0o755)
                .file("d/data", &data, 0o644)
                .build(Compression::Gzip),
        )
        .build(ManifestFlavour::Oci);
    reg.push_image("metrics/app", "v1", &image, &Auth::None);
    let reference = format!("{}/metrics/app:v1", reg.addr());
    // Indexes bound to the image, so the mount reads by range from the first read.
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
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("http://{addr}/metrics")));
    assert!(wait_mounted(&guard.dir, Duration::from_secs(5)).is_some());
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
