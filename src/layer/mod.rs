//! Layer indexes: for each layer blob, every entry's metadata and where its bytes live.
//!
//! Fourth stage of the pipeline, between the store and the cache. A [`LayerIndex`] is built by
//! one streaming pass over a blob ([`build_index`]) and persisted by blob digest
//! ([`IndexStore`]). It splits the uncompressed tar stream into spans; each span says how to get
//! its bytes from the blob ([`Fetch`]) and carries the sha256 of its uncompressed bytes, so no
//! byte is served unverified:
//! - uncompressed tar: a span is the same byte range of the blob;
//! - gzip: a span starts at a zran checkpoint ([`gzip`]); its compressed range has its own digest;
//! - zstd: spans are only in the cache, filled by the streaming pass (no random access yet).
//!
//! The pass verifies the whole blob digest and the diff_id before the index is returned, so an
//! index built here is trusted.
//!
//! eStargz layers can instead be indexed from their table of contents ([`estargz`]): two range
//! reads, one span per file chunk ([`Fetch::Member`]) in a virtual address space of file data.
//! zstd:chunked layers likewise, from the TOC the layer annotations locate ([`zstd_chunked`]),
//! one span per zstd frame ([`Fetch::Zstd`]). Both map their TOC through the one TOC model
//! ([`toc`]); every format produces entries of the one entry model ([`Entry`], [`Kind`]).

mod entry;
pub mod estargz;
pub mod gzip;
mod index_store;
pub mod packed;
pub mod reader;
mod sparse;
pub mod tar;
pub mod toc;
pub mod zstd_chunked;

use std::io::{self, Read};
use std::path::PathBuf;

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::image::Compression;
pub use entry::{is_shared_object, Entry, Kind};
pub use index_store::IndexStore;

/// Index format version; indexes of other versions are rebuilt. (4: indexes are stored by what
/// vouches for them, so indexes stored by earlier versions, published ones among them, are not
/// trusted. 5: gzip checkpoint windows live in a separate window file, spans are 256 KiB. 6:
/// gzip spans are 64 KiB, and only *anchors*, [`gzip::CHECKPOINT_EVERY`] apart, have a window:
/// the checkpoints between, if any, are light. Since 2026-12-04 windows are sparse and every
/// checkpoint an index is built with is an anchor: the same version, read the same way.)
/// Version 5 indexes are read as they are (they have no light checkpoints).
pub const INDEX_VERSION: u32 = 6;
/// The oldest index version still read.
pub const OLDEST_INDEX_VERSION: u32 = 5;
/// Largest span a published index may declare (spans built here are about [`DEFAULT_SPAN`]).
pub const MAX_SPAN: u64 = 64 << 20;
/// Default uncompressed bytes per span (and between gzip checkpoints): a gzip read costs the
/// compressed bytes from the span after the last cached one (or the last anchor, the
/// checkpoints with a window: every [`gzip::CHECKPOINT_EVERY`]) to the end of its last span,
/// so small spans keep misses small, and light checkpoints keep the window file small. On the
/// cold-start benchmark's import, a profile replay of 256 KiB spans fetched 35.1 MB where the
/// bytes read compress to 23.6 MB within the layers; 64 KiB spans from anchors every 256 KiB
/// 33.5 MB, every 128 KiB 32.0 MB, every 64 KiB (all checkpoints anchors) 30.1–30.5 MB, which
/// sparse windows made the default.
pub const DEFAULT_SPAN: u64 = 64 << 10;
/// Farthest a light gzip checkpoint may be from the anchor before it (a read that cannot start
/// at a light checkpoint starts at that anchor).
pub const MAX_LIGHT_DISTANCE: u64 = 1 << 20;

/// Where a streaming pass ends spans: at the first boundary (a deflate block's, for gzip)
/// `span` bytes of output after the last; and, in a gzip layer, at every deflate block boundary
/// at least [`gzip::WINDOW`] after the last that comes within `span` of a `fine` range, each
/// such checkpoint with its own window. `fine` are uncompressed byte ranges (sorted or not,
/// overlapping or not): where a startup profile reads, so that its replay fetches single
/// blocks rather than whole spans (`stratafs profile push`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanPlan {
    pub span: u64,
    pub fine: Vec<(u64, u64)>,
}

impl From<u64> for SpanPlan {
    fn from(span: u64) -> SpanPlan {
        SpanPlan {
            span,
            fine: Vec::new(),
        }
    }
}

/// Uncompressed bytes per span of a zstd layer at least (its spans are only cached).
const ZSTD_SPAN: u64 = 256 << 10;
/// Largest compressed checkpoint window an index may declare (a deflated 32 KiB window is
/// at most a few bytes over 32 KiB).
pub const MAX_WINDOW_LEN: u64 = 40 << 10;

/// A layer that could not be indexed or read.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {blob}: {detail}")]
    Corrupt { blob: Digest, detail: String },
    #[error("layer {blob}: {what} mismatch: expected {expected}, got {actual}")]
    Mismatch {
        blob: Digest,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("layer index {path}: {detail}")]
    Store { path: PathBuf, detail: String },
    #[error("layer {blob}: reading {what}: {detail}")]
    Read {
        blob: Digest,
        what: &'static str,
        detail: String,
    },
}

/// How to obtain a span's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "fetch")]
pub enum Fetch {
    /// The same bytes at `in_start..in_end` of the blob (uncompressed layers).
    Range { in_start: u64, in_end: u64 },
    /// Decompress `in_start..in_end` from gzip checkpoint `checkpoint`; the compressed bytes
    /// hash to `in_digest`.
    Gzip {
        checkpoint: u32,
        in_start: u64,
        in_end: u64,
        in_digest: Digest,
    },
    /// Only in the cache (filled by streaming the whole layer).
    Cached,
    /// `in_start` starts a gzip member (header included) that ends by `in_end`: inflating it,
    /// skipping `skip` bytes of output, gives the span (eStargz chunks).
    Member {
        in_start: u64,
        in_end: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        skip: u64,
    },
    /// `in_start` starts a zstd frame that ends by `in_end`: decompressing from there, the
    /// first `out_len` bytes are the span (zstd:chunked chunks).
    Zstd { in_start: u64, in_end: u64 },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How an index was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexFormat {
    /// One pass over the whole blob ([`build_index`]), verified against the blob digest and
    /// diff_id; spans are tar ranges, gzip checkpoint spans (zran) or cache-only (zstd).
    #[default]
    Stream,
    /// From an eStargz TOC ([`estargz`]): verified against the TOC digest annotation, spans in
    /// a virtual address space; blob digest and diff_id unchecked.
    Estargz,
    /// From a zstd:chunked TOC ([`zstd_chunked`]): verified against the manifest checksum
    /// annotation, otherwise as eStargz.
    #[serde(rename = "zstd-chunked")]
    ZstdChunked,
}

/// A piece of the uncompressed tar stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub out_offset: u64,
    pub out_len: u64,
    /// sha256 of the uncompressed bytes: the cache key and the check on every fetch.
    pub digest: Digest,
    #[serde(flatten)]
    pub fetch: Fetch,
}

/// Everything needed to read a layer lazily.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerIndex {
    pub version: u32,
    pub blob: Digest,
    pub diff_id: Digest,
    pub compression: Compression,
    pub blob_size: u64,
    /// Size of the uncompressed tar stream (for eStargz: of the virtual address space).
    pub size: u64,
    pub entries: Vec<Entry>,
    pub spans: Vec<Span>,
    pub checkpoints: Vec<gzip::Checkpoint>,
    #[serde(default)]
    pub format: IndexFormat,
    /// eStargz prefetch landmark: the files whose data lies before this offset are the ones
    /// to prefetch (`Some(0)`: none). `None`: no landmark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_end: Option<u64>,
    /// The window file of a gzip layer's checkpoints (see [`gzip`]); `None` when no checkpoint
    /// has a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Windows>,
    /// The digest of the published stratafs index this index was read from (set when it is
    /// fetched, never taken from the document); `None` for indexes built here. A published
    /// index gets the tree check when its layer is complete (see `reader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Digest>,
}

/// A window file: the compressed checkpoint windows of one gzip layer, back to back. Built
/// here it is kept under `<root>/layers/windows/`; a published index names the blob it was
/// pushed as, in the image's repository, and windows are read from it by range when needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Windows {
    pub digest: Digest,
    pub size: u64,
}

impl LayerIndex {
    /// Index of the span containing uncompressed offset `offset`.
    pub fn span_at(&self, offset: u64) -> Option<usize> {
        let i = self.spans.partition_point(|s| s.out_offset <= offset);
        let i = i.checked_sub(1)?;
        (offset < self.spans[i].out_offset + self.spans[i].out_len).then_some(i)
    }

    /// Whether every span can be fetched from the blob (not cache-only).
    pub fn random_access(&self) -> bool {
        !self.spans.iter().any(|s| s.fetch == Fetch::Cached)
    }

    /// Checks the structure of an index that was not built here (a published one), which must
    /// be one a streaming pass makes for a gzip or uncompressed layer: at most `max_entries`
    /// entries; spans contiguous from 0 to `size`, none larger than [`MAX_SPAN`], in blob
    /// order, each fetched the way its layer's compression allows (a gzip span from a
    /// checkpoint placed exactly at its start — a light one, without a window, only after a
    /// span; an uncompressed span from the same bytes of the blob); every blob range inside
    /// the blob; every file's data inside the stream.
    /// Whatever else it claims is checked byte by byte when read, and as a whole when the
    /// layer is complete.
    pub fn validate(&self, max_entries: usize) -> Result<(), String> {
        if self.entries.len() > max_entries {
            return Err(format!(
                "{} entries, more than the limit of {max_entries} ([index] max_entries)",
                self.entries.len()
            ));
        }
        if self.format != IndexFormat::Stream || self.compression == Compression::Zstd {
            return Err(format!(
                "a {:?} index of a {:?} layer is not one that is published",
                self.format, self.compression
            ));
        }
        let mut pos = 0u64;
        let mut last_start = 0u64;
        let mut anchor = 0u64;
        for (k, s) in self.spans.iter().enumerate() {
            let at = s.out_offset;
            if at != pos || s.out_len == 0 || s.out_len > MAX_SPAN {
                return Err(format!(
                    "span at {at} ({} bytes) does not continue the stream at {pos}",
                    s.out_len
                ));
            }
            pos += s.out_len;
            let (a, b) = match (&s.fetch, self.compression) {
                (Fetch::Range { in_start, in_end }, Compression::None) => {
                    if *in_start != at || in_end.checked_sub(*in_start) != Some(s.out_len) {
                        return Err(format!("span at {at} is not the same bytes of the blob"));
                    }
                    (*in_start, *in_end)
                }
                (
                    Fetch::Gzip {
                        checkpoint,
                        in_start,
                        in_end,
                        ..
                    },
                    Compression::Gzip,
                ) => {
                    let cp = self
                        .checkpoints
                        .get(*checkpoint as usize)
                        .ok_or_else(|| format!("span at {at} names a missing checkpoint"))?;
                    if cp.bits > 7
                        || cp.in_offset == 0 && cp.bits > 0
                        || cp.out_offset != at
                        || cp.in_start() != *in_start
                    {
                        return Err(format!(
                            "span at {at} does not start at its checkpoint {checkpoint}"
                        ));
                    }
                    // A light checkpoint is started from only with the span before at hand, else
                    // from the anchor before it: not far before.
                    if !cp.light {
                        anchor = at;
                    } else if k == 0
                        || cp.window_len > 0
                        || cp.window_at > 0
                        || at - anchor > MAX_LIGHT_DISTANCE
                    {
                        return Err(format!(
                            "light checkpoint {checkpoint} has a window, no span before it or no anchor within {MAX_LIGHT_DISTANCE} bytes before it"
                        ));
                    }
                    // The window of a checkpoint is then always the end of the span before,
                    // so a reader that has that span never needs the window file.
                    if s.out_len < gzip::WINDOW as u64 && k + 1 < self.spans.len() {
                        return Err(format!(
                            "span at {at} is {} bytes, shorter than a checkpoint window",
                            s.out_len
                        ));
                    }
                    let windows = self.windows.as_ref().map_or(0, |w| w.size);
                    if cp.window_len > MAX_WINDOW_LEN
                        || cp
                            .window_at
                            .checked_add(cp.window_len)
                            .is_none_or(|end| end > windows)
                    {
                        return Err(format!(
                            "the window of checkpoint {checkpoint} ({} bytes at {}) is not inside the {windows}-byte window file",
                            cp.window_len, cp.window_at
                        ));
                    }
                    (*in_start, *in_end)
                }
                (fetch, compression) => {
                    return Err(format!(
                    "span at {at} is fetched as {fetch:?}, which a {compression:?} layer cannot be"
                ))
                }
            };
            if a > b || b > self.blob_size || b - a > MAX_SPAN || a < last_start {
                return Err(format!(
                    "span at {at} reads blob bytes {a}..{b} of {} (out of order or outside)",
                    self.blob_size
                ));
            }
            last_start = a;
        }
        if pos != self.size {
            return Err(format!("spans cover {pos} of {} bytes", self.size));
        }
        if let Some(e) = self.entries.iter().find(|e| {
            e.offset
                .checked_add(e.size)
                .is_none_or(|end| end > self.size)
        }) {
            return Err(format!("entry {:?} lies outside the stream", e.path));
        }
        Ok(())
    }
}

/// Bounds on what one (possibly hostile) layer may make stratafs hold in memory; see
/// `[index]` in docs/configuration.md. The tar reader adds fixed bounds on header bodies and
/// names ([`tar::MAX_HEADER_BODY`], [`tar::MAX_NAME`], [`tar::MAX_METADATA`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most entries in one layer's index.
    pub max_entries: usize,
    /// Largest TOC or published index JSON.
    pub max_toc_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let d = crate::config::IndexSettings::default();
        Limits {
            max_entries: d.max_entries,
            max_toc_bytes: d.max_toc_bytes,
        }
    }
}

impl From<&crate::config::IndexSettings> for Limits {
    fn from(s: &crate::config::IndexSettings) -> Self {
        Limits {
            max_entries: s.max_entries,
            max_toc_bytes: s.max_toc_bytes,
        }
    }
}

/// Builds the index of a layer from its compressed blob, read once from start to end.
/// `on_span(digest, data)` receives every span's verified-later bytes (to fill the cache);
/// `windows` receives a gzip layer's window file (see [`gzip`]). The index is returned only if
/// the blob digest and the diff_id match.
#[allow(clippy::too_many_arguments)]
pub fn build_index(
    blob: impl Read,
    compression: Compression,
    blob_digest: &Digest,
    diff_id: &Digest,
    blob_size: u64,
    span: impl Into<SpanPlan>,
    on_span: &mut (dyn FnMut(&Digest, &[u8]) -> io::Result<()> + Send),
    windows: &mut dyn io::Write,
    limits: &Limits,
) -> Result<LayerIndex, LayerError> {
    let limit = blob_size.saturating_mul(1100).max(1 << 30);
    let plan = span.into();
    let mut hashed = HashingReader::new(blob);
    let mut windows = HashingWriter {
        inner: windows,
        hasher: Sha256::new(),
        len: 0,
    };
    let mut spans = Vec::new();
    // Spans are hashed and handed to `on_span` (the cache) on a second thread, so that work
    // overlaps decompression; the bounded channel keeps memory to a few spans.
    let (decoded, digests) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = scope.spawn(move || -> io::Result<Vec<Digest>> {
            let mut digests = Vec::new();
            for data in rx {
                let digest = crate::digest::sha256(&data);
                on_span(&digest, &data)?;
                digests.push(digest);
            }
            Ok(digests)
        });
        let decoded = decode_stream(
            &mut hashed,
            compression,
            &plan,
            (limit, limits.max_entries),
            &mut spans,
            &mut windows,
            &mut |data| {
                tx.send(data.to_vec())
                    .map_err(|_| io::Error::other("span worker stopped"))
            },
        );
        drop(tx);
        (decoded, worker.join().expect("span worker thread"))
    });
    let decoded = match (decoded, digests) {
        (Ok(d), Ok(digests)) if digests.len() == spans.len() => {
            for (span, digest) in spans.iter_mut().zip(digests) {
                span.digest = digest;
            }
            Ok(d)
        }
        (Ok(_), Ok(_)) => Err("span count mismatch".to_string()),
        (_, Err(e)) => Err(format!("handling spans: {e}")),
        (Err(e), Ok(_)) => Err(e),
    };
    // Hash whatever the decoder left unread (trailing bytes, or all the rest after a failure):
    // a blob that does not match its digest is reported as such, whatever broke first.
    let drained = io::copy(&mut hashed, &mut io::sink()).is_ok();
    let blob_hash = crate::digest::from_hex("sha256", &hex::encode(hashed.finish()));
    let mismatch = |what, expected: &Digest, actual: Digest| LayerError::Mismatch {
        blob: blob_digest.clone(),
        what,
        expected: expected.to_string(),
        actual: actual.to_string(),
    };
    if drained && &blob_hash != blob_digest {
        return Err(mismatch("blob digest", blob_digest, blob_hash));
    }
    let (entries, out_hash, size, checkpoints) = decoded.map_err(|detail| LayerError::Corrupt {
        blob: blob_digest.clone(),
        detail,
    })?;
    let out_hash = crate::digest::from_hex("sha256", &hex::encode(out_hash));
    if &out_hash != diff_id {
        return Err(mismatch("diff_id", diff_id, out_hash));
    }
    let windows = (windows.len > 0).then(|| Windows {
        digest: crate::digest::from_hex("sha256", &hex::encode(windows.hasher.finalize())),
        size: windows.len,
    });
    Ok(LayerIndex {
        version: INDEX_VERSION,
        blob: blob_digest.clone(),
        diff_id: diff_id.clone(),
        compression,
        blob_size,
        size,
        entries,
        spans,
        checkpoints,
        format: IndexFormat::Stream,
        prefetch_end: None,
        windows,
        published: None,
    })
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<'a> {
    inner: &'a mut dyn io::Write,
    hasher: Sha256,
    len: u64,
}

impl io::Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Decoded = (Vec<Entry>, [u8; 32], u64, Vec<gzip::Checkpoint>);

/// Decompresses `blob`, parses its tar entries and cuts it into spans (pushed to `spans` with a
/// placeholder digest, their bytes handed to `emit` in order). Returns (entries, sha256 of the
/// output, output size, checkpoints).
fn decode_stream(
    blob: impl Read,
    compression: Compression,
    plan: &SpanPlan,
    (limit, max_entries): (u64, usize),
    spans: &mut Vec<Span>,
    windows: &mut dyn io::Write,
    emit: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<Decoded, String> {
    let placeholder = || crate::digest::sha256(b"");
    let span = plan.span;
    match compression {
        Compression::Gzip => {
            let mut indexer = gzip::GzipIndexer::new(blob, span, |s: gzip::SpanOut<'_>| {
                windows.write_all(s.window)?;
                emit(s.data)?;
                spans.push(Span {
                    out_offset: s.out_offset,
                    out_len: s.data.len() as u64,
                    digest: placeholder(),
                    fetch: Fetch::Gzip {
                        checkpoint: s.checkpoint as u32,
                        in_start: s.in_start,
                        in_end: s.in_end,
                        in_digest: crate::digest::from_hex("sha256", &hex::encode(s.in_digest)),
                    },
                });
                Ok(())
            })
            .with_fine(&plan.fine);
            let entries = tar::read_entries(&mut indexer, limit, max_entries)?;
            io::copy(&mut indexer, &mut io::sink()).map_err(|e| e.to_string())?;
            let checkpoints = std::mem::take(&mut indexer.checkpoints);
            let (out_hash, size) = indexer.finish();
            Ok((entries, out_hash, size, checkpoints))
        }
        Compression::None | Compression::Zstd => {
            let identity = compression == Compression::None;
            let decoded: Box<dyn Read + '_> = if identity {
                Box::new(blob)
            } else {
                Box::new(zstd::stream::read::Decoder::new(blob).map_err(|e| e.to_string())?)
            };
            // Zstd spans are only ever cached, never fetched on their own: no smaller than
            // `ZSTD_SPAN` (fewer chunk files for the same bytes).
            let span = if identity { span } else { span.max(ZSTD_SPAN) };
            let mut spanner = Spanner::new(decoded, span, |out_offset, data: &[u8]| {
                emit(data)?;
                let fetch = if identity {
                    Fetch::Range {
                        in_start: out_offset,
                        in_end: out_offset + data.len() as u64,
                    }
                } else {
                    Fetch::Cached
                };
                spans.push(Span {
                    out_offset,
                    out_len: data.len() as u64,
                    digest: placeholder(),
                    fetch,
                });
                Ok(())
            });
            let entries = tar::read_entries(&mut spanner, limit, max_entries)?;
            io::copy(&mut spanner, &mut io::sink()).map_err(|e| e.to_string())?;
            let (out_hash, size) = spanner.finish().map_err(|e| e.to_string())?;
            Ok((entries, out_hash, size, Vec::new()))
        }
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
    fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Passes an uncompressed stream through, cutting it into fixed-size spans for a callback and
/// hashing all of it (the diff_id).
struct Spanner<R, F> {
    inner: R,
    span: u64,
    offset: u64,
    current: Vec<u8>,
    hasher: Sha256,
    on_span: F,
}

impl<R: Read, F: FnMut(u64, &[u8]) -> io::Result<()>> Spanner<R, F> {
    fn new(inner: R, span: u64, on_span: F) -> Self {
        Spanner {
            inner,
            span,
            offset: 0,
            current: Vec::new(),
            hasher: Sha256::new(),
            on_span,
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if !self.current.is_empty() {
            (self.on_span)(self.offset, &self.current)?;
            self.offset += self.current.len() as u64;
            self.current.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<([u8; 32], u64)> {
        self.emit()?;
        Ok((self.hasher.finalize().into(), self.offset))
    }
}

impl<R: Read, F: FnMut(u64, &[u8]) -> io::Result<()>> Read for Spanner<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = (self.span - self.current.len() as u64) as usize;
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.current.extend_from_slice(&buf[..n]);
        if self.current.len() as u64 == self.span {
            self.emit()?;
        }
        Ok(n)
    }
}

/// Raw-deflate compression for checkpoint windows, at level 3: on the benchmark image's layers
/// 2% larger than level 6 and a third less of an index build's time (measured with whole
/// windows, one per 128 KiB; sparse windows compress to a fifth of that).
pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(3));
    enc.write_all(data).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

/// Inflates a checkpoint window: at most [`gzip::WINDOW`] bytes (a longer one is an error, so a
/// hostile index cannot make it a decompression bomb).
pub(crate) fn inflate(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(data)
        .take(gzip::WINDOW as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > gzip::WINDOW {
        return Err(io::Error::other("checkpoint window longer than 32 KiB"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
