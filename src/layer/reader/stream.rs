//! The whole-layer streaming pass: one read of a blob, in parallel range requests, that
//! builds its index (verified against the blob digest and the diff_id) and fills the cache.

use std::sync::Arc;

use crate::cache::Cache;
use crate::image::Compression;
use crate::layer::{build_index, LayerError, LayerIndex, Limits};
use crate::source::{BlobSource, SequentialReader};

/// Range size and parallelism of a whole-layer streaming pass (4 MiB in flight per layer: far
/// above the bandwidth-delay product of the links we serve — 250 KB at 100 Mbit/s and 20 ms,
/// or at 1 Gbit/s and 2 ms — and a bound on memory while the layers of an image stream side
/// by side).
const STREAM_CHUNK: u64 = 1 << 20;
const STREAM_PARALLEL: usize = 4;

/// What a streaming pass needs to know about the layer.
pub struct StreamSpec {
    pub compression: Compression,
    pub blob: oci_spec::image::Digest,
    pub diff_id: oci_spec::image::Digest,
    pub blob_size: u64,
    pub span: crate::layer::SpanPlan,
    pub limits: Limits,
    /// Where to keep the window file of a gzip layer (`None`: not kept, as when a layer
    /// without random access is streamed again only to refill the cache).
    pub windows: Option<crate::layer::IndexStore>,
}

/// Streams a whole blob once (parallel range requests), builds its index — verified against the
/// blob digest and diff_id — and puts its spans into the cache on the way, up to the cache's
/// [`Cache::pass_budget`]. Chunks the pass added are removed again if the pass fails (a blob or
/// diff_id mismatch, a tar error, a limit): nothing of a layer that did not verify is kept.
/// A plain zstd layer (no random access: served from the cache only) that does not fit the
/// budget is refused.
pub async fn stream_index(
    source: Arc<dyn BlobSource>,
    spec: StreamSpec,
    cache: Arc<Cache>,
) -> Result<LayerIndex, LayerError> {
    let reader = SequentialReader::new(
        source,
        tokio::runtime::Handle::current(),
        STREAM_CHUNK,
        STREAM_PARALLEL,
    );
    tokio::task::spawn_blocking(move || {
        let budget = cache.pass_budget();
        let mut added = Vec::new();
        let (mut kept, mut dropped) = (0u64, false);
        let mut windows_file = spec.windows.as_ref().map(|s| s.new_windows()).transpose()?;
        let mut windows: Box<dyn std::io::Write> = match &mut windows_file {
            Some(f) => Box::new(std::io::BufWriter::new(f.as_file_mut())),
            None => Box::new(std::io::sink()),
        };
        let mut result = build_index(
            reader,
            spec.compression,
            &spec.blob,
            &spec.diff_id,
            spec.blob_size,
            spec.span.clone(),
            &mut |digest, data| {
                if cache.contains(digest) {
                    return Ok(());
                }
                if kept + data.len() as u64 > budget {
                    dropped = true;
                    return Ok(());
                }
                cache
                    .insert_cold(digest, data)
                    .map_err(std::io::Error::other)?;
                kept += data.len() as u64;
                added.push(digest.clone());
                Ok(())
            },
            &mut windows,
            &spec.limits,
        );
        let flushed = windows.flush();
        drop(windows);
        if let (Ok(index), Some(store), Some(file)) = (&result, &spec.windows, windows_file) {
            let kept = flushed
                .map_err(|e| LayerError::Store {
                    path: file.path().to_path_buf(),
                    detail: e.to_string(),
                })
                .and_then(|()| store.keep_windows(file, index.windows.as_ref()));
            if let Err(e) = kept {
                result = Err(e);
            }
        }
        if dropped && spec.compression == Compression::Zstd {
            if let Ok(index) = &result {
                result = Err(LayerError::Corrupt {
                    blob: spec.blob.clone(),
                    detail: format!(
                        "a plain zstd layer is served from the cache only, and its {} bytes do not fit the {budget} bytes one layer may use (half the cache cap): raise [cache] max_size",
                        index.size
                    ),
                });
            }
        }
        if result.is_err() {
            for digest in &added {
                if let Err(e) = cache.remove(digest) {
                    tracing::warn!(error = %e, "could not drop a chunk of a failed pass");
                }
            }
        }
        result
    })
    .await
    .expect("index build task")
}
