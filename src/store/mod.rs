//! The metadata store on disk, after the registry stage: what `pull` keeps and everything later
//! stages read to present an image.
//!
//! Layout under the root (containerd's model):
//! - `content/blobs/<alg>/<hex>`: small blobs by digest (indexes, manifests, configs), verified
//!   on write and on read;
//! - `images/<sha256(name)>.json`: the image store, name → [`ImageRecord`];
//! - `chains/<hex>.json`: ChainID → [`ChainRecord`] (the layer on top and its parent chain);
//! - `tmp/`: files being written; `lock`: a file lock.
//!
//! Every file is written to `tmp/`, fsynced and renamed into place, so a crash leaves either the
//! old file or the new one. A pull fetches and verifies everything before it writes anything, then
//! commits under the shared lock: blobs, chains, and the image record last. Removal takes the
//! lock exclusively and collects blobs and chains no image references.

mod content;
mod images;
pub mod layout;

pub use layout::Layout;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use content::ContentStore;
pub use images::{ChainRecord, ImageStore};

use crate::image::ImageRecord;

/// Default store root.
pub const DEFAULT_ROOT: &str = "/var/lib/stratafs";

/// A store failure; messages name the path, digest or image concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt store entry {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("blob {0} is not in the content store")]
    BlobNotFound(oci_spec::image::Digest),
    #[error("image {0} is not in the store (pull it first)")]
    ImageNotFound(String),
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    #[error("{reference} matches {} images ({}): give more of the digest or a name", .names.len(), .names.join(", "))]
    Ambiguous {
        reference: String,
        names: Vec<String>,
    },
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The stratafs store at one root directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    pub content: ContentStore,
    pub images: ImageStore,
}

/// A held store lock (shared or exclusive); released on drop.
pub struct StoreLock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for dir in ["content/blobs", "images", "chains", "tmp"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let layout = Layout::new(&root);
        let tmp = layout.tmp();
        Ok(Store {
            content: ContentStore::new(layout.content_blobs(), tmp.clone()),
            images: ImageStore::new(layout.images(), layout.chains(), tmp),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = Layout::new(&self.root).lock();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        }
        .map_err(io_err(&path))?;
        Ok(StoreLock(file))
    }

    /// Lock held while adding content (many writers at once).
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        self.lock(false)
    }

    /// Lock held while removing content (alone).
    pub fn lock_exclusive(&self) -> Result<StoreLock, StoreError> {
        self.lock(true)
    }

    /// The stored image a reference given by a user names: a stored name (normalised first),
    /// else the digest — or a unique prefix of at least 4 hex digits — of a stored image's
    /// index or manifest, as `stratafs images` shows it.
    pub fn find_image(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let parsed = reference.parse::<crate::reference::Reference>();
        if let Ok(r) = &parsed {
            if let Some(image) = self.images.get(&r.to_string())? {
                return Ok(image);
            }
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut matches: Vec<ImageRecord> = self
                .images
                .list()?
                .into_iter()
                .filter(|i| {
                    i.target.digest.digest().starts_with(hex)
                        || i.manifest.digest.digest().starts_with(hex)
                })
                .collect();
            match matches.len() {
                1 => return Ok(matches.remove(0)),
                0 => {}
                _ => {
                    return Err(StoreError::Ambiguous {
                        reference: reference.to_string(),
                        names: matches.into_iter().map(|i| i.name).collect(),
                    })
                }
            }
        }
        Err(StoreError::ImageNotFound(parsed?.to_string()))
    }

    /// `stratafs inspect`: the record of the image `reference` names (as [`find_image`]),
    /// with its manifest and config, as one JSON object.
    ///
    /// [`find_image`]: Store::find_image
    pub fn inspect(&self, reference: &str) -> Result<serde_json::Value, StoreError> {
        let record = self.find_image(reference)?;
        let json = |d: &oci_spec::image::Digest| -> Result<serde_json::Value, StoreError> {
            serde_json::from_slice(&self.content.get(d)?).map_err(|e| StoreError::Corrupt {
                path: self.content.path(d),
                reason: e.to_string(),
            })
        };
        Ok(serde_json::json!({
            "record": record,
            "manifest": json(&record.manifest.digest)?,
            "config": json(&record.config.digest)?,
        }))
    }

    /// Removes the image `name` and collects content no remaining image references.
    pub fn remove_image(&self, name: &str) -> Result<ImageRecord, StoreError> {
        let _lock = self.lock_exclusive()?;
        let record = self.images.remove(name)?;
        self.collect_garbage_locked()?;
        Ok(record)
    }

    /// Collects what no image references (under the exclusive lock).
    pub fn collect_garbage(&self) -> Result<(), StoreError> {
        let _lock = self.lock_exclusive()?;
        self.collect_garbage_locked()
    }

    /// Deletes the window files (`layers/windows/<alg>-<hex>`) that no index in `layers/` names.
    fn collect_window_files(&self) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Named {
            windows: Option<Windows>,
        }
        #[derive(serde::Deserialize)]
        struct Windows {
            digest: String,
        }
        let dir = Layout::new(&self.root).layers();
        let Ok(files) = fs::read_dir(dir.join("windows")) else {
            return Ok(());
        };
        let mut named = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "json") {
                let data = fs::read(entry.path()).unwrap_or_default();
                if let Ok(Named { windows: Some(w) }) = serde_json::from_slice(&data) {
                    named.insert(w.digest.replacen(':', "-", 1));
                }
            }
        }
        for entry in files.flatten() {
            if !named.contains(&*entry.file_name().to_string_lossy()) {
                match fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err(&entry.path())(e))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Deletes blobs and chain records that no image references, and the per-layer files of
    /// layers no image has: layer indexes (`layers/<hex>.json`, `layers/<hex>@….json`) and the
    /// window files no remaining index names (`layers/windows/`), fetched-byte counters (`cache/fetched/<hex>`) and passthrough copies
    /// (`cache/files/<hex>-…`). Cached chunks are shared by content and left to the cache cap.
    /// Caller holds the exclusive lock.
    fn collect_garbage_locked(&self) -> Result<(), StoreError> {
        let mut blobs = HashSet::new();
        let mut chains = HashSet::new();
        let mut layers = HashSet::new();
        for image in self.images.list()? {
            blobs.extend([
                image.target.digest,
                image.manifest.digest,
                image.config.digest,
            ]);
            layers.extend(image.layers.iter().map(|l| l.digest.digest().to_string()));
            chains.extend(image.layers.into_iter().map(|l| l.chain_id));
        }
        // Layers a live mount serves (its record lists them) stay too, even if the image's
        // record moved on (re-pulled for another platform or tag target) or was removed.
        if let Ok(records) = fs::read_dir(Layout::new(&self.root).mounts()) {
            for record in records.flatten() {
                let Ok(data) = fs::read(record.path()) else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
                    continue;
                };
                let digests = v["layers"].as_array().into_iter().flatten();
                layers.extend(
                    digests
                        .filter_map(|d| d.as_str())
                        .map(|d| d.trim_start_matches("sha256:").to_string()),
                );
            }
        }
        // Each per-layer file's name starts with the layer's hex digest, up to `.`, `@` or `-`.
        for (dir, ends) in [
            ("layers", &['.', '@'][..]),
            ("cache/fetched", &['.'][..]),
            ("cache/files", &['-'][..]),
        ] {
            let dir = self.root.join(dir);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let hex = name.split(ends).next().unwrap_or("");
                if hex.len() == 64 && !layers.contains(hex) {
                    match fs::remove_file(entry.path()) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(io_err(&entry.path())(e))
                        }
                        _ => {}
                    }
                }
            }
        }
        self.collect_window_files()?;
        for digest in self.content.list()? {
            if !blobs.contains(&digest) {
                self.content.delete(&digest)?;
            }
        }
        for chain in self.images.list_chains()? {
            if !chains.contains(&chain) {
                self.images.delete_chain(&chain)?;
            }
        }
        Ok(())
    }
}

/// Writes `data` to `dest` atomically: a temp file in `tmp_dir`, fsync, rename, fsync of the
/// destination directory. `tmp_dir` must be on the same filesystem as `dest`.
pub fn write_atomic(tmp_dir: &Path, dest: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut tmp = tempfile::NamedTempFile::new_in(tmp_dir).map_err(io_err(tmp_dir))?;
    tmp.write_all(data).map_err(io_err(tmp.path()))?;
    commit_file(tmp, dest).map_err(io_err(dest))
}

/// Makes `tmp` (written in full, on the filesystem of `dest`) the file `dest`, durably: fsync,
/// rename over `dest`, fsync of `dest`'s directory. Every durable file of the store is
/// committed this way ([`write_atomic`] for files written at once); cache chunks alone skip
/// the fsyncs, since a chunk damaged by a crash fails verification and is fetched again.
pub fn commit_file(tmp: tempfile::NamedTempFile, dest: &Path) -> std::io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    if let Some(dir) = dest.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
