//! The snapshotter as a process (`stratafs snapshotter`): lazy snapshots are mounted by
//! `stratafs mount --chain` daemons ([`DaemonMounter`]) — separate processes in their own
//! sessions, so they (and the containers using them) outlive a restart of the snapshotter —
//! and its metrics endpoint serves its own metrics merged with those of the daemons it started.
//! The snapshotter logs to stderr.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::ahead::Ahead;
use super::resolve::Resolver;
use super::{Mounter, MounterError, Snapshotter, SnapshotterError};
use crate::context::Context;
use crate::fuse::MountState;
use crate::image::Platform;
use crate::metrics;

/// Options of the snapshotter's lazy mounts: a container rootfs needs setuid programs and
/// device nodes, and processes of any user in the container must reach the files.
pub const LAZY_MOUNT_OPTIONS: &str = "suid,dev,allow_other";

/// Starts `stratafs mount --chain` daemons for lazy snapshots.
pub struct DaemonMounter {
    pub root: PathBuf,
    pub config: Option<PathBuf>,
    pub log_level: String,
    pub plain_http: bool,
    /// Whether each daemon serves metrics (on a loopback port it picks) for the
    /// snapshotter's endpoint to gather.
    pub metrics: bool,
}

impl DaemonMounter {
    /// The arguments of `stratafs … mount` for the chain `chain_id` of `image` at `dir`.
    pub(crate) fn mount_args(&self, image: &str, chain_id: &str, dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--root".into(), self.root.clone().into()];
        args.extend(["--log-level".into(), self.log_level.clone().into()]);
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.into()]);
        }
        args.extend(["mount", "--chain", chain_id, "-o", LAZY_MOUNT_OPTIONS].map(Into::into));
        if self.plain_http {
            args.push("--plain-http".into());
        }
        if self.metrics {
            args.extend(["--metrics-address", "127.0.0.1:0"].map(Into::into));
        }
        args.extend([image.into(), dir.into()]);
        args
    }
}

impl Mounter for DaemonMounter {
    fn mount(&self, image: &str, chain_id: &str, dir: &Path) -> Result<(), MounterError> {
        let exe = std::env::current_exe().map_err(MounterError::Start)?;
        let mut cmd = Command::new(exe);
        cmd.args(self.mount_args(image, chain_id, dir));
        let out = cmd.output().map_err(MounterError::Start)?;
        if out.status.success() {
            tracing::info!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
            Ok(())
        } else {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(MounterError::Failed(said))
        }
    }

    fn unmount(&self, dir: &Path) -> Result<(), MounterError> {
        crate::daemon::control::umount(&self.root, dir, false, &mut |_| {})
            .map(|_| ())
            .map_err(|e| MounterError::Failed(e.to_string()))
    }

    fn state(&self, dir: &Path) -> MountState {
        crate::daemon::mount_state(&self.root, dir)
    }

    fn detach(&self, dir: &Path) {
        let _ = crate::fuse::unmount(dir, true);
    }
}

/// Serves the snapshotter's metrics merged with those of the mount daemons it started (each
/// scraped at its loopback address, from its mount record, when the endpoint is scraped).
fn serve_metrics(
    addr: &str,
    root: PathBuf,
    ctx: &Context,
) -> std::io::Result<std::net::SocketAddr> {
    let (chunks, cap) = (ctx.chunks.clone(), ctx.cache_cap);
    let render = Arc::new(move || {
        let own = metrics::metrics();
        if let Some(bytes) = chunks.usage_bytes() {
            own.cache_bytes.set(bytes as i64);
        }
        own.cache_cap_bytes.set(cap as i64);
        let mut texts = vec![own.encode()];
        for record in crate::daemon::mounts(&root) {
            let Some(daemon) = record.metrics else {
                continue;
            };
            match metrics::scrape(&daemon, Duration::from_secs(2)) {
                Ok(text) => texts.push(text),
                Err(e) => tracing::warn!(
                    mountpoint = %record.mountpoint.display(),
                    error = %e,
                    "cannot gather the metrics of a lazy mount"
                ),
            }
        }
        metrics::merge(&texts)
    });
    metrics::serve_text(addr, render)
}

pub struct SnapshotterArgs {
    pub address: PathBuf,
    pub platform: Option<String>,
    pub plain_http: bool,
    /// Serve Prometheus metrics (the snapshotter's and its mounts') at this address.
    pub metrics_address: Option<String>,
}

/// Why the snapshotter could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Platform(#[from] crate::image::PlatformError),
    #[error("opening the snapshotter state: {0}")]
    Open(#[source] SnapshotterError),
    #[error("serving on {}: {source}", .address.display())]
    Serve {
        address: PathBuf,
        #[source]
        source: SnapshotterError,
    },
}

/// Runs the snapshotter (`stratafs snapshotter`): opens its state, recovers its lazy mounts in
/// the background, and serves on `args.address` until SIGTERM or SIGINT (the lazy mounts stay).
pub async fn run(
    ctx: Context,
    config_path: Option<&Path>,
    log_level: &str,
    args: SnapshotterArgs,
) -> Result<(), RunError> {
    let io = |what: String| move |source| RunError::Io { what, source };
    let root = std::path::absolute(ctx.store.root()).map_err(io(ctx
        .store
        .root()
        .display()
        .to_string()))?;
    let config = match config_path {
        Some(c) => Some(std::path::absolute(c).map_err(io(c.display().to_string()))?),
        None => None,
    };
    let mounter = Arc::new(DaemonMounter {
        root: root.clone(),
        config,
        log_level: log_level.to_string(),
        plain_http: args.plain_http,
        metrics: args.metrics_address.is_some(),
    });
    let resolver = Resolver {
        store: ctx.store.clone(),
        client: ctx.client.clone(),
        index: ctx.config.index.clone(),
        platform: match &args.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        },
        pass_budget: ctx.layers.cache().pass_budget(),
        ahead: Some(Arc::new(Ahead::new(
            root.clone(),
            ctx.client.clone(),
            ctx.layers.cache().clone(),
            ctx.config.index.clone(),
        ))),
    };
    let snapshotter =
        Arc::new(Snapshotter::open(resolver, mounter, ctx.chunks.clone()).map_err(RunError::Open)?);
    // After the store's lock is taken: a second snapshotter says so, not "port in use".
    let metrics = match &args.metrics_address {
        Some(addr) => {
            let bound = serve_metrics(addr, root, &ctx)
                .map_err(io(format!("serving metrics at {addr}")))?;
            format!(", metrics at http://{bound}/metrics")
        }
        None => String::new(),
    };
    let recovering = snapshotter.clone();
    tokio::spawn(async move { recovering.recover().await });
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("signalled: stopping (lazy mounts stay)");
    };
    eprintln!(
        "stratafs snapshotter listening on {} (store {}){metrics}",
        args.address.display(),
        ctx.store.root().display()
    );
    super::serve(snapshotter, &args.address, shutdown)
        .await
        .map_err(|source| RunError::Serve {
            address: args.address.clone(),
            source,
        })?;
    let _ = std::fs::remove_file(&args.address);
    Ok(())
}
