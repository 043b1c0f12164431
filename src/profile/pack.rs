//! A startup profile's pack: the uncompressed bytes of the spans its replay fetches, in replay
//! order, compressed again as a few zstd frames in one blob that `stratafs profile push`
//! publishes beside the profile, which names it ([`Pack`]). A cold mount fetches the pack
//! instead of those spans' ranges of the layers: the same bytes in about three quarters of the
//! link time on the cold-start benchmark (zstd at level 19 against the layers' gzip), in a
//! few large requests, and no gzip checkpoint window to fetch or inflate.
//!
//! Trust: nothing in a pack is taken on its word. Each span it holds is cached only if its
//! bytes have the length and the digest the layer's index gives that span (the index the
//! image pins, or one built here), exactly as a span fetched from the layer is checked; a
//! span of no layer of the view, a frame that does not decode within its declared size, or
//! bytes that do not verify are dropped with a warning, and the replay fetches those spans
//! from the layers. A pack larger than the layer bytes its spans replace is not fetched at
//! all, so a hostile pack can at worst waste what the replay would have fetched anyway.
//!
//! Bounds: a frame holds at most [`MAX_FRAME`] bytes of spans (its declared size, which its
//! decoding may not exceed), none larger than [`MAX_SPAN`], and may ask for a window of at
//! most [`WINDOW`]; a pack has at most
//! [`MAX_FRAMES`] frames of at most [`MAX_FRAME_SPANS`] spans; a replay reads the pack as one
//! stream, at most 1 MiB of it queued for the decoder (then the stream waits), and decodes one
//! frame at a time, holding at most one span of it. A read does not wait on a stalled pack:
//! once the stream brings nothing for [`STALL`], the reads waiting for spans it was to bring
//! fetch them from the layers, and once it brings nothing for [`ABANDON`] it is dropped and the
//! replay goes on from the layers. (A stream that keeps bringing a few bytes a second is cut
//! by the registry client's request timeout.)

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fs::ImageView;
use crate::layer::reader::LayerReader;
use crate::source::BlobSource;
use stream::{runs_of, Ahead, FrameClaim, Unpacker, LOOKAHEAD};

/// Most bytes of spans in one frame.
pub const MAX_FRAME: u64 = 16 << 20;
/// Largest span a pack holds (a decoder holds one span at a time; larger ones are fetched
/// from their layers).
pub const MAX_SPAN: u64 = 4 << 20;
/// Largest window a frame may ask for (the decoder's memory), `1 << WINDOW_LOG`. On the
/// files the cold-start benchmark's command reads, zstd level 19 in 16 MiB frames with a 4
/// MiB window came to 24.6 MB, in 8 MiB frames 24.8 MB (with an 8 MiB window 24.8 MB too),
/// in 4 MiB frames 25.6 MB: what a frame's size saves is not its window.
pub const WINDOW: u64 = 1 << WINDOW_LOG;
const WINDOW_LOG: u32 = 22;
/// Bytes of the pack's stream per piece queued for its decoder.
const PIECE: usize = 64 << 10;
/// Pieces queued for the decoder at most: the stream waits for it beyond.
const QUEUED: usize = 16;
/// How long the stream may bring nothing before the reads waiting for spans it was to bring
/// fetch them from the layers.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the stream may bring nothing before it is abandoned (and the replay goes on from
/// the layers).
pub const ABANDON: std::time::Duration = std::time::Duration::from_secs(5);
/// Most frames in a pack.
pub const MAX_FRAMES: usize = 1 << 16;
/// Most spans in one frame.
pub const MAX_FRAME_SPANS: usize = 1 << 14;
/// zstd level of the frames (`profile push`): 19 made the cold-start benchmark's spans 0.72×
/// the bytes of the layers' gzip, against 0.83× at level 9 (both in 8 MiB frames).
pub const LEVEL: i32 = 19;

/// The pack a profile names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pack {
    /// The pack blob, in the image's repository.
    pub digest: String,
    /// Its size: the frames' lengths added up.
    pub size: u64,
    /// The layers (blob digests) its spans are of.
    pub layers: Vec<String>,
    /// Its zstd frames, back to back in the blob.
    pub frames: Vec<Frame>,
}

/// One zstd frame of a pack.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Frame {
    /// Compressed bytes.
    pub len: u64,
    /// What it decodes to, in order: spans, each `(layer, offset, len)` — the layer's place
    /// in [`Pack::layers`], and the span's place in that layer's uncompressed stream.
    pub spans: Vec<(u32, u64, u64)>,
}

impl Frame {
    /// Bytes of spans the frame declares (saturating: a hostile one may declare absurd ones).
    fn out_len(&self) -> u64 {
        self.spans.iter().fold(0u64, |t, s| t.saturating_add(s.2))
    }
}

impl Pack {
    /// Checks the bounds above and that the frames add up to the blob; a reason if not.
    pub fn validate(&self) -> Result<(), String> {
        crate::digest::parse(&self.digest).map_err(|e| format!("pack digest: {e}"))?;
        if self.frames.len() > MAX_FRAMES {
            return Err(format!(
                "{} frames, more than the {MAX_FRAMES} allowed",
                self.frames.len()
            ));
        }
        let most = zstd::zstd_safe::compress_bound(MAX_FRAME as usize) as u64;
        let mut size = 0u64;
        for (k, f) in self.frames.iter().enumerate() {
            if f.spans.is_empty() || f.spans.len() > MAX_FRAME_SPANS {
                return Err(format!("frame {k}: {} spans", f.spans.len()));
            }
            if let Some(s) = f.spans.iter().find(|s| s.2 > MAX_SPAN) {
                return Err(format!(
                    "frame {k}: a span of {} bytes (at most {MAX_SPAN})",
                    s.2
                ));
            }
            if f.out_len() > MAX_FRAME || f.len == 0 || f.len > most {
                return Err(format!(
                    "frame {k}: {} bytes of spans in {} bytes (at most {MAX_FRAME} in {most})",
                    f.out_len(),
                    f.len
                ));
            }
            if let Some(s) = f.spans.iter().find(|s| s.0 as usize >= self.layers.len()) {
                return Err(format!(
                    "frame {k}: span of layer {} of {}",
                    s.0,
                    self.layers.len()
                ));
            }
            size = size.saturating_add(f.len);
        }
        if size != self.size {
            return Err(format!("frames of {size} bytes in a pack of {}", self.size));
        }
        Ok(())
    }
}

/// Packs spans `spans` — `(reader, span)` in replay order, the readers' layers those of
/// `readers` — read through those readers (from the cache, else the registry) into frames of
/// zstd at `level`. Returns the blob and its [`Pack`]; `None` if no span fits a frame.
async fn build(
    readers: &[LayerReader],
    spans: &[(usize, usize)],
    level: i32,
) -> Result<Option<(Vec<u8>, Pack)>, String> {
    use futures_util::StreamExt;
    let mut frames: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut filled = 0u64;
    for &(r, i) in spans {
        let len = readers[r].index().spans[i].out_len;
        if len > MAX_SPAN {
            continue; // replayed from its layer
        }
        match frames.last_mut() {
            Some(f) if filled + len <= MAX_FRAME && f.len() < MAX_FRAME_SPANS => f.push((r, i)),
            _ => {
                frames.push(vec![(r, i)]);
                filled = 0;
            }
        }
        filled += len;
    }
    if frames.is_empty() {
        return Ok(None);
    }
    let mut blob = Vec::new();
    let mut described = Vec::new();
    // Each frame's spans read (8 at a time), then compressed on the blocking pool while the
    // next frame's spans are read.
    let mut compressing = std::collections::VecDeque::new();
    for f in frames {
        let data: Vec<Vec<u8>> = futures_util::stream::iter(f.iter().map(|&(r, i)| {
            let span = &readers[r].index().spans[i];
            readers[r].read_exact(span.out_offset, span.out_len)
        }))
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
        let spans: Vec<(u32, u64, u64)> = f
            .iter()
            .map(|&(r, i)| {
                let span = &readers[r].index().spans[i];
                (r as u32, span.out_offset, span.out_len)
            })
            .collect();
        let raw = data.concat();
        compressing.push_back((
            spans,
            tokio::task::spawn_blocking(move || {
                use zstd::zstd_safe::CParameter;
                let mut c = zstd::bulk::Compressor::new(level)?;
                c.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
                c.compress(&raw)
            }),
        ));
        while compressing.len() > 1 {
            let (spans, done) = compressing.pop_front().expect("not empty");
            described.push(finish_frame(&mut blob, spans, done.await)?);
        }
    }
    while let Some((spans, done)) = compressing.pop_front() {
        described.push(finish_frame(&mut blob, spans, done.await)?);
    }
    let pack = Pack {
        digest: crate::digest::sha256(&blob).to_string(),
        size: blob.len() as u64,
        layers: readers.iter().map(|r| r.index().blob.to_string()).collect(),
        frames: described,
    };
    Ok(Some((blob, pack)))
}

/// The pack of `profile` for `image`, read through `layers`: its spans those a replay of the
/// profile fetches, of each layer's index in `shaped` (the indexes `profile push` binds beside
/// it) or else the index `layers` has for the layer. `None` if no span fits a frame.
pub async fn pack_for(
    layers: &crate::fs::Layers,
    image: &crate::image::ImageRecord,
    profile: &super::Profile,
    shaped: &[crate::publish::Publishable],
) -> Result<Option<(Vec<u8>, Pack)>, super::ProfileError> {
    let failed = |e: &dyn std::fmt::Display| super::ProfileError::Pack {
        image: image.name.clone(),
        detail: e.to_string(),
    };
    let mut readers = Vec::new();
    for layer in &image.layers {
        let index = match shaped.iter().find(|(i, _)| i.blob == layer.digest) {
            Some((index, _)) => Arc::new(index.clone()),
            None => layers.index(image, layer).await.map_err(|e| failed(&e))?.0,
        };
        readers.push(layers.reader(image, layer, index).map_err(|e| failed(&e))?);
    }
    let indexes: Vec<&crate::layer::LayerIndex> = readers.iter().map(|r| r.index()).collect();
    let planned = super::plan::plan(&indexes, profile);
    let spans = super::plan::spans_of(&indexes, &planned.pieces);
    build(&readers, &spans, LEVEL).await.map_err(|e| failed(&e))
}

/// Appends a frame's compressed bytes, `done`, to `blob`, and describes it.
fn finish_frame(
    blob: &mut Vec<u8>,
    spans: Vec<(u32, u64, u64)>,
    done: Result<std::io::Result<Vec<u8>>, tokio::task::JoinError>,
) -> Result<Frame, String> {
    let compressed = done
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("compressing a frame: {e}"))?;
    blob.extend_from_slice(&compressed);
    Ok(Frame {
        len: compressed.len() as u64,
        spans,
    })
}

/// What a pack's replay did.
#[derive(Debug, Default)]
pub struct PackReport {
    /// Frames fetched.
    pub frames: usize,
    /// Compressed bytes fetched.
    pub bytes: u64,
    /// Spans cached from the pack.
    pub delivered: usize,
    /// Spans decoded but not needed: cached, or fetched from the layer by a read, meanwhile.
    pub skipped: usize,
    /// Spans decoded that were not used: of no layer of the view, or not verified.
    pub refused: usize,
    /// Frames that did not decode (their spans left to the layers).
    pub failed: usize,
    /// Why the pack was not fetched at all, if it was not.
    pub unused: Option<String>,
}

/// Fetches `pack` from `source` and caches the spans of `view`'s layers it holds, verified,
/// in pack order, as the bytes arrive: one request for the frames with a missing span (one
/// per run of them), each frame decoded as its bytes come in and each span cached as soon as
/// its last byte is out. The spans whose bytes should start within [`LOOKAHEAD`] bytes of
/// the stream (by their share of their frame: spans compress about alike) are claimed, so a
/// read of one waits for the stream rather than fetching it, and a read of a span further on
/// fetches it from its layer (the pack's copy is then skipped). `planned` are the replay's
/// pieces (`(layer, offset, len)`): a pack larger than their compressed bytes in the layers is
/// not fetched at all.
pub async fn replay(
    view: &ImageView,
    pack: &Pack,
    source: Arc<dyn BlobSource>,
    planned: &[(usize, u64, u64)],
) -> PackReport {
    let mut report = PackReport::default();
    let readers = view.readers();
    let replaced: u64 = planned
        .iter()
        .map(|&(l, o, n)| readers[l].compressed_size(o, n))
        .sum();
    if pack.size > replaced {
        let why = format!(
            "a pack of {} bytes for {replaced} bytes of layers",
            pack.size
        );
        tracing::warn!(image = %view.name, pack = %pack.digest, "profile pack not used: {why}");
        report.unused = Some(why);
        return report;
    }
    // Each of the pack's layers as a reader of the view.
    let layer_of: Vec<Option<usize>> = pack
        .layers
        .iter()
        .map(|d| readers.iter().position(|r| r.index().blob.as_ref() == d))
        .collect();
    let claims: Vec<FrameClaim> = (0..pack.frames.len())
        .map(|k| FrameClaim::new(readers, &layer_of, &pack.frames[k]))
        .collect();
    // The frames to fetch, in order, and the blob's byte ranges that hold them.
    let order: Vec<usize> = (0..pack.frames.len())
        .filter(|&k| claims[k].any_missing(readers))
        .collect();
    let runs = runs_of(&pack.frames, &order);
    // The stream's bytes wait here to be decoded: at most QUEUED pieces of PIECE bytes, then
    // the stream waits (a decoder slower than the link holds the download back).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(QUEUED);
    let producer = async move {
        let sink = |bytes: &[u8]| -> futures_util::future::BoxFuture<'static, ()> {
            let (tx, pieces) = (tx.clone(), bytes.chunks(PIECE).map(<[u8]>::to_vec));
            let pieces: Vec<Vec<u8>> = pieces.collect();
            Box::pin(async move {
                for piece in pieces {
                    if tx.send(Ok(piece)).await.is_err() {
                        return;
                    }
                }
            })
        };
        for (start, end) in runs {
            if let Err(e) = source.read_range_to(start, end - start, &sink).await {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    };
    let consumer = async {
        // Dropped when the consumer ends: a producer still sending then stops.
        let mut rx = rx;
        let mut ahead = Ahead::default();
        ahead.claim(readers, &claims, &order, &pack.frames, LOOKAHEAD);
        // The frame being decoded (its place in `order`), its bytes so far, its decoder
        // (`None` once it failed).
        let (mut idx, mut in_frame) = (0, 0u64);
        let mut unpacker = order.first().map(|&k| Unpacker::new(&pack.frames[k]));
        // How long the stream has brought nothing.
        let mut quiet = std::time::Duration::ZERO;
        loop {
            let message = match tokio::time::timeout(STALL, rx.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => {
                    quiet += STALL;
                    if quiet == STALL {
                        // Reads of the spans claimed ahead fetch them from the layers now;
                        // what the stream brings that is still missing is cached all the same.
                        tracing::info!(pack = %pack.digest, after = report.bytes, "profile pack: its stream stalled; the spans claimed ahead of it are fetched from the layers");
                        for &k in &order[idx..] {
                            claims[k].let_go();
                        }
                    }
                    if quiet >= ABANDON {
                        tracing::warn!(pack = %pack.digest, after = report.bytes, "profile pack: its stream brought nothing for {} s; abandoned, the rest of its spans are fetched from the layers", ABANDON.as_secs());
                        report.failed += 1;
                        break;
                    }
                    continue;
                }
            };
            quiet = std::time::Duration::ZERO;
            let bytes = match message {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(pack = %pack.digest, error = %e, "profile pack: not fetched to its end; the rest of its spans are fetched from the layers");
                    report.failed += 1;
                    break;
                }
            };
            report.bytes += bytes.len() as u64;
            ahead.claim(
                readers,
                &claims,
                &order,
                &pack.frames,
                report.bytes + LOOKAHEAD,
            );
            let mut rest = &bytes[..];
            while !rest.is_empty() && idx < order.len() {
                let k = order[idx];
                let frame = &pack.frames[k];
                let take = (frame.len - in_frame).min(rest.len() as u64) as usize;
                let (piece, after) = rest.split_at(take);
                rest = after;
                in_frame += take as u64;
                let mut failed = None;
                if let Some(u) = unpacker.as_mut() {
                    let fed = crate::cache::blocking(|| {
                        let _nice = crate::layer::reader::LowerPriority::new();
                        u.feed(piece, |s, b| claims[k].deliver(readers, s, b))
                    });
                    failed = fed.err();
                }
                let ended = in_frame == frame.len;
                if ended {
                    if let Some(Err(e)) = unpacker.take().map(Unpacker::finish) {
                        failed = failed.or(Some(e));
                    }
                }
                if let Some(e) = failed {
                    tracing::warn!(pack = %pack.digest, frame = k, error = %e, "profile pack: frame unusable; its spans are fetched from the layers");
                    report.failed += 1;
                    unpacker = None;
                    // Reads waiting for its spans fetch them now, not when its bytes end.
                    claims[k].release();
                }
                if ended {
                    let (delivered, skipped, refused) = claims[k].release();
                    report.frames += 1;
                    report.delivered += delivered;
                    report.skipped += skipped;
                    report.refused += refused;
                    idx += 1;
                    in_frame = 0;
                    unpacker = order.get(idx).map(|&k| Unpacker::new(&pack.frames[k]));
                }
            }
        }
    };
    {
        use futures_util::future::{select, Either};
        let (producer, consumer) = (std::pin::pin!(producer), std::pin::pin!(consumer));
        match select(producer, consumer).await {
            // Every byte is in: decode what is queued.
            Either::Left(((), consumer)) => consumer.await,
            // The consumer gave up (the stream failed or stalled): the producer, and its
            // request, are dropped.
            Either::Right(((), _)) => {}
        }
    }
    // Claims of frames not decoded (a stream that ended early) are let go before the checks.
    for claim in &claims {
        claim.let_go();
    }
    // A layer the pack completed gets the whole-layer check a fetch that completes one runs.
    if report.delivered > 0 {
        for reader in readers {
            if let Err(e) = reader.check_complete().await {
                tracing::warn!(layer = %reader.index().blob, error = %e, "profile pack: the layer's check failed");
            }
        }
    }
    if report.refused > 0 {
        tracing::warn!(image = %view.name, pack = %pack.digest, refused = report.refused, "profile pack: spans not used (of no layer here, or not verified)");
    }
    report
}

mod stream;
#[cfg(test)]
mod tests;
