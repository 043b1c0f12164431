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
//! decoding may not exceed) and asks for a window of at most that; a pack has at most
//! [`MAX_FRAMES`] frames of at most [`MAX_FRAME_SPANS`] spans; a replay has at most
//! [`IN_FLIGHT`] frames in flight and decodes one at a time.

use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fs::ImageView;
use crate::layer::reader::LayerReader;
use crate::source::BlobSource;

/// Most bytes of spans in one frame (and the largest window a frame may ask for).
pub const MAX_FRAME: u64 = 8 << 20;
/// `log2(MAX_FRAME)`: the decoder's window limit.
const WINDOW_LOG_MAX: u32 = 23;
/// Most frames in a pack.
pub const MAX_FRAMES: usize = 1 << 16;
/// Most spans in one frame.
pub const MAX_FRAME_SPANS: usize = 1 << 14;
/// Bytes of spans in a pack's first frame; each next one holds twice as many, up to
/// [`MAX_FRAME`], so the workload's first reads wait for a small frame, not a large one.
const FIRST_FRAME: u64 = 512 << 10;
/// zstd level of the frames (`profile push`): 19 made the cold-start benchmark's spans 0.72×
/// the bytes of the layers' gzip, against 0.83× at level 9 (both in 8 MiB frames).
pub const LEVEL: i32 = 19;
/// Frames fetched at once: the next one is on the link while one is decoded.
const IN_FLIGHT: usize = 2;

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
pub async fn build(
    readers: &[LayerReader],
    spans: &[(usize, usize)],
    level: i32,
) -> Result<Option<(Vec<u8>, Pack)>, crate::cache::CacheError> {
    use futures_util::StreamExt;
    let mut frames: Vec<Vec<(usize, usize)>> = Vec::new();
    let (mut target, mut filled) = (FIRST_FRAME, 0u64);
    for &(r, i) in spans {
        let len = readers[r].index().spans[i].out_len;
        if len > MAX_FRAME {
            continue; // a span larger than a frame is replayed from its layer
        }
        match frames.last_mut() {
            Some(f) if filled + len <= target && f.len() < MAX_FRAME_SPANS => f.push((r, i)),
            _ => {
                if !frames.is_empty() {
                    target = (target * 2).min(MAX_FRAME);
                }
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
        .collect::<Result<_, _>>()?;
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
            tokio::task::spawn_blocking(move || zstd::bulk::compress(&raw, level)),
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

fn finish_frame(
    blob: &mut Vec<u8>,
    spans: Vec<(u32, u64, u64)>,
    done: Result<std::io::Result<Vec<u8>>, tokio::task::JoinError>,
) -> Result<Frame, crate::cache::CacheError> {
    let compressed = done
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| crate::cache::CacheError::Io {
            digest: crate::digest::sha256(b""),
            source: e,
        })?;
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
    /// Spans the pack held that were not used: of no layer of the view, not verified, or in
    /// a frame that failed.
    pub refused: usize,
    /// Why the pack was not fetched at all, if it was not.
    pub unused: Option<String>,
}

/// Fetches `pack` from `source` and caches the spans of `view`'s layers it holds, verified,
/// frame by frame in pack order, [`IN_FLIGHT`] at a time; each frame's spans are claimed
/// when its request starts, so a read of one waits for the frame. `planned` are the replay's
/// pieces (`(layer, offset, len)`): a pack larger than their compressed bytes in the layers
/// is not fetched.
pub async fn replay(
    view: &ImageView,
    pack: &Pack,
    source: Arc<dyn BlobSource>,
    planned: &[(usize, u64, u64)],
) -> PackReport {
    use futures_util::StreamExt;
    let mut report = PackReport::default();
    let readers = view.readers();
    let replaced: u64 = planned
        .iter()
        .map(|&(l, o, n)| readers[l].compressed_size(o, n))
        .sum();
    if pack.size > replaced || source.size() != pack.size {
        let why = format!(
            "a pack of {} bytes (blob of {}) for {replaced} bytes of layers",
            pack.size,
            source.size()
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
    // Where each frame starts in the blob.
    let starts: Vec<u64> = pack
        .frames
        .iter()
        .scan(0u64, |at, f| {
            let start = *at;
            *at += f.len;
            Some(start)
        })
        .collect();
    let decoding = tokio::sync::Mutex::new(());
    let outcomes: Vec<FrameOutcome> = futures_util::stream::iter(0..pack.frames.len())
        .map(|k| {
            let (frame, start) = (&pack.frames[k], starts[k]);
            let (source, layer_of, decoding) = (&source, &layer_of, &decoding);
            async move {
                // Each span as (reader, span index), if it is one of the view's.
                let spans: Vec<Option<(usize, usize)>> = frame
                    .spans
                    .iter()
                    .map(|&(l, o, n)| {
                        let r = layer_of.get(l as usize).copied().flatten()?;
                        Some((r, readers[r].span_exactly(o, n)?))
                    })
                    .collect();
                let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); readers.len()];
                for &(r, i) in spans.iter().flatten() {
                    wanted[r].push(i);
                }
                let mut outcome = FrameOutcome::default();
                let Some(r0) = wanted.iter().position(|w| !w.is_empty()) else {
                    outcome.refused = spans.iter().filter(|s| s.is_none()).count();
                    return outcome;
                };
                let _room = readers[r0].room_ahead(frame.len).await;
                let claims: Vec<_> = wanted
                    .iter()
                    .enumerate()
                    .map(|(r, w)| readers[r].claim_delivery(w))
                    .collect();
                let held = |r: usize, i: usize| claims[r].holds(i);
                if !spans.iter().flatten().any(|&(r, i)| held(r, i)) {
                    return outcome; // cached or being fetched already: nothing to wait for
                }
                let data = match source.read_range(start, frame.len).await {
                    Ok(data) => data,
                    Err(e) => {
                        tracing::warn!(pack = %pack.digest, frame = k, error = %e, "profile pack: frame not fetched; its spans are fetched from the layers");
                        outcome.refused = spans.len();
                        return outcome;
                    }
                };
                outcome.fetched = true;
                outcome.bytes = frame.len;
                let _one = decoding.lock().await;
                let result = crate::cache::blocking(|| {
                    let _nice = crate::layer::reader::LowerPriority::new();
                    unpack_frame(&data, frame, |s, bytes| match spans[s] {
                        Some((r, i)) if held(r, i) => readers[r].deliver(i, bytes),
                        _ => Ok(false),
                    })
                });
                match result {
                    Ok((delivered, refused)) => {
                        outcome.delivered = delivered;
                        outcome.refused = refused;
                    }
                    Err(e) => {
                        tracing::warn!(pack = %pack.digest, frame = k, error = %e, "profile pack: frame unusable; its spans are fetched from the layers");
                        outcome.refused = spans.len();
                    }
                }
                outcome
            }
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    for o in outcomes {
        report.frames += o.fetched as usize;
        report.bytes += o.bytes;
        report.delivered += o.delivered;
        report.refused += o.refused;
    }
    if report.refused > 0 {
        tracing::warn!(image = %view.name, pack = %pack.digest, refused = report.refused, "profile pack: spans not used (of no layer here, or not verified)");
    }
    report
}

/// How one frame went.
#[derive(Default)]
struct FrameOutcome {
    fetched: bool,
    bytes: u64,
    delivered: usize,
    refused: usize,
}

/// Decodes `data` as `frame` (within its declared size and [`MAX_FRAME`]'s window) and hands
/// each span's bytes, by its place in the frame, to `deliver`, which says whether it took
/// them. Returns how many were taken and how many not; an error if the frame does not decode
/// to its declared spans.
fn unpack_frame(
    data: &[u8],
    frame: &Frame,
    mut deliver: impl FnMut(usize, Vec<u8>) -> Result<bool, crate::cache::CacheError>,
) -> Result<(usize, usize), String> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(data)
        .and_then(|mut d| d.window_log_max(WINDOW_LOG_MAX).map(|()| d))
        .map_err(|e| format!("not zstd: {e}"))?;
    let (mut taken, mut not) = (0, 0);
    for (s, &(_, _, len)) in frame.spans.iter().enumerate() {
        let mut bytes = vec![0; len as usize];
        decoder
            .read_exact(&mut bytes)
            .map_err(|e| format!("span {s} of {}: {e}", frame.spans.len()))?;
        match deliver(s, bytes) {
            Ok(true) => taken += 1,
            Ok(false) => not += 1,
            Err(e) => return Err(format!("caching span {s}: {e}")),
        }
    }
    Ok((taken, not))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(spans: &[(u32, u64, u64)], data: &[u8]) -> (Frame, Vec<u8>) {
        let z = zstd::bulk::compress(data, 3).unwrap();
        (
            Frame {
                len: z.len() as u64,
                spans: spans.to_vec(),
            },
            z,
        )
    }

    #[test]
    fn a_frame_decodes_to_its_spans_and_no_further() {
        let data: Vec<u8> = (0..300u32).flat_map(|k| k.to_le_bytes()).collect();
        let (f, z) = frame(&[(0, 0, 1000), (0, 5000, 200)], &data);
        let mut got = Vec::new();
        let n = unpack_frame(&z, &f, |s, b| {
            got.push((s, b));
            Ok(s == 0)
        })
        .unwrap();
        assert_eq!(n, (1, 1));
        assert_eq!(got[0].1, data[..1000]);
        assert_eq!(got[1].1, data[1000..1200]);
        // Declaring more than the frame holds fails at the span that runs out.
        let (mut f, z) = frame(&[(0, 0, 1000)], &data[..1000]);
        f.spans.push((0, 1000, 10));
        let e = unpack_frame(&z, &f, |_, _| Ok(true)).unwrap_err();
        assert!(e.contains("span 1 of 2"), "{e}");
        let e = unpack_frame(b"not zstd at all", &f, |_, _| Ok(true)).unwrap_err();
        assert!(e.contains("span 0"), "{e}");
    }

    #[test]
    fn a_frame_asking_for_a_larger_window_than_a_frame_is_refused() {
        // 16 MiB of incompressible-then-repeated data with a 16 MiB window: the decoder
        // refuses the window rather than allocating it.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        data.extend_from_slice(&vec![7u8; 15 << 20]);
        let mut c = zstd::bulk::Compressor::new(19).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(24))
            .unwrap();
        let z = c.compress(&data).unwrap();
        let f = Frame {
            len: z.len() as u64,
            spans: vec![(0, 0, 1 << 20)],
        };
        assert!(unpack_frame(&z, &f, |_, _| Ok(true)).is_err());
    }

    #[test]
    fn hostile_packs_are_refused_with_a_reason() {
        let good = Pack {
            digest: crate::digest::sha256(b"p").to_string(),
            size: 10,
            layers: vec!["sha256:aa".into()],
            frames: vec![Frame {
                len: 10,
                spans: vec![(0, 0, 100)],
            }],
        };
        assert_eq!(good.validate(), Ok(()));
        let bad = |edit: fn(&mut Pack), says: &str| {
            let mut p = good.clone();
            edit(&mut p);
            let e = p.validate().unwrap_err();
            assert!(e.contains(says), "{e}");
        };
        bad(|p| p.size = 11, "frames of 10 bytes");
        bad(|p| p.frames[0].spans[0].0 = 1, "span of layer 1");
        bad(|p| p.frames[0].spans[0].2 = MAX_FRAME + 1, "bytes of spans");
        bad(
            |p| p.frames[0].spans.push((0, 0, u64::MAX)),
            "bytes of spans",
        );
        bad(|p| p.frames[0].spans.clear(), "0 spans");
        bad(|p| p.digest = "nope".into(), "pack digest");
        bad(
            |p| {
                p.frames = vec![p.frames[0].clone(); MAX_FRAMES + 1];
            },
            "frames",
        );
    }
}
