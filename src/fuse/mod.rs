//! The FUSE adapter: an [`ImageView`] served read-only to the kernel through `fuser`.
//!
//! Last stage of the pipeline, and thin: it converts tree nodes to FUSE attributes, answers
//! metadata (lookup, getattr, readdir(plus), readlink, xattrs, statfs) from memory on the
//! dispatch threads. A read whose bytes are in memory is answered there too, one whose bytes
//! are cached on disk by a thread of the blocking pool, any other by a tokio task: the dispatch
//! loop never waits for the disk or the network. A read that cannot be served within the read
//! timeout gets EIO and the reason is logged. A file under 1 MiB whose bytes are all cached
//! goes whole to the kernel's page cache at its first open (`reads`), so that a program's
//! reads of it are answered by the kernel instead of one small read at a time. Files of 1 MiB
//! or more whose bytes are all cached are opened with FUSE
//! passthrough to a local copy (kernel ≥ 6.9), so warm reads do not go through the daemon at
//! all; the copy is made in the background at a file's second open in a mount
//! ([`ImageView::copy_locally`]), so the opens that come before it read through the daemon.
//!
//! [`mount`] mounts with mount(2) itself (type `fuse.stratafs`, the image name as source),
//! so `/proc/mounts` and `findmnt` show what is mounted; it needs CAP_SYS_ADMIN.
//!
//! A connection can outlive the process serving it ([`crate::daemon::holder`] keeps a copy of
//! its `/dev/fuse` descriptor): every dispatch thread reads the one shared descriptor (no
//! cloned ones, whose unanswered requests the kernel would abort with the process), and
//! [`take_over`] lets a new process serve the same mount. It needs the same tree (inode numbers
//! are the tree's, so the caller checks [`crate::tree::Tree::fingerprint`]) and how each open
//! inode is opened (through the daemon, or passthrough with which backing id), which every
//! serving process appends to an [`OpenLog`]. Requests
//! the dead process had read but not answered are sent again by the kernel
//! (FUSE_NOTIFY_RESEND, Linux ≥ 6.9), so none is lost and none is answered twice.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::fs::{FsError, ImageView};
use crate::layer::reader::Ready;
use crate::tree::{FileType, Node, NodeId, ROOT};

mod mounts;
mod openlog;
mod opens;
mod reads;
mod session;
mod slot;

pub use mounts::{mount_entries, mount_state, MountEntry, MountState};
pub use openlog::{OpenLog, OpenMode};
pub use session::{mount, take_over, unmount, Mounted};
pub use slot::ViewSlot;

use opens::{first_open, opened, start_open, Opens};
use reads::{read_async, PageCache, TIMEOUT_MEMORY};

/// The kernel may cache names and attributes for this long: the tree never changes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Smaller files are served by the daemon even when cached: a local copy per small file costs
/// a write and disk space, and the kernel's page cache (FOPEN_KEEP_CACHE) serves them warm.
const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;
/// The kernel's readahead on a mount: how much a page fault in a mapped file reads around
/// the page (the device's `read_ahead_kb`; 128 KiB unless the daemon asks for less) and the
/// most a small sequential `read` is read ahead by (a `read` still asks for all it reads).
/// Loaded libraries are read by faults a few pages at a time, so 128 KiB around each cost
/// bytes the program never touched: on the cold-start benchmark, the recorded profile of
/// `import numpy, pandas, requests` read 79.8 MiB of layer data at 128 KiB, 76.1 MiB at
/// 32 KiB, 74.6 MiB at 16 KiB; its replay fetched 29.1 against 30.4 MB and ended 2.98 s
/// against 3.17 s after the pull began (two rounds of 4 runs each); 4 KiB cost daemon CPU (a
/// request per page) and fetched no fewer. Without a profile the daemon's own reach past a
/// miss decides what is fetched: the same bytes and time at 16 as at 128 KiB (8 runs, gzip
/// and eStargz).
pub(crate) const KERNEL_READAHEAD: u32 = 16 << 10;

/// A mount that could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("{mountpoint}: {detail}")]
    Mount { mountpoint: PathBuf, detail: String },
    #[error("invalid mount option {option:?}: {detail}")]
    Option { option: String, detail: String },
    #[error("{mountpoint}: FUSE_NOTIFY_RESEND failed: requests in flight at the takeover would wait forever (needs Linux 6.9 or later)")]
    Resend {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How an image is mounted (the `-o` options that concern the kernel and the driver).
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let users other than root use the mount (`allow_other`).
    pub allow_other: bool,
    /// Honour setuid/setgid bits (`suid`; a container rootfs needs it). Default: nosuid.
    pub suid: bool,
    /// Honour device files (`dev`). Default: nodev.
    pub dev: bool,
    /// Allow execution (`exec`, default; `noexec` forbids it).
    pub exec: bool,
    /// How long a read may wait for the registry before it fails with EIO.
    pub read_timeout: Duration,
    /// Open fully cached files with FUSE passthrough when the kernel supports it.
    pub passthrough: bool,
    /// FUSE dispatch threads.
    pub threads: usize,
    /// Bytes of a file fetched ahead when it is opened (0: none).
    pub open_prefetch: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            suid: false,
            dev: false,
            exec: true,
            read_timeout: Duration::from_secs(60),
            passthrough: true,
            threads: 4,
            open_prefetch: 0,
        }
    }
}

impl MountOptions {
    /// Applies one option of a comma-separated `-o` list.
    pub fn apply(&mut self, option: &str) -> Result<(), FuseError> {
        let bad = |detail: &str| FuseError::Option {
            option: option.to_string(),
            detail: detail.to_string(),
        };
        let (key, value) = match option.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (option, None),
        };
        match (key, value) {
            ("ro" | "atime" | "noatime" | "relatime" | "default_permissions", None) => {}
            ("rw", None) => return Err(bad("stratafs mounts are read-only")),
            ("allow_other", None) => self.allow_other = true,
            ("suid", None) => self.suid = true,
            ("nosuid", None) => self.suid = false,
            ("dev", None) => self.dev = true,
            ("nodev", None) => self.dev = false,
            ("exec", None) => self.exec = true,
            ("noexec", None) => self.exec = false,
            ("passthrough", None) => self.passthrough = true,
            ("nopassthrough", None) => self.passthrough = false,
            ("read_timeout", Some(v)) => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| bad("expected a positive number of seconds"))?;
                self.read_timeout = Duration::from_secs_f64(secs);
            }
            ("threads", Some(v)) => {
                self.threads = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| bad("expected 1 to 64"))?;
            }
            _ => return Err(bad("unknown option")),
        }
        Ok(())
    }
}

/// The filesystem the kernel talks to.
pub struct StrataFs {
    /// The view served, once open (requests wait for it: [`ViewSlot`]).
    slot: Arc<ViewSlot>,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
    /// Set in `init` when the kernel accepted FUSE passthrough.
    passthrough: Arc<AtomicBool>,
    /// Where open modes are recorded for a process that takes the connection over.
    log: Option<Arc<OpenLog>>,
    /// How a previous serving process opened inodes it did not see closed: files may still be
    /// open that way, so this process opens them the same way, for as long as it lives.
    inherited: Mutex<HashMap<u64, OpenMode>>,
    /// Open files per inode. The kernel wants every open of an inode in one mode: all
    /// passthrough (sharing one backing id) or all through the daemon.
    opens: Arc<Mutex<HashMap<u64, Opens>>>,
    next_fh: AtomicU64,
    /// Reads served so far (the background fetcher yields while this moves).
    reads: Arc<AtomicU64>,
    /// Open files (handles) whose last read failed with EIO (timed out, or the registry's
    /// retry budget ran out), and when: the kernel retries a failed readahead through the same
    /// handle at once with a smaller read, which then fails at once rather than waiting again.
    /// A new open waits for the registry again.
    timed_out: Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    /// Cached bytes handed to the kernel's page cache before they are asked for.
    pages: Arc<PageCache>,
}

/// Counts a FUSE operation in the metrics.
fn op(name: &str) {
    crate::metrics::metrics().fuse_op(name);
}

/// Counts a FUSE operation answered with an error.
fn failed(name: &str) {
    crate::metrics::metrics().fuse_error(name);
}

impl StrataFs {
    pub fn new(
        slot: Arc<ViewSlot>,
        runtime: tokio::runtime::Handle,
        options: MountOptions,
        log: Option<Arc<OpenLog>>,
        inherited: HashMap<u64, OpenMode>,
    ) -> StrataFs {
        StrataFs {
            slot,
            runtime,
            options,
            passthrough: Arc::default(),
            log,
            inherited: Mutex::new(inherited),
            opens: Arc::default(),
            // Handles of a previous serving process may still be open: numbers of this one
            // start at its pid, above 32 bits.
            next_fh: AtomicU64::new(((std::process::id() as u64) << 32) | 1),
            reads: Arc::default(),
            timed_out: Arc::default(),
            pages: Arc::default(),
        }
    }

    /// The view (waiting while it opens) and the node of inode `ino` in it.
    fn node(&self, ino: INodeNo) -> Result<(&Arc<ImageView>, NodeId), Errno> {
        let view = &self.slot.wait()?.view;
        let id = view.tree.by_ino(ino.0).ok_or(Errno::ENOENT)?;
        Ok((view, id))
    }
}

/// FUSE attributes of a node: what the unpacked image would show.
fn attr_of(n: &Node) -> FileAttr {
    let (kind, rdev, size) = match &n.file_type {
        FileType::File => (fuser::FileType::RegularFile, 0, n.size),
        FileType::Dir => (fuser::FileType::Directory, 0, 4096),
        FileType::Symlink(t) => (fuser::FileType::Symlink, 0, t.len() as u64),
        FileType::Char(ma, mi) => (fuser::FileType::CharDevice, encode_dev(*ma, *mi), 0),
        FileType::Block(ma, mi) => (fuser::FileType::BlockDevice, encode_dev(*ma, *mi), 0),
        FileType::Fifo => (fuser::FileType::NamedPipe, 0, 0),
    };
    let time = if n.mtime >= 0 {
        UNIX_EPOCH + Duration::new(n.mtime as u64, n.mtime_nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(n.mtime.unsigned_abs())
            + Duration::from_nanos(n.mtime_nsec.into())
    };
    FileAttr {
        ino: INodeNo(n.ino),
        size,
        blocks: size.div_ceil(4096) * 8,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Linux's `new_encode_dev`: the device number layout `stat` reports.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn errno_of(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_SPLICE_READ,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        if let Err(nearest) = config.set_max_readahead(KERNEL_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(64);
        if self.options.passthrough {
            // Depth 1: backing files are on a plain filesystem, and overlayfs may still stack
            // on this mount (the snapshotter does).
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough.store(ok, Ordering::Relaxed);
            if !ok {
                tracing::info!(
                    "kernel without FUSE passthrough: cached files are read through the daemon"
                );
            }
        }
        Ok(())
    }

    /// The tree's inodes never go away; the kernel forgetting one drops its pages, which a
    /// first open then stores again.
    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.pages.forgot(ino);
        op("forget");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        op("lookup");
        let (view, parent) = match self.node(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let tree = &view.tree;
        let child = name.to_str().and_then(|name| tree.child(parent, name));
        match child {
            Some(id) => reply.entry_with_ttls(&TTL, &TTL, &attr_of(tree.node(id)), Generation(0)),
            None => {
                // Inode 0 with a TTL: the kernel caches the negative entry (the tree never
                // changes), sparing the daemon repeated misses (PATH and import searches).
                let mut attr = attr_of(tree.node(ROOT));
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(&TTL, &TTL, &attr, Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        op("getattr");
        if ino == INodeNo::ROOT && self.slot.is_opening() {
            // The mount is probed (and stat'ed) before its layers are open: the root's
            // attributes, not to be cached, stand in until the tree's own.
            let attr = FileAttr {
                ino,
                size: 4096,
                blocks: 8,
                atime: UNIX_EPOCH,
                mtime: UNIX_EPOCH,
                ctime: UNIX_EPOCH,
                crtime: UNIX_EPOCH,
                kind: fuser::FileType::Directory,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                blksize: 4096,
                flags: 0,
            };
            return reply.attr(&Duration::ZERO, &attr);
        }
        match self.node(ino) {
            Ok((view, id)) => reply.attr(&TTL, &attr_of(view.tree.node(id))),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        op("readlink");
        match self.node(ino) {
            Ok((view, id)) => match &view.tree.node(id).file_type {
                FileType::Symlink(target) => reply.data(target.as_bytes()),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        op("open");
        let (view, id) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let fh = FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed));
        if self.options.open_prefetch > 0
            && !view.open_is_idle(id, req.pid(), self.options.open_prefetch)
        {
            let (view, limit, pid) = (view.clone(), self.options.open_prefetch, req.pid());
            self.runtime.spawn(async move {
                futures_util::join!(
                    view.prefetch_file(id, limit),
                    view.follow_command(id, pid, limit)
                )
            });
        }
        // A file under 1 MiB is never passthrough; its opens are counted all the same, so that
        // its first one knows no read of it can be under way.
        let small = view.tree.node(id).size < PASSTHROUGH_MIN_SIZE;
        if !small && !self.passthrough.load(Ordering::Relaxed) {
            return reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
        }
        {
            let mut opens = self.opens.lock().unwrap();
            if let Some(o) = opens.get_mut(&ino.0) {
                if o.backing.is_none() && !o.keep && !small {
                    // Open already (its close's RELEASE may not have come yet): this open
                    // asks for the local copy as any other does, off the dispatch thread. (An
                    // inherited entry stays in its mode for as long as this process serves.)
                    let view = view.clone();
                    self.runtime.spawn(async move { view.copy_locally(id) });
                }
                // (While its first open hands it to the page cache, answered after that.)
                return o.join(reply, fh);
            }
            if let Some(mode) = self.inherited.lock().unwrap().remove(&ino.0) {
                // Opened by the process that served before, and maybe still open: the same way
                // (and the same backing id), for as long as this process serves.
                let backing = match mode {
                    OpenMode::Cached => None,
                    // SAFETY: the id was opened on this connection and never closed (the log
                    // records a close before it happens); it is closed only when the
                    // `BackingId` is dropped, and `keep` entries never are.
                    OpenMode::Passthrough(id) => Some(unsafe { reply.wrap_backing(id) }),
                };
                return Opens::first(backing, true).answer(&mut opens, ino, reply, fh);
            }
        }
        if small {
            if self.pages.stored(ino) {
                // In the page cache since its first open: nothing to hand over again.
                return first_open(&self.opens, &self.log, ino, fh, reply, None);
            }
            // No handle of it is open, so no read of it is under way, and a page of it
            // stored into the page cache cannot wait for one (the kernel holds a page while
            // a read of it is pending, and a store waits for it uninterruptibly: a serving
            // process killed meanwhile could not exit, nor the next take over). All cached,
            // the file goes to the page cache before the open is answered, from the blocking
            // pool; opens that come meanwhile wait for it too.
            let room = view.file_ready(id).then(|| self.pages.room()).flatten();
            let Some(room) = room else {
                return first_open(&self.opens, &self.log, ino, fh, reply, None);
            };
            let Some(reply) = start_open(&self.opens, &self.log, ino, fh, reply) else {
                return;
            };
            let (opens, view) = (self.opens.clone(), view.clone());
            self.runtime.spawn_blocking(move || {
                room.push_file(&view, ino, id);
                opened(&opens, ino, fh, reply);
            });
            return;
        }
        // Looking for (or assembling) a local copy reads the disk: not on the dispatch thread.
        let view = view.clone();
        let opens = self.opens.clone();
        let log = self.log.clone();
        self.runtime.spawn(async move {
            let local = match view.local_copy(id) {
                Ok(Some(local)) => Some(local),
                // Made for later opens, if the file is all cached and opened before.
                Ok(None) => {
                    view.copy_locally(id);
                    None
                }
                Err(e) => {
                    tracing::warn!(path = %view.tree.path(id), error = %e, "no local copy");
                    None
                }
            };
            if let Some(o) = opens.lock().unwrap().get_mut(&ino.0) {
                // Opened meanwhile: follow that open's mode (before opening a backing file).
                return o.join(reply, fh);
            }
            let backing = local.and_then(|path| {
                let file = std::fs::File::open(&path)
                    .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "cannot open local copy"))
                    .ok()?;
                let backing = reply
                    .open_backing(&file)
                    .map_err(|e| tracing::info!(error = %e, "passthrough refused"))
                    .ok()?;
                let raw = backing.into_raw();
                // SAFETY: `raw` was just opened on this connection and is closed only when the
                // wrapper is dropped.
                Some((unsafe { reply.wrap_backing(raw) }, raw))
            });
            if backing.is_some() {
                view.note_read_whole(id);
            }
            first_open(&opens, &log, ino, fh, reply, backing);
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        op("read");
        let (view, id) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        self.reads.fetch_add(1, Ordering::Relaxed);
        let recent_timeout = self
            .timed_out
            .lock()
            .unwrap()
            .get(&fh.0)
            .is_some_and(|t| t.elapsed() < TIMEOUT_MEMORY);
        if recent_timeout {
            return reply.error(Errno::EIO);
        }
        let len = u64::from(size);
        // In memory: served here. On disk (verified): served by a thread of the blocking pool,
        // not an async worker. Else by a task, which may wait for the registry.
        // An error here is the full path's to report.
        let ready = view.read_ready(fh.0, id, offset, len, false);
        if let Ok(Ready::Bytes(data)) = ready {
            return reply.data(&data);
        }
        let view = view.clone();
        let timeout = self.options.read_timeout;
        let timed_out = self.timed_out.clone();
        let runtime = self.runtime.clone();
        if let Ok(Ready::OnDisk) = ready {
            let view = view.clone();
            self.runtime.spawn_blocking(move || {
                if let Ok(Ready::Bytes(data)) = view.read_ready(fh.0, id, offset, len, true) {
                    return reply.data(&data);
                }
                // Gone meanwhile (or unreadable): the full path.
                runtime.spawn(read_async(
                    view, fh, id, offset, len, timeout, timed_out, reply,
                ));
            });
            return;
        }
        self.runtime.spawn(read_async(
            view, fh, id, offset, len, timeout, timed_out, reply,
        ));
    }

    /// No file here is a terminal or supports any other ioctl: ENOTTY, as a disk file system
    /// answers (programs such as python ask `isatty` of every file they open).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Nothing to flush in a read-only tree: ENOSYS tells the kernel so once, and it stops
    /// sending FLUSH, a round trip through the daemon that every `close` would wait for.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        op("flush");
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        op("release");
        if let Some(view) = self.slot.view() {
            view.release(fh.0);
        }
        let mut opens = self.opens.lock().unwrap();
        if let Some(o) = opens.get_mut(&ino.0) {
            o.count = o.count.saturating_sub(1);
            if o.count == 0 && !o.keep {
                // Recorded before the close: a process taking over never uses a closed id. If
                // it cannot be recorded, the id stays open (and this inode in its mode).
                if self.log.as_ref().is_none_or(|log| log.record(ino.0, None)) {
                    opens.remove(&ino.0); // closes the backing id, if any
                } else {
                    o.keep = true;
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        op("opendir");
        match self.node(ino) {
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        op("readdir");
        let (view, entries) = match self.dir_entries(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (name, id)) in entries.into_iter().enumerate().skip(offset as usize) {
            let attr = attr_of(view.tree.node(id));
            if reply.add(attr.ino, i as u64 + 1, attr.kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        op("readdirplus");
        let (view, entries) = match self.dir_entries(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (name, id)) in entries.into_iter().enumerate().skip(offset as usize) {
            let attr = attr_of(view.tree.node(id));
            if reply.add(attr.ino, i as u64 + 1, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        op("statfs");
        let (blocks, inodes) = match self.slot.wait() {
            Ok(served) => served.statfs,
            Err(e) => return reply.error(e),
        };
        reply.statfs(blocks, 0, 0, inodes, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        op("getxattr");
        let (view, id) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        let value = name
            .to_str()
            .and_then(|name| view.tree.node(id).xattrs.get(name));
        match value {
            None => reply.error(Errno::ENODATA),
            Some(v) => xattr_reply(reply, size, v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        op("listxattr");
        let (view, id) = match self.node(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for name in view.tree.node(id).xattrs.keys() {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        op("access");
        // The kernel checks modes (default_permissions); only writes are refused here.
        match self.node(ino) {
            Ok(_) if mask.contains(fuser::AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl StrataFs {
    /// `.`, `..` and the children of directory `ino`, in a stable order.
    /// The view and the entries of directory `ino` in it.
    #[allow(clippy::type_complexity)]
    fn dir_entries(&self, ino: INodeNo) -> Result<(&Arc<ImageView>, Vec<(String, NodeId)>), Errno> {
        let (view, id) = self.node(ino)?;
        let n = view.tree.node(id);
        if n.file_type != FileType::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut out = vec![(".".to_string(), id), ("..".to_string(), n.parent)];
        out.extend(n.children.iter().map(|(name, c)| (name.clone(), *c)));
        Ok((view, out))
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let mut o = MountOptions::default();
        for opt in [
            "ro",
            "allow_other",
            "suid",
            "dev",
            "read_timeout=2.5",
            "threads=8",
        ] {
            o.apply(opt).unwrap();
        }
        assert!(o.allow_other && o.suid && o.dev);
        assert_eq!(o.read_timeout, Duration::from_millis(2500));
        assert_eq!(o.threads, 8);
        assert!(o.apply("rw").unwrap_err().to_string().contains("read-only"));
        assert!(o.apply("bogus").is_err());
        assert!(o.apply("read_timeout=0").is_err());
    }

    #[test]
    fn device_numbers() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x120_0834);
    }
}
