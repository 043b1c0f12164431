//! Filesystem logic over a pulled image: open its layers, merge them, read files lazily.
//!
//! Seventh stage of the pipeline, with no FUSE types (the FUSE adapter and the CLI's `ls`/`cat`
//! sit on top). [`Layers`] (in `indexing.rs`, the one place that decides where a layer's index
//! comes from) finds each layer's index — stored, pinned by the image (a published stratafs
//! index, an eStargz or zstd:chunked TOC), or built by streaming the blob once from the
//! registry with parallel range requests, which also fills the chunk cache — and
//! [`ImageView`] presents the merged [`Tree`] with reads served by [`LayerReader`]s. Errors:
//! [`FsError`] (`error.rs`), with the one errno mapping for FUSE.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::Instrument;

use crate::image::{ImageRecord, LayerRecord};
use crate::layer::reader::LayerReader;
use crate::layer::{is_shared_object, LayerIndex};
use crate::tree::{FileType, NodeId, Tree};

mod command;
mod early;
mod elf;
mod error;
mod imports;
mod indexing;
mod pyc;
mod pysource;
mod ready;
mod runtime;
mod start;
#[cfg(test)]
pub(crate) mod tests;

pub use error::FsError;
pub use indexing::*;
pub use start::StartHints;

/// Layers whose indexes are opened at once.
pub const PARALLEL_OPENS: usize = 4;

/// Told of every read through [`ImageView::read`]: what a startup profile's recorder
/// ([`crate::profile::Recorder`]) notes.
pub trait ReadObserver: Send + Sync {
    /// A read of `len` bytes at `offset` of the layer at `layer` in the view, indexed by
    /// `index`.
    fn read(&self, layer: usize, index: &LayerIndex, offset: u64, len: u64);
}

/// A pulled image presented as one tree.
pub struct ImageView {
    pub name: String,
    pub tree: Tree,
    readers: Vec<LayerReader>,
    files_dir: std::path::PathBuf,
    /// Notes what reads touch first, for a startup profile (see [`crate::profile`]).
    recorder: std::sync::OnceLock<Arc<dyn ReadObserver>>,
    /// Fetches that opens start ahead of reads ([`ImageView::prefetch_file`]) in flight.
    open_fetches: tokio::sync::Semaphore,
    /// A startup profile is replayed: it predicts the reads better than opens do.
    profiled: std::sync::atomic::AtomicBool,
    /// Reads that miss fetch their neighbours next ([`ImageView::fetch_neighbours`]).
    neighbours: std::sync::atomic::AtomicBool,
    /// Per open file handle, where its last read ended ([`ImageView::read_for`]): the
    /// read-ahead state of each open file, not of its layer. One entry per open handle.
    handles: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    /// (directory, layer) whose small files an open has fetched ahead
    /// ([`ImageView::prefetch_file`]): at most one entry per directory and layer of the tree.
    dirs_fetched: std::sync::Mutex<std::collections::HashSet<(NodeId, usize)>>,
    /// Directories whose files are being fetched ahead at once ([`SIBLING_FETCHES`]).
    sibling_fetches: tokio::sync::Semaphore,
    /// Opens of a module's bytecode fetch the modules it imports ([`ImageView::follow_imports`]).
    imports: std::sync::atomic::AtomicBool,
    /// Module files whose imports an open has followed (`imports.rs`): each once per mount,
    /// at most [`imports::MAX_FOLLOWED`].
    imports_followed: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// ELF files whose libraries an open has followed (`elf.rs`): each once per mount, at
    /// most [`elf::MAX_OBJECTS`].
    elf_followed: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// Files opened for a local copy once, and those whose copy is being made
    /// ([`ImageView::copy_locally`]).
    copy_asked: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    copying: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// Processes whose command line an open has read (`command.rs`): each once per mount, at
    /// most [`command::MAX_PROCESSES`].
    command_pids: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Files an open's [`ImageView::prefetch_file`] went all the way through for: at most one
    /// entry per file of the tree.
    opens_done: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// The bytecode tag of the image's python, once looked for (`imports.rs`).
    python_tag: std::sync::OnceLock<Option<String>>,
    /// Per layer, the bytes a replayed startup profile covers (start → end, disjoint):
    /// [`ImageView::note_read_whole`] leaves files it knows to it.
    profile_coverage: std::sync::OnceLock<Vec<std::collections::BTreeMap<u64, u64>>>,
    /// Opens whose libraries are being followed at once ([`elf::FOLLOWS`]).
    elf_follows: tokio::sync::Semaphore,
    /// The import walk's follows of extension modules at once ([`elf::WALK_FOLLOWS`]).
    elf_walk_follows: tokio::sync::Semaphore,
    /// ELF files whose libraries are being followed, each with a semaphore closed when that
    /// ends: another open of such a file waits for it before fetching the file's rest.
    elf_following: std::sync::Mutex<std::collections::HashMap<NodeId, Arc<tokio::sync::Semaphore>>>,
    /// Fetches of imported modules under way at once, across the mount
    /// ([`imports::IMPORT_FETCHES`]).
    import_fetches: tokio::sync::Semaphore,
}

/// Uncompressed bytes one fetch an open starts covers at most, how many such fetches run at
/// once per file, and how many files are fetched ahead at once per mount: pieces keep a read
/// of a file's first bytes from waiting for its whole prefetch, and a few at a time keep
/// demand reads a share of the link.
const OPEN_PIECE: u64 = 1 << 20;
/// Reads slower than this are logged (debug): where a cold start waits.
const SLOW_READ: std::time::Duration = std::time::Duration::from_millis(2);
const OPEN_PARALLEL: usize = 4;
const OPEN_FETCHES: usize = 8;
/// After the first open in a directory, the other files of that directory in the same layer
/// no larger than [`SIBLING_MAX`] are fetched ahead too, nearest in the layer first, up to
/// [`SIBLINGS_BYTES`] of layer data: a program that opens one file of a directory (a module of
/// a package) opens others of it next, in an order tar order does not keep. Shared objects are
/// not among them: one is loaded only when something names it (a library's `DT_NEEDED`,
/// `dlopen`, an import), which the opens of those names follow (on the cold-start benchmark
/// the other modules of glibc's `gconv` directory, 0.7–0.8 MB, were fetched on the open of
/// its cache file and never read).
const SIBLINGS_BYTES: u64 = 2 << 20;
const SIBLING_MAX: u64 = 256 << 10;
const SIBLING_FETCHES: usize = 2;

/// Ranges `(start, end)` of a layer's tar stream merged where they touch — files a tar header
/// apart (512 bytes, or a few for long names): one request each. Sorted by start.
fn touching(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in runs {
        match merged.last_mut() {
            Some(last) if s <= last.1 + 4096 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

impl ImageView {
    /// Opens `image`: every layer's index (built if missing), merged base first.
    pub async fn open(layers: &Layers, image: &ImageRecord) -> Result<ImageView, FsError> {
        Self::open_chain(layers, image, image.layers.len()).await
    }

    /// Opens the chain of `image`'s first `count` layers (the snapshot of one ChainID).
    pub async fn open_chain(
        layers: &Layers,
        image: &ImageRecord,
        count: usize,
    ) -> Result<ImageView, FsError> {
        // The layers' indexes a few at a time (each blob once): published indexes and TOCs
        // are fetched, and layers without one streamed, in parallel rather than one layer
        // after another — bounded, so an image of hundreds of layers opens no more at once.
        use futures_util::{StreamExt, TryStreamExt};
        let chain = &image.layers[..count.min(image.layers.len())];
        let mut unique: Vec<&LayerRecord> = Vec::new();
        for l in chain {
            if !unique.iter().any(|u| u.digest == l.digest) {
                unique.push(l);
            }
        }
        let found: Result<Vec<(Arc<LayerIndex>, IndexReport)>, FsError> =
            futures_util::stream::iter(unique.iter().map(|l| layers.index(image, l)))
                .buffered(PARALLEL_OPENS)
                .try_collect()
                .await;
        // The requests of the pull's early start that these opens did not take.
        layers.clear_early();
        let found = found?;
        let mut readers = Vec::with_capacity(count);
        for layer in chain {
            let at = unique.iter().position(|u| u.digest == layer.digest);
            let index = found[at.expect("every layer is in unique")].0.clone();
            readers.push(
                layers
                    .reader(image, layer, index)?
                    .remembering_checks_in(layers.indexes.clone()),
            );
        }
        let tree =
            Tree::build(readers.iter().map(|r| &r.index().entries[..])).map_err(|source| {
                FsError::Tree {
                    image: image.name.clone(),
                    source,
                }
            })?;
        Ok(ImageView {
            name: image.name.clone(),
            tree,
            readers,
            files_dir: layers.files_dir.clone(),
            recorder: std::sync::OnceLock::new(),
            open_fetches: tokio::sync::Semaphore::new(OPEN_FETCHES),
            profiled: std::sync::atomic::AtomicBool::new(false),
            neighbours: std::sync::atomic::AtomicBool::new(false),
            handles: Default::default(),
            dirs_fetched: Default::default(),
            sibling_fetches: tokio::sync::Semaphore::new(SIBLING_FETCHES),
            imports: std::sync::atomic::AtomicBool::new(false),
            imports_followed: Default::default(),
            elf_followed: Default::default(),
            copy_asked: Default::default(),
            copying: Default::default(),
            command_pids: Default::default(),
            opens_done: Default::default(),
            python_tag: Default::default(),
            profile_coverage: Default::default(),
            elf_follows: tokio::sync::Semaphore::new(elf::FOLLOWS),
            elf_walk_follows: tokio::sync::Semaphore::new(elf::WALK_FOLLOWS),
            elf_following: Default::default(),
            import_fetches: tokio::sync::Semaphore::new(imports::IMPORT_FETCHES),
        })
    }

    /// The node at `path`, or a not-found error naming it.
    pub fn lookup(&self, path: &str) -> Result<NodeId, FsError> {
        self.tree.lookup(path).ok_or_else(|| FsError::NotFound {
            image: self.name.clone(),
            path: path.trim_start_matches('/').to_string(),
        })
    }

    /// Reads up to `len` bytes at `offset` of regular file `node`.
    /// With [`fetch_neighbours`](Self::fetch_neighbours) on, a read that had to fetch (but of a
    /// shared object) then
    /// starts, as its own task and request, a fetch of the layer's bytes after it
    /// ([`LayerReader::fetch_neighbours`]; not once a startup profile is replayed): the read
    /// waits for its own bytes only, and the link carries the neighbours while the workload
    /// works on them.
    pub async fn read(
        self: &Arc<Self>,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        self.read_inner(node, offset, len, None).await
    }

    /// As [`read`](Self::read), for open file `handle` (a FUSE file handle, or any id the
    /// caller keeps per open file): a miss reads ahead when this read starts where the
    /// handle's previous one ended, whatever other files are read meanwhile. A handle not
    /// seen before (one opened before a takeover) starts afresh.
    pub async fn read_for(
        self: &Arc<Self>,
        handle: u64,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        let previous_end = self.handles.lock().unwrap().insert(handle, offset + len);
        let continues = offset > 0 && previous_end == Some(offset);
        self.read_inner(node, offset, len, Some(continues)).await
    }

    /// Forgets the read-ahead state of `handle` (its file was closed).
    pub fn release(&self, handle: u64) {
        self.handles.lock().unwrap().remove(&handle);
    }

    async fn read_inner(
        self: &Arc<Self>,
        node: NodeId,
        offset: u64,
        len: u64,
        continues: Option<bool>,
    ) -> Result<Vec<u8>, FsError> {
        let n = self.tree.node(node);
        let Some((layer, data_offset)) = n.data.filter(|_| n.file_type == FileType::File) else {
            return Err(FsError::NotAFile {
                image: self.name.clone(),
                path: self.tree.path(node),
            });
        };
        if offset >= n.size {
            return Ok(Vec::new());
        }
        let len = len.min(n.size - offset);
        let reader = &self.readers[layer];
        if let Some(recorder) = self.recorder.get() {
            recorder.read(layer, reader.index(), data_offset + offset, len);
        }
        let (at, end) = (data_offset + offset, data_offset + offset + len);
        // Not while a startup profile is replayed: it knows what comes next. Nor after a read
        // of a shared object: its pages are read where its code jumps, not file after file (on
        // the cold-start benchmark 80% of such neighbours were never read), and the read
        // fetches its own spans alone.
        let scattered = is_shared_object(&n.name);
        let chained = !scattered
            && self.neighbours.load(Ordering::Relaxed)
            && !self.profiled.load(Ordering::Relaxed)
            && !reader.is_cached(at, len);
        let started = std::time::Instant::now();
        let data = async {
            match continues {
                Some(continues) => {
                    reader
                        .read_continuing(at, len, chained || scattered, continues)
                        .await
                }
                None if chained || scattered => reader.read_alone(at, len).await,
                None => reader.read(at, len).await,
            }
        }
        .instrument(tracing::debug_span!("read"))
        .await?;
        if chained {
            let view = self.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = view.readers[layer].fetch_neighbours(end).await {
                        tracing::debug!(error = %e, "fetch of a read's neighbours failed");
                    }
                }
                .instrument(tracing::debug_span!("neighbours")),
            );
        }
        let waited = started.elapsed();
        if waited > SLOW_READ {
            tracing::debug!(path = %self.tree.path(node), offset, len, ms = waited.as_millis() as u64, "read waited");
        }
        Ok(data)
    }

    /// What an open of `node` fetches ahead: (layer, offset, length) of the first `limit`
    /// bytes of a regular file in a layer read by range; `None` for anything else.
    fn open_fetch(&self, node: NodeId, limit: u64) -> Option<(usize, u64, u64)> {
        let n = self.tree.node(node);
        let (layer, offset) = n.data.filter(|_| n.file_type == FileType::File)?;
        let len = n.size.min(limit);
        (len > 0 && self.readers[layer].index().random_access()).then_some((layer, offset, len))
    }

    /// Fetches what is not cached of the first `limit` bytes of regular file `node`, in pieces
    /// a few at a time. An open predicts reads: the file's bytes then arrive with about one
    /// round trip instead of one per miss (python imports one module file after another).
    /// A program's or shared object's libraries are fetched beside its first piece
    /// (`elf.rs`). A Python module's bytecode then has the modules it imports fetched, and theirs
    /// (`imports.rs`). Then, the first time for its directory and layer, the directory's other
    /// small files ([`SIBLINGS_BYTES`]). Not noted by the profile recorder (only reads are);
    /// failures are left to the reads. Nothing is fetched once a startup profile is replayed
    /// ([`ImageView::set_profiled`]): the profile knows which of an opened file's bytes are read.
    pub async fn prefetch_file(&self, node: NodeId, limit: u64) {
        if self.profiled.load(Ordering::Relaxed) {
            return;
        }
        let Some((layer, offset, len)) = self.open_fetch(node, limit) else {
            return;
        };
        let reader = &self.readers[layer];
        // A program's or shared object's libraries: the loader maps them one after another
        // right after the file's first pages, and only then runs the rest of it.
        let needed = self
            .fetch_needed(node, limit)
            .instrument(tracing::debug_span!("needed"));
        let followed = if !reader.is_cached(offset, len) {
            // At most OPEN_FETCHES files at once: an open while they run fetches nothing
            // ahead (its reads fetch), so a walk opening thousands of files queues no work.
            let Ok(_permit) = self.open_fetches.try_acquire() else {
                return;
            };
            let n = self.tree.node(node);
            if elf::may_be_elf(&n.name, n.mode) && len > OPEN_PIECE {
                // Its first piece beside the libraries, the rest after them.
                let first = self
                    .prefetch_own(node, layer, offset, OPEN_PIECE, OPEN_PIECE)
                    .instrument(tracing::debug_span!("open"));
                let ((), followed) = futures_util::join!(first, needed);
                self.prefetch_own(node, layer, offset, len, limit)
                    .instrument(tracing::debug_span!("open"))
                    .await;
                followed
            } else {
                let own = self
                    .prefetch_own(node, layer, offset, len, limit)
                    .instrument(tracing::debug_span!("open"));
                futures_util::join!(own, needed).1
            }
        } else {
            needed.await
        };
        self.fetch_imports(node, limit)
            .instrument(tracing::debug_span!("imports"))
            .await;
        let siblings = self.names_what_follows(node)
            || self
                .prefetch_siblings(node)
                .instrument(tracing::debug_span!("siblings"))
                .await;
        // Done unless a step had no turn (a later open then takes it).
        if followed && siblings {
            self.opens_done.lock().unwrap().insert(node);
        }
    }

    /// Whether an open of `node` by process `pid` has nothing to start ahead of its reads:
    /// [`prefetch_file`](Self::prefetch_file) has nothing to do (a startup profile is replayed,
    /// the file's layer is not read by range, or an open of the file went all the way through
    /// — no step of it left for want of a turn — and all of it is still cached: its libraries,
    /// imports and directory are claimed once per mount) and neither has
    /// [`follow_command`](Self::follow_command). Cheap, on every
    /// open: a program run again in a mount then wakes no task per open (34 of the 76 µs a
    /// warm python import's opens took).
    pub fn open_is_idle(&self, node: NodeId, pid: u32, limit: u64) -> bool {
        if self.profiled.load(Ordering::Relaxed) {
            return true;
        }
        let own = match self.open_fetch(node, limit) {
            None => true,
            Some((layer, offset, len)) => {
                self.opens_done.lock().unwrap().contains(&node)
                    && self.readers[layer].is_cached(offset, len)
            }
        };
        own && self.command_followed(node, pid)
    }

    /// Whether the files an open of `node` leads to are named by the file itself — a module's
    /// imports (followed: its package's files it needs), a shared object's dynamic section
    /// (the libraries it loads) — so that its neighbours in the layer and the other files of
    /// its directory are a poor guess. On the cold-start benchmark, with imports followed,
    /// 11% of the 3.9 MB the directory fetches of such opens brought was read, and the
    /// command ended no later without them; without their neighbours too, 1.6 MB less was
    /// fetched and the command ended within the run-to-run spread (docs/benchmarks.md).
    fn names_what_follows(&self, node: NodeId) -> bool {
        self.follows_imports_of(node) || is_shared_object(&self.tree.node(node).name)
    }

    /// An open's fetch of the first `len` bytes of its file (at `offset` of `layer`), then of
    /// the file's neighbours if that was the whole file.
    async fn prefetch_own(&self, node: NodeId, layer: usize, offset: u64, len: u64, limit: u64) {
        use futures_util::StreamExt;
        let (n, reader) = (self.tree.node(node), &self.readers[layer]);
        let pieces = (0..len.div_ceil(OPEN_PIECE)).map(|k| {
            let at = k * OPEN_PIECE;
            (offset + at, OPEN_PIECE.min(len - at))
        });
        let mut fetches = futures_util::stream::iter(pieces)
            .map(|(at, len)| reader.fetch_for_open(at, len))
            .buffer_unordered(OPEN_PARALLEL);
        while let Some(fetched) = fetches.next().await {
            if let Err(e) = fetched {
                tracing::debug!(path = %self.tree.path(node), error = %e, "fetch ahead of reads failed");
            }
        }
        // Then, in its own request, the files after it in the layer (the next file opened is
        // often one of them) — for a file fetched whole whose own names do not say what
        // comes next.
        if n.size <= limit && !self.names_what_follows(node) {
            if let Err(e) = reader.fetch_neighbours(offset + n.size).await {
                tracing::debug!(path = %self.tree.path(node), error = %e, "fetch of a file's neighbours failed");
            }
        }
    }

    /// Once per directory: fetches the missing small files of `node`'s directory that lie in
    /// its layer ([`SIBLINGS_BYTES`]), but its shared objects, nearest to it first, files that
    /// touch in one request.
    /// False if it had no turn ([`SIBLING_FETCHES`] directories under way): a later open of
    /// `node` tries again.
    async fn prefetch_siblings(&self, node: NodeId) -> bool {
        let n = self.tree.node(node);
        let Some((layer, offset)) = n.data else {
            return true;
        };
        // A few directories at once; a directory is done once one of its opens got to it.
        let Ok(_permit) = self.sibling_fetches.try_acquire() else {
            return false;
        };
        if !self.dirs_fetched.lock().unwrap().insert((n.parent, layer)) {
            return true;
        }
        let reader = &self.readers[layer];
        let mut files: Vec<(u64, u64)> = self
            .tree
            .node(n.parent)
            .children
            .values()
            .filter(|&&c| c != node)
            .map(|&c| self.tree.node(c))
            .filter(|c| c.file_type == FileType::File && c.size > 0 && c.size <= SIBLING_MAX)
            .filter(|c| !is_shared_object(&c.name))
            .filter_map(|c| {
                c.data
                    .filter(|(l, _)| *l == layer)
                    .map(|(_, o)| (o, c.size))
            })
            .collect();
        files.sort_by_key(|(o, _)| o.abs_diff(offset));
        let mut left = SIBLINGS_BYTES;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (o, size) in files {
            if size > left {
                break;
            }
            if !reader.is_cached(o, size) {
                left -= size;
                runs.push((o, o + size));
            }
        }
        let mut merged = touching(runs);
        merged.sort_by_key(|(s, _)| s.abs_diff(offset));
        for (s, e) in merged {
            if let Err(e) = reader.prefetch(s, e - s).await {
                tracing::debug!(path = %self.tree.path(node), error = %e, "fetch of a file's siblings failed");
                return true;
            }
        }
        true
    }

    /// From now on, reads that miss fetch their neighbours next: for a mount, whose workload
    /// reads file after file (a one-off read such as `stratafs cat` does not).
    pub fn fetch_neighbours(&self) {
        self.neighbours.store(true, Ordering::Relaxed);
    }

    /// Whether opens of a Python module's bytecode fetch the modules it imports, and theirs
    /// (`imports.rs`; off until set: a one-off read such as `stratafs cat` has no imports).
    pub fn follow_imports(&self, on: bool) {
        self.imports.store(on, Ordering::Relaxed);
    }

    /// Notes that a startup profile is being replayed into this view (from then on opens
    /// fetch nothing ahead, and reads that miss keep their neighbours in their own request).
    pub fn set_profiled(&self) {
        self.profiled.store(true, Ordering::Relaxed);
    }

    /// Notes which bytes of each layer (start → end, disjoint; one map per layer, base first)
    /// the startup profile being replayed covers (once per view).
    pub fn set_profile_coverage(&self, coverage: Vec<std::collections::BTreeMap<u64, u64>>) {
        let _ = self.profile_coverage.set(coverage);
    }

    /// From now on, reads through [`read`](Self::read) are noted by `recorder` (once per view).
    pub fn record_reads(&self, recorder: Arc<dyn ReadObserver>) {
        let _ = self.recorder.set(recorder);
    }
}

impl ImageView {
    /// The layer readers, base first.
    pub fn readers(&self) -> &[LayerReader] {
        &self.readers
    }

    /// Tells the startup profile's recorder that all of regular file `node` is read: opened
    /// for passthrough, or handed whole to the kernel's page cache at its open, its reads will
    /// not reach this process (the kernel serves them from a local copy or its page cache). Such a file was fetched whole ahead of its open — by an import's or its
    /// directory's fetch — and a program that opens a file it was handed whole mostly reads
    /// it whole (a library's pages, a module's bytecode). Not if the startup profile being
    /// replayed covers any of the file: an earlier recording saw which of its bytes are read
    /// (a library's pages), and the merged profile keeps that rather than the whole file
    /// (on the cold-start benchmark, `openblas` is 25 MB, of which python reads about 2 MB).
    /// A profile covers whole spans, so the file's first and last spans count only where
    /// they hold nothing but the file: a span it shares with a neighbour may be covered for
    /// the neighbour's sake.
    pub fn note_read_whole(&self, node: NodeId) {
        let n = self.tree.node(node);
        let Some((layer, offset)) = n.data else {
            return;
        };
        let end = offset.saturating_add(n.size);
        let index = self.readers[layer].index();
        let span_at = |at: u64| index.span_at(at).map(|i| &index.spans[i]);
        let from = match span_at(offset) {
            Some(s) if s.out_offset < offset => s.out_offset + s.out_len,
            _ => offset,
        };
        let to = match span_at(end.saturating_sub(1)) {
            Some(s) if s.out_offset + s.out_len > end => s.out_offset,
            _ => end,
        };
        let known = from < to
            && self
                .profile_coverage
                .get()
                .and_then(|c| c.get(layer))
                .is_some_and(|c| {
                    c.range(..to)
                        .next_back()
                        .is_some_and(|(_, &covered_to)| covered_to > from)
                });
        if let (Some(recorder), false) = (self.recorder.get(), known) {
            recorder.read(layer, self.readers[layer].index(), offset, n.size);
        }
    }

    /// The local file with exactly the contents of regular file `node`, if one was made
    /// ([`copy_locally`](Self::copy_locally)): under `<root>/cache/files/`, written to a temp
    /// file, synced and renamed, so a file under its final name is always complete (one of
    /// another size is removed). The FUSE driver hands such files to the kernel (passthrough)
    /// so warm reads skip the daemon. Only looks (a `stat`).
    pub fn local_copy(&self, node: NodeId) -> Result<Option<std::path::PathBuf>, FsError> {
        let Some(path) = self.local_copy_path(node) else {
            return Ok(None);
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == self.tree.node(node).size => Ok(Some(path)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "dropping a local copy of the wrong size");
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::Local { path, source: e }),
        }
    }

    /// Where the local copy of regular file `node` goes; `None` for anything else.
    fn local_copy_path(&self, node: NodeId) -> Option<std::path::PathBuf> {
        let n = self.tree.node(node);
        let (layer, offset) = n.data.filter(|_| n.file_type == FileType::File)?;
        let blob = self.readers[layer].index().blob.digest();
        Some(self.files_dir.join(format!("{blob}-{offset}-{}", n.size)))
    }

    /// Asks for the local copy of regular file `node` ([`local_copy`](Self::local_copy)): the
    /// second time it is asked in this mount, if every byte of the file is cached, the copy
    /// is made in the background from verified chunks (never fetching), one at a time per
    /// file. The open that asks does not wait for it: it reads through this process, as do
    /// the opens until the copy is made. A first open is not enough: a program's first start
    /// opens each library once, and copying them all then (a read, a hash and a write of
    /// every byte) took its share of the machine from the program — python's import after a
    /// layer streamed in whole took 0.94 s with each copy made at the open, 0.80 s with none
    /// — and a file opened for passthrough is recorded whole in the mount's startup profile,
    /// its reads unseen: copies made at the recording run's first opens put whole libraries
    /// into the profile of which python reads a part.
    pub fn copy_locally(self: &Arc<Self>, node: NodeId) {
        let n = self.tree.node(node);
        let Some((layer, offset)) = n.data.filter(|_| n.file_type == FileType::File) else {
            return;
        };
        // Cheapest first: a copy that exists is one stat, where `is_stored` asks the cache
        // for every span of the file.
        if self.copy_asked.lock().unwrap().insert(node)
            || self.copying.lock().unwrap().contains(&node)
            || self.local_copy(node).is_ok_and(|c| c.is_some())
            || !self.readers[layer].is_stored(offset, n.size)
            || !self.copying.lock().unwrap().insert(node)
        {
            return;
        }
        let view = self.clone();
        tokio::spawn(async move {
            match view.make_local_copy(node).await {
                Ok(true) => tracing::debug!(path = %view.tree.path(node), "local copy made"),
                Ok(false) => {}
                Err(e) => tracing::warn!(path = %view.tree.path(node), error = %e, "no local copy"),
            }
            view.copying.lock().unwrap().remove(&node);
        });
    }

    /// Whether it made the local copy of `node` (false: there is one, or not every byte of
    /// the file is cached).
    async fn make_local_copy(&self, node: NodeId) -> Result<bool, FsError> {
        if self.local_copy(node)?.is_some() {
            return Ok(false);
        }
        let (n, path) = (self.tree.node(node), self.local_copy_path(node));
        let (Some((layer, offset)), Some(path)) = (n.data, path) else {
            return Ok(false);
        };
        let reader = &self.readers[layer];
        if !reader.is_stored(offset, n.size) {
            return Ok(false);
        }
        let io = |e: std::io::Error| FsError::Local {
            path: path.clone(),
            source: e,
        };
        let mut tmp = crate::cache::blocking(|| {
            std::fs::create_dir_all(&self.files_dir)?;
            tempfile::NamedTempFile::new_in(&self.files_dir)
        })
        .map_err(io)?;
        const STEP: u64 = 4 << 20;
        let mut done = 0;
        while done < n.size {
            let data = reader
                .read_checked(offset + done, STEP.min(n.size - done))
                .await?;
            if data.is_empty() {
                return Err(io(std::io::Error::other("layer ended before the file")));
            }
            crate::cache::blocking(|| std::io::Write::write_all(&mut tmp, &data)).map_err(io)?;
            done += data.len() as u64;
        }
        crate::cache::blocking(|| crate::store::commit_file(tmp, &path)).map_err(io)?;
        Ok(true)
    }
}

/// Files up to this size are read concurrently (whole, in memory) by [`cat`]; larger ones are
/// streamed in pieces of this size.
const CAT_CONCURRENT_MAX: u64 = 4 << 20;
/// Reads [`cat`] keeps in flight at once.
const CAT_CONCURRENT_READS: usize = 8;

/// Why [`cat`] stopped: the image, or the output.
#[derive(Debug, thiserror::Error)]
pub enum CatError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Output(#[from] std::io::Error),
}

/// Writes the files at `paths` of `view` to `out`, one after another (`stratafs cat`): small
/// files are read concurrently (a few at once, each whole), large
/// ones streamed; output stays in argument order. Memory: the small files in flight.
pub async fn cat(
    view: &Arc<ImageView>,
    paths: &[String],
    out: &mut dyn std::io::Write,
) -> Result<(), CatError> {
    type Read = tokio::task::JoinHandle<Result<Vec<u8>, FsError>>;
    async fn drain(
        queued: &mut std::collections::VecDeque<Read>,
        out: &mut dyn std::io::Write,
    ) -> Result<(), CatError> {
        while let Some(task) = queued.pop_front() {
            let data = task
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            out.write_all(&data)?;
        }
        Ok(())
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(CAT_CONCURRENT_READS));
    let mut queued = std::collections::VecDeque::new();
    for path in paths {
        let id = view.lookup(path)?;
        let node = view.tree.node(id);
        if node.file_type != FileType::File {
            let path = view.tree.path(id);
            return Err(FsError::NotAFile {
                image: view.name.clone(),
                path,
            }
            .into());
        }
        if node.size <= CAT_CONCURRENT_MAX {
            let (view, limit, size) = (view.clone(), limit.clone(), node.size);
            queued.push_back(tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.expect("semaphore open");
                view.read(id, 0, size).await
            }));
            continue;
        }
        drain(&mut queued, out).await?;
        let mut offset = 0;
        while offset < node.size {
            let data = view.read(id, offset, CAT_CONCURRENT_MAX).await?;
            if data.is_empty() {
                break;
            }
            out.write_all(&data)?;
            offset += data.len() as u64;
        }
    }
    drain(&mut queued, out).await?;
    out.flush()?;
    Ok(())
}
