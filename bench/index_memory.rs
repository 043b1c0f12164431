//! In-memory size of a layer index: builds the index of a real directory tree (tar + gzip in
//! memory) and measures, with a counting allocator, the heap the `LayerIndex` holds.
//!
//! `cargo bench --bench index_memory [-- DIR]` (default DIR: /usr/lib/python3.11)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded to the system allocator with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/usr/lib/python3.11".to_string());
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(dir.trim_start_matches('/'), &dir)
        .expect("tar the directory");
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let blob = gz.finish().unwrap();
    let (blob_digest, diff_id) = (
        stratafs::digest::sha256(&blob),
        stratafs::digest::sha256(&tar),
    );

    let mut windows = Vec::new();
    let index = stratafs::layer::build_index(
        &blob[..],
        stratafs::image::Compression::Gzip,
        &blob_digest,
        &diff_id,
        blob.len() as u64,
        stratafs::layer::DEFAULT_SPAN,
        &mut |_, _| Ok(()),
        &mut windows,
        &stratafs::layer::Limits::default(),
    )
    .expect("index");
    let json_len = serde_json::to_vec(&index).expect("index serializes").len();
    // The serialized copy is freed again: what stays allocated now is the index itself.
    let before = LIVE.load(Ordering::Relaxed);
    let entries = index.entries.len();
    let (spans, checkpoints) = (index.spans.len(), index.checkpoints.len());
    let window_bytes = windows.len();
    drop(index);
    let held = before - LIVE.load(Ordering::Relaxed);
    println!(
        "| tree | {dir}: {} bytes tar, {} bytes gzip |",
        tar.len(),
        blob.len()
    );
    println!("| entries / spans / checkpoints | {entries} / {spans} / {checkpoints} |");
    println!(
        "| LayerIndex in memory | {held} bytes = {} bytes/entry (checkpoint windows are in a separate file of {window_bytes} bytes, not in memory) |",
        held / entries.max(1)
    );
    println!(
        "| LayerIndex as JSON | {json_len} bytes = {} bytes/entry |",
        json_len / entries.max(1)
    );
}
