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
use stratafs::daemon as records;
use stratafs::daemon::holder::{self, Role};
use stratafs::daemon::serve::{self, ServeArgs, Signals};
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

/// What the serving process needs of the command line.
fn serve_args(args: &MountArgs, options: MountOptions) -> Result<ServeArgs> {
    Ok(ServeArgs {
        reference: args.reference.clone(),
        platform: crate::platform(&args.platform)?,
        chain: args.chain.clone(),
        options,
        metrics_address: args.metrics_address.clone(),
        notify: args.notify,
        background: background_option(&args.options),
    })
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
    let signals = (!matches!(role, Role::Alone))
        .then(Signals::new)
        .transpose()
        .context("installing signal handlers")?;
    if let Role::TakeOver(link, device) = role {
        // Nobody answers on the mountpoint until this process does: nothing here may stat it.
        let mountpoint = absolute(&args.mountpoint)?;
        let signals = signals.expect("signals of a serving process");
        let serve_args = serve_args(&args, options)?;
        return Ok(
            serve::take_over(ctx()?, &serve_args, &mountpoint, link, device, signals).await?,
        );
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
    let serve_args = serve_args(&args, options)?;
    let result = match ctx() {
        Ok(ctx) => serve::serve(ctx, &serve_args, &mountpoint, link, signals)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
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
    let logs = stratafs::store::Layout::new(&root).logs();
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
                "{rest} (holder pid {}, log {})",
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
    // Its output closed before it said "ready": it failed (or its holder lives on without
    // a mount to report, which must not keep this command waiting).
    match child.try_wait()? {
        Some(status) => bail!(
            "the mount daemon exited ({status}) before the mount answered; see {}",
            log_path.display()
        ),
        None => bail!(
            "the mount daemon (pid {}) stopped reporting before the mount answered; see {}",
            child.id(),
            log_path.display()
        ),
    }
}

/// `stratafs umount [--lazy] MOUNTPOINT`.
pub fn umount(root: &Path, mountpoint: &Path, lazy: bool) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    let daemon = records::find_daemon(root, &mountpoint);
    match records::mount_state(root, &mountpoint) {
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
        let holder = records::live_holder(root, &r.mountpoint).with_context(|| {
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
