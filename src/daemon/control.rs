//! The other side of a mount's lifecycle: what `stratafs mount`, `umount` and `upgrade` (and
//! the snapshotter's lazy mounts, through them) do around the serving process.
//!
//! - [`mount`]: checks the request, then either starts the daemon detached (`mount
//!   --foreground --notify`, its log under `<root>/logs/`) and waits for its report, or — in the
//!   daemon — takes its role: the holder ([`super::holder::hold`]) or the serving process
//!   ([`super::serve`]). A dead mount (daemon gone) at the mountpoint is detached first; a live
//!   one is refused.
//! - The readiness protocol, read here and written by [`super::serve`]: the daemon's stdout
//!   carries `progress FETCHED TOTAL` lines while layers without a usable index are streamed,
//!   then one `ready MESSAGE` line, or one `error: MESSAGE` line.
//! - [`umount`] detaches the mount and waits (bounded) for its daemon to exit; [`upgrade`] asks
//!   each holder (SIGHUP) for a serving process of the binary now installed and waits for it.
//! - Mount options: `-o` lists carry mount options and global settings ([`take_global_options`]);
//!   [`mount_options`] applies them over the configuration.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::holder::{self, HolderError, Role};
use super::serve::{self, ServeArgs, ServeError, Signals};
use super::{alive, find_daemon, live_holder, mount_state, mounts, read_record, remove_record};
use crate::config::MountSettings;
use crate::context::{Context, ContextError};
use crate::fuse::{self, FuseError, MountOptions, MountState};
use crate::image::{Platform, PlatformError};
use crate::store::Layout;

/// Why a mount, unmount or upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("mounting needs root: stratafs mounts with mount(2) through /dev/fuse (run it with sudo; `stratafs ls` and `cat` work without)")]
    NotRoot,
    #[error("mountpoint {} does not exist: create it first (mkdir -p {})", .0.display(), .0.display())]
    NoMountpoint(PathBuf),
    #[error("mountpoint {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is already mounted ({what}): unmount it first, or choose another directory", .mountpoint.display())]
    Busy { mountpoint: PathBuf, what: String },
    #[error("{}: not mounted", .0.display())]
    NotMounted(PathBuf),
    #[error("{}: no live stratafs mount recorded there", .0.display())]
    NotRecorded(PathBuf),
    #[error("{}: no holder keeps this mount (it was started by an older stratafs, or its holder died): remount it to upgrade", .0.display())]
    NoHolder(PathBuf),
    #[error("{}: no new serving process 60 s after asking holder {holder}; see its log", .mountpoint.display())]
    UpgradeTimeout { mountpoint: PathBuf, holder: u32 },
    #[error("{}: signalling holder {holder}: {source}", .mountpoint.display())]
    Signal {
        mountpoint: PathBuf,
        holder: u32,
        #[source]
        source: nix::Error,
    },
    #[error("config: mount.read_timeout_secs must be a positive number")]
    ReadTimeout,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The daemon reported this error instead of a mount.
    #[error("{0}")]
    Daemon(String),
    #[error("the mount daemon exited ({status}) before the mount answered; see {}", .log.display())]
    DaemonExited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("the mount daemon (pid {pid}) stopped reporting before the mount answered; see {}", .log.display())]
    DaemonSilent { pid: u32, log: PathBuf },
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error(transparent)]
    Holder(#[from] HolderError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Context(#[from] ContextError),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.to_string();
    move |source| ControlError::Io { what, source }
}

/// A `stratafs mount` request: the command line of the process that mounts.
pub struct MountRequest {
    /// The store (passed on to the daemon).
    pub root: PathBuf,
    /// The configuration file given, if any (passed on to the daemon).
    pub config: Option<PathBuf>,
    /// The log filter (passed on to the daemon).
    pub log_level: String,
    /// Mount only the chain with this ChainID (one of the image's layers and those below).
    pub chain: Option<String>,
    pub platform: Option<String>,
    pub plain_http: bool,
    /// Serve from this process (the daemon itself) rather than start a daemon.
    pub foreground: bool,
    /// Report progress and readiness on stdout (the daemon started by another `mount`).
    pub notify: bool,
    /// `-o` options, split at commas, global settings already taken out.
    pub options: Vec<String>,
    /// Serve Prometheus metrics at this address (`127.0.0.1:9110`).
    pub metrics_address: Option<String>,
    pub reference: String,
    pub mountpoint: PathBuf,
}

/// What [`mount`] tells its caller while it works.
pub enum Event<'a> {
    /// The daemon has streamed `fetched` of up to `total` compressed bytes (layers without a
    /// usable index are streamed before the mount answers).
    Progress { fetched: u64, total: u64 },
    /// A dead mount (its daemon gone) was found at the mountpoint and detached.
    DetachedDead(&'a Path),
}

/// How a [`mount`] ended.
pub enum Mounted {
    /// A daemon was started and reported `ready` with this message.
    Daemon {
        message: String,
        holder: u32,
        log: PathBuf,
    },
    /// This process served the mount until it was unmounted or signalled.
    Served,
    /// This process held the mount; its serving processes ended with this exit code.
    Held(i32),
}

/// Options of `-o` lists that are not mount options but global settings: `root=`, `config=`,
/// `platform=`, `plain_http` (so mount(8) and fstab can pass them). Splits the lists at commas
/// and removes and applies those settings.
pub fn take_global_options(
    options: &mut Vec<String>,
    root: &mut PathBuf,
    config: &mut Option<PathBuf>,
    platform: &mut Option<String>,
    plain_http: &mut bool,
) {
    for o in split(&std::mem::take(options)) {
        match o.split_once('=') {
            Some(("root", v)) => *root = PathBuf::from(v),
            Some(("config", v)) => *config = Some(PathBuf::from(v)),
            Some(("platform", v)) => *platform = Some(v.to_string()),
            None if o == "plain_http" => *plain_http = true,
            _ => options.push(o),
        }
    }
}

fn split(options: &[String]) -> Vec<String> {
    options
        .iter()
        .flat_map(|o| o.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|o| !o.is_empty())
        .collect()
}

/// The mount options of `options` over those `settings` configure.
pub fn mount_options(
    settings: &MountSettings,
    options: &[String],
) -> Result<MountOptions, ControlError> {
    let mut parsed = MountOptions {
        read_timeout: Duration::try_from_secs_f64(settings.read_timeout_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or(ControlError::ReadTimeout)?,
        threads: settings.threads.clamp(1, 64),
        passthrough: settings.passthrough,
        open_prefetch: settings.open_prefetch,
        ..MountOptions::default()
    };
    for o in split(options) {
        if !matches!(o.as_str(), "background" | "nobackground") {
            parsed.apply(&o)?;
        }
    }
    Ok(parsed)
}

/// The read timeout a mount with these options gets (config, then `-o read_timeout=`).
pub fn read_timeout(settings: &MountSettings, options: &[String]) -> Option<Duration> {
    mount_options(settings, options)
        .ok()
        .map(|o| o.read_timeout)
}

/// Bounds a mount's registry retries by its read timeout (`options` over the configured one):
/// a read's whole retry budget ends inside half of it, so a registry that keeps failing gives
/// EIO with the cause rather than a timeout.
pub fn bound_retries(config: &mut crate::config::Config, options: &[String]) {
    if let Some(timeout) = read_timeout(&config.mount, options) {
        let budget = (timeout.as_secs_f64() / 2.0) as u64;
        let retry = &mut config.registry.retry_max_elapsed_secs;
        *retry = (*retry).min(budget);
    }
}

/// `-o background` / `-o nobackground`, the last one given (else the config decides).
fn background_option(options: &[String]) -> Option<bool> {
    options.iter().rev().find_map(|o| match o.as_str() {
        "background" => Some(true),
        "nobackground" => Some(false),
        _ => None,
    })
}

/// What the serving process needs of the request.
fn serve_args(req: &MountRequest, options: MountOptions) -> Result<ServeArgs, ControlError> {
    Ok(ServeArgs {
        reference: req.reference.clone(),
        platform: req.platform.as_deref().map(Platform::parse).transpose()?,
        chain: req.chain.clone(),
        options,
        metrics_address: req.metrics_address.clone(),
        notify: req.notify,
        background: background_option(&req.options),
    })
}

/// An absolute mountpoint path, without resolving symlinks in the last component (a dead
/// mount cannot be stat'ed).
pub fn absolute(path: &Path) -> Result<PathBuf, ControlError> {
    let abs = std::path::absolute(path).map_err(io(path.display()))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .map_err(io(parent.display()))?
            .join(name)),
        _ => Ok(abs),
    }
}

/// Detaches a dead stratafs mount at `mountpoint` if there is one; errors if a live one is.
fn repair_or_refuse(
    mountpoint: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(), ControlError> {
    match fuse::mount_state(mountpoint) {
        MountState::None => Ok(()),
        MountState::Live => Err(ControlError::Busy {
            mountpoint: mountpoint.to_path_buf(),
            what: mounted_there(mountpoint),
        }),
        MountState::Dead => {
            fuse::unmount(mountpoint, true)?;
            on_event(Event::DetachedDead(mountpoint));
            Ok(())
        }
    }
}

/// What is mounted at `mountpoint`, from /proc/self/mountinfo: "fuse.stratafs 127.0.0.1:5000/app:v1".
fn mounted_there(mountpoint: &Path) -> String {
    fuse::mount_entries()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint)
        .map(|m| format!("{} {}", m.fstype, m.source))
        .unwrap_or_else(|| "by something else".to_string())
}

/// `stratafs mount`: starts a daemon and waits for its report (`on_event` hears of its
/// progress), or, in the daemon (`foreground`), holds or serves the mount. `ctx` opens the
/// store and registry for a serving process.
pub async fn mount(
    req: &MountRequest,
    settings: &MountSettings,
    ctx: impl FnOnce() -> Result<Context, ContextError>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Mounted, ControlError> {
    let options = mount_options(settings, &req.options)?;
    let role = if req.foreground {
        holder::role()
    } else {
        Role::Alone
    };
    // A serving process handles signals from its first moment (the holder passes them on).
    let signals = (!matches!(role, Role::Alone))
        .then(Signals::new)
        .transpose()
        .map_err(io("installing signal handlers"))?;
    if let Role::TakeOver(link, device) = role {
        // Nobody answers on the mountpoint until this process does: nothing here may stat it.
        let mountpoint = absolute(&req.mountpoint)?;
        let signals = signals.expect("signals of a serving process");
        let args = serve_args(req, options)?;
        serve::take_over(ctx()?, &args, &mountpoint, link, device, signals).await?;
        return Ok(Mounted::Served);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ControlError::NotRoot);
    }
    match std::fs::metadata(&req.mountpoint) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ControlError::NoMountpoint(req.mountpoint.clone()))
        }
        Ok(m) if !m.is_dir() => return Err(ControlError::NotADirectory(req.mountpoint.clone())),
        // A dead mount cannot be stat'ed: it is looked at below.
        _ => {}
    }
    let mountpoint = absolute(&req.mountpoint)?;
    let link = match role {
        Role::Fresh(link) => Some(link),
        _ => None,
    };
    if link.is_none() {
        if req.notify {
            // The daemon: its own session, so the terminal's signals do not reach it.
            let _ = nix::unistd::setsid();
        } else {
            repair_or_refuse(&mountpoint, on_event)?;
        }
    }
    if !mountpoint.is_dir() {
        return Err(ControlError::NotADirectory(mountpoint));
    }
    if !req.foreground {
        return spawn_daemon(req, &mountpoint, on_event);
    }
    let Some(link) = link else {
        // Hold the mount: start the serving process, and another whenever it dies.
        let exe = std::env::current_exe().map_err(io("finding the stratafs binary"))?;
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (root, at) = (req.root.clone(), mountpoint.clone());
        let abandon = move || {
            let _ = fuse::unmount(&at, true);
            remove_record(&root, &at);
        };
        return Ok(Mounted::Held(holder::hold(&exe, &argv, &abandon).await?));
    };
    let signals = signals.expect("signals of a serving process");
    let ready = serve_args(req, options).and_then(|args| Ok((args, ctx()?)));
    let result = match ready {
        Ok((args, ctx)) => serve::serve(ctx, &args, &mountpoint, link, signals)
            .await
            .map_err(ControlError::from),
        Err(e) => Err(e),
    };
    if let (true, Err(e)) = (req.notify, &result) {
        println!("error: {}", chain(e));
    }
    result.map(|()| Mounted::Served)
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// The arguments of the serving daemon started for `req` (`stratafs … mount --foreground
/// --notify …`), with the store `root` and the configuration file `config` as absolute paths.
pub(crate) fn daemon_args(
    req: &MountRequest,
    root: &Path,
    config: Option<&Path>,
    mountpoint: &Path,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), root.into()];
    args.extend(["--log-level".into(), req.log_level.clone().into()]);
    if let Some(c) = config {
        args.extend(["--config".into(), c.into()]);
    }
    args.extend(["mount", "--foreground", "--notify"].map(Into::into));
    let mut pair = |flag: &str, value: &Option<String>| {
        if let Some(v) = value {
            args.extend([flag.into(), v.into()]);
        }
    };
    pair("--chain", &req.chain);
    pair("--platform", &req.platform);
    pair("--metrics-address", &req.metrics_address);
    if req.plain_http {
        args.push("--plain-http".into());
    }
    if !req.options.is_empty() {
        args.extend(["-o".into(), req.options.join(",").into()]);
    }
    args.extend([req.reference.clone().into(), mountpoint.into()]);
    args
}

/// Starts `stratafs … mount --foreground --notify` detached and waits for it to report.
fn spawn_daemon(
    req: &MountRequest,
    mountpoint: &Path,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Mounted, ControlError> {
    let root = std::path::absolute(&req.root).map_err(io(req.root.display()))?;
    let logs = Layout::new(&root).logs();
    std::fs::create_dir_all(&logs).map_err(io(logs.display()))?;
    let log_path = logs.join(format!("mount-{}.log", super::escape(mountpoint)));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(log_path.display()))?;
    let exe = std::env::current_exe().map_err(io("finding the stratafs binary"))?;
    let config = match &req.config {
        Some(c) => Some(std::path::absolute(c).map_err(io(c.display()))?),
        None => None,
    };
    let mut cmd = Command::new(exe);
    cmd.args(daemon_args(req, &root, config.as_deref(), mountpoint));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .current_dir("/");
    let mut child = cmd.spawn().map_err(io("starting the mount daemon"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if let Some(rest) = line.strip_prefix("progress ") {
            let mut numbers = rest.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            let (fetched, total) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
            on_event(Event::Progress { fetched, total });
        } else if let Some(rest) = line.strip_prefix("ready ") {
            return Ok(Mounted::Daemon {
                message: rest.to_string(),
                holder: child.id(),
                log: log_path,
            });
        } else if let Some(e) = line.strip_prefix("error: ") {
            let _ = child.wait();
            return Err(ControlError::Daemon(e.to_string()));
        }
    }
    // Its output closed before it said "ready": it failed (or its holder lives on without
    // a mount to report, which must not keep this command waiting).
    match child
        .try_wait()
        .map_err(io("waiting for the mount daemon"))?
    {
        Some(status) => Err(ControlError::DaemonExited {
            status,
            log: log_path,
        }),
        None => Err(ControlError::DaemonSilent {
            pid: child.id(),
            log: log_path,
        }),
    }
}

/// How [`umount`] found the mount.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Live, and now unmounted.
    Unmounted,
    /// Its daemon was gone; the dead mount is detached.
    Detached,
}

/// `stratafs umount [--lazy] MOUNTPOINT`: unmounts (then tells `done` how), forgets the record
/// and waits (bounded) for the daemon to exit (then, unless `lazy`, sends it SIGTERM).
pub fn umount(
    root: &Path,
    mountpoint: &Path,
    lazy: bool,
    done: &mut dyn FnMut(&Unmounted),
) -> Result<Unmounted, ControlError> {
    let mountpoint = absolute(mountpoint)?;
    let daemon = find_daemon(root, &mountpoint);
    let how = match mount_state(root, &mountpoint) {
        MountState::None => return Err(ControlError::NotMounted(mountpoint)),
        MountState::Dead => {
            fuse::unmount(&mountpoint, true)?;
            Unmounted::Detached
        }
        MountState::Live => {
            fuse::unmount(&mountpoint, lazy)?;
            Unmounted::Unmounted
        }
    };
    done(&how);
    remove_record(root, &mountpoint);
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
    Ok(how)
}

/// One mount [`upgrade`] moved to a new serving process.
pub struct Upgraded {
    pub mountpoint: PathBuf,
    /// The new serving process and its binary.
    pub pid: u32,
    pub exe: String,
    /// The serving process before.
    pub was: u32,
}

/// `stratafs upgrade [MOUNTPOINT…]` (none: every mount of the store): asks each mount's holder
/// (SIGHUP) to replace its serving process with one of the binary now installed at the
/// holder's path, and waits until the new one serves; `done` hears of each.
pub fn upgrade(
    root: &Path,
    mountpoints: &[PathBuf],
    done: &mut dyn FnMut(&Upgraded),
) -> Result<usize, ControlError> {
    let all = mounts(root);
    let mut targets = Vec::new();
    for m in mountpoints {
        let m = absolute(m)?;
        let record = all.iter().find(|r| r.mountpoint == m);
        targets.push(record.ok_or(ControlError::NotRecorded(m))?.clone());
    }
    if mountpoints.is_empty() {
        targets = all;
    }
    for r in &targets {
        let at = r.mountpoint.clone();
        let holder = live_holder(root, &at).ok_or_else(|| ControlError::NoHolder(at.clone()))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|source| ControlError::Signal {
            mountpoint: at.clone(),
            holder,
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let now = loop {
            if let Some(n) = read_record(root, &at).filter(|n| n.pid != r.pid && alive(n.pid)) {
                break n;
            }
            if Instant::now() > deadline {
                return Err(ControlError::UpgradeTimeout {
                    mountpoint: at,
                    holder,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let exe = std::fs::read_link(format!("/proc/{}/exe", now.pid))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        done(&Upgraded {
            mountpoint: at,
            pid: now.pid,
            exe,
            was: r.pid,
        });
    }
    Ok(targets.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn global_settings_are_taken_out_of_option_lists() {
        let mut options = strings(&[
            "ro,root=/srv/s,allow_other",
            "config=/etc/s.toml,plain_http",
            ",platform=linux/arm64",
        ]);
        let (mut root, mut config, mut platform, mut plain) =
            (PathBuf::from("/var/lib/stratafs"), None, None, false);
        take_global_options(
            &mut options,
            &mut root,
            &mut config,
            &mut platform,
            &mut plain,
        );
        assert_eq!(options, strings(&["ro", "allow_other"]));
        assert_eq!(root, PathBuf::from("/srv/s"));
        assert_eq!(config, Some(PathBuf::from("/etc/s.toml")));
        assert_eq!(platform.as_deref(), Some("linux/arm64"));
        assert!(plain);
    }

    #[test]
    fn mount_options_apply_over_the_config() {
        let settings = MountSettings::default();
        let o = mount_options(
            &settings,
            &strings(&["read_timeout=5,threads=2", "background"]),
        )
        .unwrap();
        assert_eq!(o.read_timeout, Duration::from_secs(5));
        assert_eq!(o.threads, 2);
        assert!(mount_options(&settings, &strings(&["no_such_option"])).is_err());
        let zero = MountSettings {
            read_timeout_secs: 0.0,
            ..MountSettings::default()
        };
        assert!(matches!(
            mount_options(&zero, &[]),
            Err(ControlError::ReadTimeout)
        ));
        assert_eq!(
            background_option(&strings(&["background", "nobackground"])),
            Some(false)
        );
        assert_eq!(background_option(&strings(&["ro"])), None);
    }

    #[test]
    fn retries_end_inside_half_the_read_timeout() {
        let mut config = crate::config::Config::default();
        config.registry.retry_max_elapsed_secs = 60;
        bound_retries(&mut config, &strings(&["read_timeout=10"]));
        assert_eq!(config.registry.retry_max_elapsed_secs, 5);
        bound_retries(&mut config, &strings(&["read_timeout=600"]));
        assert_eq!(config.registry.retry_max_elapsed_secs, 5, "never raised");
    }
}
