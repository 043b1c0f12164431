//! The view a mount serves, which may still be opening: a mount of an image with layers that
//! have no usable index is made at once, while those layers stream (`daemon::serve`), and its
//! requests wait here until the merged tree exists.
//!
//! Why a request waits for every layer and not for the part of a layer it needs: a layer
//! without an index is vouched for only by its digest and diff_id, which cover the whole blob,
//! so no byte of it (file data, names or metadata) is known to be the publisher's until its
//! stream has ended and matched both; and a name's place in the merged tree depends on every
//! layer above it. Waiting blocks the dispatch thread that read the request (nothing else
//! could be answered meanwhile); the root's attributes are answered at once, with no caching,
//! so the mount can be probed.

use std::sync::{Arc, Condvar, Mutex};

use fuser::Errno;

use crate::fs::ImageView;

/// What a mount serves once its view is open.
pub(super) struct Served {
    pub view: Arc<ImageView>,
    /// (4 KiB blocks, inodes) of the tree, for statfs: the tree never changes.
    pub statfs: (u64, u64),
}

enum State {
    Opening,
    Ready(Arc<Served>),
    Failed(String),
}

/// A mount's view: opening, open, or failed to open (every request then fails with EIO).
pub struct ViewSlot {
    state: Mutex<State>,
    changed: Condvar,
    /// Whether the failure was logged (once, not per request).
    told: std::sync::atomic::AtomicBool,
}

impl ViewSlot {
    /// A slot whose view is still opening ([`ViewSlot::set`] or [`ViewSlot::fail`] follow).
    pub fn opening() -> Arc<ViewSlot> {
        Arc::new(ViewSlot {
            state: Mutex::new(State::Opening),
            changed: Condvar::new(),
            told: Default::default(),
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
        *self.state.lock().unwrap() = State::Ready(Arc::new(Served { view, statfs }));
        self.changed.notify_all();
    }

    /// The view will not open (`why`, logged at the first request after): requests fail
    /// with EIO. Does nothing to a view already open.
    pub fn fail(&self, why: String) {
        let mut state = self.state.lock().unwrap();
        if matches!(*state, State::Opening) {
            *state = State::Failed(why);
            self.changed.notify_all();
        }
    }

    /// The view, if it is open (never waits).
    pub fn view(&self) -> Option<Arc<ImageView>> {
        match &*self.state.lock().unwrap() {
            State::Ready(s) => Some(s.view.clone()),
            _ => None,
        }
    }

    /// Whether the view is still opening.
    pub fn is_opening(&self) -> bool {
        matches!(*self.state.lock().unwrap(), State::Opening)
    }

    /// The view, waiting while it opens; EIO if it failed to.
    pub(super) fn wait(&self) -> Result<Arc<Served>, Errno> {
        let mut state = self.state.lock().unwrap();
        loop {
            match &*state {
                State::Ready(s) => return Ok(s.clone()),
                State::Failed(why) => {
                    use std::sync::atomic::Ordering;
                    if !self.told.swap(true, Ordering::Relaxed) {
                        tracing::error!("every request fails with EIO: the mount's layers could not be opened: {why}");
                    }
                    return Err(Errno::EIO);
                }
                State::Opening => state = self.changed.wait(state).unwrap(),
            }
        }
    }
}
