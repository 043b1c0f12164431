//! The serving process of a mount: opens the image, mounts it — or takes over a mount whose
//! previous serving process died ([`super::holder`]) — records itself, tells the waiting CLI
//! and the holder it serves, and serves until the mount ends or a signal asks it to stop.
//!
//! Readiness, on stdout when `notify` is set (the CLI started the holder and waits on its
//! output): this process prints "progress FETCHED TOTAL" while layers without a usable index
//! are streamed; the holder prints "ready MESSAGE", which this process hands it with the
//! connection (or the caller prints "error: MESSAGE").

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::holder::Link;
use super::MountRecord;
use crate::context::{Context, ContextError};
use crate::fs::{FsError, ImageView};
use crate::fuse::{self, MountOptions};
use crate::image::Platform;

/// What the serving process serves, and how.
pub struct ServeArgs {
    pub reference: String,
    /// Resolve the image for this platform (else the stored record, or this machine's).
    pub platform: Option<Platform>,
    /// Mount only the chain with this ChainID (one of the image's layers and those below).
    pub chain: Option<String>,
    pub options: MountOptions,
    /// Serve Prometheus metrics at this address.
    pub metrics_address: Option<String>,
    /// Report progress and readiness on stdout.
    pub notify: bool,
    /// Fetch the rest of the image in the background (`None`: as configured).
    pub background: Option<bool>,
}

/// Why a serving process stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("{image} has no layer with ChainID {chain}")]
    NoChain { image: String, chain: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("serving metrics at {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the mount's open log {path}: {source}")]
    OpenLog {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fuse(#[from] fuse::FuseError),
    #[error("{0}: the new mount does not answer")]
    NoAnswer(std::path::PathBuf),
    #[error("{0}: the FUSE session failed")]
    Session(std::path::PathBuf),
}

/// A daemon allocates and frees many span-sized buffers (up to a few MiB) from many threads.
/// glibc raises its mmap threshold after such a buffer is freed, so later ones come from the
/// per-thread heaps, which keep the memory: a cold import peaked at 93 MiB. With the threshold
/// fixed at 256 KiB, large buffers are mapped and returned on free: 56 MiB, same speed
/// (docs/benchmarks.md). Smaller buffers still come from the heaps, one per thread that
/// allocates at once (up to 8 per core): two heaps keep what fragmentation holds bounded.
pub fn keep_large_buffers_off_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before the daemon's threads
    // allocate span buffers, and any value is safe for glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The image and how many of its layers are mounted (`--chain`).
async fn open_image(
    ctx: &Context,
    args: &ServeArgs,
) -> Result<(crate::image::ImageRecord, usize), ServeError> {
    // A chain mount (the snapshotter's) may open fewer layers than the manifest's first ones.
    let image = match &args.chain {
        None => {
            ctx.image_to_open(&args.reference, args.platform.as_ref())
                .await?
        }
        Some(_) => ctx.image(&args.reference, args.platform.as_ref()).await?,
    };
    let count = match &args.chain {
        None => image.layers.len(),
        Some(chain) => {
            image
                .layers
                .iter()
                .position(|l| l.chain_id.as_ref() == chain.as_str())
                .ok_or_else(|| ServeError::NoChain {
                    image: image.name.clone(),
                    chain: chain.clone(),
                })?
                + 1
        }
    };
    Ok((image, count))
}

/// Serves Prometheus metrics for the view of `slot` (once open) at `--metrics-address`, if
/// given: the bound address.
fn serve_metrics(
    ctx: &Context,
    args: &ServeArgs,
    slot: Arc<fuse::ViewSlot>,
) -> Result<Option<String>, ServeError> {
    let Some(addr) = &args.metrics_address else {
        return Ok(None);
    };
    let (chunks, cap) = (ctx.chunks.clone(), ctx.cache_cap);
    let collect: crate::metrics::Collector = Arc::new(move |m| {
        if let Some(view) = slot.view() {
            for r in view.readers() {
                let index = r.index();
                m.layer(index.blob.as_ref(), index.size, r.cached_bytes());
            }
        }
        if let Some(bytes) = chunks.usage_bytes() {
            m.cache_bytes.set(bytes as i64);
        }
        m.cache_cap_bytes.set(cap as i64);
    });
    let bound = crate::metrics::serve(addr, collect).map_err(|source| ServeError::Metrics {
        addr: addr.clone(),
        source,
    })?;
    Ok(Some(bound.to_string()))
}

/// Opens the view of `image`'s first `count` layers, telling the waiting parent how far the
/// streaming of layers without a usable index has come (a published index that cannot be
/// fetched falls back to streaming).
async fn open_reporting(
    ctx: &Context,
    args: &ServeArgs,
    image: &crate::image::ImageRecord,
    count: usize,
) -> Result<Arc<ImageView>, ServeError> {
    let reporter = args.notify.then(|| {
        let meter = ctx.layers.fetch_meter();
        let start = meter.total();
        let total: u64 = image.layers[..count].iter().map(|l| l.size).sum();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            every.tick().await; // the first tick is immediate: nothing to say yet
            loop {
                every.tick().await;
                println!("progress {} {total}", meter.total().saturating_sub(start));
            }
        })
    });
    let opened = ImageView::open_chain(&ctx.layers, image, count).await;
    if let Some(r) = reporter {
        r.abort();
    }
    Ok(Arc::new(opened?))
}

/// Sets an open view going (neighbours, imports as configured) and starts its startup
/// profile's replay and recording — or, with no profile to replay, the fetch of the program
/// the image's config says runs first ([`ImageView::fetch_program`]): the workload's reads
/// come next. The user and group databases a runtime reads first are fetched either way,
/// their requests started first, beside the replay's ([`ImageView::fetch_user_databases`]).
fn start_view(
    ctx: &Context,
    image: &crate::image::ImageRecord,
    chain: Option<&oci_spec::image::Digest>,
    view: &Arc<ImageView>,
    early: Option<crate::profile::EarlyProfile>,
) -> Option<crate::profile::Session> {
    view.fetch_neighbours();
    view.follow_imports(ctx.config.mount.follow_imports);
    chain.map(|chain| {
        let otherwise = start_fetch(ctx, image, chain, view);
        crate::profile::Session::start(
            view.clone(),
            image,
            chain,
            &ctx.store,
            ctx.client.clone(),
            &profile_settings(ctx),
            early,
            otherwise,
        )
    })
}

/// The fetch of the program a container of `image` runs first, for a view of its whole
/// rootfs (`chain` its top ChainID) with `[mount] fetch_start` and `open_prefetch` on; the
/// user and group databases' fetch starts now.
fn start_fetch(
    ctx: &Context,
    image: &crate::image::ImageRecord,
    chain: &oci_spec::image::Digest,
    view: &Arc<ImageView>,
) -> Option<futures_util::future::BoxFuture<'static, ()>> {
    let m = &ctx.config.mount;
    if !m.fetch_start || m.open_prefetch == 0 || image.chain_id() != Some(chain) {
        return None;
    }
    let databases = view.clone();
    tokio::spawn(
        async move { databases.fetch_user_databases().await }
            .instrument(tracing::debug_span!("start")),
    );
    let (view, limit, store) = (view.clone(), m.open_prefetch, ctx.store.clone());
    let (name, config) = (image.name.clone(), image.config.digest.clone());
    Some(Box::pin(async move {
        // A file read: off the runtime's workers.
        let read = tokio::task::spawn_blocking(move || store.content.get(&config)).await;
        let hints = match read {
            Ok(Ok(config)) => crate::fs::StartHints::from_config(&config),
            Ok(Err(e)) => {
                return tracing::debug!(image = %name, error = %e, "no config to say what runs first")
            }
            Err(_) => return,
        };
        view.fetch_program(&hints, limit)
            .instrument(tracing::debug_span!("start"))
            .await
    }))
}

/// Readies, in the background while the layers open, what this process's first reads from
/// `image`'s registry would otherwise wait for ([`RegistryClient::warm_up`]).
///
/// [`RegistryClient::warm_up`]: crate::registry::RegistryClient::warm_up
fn warm_up(ctx: &Context, image: &crate::image::ImageRecord) {
    let Ok(reference) = image.name.parse::<crate::reference::Reference>() else {
        return;
    };
    let (client, digest) = (ctx.client.clone(), image.manifest.digest.clone());
    tokio::spawn(async move {
        // Loading TLS roots reads files: off the runtime's workers.
        let (c, r) = (client.clone(), reference.clone());
        let _ = tokio::task::spawn_blocking(move || c.ready_clients(&r)).await;
        client.warm_up(&reference, &digest, WARM_CONNECTIONS).await
    });
}

/// Connections a serving process opens to its registry ahead of its first reads (over HTTP/2
/// the first one carries them all).
const WARM_CONNECTIONS: usize = 4;

fn profile_settings(ctx: &Context) -> crate::profile::MountProfile {
    let m = &ctx.config.mount;
    crate::profile::MountProfile {
        record: m.profile_record,
        replay: m.profile_replay,
        parallel: m.profile_parallel,
    }
}

/// The serving process of a new mount: open, mount, hand the connection to the holder, serve
/// until unmounted or signalled.
///
/// An image whose layers all have a usable index is opened first (indexes and TOCs fetched)
/// and mounted when its tree exists, so a failure is the mount's error. One with layers that
/// have none is mounted at once: those layers stream (in parallel) while the mount's
/// requests wait for the tree ([`fuse::ViewSlot`]); if they cannot be opened, requests fail
/// with EIO (the daemon's log says why) until a later one asks for another try.
pub async fn serve(
    ctx: Context,
    args: &ServeArgs,
    mountpoint: &Path,
    link: Link,
    mut signals: Signals,
) -> Result<(), ServeError> {
    let options = &args.options;
    keep_large_buffers_off_the_heap();
    let started = Instant::now();
    let (image, count) = open_image(&ctx, args).await?;
    let resolved = started.elapsed();
    // An image pulled earlier: this process has not spoken to its registry yet.
    if ctx.client.requests_sent() == 0 {
        warm_up(&ctx, &image);
    }
    let mounted_chain = image
        .layers
        .get(count.wrapping_sub(1))
        .map(|l| l.chain_id.clone());
    let streaming = image.layers[..count]
        .iter()
        .filter(|l| ctx.layers.streams(l))
        .count();
    // The profile the image pins is fetched beside the indexes, not after them.
    let mut early = mounted_chain.as_ref().and_then(|chain| {
        crate::profile::EarlyProfile::start(
            &image,
            chain,
            &ctx.store,
            ctx.client.clone(),
            &profile_settings(&ctx),
        )
    });
    let (slot, mut profile) = if streaming == 0 {
        let view = open_reporting(&ctx, args, &image, count).await?;
        tracing::debug!(
            "{}: image resolved in {} ms, layers open in {} ms",
            image.name,
            resolved.as_millis(),
            (started.elapsed() - resolved).as_millis()
        );
        // Replay starts as soon as the view is open, while the kernel mounts it. (A mount
        // that fails ends this process, replay and all.)
        let profile = start_view(&ctx, &image, mounted_chain.as_ref(), &view, early.take());
        (fuse::ViewSlot::ready(view), profile)
    } else {
        tracing::info!(image = %image.name, "{streaming} of {count} layers have no usable index: mounting at once; requests wait while they stream");
        (fuse::ViewSlot::opening(), None)
    };
    // The tree's fingerprint, for the mount's record: computed while the kernel mounts
    // (a hash of every node, some milliseconds), not after it answers.
    let fingerprint = slot
        .view()
        .map(|v| tokio::task::spawn_blocking(move || v.tree.fingerprint()));
    let metrics = serve_metrics(&ctx, args, slot.clone())?;
    let root = ctx.store.root().to_path_buf();
    let log_path = super::backing_log_path(&root, mountpoint);
    let backings = fuse::OpenLog::create(&log_path).map_err(|source| ServeError::OpenLog {
        path: log_path.clone(),
        source,
    })?;
    let mut mounted = fuse::mount(
        &image.name,
        slot.clone(),
        tokio::runtime::Handle::current(),
        mountpoint,
        options,
        Some(Arc::new(backings)),
    )?;
    // The mount answers once the kernel can stat its root through us.
    let probe = mountpoint.to_path_buf();
    let answered = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || std::fs::metadata(probe)),
    )
    .await;
    if !matches!(answered, Ok(Ok(Ok(_)))) {
        slot.end();
        let _ = fuse::unmount(mountpoint, true);
        mounted.join();
        return Err(ServeError::NoAnswer(mountpoint.to_path_buf()));
    }
    let mut record = MountRecord {
        mountpoint: mountpoint.to_path_buf(),
        image: image.name.clone(),
        chain_id: mounted_chain
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        pid: std::process::id(),
        layers: image.layers[..count]
            .iter()
            .map(|l| l.digest.to_string())
            .collect(),
        metrics: metrics.clone(),
        holder: Some(link.holder),
        passthrough: mounted.passthrough,
        // Empty while the layers stream: no inode but the root's has been handed out yet.
        tree: match fingerprint {
            Some(f) => f.await.expect("fingerprint task"),
            None => String::new(),
        },
        served: Some((image.clone(), count)),
    };
    let metrics = metrics
        .map(|a| format!(", metrics at http://{a}/metrics"))
        .unwrap_or_default();
    let what = match slot.view() {
        Some(view) => format!("{count} layers, {} inodes", view.tree.inodes()),
        None => format!(
            "{count} layers; {streaming} without an index stream now, and reads wait for them"
        ),
    };
    let message = format!(
        "mounted {} at {} ({what}) in {} ms{metrics} (serving pid {})",
        image.name,
        mountpoint.display(),
        started.elapsed().as_millis(),
        std::process::id()
    );
    tracing::info!("{message}");
    // The record first, so that whoever the ready line reaches (the CLI, and a script after
    // it: `cache stats`, `rmi`) finds the mount; then the holder gets the connection and says
    // the mount is ready — from there on a crash of this process is survived. A crash in
    // between leaves a record whose processes are gone, which `mounts` leaves out.
    if let Err(e) = super::write_record(&root, &record) {
        tracing::warn!(error = %e, "cannot record the mount");
    }
    let line = if args.notify {
        format!("ready {message}")
    } else {
        message
    };
    if let Err(e) = link.ready(Some(std::os::fd::AsFd::as_fd(&mounted.device)), &line) {
        tracing::warn!(error = %e, "cannot hand the connection to the holder: a crash of this process ends the mount");
    }
    if args.notify {
        // Nothing more for the parent: stdout must not be the pipe.
        if let Ok(null) = std::fs::File::create("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    }
    let view = match slot.view() {
        Some(view) => view,
        None => loop {
            let opened = tokio::select! {
                opened = ImageView::open_chain(&ctx.layers, &image, count) => opened,
                clean = wait_for_end(&ctx, &mut mounted, mountpoint, &mut signals, &slot) => {
                    return ended(&ctx, mountpoint, clean);
                }
            };
            match opened {
                Ok(view) => {
                    let view = Arc::new(view);
                    // Recorded before any request is answered from the tree: a process taking
                    // over must serve this one.
                    record.tree = view.tree.fingerprint();
                    if let Err(e) = super::write_record(&root, &record) {
                        tracing::warn!(error = %e, "cannot record the mount");
                    }
                    tracing::info!(
                        "{}: layers open, {} inodes, {} ms after the mount started",
                        mountpoint.display(),
                        view.tree.inodes(),
                        started.elapsed().as_millis()
                    );
                    profile = start_view(&ctx, &image, mounted_chain.as_ref(), &view, early.take());
                    slot.set(view.clone());
                    break view;
                }
                Err(e) => {
                    let why = format!("{}: {}", image.name, super::control::chain(&e));
                    tracing::error!("{}: {why}", mountpoint.display());
                    slot.fail(why);
                    // Requests fail until one asks for another open.
                    tokio::select! {
                        _ = slot.retry_wanted() => {}
                        clean = wait_for_end(&ctx, &mut mounted, mountpoint, &mut signals, &slot) => {
                            return ended(&ctx, mountpoint, clean);
                        }
                    }
                }
            }
        },
    };
    let profile_done = async move {
        if let Some(p) = profile {
            p.finish().await;
        }
    };
    run_until_end(
        &ctx,
        args,
        &view,
        &slot,
        &mut mounted,
        &mut signals,
        profile_done,
    )
    .await
}

/// The end of a mount: its record goes if it was unmounted; a failed session (still mounted)
/// is an error, and the holder starts a process that takes the connection over.
fn ended(ctx: &Context, mountpoint: &Path, clean: bool) -> Result<(), ServeError> {
    if !clean {
        return Err(ServeError::Session(mountpoint.to_path_buf()));
    }
    super::remove_record(ctx.store.root(), mountpoint);
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// A serving process started by the holder after the previous one died: serve the same
/// mount, from the same tree, through the connection the holder kept.
pub async fn take_over(
    ctx: Context,
    args: &ServeArgs,
    mountpoint: &Path,
    link: Link,
    device: std::os::fd::OwnedFd,
    mut signals: Signals,
) -> Result<(), ServeError> {
    let options = &args.options;
    keep_large_buffers_off_the_heap();
    let started = Instant::now();
    let root = ctx.store.root().to_path_buf();
    // What makes a takeover impossible for any process: the holder gives up at once.
    let cannot = |why: String| -> ! {
        tracing::error!(
            "{}: cannot take the mount over: {why}",
            mountpoint.display()
        );
        std::process::exit(super::holder::EXIT_CANNOT_TAKE_OVER)
    };
    let Some(mut record) = super::read_record(&root, mountpoint) else {
        cannot("no record of the mount".into())
    };
    // The very image the mount serves (the name may have been pulled again since).
    let Some((image, count)) = record.served.clone() else {
        cannot("its record does not say which image it serves".into())
    };
    warm_up(&ctx, &image);
    let view = Arc::new(ImageView::open_chain(&ctx.layers, &image, count).await?);
    view.fetch_neighbours();
    view.follow_imports(ctx.config.mount.follow_imports);
    // No fingerprint: the previous process died while the layers streamed, before it
    // answered from any tree.
    if record.tree.is_empty() {
        record.tree = view.tree.fingerprint();
    } else if view.tree.fingerprint() != record.tree {
        cannot(format!(
            "{} builds a different tree than the one the mount serves (inode numbers would change)",
            image.name
        ));
    }
    let mut mounted = match fuse::take_over(
        view.clone(),
        tokio::runtime::Handle::current(),
        mountpoint,
        device,
        options,
        record.passthrough,
        &super::backing_log_path(&root, mountpoint),
    ) {
        Ok(m) => m,
        Err(e @ fuse::FuseError::Resend { .. }) => cannot(e.to_string()),
        Err(e) => return Err(ServeError::Fuse(e)),
    };
    record.pid = std::process::id();
    record.holder = Some(link.holder);
    let slot = fuse::ViewSlot::ready(view.clone());
    record.metrics = serve_metrics(&ctx, args, slot.clone())?;
    if let Err(e) = super::write_record(&root, &record) {
        tracing::warn!(error = %e, "cannot record the mount");
    }
    tracing::info!(
        "took over {} at {} in {} ms",
        image.name,
        mountpoint.display(),
        started.elapsed().as_millis()
    );
    if let Err(e) = link.ready(None, "") {
        tracing::warn!(error = %e, "cannot tell the holder");
    }
    run_until_end(
        &ctx,
        args,
        &view,
        &slot,
        &mut mounted,
        &mut signals,
        async {},
    )
    .await
}

/// Serves with background fetch (if on) until the mount ends, then cleans up.
async fn run_until_end(
    ctx: &Context,
    args: &ServeArgs,
    view: &Arc<ImageView>,
    slot: &fuse::ViewSlot,
    mounted: &mut fuse::Mounted,
    signals: &mut Signals,
    finish: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let mountpoint = &mounted.mountpoint.clone();
    let background = args
        .background
        .unwrap_or(ctx.config.mount.background_fetch)
        .then(|| {
            let settings = crate::prefetch::PrefetchSettings {
                bandwidth: ctx.config.mount.background_bandwidth,
                delay: Duration::from_secs_f64(ctx.config.mount.background_delay_secs.max(0.0)),
                cache_cap: Some(ctx.cache_cap),
            };
            tokio::spawn(crate::prefetch::prefetch(view.clone(), settings))
        });
    let clean = wait_for_end(ctx, mounted, mountpoint, signals, slot).await;
    if let Some(task) = background {
        task.abort();
    }
    finish.await;
    ended(ctx, mountpoint, clean)
}

/// The signals a serving process answers, handled from its start: SIGTERM/SIGINT unmount,
/// SIGUSR1 hands the mount over to the next process (an upgrade).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Handlers for SIGTERM, SIGINT and SIGUSR1 (a tokio runtime must be running).
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Serves until the session ends (unmounted from outside) or a signal asks to stop; saves
/// the fetched-byte counters every second. False if the session failed (still mounted).
/// Requests still waiting for the view of `slot` fail when the mount ends.
async fn wait_for_end(
    ctx: &Context,
    mounted: &mut fuse::Mounted,
    mountpoint: &Path,
    signals: &mut Signals,
    slot: &fuse::ViewSlot,
) -> bool {
    let Signals { term, int, usr1 } = signals;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_save = Instant::now();
    // While the view opens, every dispatch thread may be waiting for it, and none reads what
    // the kernel says: an unmount from outside (`umount -l` of a mount whose lookups wait) is
    // seen in the mount table instead, by the device of this mount (the last one at the
    // path: a dead one may lie below it).
    let device = fuse::mount_entries()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint && m.fstype.starts_with("fuse"))
        .map(|m| m.dev);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                // The holder replaces this process (an upgrade): stop without unmounting; the
                // next process takes the connection over and the kernel resends what this one
                // had read and not answered.
                let _ = ctx.layers.save_fetched();
                tracing::info!("handing {} over to a new serving process", mountpoint.display());
                std::process::exit(super::holder::EXIT_HANDOVER);
            }
            _ = tick.tick() => {
                if mounted.finished() {
                    return mounted.join();
                }
                if let Some(dev) = device.as_ref().filter(|_| slot.is_opening()) {
                    if !fuse::mount_entries().iter().any(|m| &m.dev == dev) {
                        tracing::info!(
                            "{} was unmounted while its layers stream: the requests waiting for them fail",
                            mountpoint.display()
                        );
                        slot.end();
                    }
                }
                if last_save.elapsed() > Duration::from_secs(1) {
                    let _ = ctx.layers.save_fetched();
                    last_save = Instant::now();
                }
            }
        }
    }
    tracing::info!("signalled: unmounting {}", mountpoint.display());
    slot.end();
    if let Err(e) = fuse::unmount(mountpoint, false) {
        tracing::warn!(error = %e, "unmount failed; detaching lazily");
        let _ = fuse::unmount(mountpoint, true);
    }
    // The session ends when the kernel drops the connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounted.finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if mounted.finished() {
        mounted.join();
    }
    true
}
