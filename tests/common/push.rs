//! Pushing and fetching blobs/manifests over the registry HTTP API
//! (distribution spec), with synchronous `ureq`.
//!
//! All helpers panic with the registry's answer on unexpected statuses, so
//! test code can stay linear.

use super::image::{Image, Index, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use super::sha256_digest;
use base64::Engine;
use std::io::Read;
use std::time::Duration;

/// User-Agent sent by every harness request, so tests can tell harness
/// traffic from `stratafs` traffic in the access log.
pub const HARNESS_UA: &str = "stratafs-test-harness";

/// `Accept` header value covering all four manifest media types.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Credentials for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// No `Authorization` header.
    None,
    /// HTTP Basic (user, password).
    Basic(String, String),
    /// Bearer token.
    Bearer(String),
}

impl Auth {
    /// HTTP Basic credentials.
    pub fn basic(user: &str, pass: &str) -> Auth {
        Auth::Basic(user.to_string(), pass.to_string())
    }

    /// `Authorization` header value, if any.
    pub fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Basic(u, p) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
        }
    }
}

/// A fully read HTTP response (any status).
#[derive(Clone, Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, names lower-cased, in order received.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Body as lossy UTF-8 (for messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Panic unless the status is `want`.
    pub fn expect_status(self, want: u16, what: &str) -> Response {
        assert_eq!(
            self.status,
            want,
            "{what}: expected HTTP {want}, got {} with body {}",
            self.status,
            self.text()
        );
        self
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .user_agent(HARNESS_UA)
        .redirects(0)
        .build()
}

/// Send one request and read the whole response, whatever its status.
/// Panics only on transport errors.
pub fn request(
    method: &str,
    url: &str,
    auth: &Auth,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut req = agent().request(method, url);
    if let Some(h) = auth.header() {
        req = req.set("Authorization", &h);
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: transport error: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .flat_map(|name| {
            resp.all(&name)
                .into_iter()
                .map(|v| (name.to_ascii_lowercase(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut body = Vec::new();
    resp.into_reader()
        .read_to_end(&mut body)
        .unwrap_or_else(|e| panic!("{method} {url}: reading body: {e}"));
    Response {
        status,
        headers,
        body,
    }
}

/// Resolve an upload `Location` (absolute, or relative to the registry)
/// and append `digest=...` to its query.
fn upload_url(reg_url: &str, location: &str, digest: &str) -> String {
    let base = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", reg_url.trim_end_matches('/'))
    } else {
        format!("{}/{location}", reg_url.trim_end_matches('/'))
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}digest={digest}")
}

/// Monolithic blob upload (POST then PUT). Returns the blob digest.
pub fn push_blob(reg_url: &str, repo: &str, bytes: &[u8], auth: &Auth) -> String {
    let digest = sha256_digest(bytes);
    let start = format!("{}/v2/{repo}/blobs/uploads/", reg_url.trim_end_matches('/'));
    let resp = request("POST", &start, auth, &[("Content-Length", "0")], Some(&[]))
        .expect_status(202, &format!("start upload to {repo}"));
    let location = resp
        .header("location")
        .unwrap_or_else(|| panic!("upload to {repo}: no Location header"))
        .to_string();
    let put = upload_url(reg_url, &location, &digest);
    let resp = request(
        "PUT",
        &put,
        auth,
        &[("Content-Type", "application/octet-stream")],
        Some(bytes),
    )
    .expect_status(201, &format!("finish upload of {digest} to {repo}"));
    if let Some(got) = resp.header("docker-content-digest") {
        assert_eq!(got, digest, "registry computed another blob digest");
    }
    digest
}

/// PUT a manifest (or index) under a tag or digest. Returns the
/// `Docker-Content-Digest` the registry answered (or the computed one).
pub fn push_manifest(
    reg_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
    auth: &Auth,
) -> String {
    let url = format!(
        "{}/v2/{repo}/manifests/{reference}",
        reg_url.trim_end_matches('/')
    );
    let resp = request(
        "PUT",
        &url,
        auth,
        &[("Content-Type", media_type)],
        Some(bytes),
    )
    .expect_status(201, &format!("push manifest {repo}:{reference}"));
    let digest = sha256_digest(bytes);
    let got = resp
        .header("docker-content-digest")
        .unwrap_or(&digest)
        .to_string();
    assert_eq!(got, digest, "registry computed another manifest digest");
    got
}

/// Push an image's layers, config and manifest, tagging the manifest
/// `tag` (which may also be a digest). Returns the manifest digest.
pub fn push_image(reg_url: &str, repo: &str, tag: &str, image: &Image, auth: &Auth) -> String {
    for layer in &image.layers {
        push_blob(reg_url, repo, &layer.blob, auth);
    }
    push_blob(reg_url, repo, &image.config, auth);
    push_manifest(
        reg_url,
        repo,
        tag,
        &image.manifest_media_type,
        &image.manifest,
        auth,
    )
}

/// Push every platform image (by digest), then the index under `tag`.
/// Returns the index digest.
pub fn push_index(reg_url: &str, repo: &str, tag: &str, index: &Index, auth: &Auth) -> String {
    for image in &index.images {
        push_image(reg_url, repo, &image.manifest_digest, image, auth);
    }
    push_manifest(reg_url, repo, tag, &index.media_type, &index.bytes, auth)
}

/// GET a manifest with an `Accept` header listing all manifest types.
pub fn get_manifest(reg_url: &str, repo: &str, reference: &str, auth: &Auth) -> Response {
    get_manifest_accept(reg_url, repo, reference, MANIFEST_ACCEPT, auth)
}

/// GET a manifest with a specific `Accept` header.
pub fn get_manifest_accept(
    reg_url: &str,
    repo: &str,
    reference: &str,
    accept: &str,
    auth: &Auth,
) -> Response {
    let url = format!(
        "{}/v2/{repo}/manifests/{reference}",
        reg_url.trim_end_matches('/')
    );
    request("GET", &url, auth, &[("Accept", accept)], None)
}

/// GET a blob (whole, or an inclusive byte range).
pub fn get_blob(
    reg_url: &str,
    repo: &str,
    digest: &str,
    range: Option<(u64, u64)>,
    auth: &Auth,
) -> Response {
    let url = format!("{}/v2/{repo}/blobs/{digest}", reg_url.trim_end_matches('/'));
    match range {
        Some((a, b)) => request(
            "GET",
            &url,
            auth,
            &[("Range", &format!("bytes={a}-{b}"))],
            None,
        ),
        None => request("GET", &url, auth, &[], None),
    }
}

/// Whether a media type is one of the two index types.
pub fn is_index_media_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Whether a media type is one of the two single-image manifest types.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}
