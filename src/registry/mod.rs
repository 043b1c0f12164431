//! The registry client: the only module that speaks HTTP.
//!
//! Second stage of the pipeline. Given a [`Reference`], it resolves tags, fetches manifests,
//! indexes and configs (size-capped, every byte checked against its digest) and, for later
//! stages, blob ranges. Requests go to the host's mirrors in order and then to the origin
//! ([`hosts`]); authentication follows the registry's challenges ([`auth`]): anonymous or
//! credentialed bearer tokens cached per scope and refreshed on 401 and 403, or HTTP Basic.
//! Connection errors, timeouts, 5xx and 429 are retried with exponential backoff for a bounded
//! time; every other failure becomes a [`RegistryError`] naming the reference or registry. A
//! blob the registry redirects to a CDN or object store is range-read there directly for a
//! while (`location`).
//!
//! The stages that read images (pull, layer indexing and reads, published indexes and
//! profiles) reach a registry through the [`Registry`] seam: four read-only calls whose
//! results are verified. [`RegistryClient`] is the real one; `fake::FakeRegistry` (unit tests
//! only) serves repositories from memory, counting and optionally failing requests. Pushing
//! (`stratafs index push`, `profile push`) is the client's alone.

mod auth;
pub mod early;
mod failure;
#[cfg(test)]
pub mod fake;
mod hosts;
pub mod hosts_toml;
mod location;
mod push;
mod transport;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use oci_spec::image::Digest;

pub use early::Early;
pub use hosts::{HostConfig, RegistrySettings};

use crate::image::media;
use crate::reference::Reference;

/// A registry failure. Messages name the reference, registry, host or digest concerned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference}: not found in registry {registry}")]
    NotFound { reference: String, registry: String },
    #[error("unauthorized: registry {registry} refused access to {reference}: {detail}")]
    Unauthorized {
        registry: String,
        reference: String,
        detail: String,
    },
    #[error("denied: registry {registry} does not allow pulling {reference}")]
    Denied { registry: String, reference: String },
    #[error("tls error talking to {host}: {detail}")]
    Tls { host: String, detail: String },
    #[error("cannot resolve registry host {host}: {detail}")]
    Dns { host: String, detail: String },
    #[error("cannot connect to registry {host}: {detail}")]
    Connect { host: String, detail: String },
    #[error("timed out talking to registry {host} ({url})")]
    Timeout { host: String, url: String },
    #[error("registry {host} answered {status} for {url}: {detail}")]
    Status {
        host: String,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{what} of {reference} is larger than the limit of {limit} bytes")]
    TooLarge {
        what: String,
        reference: String,
        limit: u64,
    },
    #[error("{what} of {reference} failed verification: {source}")]
    Digest {
        what: String,
        reference: String,
        source: Box<crate::digest::DigestError>,
    },
    #[error("{reference} is a Docker schema 1 manifest, which is obsolete and unsupported; push the image again with a current client or convert it (skopeo copy --format v2s2)")]
    Schema1 { reference: String },
    #[error("authentication with {0}")]
    Auth(String),
    #[error("registry configuration: {0}")]
    Config(String),
}

/// A manifest or index as fetched: its media type, digest and verified bytes.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub media_type: String,
    pub digest: Digest,
    pub data: Vec<u8>,
}

/// A boxed future of a [`Registry`] call, so the trait stays object safe.
pub type RegistryFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// Where a streamed read hands its bytes, in order, as they arrive. The read goes on once the
/// future the sink returns for them ends: a sink with no room for more holds the read back.
pub type Sink<'a> =
    &'a (dyn Fn(&[u8]) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync);

/// A blob or manifest of a repository: a reference naming the repository, and the digest.
pub type At<'a> = (&'a Reference, &'a Digest);

/// What the reading stages need of a registry. Every manifest and blob returned is verified
/// against its digest; ranges are not (a range has no digest of its own: callers check them
/// against a layer index's span digests).
pub trait Registry: Send + Sync {
    /// The manifest or index `reference` names (its digest if pinned, else its tag).
    fn resolve<'a>(&'a self, reference: &'a Reference) -> RegistryFuture<'a, Fetched>;
    /// The manifest or index `at`.
    fn fetch_manifest<'a>(&'a self, at: At<'a>) -> RegistryFuture<'a, Fetched>;
    /// Blob `at` of at most `cap` bytes (`None`: the configured cap for configs).
    fn fetch_blob<'a>(&'a self, at: At<'a>, cap: Option<u64>) -> RegistryFuture<'a, Vec<u8>>;
    /// `len` bytes at `offset` of blob `at`.
    fn read_range<'a>(&'a self, at: At<'a>, offset: u64, len: u64) -> RegistryFuture<'a, Vec<u8>>;
    /// As [`read_range`](Self::read_range), but handing the bytes to `sink` in order as they
    /// arrive (the default: all at once when they are all in).
    fn read_range_to<'a>(
        &'a self,
        at: At<'a>,
        offset: u64,
        len: u64,
        sink: Sink<'a>,
    ) -> RegistryFuture<'a, ()> {
        Box::pin(async move {
            sink(&self.read_range(at, offset, len).await?).await;
            Ok(())
        })
    }
    /// Whether [`read_ranges`](Self::read_ranges) of blob `at` would ask for several ranges in
    /// one request (no: one each, the default).
    fn ranges_together(&self, _at: At<'_>) -> bool {
        false
    }
    /// Ranges (offset, length) of blob `at`, each returned in the order asked: in one request
    /// where the registry can answer several ranges at once, else one each (the default).
    fn read_ranges<'a>(
        &'a self,
        at: At<'a>,
        ranges: &'a [(u64, u64)],
    ) -> RegistryFuture<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(ranges.len());
            for &(offset, len) in ranges {
                out.push(self.read_range(at, offset, len).await?);
            }
            Ok(out)
        })
    }
    /// The referrers index of manifest `subject` listing artifacts of `artifact_type`, or
    /// `None` when the registry has no referrers API (callers then read the referrers tag).
    /// Nothing in it is vouched for by the image: callers decide whether to trust it.
    fn referrers<'a>(
        &'a self,
        subject: At<'a>,
        artifact_type: &'a str,
    ) -> RegistryFuture<'a, Option<Vec<u8>>>;
}

/// Largest published layer index blob fetched (larger than a config).
pub const MAX_INDEX_BLOB: u64 = 256 << 20;

impl Registry for RegistryClient {
    fn resolve<'a>(&'a self, reference: &'a Reference) -> RegistryFuture<'a, Fetched> {
        Box::pin(RegistryClient::resolve(self, reference))
    }

    fn fetch_manifest<'a>(&'a self, (r, d): At<'a>) -> RegistryFuture<'a, Fetched> {
        Box::pin(RegistryClient::fetch_manifest(self, r, d))
    }

    fn fetch_blob<'a>(&'a self, (r, d): At<'a>, cap: Option<u64>) -> RegistryFuture<'a, Vec<u8>> {
        let cap = cap.unwrap_or(self.settings.max_manifest_bytes);
        Box::pin(self.fetch_blob_capped(r, d, cap))
    }

    fn read_range_to<'a>(
        &'a self,
        (r, d): At<'a>,
        at: u64,
        len: u64,
        sink: Sink<'a>,
    ) -> RegistryFuture<'a, ()> {
        Box::pin(self.read_blob_range_to(r, d, at, len, sink))
    }

    fn read_range<'a>(&'a self, (r, d): At<'a>, at: u64, len: u64) -> RegistryFuture<'a, Vec<u8>> {
        Box::pin(self.read_blob_range(r, d, at, len))
    }

    fn ranges_together(&self, (r, d): At<'_>) -> bool {
        let (_, req) = blob_request(r, d);
        self.endpoints(r, true)
            .is_ok_and(|endpoints| self.transport.ranges_together(&endpoints, &req))
    }

    fn read_ranges<'a>(
        &'a self,
        (r, d): At<'a>,
        ranges: &'a [(u64, u64)],
    ) -> RegistryFuture<'a, Vec<Vec<u8>>> {
        Box::pin(self.read_blob_ranges(r, d, ranges))
    }

    fn referrers<'a>(
        &'a self,
        (r, d): At<'a>,
        artifact_type: &'a str,
    ) -> RegistryFuture<'a, Option<Vec<u8>>> {
        Box::pin(RegistryClient::referrers(self, r, d, artifact_type))
    }
}

/// Talks to OCI/Docker registries on behalf of every other stage.
pub struct RegistryClient {
    settings: RegistrySettings,
    hosts: BTreeMap<String, HostConfig>,
    force_plain_http: bool,
    transport: transport::Transport,
}

impl RegistryError {
    /// A short name of the kind of failure (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "not_found",
            RegistryError::Unauthorized { .. } => "unauthorized",
            RegistryError::Denied { .. } => "denied",
            RegistryError::Tls { .. } => "tls",
            RegistryError::Dns { .. } => "dns",
            RegistryError::Connect { .. } => "connect",
            RegistryError::Timeout { .. } => "timeout",
            RegistryError::Status { .. } => "status",
            RegistryError::TooLarge { .. } => "too_large",
            RegistryError::Digest { .. } => "digest",
            _ => "other",
        }
    }
}

impl RegistryClient {
    /// A client with the given settings and per-host configuration; `force_plain_http` makes
    /// every origin plain HTTP (the `--plain-http` flag).
    pub fn new(
        settings: RegistrySettings,
        hosts: BTreeMap<String, HostConfig>,
        force_plain_http: bool,
    ) -> Self {
        RegistryClient {
            transport: transport::Transport::new(settings.clone(), hosts.clone()),
            settings,
            hosts,
            force_plain_http,
        }
    }

    /// HTTP requests sent so far (including token requests and retries).
    pub fn requests_sent(&self) -> u64 {
        self.transport.requests_sent()
    }

    /// Fetches the manifest or index a reference names (its digest if pinned, else its tag).
    /// A pinned digest must match the bytes received; otherwise the digest is computed from
    /// them and checked against the registry's `Docker-Content-Digest` header.
    pub async fn resolve(&self, reference: &Reference) -> Result<Fetched, RegistryError> {
        let target = reference.manifest_reference();
        self.fetch_manifest_at(reference, &target, reference.digest())
            .await
    }

    /// Fetches the manifest or index `digest` from the repository of `reference`.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Fetched, RegistryError> {
        self.fetch_manifest_at(reference, digest.as_ref(), Some(digest))
            .await
    }

    async fn fetch_manifest_at(
        &self,
        reference: &Reference,
        target: &str,
        pinned: Option<&Digest>,
    ) -> Result<Fetched, RegistryError> {
        let what = format!("manifest {target}");
        let endpoints = self.endpoints(reference, pinned.is_some())?;
        let body = self
            .transport
            .get_small(
                &endpoints,
                &transport::Request::get(
                    reference,
                    format!("manifests/{target}"),
                    Some(media::MANIFEST_ACCEPT),
                    subject(reference, &what, pinned.is_some()),
                ),
                self.settings.max_manifest_bytes,
                &what,
            )
            .await?;
        let verify_err = |source| RegistryError::Digest {
            what: what.clone(),
            reference: reference.to_string(),
            source: Box::new(source),
        };
        let digest = match pinned {
            Some(d) => {
                crate::digest::verify(d, &body.data).map_err(verify_err)?;
                d.clone()
            }
            None => {
                let computed = crate::digest::sha256(&body.data);
                if let Some(header) = body.content_digest.as_deref() {
                    let header = crate::digest::parse(header).map_err(verify_err)?;
                    crate::digest::verify(&header, &body.data).map_err(verify_err)?;
                }
                computed
            }
        };
        let media_type = detect_media_type(&body.data, body.content_type.as_deref());
        if media::is_schema1(&media_type) {
            return Err(RegistryError::Schema1 {
                reference: reference.to_string(),
            });
        }
        Ok(Fetched {
            media_type,
            digest,
            data: body.data,
        })
    }

    /// Builds the HTTP clients of the hosts a request for `reference` may go to (mirrors, then
    /// the origin), if not built yet. Blocking: each reads the system's TLS roots (the bundle
    /// and every file of `/etc/ssl/certs`) and a host's own CA files; meant for a blocking
    /// thread ahead of the first request, which would otherwise wait for it.
    pub fn ready_clients(&self, reference: &Reference) {
        for ep in self.endpoints(reference, true).unwrap_or_default() {
            if let Err(e) = self.transport.client_for(&ep.host) {
                tracing::debug!(host = %ep.host, error = %e, "building the registry's http client ahead of requests failed");
            }
        }
    }

    /// Readies this process's way to the registry of `reference` before reads need it: the
    /// HTTP client (with its TLS roots: [`ready_clients`](Self::ready_clients) first, on a
    /// blocking thread), the answer to the registry's authentication challenge (a token to
    /// pull from the repository, credentials from a helper) and, over HTTP/1.1, `connections`
    /// connections kept alive for the requests that follow (over HTTP/2 one carries them all)
    /// — by a HEAD request of manifest `digest` (a HEAD counts against no pull limit) and,
    /// once it is answered, `connections - 1` more at once. A process that serves a mount of an
    /// image pulled earlier (the snapshotter's, a second `mount`, a takeover) otherwise pays
    /// all of that on its first reads. Nothing is tried again, counted as a registry error or
    /// logged above debug: a registry that cannot be reached (a host whose cache holds the
    /// whole image) is the reads' to report, if they need it. Not covered: a token service's
    /// own client (built when the challenge names it) and blob locations a registry redirects
    /// to (a CDN's connections are opened by the reads).
    pub async fn warm_up(&self, reference: &Reference, digest: &Digest, connections: usize) {
        let Ok(endpoints) = self.endpoints(reference, true) else {
            return;
        };
        let mut req = transport::Request::get(
            reference,
            format!("manifests/{digest}"),
            Some(media::MANIFEST_ACCEPT),
            subject(reference, &format!("manifest {digest}"), false),
        );
        req.method = reqwest::Method::HEAD;
        req.retry = false;
        let head = || self.transport.send_quietly(&endpoints, &req);
        if let Err(e) = head().await {
            return tracing::debug!(%reference, error = %e, "readying the registry ahead of reads failed");
        }
        let more = (1..connections).map(|_| head());
        for e in futures_util::future::join_all(more)
            .await
            .into_iter()
            .filter_map(Result::err)
        {
            tracing::debug!(%reference, error = %e, "opening a connection to the registry ahead of reads failed");
        }
    }

    /// Fetches a small blob (a config) by digest, capped and verified.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Vec<u8>, RegistryError> {
        self.fetch_blob_capped(reference, digest, self.settings.max_manifest_bytes)
            .await
    }

    /// Fetches a published layer index blob (larger than a config: up to 256 MiB), verified.
    /// Fetches blob `digest` of at most `cap` bytes, verified.
    pub async fn fetch_blob_capped(
        &self,
        reference: &Reference,
        digest: &Digest,
        cap: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let (what, req) = blob_request(reference, digest);
        let body = self
            .transport
            .get_small(&self.endpoints(reference, true)?, &req, cap, &what)
            .await?;
        crate::digest::verify(digest, &body.data).map_err(|source| RegistryError::Digest {
            what,
            reference: reference.to_string(),
            source: Box::new(source),
        })?;
        Ok(body.data)
    }

    /// Reads `len` bytes at `offset` of blob `digest` with an HTTP Range request. The bytes are
    /// not verified here (a range has no digest of its own): callers check them against the
    /// span digests of a layer index.
    pub async fn read_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (_, req) = blob_request(reference, digest);
        self.transport
            .get_range(&self.endpoints(reference, true)?, &req, offset, len)
            .await
    }

    /// Bytes `offset..offset + len` of a blob, handed to `sink` in order as they arrive.
    pub async fn read_blob_range_to(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        sink: Sink<'_>,
    ) -> Result<(), RegistryError> {
        if len == 0 {
            return Ok(());
        }
        let (_, req) = blob_request(reference, digest);
        self.transport
            .get_range_to(&self.endpoints(reference, true)?, &req, offset, len, sink)
            .await
    }

    /// `ranges` (offset, length) of a blob, each returned in the order asked: several per
    /// request where the registry answers `multipart/byteranges`, else one request each
    /// (`transport::multirange`).
    pub async fn read_blob_ranges(
        &self,
        reference: &Reference,
        digest: &Digest,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        let (_, req) = blob_request(reference, digest);
        self.transport
            .get_ranges(&self.endpoints(reference, true)?, &req, ranges)
            .await
    }

    /// Where a request goes: mirrors, then the origin. `by_digest`: the request names content
    /// by digest (blobs, manifests by digest), which pull-only mirrors may serve too.
    fn endpoints(
        &self,
        reference: &Reference,
        by_digest: bool,
    ) -> Result<Vec<hosts::Endpoint>, RegistryError> {
        hosts::endpoints(
            &self.hosts,
            reference.registry(),
            reference.api_host(),
            self.force_plain_http,
            by_digest,
        )
    }
}

/// A GET of blob `digest` and what errors about it call it.
fn blob_request<'a>(reference: &'a Reference, digest: &Digest) -> (String, transport::Request<'a>) {
    let what = format!("blob {digest}");
    let req = transport::Request::get(
        reference,
        format!("blobs/{digest}"),
        None,
        subject(reference, &what, false),
    );
    (what, req)
}

/// What an error about `what` should name: the reference itself when the request is for the
/// manifest the reference names, else the object and the reference.
fn subject(reference: &Reference, what: &str, pinned_by_reference: bool) -> String {
    let is_reference_target = what == format!("manifest {}", reference.manifest_reference());
    if is_reference_target && (pinned_by_reference || reference.digest().is_none()) {
        reference.to_string()
    } else {
        format!("{what} of {reference}")
    }
}

/// The media type of a manifest-like document: its own `mediaType` field, else the
/// `Content-Type` header, else a guess from its shape.
fn detect_media_type(data: &[u8], content_type: Option<&str>) -> String {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
        fs_layers: Option<serde_json::Value>,
    }
    let probe: Option<Probe> = serde_json::from_slice(data).ok();
    if let Some(mt) = probe.as_ref().and_then(|p| p.media_type.clone()) {
        return mt;
    }
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    if let Some(h) = header {
        return h;
    }
    match probe {
        Some(p) if p.schema_version == Some(1) || p.fs_layers.is_some() => {
            media::DOCKER_SCHEMA1.into()
        }
        Some(p) if p.manifests.is_some() => media::OCI_INDEX.into(),
        Some(p) if p.config.is_some() => media::OCI_MANIFEST.into(),
        _ => content_type.unwrap_or("application/octet-stream").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_detection_order() {
        let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(
            detect_media_type(doc, Some(media::DOCKER_MANIFEST)),
            media::OCI_INDEX
        );
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(
            detect_media_type(bare, Some(media::DOCKER_MANIFEST)),
            media::DOCKER_MANIFEST
        );
        assert_eq!(
            detect_media_type(bare, Some("application/json")),
            media::OCI_MANIFEST
        );
        let s1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert_eq!(detect_media_type(s1, None), media::DOCKER_SCHEMA1);
        assert_eq!(
            detect_media_type(br#"{"manifests":[]}"#, None),
            media::OCI_INDEX
        );
    }
}
