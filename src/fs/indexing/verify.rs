//! `stratafs index verify`: the index a layer is served with, checked against the layer
//! itself — its blob streamed once (verified by blob digest and diff_id), then every entry's
//! metadata and every file's contents compared as read through each index.

use std::sync::Arc;

use super::Layers;
use crate::fs::FsError;
use crate::image::{ImageRecord, LayerRecord};
use crate::layer::reader::LayerReader;
use crate::layer::IndexFormat;

impl Layers {
    /// Checks the index `layer` is served with (stored, published or from an eStargz TOC)
    /// against the layer itself: streams the blob once (verified by blob digest and diff_id),
    /// then compares every entry's metadata and every file's contents as read through each
    /// index. On a mismatch the stored index is replaced by the streamed one and an error
    /// names the layer.
    pub async fn verify(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<VerifyReport, FsError> {
        let (stored, _) = self.index(image, layer).await?;
        let truth = Arc::new(self.stream(image, layer).await?);
        let served = self.reader(image, layer, stored.clone())?;
        let real = self.reader(image, layer, truth.clone())?;
        let mut report = VerifyReport {
            blob: layer.digest.to_string(),
            format: stored.format,
            entries: truth.entries.len(),
            files: 0,
            bytes: 0,
        };
        let result = compare(&served, &real, &mut report).await;
        if let Err(detail) = result {
            self.indexes.put(&truth, None)?;
            return Err(FsError::IndexMismatch {
                blob: layer.digest.to_string(),
                detail,
            });
        }
        Ok(report)
    }
}

/// What [`Layers::verify`] compared.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub blob: String,
    pub format: IndexFormat,
    pub entries: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Compares the trees and file contents two readers of one layer present.
async fn compare(
    served: &LayerReader,
    real: &LayerReader,
    report: &mut VerifyReport,
) -> Result<(), String> {
    use std::collections::BTreeMap;
    // The last entry for a path is the one that counts (later tar entries replace earlier).
    let by_path = |r: &LayerReader| -> BTreeMap<String, crate::layer::Entry> {
        r.index()
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect()
    };
    let (a, b) = (by_path(served), by_path(real));
    if a.len() != b.len() {
        return Err(format!(
            "index has {} paths, the layer {}",
            a.len(),
            b.len()
        ));
    }
    for ((path, x), (_, y)) in a.iter().zip(&b) {
        let same = x.path == y.path
            && x.kind == y.kind
            && (x.mode, x.uid, x.gid, x.size) == (y.mode, y.uid, y.gid, y.size)
            && (x.mtime, x.mtime_nsec) == (y.mtime, y.mtime_nsec)
            && x.xattrs == y.xattrs;
        if !same {
            return Err(format!("entry /{path} differs: index {x:?}, layer {y:?}"));
        }
        if x.kind != crate::layer::Kind::File || x.size == 0 {
            continue;
        }
        const STEP: u64 = 4 << 20;
        let mut offset = 0;
        while offset < x.size {
            let len = STEP.min(x.size - offset);
            let got = served
                .read(x.offset + offset, len)
                .await
                .map_err(|e| e.to_string())?;
            let want = real
                .read(y.offset + offset, len)
                .await
                .map_err(|e| e.to_string())?;
            if got != want {
                return Err(format!("contents of /{path} differ at offset {offset}"));
            }
            offset += len;
        }
        report.files += 1;
        report.bytes += x.size;
    }
    Ok(())
}
