//! `pull`: resolve a reference and store everything needed to present the image later —
//! manifests, config, diff_ids and ChainIDs — without downloading any layer data.
//!
//! Stages 1–3 of the pipeline in one call. Everything is fetched and verified in memory first
//! (digests, sizes, media types, diff_id count); only then is it committed to the store, image
//! record last, so a failed pull leaves the store as it was.

use std::collections::BTreeMap;

use oci_spec::image::{Digest, ImageConfiguration, ImageIndex, ImageManifest};

use crate::image::{chain_ids, media, Compression, Descriptor, ImageRecord, LayerRecord, Platform};
use crate::reference::Reference;
use crate::registry::{Fetched, Registry, RegistryError};
use crate::store::{ChainRecord, Store, StoreError};

/// Annotation that marks attestation manifests inside an index (BuildKit).
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// Why a pull failed. Messages name the reference.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{reference}: no image for platform {wanted}; the image offers: {available}")]
    NoPlatform {
        reference: String,
        wanted: Platform,
        available: String,
    },
    #[error("{reference}: {what} has media type {media_type}, which is not a container image")]
    NotAnImage {
        reference: String,
        what: String,
        media_type: String,
    },
    #[error("{reference}: layer {digest} has unsupported media type {media_type}")]
    UnsupportedLayer {
        reference: String,
        digest: Digest,
        media_type: String,
    },
    #[error("{reference}: invalid {what}: {detail}")]
    Invalid {
        reference: String,
        what: String,
        detail: String,
    },
}

/// Pulls `reference` for `platform` into `store`; `progress` is told what is happening.
pub async fn pull(
    client: &dyn Registry,
    store: &Store,
    reference: &Reference,
    platform: &Platform,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ImageRecord, PullError> {
    pull_with(client, store, reference, platform, progress, &|_| {}).await
}

/// [`pull`], telling `manifest_known` the image's manifest as soon as it is parsed, before the
/// config is fetched (a mount starts its layers' first requests then: `fs/early.rs`). What
/// it is told is not checked against the config yet; the pull's own checks follow as usual.
pub async fn pull_with(
    client: &dyn Registry,
    store: &Store,
    reference: &Reference,
    platform: &Platform,
    progress: &(dyn Fn(&str) + Sync),
    manifest_known: &(dyn Fn(&ImageManifest) + Sync),
) -> Result<ImageRecord, PullError> {
    let invalid = |what: &str, detail: String| PullError::Invalid {
        reference: reference.to_string(),
        what: what.to_string(),
        detail,
    };
    progress(&format!("resolving {reference}"));
    let root = client.resolve(reference).await?;
    let target = descriptor(&root);

    let manifest = if media::is_index(&root.media_type) {
        let index: ImageIndex = serde_json::from_slice(&root.data)
            .map_err(|e| invalid(&format!("index {}", root.digest), e.to_string()))?;
        let chosen = choose_platform(&index, platform).ok_or_else(|| PullError::NoPlatform {
            reference: reference.to_string(),
            wanted: platform.clone(),
            available: available_platforms(&index),
        })?;
        progress(&format!("fetching manifest {}", chosen.digest()));
        let fetched = client.fetch_manifest((reference, chosen.digest())).await?;
        check_size(
            "manifest",
            &fetched.digest,
            chosen.size(),
            fetched.data.len(),
        )
        .map_err(|d| invalid("index", d))?;
        if !media::is_manifest(&fetched.media_type) {
            return Err(PullError::NotAnImage {
                reference: reference.to_string(),
                what: format!("manifest {}", fetched.digest),
                media_type: fetched.media_type,
            });
        }
        fetched
    } else if media::is_manifest(&root.media_type) {
        root.clone()
    } else {
        return Err(PullError::NotAnImage {
            reference: reference.to_string(),
            what: "the manifest".into(),
            media_type: root.media_type,
        });
    };

    let parsed: ImageManifest = serde_json::from_slice(&manifest.data)
        .map_err(|e| invalid(&format!("manifest {}", manifest.digest), e.to_string()))?;
    let config_desc = parsed.config();
    let config_media_type = config_desc.media_type().to_string();
    if !media::is_config(&config_media_type) {
        return Err(PullError::NotAnImage {
            reference: reference.to_string(),
            what: format!("config {}", config_desc.digest()),
            media_type: config_media_type,
        });
    }
    manifest_known(&parsed);
    progress(&format!("fetching config {}", config_desc.digest()));
    let config_data = client
        .fetch_blob((reference, config_desc.digest()), None)
        .await?;
    check_size(
        "config",
        config_desc.digest(),
        config_desc.size(),
        config_data.len(),
    )
    .map_err(|d| invalid("manifest", d))?;
    let config: ImageConfiguration = serde_json::from_slice(&config_data)
        .map_err(|e| invalid(&format!("config {}", config_desc.digest()), e.to_string()))?;

    let image_platform = Platform {
        os: config.os().to_string(),
        architecture: config.architecture().to_string(),
        variant: config.variant().clone(),
    };
    if !platform.matches(&image_platform) {
        return Err(PullError::NoPlatform {
            reference: reference.to_string(),
            wanted: platform.clone(),
            available: image_platform.to_string(),
        });
    }

    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| crate::digest::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("config", e.to_string()))?;
    if diff_ids.len() != parsed.layers().len() {
        return Err(invalid(
            "image",
            format!(
                "manifest lists {} layers but the config has {} diff_ids",
                parsed.layers().len(),
                diff_ids.len()
            ),
        ));
    }
    let chains = chain_ids(&diff_ids);
    let mut layers = Vec::with_capacity(diff_ids.len());
    for ((layer, diff_id), chain_id) in parsed.layers().iter().zip(diff_ids).zip(chains) {
        let media_type = layer.media_type().to_string();
        if Compression::of_layer(&media_type).is_none() {
            return Err(PullError::UnsupportedLayer {
                reference: reference.to_string(),
                digest: layer.digest().clone(),
                media_type,
            });
        }
        layers.push(LayerRecord {
            digest: layer.digest().clone(),
            media_type,
            size: layer.size(),
            annotations: layer
                .annotations()
                .clone()
                .map(|a| a.into_iter().collect())
                .unwrap_or_default(),
            diff_id,
            chain_id,
            referrer_index: None,
        });
    }

    let now = chrono::Utc::now();
    let mut record = ImageRecord {
        name: reference.to_string(),
        target,
        manifest: descriptor(&manifest),
        config: Descriptor {
            media_type: config_media_type,
            digest: config_desc.digest().clone(),
            size: config_desc.size(),
        },
        platform: image_platform,
        layers,
        created_at: now,
        updated_at: now,
        labels: BTreeMap::new(),
    };
    commit(store, &root, &manifest, &config_data, &mut record)?;
    Ok(record)
}

/// Writes verified metadata to the store under the shared lock, image record last.
fn commit(
    store: &Store,
    root: &Fetched,
    manifest: &Fetched,
    config: &[u8],
    record: &mut ImageRecord,
) -> Result<(), StoreError> {
    let _lock = store.lock_shared()?;
    store.content.put(&root.digest, &root.data)?;
    store.content.put(&manifest.digest, &manifest.data)?;
    store.content.put(&record.config.digest, config)?;
    let mut parent = None;
    for layer in &record.layers {
        store.images.put_chain(&ChainRecord {
            chain_id: layer.chain_id.clone(),
            parent: parent.replace(layer.chain_id.clone()),
            layer: layer.clone(),
        })?;
    }
    if let Some(previous) = store.images.get(&record.name)? {
        record.created_at = previous.created_at;
        record.labels = previous.labels;
    }
    store.images.put(record)
}

fn descriptor(f: &Fetched) -> Descriptor {
    Descriptor {
        media_type: f.media_type.clone(),
        digest: f.digest.clone(),
        size: f.data.len() as u64,
    }
}

fn check_size(what: &str, digest: &Digest, declared: u64, actual: usize) -> Result<(), String> {
    if declared == actual as u64 {
        Ok(())
    } else {
        Err(format!(
            "{what} {digest} is {actual} bytes but its descriptor says {declared}"
        ))
    }
}

/// The manifest in `index` for `wanted`: the first entry whose platform matches, preferring an
/// exact variant match; attestation manifests are never chosen.
fn choose_platform<'a>(
    index: &'a ImageIndex,
    wanted: &Platform,
) -> Option<&'a oci_spec::image::Descriptor> {
    let candidates: Vec<(&oci_spec::image::Descriptor, Platform)> = index
        .manifests()
        .iter()
        .filter(|d| {
            !d.annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key(REFERENCE_TYPE))
        })
        .filter_map(|d| d.platform().as_ref().map(|p| (d, to_platform(p))))
        .filter(|(_, p)| wanted.matches(p))
        .collect();
    candidates
        .iter()
        .find(|(_, p)| p.variant == wanted.variant)
        .or_else(|| candidates.first())
        .map(|(d, _)| *d)
}

fn to_platform(p: &oci_spec::image::Platform) -> Platform {
    Platform {
        os: p.os().to_string(),
        architecture: p.architecture().to_string(),
        variant: p.variant().clone(),
    }
}

fn available_platforms(index: &ImageIndex) -> String {
    let list: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| d.platform().as_ref().map(|p| to_platform(p).to_string()))
        .collect();
    if list.is_empty() {
        "no platforms".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, Option<&str>, &str)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (p, annotation, _))| {
                let p = Platform::parse(p).unwrap();
                let mut d = serde_json::json!({
                    "mediaType": media::OCI_MANIFEST,
                    "digest": crate::digest::sha256(&[i as u8]).to_string(),
                    "size": i + 1,
                    "platform": {"os": p.os, "architecture": p.architecture},
                });
                if let Some(v) = p.variant {
                    d["platform"]["variant"] = v.into();
                }
                if let Some(a) = annotation {
                    d["annotations"] = serde_json::json!({ REFERENCE_TYPE: a });
                }
                d
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests
        }))
        .unwrap()
    }

    #[test]
    fn chooses_matching_platform_and_skips_attestations() {
        let idx = index(&[
            ("linux/amd64", Some("attestation-manifest"), ""),
            ("linux/arm/v6", None, ""),
            ("linux/arm/v7", None, ""),
            ("linux/amd64", None, ""),
        ]);
        let want = |s| Platform::parse(s).unwrap();
        assert_eq!(
            choose_platform(&idx, &want("linux/amd64")).unwrap().size(),
            4
        );
        assert_eq!(
            choose_platform(&idx, &want("linux/arm/v7")).unwrap().size(),
            3
        );
        assert_eq!(choose_platform(&idx, &want("linux/arm")).unwrap().size(), 3);
        assert!(choose_platform(&idx, &want("linux/s390x")).is_none());
        assert_eq!(
            available_platforms(&idx),
            "linux/amd64, linux/arm/v6, linux/arm/v7, linux/amd64"
        );
    }
}
