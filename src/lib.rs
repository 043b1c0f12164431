//! stratafs: a lazy container-image filesystem.
//!
//! The pipeline, stage by stage (each module's docs state its contract):
//!
//! 1. [`reference`] — parse and normalise image names (`alpine` → `docker.io/library/alpine:latest`).
//! 2. [`registry`] — the only module that speaks HTTP: resolve tags, fetch manifests, configs and
//!    blob ranges, with mirrors, authentication, retries and digest verification. Later stages
//!    reach it through the [`registry::Registry`] seam (an in-process fake for unit tests).
//! 3. [`store`] — metadata on disk: a content store by digest, the image store (name → record)
//!    and ChainID records, all written crash-safely.
//! 4. [`layer`] — per-layer index of where each file's bytes live in the blob (tar entries,
//!    spans with digests, gzip checkpoints), and lazy reads by span. Blobs are reached through
//!    the [`source::BlobSource`] seam.
//! 5. [`cache`] — verified chunks on disk plus an in-memory LRU, single-flight, size-capped.
//! 6. [`tree`] — the merged view of a chain of layers with OCI overlay semantics.
//! 7. [`fs`] — filesystem logic over a pulled image (no FUSE types).
//! 8. [`fuse`] — the thin FUSE adapter that mounts an [`fs::ImageView`], and [`snapshotter`] —
//!    containerd's snapshots service over gRPC, presenting lazily served layer chains (through
//!    FUSE mounts) and ordinary overlayfs snapshots to containerd.
//!
//! [`pull`] ties stages 1–3 together: it resolves a reference, picks the platform, verifies and
//! stores manifests and config, computes ChainIDs — and downloads no layer data. [`publish`]
//! shares layer indexes through the registry as OCI referrers.
//! [`profile`] records what a workload reads first and replays it on the next cold start.
//! [`context`] assembles the pipeline from the configuration (store, registry client, cache,
//! layer access) for a command or a daemon. [`daemon`] is the lifecycle of a mount's
//! processes: the serving process, the record it keeps, the holder that keeps a mount's
//! FUSE connection open across crashes and upgrades of the serving process, and the control
//! side (`mount`, `umount`, `upgrade`) the binary and the snapshotter use.
//! [`metrics`] exports what every stage did for Prometheus; [`status`] reports what the cache
//! holds per layer; [`report`] renders every command's report for people.
//! [`cli`] is the command line's grammar (the binary parses with it and prints).
//! Shared vocabulary lives in [`image`] (media types, platforms, layer records, ChainIDs),
//! [`digest`] and [`config`] (the configuration file).

pub mod cache;
pub mod cli;
pub mod config;
pub mod context;
pub mod daemon;
pub mod digest;
pub mod fs;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod metrics;
pub mod prefetch;
pub mod profile;
pub mod publish;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod report;
pub mod snapshotter;
pub mod source;
pub mod status;
pub mod store;
pub mod tree;
