//! Random access into gzip blobs, in the manner of zlib's zran: one streaming pass records
//! checkpoints at deflate block boundaries (compressed bit position + the last 32 KiB of
//! output, its *window*); any span between two checkpoints can later be decompressed on its own
//! from just its compressed bytes and that window. Multi-member gzip (eStargz is one) is
//! followed member by member.
//!
//! Checkpoints are of two kinds. An *anchor* (every [`CHECKPOINT_EVERY`] of output or more)
//! has its window in the window file; the *light* checkpoints between anchors (every span of
//! output) have none: decompression starts at one only when the output before it — the span
//! before — is at hand, else at the anchor before it. A read of a span then costs the
//! compressed bytes from the span before it that is cached (or the anchor) to its end, while
//! windows stay few.
//!
//! Windows are not kept in the checkpoints: the indexer writes each one (raw-deflate
//! compressed, *sparse*: the bytes the stream after the anchor never copies are zeroed, see
//! [`super::sparse`]) to a separate *window file* and the checkpoint records where. A reader needs a
//! window only where decompression starts at a checkpoint whose preceding output it does not
//! have at hand (the span before is cached, or fetched in the same run: then the window *is*
//! the end of that output), so windows are fetched rarely and the index stays small.

use std::io::{self, Read};

use libz_rs_sys as z;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Deflate's history window.
pub const WINDOW: usize = 32 * 1024;

/// Uncompressed bytes between anchors at least: checkpoints whose window is in the window file.
/// A run from a light checkpoint whose span before is not cached starts at its anchor, so this
/// bounds what a cold read fetches before its span. With sparse windows ([`super::sparse`])
/// an anchor at every 64 KiB span costs a window file of 6% of the benchmark image's layers
/// (16% for every 128 KiB with whole windows), and a cold start fetches 1.5 MB (5%) less than
/// with anchors every 128 KiB: no checkpoint is light in indexes built now.
pub const CHECKPOINT_EVERY: u64 = 64 << 10;

/// Compressed bytes after an anchor kept to find which of its window's bytes are used: what
/// the first 32 KiB of output after it take (at most about 33 KiB for data deflate cannot
/// compress). A stream needing more — a hostile run of empty blocks, say — gets its whole
/// window written instead; the indexer's memory stays bounded.
const MAX_ANCHOR_INPUT: usize = 256 << 10;

/// A place to resume decompression.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the blob of the first whole byte after the checkpoint.
    pub in_offset: u64,
    /// Bits of the byte before `in_offset` that belong to the next block (0–7).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub out_offset: u64,
    /// Where this checkpoint's window (the preceding output, raw-deflate compressed) lies in
    /// the layer's window file: offset and length; length 0 at member starts (no window).
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub window_at: u64,
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub window_len: u64,
    /// No window in the window file although one is needed: decompression starts here only
    /// when the output before the checkpoint is at hand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub light: bool,
}

impl Checkpoint {
    /// First blob byte a decoder starting here needs.
    pub fn in_start(&self) -> u64 {
        self.in_offset - u64::from(self.bits > 0)
    }

    /// Uncompressed length of the window: the last [`WINDOW`] bytes of output before the
    /// checkpoint (0 at member starts).
    pub fn window_size(&self) -> usize {
        if self.window_len == 0 && !self.light {
            0
        } else {
            self.out_offset.min(WINDOW as u64) as usize
        }
    }

    /// The window, taken from `before` (output that ends where the checkpoint starts), if it
    /// reaches back far enough.
    pub fn window_from<'a>(&self, before: &'a [u8]) -> Option<&'a [u8]> {
        let n = self.window_size();
        (before.len() >= n).then(|| &before[before.len() - n..])
    }
}

/// A finished span as seen by the indexer: its compressed range and both digests, and the
/// compressed window of the checkpoint it starts from (empty at member starts), which the
/// receiver appends to the window file (the checkpoint's `window_at` assumes it does).
pub struct SpanOut<'a> {
    pub checkpoint: usize,
    pub window: &'a [u8],
    pub in_start: u64,
    pub in_end: u64,
    pub in_digest: [u8; 32],
    pub out_offset: u64,
    pub data: &'a [u8],
}

/// A safe owner of a raw-deflate `z_stream` (boxed: zlib keeps a pointer to it).
struct Inflater(Box<z::z_stream>);

impl Inflater {
    fn new() -> Inflater {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, default-initialised, heap-pinned z_stream.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(rc, z::Z_OK, "inflateInit2 failed");
        Inflater(strm)
    }

    fn reset(&mut self) {
        // SAFETY: the stream was initialised by inflateInit2.
        unsafe { z::inflateReset(&mut *self.0) };
    }

    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: initialised stream.
        let rc = unsafe { z::inflatePrime(&mut *self.0, i32::from(bits), i32::from(value)) };
        check(rc, "inflatePrime")
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        // SAFETY: initialised stream; dict outlives the call.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.0, dict.as_ptr(), dict.len() as u32) };
        check(rc, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`; returns (consumed, produced, return code).
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (usize, usize, i32) {
        let s = &mut *self.0;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let (in_before, out_before) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point into live slices of the stated lengths.
        let rc = unsafe { z::inflate(s, flush) };
        let consumed = (in_before - s.avail_in) as usize;
        let produced = (out_before - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, rc)
    }

    fn data_type(&self) -> i32 {
        self.0.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised stream, ended once.
        unsafe { z::inflateEnd(&mut *self.0) };
    }
}

fn check(rc: i32, what: &str) -> io::Result<()> {
    if rc == z::Z_OK {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} failed ({rc})"),
        ))
    }
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Length of the gzip member header at the start of `buf`: `Ok(None)` if more bytes are
/// needed, an error if `buf` does not start a gzip member.
pub fn gzip_header_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < 10 {
        if buf.len() >= 2 && buf[..2] != [0x1f, 0x8b] {
            return Err(corrupt("not a gzip member (bad magic)"));
        }
        return Ok(None);
    }
    if buf[..3] != [0x1f, 0x8b, 8] {
        return Err(corrupt("not a gzip member (bad magic or method)"));
    }
    let flags = buf[3];
    let mut pos = 10;
    if flags & 4 != 0 {
        let Some(x) = buf.get(pos..pos + 2) else {
            return Ok(None);
        };
        pos += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
    }
    for flag in [8u8, 16] {
        if flags & flag != 0 {
            match buf.get(pos..).and_then(|b| b.iter().position(|&c| c == 0)) {
                Some(nul) => pos += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & 2 != 0 {
        pos += 2;
    }
    Ok(if pos <= buf.len() { Some(pos) } else { None })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Decompresses a gzip stream as a `Read`, recording a checkpoint at the first deflate block
/// boundary `span` bytes of output after the last (an anchor when [`CHECKPOINT_EVERY`] or
/// more after the last anchor, or `span` if larger; a light one otherwise) and handing each
/// finished span (with digests of its compressed and uncompressed bytes) to
/// a callback. Also hashes the whole output (the diff_id) for verification at the end.
pub struct GzipIndexer<R, F> {
    input: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    abs: u64,
    eof: bool,
    inflater: Inflater,
    state: State,
    members: u64,
    ring: Vec<u8>,
    scratch: Vec<u8>,
    ring_pos: usize,
    ring_full: bool,
    out_total: u64,
    span: u64,
    every: u64,
    /// Output ranges where every block boundary ends a span (non-empty, sorted by start),
    /// and the first of them that may still matter ([`super::SpanPlan`]).
    fine: Vec<(u64, u64)>,
    fine_at: usize,
    /// Output offset of the last anchor.
    anchor: u64,
    pub checkpoints: Vec<Checkpoint>,
    span_hasher: Option<Sha256>,
    span_data: Vec<u8>,
    span_window: Vec<u8>,
    /// The current span's anchor window (uncompressed), while its span is decoded: written
    /// sparse ([`super::sparse`]) when the span ends, once the output that uses it is known.
    anchor_window: Vec<u8>,
    /// The compressed bytes of the current span (from its first partial byte), while it has
    /// an anchor window: what the sparse window's references are read from.
    anchor_input: Vec<u8>,
    windows_len: u64,
    out_hasher: Sha256,
    pending: Vec<u8>,
    pending_pos: usize,
    on_span: F,
}

impl<R: Read, F: FnMut(SpanOut<'_>) -> io::Result<()>> GzipIndexer<R, F> {
    pub fn new(input: R, span: u64, on_span: F) -> Self {
        GzipIndexer {
            input,
            buf: vec![0; 256 * 1024],
            pos: 0,
            len: 0,
            abs: 0,
            eof: false,
            inflater: Inflater::new(),
            state: State::Header,
            members: 0,
            ring: vec![0; WINDOW],
            scratch: vec![0; WINDOW],
            ring_pos: 0,
            ring_full: false,
            out_total: 0,
            span: span.max(WINDOW as u64),
            every: span.max(CHECKPOINT_EVERY),
            fine: Vec::new(),
            fine_at: 0,
            anchor: 0,
            checkpoints: Vec::new(),
            span_hasher: None,
            span_data: Vec::new(),
            span_window: Vec::new(),
            anchor_window: Vec::new(),
            anchor_input: Vec::new(),
            windows_len: 0,
            out_hasher: Sha256::new(),
            pending: Vec::new(),
            pending_pos: 0,
            on_span,
        }
    }

    /// Also ends a span at every deflate block boundary at least [`WINDOW`] after the last
    /// checkpoint that comes within the span size of one of the `fine` output ranges, each
    /// such checkpoint an anchor ([`super::SpanPlan`]).
    pub fn with_fine(mut self, fine: &[(u64, u64)]) -> Self {
        self.fine = fine.iter().copied().filter(|(s, e)| s < e).collect();
        self.fine.sort_unstable();
        self
    }

    /// Whether a fine range meets `from..to` (calls come with `from` never decreasing). The
    /// ranges skipped end by an earlier `from`; the one the cursor stops at starts first of
    /// those left, so if it starts at `to` or after, so do all the others.
    fn fine_within(&mut self, from: u64, to: u64) -> bool {
        while self.fine.get(self.fine_at).is_some_and(|&(_, e)| e <= from) {
            self.fine_at += 1;
        }
        self.fine.get(self.fine_at).is_some_and(|&(s, _)| s < to)
    }

    /// (sha256 of the output, output size); call after reading to EOF.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.out_hasher.finalize().into(), self.out_total)
    }

    /// Makes at least `want` unconsumed bytes available (fewer only at end of input).
    fn fill(&mut self, want: usize) -> io::Result<()> {
        while self.len - self.pos < want && !self.eof {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            }
            if self.len == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.input.read(&mut self.buf[self.len..])?;
            if n == 0 {
                self.eof = true;
            }
            self.len += n;
        }
        Ok(())
    }

    /// Consumes `n` buffered bytes, hashing them into the current span's digest.
    fn consume(&mut self, n: usize) {
        let bytes = &self.buf[self.pos..self.pos + n];
        if let Some(h) = &mut self.span_hasher {
            h.update(bytes);
        }
        if !self.anchor_window.is_empty() && self.anchor_input.len() < MAX_ANCHOR_INPUT {
            let room = MAX_ANCHOR_INPUT - self.anchor_input.len();
            self.anchor_input
                .extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        self.pos += n;
        self.abs += n as u64;
    }

    fn window(&self) -> Vec<u8> {
        if self.ring_full {
            [&self.ring[self.ring_pos..], &self.ring[..self.ring_pos]].concat()
        } else {
            self.ring[..self.ring_pos].to_vec()
        }
    }

    /// Ends the current span (if any) here and starts a checkpoint (an anchor if `anchor`,
    /// or if the last one is [`Self::every`] away).
    fn checkpoint(&mut self, bits: u8, window: &[u8], anchor: bool) -> io::Result<()> {
        self.finish_span(self.abs)?;
        let mut h = Sha256::new();
        if bits > 0 {
            h.update([self.buf[self.pos - 1]]);
        }
        self.span_hasher = Some(h);
        let light = !anchor
            && !window.is_empty()
            && !self.checkpoints.is_empty()
            && self.out_total - self.anchor < self.every;
        if !light {
            self.anchor = self.out_total;
        }
        self.span_window.clear();
        self.anchor_input.clear();
        self.anchor_window.clear();
        if !window.is_empty() && !light {
            // Its window goes to the window file when the span ends (`window_at`, `window_len`
            // are set then).
            self.anchor_window.extend_from_slice(window);
            if bits > 0 {
                self.anchor_input.push(self.buf[self.pos - 1]);
            }
        }
        self.checkpoints.push(Checkpoint {
            in_offset: self.abs,
            bits,
            out_offset: self.out_total,
            window_at: 0,
            window_len: 0,
            light,
        });
        Ok(())
    }

    /// The current anchor's window as the window file keeps it: raw-deflate compressed, with
    /// the bytes the stream after it never copies zeroed when that can be told
    /// ([`super::sparse`]); its place in the window file is recorded in the checkpoint.
    fn write_anchor_window(&mut self) {
        let window = std::mem::take(&mut self.anchor_window);
        let cp = self
            .checkpoints
            .last_mut()
            .expect("a span has a checkpoint");
        let expect = &self.span_data[..self.span_data.len().min(WINDOW)];
        let used = super::sparse::referenced(&window, &self.anchor_input, cp.bits, expect);
        self.span_window = match used {
            Some(used) => super::deflate(&super::sparse::sparse(&window, &used)),
            None => super::deflate(&window),
        };
        self.anchor_input.clear();
        cp.window_at = self.windows_len;
        cp.window_len = self.span_window.len() as u64;
        self.windows_len += cp.window_len;
    }

    fn finish_span(&mut self, in_end: u64) -> io::Result<()> {
        if let (Some(h), Some(cp)) = (self.span_hasher.take(), self.checkpoints.last()) {
            if self.out_total == cp.out_offset {
                // Nothing came after the checkpoint (a block boundary at the end of the
                // stream): no empty span, and no checkpoint for it.
                self.anchor_window.clear();
                self.anchor_input.clear();
                self.checkpoints.pop();
                return Ok(());
            }
            if !self.anchor_window.is_empty() {
                self.write_anchor_window();
            }
            let cp = self.checkpoints.last().expect("checked above");
            let span = SpanOut {
                checkpoint: self.checkpoints.len() - 1,
                window: &self.span_window,
                in_start: cp.in_start(),
                in_end,
                in_digest: h.finalize().into(),
                out_offset: cp.out_offset,
                data: &self.span_data,
            };
            (self.on_span)(span)?;
            self.span_data.clear();
        }
        Ok(())
    }

    fn since_checkpoint(&self) -> u64 {
        self.out_total - self.checkpoints.last().map_or(0, |c| c.out_offset)
    }

    /// Advances the decompression by one step.
    fn step(&mut self) -> io::Result<()> {
        match self.state {
            State::Header => {
                self.fill(64 * 1024)?;
                if self.pos == self.len {
                    if self.members == 0 {
                        return Err(corrupt("empty gzip stream"));
                    }
                    self.finish_span(self.abs)?;
                    self.state = State::Done;
                    return Ok(());
                }
                let header = match gzip_header_len(&self.buf[self.pos..self.len]) {
                    Ok(Some(n)) => n,
                    Ok(None) if self.eof => return Err(corrupt("truncated gzip header")),
                    Ok(None) => return self.fill(self.len - self.pos + 1),
                    Err(e) if self.members == 0 => return Err(e),
                    Err(_) => {
                        // Trailing bytes after the last member (padding): part of the last span.
                        while self.pos < self.len || !self.eof {
                            let n = self.len - self.pos;
                            self.consume(n);
                            self.fill(1)?;
                        }
                        self.finish_span(self.abs)?;
                        self.state = State::Done;
                        return Ok(());
                    }
                };
                self.consume(header);
                self.inflater.reset();
                self.members += 1;
                if self.checkpoints.is_empty() || self.since_checkpoint() >= self.span {
                    self.checkpoint(0, &[], false)?;
                }
                self.state = State::Deflate;
            }
            State::Deflate => {
                self.fill(1)?;
                if self.pos == self.len {
                    return Err(corrupt("gzip stream truncated inside a deflate block"));
                }
                // Inflate into scratch space, not into the ring: the inflater may write past
                // the bytes it reports (fast copies overshoot within the output buffer), which
                // in the ring would clobber the oldest bytes of the window.
                let (consumed, produced, rc) = self.inflater.inflate(
                    &self.buf[self.pos..self.len],
                    &mut self.scratch,
                    z::Z_BLOCK,
                );
                self.consume(consumed);
                let new = &self.scratch[..produced];
                self.out_hasher.update(new);
                if (self.span_data.len() + produced) as u64 > super::MAX_SPAN {
                    // Only a stream written to defeat indexing gets here: common encoders end
                    // a deflate block every few MiB of output at most (zlib: 16 Ki symbols of
                    // at most 258 bytes each), and a span ends at the first block boundary
                    // after CHECKPOINT_EVERY bytes. The span is held in memory until then.
                    return Err(corrupt(format!(
                        "a deflate block runs on for more than {} MiB of output (at compressed byte {}): no span can end in it, so the layer cannot be indexed",
                        super::MAX_SPAN >> 20,
                        self.abs
                    )));
                }
                self.span_data.extend_from_slice(new);
                self.pending.extend_from_slice(new);
                self.out_total += produced as u64;
                // Into the ring (produced ≤ WINDOW, the scratch size): at most one wrap.
                let first = produced.min(WINDOW - self.ring_pos);
                self.ring[self.ring_pos..self.ring_pos + first].copy_from_slice(&new[..first]);
                self.ring[..produced - first].copy_from_slice(&new[first..]);
                self.ring_pos += produced;
                if self.ring_pos >= WINDOW {
                    self.ring_pos -= WINDOW;
                    self.ring_full = true;
                }
                match rc {
                    z::Z_STREAM_END => self.state = State::Trailer,
                    z::Z_OK | z::Z_BUF_ERROR => {
                        let dt = self.inflater.data_type();
                        let boundary = dt & 128 != 0 && dt & 64 == 0;
                        let since = self.since_checkpoint();
                        let fine = boundary
                            && since >= WINDOW as u64
                            && since < self.span
                            && self.fine_within(self.out_total - since, self.out_total + self.span);
                        if boundary && (since >= self.span || fine) {
                            let window = self.window();
                            self.checkpoint((dt & 7) as u8, &window, fine)?;
                        }
                    }
                    rc => return Err(corrupt(format!("invalid deflate data ({rc})"))),
                }
            }
            State::Trailer => {
                self.fill(8)?;
                if self.len - self.pos < 8 {
                    return Err(corrupt("gzip stream truncated in a member trailer"));
                }
                self.consume(8);
                self.state = State::Header;
            }
            State::Done => {}
        }
        Ok(())
    }
}

impl<R: Read, F: FnMut(SpanOut<'_>) -> io::Result<()>> Read for GzipIndexer<R, F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pending_pos == self.pending.len() {
            if self.state == State::Done {
                return Ok(0);
            }
            self.pending.clear();
            self.pending_pos = 0;
            self.step()?;
        }
        let n = out.len().min(self.pending.len() - self.pending_pos);
        out[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
        self.pending_pos += n;
        Ok(n)
    }
}

/// Decompresses one span: `compressed` is the blob from `checkpoint.in_start()` on (at least
/// through the span's end), `window` the checkpoint's window (uncompressed: exactly
/// [`Checkpoint::window_size`] bytes); returns exactly `out_len` bytes.
pub fn decode_span(
    checkpoint: &Checkpoint,
    window: &[u8],
    compressed: &[u8],
    out_len: usize,
) -> io::Result<Vec<u8>> {
    if window.len() != checkpoint.window_size() {
        return Err(corrupt(format!(
            "checkpoint window of {} bytes where {} are needed",
            window.len(),
            checkpoint.window_size()
        )));
    }
    let mut inflater = Inflater::new();
    let mut input = compressed;
    if checkpoint.bits > 0 {
        let (&first, rest) = input.split_first().ok_or_else(|| corrupt("empty span"))?;
        inflater.prime(checkpoint.bits, first >> (8 - checkpoint.bits))?;
        input = rest;
    }
    if !window.is_empty() {
        inflater.set_dictionary(window)?;
    }
    let mut out = vec![0u8; out_len];
    let mut filled = 0;
    while filled < out_len {
        let (consumed, produced, rc) = inflater.inflate(input, &mut out[filled..], z::Z_NO_FLUSH);
        input = &input[consumed..];
        filled += produced;
        match rc {
            z::Z_STREAM_END if filled < out_len => {
                // The span runs on into the next gzip member.
                let trailer = input
                    .get(8..)
                    .ok_or_else(|| corrupt("span ends in a gzip trailer"))?;
                let header = gzip_header_len(trailer)?
                    .ok_or_else(|| corrupt("span ends in a gzip header"))?;
                input = &trailer[header..];
                inflater.reset();
            }
            z::Z_STREAM_END => {}
            z::Z_OK | z::Z_BUF_ERROR if consumed == 0 && produced == 0 => {
                return Err(corrupt("span data ends early"))
            }
            z::Z_OK | z::Z_BUF_ERROR => {}
            rc => return Err(corrupt(format!("invalid deflate data in span ({rc})"))),
        }
    }
    Ok(out)
}

/// Decompresses the start of one gzip member (an eStargz chunk): `compressed` begins with the
/// member's header; skips `skip` bytes of output and returns the next `out_len` exactly.
pub fn decode_member(compressed: &[u8], skip: usize, out_len: usize) -> io::Result<Vec<u8>> {
    let header =
        gzip_header_len(compressed)?.ok_or_else(|| corrupt("truncated gzip member header"))?;
    let start = Checkpoint {
        in_offset: 0,
        bits: 0,
        out_offset: 0,
        window_at: 0,
        window_len: 0,
        light: false,
    };
    let total = skip
        .checked_add(out_len)
        .ok_or_else(|| corrupt("member span too large"))?;
    let mut out = decode_span(&start, &[], &compressed[header..], total)?;
    out.drain(..skip);
    Ok(out)
}
