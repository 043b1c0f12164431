//! Reads that need no waiting: bytes already in the chunk cache, served on the calling thread
//! (no async task), and whole cached files for the kernel's page cache.
//!
//! [`ImageView::read_ready`] serves a read whose every span is in memory (or, where the caller
//! may wait for the disk, on disk and verified by this process) with the bookkeeping of
//! [`ImageView::read_for`]: the handle's read-ahead state and the startup profile's record.
//! [`ImageView::file_bytes_ready`] gives all of a file whose bytes are cached, so that the
//! adapter can hand it to the kernel at its open, before the program reads it one small read
//! at a time. Nothing here fetches; every byte comes from the verified cache.

use super::{FsError, ImageView};
use crate::layer::reader::{LayerReader, Ready};
use crate::tree::{FileType, NodeId};

impl ImageView {
    /// The layer reader of regular file `node`, its data's offset in the layer, and its size.
    fn file_data(&self, node: NodeId) -> Option<(&LayerReader, usize, u64, u64)> {
        let n = self.tree.node(node);
        let (layer, data_offset) = n.data.filter(|_| n.file_type == FileType::File)?;
        Some((&self.readers[layer], layer, data_offset, n.size))
    }

    /// As [`read_for`](Self::read_for) when the bytes can be served at once, on the calling
    /// thread ([`LayerReader::read_ready`]: with `disk_ok`, from the disk too, so only from a
    /// thread that may wait for it); [`Ready::OnDisk`] or [`Ready::Fetch`] (nothing recorded):
    /// as they say, the disk from another thread, or `read_for`.
    pub fn read_ready(
        &self,
        handle: u64,
        node: NodeId,
        offset: u64,
        len: u64,
        disk_ok: bool,
    ) -> Result<Ready, FsError> {
        let Some((reader, layer, data_offset, size)) = self.file_data(node) else {
            return Ok(Ready::Fetch);
        };
        if offset >= size {
            return Ok(Ready::Fetch);
        }
        let len = len.min(size - offset);
        let ready = reader.read_ready(data_offset + offset, len, disk_ok)?;
        if let Ready::Bytes(_) = ready {
            self.handles.lock().unwrap().insert(handle, offset + len);
            if let Some(recorder) = self.recorder.get() {
                recorder.read(layer, reader.index(), data_offset + offset, len);
            }
        }
        Ok(ready)
    }

    /// Whether every byte of file `node` is cached (no I/O to tell); false for an empty file.
    pub fn file_ready(&self, node: NodeId) -> bool {
        self.file_data(node)
            .is_some_and(|(reader, _, at, size)| size > 0 && reader.is_ready(at, size))
    }

    /// All of file `node`, if every byte of it is cached (reading the disk if need be: call it
    /// from a thread that may wait for it).
    pub fn file_bytes_ready(&self, node: NodeId) -> Option<Vec<u8>> {
        let (reader, _, at, size) = self.file_data(node)?;
        reader.bytes_ready(at, at + size).unwrap_or_else(|e| {
            tracing::debug!(path = %self.tree.path(node), error = %e, "file not read for the page cache");
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::registry::fake::FakeRegistry;

    use super::super::tests::{lazy_view, noise};
    use super::super::FsError;
    use crate::layer::reader::Ready;

    fn bytes(ready: Result<Ready, FsError>) -> Vec<u8> {
        match ready {
            Ok(Ready::Bytes(data)) => data,
            Ok(Ready::OnDisk) => panic!("on disk"),
            Ok(Ready::Fetch) => panic!("not served at once"),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_bytes_are_served_at_once_and_whole_cached_files_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(FakeRegistry::new());
        let data = noise(7, 700_000);
        let files = vec![("big".to_string(), data.clone())];
        let view = Arc::new(lazy_view(&registry, dir.path(), &files).await);
        let id = view.lookup("big").unwrap();
        let (handle, at, len) = (1, 300_000, 4096);
        let part = &data[at as usize..][..len as usize];
        assert!(
            matches!(view.read_ready(handle, id, at, len, true), Ok(Ready::Fetch)),
            "nothing cached yet"
        );
        assert!(!view.file_ready(id));
        assert!(view.file_bytes_ready(id).is_none());

        // Fetched once, then served at once, from memory, as read by the handle.
        assert_eq!(view.read(id, at, len).await.unwrap(), part);
        let fetches = registry.requests().ranges;
        assert_eq!(bytes(view.read_ready(handle, id, at, len, false)), part);
        assert_eq!(view.handles.lock().unwrap().get(&handle), Some(&(at + len)));
        assert!(!view.file_ready(id), "a part of it is cached");

        // All of it read: the whole file is there to hand over at its next open.
        assert_eq!(view.read(id, 0, data.len() as u64).await.unwrap(), data);
        assert!(view.file_ready(id));
        assert_eq!(view.file_bytes_ready(id).unwrap(), data);
        assert!(registry.requests().ranges > fetches);
        let before = registry.requests().ranges;
        assert_eq!(bytes(view.read_ready(2, id, 0, 100, true)), data[..100]);
        assert_eq!(registry.requests().ranges, before, "served without a fetch");
    }
}
