//! An image's manifest and config read from containerd's own content store instead of the
//! registry. containerd has fetched both by the time it asks for the first layer's snapshot
//! (it needs the config's diff_ids for the ChainIDs), and pulling them again from the registry
//! put two or more round trips (and a token request where the registry wants one) in front of
//! every lazy pull: 88–95 ms over the cold-start benchmark's 20 ms link.
//!
//! Which manifest: the one CRI's label names (`containerd.io/snapshot/cri.manifest-digest`);
//! for `ctr-remote images rpull`, whose labels name only the image reference and the layers
//! from this one up, the single manifest in the namespace's content store that containerd
//! fetched from the reference's repository (its `containerd.io/distribution.source.HOST`
//! label) and whose layers end with those — the one being unpacked is there; if another
//! matches too, the registry is asked as before. Everything read is checked against its digest
//! (a manifest is the manifest containerd resolved, by content), then goes through the same
//! pull code as the registry's answers would ([`Preloaded`]). Any failure — no socket, an
//! older containerd, content missing or not matching — falls back to the registry.
//!
//! Bounds: at most [`MAX_CANDIDATES`] entries of a repository are looked at, each read only
//! if at most [`MAX_MANIFEST`] bytes; a blob read is cut off at its expected size (at most
//! `MAX_MANIFEST`); the whole lookup is given up after [`TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::image::{Digest, ImageManifest};

use crate::reference::Reference;
use crate::registry::{At, Fetched, Registry, RegistryFuture, Sink};

/// The generated gRPC client for containerd's content service (and its server, for tests).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("containerd.services.content.v1");
}

/// Most content entries of a repository looked at for ctr-remote's manifest.
pub const MAX_CANDIDATES: usize = 64;
/// Largest manifest or config read.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// How long a lookup may take before the registry is asked instead.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// containerd's content store, at its gRPC socket.
#[derive(Clone, Debug)]
pub struct ContentStore {
    socket: PathBuf,
}

/// What identifies the image's manifest in containerd's content store.
pub enum Wanted<'a> {
    /// CRI's label: the manifest itself.
    Manifest(Digest),
    /// ctr-remote's labels: the repository it came from and all its layers, bottom first.
    Layers {
        reference: &'a Reference,
        layers: Vec<String>,
    },
}

/// A manifest and config read from the content store.
pub struct Found {
    pub manifest: Fetched,
    pub config: (Digest, Vec<u8>),
}

impl ContentStore {
    pub fn new(socket: &Path) -> ContentStore {
        ContentStore {
            socket: socket.to_path_buf(),
        }
    }

    /// The manifest and config `wanted` names in `namespace`, checked; `None` if the store
    /// cannot tell (the caller asks the registry).
    pub async fn find(&self, namespace: &str, wanted: Wanted<'_>) -> Option<Found> {
        match tokio::time::timeout(TIMEOUT, self.find_inner(namespace, wanted)).await {
            Ok(Ok(found)) => Some(found),
            Ok(Err(why)) => {
                tracing::debug!(socket = %self.socket.display(), %why, "image metadata not from containerd's content store: asking the registry");
                None
            }
            Err(_) => {
                tracing::debug!(socket = %self.socket.display(), "containerd's content store took too long: asking the registry");
                None
            }
        }
    }

    async fn find_inner(&self, namespace: &str, wanted: Wanted<'_>) -> Result<Found, String> {
        if !self.socket.exists() {
            return Err("no socket".into());
        }
        let mut client = self.client().await?;
        let (digest, bytes) = match wanted {
            Wanted::Manifest(digest) => {
                let bytes = read(&mut client, namespace, &digest, MAX_MANIFEST).await?;
                (digest, bytes)
            }
            Wanted::Layers { reference, layers } => {
                find_by_layers(&mut client, namespace, reference, &layers).await?
            }
        };
        let parsed: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| format!("manifest {digest}: {e}"))?;
        let media_type = parsed
            .media_type()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| crate::image::media::OCI_MANIFEST.to_string());
        let config = parsed.config();
        if config.size() > MAX_MANIFEST {
            return Err(format!("config {} too large", config.digest()));
        }
        let config_bytes = read(&mut client, namespace, config.digest(), config.size()).await?;
        Ok(Found {
            manifest: Fetched {
                media_type,
                digest,
                data: bytes,
            },
            config: (config.digest().clone(), config_bytes),
        })
    }

    async fn client(&self) -> Result<Client, String> {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://containerd.invalid")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        Ok(proto::content_client::ContentClient::new(channel))
    }
}

type Client = proto::content_client::ContentClient<tonic::transport::Channel>;

fn request<T>(namespace: &str, message: T) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    let value = namespace
        .parse()
        .map_err(|_| format!("namespace {namespace:?}"))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}

/// Blob `digest` (at most `max` bytes), checked against its digest.
async fn read(
    client: &mut Client,
    namespace: &str,
    digest: &Digest,
    max: u64,
) -> Result<Vec<u8>, String> {
    use futures_util::StreamExt;
    let message = proto::ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: 0,
    };
    let mut stream = client
        .read(request(namespace, message)?)
        .await
        .map_err(|e| format!("reading {digest}: {}", e.message()))?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(part) = stream.next().await {
        let part = part.map_err(|e| format!("reading {digest}: {}", e.message()))?;
        if bytes.len() as u64 + part.data.len() as u64 > max {
            return Err(format!("{digest} larger than {max} bytes"));
        }
        bytes.extend_from_slice(&part.data);
    }
    crate::digest::verify(digest, &bytes).map_err(|e| format!("{digest}: {e}"))?;
    Ok(bytes)
}

/// The one manifest of `reference`'s repository in the store whose layers end with `layers`
/// (ctr-remote names the layers from the one asked for to the top).
async fn find_by_layers(
    client: &mut Client,
    namespace: &str,
    reference: &Reference,
    layers: &[String],
) -> Result<(Digest, Vec<u8>), String> {
    use futures_util::StreamExt;
    if layers.is_empty() {
        return Err("no layers named".into());
    }
    let key = format!(
        "containerd.io/distribution.source.{}",
        source_host(reference.registry())
    );
    let message = proto::ListContentRequest {
        filters: vec![format!("labels.\"{key}\"")],
    };
    let mut stream = client
        .list(request(namespace, message)?)
        .await
        .map_err(|e| format!("listing: {}", e.message()))?
        .into_inner();
    let mut candidates = Vec::new();
    while let Some(part) = stream.next().await {
        let part = part.map_err(|e| format!("listing: {}", e.message()))?;
        for info in part.info {
            let from_repo = info
                .labels
                .get(&key)
                .is_some_and(|repos| repos.split(',').any(|r| r == reference.repository()));
            if from_repo && info.size > 0 && info.size as u64 <= MAX_MANIFEST {
                candidates.push(info.digest);
            }
            if candidates.len() > MAX_CANDIDATES {
                return Err(format!(
                    "more than {MAX_CANDIDATES} entries of the repository"
                ));
            }
        }
    }
    let mut found: Option<(Digest, Vec<u8>)> = None;
    for candidate in candidates {
        let Ok(digest) = crate::digest::parse(&candidate) else {
            continue;
        };
        let Ok(bytes) = read(client, namespace, &digest, MAX_MANIFEST).await else {
            continue;
        };
        let Ok(manifest) = serde_json::from_slice::<ImageManifest>(&bytes) else {
            continue;
        };
        let listed: Vec<String> = manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect();
        if listed.ends_with(layers) {
            if found.is_some() {
                return Err("two manifests of the repository list these layers".into());
            }
            found = Some((digest, bytes));
        }
    }
    found.ok_or_else(|| "no manifest of the repository lists these layers".into())
}

/// The registry's host as containerd names it in its `distribution.source` labels: without
/// the port (and an IPv6 address without its brackets), as Go's `url.URL.Hostname` gives it.
fn source_host(registry: &str) -> &str {
    match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => registry.split(':').next().unwrap_or(registry),
    }
}

/// A registry that answers for one manifest and its config from memory (what
/// [`ContentStore::find`] read) and asks `inner` for everything else.
pub struct Preloaded<'a> {
    pub inner: &'a dyn Registry,
    pub found: Found,
}

impl Registry for Preloaded<'_> {
    /// The manifest found, whatever the reference says: this registry serves one pull of it.
    fn resolve<'a>(&'a self, _reference: &'a Reference) -> RegistryFuture<'a, Fetched> {
        Box::pin(async move { Ok(self.found.manifest.clone()) })
    }
    fn fetch_manifest<'a>(&'a self, at: At<'a>) -> RegistryFuture<'a, Fetched> {
        match at.1 == &self.found.manifest.digest {
            true => Box::pin(async move { Ok(self.found.manifest.clone()) }),
            false => self.inner.fetch_manifest(at),
        }
    }
    fn fetch_blob<'a>(&'a self, at: At<'a>, cap: Option<u64>) -> RegistryFuture<'a, Vec<u8>> {
        match at.1 == &self.found.config.0 {
            true => Box::pin(async move { Ok(self.found.config.1.clone()) }),
            false => self.inner.fetch_blob(at, cap),
        }
    }
    fn read_range<'a>(&'a self, at: At<'a>, offset: u64, len: u64) -> RegistryFuture<'a, Vec<u8>> {
        self.inner.read_range(at, offset, len)
    }
    fn read_range_to<'a>(
        &'a self,
        at: At<'a>,
        offset: u64,
        len: u64,
        sink: Sink<'a>,
    ) -> RegistryFuture<'a, ()> {
        self.inner.read_range_to(at, offset, len, sink)
    }
    fn ranges_together(&self, at: At<'_>) -> bool {
        self.inner.ranges_together(at)
    }
    fn read_ranges<'a>(
        &'a self,
        at: At<'a>,
        ranges: &'a [(u64, u64)],
    ) -> RegistryFuture<'a, Vec<Vec<u8>>> {
        self.inner.read_ranges(at, ranges)
    }
    fn referrers<'a>(
        &'a self,
        subject: At<'a>,
        artifact_type: &'a str,
    ) -> RegistryFuture<'a, Option<Vec<u8>>> {
        self.inner.referrers(subject, artifact_type)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_source_label_names_the_host_without_its_port() {
        for (registry, host) in [
            ("127.0.0.1:5000", "127.0.0.1"),
            ("docker.io", "docker.io"),
            ("registry.example:443", "registry.example"),
            ("[::1]:5000", "::1"),
        ] {
            assert_eq!(super::source_host(registry), host);
        }
    }
}
