//! Shared integration-test harness for `stratafs`.
//!
//! * [`registry`]: a real `docker-registry` (CNCF distribution 2.8) process
//!   per test, with access-log parsing.
//! * [`image`]: deterministic, pure-Rust construction of layers, image
//!   configs, manifests and indexes.
//! * [`push`]: pushing (and fetching) blobs and manifests over the
//!   registry HTTP API.
//! * [`token`]: an in-process token issuer for the registry's `auth.token`
//!   mode.
//! * [`skopeo`]: zstd:chunked conversion with the real `skopeo`.
//! * [`containerd`]: a private `containerd` per test, driven with `ctr` /
//!   `ctr-remote`.
//! * [`prometheus`]: a real Prometheus server scraping one target.
//! * [`snapshotter`]: a `stratafs snapshotter` process per test.
//! * [`cri`]: a small client of containerd's CRI gRPC API (what kubelet speaks).
//! * [`faulty`]: a reverse proxy that fails, holds or corrupts one blob's answers.
//! * [`mount`]: commands with deadlines, the mount table, a mount's daemon processes, and a
//!   guard that always leaves a mountpoint unmounted.
//!
//! Each test file includes this with `mod common;`; not every test uses
//! every helper, hence the blanket `dead_code` allowance (and the
//! `unused_imports` allowance on the re-exports).
#![allow(dead_code)]

pub mod cli;
pub mod containerd;
pub mod cri;
pub mod faulty;
pub mod hostfs;
pub mod image;
pub mod mount;
pub mod prometheus;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod skopeo;
pub mod snapshotter;
pub mod token;
pub mod tricky;

#[allow(unused_imports)]
pub use cli::Stratafs;
#[allow(unused_imports)]
pub use containerd::{Containerd, ContainerdOpts};
#[allow(unused_imports)]
pub use image::{
    bytes, compress, docker_media_type, oci_media_type, Compression, Entry, EntryKind, Image,
    ImageBuilder, Index, IndexBuilder, Layer, LayerBuilder, ManifestFlavour, Platform,
    DOCKER_CONFIG, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
#[allow(unused_imports)]
pub use prometheus::Prometheus;
#[allow(unused_imports)]
pub use proxy::ForwardProxy;
#[allow(unused_imports)]
pub use push::{
    get_blob, get_manifest, get_manifest_accept, push_blob, push_image, push_index, push_manifest,
    request, Auth, Response, HARNESS_UA, MANIFEST_ACCEPT,
};
#[allow(unused_imports)]
pub use registry::{parse_access_line, AccessEntry, Registry, RegistryOpts, TestCa, TlsFiles};
#[allow(unused_imports)]
pub use snapshotter::Snapshotter;
#[allow(unused_imports)]
pub use token::{Grant, TokenAuthConfig, TokenRequest, TokenServer, TokenServerOpts};

use sha2::{Digest, Sha256};
use std::net::TcpListener;

/// `image` pushed as `REPO:v1` to a fresh registry, and a fresh store that built its layer
/// indexes but holds no chunks (reads go to the registry): (registry, store, reference).
pub fn pushed_and_indexed(repo: &str, image: &Image) -> (Registry, Stratafs, String) {
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image(repo, "v1", image, &Auth::None);
    let reference = format!("{}/{repo}:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &reference]);
    cli.ok(&["cache", "prune", "--max-size", "0"]);
    (reg, cli, reference)
}

/// `"sha256:<hex>"` digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Stops `child`: SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
pub fn terminate(mut child: std::process::Child, grace: std::time::Duration) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Layer blob bytes `registry` served since log `mark`, per blob digest (GETs of `/blobs/`).
pub fn blob_bytes_served(
    registry: &Registry,
    mark: usize,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for e in registry.access_log_since(mark) {
        if e.method == "GET" && e.path.contains("/blobs/") {
            let digest = e.path.rsplit('/').next().unwrap_or_default().to_string();
            *out.entry(digest).or_default() += e.bytes;
        }
    }
    out
}

/// Of `image`'s layers: the blob bytes `registry` served since `mark`, the bytes the layers
/// hold, and what was served per blob (for messages).
pub fn image_layers_served(
    registry: &Registry,
    mark: usize,
    image: &Image,
) -> (u64, u64, std::collections::BTreeMap<String, u64>) {
    let served = blob_bytes_served(registry, mark);
    let total: u64 = image.layers.iter().map(|l| l.blob.len() as u64).sum();
    let fetched: u64 = image
        .layers
        .iter()
        .map(|l| served.get(&l.digest).copied().unwrap_or(0))
        .sum();
    eprintln!("registry served {fetched} of {total} layer bytes");
    (fetched, total, served)
}

/// A loopback TCP port that was free a moment ago (bind to port 0, read the
/// port, release it). Callers must tolerate the rare race with another
/// process grabbing it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The Prometheus text page a stratafs process serves at `addr` (`--metrics-address`).
pub fn scrape(addr: &str) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// How many FUSE requests `op` the mount whose metrics are at `addr` has answered (0 before
/// its first).
pub fn fuse_ops(addr: &str, op: &str) -> u64 {
    let prefix = format!("stratafs_fuse_operations_total{{op=\"{op}\"}} ");
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}
