//! The metadata of a lazy pull from containerd's content store (`snapshotter/content.rs`),
//! against an in-memory content service on a unix socket.

use super::*;

/// A blob in [`FakeContent`]: its labels and bytes.
type Blob = (HashMap<String, String>, Vec<u8>);

/// containerd's content store, in memory: blobs by digest with their labels, per namespace.
#[derive(Default)]
struct FakeContent {
    /// (namespace, digest) → blob.
    blobs: Mutex<HashMap<(String, String), Blob>>,
    reads: std::sync::atomic::AtomicUsize,
}

type ContentStream<T> =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl crate::snapshotter::content::proto::content_server::Content for Arc<FakeContent> {
    type ListStream = ContentStream<crate::snapshotter::content::proto::ListContentResponse>;
    async fn list(
        &self,
        request: tonic::Request<crate::snapshotter::content::proto::ListContentRequest>,
    ) -> Result<tonic::Response<Self::ListStream>, Status> {
        let ns = namespace_of(&request)?;
        // The one filter the snapshotter sends: a label's presence.
        let filter = request.into_inner().filters.join(",");
        let key = filter
            .strip_prefix("labels.\"")
            .and_then(|f| f.strip_suffix('"'))
            .ok_or_else(|| Status::invalid_argument(filter.clone()))?
            .to_string();
        let info = self
            .blobs
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), (labels, _))| *n == ns && labels.contains_key(&key))
            .map(
                |((_, d), (labels, bytes))| crate::snapshotter::content::proto::Info {
                    digest: d.clone(),
                    size: bytes.len() as i64,
                    labels: labels.clone(),
                    ..Default::default()
                },
            )
            .collect();
        let reply = crate::snapshotter::content::proto::ListContentResponse { info };
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            [Ok(reply)],
        ))))
    }
    type ReadStream = ContentStream<crate::snapshotter::content::proto::ReadContentResponse>;
    async fn read(
        &self,
        request: tonic::Request<crate::snapshotter::content::proto::ReadContentRequest>,
    ) -> Result<tonic::Response<Self::ReadStream>, Status> {
        let ns = namespace_of(&request)?;
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let digest = request.into_inner().digest;
        let bytes = self
            .blobs
            .lock()
            .unwrap()
            .get(&(ns, digest.clone()))
            .map(|(_, b)| b.clone())
            .ok_or_else(|| Status::not_found(digest))?;
        // In two pieces, as a stream may come.
        let half = bytes.len() / 2;
        let parts = [bytes[..half].to_vec(), bytes[half..].to_vec()].map(|data| {
            Ok(crate::snapshotter::content::proto::ReadContentResponse { offset: 0, data })
        });
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            parts,
        ))))
    }
}

fn namespace_of<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    request
        .metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| Status::failed_precondition("no namespace"))
}

/// Serves `content` at `socket` until the test ends.
fn serve_content(content: Arc<FakeContent>, socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                crate::snapshotter::content::proto::content_server::ContentServer::new(content),
            )
            .serve_with_incoming(incoming),
    );
}

/// A lazy pull reads the image's manifest and config from containerd's content store, not
/// the registry: found by CRI's manifest label, or for ctr-remote's labels as the one manifest
/// of the repository there that lists the layers. Content that does not match its digest,
/// or two manifests that fit, send it to the registry as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_pull_reads_the_images_metadata_from_containerds_content_store() {
    let registry = Arc::new(FakeRegistry::new());
    let (_, layer) = crate::fs::tests::push(&registry, &crate::fs::tests::files());
    let scratch = tempfile::tempdir().unwrap();
    let record = crate::fs::tests::pull(&registry, scratch.path()).await;
    let chain = record.layers[0].chain_id.to_string();
    let store = Store::open(scratch.path()).unwrap();
    let blob = |d: &oci_spec::image::Digest| store.content.get(d).unwrap();
    let (manifest, config) = (blob(&record.manifest.digest), blob(&record.config.digest));
    let image = format!("registry.test/{}:v1", crate::fs::tests::REPO);
    let source = (
        "containerd.io/distribution.source.registry.test".to_string(),
        format!("other/repo,{}", crate::fs::tests::REPO),
    );
    let content = Arc::new(FakeContent::default());
    let put = |digest: &oci_spec::image::Digest, bytes: &[u8]| {
        content.blobs.lock().unwrap().insert(
            ("k8s.io".into(), digest.to_string()),
            (HashMap::from([source.clone()]), bytes.to_vec()),
        );
    };
    put(&record.manifest.digest, &manifest);
    put(&record.config.digest, &config);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    serve_content(content.clone(), &socket);
    let resolver = |root: &Path| {
        let (mut s, _) = snapshotter_over(root, registry.clone());
        s.resolver.content = Some(crate::snapshotter::content::ContentStore::new(&socket));
        s
    };
    let stargz = HashMap::from([
        (LABEL_TARGET.to_string(), chain.clone()),
        (
            "containerd.io/snapshot/remote/stargz.reference".to_string(),
            image.clone(),
        ),
        (
            "containerd.io/snapshot/remote/stargz.digest".to_string(),
            layer.to_string(),
        ),
        (
            "containerd.io/snapshot/remote/stargz.layers".to_string(),
            layer.to_string(),
        ),
    ]);
    let mut cri = cri_labels(&image, layer.as_ref(), Some(&chain));
    cri.insert(CRI_MANIFEST.into(), record.manifest.digest.to_string());
    for labels in [&stargz, &cri] {
        let root = tempfile::tempdir().unwrap();
        let s = resolver(root.path());
        let before = registry.requests();
        let (lazy, top) = s
            .resolver
            .resolve(&chain, labels, Some("k8s.io"))
            .await
            .unwrap();
        assert_eq!((lazy.digest.as_str(), top), (layer.as_ref(), true));
        let r = registry.requests();
        assert_eq!(
            (r.manifests - before.manifests, r.blobs - before.blobs),
            (0, 0),
            "the registry was asked: {labels:?}"
        );
        let stored = s.resolver.store.images.get(&lazy.image).unwrap().unwrap();
        assert_eq!(stored.manifest.digest, record.manifest.digest);
        // Another namespace has none of it: the registry.
        let root = tempfile::tempdir().unwrap();
        let s = resolver(root.path());
        s.resolver
            .resolve(&chain, labels, Some("other"))
            .await
            .unwrap();
        assert!(registry.requests().manifests > r.manifests);
    }
    // A second manifest of the repository listing the same layers: which one is containerd's
    // is not known from ctr-remote's labels, so the registry is asked.
    let twin = String::from_utf8(manifest.clone())
        .unwrap()
        .replacen('{', "{ ", 1);
    put(&crate::digest::sha256(twin.as_bytes()), twin.as_bytes());
    let root = tempfile::tempdir().unwrap();
    let s = resolver(root.path());
    let before = registry.requests();
    s.resolver
        .resolve(&chain, &stargz, Some("k8s.io"))
        .await
        .unwrap();
    assert_eq!(registry.requests().manifests, before.manifests + 1);
    // Content that does not match its digest is not used.
    content
        .blobs
        .lock()
        .unwrap()
        .get_mut(&("k8s.io".into(), record.config.digest.to_string()))
        .unwrap()
        .1[0] ^= 1;
    let root = tempfile::tempdir().unwrap();
    let s = resolver(root.path());
    let before = registry.requests();
    s.resolver
        .resolve(&chain, &cri, Some("k8s.io"))
        .await
        .unwrap();
    assert_eq!(registry.requests().manifests, before.manifests + 1);
}
