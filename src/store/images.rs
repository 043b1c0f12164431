//! The image store (name → [`ImageRecord`]) and the chain store (ChainID → [`ChainRecord`]).
//!
//! Image records are files named by the sha256 of the image name, so names of any shape map to
//! safe file names and two pulls of one name replace the file atomically (last writer wins, both
//! succeed). Chain records depend only on layer content, so concurrent writers write equal bytes.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{io_err, write_atomic, StoreError};
use crate::image::{ImageRecord, LayerRecord};

/// A stack of layers named by its ChainID: the top layer and the chain below it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    pub chain_id: Digest,
    pub parent: Option<Digest>,
    pub layer: LayerRecord,
}

/// Image and chain records on disk.
#[derive(Clone, Debug)]
pub struct ImageStore {
    images: PathBuf,
    chains: PathBuf,
    tmp: PathBuf,
}

impl ImageStore {
    pub(super) fn new(images: PathBuf, chains: PathBuf, tmp: PathBuf) -> Self {
        ImageStore {
            images,
            chains,
            tmp,
        }
    }

    fn image_path(&self, name: &str) -> PathBuf {
        let key = crate::digest::sha256(name.as_bytes());
        self.images.join(format!("{}.json", key.digest()))
    }

    fn chain_path(&self, chain_id: &Digest) -> PathBuf {
        self.chains.join(format!("{}.json", chain_id.digest()))
    }

    /// Stores `record` under its name, replacing any previous record.
    pub fn put(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let data = serde_json::to_vec_pretty(record).expect("image record serializes");
        write_atomic(&self.tmp, &self.image_path(&record.name), &data)
    }

    /// The record for `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        read_json(&self.image_path(name))
    }

    /// Every image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut out: Vec<ImageRecord> = list_json(&self.images)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes the record for `name`.
    pub(super) fn remove(&self, name: &str) -> Result<ImageRecord, StoreError> {
        let path = self.image_path(name);
        let record = self
            .get(name)?
            .ok_or_else(|| StoreError::ImageNotFound(name.to_string()))?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        Ok(record)
    }

    pub fn put_chain(&self, record: &ChainRecord) -> Result<(), StoreError> {
        let path = self.chain_path(&record.chain_id);
        if path.is_file() {
            return Ok(());
        }
        let data = serde_json::to_vec_pretty(record).expect("chain record serializes");
        write_atomic(&self.tmp, &path, &data)
    }

    pub fn get_chain(&self, chain_id: &Digest) -> Result<Option<ChainRecord>, StoreError> {
        read_json(&self.chain_path(chain_id))
    }

    pub fn list_chains(&self) -> Result<Vec<Digest>, StoreError> {
        let records: Vec<ChainRecord> = list_json(&self.chains)?;
        Ok(records.into_iter().map(|r| r.chain_id).collect())
    }

    pub(super) fn delete_chain(&self, chain_id: &Digest) -> Result<(), StoreError> {
        let path = self.chain_path(chain_id);
        fs::remove_file(&path).map_err(io_err(&path))
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn list_json<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Some(v) = read_json(&path)? {
                out.push(v);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;
    use crate::image::{Descriptor, Platform};

    fn record(name: &str, blob: &[u8]) -> ImageRecord {
        let d = crate::digest::sha256(blob);
        let desc = Descriptor {
            media_type: crate::image::media::OCI_MANIFEST.into(),
            digest: d.clone(),
            size: blob.len() as u64,
        };
        ImageRecord {
            name: name.into(),
            target: desc.clone(),
            manifest: desc.clone(),
            config: desc,
            platform: Platform::host(),
            layers: vec![LayerRecord {
                digest: d.clone(),
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                size: 1,
                annotations: Default::default(),
                diff_id: d.clone(),
                chain_id: d,
                referrer_index: None,
            }],
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            labels: Default::default(),
        }
    }

    #[test]
    fn remove_collects_only_unreferenced_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (name, blob) in [
            ("a.io/x:1", &b"one"[..]),
            ("a.io/y:1", b"two"),
            ("a.io/z:1", b"two"),
        ] {
            let r = record(name, blob);
            store.content.put(&r.target.digest, blob).unwrap();
            store
                .images
                .put_chain(&ChainRecord {
                    chain_id: r.layers[0].chain_id.clone(),
                    parent: None,
                    layer: r.layers[0].clone(),
                })
                .unwrap();
            store.images.put(&r).unwrap();
        }
        assert_eq!(store.images.list().unwrap().len(), 3);
        store.remove_image("a.io/y:1").unwrap();
        assert!(
            store.content.contains(&crate::digest::sha256(b"two")),
            "still used by z"
        );
        store.remove_image("a.io/x:1").unwrap();
        assert!(!store.content.contains(&crate::digest::sha256(b"one")));
        assert_eq!(store.images.list_chains().unwrap().len(), 1);
        let err = store.remove_image("a.io/x:1").unwrap_err().to_string();
        assert!(err.contains("a.io/x:1"), "{err}");
        assert_eq!(store.images.list().unwrap()[0].name, "a.io/z:1");
    }
}
