//! Bytes that need no fetch: the spans of a range that are in memory, or on disk and verified
//! by this process, read on the calling thread. The async read path takes them first
//! ([`LayerReader::read_cached`]); the FUSE adapter serves reads from them without a task
//! ([`LayerReader::read_ready`], which also tells bytes on disk from bytes to fetch) and hands
//! the kernel's page cache whole cached files at their first open
//! ([`LayerReader::bytes_ready`]). A layer found wrong, or one with a published index
//! before its first read (which checks a complete layer against its diff_id), has none.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{LayerReader, WRONG};
use crate::cache::CacheError;

/// What [`LayerReader::read_ready`] found.
pub enum Ready {
    /// The bytes, read on the calling thread.
    Bytes(Vec<u8>),
    /// All cached, some on disk only, and the caller may not wait for the disk.
    OnDisk,
    /// Not all cached (or the layer may not be served this way): read through the full path.
    Fetch,
}

/// A span (by index) and the range of its bytes wanted.
type Piece = (usize, Range<usize>);

impl LayerReader {
    /// Bytes `offset..end` if every span holding them can be read without a fetch or a
    /// verification ([`Cache::read_range`]: in memory, or on disk and verified by this process
    /// already): only the bytes asked for are read from disk. `None`: take the full path.
    pub(super) fn read_cached(&self, offset: u64, end: u64) -> Result<Option<Vec<u8>>, CacheError> {
        match self.ready(offset, end) {
            // Only disk reads hand this worker's tasks off.
            Some((pieces, true)) => crate::cache::blocking(|| self.read_pieces(&pieces, true)),
            Some((pieces, false)) => self.read_pieces(&pieces, false),
            None => Ok(None),
        }
    }

    /// Up to `len` bytes at `offset` if they can be served at once, on the calling thread:
    /// the layer's first read is over (its completeness checked) and every span holding them
    /// is in memory, or on disk and verified by this process. [`Ready::Fetch`] (nothing done):
    /// read them with [`read_continuing`](Self::read_continuing). With `disk_ok` false, bytes
    /// on disk are [`Ready::OnDisk`]; with it, the disk is read here, so call it from a thread
    /// that may wait for the disk (not a FUSE dispatch thread nor an async worker).
    pub fn read_ready(&self, offset: u64, len: u64, disk_ok: bool) -> Result<Ready, CacheError> {
        let started = std::time::Instant::now();
        let end = (offset + len).min(self.index.size);
        let (pieces, disk) = match self.ready(offset, end) {
            Some((_, true)) if !disk_ok => return Ok(Ready::OnDisk),
            Some(found) => found,
            None => return Ok(Ready::Fetch),
        };
        let Some(out) = self.read_pieces(&pieces, disk)? else {
            return Ok(Ready::Fetch);
        };
        let source = if disk { "disk" } else { "memory" };
        crate::metrics::metrics().read(source, started.elapsed().as_secs_f64());
        Ok(Ready::Bytes(out))
    }

    /// Bytes `offset..end` as [`read_ready`](Self::read_ready) with `disk_ok` finds them, but
    /// for bytes no read asked for (nothing counted in the metrics); `None` if not all cached.
    pub fn bytes_ready(&self, offset: u64, end: u64) -> Result<Option<Vec<u8>>, CacheError> {
        match self.ready(offset, end) {
            Some((pieces, disk)) => self.read_pieces(&pieces, disk),
            None => Ok(None),
        }
    }

    /// Whether every span holding `offset..offset + len` is cached (no I/O to tell).
    pub fn is_ready(&self, offset: u64, len: u64) -> bool {
        self.ready(offset, (offset + len).min(self.index.size))
            .is_some()
    }

    /// The spans (and the range of each) that hold `offset..end`, and whether any is read from
    /// disk, if each is in memory or on disk verified by this process (no I/O to tell) and the
    /// layer may be served: not found wrong, and (with a published index) past its first read,
    /// which checks a complete layer against its diff_id.
    fn ready(&self, offset: u64, end: u64) -> Option<(Vec<Piece>, bool)> {
        if self.completeness.load(Ordering::Relaxed) == WRONG
            || (self.index.published.is_some() && self.first_read.load(Ordering::Relaxed))
        {
            return None;
        }
        let mut pieces = Vec::new();
        let mut pos = offset;
        let mut disk = false;
        while pos < end {
            let i = self.index.span_at(pos)?;
            let span = &self.index.spans[i];
            let to = end.min(span.out_offset + span.out_len);
            if to <= pos {
                return None;
            }
            if !self.cache.in_memory(&span.digest) {
                if !self.cache.verified_on_disk(&span.digest, span.out_len) {
                    return None;
                }
                disk = true;
            }
            pieces.push((
                i,
                (pos - span.out_offset) as usize..(to - span.out_offset) as usize,
            ));
            pos = to;
        }
        Some((pieces, disk))
    }

    /// The bytes of `pieces` ([`ready`](Self::ready)), `None` if a span is no longer there (in
    /// memory, without `disk`: then the disk is not read).
    fn read_pieces(&self, pieces: &[Piece], disk: bool) -> Result<Option<Vec<u8>>, CacheError> {
        let mut out = Vec::with_capacity(pieces.iter().map(|(_, r)| r.len()).sum());
        for (i, range) in pieces {
            let span = &self.index.spans[*i];
            let (digest, len) = (&span.digest, span.out_len);
            let piece = if disk {
                self.cache.read_range(digest, len, range.clone())?
            } else {
                self.cache.read_memory(digest, len, range.clone())
            };
            match piece {
                Some(d) => out.extend_from_slice(&d),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
}
