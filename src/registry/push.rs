//! Writing to a registry: blob uploads, manifest pushes and the referrers API — what
//! `stratafs index push` needs to publish layer indexes next to an image.

use oci_spec::image::Digest;
use reqwest::Method;

use super::transport::{first_endpoint, Request};
use super::{RegistryClient, RegistryError};
use crate::reference::Reference;

/// The outcome of a manifest push.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub digest: Digest,
    /// The registry processed the `subject` field (it supports the referrers API).
    pub subject_supported: bool,
}

impl RegistryClient {
    /// Sends one request to the origin (never a mirror) and returns the successful response.
    async fn origin_send(&self, req: &Request<'_>) -> Result<reqwest::Response, RegistryError> {
        let endpoints = self.endpoints(req.reference, false)?;
        let origin = endpoints
            .iter()
            .find(|e| !e.is_mirror)
            .expect("the origin is always an endpoint");
        self.transport.send(origin, req, None).await
    }

    /// Sends a read request to the mirrors, then the origin; the origin's answer is final.
    async fn first_send(&self, req: &Request<'_>) -> Result<reqwest::Response, RegistryError> {
        let endpoints = self.endpoints(req.reference, false)?;
        first_endpoint(&endpoints, |ep| self.transport.send(ep, req, None)).await
    }

    /// Uploads `data` as a blob of the repository of `reference` unless it is there already.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        data: &[u8],
    ) -> Result<Digest, RegistryError> {
        let digest = crate::digest::sha256(data);
        let subject = format!("blob {digest} of {reference}");
        let mut head = Request::get(reference, format!("blobs/{digest}"), None, subject.clone());
        head.method = Method::HEAD;
        match self.origin_send(&head).await {
            Ok(_) => return Ok(digest),
            Err(RegistryError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut start = Request::get(reference, "blobs/uploads/".into(), None, subject.clone());
        start.method = Method::POST;
        start.body = Some((Vec::new(), "application/octet-stream".into()));
        let resp = self.origin_send(&start).await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                host: reference.api_host().to_string(),
                url: super::location::shown(resp.url()),
                status: resp.status().as_u16(),
                detail: "upload started without a Location".into(),
            })?
            .to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut put = Request::get(
            reference,
            format!("{location}{sep}digest={digest}"),
            None,
            subject,
        );
        put.method = Method::PUT;
        put.body = Some((data.to_vec(), "application/octet-stream".into()));
        self.origin_send(&put).await?;
        Ok(digest)
    }

    /// Pushes a manifest (or index) under `tag_or_digest`.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        data: &[u8],
    ) -> Result<Pushed, RegistryError> {
        let digest = crate::digest::sha256(data);
        let mut put = Request::get(
            reference,
            format!("manifests/{tag_or_digest}"),
            None,
            format!("manifest {tag_or_digest} of {reference}"),
        );
        put.method = Method::PUT;
        put.body = Some((data.to_vec(), media_type.to_string()));
        let resp = self.origin_send(&put).await?;
        Ok(Pushed {
            digest,
            subject_supported: resp.headers().contains_key("oci-subject"),
        })
    }

    /// The referrers index of `subject` from the referrers API, or `None` when the registry
    /// does not offer the API (callers then use the referrers tag schema).
    pub async fn referrers(
        &self,
        reference: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let req = Request::get(
            reference,
            format!("referrers/{subject}?artifactType={artifact_type}"),
            Some(crate::image::media::OCI_INDEX),
            format!("referrers of {subject} in {reference}"),
        );
        let resp = match self.first_send(&req).await {
            Ok(r) => r,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(RegistryError::Status {
                status: 400 | 405, ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let is_index = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.starts_with(crate::image::media::OCI_INDEX));
        let url = super::location::shown(resp.url());
        let data = resp
            .bytes()
            .await
            .map_err(|e| super::failure::map_reqwest(reference.api_host(), &url, e))?;
        Ok(is_index.then(|| data.to_vec()))
    }
}
