//! A mount outlives the process serving it (real registry, real FUSE mounts, root): readers
//! that keep reading and checking files through a mount see no error and no wrong byte while
//! the serving process is SIGKILLed ten times, or replaced by another binary (`stratafs
//! upgrade`); the holder keeps the connection and starts the next server each time. When the
//! holder itself is killed the server goes on serving, and a later crash of the server ends the
//! mount with errors, not a hang.
//!
//! Every read here drops the file's pages first (POSIX_FADV_DONTNEED), so it reaches the
//! serving process instead of the kernel's page cache; a few files are large enough to be
//! opened with FUSE passthrough once cached, and each reader keeps one such file open across
//! all restarts.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::mount::*;
use common::*;

type Files = Arc<Vec<(String, Vec<u8>)>>;

/// 90 files from empty to 1.6 MB in a few directories, one gzip layer.
fn image() -> (Image, Vec<(String, Vec<u8>)>) {
    let mut files = Vec::new();
    for i in 0..90usize {
        let size = match i % 6 {
            0 => (i * 131) % 3000,
            1 | 2 => 20_000 + (i * 1237) % 80_000,
            3 | 4 => 150_000 + (i * 7919) % 300_000,
            _ => 1_100_000 + (i * 10_007) % 500_000,
        };
        files.push((format!("d{}/f{i:02}", i % 4), bytes(500 + i as u64, size)));
    }
    let dirs: Vec<String> = (0..4).map(|d| format!("d{d}")).collect();
    (common::image::gzip_image_of(&dirs, &files), files)
}

struct Env {
    _reg: Registry,
    cli: Stratafs,
    files: Files,
    guard: MountGuard,
}

/// The image pushed and indexed, the cache empty, and the image mounted by `bin` (a copy of
/// the binary under test, so that it can be replaced).
fn mounted(name: &str, bin: &Path) -> Env {
    let (image, files) = image();
    let (reg, cli, reference) = pushed_and_indexed(&format!("restart/{name}"), &image);
    let guard = MountGuard::new(Some(cli.root()));
    let base = cli.command();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(base.get_args());
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.env("STRATAFS_LOG", "info")
        .arg("mount")
        .arg(&reference)
        .arg(&guard.dir);
    let out = run(&mut cmd, MOUNT_TIMEOUT);
    assert!(out.status.success(), "stratafs mount: {}", show(&out));
    Env {
        _reg: reg,
        cli,
        files: Arc::new(files),
        guard,
    }
}

/// Waits until a process other than `old` serves `dir`; returns (pid, holder).
fn next_server(cli: &Stratafs, dir: &Path, old: u32) -> (u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((pid, holder)) = cli.serving(dir).filter(|(p, _)| *p != old && alive(*p)) {
            return (pid, holder);
        }
        assert!(
            Instant::now() < deadline,
            "no new serving process for {} 30 s after {old} went",
            dir.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Drops the page cache of `f`, so the next read goes to the serving process.
fn uncache(f: &std::fs::File) {
    let _ = nix::fcntl::posix_fadvise(
        f.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Every reader's failure, as it happens (the tests of this file run as separate processes).
static ERRORS: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();

#[derive(Debug)]
enum End {
    Stopped,
    Failed(String),
}

/// `n` readers checking random whole files (opened anew each time) and ranges of one large
/// file each keeps open, until `stop`; `progress` counts checked reads.
fn readers(
    n: usize,
    mnt: &Path,
    files: &Files,
    stop: &Arc<AtomicBool>,
    progress: &Arc<AtomicUsize>,
) -> mpsc::Receiver<End> {
    let (tx, rx) = mpsc::channel();
    let errors = ERRORS.get_or_init(Default::default);
    let large: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].1.len() > 1_000_000)
        .collect();
    for t in 0..n {
        let (tx, mnt, files, stop, progress) = (
            tx.clone(),
            mnt.to_path_buf(),
            files.clone(),
            stop.clone(),
            progress.clone(),
        );
        let kept = large[t % large.len()];
        thread::spawn(move || {
            let mut rng = Rng::new(77 + t as u64);
            let (kept_path, kept_content) = &files[kept];
            let held = match std::fs::File::open(mnt.join(kept_path)) {
                Ok(f) => f,
                Err(e) => {
                    return tx
                        .send(End::Failed(format!("open {kept_path}: {e}")))
                        .unwrap()
                }
            };
            let end = loop {
                if stop.load(Ordering::SeqCst) {
                    break End::Stopped;
                }
                let result = if rng.below(3) == 0 {
                    let off = rng.below(kept_content.len() as u64) as usize;
                    let len = (rng.below(200_000) as usize + 1).min(kept_content.len() - off);
                    let mut buf = vec![0u8; len];
                    uncache(&held);
                    held.read_exact_at(&mut buf, off as u64)
                        .map_err(|e| format!("held {kept_path} at {off}+{len}: {e}"))
                        .and_then(|()| {
                            (buf == kept_content[off..off + len])
                                .then_some(())
                                .ok_or_else(|| {
                                    format!("held {kept_path} at {off}+{len}: wrong bytes")
                                })
                        })
                } else {
                    let (path, want) = &files[rng.below(files.len() as u64) as usize];
                    std::fs::File::open(mnt.join(path))
                        .and_then(|mut f| {
                            uncache(&f);
                            let mut got = Vec::new();
                            f.read_to_end(&mut got).map(|_| got)
                        })
                        .map_err(|e| format!("{path}: {e}"))
                        .and_then(|got| {
                            (got == *want)
                                .then_some(())
                                .ok_or_else(|| format!("{path}: wrong bytes ({} read)", got.len()))
                        })
                };
                match result {
                    Ok(()) => {
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(e.clone());
                        break End::Failed(e);
                    }
                }
            };
            // Closed before saying so: the test unmounts once every reader has.
            drop(held);
            let _ = tx.send(end);
        });
    }
    rx
}

/// Waits until the readers made `more` further checked reads (at most 60 s).
fn wait_progress(env: &Env, progress: &AtomicUsize, more: usize, what: &str) {
    let target = progress.load(Ordering::SeqCst) + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::SeqCst) < target {
        let errors = ERRORS.get_or_init(Default::default).lock().unwrap().clone();
        assert!(
            errors.is_empty(),
            "readers failed {what}: {errors:?}\n{}",
            logs(env)
        );
        assert!(
            Instant::now() < deadline,
            "readers stalled {what}: {} reads, waiting for {target}\n{}",
            progress.load(Ordering::SeqCst),
            logs(env)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Stops the readers and asserts each one only ever read the right bytes without an error.
fn stop_readers(env: &Env, stop: &AtomicBool, rx: mpsc::Receiver<End>, n: usize) {
    stop.store(true, Ordering::SeqCst);
    for _ in 0..n {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(End::Stopped) => {}
            Ok(End::Failed(e)) => panic!("a reader failed: {e}\n{}", logs(env)),
            Err(_) => panic!(
                "a reader is still blocked 60 s after being told to stop\n{}",
                logs(env)
            ),
        }
    }
}

/// The mount's daemon logs (holder and servers), for failure messages.
fn logs(env: &Env) -> String {
    let mut out = String::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
        if stack.contains("fuse") {
            out.push_str(&format!("--- task {:?}\n{stack}", t.file_name()));
        }
    }
    for c in std::fs::read_dir("/sys/fs/fuse/connections")
        .into_iter()
        .flatten()
        .flatten()
    {
        let w = std::fs::read_to_string(c.path().join("waiting")).unwrap_or_default();
        out.push_str(&format!("--- conn {:?} waiting {w}", c.file_name()));
    }
    for e in std::fs::read_dir(env.cli.root().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.push_str(&format!("--- {}\n", e.path().display()));
        out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    out
}

/// Unmounts with `stratafs umount` and checks holder and server are gone.
fn unmount(env: &Env) {
    let pids = daemon_pids(&env.guard.dir);
    let out = run(
        env.cli.command().arg("umount").arg(&env.guard.dir),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stratafs umount: {}", show(&out));
    assert!(mount_at(&env.guard.dir).is_none(), "still mounted");
    assert!(
        wait_gone(&pids, Duration::from_secs(10)),
        "{pids:?} still running after umount"
    );
}

const READERS: usize = 8;

#[test]
fn readers_see_no_error_while_the_serving_process_is_killed_ten_times() {
    let env = mounted("kill", Path::new(BIN));
    let dir = env.guard.dir.clone();
    let (mut pid, holder) = env.cli.serving(&dir).expect("the mount is listed");
    assert_ne!(pid, holder, "a holder and a separate serving process");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let rx = readers(READERS, &dir, &env.files, &stop, &progress);
    wait_progress(&env, &progress, 100, "before the first kill");
    for round in 0..10 {
        kill(pid, "KILL");
        let (next, same_holder) = next_server(&env.cli, &dir, pid);
        assert_eq!(same_holder, holder, "round {round}: the holder changed");
        assert!(!alive(pid), "round {round}: {pid} survived SIGKILL");
        pid = next;
        wait_progress(&env, &progress, 40, &format!("after kill {}", round + 1));
    }
    stop_readers(&env, &stop, rx, READERS);
    eprintln!(
        "{} checked reads across 10 kills",
        progress.load(Ordering::SeqCst)
    );
    unmount(&env);
}

#[test]
fn stratafs_upgrade_replaces_the_serving_binary_under_readers() {
    // A copy of the binary mounts; an "upgrade" installs a different file at its path.
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("stratafs");
    std::fs::copy(BIN, &bin).unwrap();
    let env = mounted("upgrade", &bin);
    let dir = env.guard.dir.clone();
    let (pid, holder) = env.cli.serving(&dir).expect("the mount is listed");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let rx = readers(READERS, &dir, &env.files, &stop, &progress);
    wait_progress(&env, &progress, 100, "before the upgrade");

    // The new binary: other bytes (a trailer after the ELF image), installed by rename.
    let mut new = std::fs::read(BIN).unwrap();
    new.extend_from_slice(b"stratafs upgrade test trailer");
    let staged = bin_dir.path().join("stratafs.new");
    std::fs::write(&staged, &new).unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &bin).unwrap();
    let out = env.cli.ok(&["upgrade", dir.to_str().unwrap()]);
    let (next, same_holder) = env.cli.serving(&dir).expect("still listed");
    assert_ne!(
        next, pid,
        "upgrade returned before another process served: {out}"
    );
    assert_eq!(same_holder, holder);
    let exe = std::fs::read_link(format!("/proc/{next}/exe")).unwrap();
    assert_eq!(exe, bin, "the new server runs the installed binary");
    let running = std::fs::metadata(format!("/proc/{next}/exe")).unwrap();
    assert_eq!(
        running.len(),
        new.len() as u64,
        "the new server runs the new file, not the old one"
    );
    wait_progress(&env, &progress, 100, "after the upgrade");
    stop_readers(&env, &stop, rx, READERS);
    unmount(&env);
}

#[test]
fn a_killed_holder_leaves_the_server_serving_and_a_later_crash_fails_reads_without_hanging() {
    let env = mounted("holder", Path::new(BIN));
    let dir = env.guard.dir.clone();
    let (pid, holder) = env.cli.serving(&dir).expect("the mount is listed");
    kill(holder, "KILL");
    assert!(
        wait_gone(&[holder], Duration::from_secs(10)),
        "holder survived"
    );
    // Still served.
    let (path, want) = &env.files[7];
    let got = within(Duration::from_secs(60), {
        let p = dir.join(path);
        move || std::fs::read(p)
    })
    .expect("a read hangs after the holder was killed")
    .expect("a read fails after the holder was killed");
    assert_eq!(&got, want);
    assert!(alive(pid), "the server died with its holder");

    // Without a holder, the server's crash ends the connection: errors, not a hang.
    kill(pid, "KILL");
    assert!(wait_gone(&[pid], Duration::from_secs(10)));
    let p = dir.join(&env.files[8].0);
    let r = within(Duration::from_secs(20), move || std::fs::read(p))
        .expect("a read hangs on a mount whose holder and server are both gone");
    let e = r.expect_err("a read succeeded with no process serving");
    assert!(
        [ENOTCONN, ECONNABORTED].contains(&e.raw_os_error().unwrap_or(0)),
        "{e}"
    );
    let out = run(
        env.cli.command().arg("umount").arg(&dir),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stratafs umount: {}", show(&out));
    assert!(mount_at(&dir).is_none());
}
