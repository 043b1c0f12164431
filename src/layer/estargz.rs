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

use std::io::Read;

use oci_spec::image::Digest;

use super::entry::clean_path;
use super::toc::{map_toc, Frames, Toc, Unusable};
pub use super::toc::{MAX_CHUNK, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME};
use super::{IndexFormat, LayerError, LayerIndex, Limits, INDEX_VERSION};
use crate::image::Compression;
use crate::source::BlobSource;

/// Layer descriptor annotation: the sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer.
const LEGACY_FOOTER_SIZE: u64 = 47;
/// Bound on the compressed TOC member a (possibly hostile) footer makes us read; the JSON
/// inside is bounded by [`Limits::max_toc_bytes`] and its entries by [`Limits::max_entries`].
const MAX_TOC_MEMBER: u64 = 64 << 20;

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

#[cfg(test)]
mod tests;
