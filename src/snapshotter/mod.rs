//! The containerd remote snapshotter: containerd's snapshots service
//! (`containerd.services.snapshots.v1.Snapshots`) over gRPC on a unix socket, for
//! `[proxy_plugins.NAME] type = "snapshot"`. The last stage of the pipeline, beside [`crate::fuse`]:
//! it presents pulled images' layer chains to containerd as snapshots.
//!
//! Contract:
//! - Ordinary snapshots behave like containerd's overlayfs snapshotter: an active snapshot is an
//!   `fs` (upper) and `work` directory under `<root>/snapshotter/snapshots/<id>/`, mounted as a
//!   bind mount without parents, else as overlayfs over its parents' directories; views are
//!   read-only; commit turns an active snapshot into a parent for others.
//! - **Remote (lazy) snapshots**: a `Prepare` that carries `containerd.io/snapshot.ref` (the
//!   target ChainID) for a layer stratafs can serve ([`resolve`]) creates a committed snapshot
//!   named after the target, backed by a stratafs FUSE mount of that whole chain, and answers
//!   ALREADY_EXISTS, so containerd neither downloads nor unpacks the layer. Mounts of snapshots
//!   above it use that mount as their lowest lower directory (the merged chain) — one FUSE
//!   mount per image in practice, mounted when first needed ([`Mounter`]).
//! - Lazy layers stack only on lazy layers: once one layer of a chain falls back to the
//!   ordinary path (a media type stratafs cannot serve lazily, or an image it cannot find), the
//!   layers above it do too.
//! - Metadata is durable ([`meta`]): after a restart every snapshot is still there and lazy
//!   mounts are made again when needed; the FUSE daemons themselves are separate processes and
//!   outlive the snapshotter, so running containers keep their root filesystems.
//!
//! gRPC stack: tonic + prost, with our own `snapshots.proto` compiled by `protox` at build time
//! (no `protoc` needed); see docs/snapshotter.md for why.

pub mod ahead;
pub mod daemons;
pub mod filter;
mod grpc;
pub mod meta;
pub mod resolve;
pub mod service;
#[cfg(test)]
mod tests;

use std::path::Path;

use thiserror::Error;

/// The generated gRPC types and server for containerd's snapshots service.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("containerd.services.snapshots.v1");
}

pub use grpc::serve;
pub use service::Snapshotter;

/// Errors of the snapshotter; each maps onto the gRPC code containerd expects.
#[derive(Debug, Error)]
pub enum SnapshotterError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid filter {0:?}: {1}")]
    Filter(String, String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error("lazy layer {0}: {1}")]
    Mount(String, #[source] MounterError),
}

impl From<SnapshotterError> for tonic::Status {
    fn from(e: SnapshotterError) -> tonic::Status {
        use SnapshotterError::*;
        let message = e.to_string();
        match e {
            NotFound(_) => tonic::Status::not_found(message),
            AlreadyExists(_) => tonic::Status::already_exists(message),
            FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            InvalidArgument(_) | Filter(..) => tonic::Status::invalid_argument(message),
            Io(..) | Corrupt(_) | Mount(..) => tonic::Status::internal(message),
        }
    }
}

/// A lazy mount that could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum MounterError {
    #[error("starting the mount daemon: {0}")]
    Start(#[source] std::io::Error),
    /// What the mount daemon or `umount` reported.
    #[error("{0}")]
    Failed(String),
}

/// Makes, probes and removes the FUSE mounts behind lazy snapshots. [`daemons::DaemonMounter`]
/// implements it by starting `stratafs mount --chain` daemons, which outlive the snapshotter
/// process.
pub trait Mounter: Send + Sync + 'static {
    /// Mounts chain `chain_id` of the stored image `image` read-only at `dir`, for use as a
    /// container's lower layer, and returns once the mount answers.
    fn mount(&self, image: &str, chain_id: &str, dir: &Path) -> Result<(), MounterError>;
    /// Unmounts `dir` (its daemon exits).
    fn unmount(&self, dir: &Path) -> Result<(), MounterError>;
    /// Whether `dir` holds a live lazy mount, a dead one, or none. Blocking: it may ask the
    /// mount's daemon.
    fn state(&self, dir: &Path) -> crate::fuse::MountState;
    /// Detaches whatever is mounted at `dir`, dead or busy.
    fn detach(&self, dir: &Path);
}
