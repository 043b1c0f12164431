//! `stratafs mount` and `stratafs umount`: the daemon that serves one image at one mountpoint.
//!
//! `mount` checks its arguments, then (unless `--foreground`) starts itself again as a
//! detached daemon whose log goes to `<root>/logs/`, and returns once the daemon reports that
//! the mount answers — or prints the daemon's error. The daemon opens the image (pulling its
//! metadata if needed), mounts it, records itself under `<root>/run/mounts/`, and serves until
//! it is unmounted or gets SIGTERM/SIGINT, when it unmounts cleanly. A mountpoint left dead by
//! a killed daemon is detached by the next `mount` or `umount` of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
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

/// What a daemon records about itself, for `umount`, `cache stats` and humans.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub image: String,
    pub chain_id: String,
    pub pid: u32,
    pub layers: Vec<String>,
    /// Where the daemon serves Prometheus metrics, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
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
    if args.notify {
        // The daemon: its own session, so the terminal's signals do not reach it.
        let _ = nix::unistd::setsid();
    } else {
        repair_or_refuse(&mountpoint)?;
    }
    if !mountpoint.is_dir() {
        bail!("{}: not a directory", mountpoint.display());
    }
    if !args.foreground {
        return spawn_daemon(root, config_path, log_level, &args, &mountpoint);
    }
    let result = serve(ctx()?, &args, &options, &mountpoint).await;
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
    let log_path = logs.join(format!("mount-{}.log", escape(mountpoint)));
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

/// The daemon proper: open, mount, serve until unmounted or signalled.
async fn serve(
    ctx: Context,
    args: &MountArgs,
    options: &MountOptions,
    mountpoint: &Path,
) -> Result<()> {
    keep_large_buffers_off_the_heap();
    let platform = crate::platform(&args.platform)?;
    let started = Instant::now();
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
    let (metrics, metrics_address) = match &args.metrics_address {
        Some(addr) => {
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
            (
                format!(", metrics at http://{bound}/metrics"),
                Some(bound.to_string()),
            )
        }
        None => (String::new(), None),
    };
    let mut mounted = fuse::mount(
        view.clone(),
        tokio::runtime::Handle::current(),
        mountpoint,
        options,
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
        metrics: metrics_address,
    };
    let record_path = record_path(ctx.store.root(), mountpoint);
    if let Err(e) = write_record(&ctx.store.root().join("tmp"), &record_path, &record) {
        tracing::warn!(error = %e, "cannot record the mount");
    }
    let message = format!(
        "mounted {} at {} ({} layers, {} inodes) in {} ms{metrics}",
        image.name,
        mountpoint.display(),
        count,
        view.tree.inodes(),
        started.elapsed().as_millis()
    );
    tracing::info!("{message}");
    if args.notify {
        println!("ready {message}");
        // Nothing more for the parent: it may be gone, so stdout must not be the pipe.
        if let Ok(null) = std::fs::File::create("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    } else {
        println!("{message}");
    }
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
    wait_for_end(&ctx, &mut mounted, mountpoint).await;
    if let Some(task) = background {
        task.abort();
    }
    if let Some(p) = profile {
        p.finish().await;
    }
    let _ = std::fs::remove_file(&record_path);
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Serves until the session ends (unmounted from outside) or a signal asks to stop; saves
/// the fetched-byte counters every second.
async fn wait_for_end(ctx: &Context, mounted: &mut fuse::Mounted, mountpoint: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if mounted.finished() {
                    mounted.join();
                    return;
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
}

/// `stratafs umount [--lazy] MOUNTPOINT`.
pub fn umount(root: &Path, mountpoint: &Path, lazy: bool) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    let daemon = find_daemon(&mountpoint);
    match fuse::mount_state(&mountpoint) {
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
    let _ = std::fs::remove_file(record_path(root, &mountpoint));
    if let Some(pid) = daemon {
        // The daemon exits once the kernel drops the connection; wait for it (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) && !lazy {
            tracing::warn!(pid, "daemon still running after unmount; sending SIGTERM");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid of the daemon serving `mountpoint`, from the processes' command lines.
pub fn find_daemon(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_daemon = args.iter().any(|a| *a == b"--foreground")
            && args.iter().any(|a| *a == b"mount")
            && args.iter().rev().find(|a| !a.is_empty()) == Some(&want);
        if is_daemon && alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// Live mounts recorded under `<root>/run/mounts/`.
pub fn mounts(root: &Path) -> Vec<MountRecord> {
    let Ok(dir) = std::fs::read_dir(root.join("run/mounts")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<MountRecord>(&b).ok())
        .filter(|r| alive(r.pid))
        .collect()
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

fn record_path(root: &Path, mountpoint: &Path) -> PathBuf {
    root.join("run/mounts")
        .join(format!("{}.json", escape(mountpoint)))
}

/// Writes a mount record whole or not at all (the store's atomic write: a temp file in
/// `tmp_dir`, synced, renamed).
fn write_record(tmp_dir: &Path, path: &Path, record: &MountRecord) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("record dir"))?;
    std::fs::create_dir_all(tmp_dir)?;
    let data = serde_json::to_vec_pretty(record)?;
    stratafs::store::write_atomic(tmp_dir, path, &data)?;
    Ok(())
}

/// A mountpoint as a file name: `/mnt/py` → `mnt-py`.
fn escape(mountpoint: &Path) -> String {
    // Letters, digits, `.` and `_` stay; every other byte becomes `-XX` (hex), `-` included,
    // so distinct paths (`/mnt/a-b`, `/mnt/a/b`, `/mnt/a b`) never share a name.
    use std::os::unix::ffi::OsStrExt;
    let bytes = mountpoint.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    if trimmed.is_empty() {
        return "root".into();
    }
    let mut s = String::with_capacity(trimmed.len());
    for &b in trimmed {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' {
            s.push(b as char);
        } else {
            s.push_str(&format!("-{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_unambiguous() {
        let names: Vec<String> = ["/mnt/a-b", "/mnt/a/b", "/mnt/a b", "/mnt/a_b", "/"]
            .iter()
            .map(|p| escape(Path::new(p)))
            .collect();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(escape(Path::new("/mnt/a-b")), "mnt-2fa-2db");
    }
}
