//! zstd:chunked layers (containers/storage): an index read from the layer's own table of
//! contents with one range read.
//!
//! A zstd:chunked blob is an ordinary zstd-compressed tar in which every file — every chunk of
//! a large file — starts a new zstd frame. A TOC ("manifest") in the same JSON form as
//! eStargz's (entries with type, name, mode, owner, times, link target, device numbers, base64
//! xattrs, the blob offset of each chunk's frame and each chunk's sha256) is stored compressed
//! near the end of the blob, and the layer descriptor says where and what it hashes to:
//!
//! - `io.github.containers.zstd-chunked.manifest-position` (older writers such as skopeo 1.9:
//!   `io.containers.zstd-chunked.manifest-position`) = `OFFSET:LENGTH:UNCOMPRESSED:TYPE`,
//!   TYPE 1 being the zstd-compressed JSON TOC;
//! - `…manifest-checksum` = the sha256 of those LENGTH compressed bytes.
//!
//! [`zstd_chunked_index`] reads the TOC, checks it against the checksum (an unverified TOC is
//! never used), and maps it onto a [`LayerIndex`] the way eStargz TOCs are ([`super::estargz`]):
//! a virtual address space of file data, one span per chunk fetched as [`super::Fetch::Zstd`]
//! and checked against its chunk digest. As with eStargz, the blob digest and diff_id are not
//! checked on this path; the index records `format: zstd-chunked`. TOCs that cannot serve
//! verified random access (holes stored as `zeros` chunks, chunks without digests, very large
//! chunks) give `Ok(None)` and the layer is streamed instead.

use std::collections::BTreeMap;
use std::io::Read;

use oci_spec::image::Digest;

use super::toc::{map_toc, Frames, Toc, Unusable};
use super::{IndexFormat, LayerError, LayerIndex, Limits, INDEX_VERSION};
use crate::image::Compression;
use crate::source::BlobSource;

/// Annotation keys locating the TOC, newest name first.
pub const POSITION_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// Annotation keys with the TOC's checksum, in the same order.
pub const CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
/// The TOC type this reader understands (zstd-compressed JSON).
const TOC_TYPE_JSON: u64 = 1;

/// Where a layer's TOC is and what it hashes to, from its annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocLocation {
    pub offset: u64,
    pub length: u64,
    pub uncompressed: u64,
    pub checksum: Digest,
}

/// The TOC location of a zstd:chunked layer; `None` when the annotations are absent, `Err`
/// when they are present but malformed.
pub fn toc_location(annotations: &BTreeMap<String, String>) -> Result<Option<TocLocation>, String> {
    let pick = |keys: &[&str; 2]| keys.iter().find_map(|k| annotations.get(*k));
    let (Some(position), Some(checksum)) =
        (pick(&POSITION_ANNOTATIONS), pick(&CHECKSUM_ANNOTATIONS))
    else {
        return Ok(None);
    };
    let fields: Vec<u64> = position
        .split(':')
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("manifest position {position:?}: {e}"))?;
    let [offset, length, uncompressed, kind] = fields[..] else {
        return Err(format!("manifest position {position:?}: expected 4 fields"));
    };
    if kind != TOC_TYPE_JSON {
        return Err(format!(
            "manifest position {position:?}: TOC type {kind} is not supported"
        ));
    }
    let checksum = crate::digest::parse(checksum).map_err(|e| format!("manifest checksum: {e}"))?;
    Ok(Some(TocLocation {
        offset,
        length,
        uncompressed,
        checksum,
    }))
}

/// The index of a zstd:chunked layer from its TOC at `at`, or `None` if the TOC cannot serve
/// verified random access (stream the layer instead). One range read, no file data.
pub async fn zstd_chunked_index(
    source: &dyn BlobSource,
    blob: &Digest,
    diff_id: &Digest,
    at: &TocLocation,
    limits: &Limits,
) -> Result<Option<LayerIndex>, LayerError> {
    let (max_toc, max_entries) = (limits.max_toc_bytes, limits.max_entries);
    let corrupt = |detail: String| LayerError::Corrupt {
        blob: blob.clone(),
        detail: format!("zstd:chunked TOC: {detail}"),
    };
    let blob_size = source.size();
    let end = at.offset.checked_add(at.length).filter(|e| *e <= blob_size);
    if end.is_none() {
        return Err(corrupt(format!(
            "{} bytes at {} do not fit the {blob_size}-byte blob",
            at.length, at.offset
        )));
    }
    if at.length > max_toc || at.uncompressed > max_toc {
        return Err(corrupt(format!(
            "{} bytes ({} uncompressed) are more than the {max_toc}-byte limit ([index] max_toc_bytes)",
            at.length, at.uncompressed
        )));
    }
    let compressed =
        source
            .read_range(at.offset, at.length)
            .await
            .map_err(|e| LayerError::Read {
                blob: blob.clone(),
                what: "the zstd:chunked TOC",
                detail: e.to_string(),
            })?;
    let actual = crate::digest::compute_like(&at.checksum, &compressed)
        .map_err(|e| corrupt(e.to_string()))?;
    if actual != at.checksum {
        return Err(LayerError::Mismatch {
            blob: blob.clone(),
            what: "zstd:chunked TOC checksum",
            expected: at.checksum.to_string(),
            actual: actual.to_string(),
        });
    }
    let (blob, diff_id, at) = (blob.clone(), diff_id.clone(), at.clone());
    tokio::task::spawn_blocking(move || {
        let corrupt = |detail: String| LayerError::Corrupt {
            blob: blob.clone(),
            detail: format!("zstd:chunked TOC: {detail}"),
        };
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(&compressed[..])
            .and_then(|d| d.take(at.uncompressed + 1).read_to_end(&mut json))
            .map_err(|e| corrupt(format!("decompressing: {e}")))?;
        if json.len() as u64 != at.uncompressed {
            return Err(corrupt(format!(
                "{} bytes where the annotation says {}",
                json.len(),
                at.uncompressed
            )));
        }
        let toc = Toc::parse(&json, max_entries).map_err(corrupt)?;
        drop(json);
        let mapped = match map_toc(&toc, at.offset, Frames::Zstd) {
            Ok(m) => m,
            Err(Unusable::Corrupt(detail)) => return Err(corrupt(detail)),
            Err(Unusable::Fallback(reason)) => {
                tracing::warn!(%blob, %reason, "zstd:chunked TOC unusable for random access: streaming instead");
                return Ok(None);
            }
        };
        Ok(Some(LayerIndex {
            version: INDEX_VERSION,
            blob,
            diff_id,
            compression: Compression::Zstd,
            blob_size,
            size: mapped.size,
            entries: mapped.entries,
            spans: mapped.spans,
            checkpoints: Vec::new(),
            format: IndexFormat::ZstdChunked,
            prefetch_end: mapped.prefetch_end,
            windows: None,
            published: None,
        }))
    })
    .await
    .expect("TOC task")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn locations_from_either_annotation_name() {
        let sum = "sha256:6a5ba5a8017b2d740050e4bc4afc58376f2c30705facd178aa52f79a6c028894";
        let old = annotations(&[
            (POSITION_ANNOTATIONS[1], "300336:624:1837:1"),
            (CHECKSUM_ANNOTATIONS[1], sum),
        ]);
        let loc = toc_location(&old).unwrap().unwrap();
        assert_eq!(
            (loc.offset, loc.length, loc.uncompressed),
            (300336, 624, 1837)
        );
        let new = annotations(&[
            (POSITION_ANNOTATIONS[0], "1:2:3:1"),
            (CHECKSUM_ANNOTATIONS[0], sum),
        ]);
        assert_eq!(toc_location(&new).unwrap().unwrap().offset, 1);
        assert_eq!(toc_location(&BTreeMap::new()).unwrap(), None);
        for bad in ["1:2:3", "a:2:3:1", "1:2:3:2"] {
            let a = annotations(&[
                (POSITION_ANNOTATIONS[0], bad),
                (CHECKSUM_ANNOTATIONS[0], sum),
            ]);
            assert!(toc_location(&a).is_err(), "{bad}");
        }
    }
}
