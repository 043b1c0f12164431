//! How each inode is open: all its handles through the daemon, or all passthrough to one
//! backing file (the kernel wants one mode per inode), recorded for a process taking over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, INodeNo, ReplyOpen};

use super::{OpenLog, OpenMode};

/// Answers the open of an inode with no open handles in this process (unless one came
/// meanwhile: then this open follows its mode), through the daemon or, with `backing`,
/// passthrough; the mode is recorded for a process taking over.
pub(super) fn first_open(
    opens: &Mutex<HashMap<u64, Opens>>,
    log: &Option<Arc<OpenLog>>,
    ino: INodeNo,
    fh: FileHandle,
    reply: ReplyOpen,
    backing: Option<(BackingId, u32)>,
) {
    let mut opens = opens.lock().unwrap();
    if let Some(o) = opens.get_mut(&ino.0) {
        return o.join(reply, fh);
    }
    let (backing, mode) = match backing {
        Some((b, raw)) => (Some(b), OpenMode::Passthrough(raw)),
        None => (None, OpenMode::Cached),
    };
    if let Some(log) = log {
        log.record(ino.0, Some(mode));
    }
    Opens::first(backing, false).answer(&mut opens, ino, reply, fh);
}

/// Records the first open of an inode, through the daemon, whose answer (and those of the
/// opens that come meanwhile) waits for [`opened`]; gives `reply` back to be answered then.
/// `None` if another open of the inode came first: this one follows it (answered, or waiting
/// with it), and nothing is to be stored.
pub(super) fn start_open(
    opens: &Mutex<HashMap<u64, Opens>>,
    log: &Option<Arc<OpenLog>>,
    ino: INodeNo,
    fh: FileHandle,
    reply: ReplyOpen,
) -> Option<ReplyOpen> {
    let mut opens = opens.lock().unwrap();
    if let Some(o) = opens.get_mut(&ino.0) {
        o.join(reply, fh);
        return None;
    }
    if let Some(log) = log {
        log.record(ino.0, Some(OpenMode::Cached));
    }
    let first = Opens {
        waiting: Some(Vec::new()),
        ..Opens::first(None, false)
    };
    opens.insert(ino.0, first);
    Some(reply)
}

/// Answers the open [`start_open`] recorded, and the opens that waited for it.
pub(super) fn opened(
    opens: &Mutex<HashMap<u64, Opens>>,
    ino: INodeNo,
    fh: FileHandle,
    reply: ReplyOpen,
) {
    let waiting = opens
        .lock()
        .unwrap()
        .get_mut(&ino.0)
        .and_then(|o| o.waiting.take())
        .unwrap_or_default();
    for (reply, fh) in std::iter::once((reply, fh)).chain(waiting) {
        reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
    }
}

/// The open handles of one inode and, when they are passthrough, their backing file.
pub(super) struct Opens {
    pub(super) count: u32,
    pub(super) backing: Option<BackingId>,
    /// Inherited from the process that served before: files it opened may still use the
    /// backing id, and their number is unknown, so it is never closed.
    pub(super) keep: bool,
    /// While the first open hands the file to the page cache: the opens that came meanwhile,
    /// answered with it.
    pub(super) waiting: Option<Vec<(ReplyOpen, FileHandle)>>,
}

impl Opens {
    /// The first open of an inode, answered at once: through the daemon or, with `backing`,
    /// passthrough; `keep` as the field says.
    pub(super) fn first(backing: Option<BackingId>, keep: bool) -> Opens {
        Opens {
            count: 1,
            backing,
            keep,
            waiting: None,
        }
    }

    /// Another open of the inode: answered in this entry's mode, or, while the first open
    /// hands the file to the page cache, with it.
    pub(super) fn join(&mut self, reply: ReplyOpen, fh: FileHandle) {
        self.count += 1;
        match &mut self.waiting {
            Some(waiting) => waiting.push((reply, fh)),
            None => self.reply(reply, fh),
        }
    }

    /// Answers the open this entry records, and keeps it for the inode's later opens.
    pub(super) fn answer(
        self,
        opens: &mut HashMap<u64, Opens>,
        ino: INodeNo,
        reply: ReplyOpen,
        fh: FileHandle,
    ) {
        self.reply(reply, fh);
        opens.insert(ino.0, self);
    }

    pub(super) fn reply(&self, reply: ReplyOpen, fh: FileHandle) {
        match &self.backing {
            // Passthrough allows no caching flags: the kernel caches the backing file itself.
            Some(id) => reply.opened_passthrough(fh, FopenFlags::empty(), id),
            None => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
        }
    }
}
