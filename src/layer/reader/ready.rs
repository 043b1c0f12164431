//! Bytes that need no fetch: the spans of a range that are in memory, or on disk and verified
//! by this process, read on the calling thread. The async read path takes them first
//! ([`LayerReader::read_cached`]); the FUSE adapter serves reads from them without a task
//! ([`LayerReader::read_ready`]) and hands the kernel's page cache the rest of the spans a read
//! touched ([`LayerReader::bytes_ready`]). A layer found wrong, or one with a published index
//! before its first read (which checks a complete layer against its diff_id), has none.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{LayerReader, WRONG};
use crate::cache::CacheError;

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
    /// is in memory, or on disk and verified by this process. `None` (nothing done): read them
    /// with [`read_continuing`](Self::read_continuing). With `disk_ok` false, a span on disk
    /// is `None` too; with it, the disk is read here, so call it from a thread that may wait
    /// for the disk (not a FUSE dispatch thread nor an async worker).
    pub fn read_ready(
        &self,
        offset: u64,
        len: u64,
        disk_ok: bool,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let started = std::time::Instant::now();
        let end = (offset + len).min(self.index.size);
        let Some((out, disk)) = self.bytes_ready(offset, end, disk_ok)? else {
            return Ok(None);
        };
        let source = if disk { "disk" } else { "memory" };
        crate::metrics::metrics().read(source, started.elapsed().as_secs_f64());
        Ok(Some(out))
    }

    /// Bytes `offset..end` and whether the disk was read, as [`read_ready`](Self::read_ready)
    /// finds them, but for bytes no read asked for (nothing counted in the metrics).
    pub fn bytes_ready(
        &self,
        offset: u64,
        end: u64,
        disk_ok: bool,
    ) -> Result<Option<(Vec<u8>, bool)>, CacheError> {
        match self.ready(offset, end) {
            Some((pieces, disk)) if disk_ok || !disk => {
                Ok(self.read_pieces(&pieces, disk)?.map(|out| (out, disk)))
            }
            _ => Ok(None),
        }
    }

    /// Whether every span holding `offset..offset + len` is cached (no I/O to tell).
    pub fn is_ready(&self, offset: u64, len: u64) -> bool {
        self.ready(offset, (offset + len).min(self.index.size))
            .is_some()
    }

    /// Whether [`read_ready`](Self::read_ready) would serve `offset..offset + len` only with
    /// `disk_ok`: every span cached, some on disk only (no I/O to tell).
    pub fn ready_on_disk(&self, offset: u64, len: u64) -> bool {
        let end = (offset + len).min(self.index.size);
        self.ready(offset, end).is_some_and(|(_, disk)| disk)
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
