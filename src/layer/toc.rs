//! The TOC model eStargz and zstd:chunked share: the artifact names eStargz puts in a layer
//! (the TOC entry and the prefetch landmarks, which no tree shows), the TOC JSON parsed with a
//! bound on its entries ([`Toc::parse`]), and [`map_toc`], which maps a TOC's entries onto the
//! index model — entries and spans of a virtual address space, one span per chunk, each
//! fetched as a gzip member or a zstd frame ([`Frames`]). A TOC that cannot serve verified
//! random access is [`Unusable::Fallback`] (the caller streams the layer); a malformed one is
//! [`Unusable::Corrupt`].

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

use super::entry::{clean_path, whiteout, Entry, Kind};
use super::{Fetch, Span};

/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Marks the end of the files to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Placed first: prefetch nothing.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Largest chunk served from one member (larger ones fall back to streaming).
pub const MAX_CHUNK: u64 = 64 << 20;

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
