//! Published layer indexes: share the indexes built here through the registry, and find them.
//!
//! `stratafs index push` attaches an OCI artifact to the image's platform manifest:
//! a manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config, one gzip-compressed
//! [`LayerIndex`] per layer (annotated with the layer's blob digest) and `subject` = the image
//! manifest. Registries with the referrers API link it themselves; for the others (registry
//! 2.8 among them) the referrers tag schema is kept up to date: the tag `sha256-<hex>` of the
//! subject names an OCI index listing its referrers.
//!
//! `pull` looks for such artifacts (referrers API, then the tag) and stores the indexes it
//! finds, so the first read of a gzip layer needs one range request, not a streaming pass.
//! Every fetched byte is digest-checked; an index must name the layer's blob digest and
//! diff_id. Whether published indexes are used at all is the `[index] published` setting:
//! their contents are as trustworthy as the push rights to the repository.

use std::io::{Read, Write};

use oci_spec::image::Digest;
use serde_json::{json, Value};

use crate::image::{media, ImageRecord};
use crate::layer::{IndexStore, LayerError, LayerIndex, INDEX_VERSION};
use crate::reference::Reference;
use crate::registry::{RegistryClient, RegistryError};

/// The `artifactType` of a stratafs index artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.stratafs.index.v1";
/// Media type of one layer's index (gzip-compressed JSON).
pub const LAYER_INDEX_TYPE: &str = "application/vnd.stratafs.layer-index.v1+gzip";
/// Annotation naming the layer blob an index describes.
pub const LAYER_ANNOTATION: &str = "io.stratafs.layer.digest";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// A failure to publish or fetch indexes; messages name the image.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{image}: {detail}")]
    Invalid { image: String, detail: String },
}

/// Publishes `indexes` (one per layer of `image`) as a referrer of the image's manifest.
/// Returns the artifact manifest's digest.
pub async fn push_indexes(
    client: &RegistryClient,
    image: &ImageRecord,
    indexes: &[LayerIndex],
) -> Result<Digest, PublishError> {
    let reference: Reference = image
        .name
        .parse()
        .map_err(|_| invalid(image, "invalid name"))?;
    let empty = client.push_blob(&reference, b"{}").await?;
    let mut layers = Vec::new();
    for index in indexes {
        let blob = gzip(&serde_json::to_vec(index).expect("index serializes"));
        let digest = client.push_blob(&reference, &blob).await?;
        layers.push(json!({
            "mediaType": LAYER_INDEX_TYPE,
            "digest": digest,
            "size": blob.len(),
            "annotations": { LAYER_ANNOTATION: index.blob },
        }));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": { "mediaType": EMPTY_TYPE, "digest": empty, "size": 2 },
        "layers": layers,
        // No timestamp: the same indexes make the same artifact, so pushing again is a no-op.
        "subject": {
            "mediaType": image.manifest.media_type,
            "digest": image.manifest.digest,
            "size": image.manifest.size,
        },
    }))
    .expect("manifest serializes");
    let digest = crate::digest::sha256(&manifest);
    let pushed = client
        .push_manifest(&reference, digest.as_ref(), media::OCI_MANIFEST, &manifest)
        .await?;
    if !pushed.subject_supported {
        update_referrers_tag(client, &reference, image, &digest, manifest.len()).await?;
    }
    Ok(digest)
}

/// Adds the artifact to the referrers tag index of the image manifest (distribution spec 1.1
/// fallback for registries without the referrers API).
async fn update_referrers_tag(
    client: &RegistryClient,
    reference: &Reference,
    image: &ImageRecord,
    artifact: &Digest,
    size: usize,
) -> Result<(), PublishError> {
    let tag = referrers_tag(&image.manifest.digest);
    let mut manifests: Vec<Value> = match client.resolve(&reference_at(reference, &tag)?).await {
        Ok(existing) => serde_json::from_slice::<Value>(&existing.data)
            .ok()
            .and_then(|v| v["manifests"].as_array().cloned())
            .unwrap_or_default(),
        Err(RegistryError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    // A new index artifact supersedes earlier ones; other referrers stay.
    manifests.retain(|m| m["artifactType"] != ARTIFACT_TYPE);
    manifests.push(json!({
        "mediaType": media::OCI_MANIFEST,
        "digest": artifact,
        "size": size,
        "artifactType": ARTIFACT_TYPE,
    }));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("index serializes");
    client
        .push_manifest(reference, &tag, media::OCI_INDEX, &index)
        .await?;
    Ok(())
}

/// Finds published indexes for `image` and stores those that match its layers and are not
/// stored yet. Returns how many were stored.
pub async fn fetch_indexes(
    client: &RegistryClient,
    store: &IndexStore,
    image: &ImageRecord,
) -> Result<usize, PublishError> {
    let missing: Vec<_> = image
        .layers
        .iter()
        .filter(|l| !matches!(store.get(&l.digest), Ok(Some(_))))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let reference: Reference = image
        .name
        .parse()
        .map_err(|_| invalid(image, "invalid name"))?;
    let subject = &image.manifest.digest;
    let referrers = match client.referrers(&reference, subject, ARTIFACT_TYPE).await? {
        Some(index) => index,
        None => match client
            .resolve(&reference_at(&reference, &referrers_tag(subject))?)
            .await
        {
            Ok(f) => f.data,
            Err(RegistryError::NotFound { .. }) => return Ok(0),
            Err(e) => return Err(e.into()),
        },
    };
    let listed: Value = serde_json::from_slice(&referrers)
        .map_err(|e| invalid(image, &format!("referrers index: {e}")))?;
    // The newest artifact is listed last.
    let Some(artifact) = listed["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["artifactType"] == ARTIFACT_TYPE)
    else {
        return Ok(0);
    };
    let digest = digest_field(image, &artifact["digest"])?;
    let manifest = client.fetch_manifest(&reference, &digest).await?;
    let manifest: Value = serde_json::from_slice(&manifest.data)
        .map_err(|e| invalid(image, &format!("index artifact {digest}: {e}")))?;
    if manifest["subject"]["digest"] != subject.as_ref() {
        return Err(invalid(
            image,
            &format!("index artifact {digest} is for another manifest"),
        ));
    }
    let mut stored = 0;
    for layer in missing {
        let Some(desc) = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["annotations"][LAYER_ANNOTATION] == layer.digest.as_ref()
                    && d["mediaType"] == LAYER_INDEX_TYPE
            })
        else {
            continue;
        };
        let blob = client
            .fetch_index_blob(&reference, &digest_field(image, &desc["digest"])?)
            .await?;
        let index: LayerIndex =
            serde_json::from_slice(&gunzip(&blob).map_err(|e| invalid(image, &e.to_string()))?)
                .map_err(|e| invalid(image, &format!("layer index for {}: {e}", layer.digest)))?;
        if index.version != INDEX_VERSION
            || index.blob != layer.digest
            || index.diff_id != layer.diff_id
        {
            tracing::warn!(layer = %layer.digest, "published index does not match the layer; ignored");
            continue;
        }
        store.put(&index)?;
        stored += 1;
    }
    Ok(stored)
}

/// The referrers tag of a digest: `<alg>-<hex>`.
pub fn referrers_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm(), digest.digest())
}

fn reference_at(reference: &Reference, tag: &str) -> Result<Reference, PublishError> {
    format!("{}:{tag}", reference.name())
        .parse()
        .map_err(
            |e: crate::reference::ReferenceError| PublishError::Invalid {
                image: reference.to_string(),
                detail: e.to_string(),
            },
        )
}

fn digest_field(image: &ImageRecord, v: &Value) -> Result<Digest, PublishError> {
    v.as_str()
        .and_then(|s| crate::digest::parse(s).ok())
        .ok_or_else(|| invalid(image, &format!("invalid digest {v} in index artifact")))
}

fn invalid(image: &ImageRecord, detail: &str) -> PublishError {
    PublishError::Invalid {
        image: image.name.clone(),
        detail: detail.to_string(),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("in-memory write");
    e.finish().expect("in-memory write")
}

fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}
