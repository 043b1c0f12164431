//! How far a fetch reaches past the bytes asked for, by what it is for ([`Want`]): the
//! sequential read-ahead, the minimum a TOC-indexed layer's fetch carries, a read's
//! neighbours, and the cap on one coalesced request.

use crate::layer::IndexFormat;

/// Spans fetched ahead of a sequential reader of a layer indexed by its TOC, as long as they
/// end within [`READAHEAD_BYTES`] of the end of the span read (an eStargz chunk of a large
/// file is up to 4 MiB: four of them would be 16 MiB held at once for one read).
pub(super) const READAHEAD: usize = 4;
/// Bytes of layer data past the end of the span read that a sequential reader's fetch reaches
/// at most (1 MiB: sixteen 64 KiB gzip spans).
pub(super) const READAHEAD_BYTES: u64 = 1 << 20;

/// Upper bound on the bytes one coalesced range request fetches.
pub(super) const MAX_COALESCED: u64 = 16 << 20;

/// Fewest compressed bytes a fetch from a layer indexed by its TOC (eStargz, zstd:chunked) —
/// a read's, an open's, or a walk's ([`Want::Walk`]: a module's imports) — reads while the
/// chunks after its own are missing too. Those spans are single file chunks, often a few KiB,
/// and a program that loads file after file from one directory (as `import` does) would
/// otherwise pay a round trip for each; tar order keeps a directory's files together. Once the
/// import walk fetched a module's imports ahead, a read's reach mattered less than what the
/// read waits for: at 512 KiB (two round trips' worth of transfer at 100 Mbit/s and 20 ms) the
/// loader's `ld.so.cache` waited 291 ms for the 548 KB run it came in. On the cold-start
/// benchmark's eStargz image (docs/benchmarks.md, 2026-12-05), with walks fetching exactly
/// their files: 5.57 s; walks reaching 32 KiB: 5.04 s (46.9 MB); then reads too at 256 KiB
/// 4.81 s, 128 KiB 4.69 s, 64 KiB 4.58–4.60 s, 32 KiB 4.51 s (40.1 MB), 16 KiB 4.51 s, none
/// 4.71 s.
pub(super) const MIN_TOC_FETCH: u64 = 32 << 10;

/// The most compressed bytes a fetch of a TOC-indexed layer padded up to its minimum
/// ([`Want::min_reach`]) may carry: the spans after the ones asked for come along while the
/// fetch is short of the minimum, but not one that would take it past this — such a span is
/// a large chunk of another file, which a walk of `import`s rarely reads next (a layer
/// indexed as its tar stream has no such spans, and no such bound). On the cold-start
/// benchmark's eStargz image (docs/benchmarks.md, 2026-12-06), 2.7 MB of such padding was
/// never read; bounded at 1.5 times the minimum, a run fetched 1.2–1.3 MB less, ended
/// 0.45 s sooner at 20 Mbit/s (16.63 against 17.10 s, 8 runs each) and as soon at 100 Mbit/s
/// (eStargz 4.47–4.66 against 4.50–4.70 s, zstd:chunked 4.37–4.55 against 4.34–4.46 s).
pub(super) fn max_padded(min: u64) -> u64 {
    min + min / 2
}

/// Compressed bytes a fetch of the neighbours of a read ([`super::LayerReader::fetch_neighbours`]) of
/// a layer indexed as its tar stream reaches, while the spans after the read are missing.
/// Spans are small (256 KiB of tar, so a miss costs little beyond what it reads), but programs
/// read file after file in tar order (an `import` walks a package's directory), and each miss
/// costs a round trip: after each miss the neighbours come too, in their own request started
/// when the miss is served (the read waits for its own bytes only, and does not share the link
/// with them), about a round trip's worth of transfer at 100 Mbit/s and 20 ms. On the
/// cold-start benchmark (3 runs each) 256 KiB fetched as many bytes as 384 KiB inside the
/// miss's own request did (51.6 MB), 0.2 s sooner; 384 KiB this way: 55 MB, 0.2 s sooner
/// still. Profile replay reads exactly what it asks for.
pub(super) const MIN_MISS_FETCH: u64 = 256 << 10;

/// What a fetch is for, which decides how far past the bytes asked for it reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Want {
    /// The spans asked for, whatever the format: a profile's replay (the profile names what
    /// is read, so reaching past it would only fetch what the workload did not read) and the
    /// files of a directory fetched ahead (the files are the guess).
    Exact,
    /// A read: its spans, [`READAHEAD_BYTES`] more for a sequential reader, at least
    /// [`MIN_TOC_FETCH`] for a TOC-indexed layer, and for a stream-indexed one its neighbours
    /// too ([`MIN_MISS_FETCH`]) in the same request.
    Demand,
    /// A read whose neighbours are fetched next, in their own request: as [`Want::Demand`]
    /// without them.
    DemandAlone,
    /// A read as [`Want::Demand`] whose chunks are all verified on load (no range reads).
    Checked,
    /// The spans after a read ([`super::LayerReader::fetch_neighbours`]), which asks for
    /// [`MIN_MISS_FETCH`] compressed bytes of them, short of a shared object: exactly those.
    Neighbours,
    /// Files a walk predicts (a module's imports): exactly their spans in a layer indexed as
    /// its tar stream (its spans already hold several small files), at least
    /// [`MIN_TOC_FETCH`] in a TOC-indexed one, as a read.
    Walk,
    /// A step of background fill ([`super::LayerReader::fill`]): exactly its spans, whatever
    /// the format (the steps cover the layer).
    Background,
}

impl Want {
    /// Fewest compressed bytes a fetch for this reaches from the span it starts at, in a layer
    /// indexed as `format` (0: just the spans asked for).
    pub(super) fn min_reach(self, format: IndexFormat) -> u64 {
        match format {
            _ if matches!(self, Want::Background | Want::Exact) => 0,
            IndexFormat::Estargz | IndexFormat::ZstdChunked => MIN_TOC_FETCH,
            IndexFormat::Stream if self == Want::Walk => 0,
            IndexFormat::Stream if matches!(self, Want::Demand | Want::Checked) => MIN_MISS_FETCH,
            IndexFormat::Stream => 0,
        }
    }
}
