//! A registry that redirects blob GETs to a CDN or object store (the real distribution
//! registry with its `redirect` storage middleware; the store is a small file server over the
//! registry's storage, on another loopback address, that refuses requests carrying credentials
//! as S3 does): range reads of a blob go to the store directly once the registry has pointed
//! there, without the registry's credentials, and back through the registry when the store
//! fails (an expired signature).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::mount::MountGuard;
use common::*;
use stratafs::reference::Reference;
use stratafs::registry::RegistryClient;

/// One request the store answered.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    range: Option<String>,
    authorization: bool,
    status: u16,
}

/// The object store: serves `root` (set once the registry exists) by path, with ranges.
struct ObjectStore {
    base: String,
    root: Arc<Mutex<Option<PathBuf>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Requests still to refuse with 403, as for an expired signature.
    refuse: Arc<AtomicUsize>,
    /// Range requests still to answer with the blob's first bytes (a 206 for another range).
    misrange: Arc<AtomicUsize>,
    _server: Arc<tiny_http::Server>,
}

impl ObjectStore {
    fn start() -> ObjectStore {
        // Another host than the registry's 127.0.0.1: a CDN is elsewhere.
        let server = Arc::new(tiny_http::Server::http("127.0.0.2:0").expect("bind 127.0.0.2"));
        let port = server.server_addr().to_ip().unwrap().port();
        let store = ObjectStore {
            base: format!("http://127.0.0.2:{port}"),
            root: Arc::default(),
            hits: Arc::default(),
            refuse: Arc::default(),
            misrange: Arc::default(),
            _server: server.clone(),
        };
        let (root, hits) = (store.root.clone(), store.hits.clone());
        let (refuse, misrange) = (store.refuse.clone(), store.misrange.clone());
        let take = |n: &AtomicUsize| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        std::thread::spawn(move || {
            for req in server.incoming_requests() {
                let header = |name: &'static str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.to_string())
                };
                let (range, authorization) = (header("Range"), header("Authorization").is_some());
                let path = req.url().split('?').next().unwrap_or("").to_string();
                let (status, body, content_range) = if authorization {
                    (400, b"only one auth mechanism allowed".to_vec(), None)
                } else if take(&refuse) {
                    (403, b"request has expired".to_vec(), None)
                } else {
                    let root = root.lock().unwrap().clone().expect("store root set");
                    match std::fs::read(root.join(path.trim_start_matches('/'))) {
                        Err(_) => (404, Vec::new(), None),
                        Ok(data) => match range.as_deref().and_then(parse_range) {
                            Some((from, to)) if take(&misrange) => {
                                let len = (to - from + 1).min(data.len() as u64);
                                let part = data[..len as usize].to_vec();
                                (
                                    206,
                                    part,
                                    Some(format!("bytes 0-{}/{}", len - 1, data.len())),
                                )
                            }
                            Some((from, to)) if from < data.len() as u64 => {
                                let to = to.min(data.len() as u64 - 1);
                                let part = data[from as usize..=to as usize].to_vec();
                                (206, part, Some(format!("bytes {from}-{to}/{}", data.len())))
                            }
                            _ => (200, data, None),
                        },
                    }
                };
                hits.lock().unwrap().push(Hit {
                    path,
                    range,
                    authorization,
                    status,
                });
                let mut resp = tiny_http::Response::from_data(body).with_status_code(status);
                if let Some(cr) = content_range {
                    resp = resp
                        .with_header(tiny_http::Header::from_bytes("Content-Range", cr).unwrap());
                }
                let _ = req.respond(resp);
            }
        });
        store
    }

    fn serve(&self, reg: &Registry) {
        *self.root.lock().unwrap() = Some(reg.data_dir());
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// `bytes=A-B`.
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The registry's GETs of blob `digest` since `mark`.
fn registry_gets(reg: &Registry, mark: usize, digest: &str) -> Vec<AccessEntry> {
    reg.access_log_since(mark)
        .into_iter()
        .filter(|e| e.method == "GET" && e.path.ends_with(digest))
        .collect()
}

/// A redirecting registry holding one blob, and a client reading ranges of it.
struct Redirected {
    store: ObjectStore,
    reg: Registry,
    blob: Vec<u8>,
    digest: String,
    reference: Reference,
    client: RegistryClient,
    rt: tokio::runtime::Runtime,
}

impl Redirected {
    fn new() -> Redirected {
        let store = ObjectStore::start();
        let reg = Registry::start(RegistryOpts {
            redirect: Some(store.base.clone()),
            ..Default::default()
        });
        store.serve(&reg);
        let layer = LayerBuilder::new()
            .file("blob.bin", &bytes(7, 1 << 20), 0o644)
            .build(Compression::Gzip);
        let image = ImageBuilder::new().layer(layer).build(ManifestFlavour::Oci);
        reg.push_image("cdn/app", "v1", &image, &Auth::None);
        let (blob, digest) = (image.layers[0].blob.clone(), image.layers[0].digest.clone());
        assert!(blob.len() > 720_000, "the reads below are inside the blob");
        Redirected {
            reference: format!("{}/cdn/app:v1", reg.addr()).parse().unwrap(),
            client: RegistryClient::new(Default::default(), BTreeMap::new(), true),
            rt: tokio::runtime::Runtime::new().unwrap(),
            store,
            reg,
            blob,
            digest,
        }
    }

    /// Reads `len` bytes at `offset` and checks them.
    fn read(&self, offset: u64, len: u64) {
        let digest: oci_spec::image::Digest = self.digest.parse().unwrap();
        let got = self
            .rt
            .block_on(
                self.client
                    .read_blob_range(&self.reference, &digest, offset, len),
            )
            .unwrap_or_else(|e| panic!("{e}: {:#?}", self.store.hits()));
        assert!(
            got[..] == self.blob[offset as usize..(offset + len) as usize],
            "bytes {offset}+{len} differ"
        );
    }

    /// The registry's GETs of the blob since `mark`.
    fn gets(&self, mark: usize) -> Vec<AccessEntry> {
        registry_gets(&self.reg, mark, &self.digest)
    }

    /// The statuses the store answered with since its `seen`th request.
    fn statuses(&self, seen: usize) -> Vec<u16> {
        self.store.hits()[seen..].iter().map(|h| h.status).collect()
    }
}

#[test]
fn range_reads_go_where_the_registry_redirected_until_that_fails() {
    let r = Redirected::new();
    let (mark, seen) = (r.reg.log_mark(), r.store.hits().len());

    // The first read asks the registry, which redirects; the next ones go to the store alone.
    r.read(0, 1000);
    let gets = r.gets(mark);
    assert_eq!(gets.len(), 1, "{gets:#?}");
    assert_eq!(gets[0].status, 307, "the registry redirects: {gets:#?}");
    for k in 1..6u64 {
        r.read(k * 100_000, 5_000 + k);
    }
    assert_eq!(
        r.gets(mark).len(),
        1,
        "later reads went to the store directly"
    );
    let hits = r.store.hits()[seen..].to_vec();
    assert_eq!(hits.len(), 6, "{hits:#?}");
    assert!(
        hits.iter()
            .all(|h| h.status == 206 && h.path.ends_with(&format!("{}/data", &r.digest[7..]))),
        "{hits:#?}"
    );
    assert_eq!(hits[3].range.as_deref(), Some("bytes=300000-305002"));

    // The signature expires: the store refuses, the read asks the registry again (and gets a
    // new location), and the bytes are right.
    r.store.refuse.store(1, Ordering::SeqCst);
    r.read(700_000, 20_000);
    assert_eq!(r.gets(mark).len(), 2, "asked the registry again");
    assert_eq!(
        r.statuses(seen + 6),
        [403, 206],
        "refused, then served after the registry's redirect"
    );
    r.read(650_000, 100);
    assert_eq!(r.gets(mark).len(), 2, "the new location is used");
}

#[test]
fn a_location_that_fails_at_its_first_direct_read_is_left_alone_for_a_while() {
    // A store whose signed URLs do not carry over to another range: each direct read would
    // fail first and cost two requests.
    let r = Redirected::new();
    let (mark, seen) = (r.reg.log_mark(), r.store.hits().len());
    r.read(0, 1000);
    r.store.refuse.store(1, Ordering::SeqCst);
    r.read(100_000, 1000);
    assert_eq!(r.statuses(seen), [206, 403, 206]);
    assert_eq!(r.gets(mark).len(), 2);
    // From now on (for 60 s) each read goes through the registry: one store request each.
    r.read(200_000, 1000);
    r.read(300_000, 1000);
    assert_eq!(r.statuses(seen), [206, 403, 206, 206, 206]);
    assert_eq!(r.gets(mark).len(), 4, "not sent to the location first");
}

#[test]
fn a_location_answering_another_range_is_not_trusted() {
    let r = Redirected::new();
    let (mark, seen) = (r.reg.log_mark(), r.store.hits().len());
    r.read(0, 1000);
    // The store sends the blob's first bytes for the next range asked of it: the read goes
    // through the registry instead, and its bytes are right.
    r.store.misrange.store(1, Ordering::SeqCst);
    r.read(300_000, 2000);
    assert_eq!(r.statuses(seen), [206, 206, 206]);
    assert_eq!(r.gets(mark).len(), 2, "asked the registry again");
}

#[test]
fn a_lazy_mount_reads_a_redirected_layer_from_the_store_without_sending_credentials() {
    let store = ObjectStore::start();
    let reg = Registry::start(RegistryOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        redirect: Some(store.base.clone()),
        ..Default::default()
    });
    store.serve(&reg);
    let mut b = LayerBuilder::new().dir("data", 0o755);
    for i in 0..8u64 {
        b = b.file(&format!("data/f{i}"), &bytes(200 + i, 512 << 10), 0o644);
    }
    let image = ImageBuilder::new()
        .layer(b.build(Compression::Gzip))
        .build(ManifestFlavour::Oci);
    let digest = image.layers[0].digest.clone();
    reg.push_image("cdn/files", "v1", &image, &Auth::basic("alice", "s3cret"));
    let reference = format!("{}/cdn/files:v1", reg.addr());
    let publisher = Stratafs::new();
    publisher.set_docker_login(&reg.addr(), "alice", "s3cret");
    publisher.ok(&["index", "push", "--bind", &reference]);

    let cli = Stratafs::new();
    cli.set_docker_login(&reg.addr(), "alice", "s3cret");
    let (mark, seen) = (reg.log_mark(), store.hits().len());
    let guard = MountGuard::lazy(&cli, &reference, "info");
    // Files far apart in the layer, each a miss of its own.
    for i in [0u64, 3, 6, 1, 7] {
        let got = std::fs::read(guard.path(&format!("/data/f{i}"))).unwrap();
        assert!(got == bytes(200 + i, 512 << 10), "data/f{i} differs");
    }
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
    let layer_hits: Vec<Hit> = store.hits()[seen..]
        .iter()
        .filter(|h| h.path.contains(&digest[7..]))
        .cloned()
        .collect();
    let gets = registry_gets(&reg, mark, &digest);
    assert!(
        layer_hits.len() >= 5 && layer_hits.iter().all(|h| h.status == 206),
        "the layer's ranges came from the store: {layer_hits:#?}"
    );
    // Only the misses before the first redirect came back ask the registry (1 here; without
    // locations, every one of them).
    assert!(
        gets.len() * 2 <= layer_hits.len(),
        "the registry was asked about the layer {} times for the store's {} ranges",
        gets.len(),
        layer_hits.len()
    );
    assert!(
        store.hits().iter().all(|h| !h.authorization),
        "no registry credentials reach the store: {:#?}",
        store.hits()
    );
}

#[test]
fn several_ranges_go_in_one_request_unless_the_answer_is_the_whole_blob() {
    // The store answers a request for several ranges with the whole blob (as object stores
    // that support one range do): that answer is dropped, the ranges are read one by one,
    // and the registry is not asked for several ranges at once again.
    let r = Redirected::new();
    let digest: oci_spec::image::Digest = r.digest.parse().unwrap();
    let ranges = [(10u64, 100u64), (300_000, 5_000), (700_000, 20_000)];
    let read = || {
        r.rt.block_on(r.client.read_blob_ranges(&r.reference, &digest, &ranges))
            .unwrap()
    };
    let seen = r.store.hits().len();
    let got = read();
    for (&(offset, len), data) in ranges.iter().zip(&got) {
        assert!(
            data[..] == r.blob[offset as usize..(offset + len) as usize],
            "bytes {offset}+{len} differ"
        );
    }
    let hits = r.store.hits()[seen..].to_vec();
    let several: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.range.as_deref().is_some_and(|v| v.contains(',')))
        .collect();
    assert_eq!(several.len(), 1, "{hits:#?}");
    assert_eq!(several[0].status, 200, "{hits:#?}");
    assert_eq!(
        hits.iter().filter(|h| h.status == 206).count(),
        3,
        "then one range each: {hits:#?}"
    );
    let seen = r.store.hits().len();
    assert_eq!(read(), got);
    let hits = r.store.hits()[seen..].to_vec();
    assert!(
        hits.len() == 3 && hits.iter().all(|h| h.status == 206),
        "remembered: one range each, from the start: {hits:#?}"
    );
}
