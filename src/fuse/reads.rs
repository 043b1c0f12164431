//! The read path's parts that run off the dispatch threads: a read that may wait for the
//! registry (within the read timeout; a handle whose read failed fails at once for a while),
//! and the cached files handed to the kernel's page cache at their first open
//! (FUSE_NOTIFY_STORE), so that a program's reads of them do not come to the daemon one small
//! read at a time. Every byte given to the kernel is from the verified cache. Only at a first
//! open: the kernel holds a page while a read of it is pending, and a store into it waits for
//! that read uninterruptibly, so a store beside reads under way could keep a killed serving
//! process from exiting, and with it the next from taking the mount over.
//!
//! A file is stored once per kernel inode: later opens are answered at once (a python import
//! run again opens the same 650 files; each store read the file and copied it into the
//! kernel again, ~60 µs an open). When the kernel drops the inode (FUSE_FORGET) its pages go
//! with it, and the next first open stores the file again; pages the kernel evicts while it
//! keeps the inode are read through the daemon, as any read is.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuser::{Errno, FileHandle, INodeNo, ReplyData};

use super::{errno_of, failed};
use crate::fs::ImageView;
use crate::tree::NodeId;

/// How long after a read failed further reads through that handle fail at once.
pub(super) const TIMEOUT_MEMORY: Duration = Duration::from_secs(2);

fn remember_failure(failed: &Mutex<HashMap<u64, std::time::Instant>>, fh: u64) {
    let mut t = failed.lock().unwrap();
    t.retain(|_, at| at.elapsed() < TIMEOUT_MEMORY);
    t.insert(fh, std::time::Instant::now());
}

/// Serves a read that may wait for the registry, within `timeout`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_async(
    view: Arc<ImageView>,
    fh: FileHandle,
    id: NodeId,
    offset: u64,
    len: u64,
    timeout: Duration,
    timed_out: Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    reply: ReplyData,
) {
    match tokio::time::timeout(timeout, view.read_for(fh.0, id, offset, len)).await {
        Ok(Ok(data)) => reply.data(&data),
        Ok(Err(e)) => {
            tracing::error!(path = %view.tree.path(id), offset, len, error = %e, "read failed");
            let errno = errno_of(&e);
            failed("read");
            if errno == Errno::EIO {
                remember_failure(&timed_out, fh.0);
            }
            reply.error(errno);
        }
        Err(_) => {
            tracing::error!(
                path = %view.tree.path(id), offset, len,
                "read failed: no data within the read timeout of {timeout:?}"
            );
            remember_failure(&timed_out, fh.0);
            failed("read");
            reply.error(Errno::EIO);
        }
    }
}

/// Cached files handed to the kernel's page cache (FUSE_NOTIFY_STORE) on one connection, at
/// most [`STORES`] at once: each holds a file under 1 MiB in memory, so they hold at most
/// 4 MiB; a store with no room is skipped (the program's reads will ask).
#[derive(Default)]
pub(super) struct PageCache {
    /// Set once the session exists.
    pub(super) notifier: OnceLock<fuser::Notifier>,
    in_flight: AtomicUsize,
    /// Inodes whose file was stored and that the kernel has not forgotten since: at most one
    /// entry per inode of the tree.
    stored: Mutex<HashSet<u64>>,
}

/// Stores under way at most, per connection.
const STORES: usize = 4;

/// Room for one store, given back when dropped.
pub(super) struct Room(Arc<PageCache>);

impl Drop for Room {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PageCache {
    /// Room for a store, if fewer than [`STORES`] are under way (and the session exists).
    pub(super) fn room(self: &Arc<Self>) -> Option<Room> {
        self.notifier.get()?;
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= STORES {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Room(self.clone()))
    }

    /// Whether the file of `ino` is in the kernel's page cache from a store since the kernel
    /// last forgot the inode.
    pub(super) fn stored(&self, ino: INodeNo) -> bool {
        self.stored.lock().unwrap().contains(&ino.0)
    }

    /// The kernel forgot `ino` (and its pages): its next first open stores it again.
    pub(super) fn forgot(&self, ino: INodeNo) {
        self.stored.lock().unwrap().remove(&ino.0);
    }
}

impl Room {
    /// Hands the kernel all of file `id`, if all of it is cached. Call it on the blocking pool
    /// (it may read the disk), while no handle of the file is open (so no read of it is under
    /// way, whose pages the store would wait for).
    pub(super) fn push_file(&self, view: &ImageView, ino: INodeNo, id: NodeId) {
        let (Some(notifier), Some(bytes)) = (self.0.notifier.get(), view.file_bytes_ready(id))
        else {
            return;
        };
        match notifier.store(ino, 0, &bytes) {
            Ok(()) => {
                self.0.stored.lock().unwrap().insert(ino.0);
                crate::metrics::metrics().pushed(bytes.len() as u64);
                // Its reads will not reach this process, as a passthrough open's do not.
                view.note_read_whole(id);
            }
            // The inode left the kernel's cache (ENOENT), or an old kernel: reads will ask.
            Err(e) => {
                tracing::debug!(path = %view.tree.path(id), error = %e, "page cache not filled")
            }
        }
    }
}
