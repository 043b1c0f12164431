//! The gRPC face of [`Snapshotter`]: containerd's `Snapshots` service on a unix socket. Only
//! conversion between the wire types and the service's, and error logging.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::meta::{Kind, Snapshot};
use super::proto::{self, snapshots_server};
use super::service::Snapshotter;
use super::SnapshotterError;

type Result<T> = std::result::Result<T, SnapshotterError>;

fn timestamp(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn info(s: &Snapshot) -> proto::Info {
    proto::Info {
        name: s.name.clone(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => proto::Kind::View,
            Kind::Active => proto::Kind::Active,
            Kind::Committed => proto::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

/// Serves one call: awaits `call`'s work, logs (at debug) the time it took, and logs its error
/// (at debug for a missing or existing snapshot, which containerd asks about routinely).
async fn served<T>(
    call: &str,
    key: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> std::result::Result<T, Status> {
    let started = std::time::Instant::now();
    let r = work.await;
    let ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0);
    tracing::debug!(call, key, ms, "served");
    r.map_err(|e| {
        match &e {
            SnapshotterError::NotFound(_) | SnapshotterError::AlreadyExists(_) => {
                tracing::debug!(call, key, error = %e)
            }
            _ => tracing::warn!(call, key, error = %e),
        }
        e.into()
    })
}

type ListStream = Pin<
    Box<
        dyn tokio_stream::Stream<Item = std::result::Result<proto::ListSnapshotsResponse, Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl snapshots_server::Snapshots for Snapshotter {
    async fn prepare(
        &self,
        r: Request<proto::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<proto::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = served(
            "prepare",
            &r.key,
            self.create(Kind::Active, &r.key, &r.parent, r.labels),
        )
        .await?;
        Ok(Response::new(proto::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<proto::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<proto::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = served(
            "view",
            &r.key,
            self.create(Kind::View, &r.key, &r.parent, r.labels),
        )
        .await?;
        Ok(Response::new(proto::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<proto::MountsRequest>,
    ) -> std::result::Result<Response<proto::MountsResponse>, Status> {
        let r = r.into_inner();
        let mounts = served("mounts", &r.key, Snapshotter::mounts(self, &r.key)).await?;
        Ok(Response::new(proto::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        r: Request<proto::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = r.into_inner();
        // Measures the snapshot's disk usage and writes the metadata (fsync): off the worker.
        served("commit", &r.key, async {
            crate::cache::blocking(|| Snapshotter::commit(self, &r.name, &r.key, r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        r: Request<proto::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = r.into_inner();
        served("remove", &r.key, Snapshotter::remove(self, &r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<proto::StatSnapshotRequest>,
    ) -> std::result::Result<Response<proto::StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = served("stat", &r.key, async { Snapshotter::stat(self, &r.key) }).await?;
        Ok(Response::new(proto::StatSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    async fn update(
        &self,
        r: Request<proto::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<proto::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = served("update", &i.name, async {
            crate::cache::blocking(|| Snapshotter::update(self, &i.name, i.labels, &paths))
        })
        .await?;
        Ok(Response::new(proto::UpdateSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<proto::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<ListStream>, Status> {
        let r = r.into_inner();
        let all = served("list", "", async { Snapshotter::list(self, &r.filters) }).await?;
        let batches: Vec<_> = all
            .chunks(100)
            .map(|c| {
                Ok(proto::ListSnapshotsResponse {
                    info: c.iter().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<proto::UsageRequest>,
    ) -> std::result::Result<Response<proto::UsageResponse>, Status> {
        let r = r.into_inner();
        let u = served("usage", &r.key, Snapshotter::usage(self, &r.key)).await?;
        Ok(Response::new(proto::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _r: Request<proto::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        served("cleanup", "", Snapshotter::cleanup(self)).await?;
        Ok(Response::new(()))
    }
}

/// Serves `snapshotter` on the unix socket `address` (replacing a stale socket file) until
/// `shutdown` completes.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::result::Result<(), SnapshotterError> {
    let io = |e: std::io::Error| SnapshotterError::Io(address.display().to_string(), e);
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A socket someone answers on is not ours to take over (a snapshotter of another store,
    // or anything else): refuse, naming the process. A stale one (nobody listening) goes.
    match std::os::unix::net::UnixStream::connect(address) {
        Ok(peer) => {
            let creds = nix::sys::socket::sockopt::PeerCredentials;
            let pid = nix::sys::socket::getsockopt(&peer, creds)
                .map(|c| c.pid().to_string())
                .unwrap_or_else(|_| "unknown".into());
            return Err(SnapshotterError::FailedPrecondition(format!(
                "{} is in use (pid {pid} answers on it): stop that process, or give another --address",
                address.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Nobody listens: a socket file left by a process that died.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(address).map_err(io)?
        }
        // Anything else (no permission, not a socket, …): not ours to remove.
        Err(e) => return Err(io(e)),
    }
    let listener = tokio::net::UnixListener::bind(address).map_err(io)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(snapshots_server::SnapshotsServer::from_arc(snapshotter))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| SnapshotterError::Io(address.display().to_string(), std::io::Error::other(e)))
}
