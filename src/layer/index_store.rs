//! Layer indexes on disk ([`IndexStore`]): where each index is kept, by the layer blob and by
//! what vouches for it, and the window files of gzip indexes built here.

use std::io;
use std::path::PathBuf;

use super::{LayerError, LayerIndex, Windows, INDEX_VERSION, OLDEST_INDEX_VERSION};
use oci_spec::image::Digest;

/// Layer indexes on disk, keyed by the layer blob *and by what vouches for the index*:
///
/// - `<root>/layers/<blob hex>.json`: built here by a streaming pass over the blob, verified
///   against its digest and diff_id ([`build_index`](super::build_index)). Derived from the layer's bytes alone, so
///   it serves every image that has the layer.
/// - `<root>/layers/<blob hex>@<pin algorithm>-<pin hex>.json`: built from something one image's manifest pins —
///   an eStargz TOC digest, a zstd:chunked checksum, a stratafs index digest (or a referrer
///   index the user opted in to). It serves only images whose layer record carries the same
///   pin, so an index trusted for one image never serves another that did not vouch for it.
/// - `<root>/layers/windows/<algorithm>-<hex>`: window files of gzip indexes built here, by
///   their digest (an index names its own; a published one's are read from the registry).
#[derive(Clone, Debug)]
pub struct IndexStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl IndexStore {
    pub fn new(root: &std::path::Path) -> IndexStore {
        IndexStore {
            dir: crate::store::Layout::new(root).layers(),
            tmp: crate::store::Layout::new(root).tmp(),
        }
    }

    fn path(&self, blob: &Digest, pin: Option<&Digest>) -> PathBuf {
        match pin {
            None => self.dir.join(format!("{}.json", blob.digest())),
            Some(p) => self.dir.join(format!(
                "{}@{}-{}.json",
                blob.digest(),
                p.algorithm(),
                p.digest()
            )),
        }
    }

    /// The stored index for `blob` vouched for by `pin` (`None`: built here from the verified
    /// blob), if there is a current-version one.
    pub fn get(
        &self,
        blob: &Digest,
        pin: Option<&Digest>,
    ) -> Result<Option<LayerIndex>, LayerError> {
        let path = self.path(blob, pin);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LayerError::Store {
                    path,
                    detail: e.to_string(),
                })
            }
        };
        let index: LayerIndex = serde_json::from_slice(&data).map_err(|e| LayerError::Store {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let readable = (OLDEST_INDEX_VERSION..=INDEX_VERSION).contains(&index.version);
        Ok((readable && &index.blob == blob).then_some(index))
    }

    /// Any stored index of `blob` (the verified one first): for reports, never for serving.
    pub fn get_any(&self, blob: &Digest) -> Result<Option<LayerIndex>, LayerError> {
        if let Some(i) = self.get(blob, None)? {
            return Ok(Some(i));
        }
        let prefix = format!("{}@", blob.digest());
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Ok(None);
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pin) = name
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if let Ok(pin) = crate::digest::parse(&pin.replacen('-', ":", 1)) {
                if let Some(i) = self.get(blob, Some(&pin))? {
                    return Ok(Some(i));
                }
            }
        }
        Ok(None)
    }

    /// Where the window file `digest` is kept.
    pub fn windows_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("windows")
            .join(format!("{}-{}", digest.algorithm(), digest.digest()))
    }

    /// A temporary file to write a window file into while an index is built; [`keep_windows`]
    /// moves it into place once the index is known good.
    ///
    /// [`keep_windows`]: IndexStore::keep_windows
    pub fn new_windows(&self) -> Result<tempfile::NamedTempFile, LayerError> {
        std::fs::create_dir_all(&self.tmp).map_err(|e| LayerError::Store {
            path: self.tmp.clone(),
            detail: e.to_string(),
        })?;
        tempfile::NamedTempFile::new_in(&self.tmp).map_err(|e| LayerError::Store {
            path: self.tmp.clone(),
            detail: e.to_string(),
        })
    }

    /// Keeps the window file written to `file` (whose digest the builder computed as
    /// `windows`), synced, under its digest; `None` (no window): the file is dropped.
    pub fn keep_windows(
        &self,
        file: tempfile::NamedTempFile,
        windows: Option<&Windows>,
    ) -> Result<(), LayerError> {
        let Some(w) = windows else { return Ok(()) };
        let path = self.windows_path(&w.digest);
        let err = |e: io::Error| LayerError::Store {
            path: path.clone(),
            detail: e.to_string(),
        };
        // Replaced even if present (the same bytes, or a damaged copy): the rename is atomic.
        let dir = path.parent().expect("windows dir");
        std::fs::create_dir_all(dir).map_err(err)?;
        crate::store::commit_file(file, &path).map_err(err)
    }

    /// Whether an index for `blob` vouched for by `pin` is stored (not read: it may still turn
    /// out unusable).
    pub fn has(&self, blob: &Digest, pin: Option<&Digest>) -> bool {
        self.path(blob, pin).is_file()
    }

    /// Whether `index` needs no window file or has its window file here (of the right size).
    pub fn has_windows(&self, index: &LayerIndex) -> bool {
        index.windows.as_ref().is_none_or(|w| {
            std::fs::metadata(self.windows_path(&w.digest)).is_ok_and(|m| m.len() == w.size)
        })
    }

    /// The bytes of `index`'s window file, if it is kept here (to publish it).
    pub fn windows_bytes(&self, index: &LayerIndex) -> Result<Option<Vec<u8>>, LayerError> {
        let Some(w) = &index.windows else {
            return Ok(None);
        };
        let path = self.windows_path(&w.digest);
        let data = std::fs::read(&path).map_err(|e| LayerError::Store {
            path: path.clone(),
            detail: format!("{e} (build the index again: `stratafs index build`)"),
        })?;
        crate::digest::verify(&w.digest, &data).map_err(|e| LayerError::Store {
            path,
            detail: e.to_string(),
        })?;
        Ok(Some(data))
    }

    /// Stores `index` under what vouches for it (`None`: built here from the verified blob).
    pub fn put(&self, index: &LayerIndex, pin: Option<&Digest>) -> Result<(), LayerError> {
        let path = self.path(&index.blob, pin);
        let store_err = |detail: String| LayerError::Store {
            path: path.clone(),
            detail,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| store_err(e.to_string()))?;
        let data = serde_json::to_vec(index).expect("index serializes");
        crate::store::write_atomic(&self.tmp, &path, &data).map_err(|e| store_err(e.to_string()))
    }
}
