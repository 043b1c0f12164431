//! The view a mount serves, which may still be opening: a mount of an image with layers that
//! have no usable index is made at once, while those layers stream (`daemon::serve`), and its
//! requests wait here until the merged tree exists.
//!
//! Why a request waits for every layer and not for the part of a layer it needs: a layer
//! without an index is vouched for only by its digest and diff_id, which cover the whole blob,
//! so no byte of it (file data, names or metadata) is known to be the publisher's until its
//! stream has ended and matched both; and a name's place in the merged tree depends on every
//! layer above it. Waiting blocks the dispatch thread that read the request (nothing else
//! could be answered meanwhile, nor the kernel's word that the mount is gone: the serving
//! process watches the mount table for that while the view opens, and ends the slot); the
//! root's attributes are answered at once, with no caching, so the mount can be probed.
//!
//! An open that fails (a registry error past its retries, a layer that does not match its
//! digest) fails the requests waiting for it with EIO, and those of the next
//! [`RETRY_AFTER`]; a request after that asks for another open ([`ViewSlot::retry_wanted`])
//! and waits for it, as a read after a failed fetch waits for the registry again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fuser::Errno;

use crate::fs::ImageView;

/// What a mount serves once its view is open.
pub(super) struct Served {
    pub view: Arc<ImageView>,
    /// (4 KiB blocks, inodes) of the tree, for statfs: the tree never changes.
    pub statfs: (u64, u64),
}

/// How long after a failed open requests fail at once, before one asks for another open.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

enum State {
    Opening,
    /// [`ViewSlot::served`] is set, for good.
    Ready,
    Failed {
        why: String,
        at: Instant,
    },
    /// The mount is ending: requests fail, and no open is tried again.
    Ended,
}

/// A mount's view: opening, open, or failed to open (every request then fails with EIO).
pub struct ViewSlot {
    /// The view once open: read without a lock by every request from then on.
    served: OnceLock<Served>,
    state: Mutex<State>,
    changed: Condvar,
    /// Whether the last failure was logged (once, not per request).
    told: AtomicBool,
    /// A request asked for another open after a failure.
    retry: tokio::sync::Notify,
}

impl ViewSlot {
    /// A slot whose view is still opening ([`ViewSlot::set`] or [`ViewSlot::fail`] follow).
    pub fn opening() -> Arc<ViewSlot> {
        Arc::new(ViewSlot {
            served: OnceLock::new(),
            state: Mutex::new(State::Opening),
            changed: Condvar::new(),
            told: Default::default(),
            retry: tokio::sync::Notify::new(),
        })
    }

    /// A slot serving `view` from the start.
    pub fn ready(view: Arc<ImageView>) -> Arc<ViewSlot> {
        let slot = ViewSlot::opening();
        slot.set(view);
        slot
    }

    /// The view is open: requests waiting for it go on.
    pub fn set(&self, view: Arc<ImageView>) {
        let tree = &view.tree;
        let blocks = tree
            .walk()
            .into_iter()
            .map(|id| tree.node(id).size.div_ceil(4096))
            .sum();
        let statfs = (blocks, tree.inodes() as u64);
        let mut state = self.state.lock().unwrap();
        if self.served.set(Served { view, statfs }).is_ok() {
            *state = State::Ready;
            self.changed.notify_all();
        }
    }

    /// The open failed (`why`, logged at the first request after): requests fail with EIO
    /// until one asks for another open. Does nothing to a view already open.
    pub fn fail(&self, why: String) {
        let mut state = self.state.lock().unwrap();
        if matches!(*state, State::Opening) {
            *state = State::Failed {
                why,
                at: Instant::now(),
            };
            self.told.store(false, Ordering::Relaxed);
            self.changed.notify_all();
        }
    }

    /// The mount ends: requests waiting for a view that is not open fail, and so do later
    /// ones. Does nothing to a view already open.
    pub fn end(&self) {
        let mut state = self.state.lock().unwrap();
        if !matches!(*state, State::Ready) {
            *state = State::Ended;
            self.changed.notify_all();
        }
    }

    /// Returns once a request asks for another open after a failure (the slot is opening
    /// again by then).
    pub async fn retry_wanted(&self) {
        self.retry.notified().await
    }

    /// The view, if it is open (never waits).
    pub fn view(&self) -> Option<Arc<ImageView>> {
        self.served.get().map(|s| s.view.clone())
    }

    /// Whether the view is still opening.
    pub fn is_opening(&self) -> bool {
        self.served.get().is_none() && matches!(*self.state.lock().unwrap(), State::Opening)
    }

    /// The view, waiting while it opens; EIO if it failed to. Once open, no lock is taken.
    pub(super) fn wait(&self) -> Result<&Served, Errno> {
        if let Some(s) = self.served.get() {
            return Ok(s);
        }
        let mut state = self.state.lock().unwrap();
        loop {
            match &*state {
                State::Ready => return Ok(self.served.get().expect("set before Ready")),
                State::Failed { at, .. } if at.elapsed() >= RETRY_AFTER => {
                    tracing::info!("a request after a failed open: opening the layers again");
                    *state = State::Opening;
                    self.retry.notify_one();
                }
                State::Failed { why, .. } => {
                    if !self.told.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            "requests fail with EIO: the mount's layers could not be opened: {why}"
                        );
                    }
                    return Err(Errno::EIO);
                }
                State::Ended => return Err(Errno::EIO),
                State::Opening => state = self.changed.wait(state).unwrap(),
            }
        }
    }
}
