//! Recording: which parts of its layers a mount's workload reads first, in the order first
//! read, as [`ProfileRange`]s of aligned [`RECORD_UNIT`]s.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::layer::LayerIndex;

use super::{ProfileRange, MAX_RANGES, RECORD_FOR};

/// What a recording notes a read by: the aligned units of this many uncompressed bytes it
/// touches (the kernel's readahead on a mount, `fuse::KERNEL_READAHEAD`), cut at the edges of
/// the spans it touches — not whole spans of the index the recording mount has, where those
/// are larger. A replay fetches the spans of its own index that hold them, so a profile
/// serves any index of the layer — and one published with spans shaped to the profile
/// (`stratafs profile push`) fetches only the deflate blocks the workload read.
pub const RECORD_UNIT: u64 = 16 << 10;
/// How many of the latest ranges a unit read may continue (the kernel's read-ahead of a file
/// reads its pages a little out of order, several files at once).
const RECENT_RANGES: usize = 8;

/// Notes the units a mount's workload reads first (see [`crate::profile`]).
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
}

#[derive(Debug, Default)]
struct RecorderState {
    /// (layer position in the view, start of a [`RECORD_UNIT`]) already noted.
    seen: HashSet<(usize, u64)>,
    /// Ranges noted since the last [`Recorder::take`].
    pending: Vec<ProfileRange>,
    noted: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// The parts of `offset..end` of `index`'s layer a read notes: the [`RECORD_UNIT`]s it
/// touches, each cut to the spans of `index` the read touches — a span smaller than a unit
/// (an eStargz chunk of a small file) is noted alone, not with the neighbours its unit holds.
fn units(index: &LayerIndex, offset: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let (lo, hi) = match index.span_at(at) {
            Some(i) => {
                let s = &index.spans[i];
                (s.out_offset, (s.out_offset + s.out_len).max(at + 1))
            }
            None => (0, index.size.max(end)),
        };
        let stop = hi.min(end);
        let mut unit = at / RECORD_UNIT;
        while unit * RECORD_UNIT < stop {
            let from = (unit * RECORD_UNIT).max(lo);
            let to = ((unit + 1) * RECORD_UNIT).min(hi).min(index.size);
            if from < to {
                out.push((from, to));
            }
            unit += 1;
        }
        at = hi;
    }
    out
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Notes a read of `len` bytes at `offset` of the layer at `layer` in the view, indexed
    /// by `index`.
    pub fn record(&self, layer: usize, index: &LayerIndex, offset: u64, len: u64) {
        let mut s = self.state.lock().expect("recorder lock");
        let now = Instant::now();
        let first = *s.first.get_or_insert(now);
        if now.duration_since(first) > RECORD_FOR || s.noted >= MAX_RANGES {
            return;
        }
        let end = offset.saturating_add(len.max(1)).min(index.size);
        for (start, stop) in units(index, offset, end) {
            if !s.seen.insert((layer, start)) {
                continue;
            }
            s.last = Some(now);
            let blob = index.blob.to_string();
            // A unit that continues one of the latest ranges extends it (the kernel's
            // read-ahead reads a file's pages slightly out of order), and a range it then
            // reaches joins it: a file read front to back stays one range.
            let recent = s.pending.len().saturating_sub(RECENT_RANGES);
            let continued = (recent..s.pending.len()).rev().find(|&k| {
                let r = &s.pending[k];
                r.layer == blob && r.offset + r.len == start
            });
            match continued {
                Some(k) => {
                    s.pending[k].len += stop - start;
                    let end = s.pending[k].offset + s.pending[k].len;
                    if let Some(j) = (k + 1..s.pending.len())
                        .find(|&j| s.pending[j].layer == blob && s.pending[j].offset == end)
                    {
                        let joined = s.pending.remove(j);
                        s.pending[k].len += joined.len;
                    }
                }
                None => {
                    s.pending.push(ProfileRange {
                        layer: blob,
                        offset: start,
                        len: stop - start,
                    });
                    s.noted += 1;
                }
            }
        }
    }

    /// The ranges noted since the last call, once no new unit was read for `quiet` (or the
    /// recording is over); `None` while the workload is still reading new units.
    pub fn take_when_quiet(&self, quiet: Duration) -> Option<Vec<ProfileRange>> {
        let mut s = self.state.lock().expect("recorder lock");
        if s.pending.is_empty() || s.last.is_some_and(|l| l.elapsed() < quiet) {
            return None;
        }
        Some(std::mem::take(&mut s.pending))
    }

    /// Whatever was noted and not yet taken.
    pub fn take(&self) -> Vec<ProfileRange> {
        std::mem::take(&mut self.state.lock().expect("recorder lock").pending)
    }

    /// Whether recording is over (its time is up or it is full).
    pub fn finished(&self) -> bool {
        let s = self.state.lock().expect("recorder lock");
        s.first.is_some_and(|f| f.elapsed() > RECORD_FOR) || s.noted >= MAX_RANGES
    }
}

impl crate::fs::ReadObserver for Recorder {
    fn read(&self, layer: usize, index: &LayerIndex, offset: u64, len: u64) {
        self.record(layer, index, offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::{layer_of, r};

    #[test]
    fn reads_a_little_out_of_order_are_recorded_as_one_range_per_file() {
        const U: u64 = RECORD_UNIT;
        // Spans of 4 units: what is recorded is the units read, not the spans.
        let index = layer_of(5, 4 * U);
        let d = index.blob.to_string();
        let rec = Recorder::new();
        // File A (units 0-5) read with its read-ahead ahead of it, file B (10-13) meanwhile,
        // then the gaps of A filled; a unit read twice counts once.
        for k in [0, 1, 3, 10, 11, 2, 4, 12, 5, 13, 1] {
            rec.record(0, &index, k * U + 7, 10);
        }
        assert_eq!(rec.take(), vec![r(&d, 0, 6 * U), r(&d, 10 * U, 4 * U)]);
        // A read across a unit boundary notes both units; none past the layer's end.
        rec.record(0, &index, 16 * U - 1, 2);
        rec.record(0, &index, 19 * U + 5, 10 * U);
        assert_eq!(rec.take(), vec![r(&d, 15 * U, 2 * U), r(&d, 19 * U, U)]);

        // Spans smaller than a unit (an eStargz chunk per small file): only the spans read.
        let index = layer_of(50, 100);
        let rec = Recorder::new();
        rec.record(0, &index, 150, 10);
        rec.record(0, &index, 1250, 100);
        rec.record(0, &index, 1210, 5);
        assert_eq!(rec.take(), vec![r(&d, 100, 100), r(&d, 1200, 200)]);
    }
}
