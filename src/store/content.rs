//! The content store: immutable blobs named by their digest, verified on the way in and out.

use std::fs;
use std::path::PathBuf;

use oci_spec::image::Digest;

use super::{io_err, write_atomic, StoreError};

/// Blobs by digest under `<root>/content/blobs/<alg>/<hex>`.
#[derive(Clone, Debug)]
pub struct ContentStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl ContentStore {
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        ContentStore { dir, tmp }
    }

    pub(super) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Stores `data` under `digest` after checking that it hashes to it. Idempotent.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
        crate::digest::verify(digest, data)?;
        if self.contains(digest) {
            return Ok(());
        }
        let path = self.path(digest);
        let dir = path.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_atomic(&self.tmp, &path, data)
    }

    /// Reads the blob `digest`, verifying it.
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::BlobNotFound(digest.clone()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        crate::digest::verify(digest, &data).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(data)
    }

    pub fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Every digest in the store (entries whose names are not digests are skipped).
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        let algs = match fs::read_dir(&self.dir) {
            Ok(a) => a,
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        for alg in algs {
            let alg = alg.map_err(io_err(&self.dir))?;
            let alg_path = alg.path();
            for blob in fs::read_dir(&alg_path).map_err(io_err(&alg_path))? {
                let blob = blob.map_err(io_err(&alg_path))?;
                let name = format!(
                    "{}:{}",
                    alg.file_name().to_string_lossy(),
                    blob.file_name().to_string_lossy()
                );
                if let Ok(d) = crate::digest::parse(&name) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Store;

    #[test]
    fn put_get_verify_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = crate::digest::sha256(b"manifest");
        assert!(
            store.content.put(&d, b"not it").is_err(),
            "wrong bytes refused"
        );
        assert!(!store.content.contains(&d));
        store.content.put(&d, b"manifest").unwrap();
        store.content.put(&d, b"manifest").unwrap();
        assert_eq!(store.content.get(&d).unwrap(), b"manifest");
        assert_eq!(store.content.list().unwrap(), vec![d.clone()]);
        // Damage on disk is detected on read.
        let path = dir.path().join("content/blobs/sha256").join(d.digest());
        std::fs::write(&path, b"manifesT").unwrap();
        let err = store.content.get(&d).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains(d.digest()), "{err}");
        // Nothing is left in tmp/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
