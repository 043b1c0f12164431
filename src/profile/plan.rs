//! A profile's byte ranges as a replay plan: which parts of each layer are still to be
//! fetched (each byte once, whatever a hostile profile repeats), and which pieces go in one
//! request.

use super::{Profile, REPLAY_PIECE};
use crate::layer::LayerIndex;

/// How many pieces further on in the plan a piece that continues another in its layer may be
/// to be fetched with it ([`coalesce`]).
const COALESCE_AHEAD: usize = 64;
/// Bytes of layer data between two pieces that [`coalesce`] fetches to make them one request
/// (the chunks of a few small files an eStargz profile skips; less than one gzip span, so
/// gzip pieces merge only when they touch).
const COALESCE_GAP: u64 = 64 << 10;

/// Layer data of a piece small enough to start with the small pieces next to it in the plan.
const GROUP_PIECE: u64 = 512 << 10;
/// Pieces started together at most.
const GROUP_MAX: usize = 8;

/// A profile's ranges as the pieces a replay fetches.
pub(super) struct Planned {
    /// `(layer, offset, len)` in profile order: whole spans of each layer's index, each byte
    /// once, in pieces of at most [`REPLAY_PIECE`].
    pub pieces: Vec<(usize, u64, u64)>,
    /// Per layer, the bytes the pieces cover.
    pub covered: Vec<Coverage>,
    /// Ranges that describe none of the layers (another layer's, past the end, empty).
    pub ignored: usize,
}

/// Plans `profile`'s ranges over the layers `indexes` describe (in the view's order). Each
/// byte of a layer is planned once (overlapping ranges add only what they add), so the plan
/// never exceeds the layers, whatever the profile says; a layer without random access (only
/// cached) plans nothing.
pub(super) fn plan(indexes: &[&LayerIndex], profile: &Profile) -> Planned {
    let mut covered: Vec<Coverage> = indexes.iter().map(|_| Coverage::default()).collect();
    let mut pieces = Vec::new();
    let mut ignored = 0;
    for r in &profile.ranges {
        let at = indexes
            .iter()
            .position(|index| index.blob.as_ref() == r.layer);
        match at {
            Some(i) if r.len > 0 && r.offset < indexes[i].size => {
                let index = indexes[i];
                if !index.random_access() {
                    continue; // served from the cache only: nothing to fetch ahead
                }
                let end = r.offset + r.len.min(index.size - r.offset);
                // Whole spans of this index: the plan's pieces then start and end where
                // spans do, whatever unit the profile was recorded in.
                let (start, end) = spans_around(index, r.offset, end);
                for (s, e) in covered[i].add(start, end) {
                    let mut at = s;
                    while at < e {
                        let len = REPLAY_PIECE.min(e - at);
                        pieces.push((i, at, len));
                        at += len;
                    }
                }
            }
            _ => ignored += 1,
        }
    }
    Planned {
        pieces,
        covered,
        ignored,
    }
}

/// The spans that hold `pieces` (as [`plan`] makes them), each once, in the pieces' order:
/// `(layer, span)`.
pub(super) fn spans_of(
    indexes: &[&LayerIndex],
    pieces: &[(usize, u64, u64)],
) -> Vec<(usize, usize)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &(layer, offset, len) in pieces {
        let index = indexes[layer];
        let mut at = offset;
        while at < offset + len {
            let Some(i) = index.span_at(at) else { break };
            if seen.insert((layer, i)) {
                out.push((layer, i));
            }
            at = index.spans[i].out_offset + index.spans[i].out_len;
        }
    }
    out
}

/// `start..end` of `index`'s layer widened to the spans that hold it.
pub(super) fn spans_around(index: &LayerIndex, start: u64, end: u64) -> (u64, u64) {
    let first = index
        .span_at(start)
        .map_or(start, |i| index.spans[i].out_offset);
    let last = index
        .span_at(end.saturating_sub(1).max(start))
        .map_or(end, |i| index.spans[i].out_offset + index.spans[i].out_len);
    (first.min(start), last.max(end))
}

/// The plan's pieces as the groups the replay starts together, in plan order: up to
/// [`GROUP_MAX`] consecutive pieces of one layer of at most [`GROUP_PIECE`] each, a larger one
/// alone.
/// Started together, a group's small fetches of one layer share a request
/// (`layer::reader::together`); each still waits only for its own bytes' request.
pub(super) fn groups(plan: &[(usize, u64, u64)]) -> Vec<Vec<(usize, u64, u64)>> {
    let mut out: Vec<Vec<(usize, u64, u64)>> = Vec::new();
    for &piece in plan {
        let small = piece.2 <= GROUP_PIECE;
        match out.last_mut() {
            Some(g)
                if small
                    && g.len() < GROUP_MAX
                    && g.iter().all(|p| p.0 == piece.0 && p.2 <= GROUP_PIECE) =>
            {
                g.push(piece)
            }
            _ => out.push(vec![piece]),
        }
    }
    out
}

/// Disjoint byte intervals of one layer.
#[derive(Debug, Default)]
pub(super) struct Coverage {
    /// start → end, disjoint and not touching.
    intervals: std::collections::BTreeMap<u64, u64>,
}

impl Coverage {
    /// The bytes covered: start → end, disjoint and not touching.
    pub(super) fn into_intervals(self) -> std::collections::BTreeMap<u64, u64> {
        self.intervals
    }

    /// Adds `start..end`; returns the parts of it that were not covered yet, in order.
    pub(super) fn add(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        // Intervals overlapping or touching start..end, merged into one.
        let (mut lo, mut hi) = (start, end);
        let mut gaps = Vec::new();
        let mut at = start;
        let first = self
            .intervals
            .range(..=start)
            .next_back()
            .filter(|(_, e)| **e >= start)
            .map(|(s, _)| *s);
        let touching: Vec<(u64, u64)> = self
            .intervals
            .range(first.unwrap_or(start)..=end)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            if s > at {
                gaps.push((at, s.min(end)));
            }
            at = at.max(e);
            lo = lo.min(s);
            hi = hi.max(e);
            self.intervals.remove(&s);
        }
        if at < end {
            gaps.push((at, end));
        }
        self.intervals.insert(lo, hi);
        gaps
    }
}

/// Merges the replay plan's pieces `(layer, offset, len)` that continue one another in their
/// layer — the later one starting at most [`COALESCE_GAP`] bytes after the earlier one ends
/// — into one piece of at most [`REPLAY_PIECE`] (the gap included), when the later one is at
/// most [`COALESCE_AHEAD`] pieces further on. A profile holds many such pairs: the spans
/// right after a file read first are often read a little later and recorded as a range of
/// their own, and an eStargz profile names file after file of a directory, with the chunks
/// of a few small files not read between them. Merged, they are one range request instead
/// of several (for gzip, one checkpoint window instead of several), the later bytes brought
/// forward a little. The pieces must not overlap (the plan covers each byte once).
pub(super) fn coalesce(plan: Vec<(usize, u64, u64)>) -> Vec<(usize, u64, u64)> {
    use std::collections::BTreeMap;
    let mut by_start: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    let mut by_end: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    for (k, &(layer, at, len)) in plan.iter().enumerate() {
        by_start.insert((layer, at), k);
        by_end.insert((layer, at + len), k);
    }
    // The maps hold the pieces not yet emitted nor merged into one.
    let take = |j: usize,
                by_start: &mut BTreeMap<(usize, u64), usize>,
                by_end: &mut BTreeMap<(usize, u64), usize>| {
        let (layer, at, len) = plan[j];
        by_start.remove(&(layer, at));
        by_end.remove(&(layer, at + len));
    };
    let mut out = Vec::with_capacity(plan.len());
    for (k, &(layer, at, len)) in plan.iter().enumerate() {
        if by_start.get(&(layer, at)) != Some(&k) {
            continue; // merged into an earlier piece
        }
        let (mut start, mut end) = (at, at + len);
        take(k, &mut by_start, &mut by_end);
        loop {
            let fits = |j: usize, from: u64, to: u64| {
                j > k && j <= k + COALESCE_AHEAD && to - from <= REPLAY_PIECE
            };
            // Only the nearest piece on each side: one that cannot join ends the merge on that
            // side (merging past it would cover its bytes, and fetch them twice), and each
            // step merges or ends, so the pass is O(n log n) whatever the profile holds.
            let after = by_start
                .range((layer, end)..=(layer, end.saturating_add(COALESCE_GAP)))
                .map(|(_, j)| *j)
                .next()
                .filter(|&j| fits(j, start, plan[j].1 + plan[j].2));
            if let Some(j) = after {
                end = plan[j].1 + plan[j].2;
                take(j, &mut by_start, &mut by_end);
                continue;
            }
            let before = by_end
                .range((layer, start.saturating_sub(COALESCE_GAP))..=(layer, start))
                .next_back()
                .map(|(_, j)| *j)
                .filter(|&j| fits(j, plan[j].1, end));
            if let Some(j) = before {
                start = plan[j].1;
                take(j, &mut by_start, &mut by_end);
                continue;
            }
            break;
        }
        out.push((layer, start, end - start));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::r;
    use crate::profile::{Profile, PROFILE_VERSION};

    #[test]
    fn coverage_returns_only_new_gaps_and_a_hostile_profile_plans_each_byte_once() {
        let mut c = Coverage::default();
        assert_eq!(c.add(10, 20), vec![(10, 20)]);
        assert_eq!(c.add(30, 40), vec![(30, 40)]);
        assert_eq!(c.add(5, 45), vec![(5, 10), (20, 30), (40, 45)]);
        assert_eq!(c.add(0, 50), vec![(0, 5), (45, 50)]);
        assert!(c.add(0, 50).is_empty());
        assert_eq!(c.intervals.len(), 1);
        // A hundred thousand copies of "the whole layer" merge into one range.
        let mut p = Profile {
            version: PROFILE_VERSION,
            ranges: Vec::new(),
            pack: None,
        };
        p.merge(&vec![r("a", 0, u64::MAX); 100_000]);
        assert_eq!(p.ranges, vec![r("a", 0, u64::MAX)]);
        assert_eq!(p.bytes(), u64::MAX);
    }

    #[test]
    fn replay_fetches_pieces_that_continue_one_another_together() {
        const M: u64 = 1 << 20;
        let plan = vec![
            (0, 10 * M, M),            // a
            (1, 0, M),                 // another layer: never merged with layer 0
            (0, 12 * M, M),            // c: not adjacent to a
            (0, 11 * M, M),            // b: continues a (too long to join c as well: 2 MiB cap)
            (0, 9 * M + M / 2, M / 2), // before a, but a and b are 2 MiB already
            (0, 13 * M, M),            // continues c
        ];
        assert_eq!(
            coalesce(plan),
            vec![
                (0, 10 * M, 2 * M),
                (1, 0, M),
                (0, 12 * M, 2 * M),
                (0, 9 * M + M / 2, M / 2),
            ]
        );
        // Only within COALESCE_AHEAD pieces: the same bytes otherwise, in the same order.
        let mut far = vec![(0, 0, 4096)];
        far.extend((1..=COALESCE_AHEAD as u64).map(|k| (1, k * M, 4096)));
        far.push((0, 4096, 4096));
        assert_eq!(coalesce(far.clone()), far);
        far.remove(1);
        let merged = coalesce(far);
        assert_eq!(merged[0], (0, 0, 8192));
        assert_eq!(merged.len(), COALESCE_AHEAD);
        // Across a gap of at most COALESCE_GAP bytes (fetched too), not more.
        let g = COALESCE_GAP;
        let gaps = vec![(0, 0, 100), (0, 100 + g, 100), (0, 201 + 2 * g, 100)];
        assert_eq!(coalesce(gaps), vec![(0, 0, 200 + g), (0, 201 + 2 * g, 100)]);
        let before = vec![(0, 100 + g, 100), (0, 0, 100)];
        assert_eq!(coalesce(before), vec![(0, 0, 200 + g)]);
        // A piece that cannot join (too far on in the plan) is not merged past: no byte is
        // planned twice.
        let mut skip = vec![(0, 0, 100), (0, 150, 100)];
        skip.extend((0..COALESCE_AHEAD as u64).map(|k| (1, k * 1000, 10)));
        skip.push((0, 100, 50)); // continues the first piece, but too far on
        let out = coalesce(skip.clone());
        assert_eq!(out[0], (0, 0, 100), "{out:?}");
        let mut sorted = out.clone();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            let ((l0, a0, n0), (l1, a1, _)) = (w[0], w[1]);
            assert!(l0 != l1 || a0 + n0 <= a1, "overlapping pieces: {out:?}");
        }
    }
}
