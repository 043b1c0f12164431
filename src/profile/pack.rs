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
//! stream (its bytes queued until decoded: at most the pack, which is at most the layer bytes
//! it replaces) and decodes one frame at a time, holding at most one span of it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fs::ImageView;
use crate::layer::reader::LayerReader;
use crate::source::BlobSource;

/// Most bytes of spans in one frame (and the largest window a frame may ask for).
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
pub async fn build(
    readers: &[LayerReader],
    spans: &[(usize, usize)],
    level: i32,
) -> Result<Option<(Vec<u8>, Pack)>, crate::cache::CacheError> {
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
    let claims: Vec<FrameClaim> = (0..pack.frames.len())
        .map(|k| FrameClaim::new(readers, &layer_of, &pack.frames[k]))
        .collect();
    // The frames to fetch, in order, and the blob's byte ranges that hold them.
    let order: Vec<usize> = (0..pack.frames.len())
        .filter(|&k| claims[k].any_missing(readers))
        .collect();
    let runs = runs_of(&pack.frames, &order);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u8>, String>>();
    let producer = {
        let source = source.clone();
        async move {
            let sink = |bytes: &[u8]| {
                let _ = tx.send(Ok(bytes.to_vec()));
            };
            for (start, end) in runs {
                if let Err(e) = source.read_range_to(start, end - start, &sink).await {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    };
    let consumer = async {
        let mut ahead = Ahead::default();
        ahead.claim(readers, &claims, &order, &pack.frames, LOOKAHEAD);
        // The frame being decoded (its place in `order`), its bytes so far, its decoder
        // (`None` once it failed).
        let (mut idx, mut in_frame) = (0, 0u64);
        let mut unpacker = order.first().map(|&k| Unpacker::new(&pack.frames[k]));
        while let Some(message) = rx.recv().await {
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
                if in_frame == frame.len {
                    if let Some(Err(e)) = unpacker.take().map(Unpacker::finish) {
                        failed = failed.or(Some(e));
                    }
                }
                if let Some(e) = failed {
                    tracing::warn!(pack = %pack.digest, frame = k, error = %e, "profile pack: frame unusable; its spans are fetched from the layers");
                    report.failed += 1;
                    unpacker = None;
                }
                if in_frame == frame.len {
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
    futures_util::join!(producer, consumer);
    if report.refused > 0 {
        tracing::warn!(image = %view.name, pack = %pack.digest, refused = report.refused, "profile pack: spans not used (of no layer here, or not verified)");
    }
    report
}

/// The byte ranges of the pack blob that hold `frames` `order` (ascending): one per run of
/// consecutive frames.
fn runs_of(frames: &[Frame], order: &[usize]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let (mut at, mut next) = (0u64, 0);
    for &k in order {
        at += frames[next..k].iter().map(|f| f.len).sum::<u64>();
        match runs.last_mut() {
            Some(run) if run.1 == at => run.1 += frames[k].len,
            _ => runs.push((at, at + frames[k].len)),
        }
        at += frames[k].len;
        next = k + 1;
    }
    runs
}

/// Compressed bytes of the pack ahead of the stream whose spans are claimed: a read of one
/// waits for at most about this much of the link (42 ms at 100 Mbit/s).
const LOOKAHEAD: u64 = 512 << 10;

/// How far the frames to fetch are claimed.
#[derive(Default)]
struct Ahead {
    /// The first frame (its place in the order) not claimed to its end.
    idx: usize,
    /// Where that frame starts in the stream.
    start: u64,
}

impl Ahead {
    /// Claims the spans of the frames `order` names that should start within the stream's
    /// first `through` bytes.
    fn claim<'a>(
        &mut self,
        readers: &'a [LayerReader],
        claims: &[FrameClaim<'a>],
        order: &[usize],
        frames: &[Frame],
        through: u64,
    ) {
        while let Some(&k) = order.get(self.idx) {
            if through <= self.start {
                return;
            }
            let len = frames[k].len;
            let whole = through - self.start >= len;
            claims[k].claim_through(readers, (through - self.start).min(len), whole);
            if !whole {
                return;
            }
            self.idx += 1;
            self.start += len;
        }
    }
}

/// A frame's spans as the view's (`(reader, span)`, if one of its layers has such a span),
/// those its chunks claimed so far (held until the frame is decoded), and what became of them.
struct FrameClaim<'a> {
    spans: Vec<Option<(usize, usize)>>,
    /// Where each span ends in the frame's output.
    ends: Vec<u64>,
    /// The frame's compressed length.
    len: u64,
    state: std::sync::Mutex<Claimed<'a>>,
}

#[derive(Default)]
struct Claimed<'a> {
    /// The first span not yet considered.
    next: usize,
    held: Vec<bool>,
    guards: Vec<crate::layer::reader::Delivery<'a>>,
    /// Spans delivered, skipped (not held) and refused (not verified, or of no layer here).
    counts: (usize, usize, usize),
}

impl<'a> FrameClaim<'a> {
    /// `frame`'s spans as the view's (its readers'; `layer_of`: each of the pack's layers
    /// as a reader, if one), none claimed yet.
    fn new(
        readers: &'a [LayerReader],
        layer_of: &[Option<usize>],
        frame: &Frame,
    ) -> FrameClaim<'a> {
        let spans: Vec<Option<(usize, usize)>> = frame
            .spans
            .iter()
            .map(|&(l, o, n)| {
                let r = layer_of.get(l as usize).copied().flatten()?;
                Some((r, readers[r].span_exactly(o, n)?))
            })
            .collect();
        let ends = frame
            .spans
            .iter()
            .scan(0u64, |at, s| {
                *at = at.saturating_add(s.2);
                Some(*at)
            })
            .collect();
        let state = Claimed {
            held: vec![false; spans.len()],
            ..Default::default()
        };
        FrameClaim {
            spans,
            ends,
            len: frame.len,
            state: std::sync::Mutex::new(state),
        }
    }

    /// Whether any of the frame's spans is not cached.
    fn any_missing(&self, readers: &[LayerReader]) -> bool {
        self.spans.iter().flatten().any(|&(r, i)| {
            let s = &readers[r].index().spans[i];
            !readers[r].is_cached(s.out_offset, s.out_len)
        })
    }

    /// Claims the spans not yet considered that start within the first `through` compressed
    /// bytes of the frame, by their share of its output (all of them if `last`).
    fn claim_through(&self, readers: &'a [LayerReader], through: u64, last: bool) {
        let total = self.ends.last().copied().unwrap_or(0);
        let out = if last {
            u64::MAX
        } else {
            (total as u128 * through as u128 / self.len.max(1) as u128) as u64
        };
        let mut st = self.state.lock().unwrap();
        let from = st.next;
        // Every span that starts before `out`: a read of a large one waits for the rest of
        // it rather than fetching it all again from its layer.
        let to = (self.ends.partition_point(|&e| e < out) + 1)
            .min(self.spans.len())
            .max(from);
        let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); readers.len()];
        for &(r, i) in self.spans[from..to].iter().flatten() {
            wanted[r].push(i);
        }
        for (r, w) in wanted.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
            let d = readers[r].claim_delivery(w);
            for s in from..to {
                if let Some((rr, i)) = self.spans[s] {
                    if rr == r && d.holds(i) {
                        st.held[s] = true;
                    }
                }
            }
            st.guards.push(d);
        }
        st.next = to;
    }

    /// Caches the frame's span `s` if a chunk claimed it and its bytes verify.
    fn deliver(
        &self,
        readers: &[LayerReader],
        s: usize,
        bytes: Vec<u8>,
    ) -> Result<bool, crate::cache::CacheError> {
        let held = self
            .state
            .lock()
            .unwrap()
            .held
            .get(s)
            .copied()
            .unwrap_or(false);
        let outcome = match self.spans[s] {
            None => Some(false),
            Some(_) if !held => None,
            Some((r, i)) => Some(readers[r].deliver(i, bytes)?),
        };
        let mut st = self.state.lock().unwrap();
        match outcome {
            Some(true) => st.counts.0 += 1,
            None => st.counts.1 += 1,
            Some(false) => st.counts.2 += 1,
        }
        Ok(outcome == Some(true))
    }

    /// Releases the claims (the frame is decoded, or will not be): spans delivered, skipped
    /// and refused.
    fn release(&self) -> (usize, usize, usize) {
        let mut st = self.state.lock().unwrap();
        st.guards.clear();
        st.counts
    }
}

/// A frame decoded as its bytes arrive, within its declared spans and a [`WINDOW`]: each span is handed on as soon as its last byte is out.
struct Unpacker<'f> {
    decoder: Option<zstd::stream::raw::Decoder<'static>>,
    frame: &'f Frame,
    /// The span being filled, and its bytes so far.
    span: usize,
    buf: Vec<u8>,
    filled: usize,
    taken: usize,
    not: usize,
}

impl<'f> Unpacker<'f> {
    fn new(frame: &'f Frame) -> Unpacker<'f> {
        let decoder = zstd::stream::raw::Decoder::new().and_then(|mut d| {
            use zstd::stream::raw::DParameter;
            d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))?;
            Ok(d)
        });
        Unpacker {
            decoder: decoder.ok(),
            frame,
            span: 0,
            buf: Vec::new(),
            filled: 0,
            taken: 0,
            not: 0,
        }
    }

    /// Decodes the frame's next compressed bytes `input`, handing each span completed to
    /// `deliver` (by its place in the frame), which says whether it took it. An error if the
    /// bytes are not zstd, or decode to more than the frame's spans.
    fn feed(
        &mut self,
        input: &[u8],
        mut deliver: impl FnMut(usize, Vec<u8>) -> Result<bool, crate::cache::CacheError>,
    ) -> Result<(), String> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let decoder = self.decoder.as_mut().ok_or("no zstd decoder")?;
        let spans = &self.frame.spans;
        let mut input = InBuffer::around(input);
        loop {
            if self.span == spans.len() {
                // Every span is out: the frame must hold nothing more.
                let mut extra = [0u8; 1];
                let mut out = OutBuffer::around(&mut extra[..]);
                decoder
                    .run(&mut input, &mut out)
                    .map_err(|e| format!("after its spans: {e}"))?;
                if out.pos() > 0 || input.pos() < input.src.len() {
                    return Err(format!("more than its {} spans", spans.len()));
                }
                return Ok(());
            }
            let want = spans[self.span].2 as usize;
            if self.buf.len() != want {
                self.buf = vec![0; want];
            }
            let before = (input.pos(), self.filled);
            let mut out = OutBuffer::around_pos(&mut self.buf[..], self.filled);
            decoder
                .run(&mut input, &mut out)
                .map_err(|e| format!("span {} of {}: {e}", self.span, spans.len()))?;
            self.filled = out.pos();
            if self.filled == want {
                let bytes = std::mem::take(&mut self.buf);
                match deliver(self.span, bytes) {
                    Ok(true) => self.taken += 1,
                    Ok(false) => self.not += 1,
                    Err(e) => return Err(format!("caching span {}: {e}", self.span)),
                }
                self.span += 1;
                self.filled = 0;
            } else if (input.pos(), self.filled) == before {
                return Ok(()); // needs more input
            }
        }
    }

    /// The frame's end: how many spans were taken and how many not; an error if the bytes
    /// ended before its last span did.
    fn finish(self) -> Result<(usize, usize), String> {
        if self.span < self.frame.spans.len() {
            return Err(format!(
                "span {} of {}: the frame ended",
                self.span,
                self.frame.spans.len()
            ));
        }
        Ok((self.taken, self.not))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Unpacker`] over `data` fed `piece` bytes at a time.
    fn unpack_frame(
        data: &[u8],
        f: &Frame,
        mut deliver: impl FnMut(usize, Vec<u8>) -> Result<bool, crate::cache::CacheError>,
    ) -> Result<(usize, usize), String> {
        let mut done = None;
        for piece in [1, 7, 100, 4096, data.len().max(1)] {
            let mut u = Unpacker::new(f);
            let mut got = Vec::new();
            for c in data.chunks(piece) {
                u.feed(c, |s, b| {
                    got.push((s, b));
                    Ok(true)
                })?;
            }
            let n = u.finish()?;
            assert_eq!(n.0, got.len());
            // Fed in any pieces, the same spans come out.
            if done.is_none() {
                for (s, b) in got.iter().cloned() {
                    deliver(s, b).map_err(|e| e.to_string())?;
                }
                done = Some(got);
            } else {
                assert_eq!(done.as_ref(), Some(&got), "fed {piece} bytes at a time");
            }
        }
        let got = done.unwrap_or_default();
        Ok((got.len(), 0))
    }

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
            Ok(true)
        })
        .unwrap();
        assert_eq!(n, (2, 0));
        assert_eq!(got[0].1, data[..1000]);
        assert_eq!(got[1].1, data[1000..1200]);
        // A frame that holds more than its spans is refused.
        let (mut f, z) = frame(&[(0, 0, 1000), (0, 5000, 200)], &data);
        f.spans.pop();
        let e = unpack_frame(&z, &f, |_, _| Ok(true)).unwrap_err();
        assert!(e.contains("more than its 1 spans"), "{e}");
        // Declaring more than the frame holds fails at the span that runs out.
        let (mut f, z) = frame(&[(0, 0, 1000)], &data[..1000]);
        f.spans.push((0, 1000, 10));
        let e = unpack_frame(&z, &f, |_, _| Ok(true)).unwrap_err();
        assert!(e.contains("span 1 of 2: the frame ended"), "{e}");
        let e = unpack_frame(b"not zstd at all", &f, |_, _| Ok(true)).unwrap_err();
        assert!(e.contains("span 0"), "{e}");
    }

    #[test]
    fn a_frame_asking_for_a_larger_window_than_a_frame_is_refused() {
        // 16 MiB of incompressible-then-repeated data with an 8 MiB window: the decoder
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
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG + 1))
            .unwrap();
        let z = c.compress(&data).unwrap();
        let f = Frame {
            len: z.len() as u64,
            spans: vec![(0, 0, 1 << 20)],
        };
        assert!(unpack_frame(&z, &f, |_, _| Ok(true)).is_err());
    }

    #[test]
    fn the_frames_to_fetch_are_asked_for_in_one_range_per_run() {
        let frames: Vec<Frame> = [10, 20, 30, 40, 50]
            .iter()
            .map(|&len| Frame {
                len,
                spans: vec![(0, 0, 1)],
            })
            .collect();
        assert_eq!(runs_of(&frames, &[0, 1, 2, 3, 4]), vec![(0, 150)]);
        assert_eq!(runs_of(&frames, &[1, 2, 4]), vec![(10, 60), (100, 150)]);
        assert_eq!(runs_of(&frames, &[3]), vec![(60, 100)]);
        assert!(runs_of(&frames, &[]).is_empty());
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
        bad(|p| p.frames[0].spans[0].2 = MAX_SPAN + 1, "a span of");
        bad(
            |p| p.frames[0].spans = vec![(0, 0, MAX_SPAN); 5],
            "bytes of spans",
        );
        bad(|p| p.frames[0].spans.push((0, 0, u64::MAX)), "a span of");
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
