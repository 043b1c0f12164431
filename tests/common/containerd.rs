//! A private `containerd` (Debian package, 1.6) process per test, driven
//! with `ctr` and `ctr-remote` (Debian package `stargz-snapshotter`).
//!
//! Each [`Containerd`] owns a temp dir holding its config, `root`, `state`,
//! `opt` dir, gRPC/ttrpc/debug sockets and a log file, so it never touches
//! the host's `/var/lib/containerd` or `/run/containerd/containerd.sock`
//! (shims would still use `/run/containerd/s`, but tests start no
//! containers). The CRI plugin is disabled unless asked for. On drop the process is stopped,
//! anything still mounted under the temp dir is unmounted and the dir is
//! removed.
//!
//! Needs root. Use [`Containerd::unavailable`] to skip a test where
//! containerd cannot run at all.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary.
pub const CONTAINERD_BIN: &str = "containerd";
/// containerd's CLI client.
pub const CTR_BIN: &str = "ctr";
/// `ctr` plus eStargz commands (`image convert --estargz`, `rpull`, ...).
pub const CTR_REMOTE_BIN: &str = "ctr-remote";
/// Namespace every `ctr`/`ctr-remote` call of the harness uses.
pub const NAMESPACE: &str = "stratafs-test";

/// How long to wait for the daemon to answer `ctr version`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for [`Containerd::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ContainerdOpts {
    /// External snapshotters: each `(name, socket)` becomes
    /// `[proxy_plugins.NAME] type = "snapshot" address = "SOCKET"`, usable
    /// as `ctr ... --snapshotter NAME`. The socket need not exist yet.
    pub proxy_snapshotters: Vec<(String, PathBuf)>,
    /// Raw TOML appended to the generated config (version 2).
    pub extra_toml: String,
    /// Keep the CRI plugin (configure it in `extra_toml`); disabled otherwise.
    pub cri: bool,
}

/// A running private containerd.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl Containerd {
    /// Why containerd cannot run here at all (a binary is missing, or we are
    /// not root), or `None` if it should. Tests print the reason and skip;
    /// any other failure is a real failure.
    pub fn unavailable() -> Option<String> {
        for bin in [CONTAINERD_BIN, CTR_BIN] {
            if which(bin).is_none() {
                return Some(format!(
                    "`{bin}` not on PATH (install the Debian packages `containerd runc`, see .ci/setup)"
                ));
            }
        }
        match effective_uid() {
            Some(0) => None,
            Some(uid) => Some(format!("containerd needs root, running as uid {uid}")),
            None => Some("cannot read the effective uid from /proc/self/status".into()),
        }
    }

    /// Start with default options; panics (with the log) if the daemon does
    /// not answer within 30 s.
    pub fn start() -> Containerd {
        Containerd::start_with(ContainerdOpts::default())
    }

    /// Start with `opts` (proxy snapshotters, extra config).
    pub fn start_with(opts: ContainerdOpts) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-containerd-")
            .tempdir()
            .expect("containerd tempdir");
        let config = config_toml(dir.path(), &opts);
        fs::write(dir.path().join("config.toml"), config).expect("write containerd config");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("containerd.log"))
            .expect("open containerd log");
        let child = Command::new(CONTAINERD_BIN)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CONTAINERD_BIN}: {e}"));
        let mut ctd = Containerd {
            dir: Some(dir),
            child: Some(child),
        };
        ctd.wait_ready();
        ctd
    }

    /// The gRPC socket path (for `ctr --address`).
    pub fn address(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// The temp dir (config, log, root, state, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("containerd dir").path()
    }

    /// containerd's `root` (content store, metadata, snapshots).
    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// Path of the daemon's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }

    /// The daemon's log so far.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Process id of the daemon, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr --address SOCKET --namespace stratafs-test ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.client(CTR_BIN, args)
    }

    /// `ctr-remote --address SOCKET --namespace stratafs-test ARGS...`.
    pub fn ctr_remote(&self, args: &[&str]) -> Output {
        self.client(CTR_REMOTE_BIN, args)
    }

    /// [`ctr`](Self::ctr), panicking with its output (and the daemon log's
    /// tail) unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.expect_ok(CTR_BIN, args, self.ctr(args))
    }

    /// `ctr images push --plain-http REFERENCE` of a test's fixture, tried once more if it
    /// fails: containerd 1.6's push to the distribution registry now and then ends in
    /// "failed to copy: … unexpected EOF" on a loaded machine (seen once in a fresh-clone
    /// `.ci/run`; the same test passed on its own every time). Returns stdout.
    pub fn push_plain_http(&self, reference: &str) -> String {
        let args = ["images", "push", "--plain-http", reference];
        let first = self.ctr(&args);
        if first.status.success() {
            return String::from_utf8_lossy(&first.stdout).into_owned();
        }
        eprintln!(
            "ctr images push {reference} failed, trying once more: {}",
            String::from_utf8_lossy(&first.stderr).trim()
        );
        self.ctr_ok(&args)
    }

    /// [`ctr_remote`](Self::ctr_remote), panicking unless it succeeds;
    /// returns stdout.
    pub fn ctr_remote_ok(&self, args: &[&str]) -> String {
        self.expect_ok(CTR_REMOTE_BIN, args, self.ctr_remote(args))
    }

    /// Image names known in the test namespace (`ctr images ls -q`).
    pub fn images(&self) -> Vec<String> {
        self.ctr_ok(&["images", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Stop the daemon (SIGTERM, SIGKILL after 10 s) and reap it.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, STOP_TIMEOUT);
        }
    }

    fn client(&self, bin: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {bin}: {e}"))
    }

    fn expect_ok(&self, bin: &str, args: &[&str], out: Output) -> String {
        if !out.status.success() {
            let log = self.log_contents();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let mut msg = format!(
                "{bin} {args:?} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log tail:\n",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for line in tail.iter().rev() {
                let _ = writeln!(msg, "  {line}");
            }
            panic!("{msg}");
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Poll `ctr version` until the daemon answers; panic if it exits or
    /// times out.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!("containerd exited with {status}:\n{}", self.log_contents());
                }
            }
            if self.address().exists() && self.ctr(&["version"]).status.success() {
                return;
            }
            if Instant::now() > deadline {
                self.stop();
                panic!(
                    "containerd did not answer after {START_TIMEOUT:?}:\n{}",
                    self.log_contents()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        let Some(dir) = self.dir.take() else {
            return;
        };
        // Unmount anything left under the dir (deepest first) before
        // removing it, so removal never walks into a mounted filesystem.
        let mut mounts = mounts_under(dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in &mounts {
            let _ = Command::new("umount").arg("-R").arg(m).status();
        }
        if !mounts_under(dir.path()).is_empty() {
            // Still busy: leak the dir rather than delete through a mount.
            eprintln!("containerd harness: mounts remain under {:?}", dir.path());
            let _ = dir.keep();
            return;
        }
        let _ = dir.close();
    }
}

/// The containerd config (version 2) for a temp dir.
fn config_toml(dir: &Path, opts: &ContainerdOpts) -> String {
    let p = |name: &str| toml_str(&dir.join(name));
    let mut t = String::new();
    let _ = writeln!(t, "version = 2");
    let _ = writeln!(t, "root = {}", p("root"));
    let _ = writeln!(t, "state = {}", p("state"));
    if !opts.cri {
        let _ = writeln!(t, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]");
    }
    let _ = writeln!(t, "\n[grpc]\n  address = {}", p("containerd.sock"));
    let _ = writeln!(t, "\n[ttrpc]\n  address = {}", p("containerd.sock.ttrpc"));
    let _ = writeln!(t, "\n[debug]\n  address = {}", p("debug.sock"));
    let _ = writeln!(t, "\n[metrics]\n  address = \"\"");
    let _ = writeln!(
        t,
        "\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}",
        p("opt")
    );
    for (name, socket) in &opts.proxy_snapshotters {
        let _ = writeln!(
            t,
            "\n[proxy_plugins.{}]\n  type = \"snapshot\"\n  address = {}",
            toml_str(Path::new(name)),
            toml_str(socket)
        );
    }
    t.push('\n');
    t.push_str(&opts.extra_toml);
    t
}

/// A TOML basic string holding `path`.
fn toml_str(path: &Path) -> String {
    let mut s = String::from("\"");
    for c in path.to_string_lossy().chars() {
        match c {
            '"' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// Mount points at or below `dir` (via `findmnt`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("findmnt")
        .args(["-rn", "-o", "TARGET"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| PathBuf::from(l.replace("\\x20", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// `bin`'s path if it is on `PATH`.
fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Effective uid, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
