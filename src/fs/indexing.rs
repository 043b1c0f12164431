//! Where each layer's index comes from — the one place that decides. [`Layers`] finds it:
//! stored; pinned by the image (a published stratafs index, an eStargz TOC, a zstd:chunked TOC);
//! or built by streaming the blob once from the registry with parallel range requests, which
//! also fills the chunk cache. It also checks the index a layer is served with against the
//! layer ([`Layers::verify`], in `verify`) and counts the bytes fetched per layer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::Digest;

use crate::cache::Cache;
use crate::config::IndexSettings;
use crate::image::{Compression, ImageRecord, LayerRecord};
use crate::layer::estargz::{estargz_index, TOC_DIGEST_ANNOTATION};
use crate::layer::reader::{stream_index, LayerReader, StreamSpec};
use crate::layer::zstd_chunked;
use crate::layer::{IndexFormat, IndexStore, LayerIndex, Limits, DEFAULT_SPAN};
use crate::reference::Reference;
use crate::registry::{Registry, MAX_INDEX_BLOB};
use crate::source::{BlobSource, RegistrySource};

use super::FsError;

mod verify;
pub use verify::VerifyReport;

/// How one layer's index was obtained (serialized: an element of `index build --json`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct IndexReport {
    #[serde(rename = "digest")]
    pub blob: String,
    pub built: bool,
    #[serde(skip)]
    pub format: IndexFormat,
    pub entries: usize,
    pub spans: usize,
    pub checkpoints: usize,
    pub blob_size: u64,
    pub size: u64,
    pub seconds: f64,
}

/// Layer descriptor annotation pinning a stratafs layer index (the gzip'ed JSON blob in the
/// same repository) by digest: written by `stratafs index push --bind`, so the manifest the
/// user pulls vouches for the index as it vouches for the layer.
pub const INDEX_ANNOTATION: &str = "io.stratafs.index.digest";

/// The stratafs index an image vouches for on `layer`: pinned by the manifest's
/// [`INDEX_ANNOTATION`], or adopted from an unbound referrer by a user who opted in
/// (`LayerRecord::referrer_index`). An unparsable annotation pins nothing.
pub fn pinned_index(layer: &LayerRecord) -> Option<(Digest, bool)> {
    match layer.annotations.get(INDEX_ANNOTATION) {
        Some(a) => crate::digest::parse(a).ok().map(|d| (d, true)),
        None => layer.referrer_index.clone().map(|d| (d, false)),
    }
}

/// Checks a published index (bound or referrer) before it is stored: current version, it
/// describes this layer exactly as the image's records do (blob, diff_id, size, compression),
/// and it is well formed ([`LayerIndex::validate`]).
pub fn check_published(
    index: &LayerIndex,
    layer: &LayerRecord,
    limits: &Limits,
) -> Result<(), String> {
    if !(crate::layer::OLDEST_INDEX_VERSION..=crate::layer::INDEX_VERSION).contains(&index.version)
    {
        return Err(format!("index version {} is not supported", index.version));
    }
    if index.blob != layer.digest
        || index.diff_id != layer.diff_id
        || index.blob_size != layer.size
        || Some(index.compression) != Compression::of_layer(&layer.media_type)
    {
        return Err("it describes another layer".into());
    }
    index.validate(limits.max_entries)
}

/// Whether `layer` is served lazily, by range reads from the registry: gzip (with or without
/// an index; eStargz included) and uncompressed tar layers, and zstd layers with a
/// zstd:chunked TOC. A plain zstd layer has no random access: a mount streams it whole once
/// and serves it from the cache (see [`fits_one_pass`]).
pub fn lazily_servable(layer: &LayerRecord) -> bool {
    match Compression::of_layer(&layer.media_type) {
        Some(Compression::Gzip | Compression::None) => true,
        Some(Compression::Zstd) => {
            matches!(zstd_chunked::toc_location(&layer.annotations), Ok(Some(_)))
        }
        None => false,
    }
}

/// How many times its compressed size a plain zstd layer is assumed to decode to at most, when
/// deciding before any byte is read whether it fits one streaming pass. Image layers decode to
/// 2–5× their zstd size; a layer that decodes to more than the pass may keep fails its
/// stream with an error that says to raise `[cache] max_size`.
pub const ZSTD_EXPANSION: u64 = 10;

/// Whether a layer without random access (plain zstd) can be served from the cache after one
/// streaming pass that may keep `pass_budget` bytes ([`crate::cache::Cache::pass_budget`]),
/// judged from its compressed size ([`ZSTD_EXPANSION`]). Layers with random access always can.
pub fn fits_one_pass(layer: &LayerRecord, pass_budget: u64) -> bool {
    lazily_servable(layer)
        || (Compression::of_layer(&layer.media_type) == Some(Compression::Zstd)
            && layer.size.saturating_mul(ZSTD_EXPANSION) <= pass_budget)
}

/// What pins a layer's own TOC: the eStargz TOC digest annotation (on gzip layers) or the
/// zstd:chunked manifest checksum annotation (on zstd layers).
pub fn toc_pin(layer: &LayerRecord) -> Option<Digest> {
    match Compression::of_layer(&layer.media_type)? {
        Compression::Gzip => layer
            .annotations
            .get(TOC_DIGEST_ANNOTATION)
            .and_then(|a| crate::digest::parse(a).ok()),
        Compression::Zstd => zstd_chunked::toc_location(&layer.annotations)
            .ok()
            .flatten()
            .map(|l| l.checksum),
        Compression::None => None,
    }
}

/// Bytes read from the registry per layer blob (since the last [`Layers::save_fetched`]); a
/// clonable handle, so a progress display can watch it.
#[derive(Clone, Default)]
pub struct FetchMeter(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicU64>>>>);

impl FetchMeter {
    /// All bytes counted and not yet saved.
    pub fn total(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<AtomicU64>>> {
        self.0.lock().unwrap()
    }
}

/// Access to layer indexes, blob sources and the cache for every image in a store.
///
/// Which index serves a layer of an image (the trust model, docs/security.md):
/// 1. one built here by streaming the layer, verified against its digest and diff_id — for
///    every image that has the layer;
/// 2. a stratafs index the image pins ([`pinned_index`]) — for that image only;
/// 3. the eStargz or zstd:chunked TOC the image's annotations pin — for that image only;
/// 4. otherwise the layer is streamed once and (1) is built.
pub struct Layers {
    pub(super) indexes: IndexStore,
    cache: Arc<Cache>,
    pub(super) client: Arc<dyn Registry>,
    pub(super) settings: IndexSettings,
    /// The first requests of the opens to come, started while the image was pulled
    /// (`fs/early.rs`).
    pub(super) early: Arc<crate::registry::Early>,
    span: u64,
    /// Bytes read from the registry per blob since the last [`Layers::save_fetched`].
    fetched: FetchMeter,
    /// The budget of fetches ahead of reads every reader made here shares (one per mount).
    budgets: crate::layer::reader::budget::Budgets,
    fetched_dir: std::path::PathBuf,
    pub(super) files_dir: std::path::PathBuf,
    tmp_dir: std::path::PathBuf,
}

impl Layers {
    pub fn new(root: &std::path::Path, client: Arc<dyn Registry>, cache: Arc<Cache>) -> Layers {
        Layers {
            indexes: IndexStore::new(root),
            cache,
            client,
            settings: IndexSettings::default(),
            early: Default::default(),
            span: DEFAULT_SPAN,
            fetched: Default::default(),
            budgets: Default::default(),
            fetched_dir: crate::store::Layout::new(root).fetched(),
            files_dir: crate::store::Layout::new(root).files(),
            tmp_dir: crate::store::Layout::new(root).tmp(),
        }
    }

    /// The bytes read from registries so far, for progress displays.
    pub fn fetch_meter(&self) -> FetchMeter {
        self.fetched.clone()
    }

    /// Uses the `[index]` settings (which indexes are trusted, and the limits).
    pub fn with_settings(mut self, settings: IndexSettings) -> Layers {
        self.settings = settings;
        self
    }

    /// Spans of about `span` bytes in indexes built here (tests: a span per small file, as
    /// eStargz and zstd:chunked chunks are).
    #[cfg(test)]
    pub(crate) fn with_span(mut self, span: u64) -> Layers {
        self.span = span;
        self
    }

    fn limits(&self) -> Limits {
        Limits::from(&self.settings)
    }

    /// Adds the bytes read from the registry since the last call to the per-blob totals kept
    /// under `<root>/cache/fetched/` (what `cache stats` reports).
    pub fn save_fetched(&self) -> std::io::Result<()> {
        let counters: Vec<(String, u64)> = self
            .fetched
            .lock()
            .iter()
            .map(|(blob, c)| (blob.clone(), c.swap(0, Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        std::fs::create_dir_all(&self.fetched_dir)?;
        for (blob, n) in counters {
            let total = fetched_total(&self.fetched_dir, &blob) + n;
            crate::store::write_atomic(
                &self.tmp_dir,
                &self.fetched_dir.join(&blob),
                total.to_string().as_bytes(),
            )
            .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The layer indexes (and window files) kept here.
    pub fn indexes(&self) -> &IndexStore {
        &self.indexes
    }

    /// Where the bytes of `layer` come from: the registry the image was pulled from.
    pub fn source(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<Arc<RegistrySource>, FsError> {
        self.blob_source(image, layer, &layer.digest, layer.size, false)
    }

    /// Blob `digest` (`size` bytes) of `image`'s repository, its bytes counted as `layer`'s;
    /// with `early`, its reads take the ranges the pull started early (a TOC's reads).
    fn blob_source(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        digest: &Digest,
        size: u64,
        early: bool,
    ) -> Result<Arc<RegistrySource>, FsError> {
        let reference: Reference = image
            .name
            .parse()
            .map_err(|_| FsError::Name(image.name.clone()))?;
        let counter = self
            .fetched
            .lock()
            .entry(layer.digest.digest().to_string())
            .or_default()
            .clone();
        let source = RegistrySource::new(
            self.client.clone(),
            reference,
            digest.clone(),
            size,
            counter,
        );
        Ok(Arc::new(if early {
            source.with_early(self.early.clone())
        } else {
            source
        }))
    }

    /// Where the checkpoint windows of `index` (a gzip index's window file) are read from: the
    /// file kept here when the index was built here, else the blob its publisher pushed to the
    /// image's repository. Window bytes read are counted as the layer's.
    pub fn windows_source(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        index: &LayerIndex,
    ) -> Result<Option<Arc<dyn BlobSource>>, FsError> {
        let Some(w) = &index.windows else {
            return Ok(None);
        };
        let local = self.indexes.windows_path(&w.digest);
        if let Ok(file) = crate::source::FileSource::open(&local, w.digest.clone()) {
            if file.size() == w.size {
                return Ok(Some(Arc::new(file)));
            }
        }
        Ok(Some(
            self.blob_source(image, layer, &w.digest, w.size, false)?,
        ))
    }

    /// A reader of `layer` through `index`, with its blob and window sources.
    pub fn reader(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        index: Arc<LayerIndex>,
    ) -> Result<LayerReader, FsError> {
        let source: Arc<dyn BlobSource> = self.source(image, layer)?;
        let windows = self.windows_source(image, layer, &index)?;
        Ok(LayerReader::new(index, source, self.cache.clone())
            .with_windows(windows)
            .with_budgets(self.budgets.clone()))
    }

    /// The index of `layer` as `image` may use it (see [`Layers`] for the order): stored,
    /// fetched as the image pins it, read from a pinned TOC, or built by streaming the blob once.
    pub async fn index(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<(Arc<LayerIndex>, IndexReport), FsError> {
        let started = Instant::now();
        let (index, built) = self.find(image, layer).await?;
        let how = match (index.format, &index.published, built) {
            (IndexFormat::Stream, None, true) => "streamed whole once to index it (the image vouches for no index): verified by blob digest and diff_id",
            (IndexFormat::Stream, None, false) => "lazy: stored index (built here from the verified blob, or published and checked against the whole layer)",
            (IndexFormat::Stream, Some(_), _) if pinned_index(layer).is_some_and(|(_, bound)| bound) => "lazy: stratafs index pinned by the manifest",
            (IndexFormat::Stream, Some(_), _) => "lazy: referrer index the image does not pin (unbound_referrers)",
            (IndexFormat::Estargz, ..) => "lazy: eStargz TOC pinned by the manifest",
            (IndexFormat::ZstdChunked, ..) => "lazy: zstd:chunked TOC pinned by the manifest",
        };
        let lazy = if index.random_access() {
            how
        } else {
            "served from the cache after one streaming pass (plain zstd: no random access)"
        };
        tracing::info!(image = %image.name, layer = %layer.digest, "{lazy}");
        let report = IndexReport {
            blob: layer.digest.to_string(),
            built,
            format: index.format,
            entries: index.entries.len(),
            spans: index.spans.len(),
            checkpoints: index.checkpoints.len(),
            blob_size: index.blob_size,
            size: index.size,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((Arc::new(index), report))
    }

    async fn find(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<(LayerIndex, bool), FsError> {
        match self.find_unbuilt(image, layer).await? {
            Some(found) => Ok(found),
            None => Ok((self.build(image, layer).await?, true)),
        }
    }

    /// Makes sure the index of `layer` is stored, fetching it as the image pins it if need
    /// be, but never streaming the blob: false where [`Layers::index`] would stream it. The
    /// snapshotter fetches an image's indexes ahead of its mount with this.
    pub async fn store_unbuilt(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<bool, FsError> {
        Ok(self.find_unbuilt(image, layer).await?.is_some())
    }

    async fn find_unbuilt(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<Option<(LayerIndex, bool)>, FsError> {
        let blob = &layer.digest;
        // The layer's own index comes with its window file; one whose file went missing is
        // built again (below) rather than read with windows from nowhere.
        if let Some(i) = self
            .stored(layer, None)
            .await?
            .filter(|i| self.indexes.has_windows(i))
        {
            return Ok(Some((i, false)));
        }
        let pinned = pinned_index(layer).filter(|_| self.settings.published);
        if let Some((pin, true)) = &pinned {
            if let Some(found) = self.published_index(image, layer, pin).await? {
                return Ok(Some(found));
            }
        }
        if let Some((built, i)) = self.toc_index(image, layer).await? {
            return Ok(Some((i, built)));
        }
        if let Some((pin, false)) = &pinned {
            if !self.settings.unbound_referrers {
                tracing::warn!(image = %image.name, layer = %blob, "ignoring the referrer index adopted earlier: [index] unbound_referrers is off");
            } else {
                tracing::warn!(image = %image.name, layer = %blob, index = %pin, "serving with a referrer index the image does not pin (unbound_referrers): until the layer is complete, whoever could push it decides what the files contain");
                if let Some(found) = self.published_index(image, layer, pin).await? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// The index of `layer` stored under `pin` (`None`: the one built here), if it describes
    /// the layer as this image's config and manifest do (diff_id, size): a stored index never
    /// speaks for a layer record it does not fit. Read and parsed on the blocking pool (a few
    /// MB of JSON): a mount's layers are read side by side, and no runtime thread waits.
    async fn stored(
        &self,
        layer: &LayerRecord,
        pin: Option<&Digest>,
    ) -> Result<Option<LayerIndex>, FsError> {
        let (store, blob, pin) = (self.indexes.clone(), layer.digest.clone(), pin.cloned());
        let index = tokio::task::spawn_blocking(move || store.get(&blob, pin.as_ref()))
            .await
            .expect("index store task")?;
        Ok(index.filter(|i| i.diff_id == layer.diff_id && i.blob_size == layer.size))
    }

    /// Whether opening `layer` streams its whole blob: no index of it is stored and the image
    /// pins none that this store may use. Decided without reading any index (the open reads
    /// them next): a stored or pinned one that turns out unusable is streamed too, but that
    /// is not known before trying.
    pub fn streams(&self, layer: &LayerRecord) -> bool {
        if self.indexes.has(&layer.digest, None) {
            return false;
        }
        let usable_pin = match pinned_index(layer).filter(|_| self.settings.published) {
            Some((_, bound)) => bound || self.settings.unbound_referrers,
            None => false,
        };
        !usable_pin && toc_pin(layer).is_none()
    }

    /// The published index `pin` of `layer`: stored, or fetched, checked and stored now.
    /// `None` (with a warning) when it cannot be used: the layer is then indexed otherwise.
    async fn published_index(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        pin: &Digest,
    ) -> Result<Option<(LayerIndex, bool)>, FsError> {
        if let Some(i) = self.stored(layer, Some(pin)).await? {
            return Ok(Some((i, false)));
        }
        match self.fetch_published(image, layer, pin).await {
            Ok(i) => Ok(Some((self.keep(i, Some(pin)).await?, true))),
            Err(e) => {
                tracing::warn!(image = %image.name, layer = %layer.digest, index = %pin, error = %e, "published index unusable: the layer is indexed otherwise (its TOC, or its own bytes when it is opened)");
                Ok(None)
            }
        }
    }

    /// The index from the layer's pinned eStargz or zstd:chunked TOC (stored under the pin, or
    /// read from the blob now), if it has one that serves random access.
    async fn toc_index(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<Option<(bool, LayerIndex)>, FsError> {
        let pin = toc_pin(layer);
        let Some(pin) = pin else { return Ok(None) };
        if let Some(i) = self.stored(layer, Some(&pin)).await? {
            return Ok(Some((false, i)));
        }
        let from_toc = match self.estargz(image, layer).await? {
            Some(i) => Some(i),
            None => self.zstd_chunked(image, layer).await?,
        };
        Ok(match from_toc {
            Some(i) => Some((true, self.keep(i, Some(&pin)).await?)),
            None => None,
        })
    }

    /// Fetches the stratafs index blob `pin` from the image's repository (digest-checked),
    /// and checks it describes this layer and is well formed.
    async fn fetch_published(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        pin: &Digest,
    ) -> Result<LayerIndex, FsError> {
        let reference: Reference = image
            .name
            .parse()
            .map_err(|_| FsError::Name(image.name.clone()))?;
        let invalid = |detail: String| FsError::Published {
            image: image.name.clone(),
            index: pin.to_string(),
            detail,
        };
        let blob = match self.early.take(&(pin.clone(), None)).await {
            Some(blob) => blob,
            None => self
                .client
                .fetch_blob((&reference, pin), Some(MAX_INDEX_BLOB))
                .await
                .map_err(|e| invalid(e.to_string()))?,
        };
        let limits = self.limits();
        let expected = layer.clone();
        let pin_owned = pin.clone();
        let parsed = tokio::task::spawn_blocking(move || -> Result<LayerIndex, String> {
            let json = crate::layer::packed::unpack(&blob, limits.max_toc_bytes)?;
            let mut index: LayerIndex = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
            drop(json);
            check_published(&index, &expected, &limits)?;
            index.published = Some(pin_owned);
            Ok(index)
        })
        .await
        .expect("index parse task");
        parsed.map_err(invalid)
    }

    /// The index of an eStargz layer from its footer and TOC; `None` if the layer is
    /// not gzip with a TOC digest annotation or its blob is not eStargz. Unannotated layers are
    /// streamed instead, since their TOC could not be verified (see `layer::estargz`).
    async fn estargz(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<Option<LayerIndex>, FsError> {
        let annotation = layer.annotations.get(TOC_DIGEST_ANNOTATION);
        let Some(annotation) = annotation
            .filter(|_| Compression::of_layer(&layer.media_type) == Some(Compression::Gzip))
        else {
            return Ok(None);
        };
        let toc_digest = match crate::digest::parse(annotation) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(blob = %layer.digest, "ignoring {TOC_DIGEST_ANNOTATION}: {e}");
                return Ok(None);
            }
        };
        let source = self.blob_source(image, layer, &layer.digest, layer.size, true)?;
        let limits = self.limits();
        Ok(estargz_index(
            &*source,
            &layer.digest,
            &layer.diff_id,
            Some(&toc_digest),
            &limits,
        )
        .await?)
    }

    /// The index of a zstd:chunked layer from its TOC; `None` if the layer is not zstd
    /// with the TOC annotations, or its TOC cannot serve random access.
    async fn zstd_chunked(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<Option<LayerIndex>, FsError> {
        if Compression::of_layer(&layer.media_type) != Some(Compression::Zstd) {
            return Ok(None);
        }
        let location = match zstd_chunked::toc_location(&layer.annotations) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(blob = %layer.digest, "ignoring zstd:chunked annotations: {e}");
                return Ok(None);
            }
        };
        let source = self.blob_source(image, layer, &layer.digest, layer.size, true)?;
        let limits = self.limits();
        let index = zstd_chunked::zstd_chunked_index(
            &*source,
            &layer.digest,
            &layer.diff_id,
            &location,
            &limits,
        );
        Ok(index.await?)
    }

    /// Streams the blob once: builds and stores the index, and caches every span.
    pub async fn build(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<LayerIndex, FsError> {
        let index = self.stream(image, layer).await?;
        self.keep(index, None).await
    }

    /// Stores `index` (under `pin`, if given) and returns it. On a blocking thread: each is a
    /// serialized and synced file, and the layers an open fetches at once are stored side by
    /// side instead of one after another on the task that opens them all.
    async fn keep(&self, index: LayerIndex, pin: Option<&Digest>) -> Result<LayerIndex, FsError> {
        let (store, pin) = (self.indexes.clone(), pin.cloned());
        let (index, stored) = tokio::task::spawn_blocking(move || {
            let stored = store.put(&index, pin.as_ref());
            (index, stored)
        })
        .await
        .expect("index store task");
        stored?;
        Ok(index)
    }

    /// The indexes of `image` to publish (`stratafs index push`), each with its window file:
    /// only indexes built here from the verified layer (a published one is rebuilt), and only
    /// those that serve random access. A layer read through its own TOC (eStargz,
    /// zstd:chunked) is pinned by the image already and needs none.
    pub async fn publishable(
        &self,
        image: &ImageRecord,
    ) -> Result<Vec<(LayerIndex, Option<Vec<u8>>)>, FsError> {
        let mut indexes = Vec::new();
        for layer in &image.layers {
            let index = match self.index(image, layer).await? {
                (i, _) if i.format != IndexFormat::Stream => continue,
                (i, _) if i.published.is_none() => i,
                _ => Arc::new(self.build(image, layer).await?),
            };
            if !index.random_access() {
                continue;
            }
            // The window file is kept only where the index was built (a published index
            // checked here has its windows in the registry): build it here then.
            let published = match self.indexes.windows_bytes(&index) {
                Ok(w) => ((*index).clone(), w),
                Err(_) => {
                    let built = self.build(image, layer).await?;
                    let w = self.indexes.windows_bytes(&built)?;
                    (built, w)
                }
            };
            indexes.push(published);
        }
        Ok(indexes)
    }

    /// The index of `layer` to publish with a startup profile (`stratafs profile push`), with
    /// its window file: built here by streaming the layer (verified against its digest and
    /// diff_id), with spans of single deflate blocks where `fine` — the profile's ranges of
    /// this layer, uncompressed — reads ([`crate::layer::SpanPlan`]), so that the profile's
    /// replay fetches the blocks it reads rather than whole spans. Not stored: the layer keeps
    /// the index it is served with here. `None` for a layer that is not gzip or is read
    /// through its own TOC (eStargz): its spans are the TOC's; and where `fine` names no byte
    /// of the layer.
    pub async fn shaped_for_profile(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        fine: Vec<(u64, u64)>,
    ) -> Result<Option<(LayerIndex, Option<Vec<u8>>)>, FsError> {
        if Compression::of_layer(&layer.media_type) != Some(Compression::Gzip) {
            return Ok(None);
        }
        let (current, _) = self.index(image, layer).await?;
        let fine: Vec<(u64, u64)> = fine.into_iter().filter(|r| r.0 < current.size).collect();
        if current.format != IndexFormat::Stream || fine.is_empty() {
            return Ok(None);
        }
        let plan = crate::layer::SpanPlan {
            span: self.span,
            fine,
        };
        let index = self.stream_with(image, layer, plan).await?;
        let windows = self.indexes.windows_bytes(&index)?;
        Ok(Some((index, windows)))
    }

    /// Streams the blob once and returns its index (verified against the blob digest and
    /// diff_id), caching every span; stores nothing.
    async fn stream(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
    ) -> Result<LayerIndex, FsError> {
        self.stream_with(image, layer, self.span.into()).await
    }

    /// [`Self::stream`] with spans ended as `plan` says.
    async fn stream_with(
        &self,
        image: &ImageRecord,
        layer: &LayerRecord,
        plan: crate::layer::SpanPlan,
    ) -> Result<LayerIndex, FsError> {
        let compression =
            Compression::of_layer(&layer.media_type).ok_or_else(|| FsError::Unsupported {
                image: image.name.clone(),
                media_type: layer.media_type.clone(),
            })?;
        let source: Arc<dyn BlobSource> = self.source(image, layer)?;
        let spec = StreamSpec {
            compression,
            blob: layer.digest.clone(),
            diff_id: layer.diff_id.clone(),
            blob_size: layer.size,
            span: plan,
            limits: self.limits(),
            windows: Some(self.indexes.clone()),
        };
        Ok(stream_index(source, spec, self.cache.clone()).await?)
    }
}

/// Bytes of blob `hex` read from the registry so far, as saved under `dir`.
pub fn fetched_total(dir: &std::path::Path, hex: &str) -> u64 {
    std::fs::read_to_string(dir.join(hex))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}
