//! A pack read as a stream: which blob ranges hold the frames to fetch, which spans are
//! claimed ahead of the stream, and each frame decoded as its bytes arrive.

use super::{Frame, LayerReader, WINDOW_LOG};

/// The byte ranges of the pack blob that hold `frames` `order` (ascending): one per run of
/// consecutive frames.
pub(super) fn runs_of(frames: &[Frame], order: &[usize]) -> Vec<(u64, u64)> {
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
pub(super) const LOOKAHEAD: u64 = 512 << 10;

/// How far the frames to fetch are claimed.
#[derive(Default)]
pub(super) struct Ahead {
    /// The first frame (its place in the order) not claimed to its end.
    idx: usize,
    /// Where that frame starts in the stream.
    start: u64,
}

impl Ahead {
    /// Claims the spans of the frames `order` names that should start within the stream's
    /// first `through` bytes.
    pub(super) fn claim<'a>(
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
pub(super) struct FrameClaim<'a> {
    spans: Vec<Option<(usize, usize)>>,
    /// Where each span ends in the frame's output.
    ends: Vec<u64>,
    /// The frame's compressed length.
    len: u64,
    state: std::sync::Mutex<Claimed<'a>>,
}

#[derive(Default)]
struct Claimed<'a> {
    /// The first span not yet considered (claimed, or decoded).
    next: usize,
    /// The claims held, by the span's place in the frame: each released as soon as that span
    /// is decoded (its waiters then find it cached, or fetch it).
    held: std::collections::HashMap<usize, crate::layer::reader::Claim<'a>>,
    /// Spans delivered, skipped (cached already) and refused (not verified, or of no layer
    /// here).
    counts: (usize, usize, usize),
}

impl<'a> FrameClaim<'a> {
    /// `frame`'s spans as the view's (its readers'; `layer_of`: each of the pack's layers
    /// as a reader, if one), none claimed yet.
    pub(super) fn new(
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
        FrameClaim {
            spans,
            ends,
            len: frame.len,
            state: Default::default(),
        }
    }

    /// Whether any of the frame's spans is not cached.
    pub(super) fn any_missing(&self, readers: &[LayerReader]) -> bool {
        self.spans.iter().flatten().any(|&(r, i)| {
            let s = &readers[r].index().spans[i];
            !readers[r].is_cached(s.out_offset, s.out_len)
        })
    }

    /// Claims the spans not yet considered that start within the first `through` compressed
    /// bytes of the frame, by their share of its output (all of them if `last`).
    pub(super) fn claim_through(&self, readers: &'a [LayerReader], through: u64, last: bool) {
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
            let mut claimed: std::collections::HashMap<usize, _> =
                readers[r].claim_delivery(w).into_iter().collect();
            for s in from..to {
                if let Some((rr, i)) = self.spans[s] {
                    if rr == r {
                        if let Some(c) = claimed.remove(&i) {
                            st.held.insert(s, c);
                        }
                    }
                }
            }
        }
        st.next = to;
    }

    /// Caches the frame's span `s` if its bytes verify and it is not cached already (claimed
    /// or not: a span decoded before the stream's guess claimed it is as good), then releases
    /// its claim.
    pub(super) fn deliver(
        &self,
        readers: &[LayerReader],
        s: usize,
        bytes: Vec<u8>,
    ) -> Result<bool, crate::cache::CacheError> {
        let claim = {
            let mut st = self.state.lock().unwrap();
            // Decoded: never claimed from now on.
            st.next = st.next.max(s + 1);
            st.held.remove(&s)
        };
        let outcome = match self.spans[s] {
            None => Some(false),
            Some((r, i)) if claim.is_none() && readers[r].span_cached(i) => None,
            Some((r, i)) => Some(readers[r].deliver(i, bytes)?),
        };
        drop(claim);
        let mut st = self.state.lock().unwrap();
        match outcome {
            Some(true) => st.counts.0 += 1,
            None => st.counts.1 += 1,
            Some(false) => st.counts.2 += 1,
        }
        Ok(outcome == Some(true))
    }

    /// Releases the claims held (the stream stalled): reads waiting for those spans fetch them
    /// from the layers. Those spans are not claimed again; the stream's copy of any still
    /// missing when it is decoded is cached all the same.
    pub(super) fn let_go(&self) {
        self.state.lock().unwrap().held.clear();
    }

    /// Releases the claims and makes no more (the frame is decoded, or will not be): spans
    /// delivered, skipped and refused.
    pub(super) fn release(&self) -> (usize, usize, usize) {
        let mut st = self.state.lock().unwrap();
        st.held.clear();
        // Nothing more of this frame is claimed.
        st.next = self.spans.len();
        st.counts
    }
}

/// A frame decoded as its bytes arrive, within its declared spans and a [`WINDOW`]: each
/// span is handed on as soon as its last byte is out.
pub(super) struct Unpacker<'f> {
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
    pub(super) fn new(frame: &'f Frame) -> Unpacker<'f> {
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
    pub(super) fn feed(
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
    pub(super) fn finish(self) -> Result<(usize, usize), String> {
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
