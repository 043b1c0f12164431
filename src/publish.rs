//! Published layer indexes: share the indexes built here through the registry, and find them.
//!
//! Two ways to publish (`stratafs index push`), with different trust:
//!
//! - **Bound** (`--bind`, [`bind_indexes`]): the indexes are pushed as blobs and the image's
//!   manifest is pushed again with each layer descriptor annotated
//!   [`crate::fs::INDEX_ANNOTATION`] = the digest of its index (and, for a multi-platform image,
//!   the index pointing at it). Whoever pulls that manifest's digest gets the indexes pinned by
//!   it, vouched for by the image's publisher exactly as the layers are; `fs::Layers` fetches
//!   such an index the first time the layer is opened. This is the default trust path.
//! - **Referrer** ([`push_indexes`]): an OCI artifact whose `subject` is the image manifest
//!   (a referrer; for registries without the referrers API the `sha256-<hex>` tag schema is
//!   kept). Nothing in the image pins it — anyone who can push to the repository could publish
//!   one — so [`adopt_referrer_indexes`] is used only when the user opts in with
//!   `[index] unbound_referrers = true`, and every use is logged as a warning.
//!
//! Every fetched byte is digest-checked; an index must name the layer's blob digest, diff_id,
//! size and compression and be well formed ([`LayerIndex::validate`]).
//!
//! Startup profiles ([`crate::profile`]) are published bound the same way ([`bind_profile`]):
//! the manifest itself is annotated with the profile's digest, and
//! [`crate::profile::pinned_profile`] fetches it for a cold mount.

use oci_spec::image::Digest;
use serde_json::{json, Value};

use crate::image::{media, ImageRecord};
use crate::layer::{IndexStore, LayerError, LayerIndex, Limits};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryClient, RegistryError};
use crate::store::{Store, StoreError};

/// The `artifactType` of a stratafs index artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.stratafs.index.v1";
/// Media type of one layer's index (zstd-compressed JSON, [`crate::layer::packed`]).
pub const LAYER_INDEX_TYPE: &str = "application/vnd.stratafs.layer-index.v1+zstd";
/// Media type of one layer's index as published before 2026-12-07 (gzip-compressed JSON):
/// still read.
pub const LAYER_INDEX_GZIP_TYPE: &str = "application/vnd.stratafs.layer-index.v1+gzip";
/// Media type of a gzip index's window file (its checkpoint windows, see `layer::gzip`).
pub const WINDOWS_TYPE: &str = "application/vnd.stratafs.layer-index-windows.v1";
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    #[error("{image}: {detail}")]
    Invalid { image: String, detail: String },
}

/// An index to publish, with the bytes of its window file (which it names by digest).
pub type Publishable = (LayerIndex, Option<Vec<u8>>);

/// Pushes the window file of an index (before the index that names it), checking it is the
/// one the index names. Returns its descriptor.
async fn push_windows(
    client: &RegistryClient,
    reference: &Reference,
    image: &ImageRecord,
    (index, windows): &Publishable,
) -> Result<Option<Value>, PublishError> {
    let (Some(w), Some(bytes)) = (&index.windows, windows) else {
        if index.windows.is_some() {
            return Err(invalid(
                image,
                &format!(
                    "the index of layer {} comes without its window file",
                    index.blob
                ),
            ));
        }
        return Ok(None);
    };
    if crate::digest::verify(&w.digest, bytes).is_err() || bytes.len() as u64 != w.size {
        return Err(invalid(
            image,
            &format!(
                "the window file given for layer {} is not the one its index names",
                index.blob
            ),
        ));
    }
    let digest = client.push_blob(reference, bytes).await?;
    Ok(Some(json!({
        "mediaType": WINDOWS_TYPE,
        "digest": digest,
        "size": bytes.len(),
        "annotations": { LAYER_ANNOTATION: index.blob },
    })))
}

/// Publishes `indexes` (one per layer of `image`) as a referrer of the image's manifest.
/// Returns the artifact manifest's digest.
pub async fn push_indexes(
    client: &RegistryClient,
    image: &ImageRecord,
    indexes: &[Publishable],
) -> Result<Digest, PublishError> {
    let reference = reference_of(image)?;
    let empty = client.push_blob(&reference, b"{}").await?;
    let mut layers = Vec::new();
    for published in indexes {
        let index = &published.0;
        layers.extend(push_windows(client, &reference, image, published).await?);
        let blob =
            crate::layer::packed::pack(&serde_json::to_vec(index).expect("index serializes"));
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

/// Publishes `indexes` bound to the image: pushes each as a blob, then the image's manifest
/// (and, for a multi-platform image, its index) again with every indexed layer's descriptor
/// annotated with its index digest, under `tag` in the image's repository. Returns the digest
/// the tag now names. Layers without an index in `indexes` are left as they are.
pub async fn bind_indexes(
    client: &RegistryClient,
    store: &Store,
    image: &ImageRecord,
    indexes: &[Publishable],
    tag: &str,
) -> Result<Digest, PublishError> {
    let mut manifest = stored_manifest(store, image)?;
    if pin_indexes(client, image, &mut manifest, indexes).await? == 0 {
        return Err(invalid(image, "no layer of the image has an index to bind"));
    }
    push_again(client, store, image, &manifest, tag).await
}

/// Pushes each of `indexes` (its window file first) and annotates the descriptors of the
/// layers it describes in `manifest` (the image's, edited) with its digest. Returns how many
/// descriptors it annotated.
async fn pin_indexes(
    client: &RegistryClient,
    image: &ImageRecord,
    manifest: &mut Value,
    indexes: &[Publishable],
) -> Result<usize, PublishError> {
    let reference = reference_of(image)?;
    let layers = manifest["layers"]
        .as_array_mut()
        .ok_or_else(|| invalid(image, "stored manifest has no layers"))?;
    let mut bound = 0;
    for published in indexes {
        let index = &published.0;
        push_windows(client, &reference, image, published).await?;
        let blob =
            crate::layer::packed::pack(&serde_json::to_vec(index).expect("index serializes"));
        let digest = client.push_blob(&reference, &blob).await?;
        for desc in layers
            .iter_mut()
            .filter(|d| d["digest"] == index.blob.as_ref())
        {
            if !desc["annotations"].is_object() {
                desc["annotations"] = json!({});
            }
            desc["annotations"][crate::fs::INDEX_ANNOTATION] = json!(digest);
            bound += 1;
        }
    }
    Ok(bound)
}

/// Publishes `profile` bound to the image: pushes it as a blob (zstd-compressed JSON,
/// [`crate::layer::packed`]), then the image's manifest (and index) again with the manifest
/// annotated [`PROFILE_ANNOTATION`] = its digest and, for each of `indexes` (built for the
/// profile: [`crate::fs::Layers::shaped_for_profile`]), its layer's descriptor pinning that
/// index instead of the one it pinned, under `tag`; `pack`, the blob the profile's pack names,
/// is pushed first. Returns the digest the tag now names.
///
/// [`PROFILE_ANNOTATION`]: crate::profile::PROFILE_ANNOTATION
pub async fn bind_profile(
    client: &RegistryClient,
    store: &Store,
    image: &ImageRecord,
    profile: &crate::profile::Profile,
    indexes: &[Publishable],
    pack: Option<&[u8]>,
    tag: &str,
) -> Result<Digest, PublishError> {
    let reference = reference_of(image)?;
    let mut manifest = stored_manifest(store, image)?;
    pin_indexes(client, image, &mut manifest, indexes).await?;
    if let Some(pack) = pack {
        client.push_blob(&reference, pack).await?;
    }
    let blob = profile.packed();
    let digest = client.push_blob(&reference, &blob).await?;
    if !manifest["annotations"].is_object() {
        manifest["annotations"] = json!({});
    }
    manifest["annotations"][crate::profile::PROFILE_ANNOTATION] = json!(digest);
    push_again(client, store, image, &manifest, tag).await
}

/// The repository and tag to push a re-bound `image` under: `tag`, else its own tag.
pub fn bound_tag(
    image: &ImageRecord,
    tag: Option<&str>,
) -> Result<(Reference, String), PublishError> {
    let reference = reference_of(image)?;
    let tag = tag.or(reference.tag()).map(str::to_string);
    match tag {
        Some(tag) => Ok((reference, tag)),
        None => Err(invalid(
            image,
            "no tag to push the bound image under: give --tag TAG",
        )),
    }
}

fn reference_of(image: &ImageRecord) -> Result<Reference, PublishError> {
    image
        .name
        .parse()
        .map_err(|_| invalid(image, "invalid name"))
}

fn stored_manifest(store: &Store, image: &ImageRecord) -> Result<Value, PublishError> {
    serde_json::from_slice(&store.content.get(&image.manifest.digest)?)
        .map_err(|e| invalid(image, &format!("stored manifest: {e}")))
}

/// Pushes `manifest` (an edited copy of `image`'s) under `tag`; for a multi-platform image,
/// by digest, and then the image index with this platform's entry pointing at it under `tag`.
/// Returns the digest `tag` names.
async fn push_again(
    client: &RegistryClient,
    store: &Store,
    image: &ImageRecord,
    manifest: &Value,
    tag: &str,
) -> Result<Digest, PublishError> {
    let reference = reference_of(image)?;
    let bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
    let digest = crate::digest::sha256(&bytes);
    let media_type = image.manifest.media_type.as_str();
    if image.target.digest == image.manifest.digest {
        client
            .push_manifest(&reference, tag, media_type, &bytes)
            .await?;
        return Ok(digest);
    }
    // A multi-platform image: push the platform manifest by digest, then the index with this
    // platform's entry pointing at it.
    client
        .push_manifest(&reference, digest.as_ref(), media_type, &bytes)
        .await?;
    let mut list: Value = serde_json::from_slice(&store.content.get(&image.target.digest)?)
        .map_err(|e| invalid(image, &format!("stored index: {e}")))?;
    for m in list["manifests"].as_array_mut().into_iter().flatten() {
        if m["digest"] == image.manifest.digest.as_ref() {
            m["digest"] = json!(digest);
            m["size"] = json!(bytes.len());
        }
    }
    let list = serde_json::to_vec(&list).expect("index serializes");
    let list_digest = crate::digest::sha256(&list);
    client
        .push_manifest(&reference, tag, &image.target.media_type, &list)
        .await?;
    Ok(list_digest)
}

/// [`adopt_referrer_indexes`] when the user opted in (`[index] published` and
/// `unbound_referrers`), best effort: a failure is logged (the layers are then indexed by
/// streaming). Returns how many layers adopted an index.
pub async fn adopt_if_opted_in(
    client: &dyn Registry,
    store: &Store,
    image: &ImageRecord,
    settings: &crate::config::IndexSettings,
) -> usize {
    if !settings.published || !settings.unbound_referrers {
        return 0;
    }
    let limits = Limits::from(settings);
    match adopt_referrer_indexes(client, store, image, &limits).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(image = %image.name, error = %e, "published indexes unavailable");
            0
        }
    }
}

/// Finds a stratafs index artifact among the referrers of `image`'s manifest and adopts its
/// indexes for the layers that have none pinned: stores each (digest-checked, matched to the
/// layer, validated) under its own digest and records it in the image record as
/// `referrer_index`. Only for users who opted in (`[index] unbound_referrers`): nothing in the
/// image vouches for these. Returns how many layers adopted one.
pub async fn adopt_referrer_indexes(
    client: &dyn Registry,
    store: &Store,
    image: &ImageRecord,
    limits: &Limits,
) -> Result<usize, PublishError> {
    let indexes = IndexStore::new(store.root());
    let missing: Vec<usize> = (0..image.layers.len())
        .filter(|&i| crate::fs::pinned_index(&image.layers[i]).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let reference = reference_of(image)?;
    let subject = &image.manifest.digest;
    let referrers = match client
        .referrers((&reference, subject), ARTIFACT_TYPE)
        .await?
    {
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
    let manifest = client.fetch_manifest((&reference, &digest)).await?;
    let manifest: Value = serde_json::from_slice(&manifest.data)
        .map_err(|e| invalid(image, &format!("index artifact {digest}: {e}")))?;
    if manifest["subject"]["digest"] != subject.as_ref() {
        return Err(invalid(
            image,
            &format!("index artifact {digest} is for another manifest"),
        ));
    }
    let mut record = image.clone();
    let mut adopted = 0;
    for i in missing {
        let layer = &image.layers[i];
        let Some(desc) = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["annotations"][LAYER_ANNOTATION] == layer.digest.as_ref()
                    && (d["mediaType"] == LAYER_INDEX_TYPE
                        || d["mediaType"] == LAYER_INDEX_GZIP_TYPE)
            })
        else {
            continue;
        };
        let pin = digest_field(image, &desc["digest"])?;
        let blob = client
            .fetch_blob((&reference, &pin), Some(crate::registry::MAX_INDEX_BLOB))
            .await?;
        let json = match crate::layer::packed::unpack(&blob, limits.max_toc_bytes) {
            Ok(json) => json,
            Err(e) => {
                tracing::warn!(layer = %layer.digest, error = %e, "referrer index unreadable; ignored");
                continue;
            }
        };
        let index: LayerIndex = match serde_json::from_slice(&json) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(layer = %layer.digest, error = %e, "referrer index unreadable; ignored");
                continue;
            }
        };
        if let Err(e) = crate::fs::check_published(&index, layer, limits) {
            tracing::warn!(layer = %layer.digest, error = %e, "referrer index unusable; ignored");
            continue;
        }
        let mut index = index;
        index.published = Some(pin.clone());
        indexes.put(&index, Some(&pin))?;
        tracing::warn!(image = %image.name, layer = %layer.digest, index = %pin, "adopted a referrer index the image does not pin ([index] unbound_referrers)");
        record.layers[i].referrer_index = Some(pin);
        adopted += 1;
    }
    if adopted > 0 {
        let _lock = store.lock_shared()?;
        // Written onto the record as it is now, if it is still this image (not re-pulled to
        // another manifest meanwhile).
        if let Some(mut now) = store.images.get(&image.name)? {
            if now.manifest.digest == image.manifest.digest {
                for (layer, adopted) in now.layers.iter_mut().zip(&record.layers) {
                    if layer.digest == adopted.digest && adopted.referrer_index.is_some() {
                        layer.referrer_index = adopted.referrer_index.clone();
                    }
                }
                store.images.put(&now)?;
            }
        }
    }
    Ok(adopted)
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
