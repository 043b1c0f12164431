//! The holder: a small process without network access that keeps a mount's FUSE connection
//! open while the process serving it dies, restarts or is upgraded — so a mount outlives its
//! daemon.
//!
//! `stratafs mount --foreground` becomes the holder: [`hold`] starts the same command again as
//! the *serving* process, with a unix socket to the holder in `STRATAFS_HOLDER_FD`. A fresh
//! server mounts and hands the holder a copy of its `/dev/fuse` descriptor (SCM_RIGHTS) with
//! its "ready" ([`Link::ready`]). When a server dies for any reason but the end of the mount,
//! the holder starts another with the descriptor in `STRATAFS_TAKEOVER_FD`; that one opens the
//! same image from the store, checks it builds the same tree, takes the connection over
//! ([`crate::fuse::take_over`]) and reports ready. Requests the dead server had read are
//! resent by the kernel, so the processes using the mount see a pause, not an error.
//!
//! Signals to the holder: SIGTERM/SIGINT are passed on (the server unmounts and both exit);
//! SIGHUP replaces the server with a new process of the binary at the holder's path (an
//! upgrade: install the new binary there first). A server that exits with status 0 has seen the
//! mount end: the holder exits too. The holder gives the mount up — detaches it and closes the
//! descriptor, so the kernel aborts the connection and its users get ENOTCONN, never a hang —
//! when a server exits with [`EXIT_CANNOT_TAKE_OVER`], or after [`MAX_FAILED_STARTS`] servers
//! in a row died before serving (with a growing pause between them). If the holder itself is
//! killed the server goes on serving, but the next crash of the server ends the mount.

use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The socket to the holder, in a serving process's environment.
pub const HOLDER_FD: &str = "STRATAFS_HOLDER_FD";
/// The mounted connection to take over, in a restarted serving process's environment.
pub const TAKEOVER_FD: &str = "STRATAFS_TAKEOVER_FD";
/// The holder's pid, in a serving process's environment.
pub const HOLDER_PID: &str = "STRATAFS_HOLDER_PID";
/// Serving processes in a row that die before they serve, after which the holder gives up.
pub const MAX_FAILED_STARTS: u32 = 5;
/// The exit status of a server that stopped for an upgrade (SIGUSR1 from the holder).
pub const EXIT_HANDOVER: i32 = 75;
/// The exit status of a server that cannot take the mount over, and never will (another tree,
/// a kernel without FUSE_NOTIFY_RESEND): the holder gives up at once.
pub const EXIT_CANNOT_TAKE_OVER: i32 = 76;

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("cannot start the serving process {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("holder: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HolderError {
    move |source| HolderError::Io { what, source }
}

/// How this process was started.
pub enum Role {
    /// Not by a holder.
    Alone,
    /// By a holder, to mount and serve.
    Fresh(Link),
    /// By a holder, to take over the mounted connection it passed.
    TakeOver(Link, OwnedFd),
}

/// A serving process's socket to its holder.
pub struct Link {
    sock: UnixStream,
    /// The holder's pid.
    pub holder: u32,
}

impl Link {
    /// Tells the holder this process serves the mount; a fresh server also hands over a copy of
    /// the connection's descriptor, and the line the holder prints for whoever waits on its
    /// stdout (the holder says it, so that it is said even if this process dies right after).
    pub fn ready(&self, device: Option<BorrowedFd<'_>>, line: &str) -> std::io::Result<()> {
        let payload = format!("ready\n{line}");
        let raw: Vec<RawFd> = device.iter().map(|d| d.as_raw_fd()).collect();
        let cmsg: Vec<ControlMessage> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(payload.as_bytes())],
            &cmsg,
            MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }
}

/// An inherited descriptor named by environment variable `var`, made close-on-exec (a serving
/// process starts no other processes, so the variable may stay).
fn inherited(var: &str, kind: libc::mode_t) -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(var).ok()?.parse().ok()?;
    // SAFETY: fstat only reads the type of `fd`, if it is open, into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 || st.st_mode & libc::S_IFMT != kind {
        tracing::warn!(
            var,
            fd,
            "ignoring an inherited descriptor of the wrong kind"
        );
        return None;
    }
    // SAFETY: the holder passed `fd` to this process for it alone; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: setting FD_CLOEXEC on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(owned)
}

/// This process's role, from its environment. Call it once: it takes ownership of the
/// descriptors.
pub fn role() -> Role {
    // Only from the holder that started this process (not an environment leaked further).
    let parent = nix::unistd::getppid().as_raw() as u32;
    let holder = std::env::var(HOLDER_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    if holder != Some(parent) {
        return Role::Alone;
    }
    let link = inherited(HOLDER_FD, libc::S_IFSOCK).map(|fd| Link {
        sock: UnixStream::from(fd),
        holder: parent,
    });
    let device = inherited(TAKEOVER_FD, libc::S_IFCHR);
    match (link, device) {
        (Some(link), Some(device)) => Role::TakeOver(link, device),
        (Some(link), None) => Role::Fresh(link),
        _ => Role::Alone,
    }
}

/// A copy of `fd` that a child inherits (no close-on-exec).
fn inheritable(fd: BorrowedFd<'_>) -> Result<OwnedFd, HolderError> {
    // SAFETY: F_DUPFD returns a new descriptor (without FD_CLOEXEC) that this process owns.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
    if n < 0 {
        return Err(io("dup")(std::io::Error::last_os_error()));
    }
    // SAFETY: `n` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// What a server said on its socket: one "ready" (with the line to print), with the
/// connection from a fresh server.
type Said = (bool, Option<OwnedFd>, String);

fn receive(sock: UnixStream) -> Said {
    let mut buf = [0u8; 8192];
    let mut device = None;
    let n = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let Ok(msg) = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            return (false, None, String::new());
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just installed `fd` in this process for this
                        // message.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        device.get_or_insert(owned);
                    }
                }
            }
        }
        msg.bytes
    };
    let text = String::from_utf8_lossy(&buf[..n.min(buf.len())]).into_owned();
    match text.strip_prefix("ready\n") {
        Some(line) => (true, device, line.to_string()),
        None => (false, device, String::new()),
    }
}

fn code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Whether the FUSE connection `device` is still up (the kernel flags a connection that ended
/// — unmounted, or aborted — with POLLERR).
fn connected(device: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(device.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

/// Runs as the holder of one mount: starts `exe args` to serve it and starts another whenever
/// one dies, until the mount ends. `abandon` detaches the mount when the holder gives it up.
/// Returns the status to exit with.
pub async fn hold(exe: &Path, args: &[OsString], abandon: &dyn Fn()) -> Result<i32, HolderError> {
    use nix::sys::signal::{kill, Signal};
    use tokio::signal::unix::{signal, SignalKind};
    let signal = |kind| signal(kind).map_err(io("signal handler"));
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    let mut device: Option<OwnedFd> = None;
    let mut failed_starts = 0u32;
    let mut stopping = false;
    loop {
        if device.as_ref().is_some_and(|d| !connected(d)) {
            tracing::info!("the mount ended while no process served it");
            return Ok(0);
        }
        let (ours, theirs) = UnixStream::pair().map_err(io("socketpair"))?;
        let theirs = {
            let copy = inheritable(theirs.as_fd())?;
            drop(theirs); // the child's copy alone: its death closes the socket
            copy
        };
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(HOLDER_FD, theirs.as_raw_fd().to_string())
            .env(HOLDER_PID, std::process::id().to_string())
            .stdin(Stdio::null());
        let passed = match &device {
            Some(d) => {
                let copy = inheritable(d.as_fd())?;
                cmd.env(TAKEOVER_FD, copy.as_raw_fd().to_string())
                    .stdout(Stdio::null());
                Some(copy)
            }
            None => None,
        };
        let started = Instant::now();
        let spawned = cmd.spawn();
        drop((theirs, passed));
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) if device.is_none() => {
                return Err(HolderError::Spawn {
                    exe: exe.to_path_buf(),
                    source,
                })
            }
            Err(e) => {
                tracing::error!(exe = %exe.display(), error = %e, "cannot start a serving process");
                failed_starts += 1;
                if failed_starts >= MAX_FAILED_STARTS {
                    return Ok(give_up(abandon, failed_starts));
                }
                tokio::time::sleep(backoff(failed_starts)).await;
                continue;
            }
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let mut said = tokio::task::spawn_blocking(move || receive(ours));
        let mut exited = tokio::task::spawn_blocking(move || child.wait());
        let (mut heard, mut ready, mut upgrading) = (false, false, false);
        let hear = |r: Result<Said, tokio::task::JoinError>, device: &mut Option<OwnedFd>| {
            let (ok, fd, line) = r.unwrap_or((false, None, String::new()));
            if ok && device.is_none() && fd.is_some() {
                *device = fd;
                // Report for the first server to whoever waits on stdout; then done with it.
                use std::io::Write as _;
                if !line.is_empty() {
                    let mut out = std::io::stdout();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                if let Ok(null) = std::fs::File::create("/dev/null") {
                    let _ = nix::unistd::dup2_stdout(&null);
                }
            }
            if ok {
                tracing::info!(
                    pid = pid.as_raw(),
                    ms = started.elapsed().as_millis() as u64,
                    "serving process ready"
                );
            }
            ok && device.is_some()
        };
        let status = loop {
            tokio::select! {
                biased;
                r = &mut said, if !heard => {
                    heard = true;
                    ready = hear(r, &mut device);
                }
                s = &mut exited => break s.map_err(|e| io("wait")(e.into()))?.map_err(io("wait"))?,
                _ = term.recv() => { stopping = true; let _ = kill(pid, Signal::SIGTERM); }
                _ = int.recv() => { stopping = true; let _ = kill(pid, Signal::SIGTERM); }
                _ = hup.recv() => {
                    if ready {
                        tracing::info!(exe = %exe.display(), "upgrade: replacing the serving process");
                        upgrading = true;
                        let _ = kill(pid, Signal::SIGUSR1);
                    } else {
                        tracing::warn!("upgrade asked while the serving process is starting: ignored");
                    }
                }
            }
        };
        if !heard {
            // Whatever it said before dying still counts (the socket holds it until read).
            ready = hear(said.await, &mut device);
        }
        let c = code(status);
        if stopping {
            if !status.success() && device.is_some() {
                abandon();
            }
            return Ok(c);
        }
        if status.success() {
            return Ok(0);
        }
        if device.is_none() {
            // The first server failed before it mounted; it said why.
            return Ok(c);
        }
        if c == EXIT_CANNOT_TAKE_OVER {
            tracing::error!(
                "the serving process cannot take the mount over (see above): giving the mount up"
            );
            abandon();
            return Ok(1);
        }
        if upgrading && c == EXIT_HANDOVER {
            continue;
        }
        failed_starts = if ready { 0 } else { failed_starts + 1 };
        if failed_starts >= MAX_FAILED_STARTS {
            return Ok(give_up(abandon, failed_starts));
        }
        tracing::warn!(pid = pid.as_raw(), %status, "serving process died: starting another to take the mount over");
        if failed_starts > 0 {
            tokio::time::sleep(backoff(failed_starts)).await;
        }
    }
}

/// The pause before the next start after `n` starts in a row that never served.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(100 << n.min(5))
}

fn give_up(abandon: &dyn Fn(), n: u32) -> i32 {
    tracing::error!(
        starts = n,
        "serving processes keep dying before they serve: giving the mount up (its users get ENOTCONN)"
    );
    abandon();
    1
}
