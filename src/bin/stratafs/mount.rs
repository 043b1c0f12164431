//! `stratafs mount` and `stratafs umount`: the daemon that serves one image at one mountpoint.
//!
//! `mount` checks its arguments, then (unless `--foreground`) starts itself again as a
//! detached daemon whose log goes to `<root>/logs/`, and returns once the daemon reports that
//! the mount answers — or prints the daemon's error. The daemon is a holder
//! ([`stratafs::daemon::holder`]) that starts the serving process: it opens the image (pulling
//! its metadata if needed), mounts it, records itself under `<root>/run/mounts/`, and serves
//! until it is unmounted or gets SIGTERM/SIGINT, when it unmounts cleanly. When the serving
//! process dies, the holder starts another that takes the mount over. A mountpoint left dead
//! (holder and server both killed) is detached by the next `mount` or `umount` of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use stratafs::daemon::holder::{self, Link, Role};
use stratafs::daemon::{self as records, MountRecord};
use stratafs::fs::ImageView;
use stratafs::fuse::{self, MountOptions, MountState};

use crate::lazy::Context;

/// `stratafs mount` arguments (see `Command::Mount`).
pub struct MountArgs {
    /// Mount only the chain with this ChainID (one of the image's layers and those below).
    pub chain: Option<String>,
    pub platform: Option<String>,
    pub plain_http: bool,
    pub foreground: bool,
    pub notify: bool,
    pub options: Vec<String>,
    /// Serve Prometheus metrics at this address (`127.0.0.1:9110`).
    pub metrics_address: Option<String>,
    pub reference: String,
    pub mountpoint: PathBuf,
}

/// Options of `-o` lists that are not mount options but global settings: `root=`, `config=`,
/// `platform=`, `plain_http` (so mount(8) and fstab can pass them). Removes and applies them.
pub fn take_global_options(
    options: &mut Vec<String>,
    root: &mut PathBuf,
    config: &mut Option<PathBuf>,
    platform: &mut Option<String>,
    plain_http: &mut bool,
) {
    let all: Vec<String> = options
        .drain(..)
        .flat_map(|o| o.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|o| !o.is_empty())
        .collect();
    for o in all {
        match o.split_once('=') {
            Some(("root", v)) => *root = PathBuf::from(v),
            Some(("config", v)) => *config = Some(PathBuf::from(v)),
            Some(("platform", v)) => *platform = Some(v.to_string()),
            None if o == "plain_http" => *plain_http = true,
            _ => options.push(o),
        }
    }
}

fn parse_options(
    settings: &stratafs::config::MountSettings,
    options: &[String],
) -> Result<MountOptions> {
    let mut parsed = MountOptions {
        read_timeout: Duration::try_from_secs_f64(settings.read_timeout_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("config: mount.read_timeout_secs must be a positive number")?,
        threads: settings.threads.clamp(1, 64),
        passthrough: settings.passthrough,
        open_prefetch: settings.open_prefetch,
        ..MountOptions::default()
    };
    for o in options {
        if !matches!(o.as_str(), "background" | "nobackground") {
            parsed.apply(o)?;
        }
    }
    Ok(parsed)
}

/// The read timeout a mount with these options gets (config, then `-o read_timeout=`).
pub fn read_timeout(
    settings: &stratafs::config::MountSettings,
    options: &[String],
) -> Option<Duration> {
    let split: Vec<String> = options
        .iter()
        .flat_map(|o| o.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|o| !o.is_empty())
        .collect();
    parse_options(settings, &split).ok().map(|o| o.read_timeout)
}

/// `-o background` / `-o nobackground`, the last one given (else the config decides).
fn background_option(options: &[String]) -> Option<bool> {
    options.iter().rev().find_map(|o| match o.as_str() {
        "background" => Some(true),
        "nobackground" => Some(false),
        _ => None,
    })
}

/// An absolute mountpoint path, without resolving symlinks in the last component (a dead
/// mount cannot be stat'ed).
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .with_context(|| format!("{}", parent.display()))?
            .join(name)),
        _ => Ok(abs),
    }
}

/// Detaches a dead stratafs mount at `mountpoint` if there is one; errors if a live one is.
fn repair_or_refuse(mountpoint: &Path) -> Result<()> {
    match fuse::mount_state(mountpoint) {
        MountState::None => Ok(()),
        MountState::Live => bail!(
            "{} is already mounted ({}): unmount it first, or choose another directory",
            mountpoint.display(),
            mounted_there(mountpoint)
        ),
        MountState::Dead => {
            eprintln!(
                "{}: its daemon is gone (transport endpoint is not connected); detaching it",
                mountpoint.display()
            );
            fuse::unmount(mountpoint, true)?;
            Ok(())
        }
    }
}

pub async fn mount(
    root: &Path,
    settings: &stratafs::config::MountSettings,
    config_path: Option<&Path>,
    log_level: &str,
    ctx: impl FnOnce() -> Result<Context>,
    args: MountArgs,
) -> Result<()> {
    let options = parse_options(settings, &args.options)?;
    let role = if args.foreground {
        holder::role()
    } else {
        Role::Alone
    };
    // A serving process handles signals from its first moment (the holder passes them on).
    let signals = (!matches!(role, Role::Alone)).then(Signals::new);
    if let Role::TakeOver(link, device) = role {
        // Nobody answers on the mountpoint until this process does: nothing here may stat it.
        let mountpoint = absolute(&args.mountpoint)?;
        let signals = signals.expect("signals of a serving process");
        return take_over(ctx()?, &args, &options, &mountpoint, link, device, signals).await;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "mounting needs root: stratafs mounts with mount(2) through /dev/fuse (run it with sudo; `stratafs ls` and `cat` work without)"
        );
    }
    match std::fs::metadata(&args.mountpoint) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mountpoint {} does not exist: create it first (mkdir -p {})",
            args.mountpoint.display(),
            args.mountpoint.display()
        ),
        Ok(m) if !m.is_dir() => bail!(
            "mountpoint {} is not a directory",
            args.mountpoint.display()
        ),
        // A dead mount cannot be stat'ed: it is looked at below.
        _ => {}
    }
    let mountpoint = absolute(&args.mountpoint)?;
    let link = match role {
        Role::Fresh(link) => Some(link),
        _ => None,
    };
    if link.is_none() {
        if args.notify {
            // The daemon: its own session, so the terminal's signals do not reach it.
            let _ = nix::unistd::setsid();
        } else {
            repair_or_refuse(&mountpoint)?;
        }
    }
    if !mountpoint.is_dir() {
        bail!("{}: not a directory", mountpoint.display());
    }
    if !args.foreground {
        return spawn_daemon(root, config_path, log_level, &args, &mountpoint);
    }
    let Some(link) = link else {
        // Hold the mount: start the serving process, and another whenever it dies.
        let exe = std::env::current_exe().context("finding the stratafs binary")?;
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (root, at) = (root.to_path_buf(), mountpoint.clone());
        let abandon = move || {
            let _ = fuse::unmount(&at, true);
            records::remove_record(&root, &at);
        };
        let code = holder::hold(&exe, &argv, &abandon).await?;
        if code != 0 {
            std::process::exit(code);
        }
        return Ok(());
    };
    let signals = signals.expect("signals of a serving process");
    let result = serve(ctx()?, &args, &options, &mountpoint, link, signals).await;
    if let (true, Err(e)) = (args.notify, &result) {
        println!("error: {e:#}");
    }
    result
}

/// Starts `stratafs … mount --foreground` detached and waits for it to report.
fn spawn_daemon(
    root: &Path,
    config_path: Option<&Path>,
    log_level: &str,
    args: &MountArgs,
    mountpoint: &Path,
) -> Result<()> {
    let root = std::path::absolute(root)?;
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}", logs.display()))?;
    let log_path = logs.join(format!("mount-{}.log", records::escape(mountpoint)));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the stratafs binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&root)
        .arg("--log-level")
        .arg(log_level);
    if let Some(c) = config_path {
        cmd.arg("--config").arg(std::path::absolute(c)?);
    }
    cmd.args(["mount", "--foreground", "--notify"]);
    if let Some(c) = &args.chain {
        cmd.args(["--chain", c]);
    }
    if let Some(p) = &args.platform {
        cmd.args(["--platform", p]);
    }
    if args.plain_http {
        cmd.arg("--plain-http");
    }
    if !args.options.is_empty() {
        cmd.arg("-o").arg(args.options.join(","));
    }
    if let Some(a) = &args.metrics_address {
        cmd.args(["--metrics-address", a]);
    }
    cmd.arg(&args.reference).arg(mountpoint);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .current_dir("/");
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let stdout = child.stdout.take().expect("piped stdout");
    // The daemon reports "progress FETCHED TOTAL" while it opens the image (layers without a
    // usable index are streamed first).
    let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut progress: Option<crate::lazy::Progress> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if let Some(rest) = line.strip_prefix("progress ") {
            let mut numbers = rest.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            let (now, total) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
            fetched.store(now, std::sync::atomic::Ordering::Relaxed);
            let counter = fetched.clone();
            progress
                .get_or_insert_with(|| {
                    let what = format!("mounting {}", args.reference);
                    crate::lazy::Progress::new(
                        &what,
                        total,
                        Arc::new(move || counter.load(std::sync::atomic::Ordering::Relaxed)),
                    )
                })
                .update();
            continue;
        }
        if let Some(rest) = line.strip_prefix("ready ") {
            if let Some(p) = progress.take() {
                p.finish("");
            }
            println!(
                "{rest} (daemon pid {}, log {})",
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if let Some(e) = line.strip_prefix("error: ") {
            let _ = child.wait();
            bail!("{e}");
        }
    }
    let status = child.wait()?;
    bail!(
        "the mount daemon exited ({status}) before the mount answered; see {}",
        log_path.display()
    )
}

/// A daemon allocates and frees many span-sized buffers (up to a few MiB) from many threads.
/// glibc raises its mmap threshold after such a buffer is freed, so later ones come from the
/// per-thread heaps, which keep the memory: a cold import peaked at 93 MiB. With the threshold
/// fixed at 256 KiB, large buffers are mapped and returned on free: 56 MiB, same speed
/// (docs/benchmarks.md).
fn keep_large_buffers_off_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before the daemon's threads
    // allocate span buffers, and any value is safe for glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// The image and how many of its layers are mounted (`--chain`).
async fn open_image(
    ctx: &Context,
    args: &MountArgs,
) -> Result<(stratafs::image::ImageRecord, usize)> {
    let platform = crate::platform(&args.platform)?;
    let image = ctx.image(&args.reference, platform.as_ref()).await?;
    let count = match &args.chain {
        None => image.layers.len(),
        Some(chain) => {
            image
                .layers
                .iter()
                .position(|l| l.chain_id.as_ref() == chain.as_str())
                .with_context(|| format!("{} has no layer with ChainID {chain}", image.name))?
                + 1
        }
    };
    Ok((image, count))
}

/// Serves Prometheus metrics for `view` at `--metrics-address`, if given: the bound address.
fn serve_metrics(ctx: &Context, args: &MountArgs, view: &Arc<ImageView>) -> Result<Option<String>> {
    let Some(addr) = &args.metrics_address else {
        return Ok(None);
    };
    let (view, chunks, cap) = (view.clone(), ctx.chunks.clone(), ctx.cache_cap);
    let collect: stratafs::metrics::Collector = Arc::new(move |m| {
        for r in view.readers() {
            let index = r.index();
            m.layer(index.blob.as_ref(), index.size, r.cached_bytes());
        }
        if let Some(bytes) = chunks.usage_bytes() {
            m.cache_bytes.set(bytes as i64);
        }
        m.cache_cap_bytes.set(cap as i64);
    });
    let bound = stratafs::metrics::serve(addr, collect)
        .with_context(|| format!("serving metrics at {addr}"))?;
    Ok(Some(bound.to_string()))
}

/// The serving process of a new mount: open, mount, hand the connection to the holder, serve
/// until unmounted or signalled.
async fn serve(
    ctx: Context,
    args: &MountArgs,
    options: &MountOptions,
    mountpoint: &Path,
    link: Link,
    signals: Signals,
) -> Result<()> {
    keep_large_buffers_off_the_heap();
    let started = Instant::now();
    let (image, count) = open_image(&ctx, args).await?;
    // Opening streams the layers that have no usable index: tell the waiting parent how far.
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
    let opened = ImageView::open_chain(&ctx.layers, &image, count).await;
    if let Some(r) = reporter {
        r.abort();
    }
    let view = Arc::new(opened?);
    let metrics = serve_metrics(&ctx, args, &view)?;
    let root = ctx.store.root().to_path_buf();
    let backings = fuse::OpenLog::create(&records::backing_log_path(&root, mountpoint))
        .context("creating the mount's open log")?;
    let mut mounted = fuse::mount(
        view.clone(),
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
        let _ = fuse::unmount(mountpoint, true);
        mounted.join();
        bail!("{}: the new mount does not answer", mountpoint.display());
    }
    // Replay starts as soon as the mount answers: the workload's reads come next.
    let m = &ctx.config.mount;
    let mounted_chain = image
        .layers
        .get(count.wrapping_sub(1))
        .map(|l| l.chain_id.clone());
    let profile = mounted_chain.as_ref().map(|chain| {
        stratafs::profile::Session::start(
            view.clone(),
            &image,
            chain,
            &ctx.store,
            ctx.client.clone(),
            &stratafs::profile::MountProfile {
                record: m.profile_record,
                replay: m.profile_replay,
                parallel: m.profile_parallel,
            },
        )
    });
    let record = MountRecord {
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
        tree: view.tree.fingerprint(),
        served: Some((image.clone(), count)),
    };
    if let Err(e) = records::write_record(&root, &record) {
        tracing::warn!(error = %e, "cannot record the mount");
    }
    let metrics = metrics
        .map(|a| format!(", metrics at http://{a}/metrics"))
        .unwrap_or_default();
    let message = format!(
        "mounted {} at {} ({} layers, {} inodes) in {} ms{metrics}",
        image.name,
        mountpoint.display(),
        count,
        view.tree.inodes(),
        started.elapsed().as_millis()
    );
    tracing::info!("{message}");
    // The holder has the connection before anyone hears the mount is ready.
    if let Err(e) = link.ready(Some(std::os::fd::AsFd::as_fd(&mounted.device))) {
        tracing::warn!(error = %e, "cannot hand the connection to the holder: a crash of this process ends the mount");
    }
    if args.notify {
        println!("ready {message}");
        // Nothing more for the parent: it may be gone, so stdout must not be the pipe.
        if let Ok(null) = std::fs::File::create("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    } else {
        println!("{message}");
    }
    let profile_done = async move {
        if let Some(p) = profile {
            p.finish().await;
        }
    };
    run_until_end(
        &ctx,
        args,
        &view,
        &mut mounted,
        mountpoint,
        signals,
        profile_done,
    )
    .await
}

/// A serving process started by the holder after the previous one died: serve the same
/// mount, from the same tree, through the connection the holder kept.
async fn take_over(
    ctx: Context,
    args: &MountArgs,
    options: &MountOptions,
    mountpoint: &Path,
    link: Link,
    device: std::os::fd::OwnedFd,
    signals: Signals,
) -> Result<()> {
    keep_large_buffers_off_the_heap();
    let started = Instant::now();
    let root = ctx.store.root().to_path_buf();
    // What makes a takeover impossible for any process: the holder gives up at once.
    let cannot = |why: String| -> ! {
        tracing::error!(
            "{}: cannot take the mount over: {why}",
            mountpoint.display()
        );
        std::process::exit(holder::EXIT_CANNOT_TAKE_OVER)
    };
    let Some(mut record) = records::read_record(&root, mountpoint) else {
        cannot("no record of the mount".into())
    };
    // The very image the mount serves (the name may have been pulled again since).
    let Some((image, count)) = record.served.clone() else {
        cannot("its record does not say which image it serves".into())
    };
    let view = Arc::new(ImageView::open_chain(&ctx.layers, &image, count).await?);
    if view.tree.fingerprint() != record.tree {
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
        &records::backing_log_path(&root, mountpoint),
    ) {
        Ok(m) => m,
        Err(e @ fuse::FuseError::Resend { .. }) => cannot(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    record.pid = std::process::id();
    record.holder = Some(link.holder);
    record.metrics = serve_metrics(&ctx, args, &view)?;
    if let Err(e) = records::write_record(&root, &record) {
        tracing::warn!(error = %e, "cannot record the mount");
    }
    tracing::info!(
        "took over {} at {} in {} ms",
        image.name,
        mountpoint.display(),
        started.elapsed().as_millis()
    );
    if let Err(e) = link.ready(None) {
        tracing::warn!(error = %e, "cannot tell the holder");
    }
    run_until_end(
        &ctx,
        args,
        &view,
        &mut mounted,
        mountpoint,
        signals,
        async {},
    )
    .await
}

/// Serves with background fetch (if on) until the mount ends, then cleans up.
async fn run_until_end(
    ctx: &Context,
    args: &MountArgs,
    view: &Arc<ImageView>,
    mounted: &mut fuse::Mounted,
    mountpoint: &Path,
    signals: Signals,
    finish: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let background = background_option(&args.options)
        .unwrap_or(ctx.config.mount.background_fetch)
        .then(|| {
            let settings = stratafs::prefetch::PrefetchSettings {
                bandwidth: ctx.config.mount.background_bandwidth,
                delay: Duration::from_secs_f64(ctx.config.mount.background_delay_secs.max(0.0)),
                cache_cap: Some(ctx.cache_cap),
            };
            tokio::spawn(stratafs::prefetch::prefetch(
                view.clone(),
                mounted.reads.clone(),
                settings,
            ))
        });
    let clean = wait_for_end(ctx, mounted, mountpoint, signals).await;
    if let Some(task) = background {
        task.abort();
    }
    finish.await;
    if !clean {
        // Not unmounted: the holder starts a process that takes the connection over.
        bail!("{}: the FUSE session failed", mountpoint.display());
    }
    records::remove_record(ctx.store.root(), mountpoint);
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// The signals a serving process answers, handled from its start: SIGTERM/SIGINT unmount,
/// SIGUSR1 hands the mount over to the next process (an upgrade).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            usr1: signal(SignalKind::user_defined1()).expect("SIGUSR1 handler"),
        }
    }
}

/// Serves until the session ends (unmounted from outside) or a signal asks to stop; saves
/// the fetched-byte counters every second. False if the session failed (still mounted).
async fn wait_for_end(
    ctx: &Context,
    mounted: &mut fuse::Mounted,
    mountpoint: &Path,
    signals: Signals,
) -> bool {
    let Signals {
        mut term,
        mut int,
        mut usr1,
    } = signals;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_save = Instant::now();
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
                std::process::exit(holder::EXIT_HANDOVER);
            }
            _ = tick.tick() => {
                if mounted.finished() {
                    return mounted.join();
                }
                if last_save.elapsed() > Duration::from_secs(1) {
                    let _ = ctx.layers.save_fetched();
                    last_save = Instant::now();
                }
            }
        }
    }
    tracing::info!("signalled: unmounting {}", mountpoint.display());
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

/// `stratafs umount [--lazy] MOUNTPOINT`.
pub fn umount(root: &Path, mountpoint: &Path, lazy: bool) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    let daemon = records::find_daemon(root, &mountpoint);
    // With a live holder the mount is alive even while no process serves it (probing it would
    // wait for the next one).
    let held = records::read_record(root, &mountpoint)
        .and_then(|r| r.holder)
        .is_some_and(|h| records::is_mount_process(h, &mountpoint));
    let state = if held {
        MountState::Live
    } else {
        fuse::mount_state(&mountpoint)
    };
    match state {
        MountState::None => bail!("{}: not mounted", mountpoint.display()),
        MountState::Dead => {
            fuse::unmount(&mountpoint, true)?;
            println!(
                "{}: detached a dead mount (its daemon was gone)",
                mountpoint.display()
            );
        }
        MountState::Live => {
            fuse::unmount(&mountpoint, lazy)?;
            println!("unmounted {}", mountpoint.display());
        }
    }
    records::remove_record(root, &mountpoint);
    if let Some(pid) = daemon {
        // The daemon exits once the kernel drops the connection; wait for it (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while records::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if records::alive(pid) && !lazy {
            tracing::warn!(pid, "daemon still running after unmount; sending SIGTERM");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    Ok(())
}

/// `stratafs upgrade [MOUNTPOINT…]`: asks each mount's holder (SIGHUP) to replace its serving
/// process with one of the binary now installed at the holder's path, and waits until the new
/// one serves.
pub fn upgrade(root: &Path, mountpoints: &[PathBuf]) -> Result<()> {
    let all = records::mounts(root);
    let mut targets = Vec::new();
    for m in mountpoints {
        let m = absolute(m)?;
        let record = all
            .iter()
            .find(|r| r.mountpoint == m)
            .with_context(|| format!("{}: no live stratafs mount recorded there", m.display()))?;
        targets.push(record.clone());
    }
    if mountpoints.is_empty() {
        targets = all;
    }
    if targets.is_empty() {
        println!("no mounts to upgrade");
    }
    for r in targets {
        let at = r.mountpoint.display();
        let holder = r.holder.filter(|h| records::is_mount_process(*h, &r.mountpoint)).with_context(|| {
            format!("{at}: no holder keeps this mount (it was started by an older stratafs, or its holder died): remount it to upgrade")
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .with_context(|| format!("{at}: signalling holder {holder}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let now = loop {
            if let Some(n) = records::read_record(root, &r.mountpoint)
                .filter(|n| n.pid != r.pid && records::alive(n.pid))
            {
                break n;
            }
            if Instant::now() > deadline {
                bail!(
                    "{at}: no new serving process 60 s after asking holder {holder}; see its log"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let exe = std::fs::read_link(format!("/proc/{}/exe", now.pid))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("{at}: served by pid {} ({exe}), was {}", now.pid, r.pid);
    }
    Ok(())
}

/// What is mounted at `mountpoint`, from /proc/self/mountinfo: "fuse.stratafs 127.0.0.1:5000/app:v1".
fn mounted_there(mountpoint: &Path) -> String {
    stratafs::fuse::mount_entries()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint)
        .map(|m| format!("{} {}", m.fstype, m.source))
        .unwrap_or_else(|| "by something else".to_string())
}
