//! For the tests that mount: running commands with a deadline, reading the mount table,
//! finding the FUSE daemon of a mountpoint, and a guard that always leaves the mountpoint
//! unmounted.
//!
//! Everything that could block on a broken mount has a deadline: a hung driver must fail the
//! test, never hang it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `stratafs` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_stratafs");

/// errno values (Linux) a read through a broken mount may fail with.
pub const EIO: i32 = 5;
pub const EROFS: i32 = 30;
pub const ECONNABORTED: i32 = 103;
pub const ENOTCONN: i32 = 107;

/// How long a `mount` / `stratafs mount` may take (metadata pull + FUSE start).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// A small xorshift generator for test randomness (seeded, reproducible).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs `cmd` (stdin closed, stdout and stderr piped) and waits at most `timeout` for it to
/// exit *and* for its stdout/stderr to reach end of file. The second part matters for commands
/// that start a daemon: a daemon that keeps the caller's pipes open hangs every
/// `$(stratafs mount …)` in a shell, so it is reported as an error too.
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {what}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    for (i, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        let mut pipe = pipe.expect("piped");
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((i, buf));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("wait for {what}: {e}")),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {timeout:?} (killed)"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    // The command has exited; its pipes should close at once. Allow a few seconds anyway.
    let pipe_deadline = deadline.max(Instant::now() + Duration::from_secs(5));
    for _ in 0..2 {
        let left = pipe_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, b)) => stdout = b,
            Ok((_, b)) => stderr = b,
            Err(_) => {
                return Err(format!(
                    "{what} exited ({status}) but its stdout/stderr stayed open: a process it \
                     started (the daemon?) kept the caller's pipes"
                ))
            }
        }
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// [`try_run`], panicking on a timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// stdout and stderr of an output, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One line of `/proc/self/mountinfo` (the library's parser).
pub use stratafs::fuse::MountEntry as MountInfo;

/// Every mount of this mount namespace.
pub fn mounts() -> Vec<MountInfo> {
    stratafs::fuse::mount_entries()
}

/// The topmost mount on `dir`, if any.
pub fn mount_at(dir: &Path) -> Option<MountInfo> {
    mounts().into_iter().rev().find(|m| m.mountpoint == dir)
}

/// Processes whose command line names `dir` and whose program is `stratafs` (the FUSE daemon
/// serving it; the `mount` command that started it has exited by the time this is called).
pub fn daemon_pids(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let want = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if !args.contains(&want) {
            continue;
        }
        let argv0 = args
            .first()
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = |s: &str| s.rsplit('/').next().unwrap_or("").to_string();
        if base(&exe).starts_with("stratafs") || argv0.is_some_and(|a| base(&a) == "stratafs") {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // `pid (comm) S ...`: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            state != Some('Z') && state != Some('X')
        }
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive; false after `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pids.iter().all(|&p| !alive(p))
}

/// `kill -SIGNAL pid`.
pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Waits for a mount of type `fuse.stratafs` on `dir` (the mount command returns once it
/// answers, so this is normally immediate).
pub fn wait_mounted(dir: &Path, timeout: Duration) -> Option<MountInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(m) = mount_at(dir).filter(|m| m.fstype == "fuse.stratafs") {
            return Some(m);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` on another thread and waits at most `timeout` for it: `None` if it did not
/// finish (the thread is left behind, blocked — a hang, which the caller turns into a failure).
pub fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// Keeps a mountpoint directory and makes sure nothing stays mounted on it (nor any daemon
/// serving it) when the test ends, passed or failed: `stratafs umount`, then, if that did not
/// work, aborting the FUSE connection and `umount -l`, then SIGKILL for a daemon left behind.
pub struct MountGuard {
    pub dir: PathBuf,
    root: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

impl MountGuard {
    /// A fresh, empty mountpoint directory.
    pub fn new(root: Option<PathBuf>) -> MountGuard {
        let tmp = tempfile::Builder::new()
            .prefix("stratafs-mnt-")
            .tempdir()
            .expect("mountpoint tempdir");
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        MountGuard {
            dir,
            root,
            _tmp: Some(tmp),
        }
    }

    /// `reference` mounted by `cli` with background fill off (only what reads and their
    /// predictions fetch), the daemon logging at `log_level`.
    pub fn lazy(cli: &super::cli::Stratafs, reference: &str, log_level: &str) -> MountGuard {
        let guard = MountGuard::new(Some(cli.root()));
        let dir = guard.dir.to_str().unwrap();
        cli.ok(&[
            "--log-level",
            log_level,
            "mount",
            "-o",
            "nobackground",
            reference,
            dir,
        ]);
        guard
    }

    /// Guards an existing directory (kept afterwards).
    pub fn at(dir: &Path, root: Option<PathBuf>) -> MountGuard {
        MountGuard {
            dir: dir.to_path_buf(),
            root,
            _tmp: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    /// Best-effort cleanup; never panics (it runs in `Drop`, possibly while unwinding).
    pub fn cleanup(&self) {
        let daemons = daemon_pids(&self.dir);
        if mount_at(&self.dir).is_some() {
            let mut cmd = Command::new(BIN);
            if let Some(root) = &self.root {
                cmd.arg("--root").arg(root);
            }
            cmd.arg("umount").arg(&self.dir);
            if let Err(e) = try_run(&mut cmd, Duration::from_secs(30)) {
                eprintln!("cleanup: {e}");
            }
        }
        for _ in 0..5 {
            let Some(m) = mount_at(&self.dir) else { break };
            if m.fstype.starts_with("fuse") {
                abort_fuse_connection(&m);
            }
            let _ = try_run(
                Command::new("umount").arg("-l").arg(&self.dir),
                Duration::from_secs(10),
            );
        }
        let mut left = daemons;
        left.extend(daemon_pids(&self.dir));
        if !wait_gone(&left, Duration::from_secs(5)) {
            for &pid in &left {
                if alive(pid) {
                    eprintln!(
                        "cleanup: daemon {pid} for {} still running: SIGKILL",
                        self.dir.display()
                    );
                    kill(pid, "KILL");
                }
            }
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Aborts a FUSE connection through fusectl (mounting it if needed): every pending and future
/// request fails, so nothing blocked on the mount stays blocked.
pub fn abort_fuse_connection(m: &MountInfo) {
    let Some(minor) = m.dev.split(':').nth(1) else {
        return;
    };
    let conns = Path::new("/sys/fs/fuse/connections");
    if !conns.join(minor).exists() {
        let _ = try_run(
            Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(conns),
            Duration::from_secs(10),
        );
    }
    let _ = std::fs::write(conns.join(minor).join("abort"), b"1");
}
