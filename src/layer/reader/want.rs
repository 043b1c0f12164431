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

/// Fewest compressed bytes a fetch from a layer indexed by its TOC (eStargz, zstd:chunked)
/// reads while the chunks after the one missed are missing too. Those spans are single file
/// chunks, often a few KiB, and a program that loads file after file from one directory (as
/// `import` does) would otherwise pay a round trip for each; tar order keeps a directory's
/// files together. 512 KiB is about two round trips' worth of transfer at 100 Mbit/s and 20 ms.
pub(super) const MIN_TOC_FETCH: u64 = 512 << 10;

/// Fewest compressed bytes a fetch of files a walk predicts ([`Want::Walk`]: a module's
/// imports) reads from a layer indexed by its TOC, while the chunks after its files are
/// missing. Each file is its own chunk there, and successive walks ask for the modules of one
/// `__pycache__` directory a few at a time, each batch a request of its own: on the cold-start
/// benchmark's eStargz image the walks made 507 of 565 requests, 343 of them touching a range
/// fetched at another moment. At least 32 KiB from the first file (a small module and a few
/// neighbours) took 570 requests to 330 for 2.3 MB more, and the run 0.3–0.4 s sooner; 8, 16,
/// 64 and 128 KiB and [`MIN_TOC_FETCH`] (9 MB more) did less well (docs/benchmarks.md).
pub(super) const MIN_WALK_FETCH: u64 = 32 << 10;

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
    /// The spans after a read ([`super::LayerReader::fetch_neighbours`]): at least [`MIN_MISS_FETCH`].
    Neighbours,
    /// Files a walk predicts (a module's imports): exactly their spans in a layer indexed as
    /// its tar stream (its spans already hold several small files), at least
    /// [`MIN_WALK_FETCH`] in a TOC-indexed one.
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
            IndexFormat::Estargz | IndexFormat::ZstdChunked if self == Want::Walk => MIN_WALK_FETCH,
            IndexFormat::Estargz | IndexFormat::ZstdChunked => MIN_TOC_FETCH,
            IndexFormat::Stream if self == Want::Walk => 0,
            IndexFormat::Stream
                if matches!(self, Want::Demand | Want::Checked | Want::Neighbours) =>
            {
                MIN_MISS_FETCH
            }
            IndexFormat::Stream => 0,
        }
    }
}
