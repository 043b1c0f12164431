//! What can go wrong presenting or reading an image, and the errno each failure becomes.

use crate::cache::CacheError;
use crate::layer::LayerError;
use crate::tree::TreeError;

/// A failure to present or read an image; messages name the image, layer or path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{image}: {source}")]
    Tree { image: String, source: TreeError },
    #[error("{image}: published index {index}: {detail}")]
    Published {
        image: String,
        index: String,
        detail: String,
    },
    #[error("{image}: unsupported layer media type {media_type}")]
    Unsupported { image: String, media_type: String },
    #[error("{image}: no such file or directory: /{path}")]
    NotFound { image: String, path: String },
    #[error("{image}: /{path} is not a regular file")]
    NotAFile { image: String, path: String },
    #[error("local copy {path}: {source}")]
    Local {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid image name {0}")]
    Name(String),
    #[error("layer {blob}: the index it was served with does not match the layer ({detail}); replaced by an index built from the layer")]
    IndexMismatch { blob: String, detail: String },
}

impl FsError {
    /// The errno a filesystem call failing with this error returns: the one mapping for every
    /// front end (FUSE today). Local I/O errors keep theirs (ENOSPC, EACCES, …); a missing or
    /// wrong path is ENOENT or EISDIR; what the registry or a damaged layer caused is EIO.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound { .. } => libc::ENOENT,
            FsError::NotAFile { .. } => libc::EISDIR,
            FsError::Name(_) => libc::EINVAL,
            FsError::Local { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Cache(e) => e.io().and_then(|s| s.raw_os_error()).unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}
