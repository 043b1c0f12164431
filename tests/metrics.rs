//! Prometheus metrics of a mount, scraped by a real Prometheus server and read back through
//! its HTTP API.

mod common;
mod mount_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mount_support::{run, show, wait_mounted, MountGuard};

/// A Prometheus server scraping `target` every second; stopped on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stratafs\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus, installed by .ci/setup)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of the first series `query` returns, once there is one (within a minute).
    fn value(&self, query: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        loop {
            let answer = ureq::get(&url)
                .query("query", query)
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(v) = answer
                .as_ref()
                .and_then(|a| a["data"]["result"][0]["value"][1].as_str())
            {
                return v.parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no {query} in Prometheus: {answer:?}; log: {}",
                std::fs::read_to_string(self._dir.path().join("prometheus.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

    let body = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        body.contains("stratafs_fuse_operations_total{op=\"read\"}"),
        "{body}"
    );
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
