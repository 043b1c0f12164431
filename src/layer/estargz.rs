//! eStargz layers: an index read from the layer's own table of contents with two range reads.
//!
//! eStargz (stargz-snapshotter's seekable tar.gz) is an ordinary gzip'd tar in which every file
//! — every chunk of a large file — starts a new gzip member. Its last tar entry,
//! `stargz.index.json` (the TOC), lists each entry with the blob offset of the member holding
//! its data and the sha256 of every uncompressed chunk; a 51-byte footer (an empty gzip member
//! whose extra field `SG` holds `%016xSTARGZ`, the TOC member's offset) ends the blob.
//! [`estargz_index`] reads the footer, then the TOC member, and maps the TOC onto a
//! [`LayerIndex`] without reading any file data:
//!
//! - The index's uncompressed address space is *virtual*: the file chunks laid end to end in
//!   TOC order (tar headers and padding are left out). `Entry::offset` is the virtual offset of
//!   the file's first chunk; `LayerIndex::size` is the total.
//! - One span per chunk, keyed by the TOC's `chunkDigest` and fetched as [`Fetch::Member`]: the
//!   blob from the chunk's member start up to the next member start (or the TOC), inflated to
//!   the chunk's length. Consecutive chunks are consecutive in the blob, so the reader's
//!   coalescing fetches a run of small files with one range request.
//! - Whiteouts map as in tar layers. The prefetch landmarks are not entries: their place is
//!   recorded as `LayerIndex::prefetch_end`. As in stargz-snapshotter, neither the landmarks
//!   nor the TOC file appear in the tree (a streamed index, which reads the tar, lists them).
//!
//! Trust. When the layer descriptor carries [`TOC_DIGEST_ANNOTATION`], the TOC's sha256 must
//! match it or indexing fails: an unverified TOC is never used. Every byte served is then
//! checked against a chunk digest from that TOC, so file data is exactly as trusted as the
//! manifest. The blob digest and diff_id are *not* checked on this path (nothing reads the
//! whole blob); the index records `format: estargz` so this is visible.
//! Without the annotation the TOC could only be checked by reading the whole blob:
//! [`estargz_index`] accepts it with a warning (for callers that trust the blob otherwise, e.g.
//! a local file checked against its digest), but `fs::Layers` does not take this path for
//! unannotated layers — it streams them (eStargz is valid multi-member gzip), which verifies
//! the blob digest and diff_id. The cost of the footer read is not the reason: trust is.
//!
//! TOCs that cannot serve random access safely — chunks without digests (legacy stargz),
//! chunks over [`MAX_CHUNK`], digest algorithms we cannot compute — give `Ok(None)`, so the
//! caller streams instead; malformed TOCs are errors. The legacy 47-byte footer is recognised.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine;
use oci_spec::image::Digest;
use serde::Deserialize;

use super::tar::{clean_path, whiteout};
use super::{Entry, Fetch, IndexFormat, Kind, LayerError, LayerIndex, Limits, Span, INDEX_VERSION};
use crate::image::Compression;
use crate::source::BlobSource;

/// Layer descriptor annotation: the sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer.
const LEGACY_FOOTER_SIZE: u64 = 47;
/// Marks the end of the files to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Placed first: prefetch nothing.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Bound on the compressed TOC member a (possibly hostile) footer makes us read; the JSON
/// inside is bounded by [`Limits::max_toc_bytes`] and its entries by [`Limits::max_entries`].
const MAX_TOC_MEMBER: u64 = 64 << 20;
/// Largest chunk served from one member (larger ones fall back to streaming).
pub const MAX_CHUNK: u64 = 64 << 20;

/// Where a footer says the TOC member is.
#[derive(Debug, PartialEq, Eq)]
struct Footer {
    toc_offset: u64,
    len: u64,
}

/// The footer at the end of `tail` (the blob's last 51 bytes, or all of a shorter blob).
fn parse_footer(tail: &[u8]) -> Option<Footer> {
    let at = |len: u64| tail.len().checked_sub(len as usize).map(|s| &tail[s..]);
    if let Some(extra) = at(FOOTER_SIZE).and_then(empty_member_extra) {
        // Subfield "SG", 22 bytes of data.
        if extra.len() == 26 && extra[..4] == [b'S', b'G', 22, 0] {
            if let Some(toc_offset) = stargz_offset(&extra[4..]) {
                return Some(Footer {
                    toc_offset,
                    len: FOOTER_SIZE,
                });
            }
        }
    }
    let extra = at(LEGACY_FOOTER_SIZE).and_then(empty_member_extra)?;
    stargz_offset(extra).map(|toc_offset| Footer {
        toc_offset,
        len: LEGACY_FOOTER_SIZE,
    })
}

/// The extra field of `member` if it is exactly one gzip member with FEXTRA and no output.
fn empty_member_extra(member: &[u8]) -> Option<&[u8]> {
    let header = super::gzip::gzip_header_len(member).ok().flatten()?;
    if member[3] & 4 == 0 {
        return None;
    }
    let xlen = usize::from(u16::from_le_bytes([member[10], member[11]]));
    let mut decoder = flate2::read::GzDecoder::new(member);
    let mut out = Vec::new();
    decoder.read_to_end(&mut out).ok()?;
    let body = member.len() - header;
    // An empty deflate stream plus the 8-byte trailer is 10 to 13 bytes.
    (out.is_empty() && (10..=13).contains(&body)).then(|| &member[12..12 + xlen])
}

/// `%016xSTARGZ` → the offset.
fn stargz_offset(data: &[u8]) -> Option<u64> {
    let (hex, magic) = (data.get(..16)?, data.get(16..)?);
    if magic != b"STARGZ" || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Builds the index of an eStargz layer from its footer and TOC: `Ok(None)` if the blob is not
/// eStargz (or its TOC cannot serve random access) and should be streamed instead. Reads the
/// last 51 bytes, then the TOC member: two range reads, no file data. The TOC must hash to
/// `toc_digest` when given; without it the TOC is accepted with a warning (see module docs).
pub async fn estargz_index(
    source: &dyn BlobSource,
    blob: &Digest,
    diff_id: &Digest,
    toc_digest: Option<&Digest>,
    limits: &Limits,
) -> Result<Option<LayerIndex>, LayerError> {
    let limits = *limits;
    let blob_size = source.size();
    let tail_len = FOOTER_SIZE.min(blob_size);
    if tail_len < LEGACY_FOOTER_SIZE {
        return Ok(None);
    }
    let read_err = |what, e: crate::source::SourceError| LayerError::Read {
        blob: blob.clone(),
        what,
        detail: e.to_string(),
    };
    let tail = source
        .read_range(blob_size - tail_len, tail_len)
        .await
        .map_err(|e| read_err("the eStargz footer", e))?;
    let Some(footer) = parse_footer(&tail) else {
        return Ok(None);
    };
    let corrupt = |detail: String| LayerError::Corrupt {
        blob: blob.clone(),
        detail,
    };
    let toc_end = blob_size - footer.len;
    if footer.toc_offset >= toc_end {
        return Err(corrupt(format!(
            "eStargz footer puts the TOC at {}, not before the footer at {toc_end}",
            footer.toc_offset
        )));
    }
    let toc_len = toc_end - footer.toc_offset;
    if toc_len > MAX_TOC_MEMBER {
        return Err(corrupt(format!(
            "eStargz TOC member of {toc_len} bytes is larger than {MAX_TOC_MEMBER}"
        )));
    }
    let member = source
        .read_range(footer.toc_offset, toc_len)
        .await
        .map_err(|e| read_err("the eStargz TOC", e))?;
    let (blob, diff_id, toc_digest) = (blob.clone(), diff_id.clone(), toc_digest.cloned());
    tokio::task::spawn_blocking(move || {
        index_from_toc(
            &member,
            footer.toc_offset,
            blob_size,
            &blob,
            &diff_id,
            toc_digest.as_ref(),
            &limits,
        )
    })
    .await
    .expect("TOC task")
}

/// The blocking half of [`estargz_index`]: unpack, verify, parse and map the TOC member.
fn index_from_toc(
    member: &[u8],
    toc_offset: u64,
    blob_size: u64,
    blob: &Digest,
    diff_id: &Digest,
    toc_digest: Option<&Digest>,
    limits: &Limits,
) -> Result<Option<LayerIndex>, LayerError> {
    let corrupt = |detail: String| LayerError::Corrupt {
        blob: blob.clone(),
        detail,
    };
    let json =
        toc_json(member, limits.max_toc_bytes).map_err(|e| corrupt(format!("eStargz TOC: {e}")))?;
    match toc_digest {
        Some(expected) => {
            let actual = crate::digest::compute_like(expected, &json)
                .map_err(|e| corrupt(format!("eStargz TOC digest: {e}")))?;
            if &actual != expected {
                return Err(LayerError::Mismatch {
                    blob: blob.clone(),
                    what: "eStargz TOC digest",
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        None => tracing::warn!(
            %blob,
            "eStargz layer without a {TOC_DIGEST_ANNOTATION} annotation: its TOC is not verified"
        ),
    }
    let toc =
        Toc::parse(&json, limits.max_entries).map_err(|e| corrupt(format!("eStargz TOC: {e}")))?;
    drop(json);
    let mapped = match map_toc(&toc, toc_offset, Frames::Gzip) {
        Ok(m) => m,
        Err(Unusable::Corrupt(detail)) => return Err(corrupt(format!("eStargz TOC: {detail}"))),
        Err(Unusable::Fallback(reason)) => {
            tracing::warn!(%blob, %reason, "eStargz TOC unusable for random access: streaming instead");
            return Ok(None);
        }
    };
    Ok(Some(LayerIndex {
        version: INDEX_VERSION,
        blob: blob.clone(),
        diff_id: diff_id.clone(),
        compression: Compression::Gzip,
        blob_size,
        size: mapped.size,
        entries: mapped.entries,
        spans: mapped.spans,
        checkpoints: Vec::new(),
        format: IndexFormat::Estargz,
        prefetch_end: mapped.prefetch_end,
        windows: None,
        published: None,
    }))
}

/// The TOC JSON from the TOC's gzip member (a tar entry named [`TOC_NAME`]).
fn toc_json(member: &[u8], max_json: u64) -> Result<Vec<u8>, String> {
    let gz = flate2::read::GzDecoder::new(member).take(max_json.saturating_add(1 << 20));
    let mut archive = ::tar::Archive::new(super::tar::HeaderGuard::new(gz));
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("reading its tar entry: {e}"))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if clean_path(&name).as_deref() != Ok(TOC_NAME) {
            continue;
        }
        let size = entry.size();
        if size > max_json {
            return Err(format!(
                "{TOC_NAME} of {size} bytes is larger than the {max_json}-byte limit ([index] max_toc_bytes)"
            ));
        }
        let mut json = Vec::new();
        entry
            .read_to_end(&mut json)
            .map_err(|e| format!("reading {TOC_NAME}: {e}"))?;
        if json.len() as u64 != size {
            return Err(format!("{TOC_NAME} truncated"));
        }
        return Ok(json);
    }
    Err(format!("no {TOC_NAME} entry in the TOC member"))
}

#[derive(Deserialize)]
pub(super) struct Toc {
    version: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    entries: Vec<TocEntry>,
}

impl Toc {
    /// Parses TOC JSON, refusing more than `max_entries` entries as soon as the next one
    /// starts (so a TOC of millions of tiny entries costs no more than the limit).
    pub(super) fn parse(json: &[u8], max_entries: usize) -> Result<Toc, String> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_slice(json);
        let toc = TocSeed(max_entries)
            .deserialize(&mut de)
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(toc)
    }
}

/// Deserializes a [`Toc`] with a bound on its entries.
struct TocSeed(usize);

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed {
    type Value = Toc;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Toc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed {
    type Value = Toc;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Toc, A::Error> {
        let mut toc = Toc {
            version: 0,
            entries: Vec::new(),
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => toc.version = map.next_value()?,
                "entries" => toc.entries = map.next_value_seed(EntriesSeed(self.0))?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(toc)
    }
}

/// TOC entries, at most `.0` of them (`null` is none, as Go writes empty slices).
struct EntriesSeed(usize);

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed {
    type Value = Vec<TocEntry>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed {
    type Value = Vec<TocEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(e) = seq.next_element::<TocEntry>()? {
            if out.len() >= self.0 {
                return Err(serde::de::Error::custom(format!(
                    "more than {} entries ([index] max_entries)",
                    self.0
                )));
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// Go writes empty slices and maps as `null` (zstd:chunked TOCs of empty layers do).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One TOC entry (fields we do not use, such as `uname` or `NumLink`, are ignored).
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    modtime: String,
    mode: u64,
    uid: u32,
    gid: u32,
    link_name: String,
    dev_major: u32,
    dev_minor: u32,
    /// Values are base64.
    #[serde(deserialize_with = "null_as_default")]
    xattrs: BTreeMap<String, String>,
    digest: String,
    offset: u64,
    inner_offset: u64,
    chunk_offset: u64,
    chunk_size: u64,
    chunk_digest: String,
    /// zstd:chunked: empty or `data` for stored bytes; `zeros` for a hole with no bytes.
    chunk_type: String,
}

/// How a TOC's chunks are compressed: each starts a gzip member (eStargz) or a zstd frame
/// (zstd:chunked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Frames {
    Gzip,
    Zstd,
}

/// Why a TOC cannot be used.
#[derive(Debug)]
pub(super) enum Unusable {
    /// Fine as a layer, but not for verified random access: stream it instead.
    Fallback(String),
    /// Malformed or inconsistent.
    Corrupt(String),
}

/// A TOC mapped onto the index model.
#[derive(Default)]
pub(super) struct Mapped {
    pub entries: Vec<Entry>,
    pub spans: Vec<Span>,
    /// Virtual size so far.
    pub size: u64,
    pub prefetch_end: Option<u64>,
}

/// The regular file whose chunks are being read.
struct OpenFile {
    name: String,
    size: u64,
    covered: u64,
    /// False for landmarks and whiteouts: their chunks are checked but get no span.
    emit: bool,
}

/// Maps the TOC entries, in order, onto entries and spans of a virtual address space.
pub(super) fn map_toc(toc: &Toc, toc_offset: u64, frames: Frames) -> Result<Mapped, Unusable> {
    use Unusable::Corrupt;
    if toc.version != 1 {
        return Err(Corrupt(format!("unsupported TOC version {}", toc.version)));
    }
    // Every member start the TOC records, and the TOC's: a chunk's member ends at the next.
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| e.kind == "chunk" || (e.kind == "reg" && e.size > 0))
        .map(|e| e.offset)
        .chain([toc_offset])
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let mut mapper = Mapper {
        starts,
        frames,
        toc_offset,
        last_start: 0,
        m: Mapped::default(),
    };
    let mut open: Option<OpenFile> = None;
    for e in &toc.entries {
        if e.kind == "chunk" {
            let file = open.as_mut().filter(|f| f.name == e.name).ok_or_else(|| {
                Corrupt(format!("chunk of {:?} does not follow its file", e.name))
            })?;
            mapper.chunk(file, e)?;
            continue;
        }
        if let Some(file) = open.take() {
            finish(file)?;
        }
        let path = clean_path(&e.name).map_err(Corrupt)?;
        let entry = if path == PREFETCH_LANDMARK || path == NO_PREFETCH_LANDMARK {
            let end = if path == PREFETCH_LANDMARK {
                mapper.m.size
            } else {
                0
            };
            mapper.m.prefetch_end.get_or_insert(end);
            None
        } else {
            let (path, kind) = match whiteout(&path).map_err(Corrupt)? {
                Some(w) => w,
                None => (path, kind_of(e)?),
            };
            Some(entry_of(e, path, kind, mapper.m.size)?)
        };
        if e.kind == "reg" && e.size > 0 {
            let emit = matches!(&entry, Some(x) if x.kind == Kind::File);
            let mut file = OpenFile {
                name: e.name.clone(),
                size: e.size,
                covered: 0,
                emit,
            };
            // A file's entry is also its first chunk.
            mapper.chunk(&mut file, e)?;
            open = Some(file);
        }
        mapper.m.entries.extend(entry);
    }
    if let Some(file) = open.take() {
        finish(file)?;
    }
    Ok(mapper.m)
}

struct Mapper {
    starts: Vec<u64>,
    frames: Frames,
    toc_offset: u64,
    last_start: u64,
    m: Mapped,
}

impl Mapper {
    /// Checks one chunk of `file` and adds its span.
    fn chunk(&mut self, file: &mut OpenFile, e: &TocEntry) -> Result<(), Unusable> {
        use Unusable::{Corrupt, Fallback};
        let name = &file.name;
        if e.chunk_offset != file.covered {
            return Err(Corrupt(format!(
                "chunk of {name:?} at {} where {} was expected",
                e.chunk_offset, file.covered
            )));
        }
        let rest = file.size - file.covered;
        let len = if e.chunk_size > 0 { e.chunk_size } else { rest };
        if len > rest {
            return Err(Corrupt(format!(
                "chunk of {name:?} at {} ({len} bytes) runs past its size {}",
                e.chunk_offset, file.size
            )));
        }
        file.covered += len;
        if !matches!(e.chunk_type.as_str(), "" | "data") {
            return Err(Fallback(format!(
                "chunk of {name:?} at {} is of type {:?}",
                e.chunk_offset, e.chunk_type
            )));
        }
        if !file.emit {
            return Ok(());
        }
        let in_start = e.offset;
        if in_start >= self.toc_offset || in_start < self.last_start {
            return Err(Corrupt(format!(
                "chunk of {name:?} at blob offset {in_start} is out of order (previous {}, TOC at {})",
                self.last_start, self.toc_offset
            )));
        }
        self.last_start = in_start;
        let in_end = self.starts[self.starts.partition_point(|&s| s <= in_start)];
        if len.saturating_add(e.inner_offset) > MAX_CHUNK {
            return Err(Fallback(format!(
                "chunk of {name:?} at {} is {len} bytes",
                e.chunk_offset
            )));
        }
        let digest = if !e.chunk_digest.is_empty() {
            &e.chunk_digest
        } else if len == file.size && !e.digest.is_empty() {
            &e.digest
        } else {
            return Err(Fallback(format!("{name:?} has no chunk digests")));
        };
        let digest = crate::digest::parse(digest)
            .map_err(|err| Corrupt(format!("chunk of {name:?}: {err}")))?;
        if crate::digest::compute_like(&digest, b"").is_err() {
            return Err(Fallback(format!("unsupported digest {digest}")));
        }
        self.m.spans.push(Span {
            out_offset: self.m.size,
            out_len: len,
            digest,
            fetch: match self.frames {
                Frames::Gzip => Fetch::Member {
                    in_start,
                    in_end,
                    skip: e.inner_offset,
                },
                Frames::Zstd if e.inner_offset == 0 => Fetch::Zstd { in_start, in_end },
                Frames::Zstd => {
                    return Err(Fallback(format!("chunk of {name:?} has an inner offset")))
                }
            },
        });
        self.m.size = self
            .m
            .size
            .checked_add(len)
            .ok_or_else(|| Corrupt("file sizes overflow".into()))?;
        Ok(())
    }
}

fn finish(file: OpenFile) -> Result<(), Unusable> {
    if file.covered == file.size {
        Ok(())
    } else {
        Err(Unusable::Corrupt(format!(
            "chunks of {:?} cover {} of its {} bytes",
            file.name, file.covered, file.size
        )))
    }
}

fn kind_of(e: &TocEntry) -> Result<Kind, Unusable> {
    Ok(match e.kind.as_str() {
        "reg" => Kind::File,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink {
            target: e.link_name.clone(),
        },
        "hardlink" => Kind::Hardlink {
            target: clean_path(&e.link_name).map_err(Unusable::Corrupt)?,
        },
        "char" => Kind::Char {
            major: e.dev_major,
            minor: e.dev_minor,
        },
        "block" => Kind::Block {
            major: e.dev_major,
            minor: e.dev_minor,
        },
        "fifo" => Kind::Fifo,
        other => {
            return Err(Unusable::Corrupt(format!(
                "entry {:?} has unsupported type {other:?}",
                e.name
            )))
        }
    })
}

fn entry_of(e: &TocEntry, path: String, kind: Kind, offset: u64) -> Result<Entry, Unusable> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let xattrs = e
        .xattrs
        .iter()
        .map(|(k, v)| b64.decode(v).map(|v| (k.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|err| Unusable::Corrupt(format!("xattrs of {:?}: {err}", e.name)))?;
    // The TOC's modtime is RFC 3339; converters usually write whole seconds.
    let (mtime, mtime_nsec) = chrono::DateTime::parse_from_rfc3339(&e.modtime)
        .map_or((0, 0), |t| (t.timestamp(), t.timestamp_subsec_nanos()));
    Ok(Entry {
        path,
        mode: (e.mode & 0o7777) as u32,
        uid: e.uid,
        gid: e.gid,
        size: if kind == Kind::File { e.size } else { 0 },
        mtime,
        mtime_nsec,
        offset,
        xattrs,
        kind,
    })
}

#[cfg(test)]
mod tests;
