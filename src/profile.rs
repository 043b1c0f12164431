//! Startup profiles: which parts of an image a workload read first, in order, so that the next
//! cold start can fetch them all, in parallel, before the workload asks.
//!
//! - **Record.** A mount's [`Recorder`] notes each [`RECORD_UNIT`] of a layer the first time
//!   a read touches it (reads through the mounted tree only — not background fill or replay), from
//!   the first read until the workload goes quiet, for at most [`RECORD_FOR`] and
//!   [`MAX_RANGES`] ranges. Contiguous units of one layer are one range.
//! - **Store.** Profiles live beside the layer indexes, in `<root>/profiles/`, one per image
//!   rootfs (keyed by the image's top ChainID, which names its layers and their order, not by
//!   a manifest digest that annotations change). A later recording merges in: the ranges not
//!   yet covered are appended (union, first-seen order).
//! - **Publish.** `stratafs profile push REF` pushes the profile as a blob and the image's
//!   manifest again with the annotation [`PROFILE_ANNOTATION`] = its digest: bound to the image
//!   by its publisher exactly as layer indexes are (`index push --bind`). A cold mount with no
//!   local profile fetches the bound one (digest-checked, at most [`MAX_PROFILE_BYTES`]).
//! - **Replay.** [`replay`] reads the profile's ranges through the layer readers,
//!   `parallel` at a time in profile order, so their spans are fetched (and verified, as every
//!   span is) before the workload's reads arrive; a read of a span being fetched waits for that
//!   fetch (single flight per range).
//!
//! Trust: a profile only says which verified bytes to fetch early. A hostile one (ranges of
//! other layers, absurd sizes, millions of entries) can at worst waste bandwidth, and less than
//! that: ranges outside the image's layers are dropped with a warning, and replay never
//! fetches more than the image's layers hold.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::fs::ImageView;
use crate::layer::LayerIndex;
use crate::source::BlobSource;
#[cfg(test)]
use plan::spans_around;
use plan::{coalesce, Coverage, Planned};
pub use record::{Recorder, RECORD_UNIT};

pub mod pack;
mod plan;
mod record;
mod store;
pub use store::ProfileStore;

/// Version of the profile format.
pub const PROFILE_VERSION: u32 = 1;
/// Manifest annotation naming the bound profile blob.
pub const PROFILE_ANNOTATION: &str = "io.stratafs.profile.digest";
/// Media type of a profile blob as published (zstd-compressed JSON, [`Profile::packed`];
/// plain JSON, as published before 2026-12-07 and as stored here, is read too).
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.stratafs.profile.v1+zstd";
/// Most ranges a profile may hold (recorded or fetched).
pub const MAX_RANGES: usize = 100_000;
/// Largest profile blob read from a registry or from disk.
pub const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// How long after its first read a mount records.
pub const RECORD_FOR: Duration = Duration::from_secs(60);
/// Uncompressed bytes one replay step reads at most: long ranges are replayed in pieces, so
/// `parallel` steps bound the memory a replay holds and the link carries several at once.
const REPLAY_PIECE: u64 = 2 << 20;
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{image}: pinned profile: {detail}")]
    Pinned { image: String, detail: String },
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("no profile recorded for {0}: mount it and run its workload first (mounts record what is read first)")]
    NotRecorded(String),
    #[error("{0} has no layers")]
    NoLayers(String),
    #[error("{image}: packing the profile's spans: {detail}")]
    Pack { image: String, detail: String },
    #[error("storing profile {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
}

/// Byte ranges of an image's layers, in the order a workload first read them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    pub version: u32,
    pub ranges: Vec<ProfileRange>,
    /// The spans the ranges replay, packed (`profile push`); only in a published profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<pack::Pack>,
}

/// Uncompressed bytes `offset..offset + len` of the layer whose blob digest is `layer`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProfileRange {
    pub layer: String,
    pub offset: u64,
    pub len: u64,
}

impl Profile {
    /// Parses a profile from `bytes` (from `what`, for messages), JSON or packed JSON
    /// ([`Profile::packed`]), within the bounds above.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Profile, ProfileError> {
        let invalid = |detail: String| ProfileError::Invalid {
            what: what.to_string(),
            detail,
        };
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            return Err(invalid(format!(
                "{} bytes, more than the {MAX_PROFILE_BYTES} allowed",
                bytes.len()
            )));
        }
        let unpacked;
        let json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let bytes = if json {
            bytes
        } else {
            let limit = format!("{MAX_PROFILE_BYTES} bytes of profile");
            unpacked = crate::layer::packed::unpack_within(bytes, MAX_PROFILE_BYTES, &limit)
                .map_err(|e| invalid(format!("not a profile: {e}")))?;
            &unpacked[..]
        };
        let mut profile: Profile =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a profile: {e}")))?;
        if profile.version != PROFILE_VERSION {
            return Err(invalid(format!(
                "version {} (this stratafs reads {PROFILE_VERSION})",
                profile.version
            )));
        }
        if profile.ranges.len() > MAX_RANGES {
            return Err(invalid(format!(
                "{} ranges, more than the {MAX_RANGES} allowed",
                profile.ranges.len()
            )));
        }
        if let Some(Err(e)) = profile.pack.as_ref().map(pack::Pack::validate) {
            // The ranges are still good: replayed from the layers.
            tracing::warn!(profile = what, "profile pack ignored: {e}");
            profile.pack = None;
        }
        Ok(profile)
    }

    /// The uncompressed ranges this profile names in the layer whose blob is `layer`.
    pub fn ranges_of(&self, layer: &Digest) -> Vec<(u64, u64)> {
        self.ranges
            .iter()
            .filter(|r| r.layer == layer.as_ref())
            .map(|r| (r.offset, r.offset.saturating_add(r.len)))
            .collect()
    }

    /// The profile as published: its JSON, zstd-compressed (a range repeats its layer's
    /// digest, which compresses away).
    pub fn packed(&self) -> Vec<u8> {
        crate::layer::packed::pack(&serde_json::to_vec(self).expect("profile serializes"))
    }

    /// Uncompressed bytes the ranges name (saturating: a hostile profile may name absurd ones).
    pub fn bytes(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |t, r| t.saturating_add(r.len))
    }

    /// Appends the parts of `newer` that no range here covers yet (union, first-seen order),
    /// up to [`MAX_RANGES`]. O(n log n) in the ranges.
    pub fn merge(&mut self, newer: &[ProfileRange]) {
        let mut covered: std::collections::HashMap<String, Coverage> = Default::default();
        for r in &self.ranges {
            covered
                .entry(r.layer.clone())
                .or_default()
                .add(r.offset, r.offset.saturating_add(r.len));
        }
        for r in newer {
            if self.ranges.len() >= MAX_RANGES {
                return;
            }
            let gaps = covered
                .entry(r.layer.clone())
                .or_default()
                .add(r.offset, r.offset.saturating_add(r.len));
            for (s, e) in gaps {
                if self.ranges.len() >= MAX_RANGES {
                    return;
                }
                self.ranges.push(ProfileRange {
                    layer: r.layer.clone(),
                    offset: s,
                    len: e - s,
                });
            }
        }
    }
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub ranges: usize,
    /// Ranges dropped as not describing this image's layers.
    pub ignored: usize,
    /// Pieces fetched (ranges split at [`REPLAY_PIECE`], continuing ones merged).
    pub pieces: usize,
    /// What the profile's pack did, if it has one and it was fetched.
    pub pack: Option<pack::PackReport>,
    pub seconds: f64,
}

/// The startup profile `image`'s manifest pins, fetched (digest-checked, at most
/// [`MAX_PROFILE_BYTES`]) — `None` when it pins none.
pub async fn pinned_profile(
    client: &dyn crate::registry::Registry,
    store: &crate::store::Store,
    image: &crate::image::ImageRecord,
) -> Result<Option<Profile>, ProfileError> {
    let pinned = |detail: String| ProfileError::Pinned {
        image: image.name.clone(),
        detail,
    };
    let manifest = store
        .content
        .get(&image.manifest.digest)
        .map_err(|e| pinned(format!("stored manifest: {e}")))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| pinned(format!("stored manifest: {e}")))?;
    let Some(pin) = manifest["annotations"][PROFILE_ANNOTATION].as_str() else {
        return Ok(None);
    };
    let pin = crate::digest::parse(pin).map_err(|e| pinned(format!("annotation {pin}: {e}")))?;
    let reference: crate::reference::Reference =
        image.name.parse().map_err(|e| pinned(format!("{e}")))?;
    let blob = client
        .fetch_blob((&reference, &pin), Some(MAX_PROFILE_BYTES))
        .await?;
    let what = format!("{pin} of {}", image.name);
    Ok(Some(Profile::parse(&blob, &what)?))
}

/// Reads `profile`'s ranges of `view`'s layers in profile order, `parallel` at a time, so
/// their spans are cached before the workload reads them: first from the profile's pack, if
/// it has one and `pack` is where to read it ([`pack::replay`]), then what the pack did not
/// hold from the layers.
pub async fn replay(
    view: Arc<ImageView>,
    profile: &Profile,
    parallel: usize,
    pack: Option<Arc<dyn BlobSource>>,
) -> ReplayReport {
    use futures_util::StreamExt;
    let started = Instant::now();
    view.set_profiled();
    let mut report = ReplayReport::default();
    let indexes: Vec<&LayerIndex> = view.readers().iter().map(|r| r.index()).collect();
    let Planned {
        pieces: plan,
        covered,
        ignored,
    } = plan::plan(&indexes, profile);
    report.ignored = ignored;
    // A file the profile covers any of is not recorded whole when opened for passthrough.
    view.set_profile_coverage(covered.into_iter().map(Coverage::into_intervals).collect());
    if report.ignored > 0 {
        tracing::warn!(
            image = %view.name,
            ignored = report.ignored,
            "profile: ignored ranges that are not in this image's layers (or past their end)"
        );
    }
    report.ranges = profile.ranges.len() - report.ignored;
    let plan = match (&profile.pack, pack) {
        (Some(p), Some(source)) => {
            report.pack = Some(pack::replay(&view, p, source, &plan).await);
            plan.into_iter()
                .filter(|&(l, o, n)| !view.readers()[l].is_cached(o, n))
                .collect()
        }
        _ => plan,
    };
    let plan = coalesce(plan);
    report.pieces = plan.len();
    // The checkpoint windows the pieces start from, each layer's in one request ahead of
    // them (claimed now: a piece that starts first waits for that request). Not for a piece
    // that continues one before it in the plan: that one is usually cached by then, and its
    // end is the window.
    let mut ends = std::collections::HashSet::new();
    let mut starts: Vec<Vec<(u64, u64)>> = vec![Vec::new(); view.readers().len()];
    for &(layer, offset, len) in &plan {
        if !ends.contains(&(layer, offset)) {
            starts[layer].push((offset, len));
        }
        ends.insert((layer, offset + len));
    }
    let windows = futures_util::future::join_all(
        view.readers()
            .iter()
            .zip(&starts)
            .map(|(reader, ranges)| reader.prefetch_windows(ranges)),
    );
    let pieces = futures_util::stream::iter(plan::groups(&plan))
        .for_each_concurrent(parallel.max(1), |group| {
            let view = view.clone();
            async move {
                // Started together: small ones share a request (`layer::reader::together`).
                futures_util::future::join_all(group.iter().map(|&(layer, offset, len)| {
                    let reader = &view.readers()[layer];
                    async move {
                        if let Err(e) = reader.prefetch(offset, len).await {
                            tracing::warn!(layer = %reader.index().blob, offset, error = %e, "profile replay: fetch failed");
                        }
                    }
                }))
                .await;
            }
        });
    futures_util::join!(windows, pieces);
    report.seconds = started.elapsed().as_secs_f64();
    let (pack_frames, pack_bytes, pack_spans, pack_skipped) =
        report.pack.as_ref().map_or((0, 0, 0, 0), |p| {
            (p.frames, p.bytes, p.delivered, p.skipped)
        });
    tracing::info!(
        image = %view.name,
        ranges = report.ranges,
        pieces = report.pieces,
        pack_frames,
        pack_bytes,
        pack_spans,
        pack_skipped,
        seconds = report.seconds,
        "profile replayed"
    );
    report
}

/// Where `pack` is read from: the image's repository in the registry it was pulled from.
fn pack_source(
    client: &Arc<dyn crate::registry::Registry>,
    image: &crate::image::ImageRecord,
    pack: &pack::Pack,
) -> Option<Arc<dyn BlobSource>> {
    let reference: crate::reference::Reference = image.name.parse().ok()?;
    let digest = crate::digest::parse(&pack.digest).ok()?;
    Some(Arc::new(crate::source::RegistrySource::new(
        client.clone(),
        reference,
        digest,
        pack.size,
        Default::default(),
    )))
}

/// What a mount does with profiles (`[mount] profile_*` in the config).
#[derive(Clone, Debug)]
pub struct MountProfile {
    pub record: bool,
    pub replay: bool,
    /// Ranges replayed at once.
    pub parallel: usize,
}

/// The fetch of the profile an image pins, started beside the fetches of its layers' indexes
/// rather than after them: the replay then starts as soon as the view is open.
pub struct EarlyProfile(tokio::task::JoinHandle<Result<Option<Profile>, ProfileError>>);

impl EarlyProfile {
    /// Starts fetching the profile `image` pins, if a mount of `chain` with these `settings`
    /// will replay it: replay on, `chain` the image's whole rootfs, and no profile of it
    /// stored here (a stored one is replayed instead; only its file's absence is checked
    /// here, the session reads it). Must run inside a tokio runtime.
    pub fn start(
        image: &crate::image::ImageRecord,
        chain: &Digest,
        store: &crate::store::Store,
        client: Arc<dyn crate::registry::Registry>,
        settings: &MountProfile,
    ) -> Option<EarlyProfile> {
        let wanted = settings.replay
            && image.chain_id() == Some(chain)
            && matches!(
                ProfileStore::new(store.root()).path(chain).try_exists(),
                Ok(false)
            );
        let (image, store) = (image.clone(), store.clone());
        wanted.then(|| {
            EarlyProfile(tokio::spawn(async move {
                pinned_profile(client.as_ref(), &store, &image).await
            }))
        })
    }
}

/// The profile side of one mount: replay at the start, recording until the workload is quiet.
pub struct Session {
    recorder: Option<Arc<Recorder>>,
    profiles: ProfileStore,
    chain: Digest,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// Starts replaying the profile of `image`'s rootfs into the mounted `view` — the one
    /// recorded here, else the one the image's manifest pins (fetched, and kept here) — and
    /// recording what the workload reads first, merged into the stored profile each time the
    /// workload goes quiet. Must run inside a tokio runtime.
    ///
    /// `chain` is the ChainID of the layers the view shows (the image's top one for a whole
    /// image; a snapshotter's mount may show only the lower layers, which other images share):
    /// the profile recorded and replayed is that rootfs's. `early` is the pinned profile's
    /// fetch if [`EarlyProfile::start`] began it. `otherwise` runs if no profile is replayed
    /// (what to fetch ahead without one).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        view: Arc<ImageView>,
        image: &crate::image::ImageRecord,
        chain: &Digest,
        store: &crate::store::Store,
        client: Arc<dyn crate::registry::Registry>,
        settings: &MountProfile,
        early: Option<EarlyProfile>,
        otherwise: Option<futures_util::future::BoxFuture<'static, ()>>,
    ) -> Session {
        let chain = chain.clone();
        let profiles = ProfileStore::new(store.root());
        let mut tasks = Vec::new();
        if settings.replay {
            let (view, profiles, chain) = (view.clone(), profiles.clone(), chain.clone());
            let (image, store, parallel) = (image.clone(), store.clone(), settings.parallel);
            // The image's pinned profile is its whole rootfs's: not for a mount of fewer layers.
            let whole = image.chain_id() == Some(&chain);
            tasks.push(tokio::spawn(async move {
                let profile = match profiles.get(&chain) {
                    Ok(Some(p)) => Some((p, false)),
                    Ok(None) if !whole => None,
                    Ok(None) => {
                        // The early fetch's answer, or (none started, or its task died) now.
                        let early = match early {
                            Some(EarlyProfile(fetch)) => fetch.await.ok(),
                            None => None,
                        };
                        let pinned = match early {
                            Some(fetched) => fetched,
                            None => pinned_profile(client.as_ref(), &store, &image).await,
                        };
                        match pinned {
                            Ok(Some(p)) => {
                                tracing::info!(image = %image.name, ranges = p.ranges.len(), "replaying the profile the image pins");
                                Some((p, true))
                            }
                            Ok(None) => None,
                            Err(e) => {
                                tracing::warn!(image = %image.name, error = %e, "the image's profile is unusable; ignored");
                                None
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the recorded profile is unusable; ignored");
                        None
                    }
                };
                let Some((p, pinned)) = profile else {
                    if let Some(fetch) = otherwise {
                        fetch.await;
                    }
                    return;
                };
                let pack = p.pack.as_ref().and_then(|pack| pack_source(&client, &image, pack));
                let report = replay(view, &p, parallel, pack).await;
                if pinned {
                    // Kept here after the replay (which must not wait for a file write), with
                    // its pack if the pack served this replay: a later cold mount of this
                    // store (its cache pruned) replays the stored profile, and reads the pack
                    // again for what it holds.
                    let served = report.pack.is_some_and(|r| r.delivered > 0);
                    let keep = move || profiles.keep_pinned(&chain, &p, served);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(keep).await {
                        tracing::warn!(error = %e, "cannot keep the image's profile");
                    }
                }
            }));
        } else if let Some(fetch) = otherwise {
            tasks.push(tokio::spawn(fetch));
        }
        let recorder = settings.record.then(|| {
            let recorder = Arc::new(Recorder::new());
            view.record_reads(recorder.clone());
            let (rec, profiles, chain) = (recorder.clone(), profiles.clone(), chain.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let finished = rec.finished();
                    let ranges = if finished {
                        Some(rec.take())
                    } else {
                        rec.take_when_quiet(QUIET)
                    };
                    if let Some(ranges) = ranges.filter(|r| !r.is_empty()) {
                        save(&profiles, &chain, &ranges);
                    }
                    if finished {
                        return;
                    }
                }
            }));
            recorder
        });
        Session {
            recorder,
            profiles,
            chain,
            tasks,
        }
    }

    /// Stops replay and recording, saving what was recorded and not yet saved.
    pub async fn finish(self) {
        for t in &self.tasks {
            t.abort();
        }
        // A task in the middle of saving finishes that save first: wait, so the last save
        // below is not overwritten by an older one.
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(rec) = &self.recorder {
            let ranges = rec.take();
            if !ranges.is_empty() {
                save(&self.profiles, &self.chain, &ranges);
            }
        }
    }
}

/// How long without a newly read unit before the recording so far is saved.
const QUIET: Duration = Duration::from_secs(2);

fn save(profiles: &ProfileStore, chain: &Digest, ranges: &[ProfileRange]) {
    match profiles.merge_in(chain, ranges) {
        Ok(p) => tracing::info!(
            chain = %chain,
            ranges = p.ranges.len(),
            bytes = p.bytes(),
            "startup profile saved"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot save the startup profile"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile range (also for the plan's tests).
    pub(super) fn r(layer: &str, offset: u64, len: u64) -> ProfileRange {
        ProfileRange {
            layer: layer.into(),
            offset,
            len,
        }
    }

    /// An uncompressed layer of `spans` spans of `len` bytes.
    pub(super) fn layer_of(spans: u64, len: u64) -> crate::layer::LayerIndex {
        use crate::layer::{Fetch, LayerIndex, Span};
        let d = crate::digest::sha256(b"layer");
        let span = |k: u64| Span {
            out_offset: k * len,
            out_len: len,
            digest: d.clone(),
            fetch: Fetch::Range {
                in_start: k * len,
                in_end: k * len + len,
            },
        };
        LayerIndex {
            version: crate::layer::INDEX_VERSION,
            blob: d.clone(),
            diff_id: d.clone(),
            compression: crate::image::Compression::None,
            blob_size: spans * len,
            size: spans * len,
            entries: Vec::new(),
            spans: (0..spans).map(span).collect(),
            checkpoints: Vec::new(),
            format: Default::default(),
            prefetch_end: None,
            windows: None,
            published: None,
        }
    }

    #[test]
    fn a_replay_widens_ranges_to_the_spans_of_its_index() {
        let index = layer_of(10, 100);
        assert_eq!(spans_around(&index, 150, 160), (100, 200));
        assert_eq!(spans_around(&index, 100, 200), (100, 200));
        assert_eq!(spans_around(&index, 99, 301), (0, 400));
        // Past the end (clamped by the caller, but harmless): kept as it is.
        assert_eq!(spans_around(&index, 950, 1200), (900, 1200));
    }

    #[test]
    fn published_profiles_are_packed_and_plain_json_is_read_too() {
        let p = Profile {
            version: PROFILE_VERSION,
            ranges: (0..200)
                .map(|k| r(crate::digest::sha256(b"l").as_ref(), k * 65536, 16384))
                .collect(),
            pack: None,
        };
        let json = serde_json::to_vec(&p).unwrap();
        let packed = p.packed();
        assert!(
            packed.len() * 10 < json.len(),
            "{} of {}",
            packed.len(),
            json.len()
        );
        assert_eq!(Profile::parse(&packed, "x").unwrap(), p);
        assert_eq!(Profile::parse(&json, "x").unwrap(), p);
        let spaced = [b"\n  ".as_slice(), &json].concat();
        assert_eq!(Profile::parse(&spaced, "x").unwrap(), p);
        let e = Profile::parse(b"garbage", "x").unwrap_err().to_string();
        assert!(e.contains("not a profile"), "{e}");
        // Packed JSON past the limit is refused while it is unpacked.
        let big = crate::layer::packed::pack(&vec![b' '; (MAX_PROFILE_BYTES + 1) as usize]);
        let e = Profile::parse(&big, "x").unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn merging_appends_only_what_is_not_covered_in_first_seen_order() {
        let mut p = Profile {
            version: PROFILE_VERSION,
            ranges: vec![r("a", 100, 100), r("b", 0, 50)],
            pack: None,
        };
        p.merge(&[r("a", 50, 200), r("b", 0, 50), r("c", 5, 5)]);
        assert_eq!(
            p.ranges,
            vec![
                r("a", 100, 100),
                r("b", 0, 50),
                r("a", 50, 50),
                r("a", 200, 50),
                r("c", 5, 5)
            ]
        );
    }

    #[test]
    fn hostile_profiles_are_refused_with_a_reason() {
        let huge = vec![b' '; (MAX_PROFILE_BYTES + 1) as usize];
        let e = Profile::parse(&huge, "x").unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let e = Profile::parse(br#"{"version":9,"ranges":[]}"#, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 9"), "{e}");
        let many = serde_json::to_vec(&Profile {
            version: PROFILE_VERSION,
            ranges: vec![r("a", 0, 1); MAX_RANGES + 1],
            pack: None,
        })
        .unwrap();
        let e = Profile::parse(&many, "x").unwrap_err().to_string();
        assert!(e.contains("ranges"), "{e}");
    }
}
