//! FUSE mounts under stress and failure, against a real registry and real mounts (root, /dev/fuse):
//! 64 concurrent readers get exact bytes and all finish; a SIGKILLed daemon (holder and serving
//! process both; tests/daemon_restart.rs kills the serving process alone) turns reads into
//! errors (not hangs) and the dead mount is repaired by `stratafs umount` or the next
//! `stratafs mount`; a read that cannot be fetched fails with EIO after `read_timeout`; and real
//! programs run from a mounted image under `chroot`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::mount::*;
use common::*;

type Files = Arc<Vec<(String, Vec<u8>)>>;

/// A few hundred files of varied sizes (empty to 2.5 MB) in nested directories, one gzip layer.
fn many_files_image() -> (Image, Vec<(String, Vec<u8>)>) {
    let mut dirs = BTreeSet::new();
    let mut files = Vec::new();
    for i in 0..320usize {
        let size = match i % 10 {
            0..=5 => (i * 97) % 5000,
            6 | 7 => 10_000 + (i * 1237) % 100_000,
            8 => 200_000 + (i * 7919) % 400_000,
            _ if i % 30 == 9 => 1_000_000 + (i * 104_729) % 1_500_000,
            _ => 50_000 + (i * 31) % 50_000,
        };
        let dir = if i % 7 == 0 {
            format!("d{:02}/sub", i % 12)
        } else {
            format!("d{:02}", i % 12)
        };
        dirs.insert(format!("d{:02}", i % 12));
        dirs.insert(dir.clone());
        files.push((format!("{dir}/f{i:03}"), bytes(1000 + i as u64, size)));
    }
    let dirs: Vec<String> = dirs.into_iter().collect();
    (common::image::gzip_image_of(&dirs, &files), files)
}

/// A registry serving the many-files image, and a store that knows its layer index but has an
/// empty chunk cache, so reads through a mount go to the registry.
struct Served {
    reg: Registry,
    cli: Stratafs,
    reference: String,
    files: Files,
    /// The layer blob: digest and size.
    layer: (String, u64),
}

fn serve(name: &str) -> Served {
    let (image, files) = many_files_image();
    let (reg, cli, reference) = pushed_and_indexed(&format!("robust/{name}"), &image);
    Served {
        reg,
        cli,
        reference,
        files: Arc::new(files),
        layer: (image.layers[0].digest.clone(), image.layers[0].size()),
    }
}

/// `stratafs mount [-o OPTS] REF DIR`; asserts it succeeds and the mount is there.
fn mount(cli: &Stratafs, reference: &str, dir: &Path, opts: &[&str]) {
    let mut cmd = cli.command();
    cmd.arg("mount");
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
    }
    cmd.arg(reference).arg(dir);
    let out = run(&mut cmd, MOUNT_TIMEOUT);
    assert!(
        out.status.success(),
        "stratafs mount {reference} {}: {}",
        dir.display(),
        show(&out)
    );
    assert!(
        wait_mounted(dir, Duration::from_secs(5)).is_some(),
        "stratafs mount succeeded but no fuse.stratafs mount on {}: {:?}",
        dir.display(),
        mount_at(dir)
    );
}

/// `stratafs umount DIR`; asserts it succeeds, the mount is gone and so is its daemon.
fn umount(cli: &Stratafs, dir: &Path) {
    let daemons = daemon_pids(dir);
    let out = run(
        cli.command().arg("umount").arg(dir),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "stratafs umount: {}", show(&out));
    assert!(
        mount_at(dir).is_none(),
        "still mounted after stratafs umount: {:?}",
        mount_at(dir)
    );
    assert!(
        wait_gone(&daemons, Duration::from_secs(10)),
        "daemon {daemons:?} still running 10 s after stratafs umount"
    );
}

/// Index of the first differing byte, for messages.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("length {} instead of {}", got.len(), want.len()),
    }
}

/// Whole-file read through the mount, compared; `Err` describes a mismatch or an I/O error.
fn check_file(mnt: &Path, path: &str, want: &[u8]) -> Result<(), String> {
    match std::fs::read(mnt.join(path)) {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!(
            "{path}: wrong bytes, {}",
            first_difference(&got, want)
        )),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// One of the 64 readers: 40 random operations, each checked against the expected bytes.
fn reader(t: usize, mnt: &Path, files: &Files, shared: &std::fs::File) -> Result<u64, String> {
    let mut rng = Rng::new(t as u64 + 7);
    let mut read = 0u64;
    let (shared_path, shared_content) = files.iter().max_by_key(|(_, c)| c.len()).expect("files");
    for _ in 0..40 {
        let (path, content) = &files[rng.below(files.len() as u64) as usize];
        let full = mnt.join(path);
        match rng.below(5) {
            0 => {
                check_file(mnt, path, content)?;
                read += content.len() as u64;
            }
            1 | 2 => {
                let f = std::fs::File::open(&full).map_err(|e| format!("open {path}: {e}"))?;
                let off = rng.below(content.len() as u64 + 1) as usize;
                let len = (rng.below(300_000) as usize + 1).min(content.len() - off);
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, off as u64)
                    .map_err(|e| format!("{path} at {off}+{len}: {e}"))?;
                if buf != content[off..off + len] {
                    return Err(format!(
                        "{path} at {off}+{len}: wrong bytes, {}",
                        first_difference(&buf, &content[off..off + len])
                    ));
                }
                // Past the end: nothing.
                let mut tail = [0u8; 16];
                let n = f
                    .read_at(&mut tail, content.len() as u64)
                    .map_err(|e| format!("{path} at EOF: {e}"))?;
                if n != 0 {
                    return Err(format!("{path}: {n} bytes read past the end"));
                }
                read += len as u64;
            }
            3 => {
                let meta = std::fs::metadata(&full).map_err(|e| format!("stat {path}: {e}"))?;
                if meta.len() != content.len() as u64 || !meta.is_file() {
                    return Err(format!("stat {path}: {meta:?}"));
                }
                let (dir, name) = path.rsplit_once('/').unwrap();
                let names: Vec<String> = std::fs::read_dir(mnt.join(dir))
                    .map_err(|e| format!("readdir {dir}: {e}"))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("readdir {dir}: {e}"))?;
                if !names.iter().any(|n| n == name) {
                    return Err(format!("readdir {dir}: {name} missing from {names:?}"));
                }
            }
            _ => {
                // One file handle shared by all readers, read at random offsets.
                let off = rng.below(shared_content.len() as u64) as usize;
                let len = (rng.below(200_000) as usize + 1).min(shared_content.len() - off);
                let mut buf = vec![0u8; len];
                shared
                    .read_exact_at(&mut buf, off as u64)
                    .map_err(|e| format!("shared {shared_path} at {off}+{len}: {e}"))?;
                if buf != shared_content[off..off + len] {
                    return Err(format!(
                        "shared {shared_path} at {off}+{len}: wrong bytes, {}",
                        first_difference(&buf, &shared_content[off..off + len])
                    ));
                }
                read += len as u64;
            }
        }
    }
    Ok(read)
}

#[test]
fn sixty_four_concurrent_readers_get_exact_bytes_and_all_finish() {
    // The readers' misses fetch, not background fill (which starts at mount and, over
    // loopback, could fill this small image before they read).
    concurrent_readers(&["nobackground"], true);
}

/// As above with background fill on (the default), which starts at mount and runs beside
/// the readers, giving way to their fetches: every byte is still exact.
#[test]
fn sixty_four_concurrent_readers_beside_background_fill_get_exact_bytes() {
    concurrent_readers(&[], false);
}

/// 64 readers read the image's files (and one shared file) through a mount with `options`;
/// `misses_fetch`: the cache is empty when they start, so their misses reach the registry.
fn concurrent_readers(options: &[&str], misses_fetch: bool) {
    const READERS: usize = 64;
    const BOUND: Duration = Duration::from_secs(300);
    let s = serve("concurrent");
    let guard = MountGuard::new(Some(s.cli.root()));
    mount(&s.cli, &s.reference, &guard.dir, options);

    let biggest = &s.files.iter().max_by_key(|(_, c)| c.len()).unwrap().0;
    let shared = Arc::new(std::fs::File::open(guard.path(biggest)).expect("open shared file"));
    let mark = s.reg.log_mark();
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    for t in 0..READERS {
        let (tx, mnt, files, shared) = (
            tx.clone(),
            guard.dir.clone(),
            s.files.clone(),
            shared.clone(),
        );
        thread::spawn(move || {
            let _ = tx.send((t, reader(t, &mnt, &files, &shared)));
        });
    }
    drop(tx);
    let mut failures = Vec::new();
    let mut total = 0u64;
    for finished in 0..READERS {
        let left = (started + BOUND).saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Ok(n))) => total += n,
            Ok((t, Err(e))) => failures.push(format!("reader {t}: {e}")),
            Err(_) => panic!(
                "only {finished} of {READERS} readers finished within {BOUND:?}: deadlock or hang \
                 in the FUSE driver (failures so far: {failures:#?})"
            ),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(total > 10_000_000, "{total} bytes read");
    // The cache started empty: the readers' misses went to the registry, concurrently.
    let fetches = s
        .reg
        .access_log_since(mark)
        .iter()
        .filter(|e| e.path.contains("/blobs/") && e.user_agent.starts_with("stratafs/"))
        .count();
    assert!(fetches > 0 || !misses_fetch, "no blob range was fetched");
    eprintln!(
        "{READERS} readers read {total} bytes in {:?} ({fetches} range requests)",
        started.elapsed()
    );
    drop(shared);
    umount(&s.cli, &guard.dir);
}

/// Sixteen readers read every file of the layer at once, each starting at a different file, so
/// at any moment several of them want the same byte ranges. Single flight per range means each
/// compressed byte crosses the link once: the registry's access log must show no more bytes of
/// the layer blob than the blob has (a little slack for gzip spans that share the byte holding
/// a checkpoint's bit boundary). Without it, the overlapping misses would fetch up to 16 times.
#[test]
fn concurrent_readers_of_overlapping_ranges_fetch_each_byte_once() {
    const READERS: usize = 16;
    let mut s = serve("overlap");
    // Room for the whole layer, so nothing is evicted and fetched again.
    s.cli.set_config("[cache]\nmax_size = \"1G\"\n");
    let guard = MountGuard::new(Some(s.cli.root()));
    // Only the readers' misses (and what they bring along) fetch: no background fill.
    mount(&s.cli, &s.reference, &guard.dir, &["nobackground"]);
    let mark = s.reg.log_mark();
    let start = Arc::new(std::sync::Barrier::new(READERS));
    let readers: Vec<_> = (0..READERS)
        .map(|t| {
            let (mnt, files, start) = (guard.dir.clone(), s.files.clone(), start.clone());
            thread::spawn(move || -> Result<(), String> {
                start.wait();
                let first = t * files.len() / READERS;
                for i in 0..files.len() {
                    let (path, content) = &files[(first + i) % files.len()];
                    check_file(&mnt, path, content)?;
                }
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = readers
        .into_iter()
        .filter_map(|r| r.join().expect("reader panicked").err())
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    // Once the daemon has exited, every fetch it started (neighbours, read-ahead) is logged.
    umount(&s.cli, &guard.dir);
    let (digest, size) = &s.layer;
    let fetched: Vec<u64> = s
        .reg
        .access_log_since(mark)
        .iter()
        .filter(|e| e.method == "GET" && e.path.ends_with(&format!("/blobs/{digest}")))
        .map(|e| e.bytes)
        .collect();
    let bytes: u64 = fetched.iter().sum();
    eprintln!(
        "{READERS} readers of every file: {} range requests, {bytes} bytes of a {size}-byte blob",
        fetched.len()
    );
    assert!(
        bytes >= size / 2,
        "the readers read the whole layer: {bytes} of {size}"
    );
    assert!(
        bytes <= size + size / 50,
        "{bytes} bytes fetched for a {size}-byte blob: some ranges were fetched more than once"
    );
}

/// How a looping reader ended (the fields are read through `Debug`, in failure messages).
#[derive(Debug)]
#[allow(dead_code)]
enum ReaderEnd {
    /// An I/O error: errno and message.
    Error(Option<i32>, String),
    /// A read returned bytes that differ from the file's: never acceptable.
    WrongBytes(String),
    /// Told to stop while still reading successfully.
    Stopped,
}

/// `n` readers reading random whole files in a loop until an error (or `stop`); `progress`
/// counts checked reads.
fn looping_readers(
    n: usize,
    mnt: &Path,
    files: &Files,
    stop: &Arc<AtomicBool>,
    progress: &Arc<AtomicUsize>,
) -> mpsc::Receiver<(usize, ReaderEnd)> {
    let (tx, rx) = mpsc::channel();
    for t in 0..n {
        let (tx, mnt, files, stop, progress) = (
            tx.clone(),
            mnt.to_path_buf(),
            files.clone(),
            stop.clone(),
            progress.clone(),
        );
        thread::spawn(move || {
            let mut rng = Rng::new(1000 + t as u64);
            let end = loop {
                if stop.load(Ordering::SeqCst) {
                    break ReaderEnd::Stopped;
                }
                let (path, want) = &files[rng.below(files.len() as u64) as usize];
                match std::fs::read(mnt.join(path)) {
                    Ok(got) if got == *want => {
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(got) => {
                        break ReaderEnd::WrongBytes(format!(
                            "{path}: {}",
                            first_difference(&got, want)
                        ))
                    }
                    Err(e) => break ReaderEnd::Error(e.raw_os_error(), format!("{path}: {e}")),
                }
            };
            let _ = tx.send((t, end));
        });
    }
    rx
}

/// Kills the daemon of `dir` with SIGKILL while `n` readers are reading, and checks every
/// reader ends with an error (not a hang, never wrong bytes). Returns with the mount dead.
fn kill_daemon_mid_read(s: &Served, dir: &Path) {
    let pids = daemon_pids(dir);
    assert!(
        !pids.is_empty(),
        "no stratafs process has {} in its command line",
        dir.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    const N: usize = 16;
    let rx = looping_readers(N, dir, &s.files, &stop, &progress);
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.load(Ordering::SeqCst) < 40 {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            panic!(
                "readers made only {} reads in 120 s before the kill",
                progress.load(Ordering::SeqCst)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    // The holder and the serving process both, the holder first (from the mount record), so
    // that it cannot start another server. (SIGSTOP first would not do: a stopped serving
    // process blocks whoever reads its /proc entries or waits on its pages.)
    let holders: Vec<u32> = std::fs::read_dir(s.cli.root().join("run/mounts"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).ok()?).ok()
        })
        .filter_map(|r| r["holder"].as_u64().map(|h| h as u32))
        .collect();
    assert!(
        !holders.is_empty(),
        "no holder recorded for {}",
        dir.display()
    );
    for &pid in &holders {
        kill(pid, "KILL");
    }
    assert!(
        wait_gone(&holders, Duration::from_secs(10)),
        "holder {holders:?} survived SIGKILL"
    );
    for &pid in &pids {
        kill(pid, "KILL");
    }
    let killed = Instant::now();
    assert!(
        wait_gone(&pids, Duration::from_secs(10)),
        "daemon {pids:?} survived SIGKILL"
    );
    let mut ends = Vec::new();
    for _ in 0..N {
        let left = (killed + Duration::from_secs(60)).saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(end) => ends.push(end),
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                panic!(
                    "{} of {N} readers still blocked 60 s after the daemon was killed: {ends:#?}",
                    N - ends.len()
                );
            }
        }
    }
    let still_mounted = mount_at(dir).is_some();
    for (t, end) in &ends {
        match end {
            ReaderEnd::Error(Some(errno), _) if [ENOTCONN, EIO, ECONNABORTED].contains(errno) => {}
            // A driver that unmounts itself when its daemon dies leaves an empty directory.
            ReaderEnd::Error(Some(2), _) if !still_mounted => {}
            other => panic!("reader {t} after the daemon was killed: {other:?}"),
        }
    }
    eprintln!(
        "{} reads before the kill; readers ended with {:?}",
        progress.load(Ordering::SeqCst),
        ends.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
    if still_mounted {
        // The classic dead FUSE mount: every access fails with ENOTCONN, immediately.
        let d = dir.to_path_buf();
        let r = within(Duration::from_secs(20), move || {
            std::fs::read_dir(&d).map(|_| ())
        })
        .expect("readdir of the dead mount hangs");
        let e = r.expect_err("readdir of a dead mount succeeded");
        assert_eq!(e.raw_os_error(), Some(ENOTCONN), "{e}");
    }
}

/// A sample of files (every 9th, plus the biggest) read back exactly through the mount.
fn check_sample(dir: &Path, files: &Files) {
    let mut sample: Vec<&(String, Vec<u8>)> = files.iter().step_by(9).collect();
    sample.push(files.iter().max_by_key(|(_, c)| c.len()).unwrap());
    let (d, sample): (PathBuf, Vec<(String, Vec<u8>)>) =
        (dir.to_path_buf(), sample.into_iter().cloned().collect());
    let result = within(Duration::from_secs(180), move || {
        sample
            .iter()
            .map(|(p, c)| check_file(&d, p, c))
            .collect::<Result<Vec<()>, String>>()
    })
    .expect("reading the sample hangs (180 s)");
    result.unwrap();
}

#[test]
fn killed_daemon_fails_reads_and_stratafs_umount_repairs_the_mount() {
    let s = serve("kill-umount");
    let guard = MountGuard::new(Some(s.cli.root()));
    mount(&s.cli, &s.reference, &guard.dir, &[]);
    kill_daemon_mid_read(&s, &guard.dir);

    if mount_at(&guard.dir).is_some() {
        let out = run(
            s.cli.command().arg("umount").arg(&guard.dir),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "stratafs umount of a dead mount: {}",
            show(&out)
        );
    }
    assert!(
        mount_at(&guard.dir).is_none(),
        "dead mount still there after stratafs umount: {:?}",
        mount_at(&guard.dir)
    );
    let entries: Vec<_> = std::fs::read_dir(&guard.dir)
        .expect("the mountpoint is a plain directory again")
        .collect();
    assert!(entries.is_empty(), "{entries:?}");

    // The next mount works and serves the right bytes.
    mount(&s.cli, &s.reference, &guard.dir, &[]);
    check_sample(&guard.dir, &s.files);
    umount(&s.cli, &guard.dir);
}

#[test]
fn killed_daemon_is_replaced_by_the_next_mount() {
    let s = serve("kill-remount");
    let guard = MountGuard::new(Some(s.cli.root()));
    mount(&s.cli, &s.reference, &guard.dir, &[]);
    kill_daemon_mid_read(&s, &guard.dir);

    // `stratafs mount` on the dead mountpoint repairs it and mounts again.
    mount(&s.cli, &s.reference, &guard.dir, &[]);
    let on_dir: Vec<MountInfo> = mounts()
        .into_iter()
        .filter(|m| m.mountpoint == guard.dir)
        .collect();
    assert_eq!(
        on_dir.len(),
        1,
        "the dead mount was not replaced, the new one is stacked on it: {on_dir:#?}"
    );
    check_sample(&guard.dir, &s.files);
    umount(&s.cli, &guard.dir);
}

#[test]
fn a_read_that_cannot_be_fetched_fails_with_eio_after_read_timeout() {
    let s = serve("timeout");
    let guard = MountGuard::new(Some(s.cli.root()));
    mount(&s.cli, &s.reference, &guard.dir, &["read_timeout=3"]);
    let (path, want) = s
        .files
        .iter()
        .find(|(_, c)| c.len() > 500_000)
        .unwrap()
        .clone();

    s.reg.stop();
    // Metadata is local: stat still answers.
    let meta = std::fs::metadata(guard.path(&path)).expect("stat with the registry down");
    assert_eq!(meta.len(), want.len() as u64);

    let started = Instant::now();
    let p = guard.path(&path);
    let result = within(Duration::from_secs(60), move || std::fs::read(p))
        .expect("read still blocked 60 s after the registry stopped (read_timeout=3)");
    let elapsed = started.elapsed();
    match result {
        Ok(got) => panic!(
            "read {} bytes with the registry stopped and an empty cache",
            got.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "{path}: {e}"),
    }
    // The kernel retries a failed readahead at once with a one-page read; the driver fails
    // that at once (the file's read just timed out), so EIO comes after one timeout. Beyond
    // that plus a margin, something waits twice or hangs.
    assert!(
        elapsed < Duration::from_secs(3 + 2),
        "EIO only after {elapsed:?} with read_timeout=3"
    );
    eprintln!("EIO after {elapsed:?}");

    // The mount is still alive: once the registry is back, the same file reads exactly.
    assert!(mount_at(&guard.dir).is_some(), "the mount went away");
    s.reg.restart();
    let (d, p2, w) = (guard.dir.clone(), path.clone(), want.clone());
    let again = within(Duration::from_secs(120), move || check_file(&d, &p2, &w))
        .expect("read hangs after the registry came back");
    if let Err(e) = again {
        let logs = std::fs::read_dir(s.cli.root().join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>();
        panic!("{e} after the registry came back; daemon log:\n{logs}");
    }
    umount(&s.cli, &guard.dir);
}

#[test]
fn programs_run_from_a_mounted_image_under_chroot() {
    // A Debian-style root filesystem made of this machine's dash, a few coreutils and their
    // libraries, with the same usr-merge symlinks (/bin, /lib, /lib64) as here.
    let (mut entries, mut modes) = hostfs::host_rootfs(&[
        &["/bin/dash", "/usr/bin/dash"],
        &["/usr/bin/cat", "/bin/cat"],
        &["/usr/bin/sha256sum", "/bin/sha256sum"],
        &["/usr/bin/ls", "/bin/ls"],
        &["/usr/bin/wc", "/bin/wc"],
    ]);
    let hostname = "stratafs-chroot-test\n";
    entries.insert("etc".into(), EntryKind::Dir);
    entries.insert(
        "etc/hostname-file".into(),
        EntryKind::File(hostname.as_bytes().to_vec()),
    );
    modes.insert("etc".into(), 0o755);
    modes.insert("etc/hostname-file".into(), 0o644);
    let layer = hostfs::layer_of(&entries, &modes);
    let in_usr_bin = entries
        .keys()
        .filter(|p| p.starts_with("usr/bin/") && !p["usr/bin/".len()..].contains('/'))
        .count();
    let image = ImageBuilder::new()
        .arch(hostfs::host_arch())
        .layer(layer.build(Compression::Gzip))
        .build(ManifestFlavour::Oci);
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image("robust/debianish", "v1", &image, &Auth::None);
    let reference = format!("{}/robust/debianish:v1", reg.addr());
    let cli = Stratafs::new();

    let guard = MountGuard::new(Some(cli.root()));
    mount(&cli, &reference, &guard.dir, &["suid", "dev"]);
    let m = mount_at(&guard.dir).unwrap();
    assert!(
        !m.options.iter().any(|o| o == "nosuid" || o == "nodev"),
        "-o suid,dev not applied: {m:?}"
    );

    let out = run(
        Command::new("chroot").arg(&guard.dir).args([
            "/bin/sh",
            "-c",
            "echo hi; cat /etc/hostname-file; ls /usr/bin | wc -l",
        ]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "chroot: {}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hi\n{hostname}{in_usr_bin}\n"),
        "{}",
        show(&out)
    );

    // A program reading a large file (libc) through the mount gets the right bytes.
    let libc = entries
        .iter()
        .find(|(p, k)| p.contains("libc.so") && matches!(k, EntryKind::File(_)))
        .map(|(p, _)| p.clone())
        .expect("libc in the image");
    let out = run(
        Command::new("chroot")
            .arg(&guard.dir)
            .args(["/usr/bin/sha256sum", &format!("/{libc}")]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "chroot sha256sum: {}", show(&out));
    let EntryKind::File(libc_bytes) = &entries[&libc] else {
        unreachable!()
    };
    let want = sha256_digest(libc_bytes);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}  /{libc}\n", want.trim_start_matches("sha256:"))
    );
    umount(&cli, &guard.dir);
}
