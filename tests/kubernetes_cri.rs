//! The Kubernetes path, for real: containerd 1.6's own CRI plugin configured with
//! `snapshotter = "stratafs"` and `disable_snapshot_annotations = false` (as a node operator
//! would), driven over the CRI gRPC API the way kubelet drives it — `PullImage`,
//! `RunPodSandbox`, `CreateContainer`, `StartContainer`, `ContainerStatus` — with the
//! registry reached through containerd's `hosts.toml`. The image's layers must be served
//! lazily (the registry's access log), the container's output right (its CRI log file), and
//! the snapshotter's Prometheus endpoint, scraped by a real Prometheus, must cover the lazy
//! mounts it started.

mod common;

use std::time::Duration;

use common::cri::{host_network_pod, ContainerConfig, ContainerMetadata, Cri, ImageSpec};
use common::*;

/// Incompressible-ish filler per layer, so the layers are large next to what is read.
const FILLER: usize = 12 * 1024 * 1024;

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// containerd's CRI plugin: stratafs as its snapshotter, remote-snapshotter labels passed,
/// our pause image, registries configured only through `config_path` (hosts.toml).
fn cri_toml(sandbox_image: &str, certs: &std::path::Path, cni: &std::path::Path) -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # This machine's root has no CAP_SYS_RESOURCE, so the sandbox's oom_score_adj of -998 cannot
  # be set: keep every score at or above containerd's own (as rootless setups do).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "stratafs"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        certs = certs.display(),
        cni = cni.display(),
    )
}

#[test]
fn cri_pulls_and_runs_pods_lazily_through_the_snapshotter() {
    if let Some(why) = Containerd::unavailable() {
        panic!("containerd cannot run: {why}");
    }
    let reg = Registry::start(RegistryOpts::default());
    let dir = tempfile::tempdir().unwrap();

    // The pause image (kubelet's sandbox), and an application image of two gzip layers,
    // each with bound stratafs indexes so gzip layers are read by range.
    let pause = ImageBuilder::new()
        .arch(hostfs::host_arch())
        .layer(hostfs::base_layer(0, Compression::Gzip))
        .cmd(&["/bin/sleep", "infinity"])
        .build(ManifestFlavour::Oci);
    let app = hostfs::two_layer_image(FILLER, b"hello from a pod\n");
    let mut refs = Vec::new();
    for (repo, image) in [("k8s/pause", &pause), ("k8s/app", &app)] {
        reg.push_image(repo, "v1", image, &Auth::None);
        let reference = format!("{}/{repo}:v1", reg.addr());
        Stratafs::new().ok(&["index", "push", "--bind", &reference]);
        refs.push(reference);
    }
    let (pause_ref, app_ref) = (&refs[0], &refs[1]);

    // containerd reaches the plain-HTTP registry only because hosts.toml says so.
    let host_dir = dir.path().join("certs.d").join(reg.addr());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{0}\"\n\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr()
        ),
    )
    .unwrap();
    for d in ["cni/bin", "cni/conf", "pods"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let sn = Snapshotter::start_with(&["--metrics-address", &metrics_addr]);
    let ctd = Containerd::start_with(ContainerdOpts {
        proxy_snapshotters: vec![("stratafs".into(), sn.socket.clone())],
        extra_toml: cri_toml(
            pause_ref,
            &dir.path().join("certs.d"),
            &dir.path().join("cni"),
        ),
        cri: true,
    });
    let cri = Cri::connect(&ctd.address());
    let version = cri.version();
    assert_eq!(version.runtime_name, "containerd", "{version:?}");

    let mark = reg.log_mark();
    let log_dir = dir.path().join("pods/web");
    let pod = host_network_pod("web", &log_dir);
    let image_ref = cri.pull_image(app_ref, &pod);
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- snapshotter log:\n{}\n--- containerd log:\n{}",
            sn.log(),
            ctd.log_contents()
        )
    };
    let sandbox = cri
        .run_pod_sandbox(&pod)
        .unwrap_or_else(|s| panic!("{}", fail(&format!("RunPodSandbox: {s:?}"))));
    // The pod goes whatever happens below (its pause process would outlive the test).
    let pod_guard = PodGuard {
        cri: &cri,
        id: sandbox.clone(),
    };
    let container = cri.create_container(
        &sandbox,
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: app_ref.clone(),
            }),
            command: vec!["/bin/sh".into(), "-c".into()],
            args: vec!["cat /etc/msg && sha256sum /opt/small".into()],
            log_path: "app.log".into(),
        },
        &pod,
    );
    cri.start_container(&container);
    let status = cri.wait_exited(&container, Duration::from_secs(60));
    assert_eq!(status.exit_code, 0, "{}", fail(&format!("{status:?}")));

    // CRI log lines: "<time> stdout F <text>".
    let log = std::fs::read_to_string(log_dir.join("app.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    assert_eq!(
        lines,
        [
            "hello from a pod".to_string(),
            format!("{}  /opt/small", sha256_hex(&bytes(13, 20_000)))
        ],
        "{}",
        fail(&log)
    );

    // Lazy: the app's layers (and the pause image's) were mounted by stratafs, and the
    // registry served a fraction of their bytes.
    let (blob_bytes, layer_bytes, served) = image_layers_served(&reg, mark, &app);
    assert!(
        blob_bytes * 3 < layer_bytes,
        "served {blob_bytes} of {layer_bytes} layer bytes: {served:?}\n{}",
        fail("")
    );
    let log = sn.log();
    for layer in app.layers.iter().chain(&pause.layers) {
        assert!(
            log.contains(&format!("layer={}", layer.digest)) && log.contains("lazy layer"),
            "{} not served lazily:\n{log}",
            layer.digest
        );
    }
    // From the manifest CRI resolved the tag to (its label), not whatever the tag names now:
    // the bound one `index push --bind` tagged.
    let manifest = reg.get_manifest("k8s/app", "v1", &Auth::None);
    assert_eq!(manifest.status, 200);
    let pinned = format!(
        "app:v1@{} layer={}",
        sha256_digest(&manifest.body),
        app.layers[0].digest
    );
    assert!(
        log.lines()
            .any(|l| l.contains("lazy layer") && l.contains(&pinned)),
        "the app's pull was not pinned to its manifest ({pinned}):\n{log}"
    );

    // One endpoint covers the snapshotter and its mounts.
    let prometheus = Prometheus::start(&metrics_addr);
    let lazy = prometheus.value("stratafs_snapshotter_layers_total{mode=\"lazy\"}");
    assert!(lazy >= 2.0, "{lazy} lazy layers");
    assert!(prometheus.value("sum(stratafs_fuse_operations_total{op=\"read\"})") >= 1.0);
    let fetched = prometheus.value(&format!(
        "stratafs_layer_fetched_bytes_total{{layer=\"{}\"}}",
        app.layers[1].digest
    ));
    assert!(fetched > 0.0 && fetched <= layer_bytes as f64, "{fetched}");

    std::mem::forget(pod_guard);
    cri.remove_pod_sandbox(&sandbox)
        .unwrap_or_else(|s| panic!("removing the pod: {s:?}"));
}

/// Stops and removes a pod sandbox when dropped (on a failed assertion).
struct PodGuard<'a> {
    cri: &'a Cri,
    id: String,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        let _ = self.cri.remove_pod_sandbox(&self.id);
    }
}
