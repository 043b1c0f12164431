//! Every path under a store root, in one place (docs/architecture.md, "Store layout"). Other
//! modules ask this for their directories and never join literal names onto the root.

use std::path::{Path, PathBuf};

/// The directories and files of the store at one root.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Files being written (temp + fsync + rename), on the same filesystem as their targets.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The store lock: shared while adding, exclusive while removing.
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// Indexes, manifests and configs by digest.
    pub fn content_blobs(&self) -> PathBuf {
        self.root.join("content/blobs")
    }

    /// Image records by name.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// ChainID records.
    pub fn chains(&self) -> PathBuf {
        self.root.join("chains")
    }

    /// Layer indexes (and, in `windows/`, gzip checkpoint windows).
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Verified uncompressed spans by their own digest.
    pub fn chunks(&self) -> PathBuf {
        self.root.join("cache/chunks")
    }

    /// Whole files assembled from cached spans, for passthrough.
    pub fn files(&self) -> PathBuf {
        self.root.join("cache/files")
    }

    /// Bytes fetched per layer blob.
    pub fn fetched(&self) -> PathBuf {
        self.root.join("cache/fetched")
    }

    /// Startup profiles by rootfs ChainID.
    pub fn profiles(&self) -> PathBuf {
        self.root.join("profiles")
    }

    /// Records (and open-mode logs) of live mounts.
    pub fn mounts(&self) -> PathBuf {
        self.root.join("run/mounts")
    }

    /// Mount daemon logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The snapshotter's metadata and snapshot directories.
    pub fn snapshotter(&self) -> PathBuf {
        self.root.join("snapshotter")
    }
}
