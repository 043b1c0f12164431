//! The containerd remote snapshotter, end to end with the real parts: `stratafs snapshotter`
//! on a unix socket, a private containerd 1.6 with `[proxy_plugins.stratafs]`, runc, the
//! distribution registry, `ctr`, and `ctr-remote images rpull` (Debian stargz-snapshotter).
//!
//! Containers run programs from images made of this machine's dash and coreutils. A lazy pull
//! must leave the registry serving far fewer bytes than the layers hold; plain `ctr images pull`
//! must work eagerly; a zstd layer falls back to containerd's own unpack (and the layers above
//! it with it); the snapshotter can restart under running containers; a container keeps running
//! while its lazy mount's serving process is killed ten times and upgraded; after a simulated
//! reboot with the registry down, containers start from complete cached layers; and its API
//! answers like containerd's overlayfs snapshotter over the same `ctr snapshots` calls.
//!
//! A missing tool fails the test: `.ci/setup` installs everything.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Incompressible-ish filler per layer, so the layers are large next to what a command reads.
const FILLER: usize = 12 * 1024 * 1024;

/// containerd (dropped first), the snapshotter, the registry, and dirs for `ctr run`.
struct Env {
    ctd: Containerd,
    sn: Snapshotter,
    reg: Registry,
    run_dir: tempfile::TempDir,
}

fn env() -> Env {
    env_with(Snapshotter::start)
}

fn env_with(snapshotter: impl FnOnce() -> Snapshotter) -> Env {
    // .ci/setup installs everything: a missing tool fails the test.
    if let Some(why) = Containerd::unavailable() {
        panic!("containerd cannot run: {why}");
    }
    let sn = snapshotter();
    let ctd = Containerd::start_with(ContainerdOpts {
        proxy_snapshotters: vec![("stratafs".into(), sn.socket.clone())],
        ..Default::default()
    });
    Env {
        ctd,
        sn,
        reg: Registry::start(RegistryOpts::default()),
        run_dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    /// `ctr run` with extra flags (such as `--mount`) before the image.
    fn ctr_run_command_with(
        &self,
        flags: &[&str],
        snapshotter: &str,
        image: &str,
        id: &str,
        script: &str,
    ) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.ctd.address())
            .args(["--namespace", common::containerd::NAMESPACE, "run", "--rm"])
            .args(flags)
            .args(["--snapshotter", snapshotter])
            .arg("--fifo-dir")
            .arg(self.run_dir.path().join("fifo"))
            .arg("--runc-root")
            .arg(self.run_dir.path().join("runc"))
            .args([image, id, "/bin/sh", "-c", script])
            .stdin(Stdio::null());
        cmd
    }

    /// `ctr run --rm` of `script` under /bin/sh; panics with the logs unless it succeeds.
    /// Returns what the script wrote to its standard output, which goes to a file on a bind
    /// mount rather than through `ctr`'s FIFOs: once (a CI run of 2026-12-05) a container's
    /// output came back through them without its last write, its exit status 0.
    fn run(&self, snapshotter: &str, image: &str, id: &str, script: &str) -> String {
        let dir = self.run_dir.path().join(format!("out-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mount = format!(
            "type=bind,src={},dst=/stratafs-test-out,options=rbind:rw",
            dir.display()
        );
        let script = format!("exec >/stratafs-test-out/stdout; {script}");
        let out = self
            .ctr_run_command_with(&["--mount", &mount], snapshotter, image, id, &script)
            .output()
            .unwrap();
        self.expect_ok("ctr run", out);
        std::fs::read_to_string(dir.join("stdout")).unwrap()
    }

    fn expect_ok(&self, what: &str, out: Output) -> String {
        assert!(
            out.status.success(),
            "{what} failed: {}\nstdout: {}\nstderr: {}\n--- snapshotter log:\n{}\n--- containerd log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.sn.log(),
            tail(&self.ctd.log_contents(), 40),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pushes `image` and publishes its stratafs layer indexes (built by another store), so
    /// gzip layers are read by range from the first read.
    fn push(&self, repo: &str, image: &Image) -> String {
        self.reg.push_image(repo, "v1", image, &Auth::None);
        let reference = format!("{}/{repo}:v1", self.reg.addr());
        Stratafs::new().ok(&["index", "push", "--bind", &reference]);
        reference
    }

    fn rpull(&self, reference: &str) {
        self.ctd.ctr_remote_ok(&[
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stratafs",
            reference,
        ]);
    }

    /// Blob bytes the registry served per blob digest since `mark`.
    fn served(&self, mark: usize) -> BTreeMap<String, u64> {
        blob_bytes_served(&self.reg, mark)
    }

    /// Waits until containerd reaches the snapshotter again after a restart: containerd's
    /// proxy connection backs off (up to a few seconds) after failing to connect. `usage` asks
    /// the snapshotter itself for every snapshot.
    fn wait_snapshotter(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .ctd
                .ctr(&["snapshots", "--snapshotter", "stratafs", "usage"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd does not reach the restarted snapshotter: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn snapshots(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .ctd
            .ctr_ok(&["snapshots", "--snapshotter", "stratafs", "ls"])
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Two gzip layers: the base, then /etc/msg and a second filler.
fn two_layer_image() -> Image {
    hostfs::two_layer_image(FILLER, b"hello from layer 2\n")
}

#[test]
fn lazy_pull_runs_containers_fetching_a_fraction_of_the_layers() {
    let env = env();
    let image = two_layer_image();
    let reference = env.push("snap/lazy", &image);
    let mark = env.reg.log_mark();

    let started = Instant::now();
    env.rpull(&reference);
    let out = env.run(
        "stratafs",
        &reference,
        "lazy1",
        "cat /etc/msg; ls /usr/bin/sha256sum; echo written > /tmp/new; cat /tmp/new; sha256sum /opt/small",
    );
    eprintln!("rpull + first command: {:?}", started.elapsed());
    assert_eq!(
        out,
        format!(
            "hello from layer 2\n/usr/bin/sha256sum\nwritten\n{}  /opt/small\n",
            sha256_hex(&bytes(13, 20_000))
        )
    );

    // Every layer became a lazy snapshot named by its ChainID; none was downloaded.
    let snapshots = env.snapshots();
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    let (blob_bytes, layer_bytes, served) = image_layers_served(&env.reg, mark, &image);
    assert!(
        blob_bytes * 3 < layer_bytes,
        "served {blob_bytes} of {layer_bytes} layer bytes: {served:?}"
    );

    // Usage of a lazy layer: the bytes cached for it.
    let top = &image.layers[1];
    let chain_top = env
        .ctd
        .ctr_ok(&["snapshots", "--snapshotter", "stratafs", "ls"])
        .lines()
        .skip(1)
        .find(|l| !l.split_whitespace().nth(1).unwrap_or("").is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .expect("a snapshot with a parent");
    let usage = env.ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "stratafs",
        "usage",
        &chain_top,
    ]);
    assert!(
        !usage.contains(" 0.0 B"),
        "usage of a read lazy layer: {usage}\n{}",
        top.digest
    );

    // A second container on the same image: no new layer download.
    let mark = env.reg.log_mark();
    let out = env.run(
        "stratafs",
        &reference,
        "lazy2",
        "cat /etc/base-release /etc/msg",
    );
    assert_eq!(out, "stratafs test base\nhello from layer 2\n");
    let again: u64 = env.served(mark).values().sum();
    assert!(again < 1_000_000, "second run fetched {again} bytes");
}

#[test]
fn snapshotter_restarts_under_running_containers_and_remounts_dead_layers() {
    let mut env = env();
    let image = two_layer_image();
    let reference = env.push("snap/restart", &image);
    env.rpull(&reference);
    let before = env.snapshots();

    // A container that, once it runs, waits for the test's word (a file in a bind-mounted
    // directory) and then reads a file it has not touched: the word comes after the
    // snapshotter restarted, so that read is served across the restart.
    let sync = env.run_dir.path().join("sync");
    std::fs::create_dir_all(&sync).unwrap();
    let bind = format!(
        "type=bind,src={},dst=/sync,options=rbind:ro",
        sync.display()
    );
    let mut waiting = env
        .ctr_run_command_with(
            &["--mount", &bind],
            "stratafs",
            &reference,
            "long",
            "echo started; while [ ! -e /sync/go ]; do sleep 0.1; done; sha256sum /opt/filler2",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(waiting.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "started\n", "the container runs");
    env.sn.restart();
    env.wait_snapshotter();
    std::fs::write(sync.join("go"), b"").unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).unwrap();
    let mut out = waiting.wait_with_output().unwrap();
    out.stdout = rest;
    let out = env.expect_ok("container across a restart", out);
    assert_eq!(
        out,
        format!("{}  /opt/filler2\n", sha256_hex(&bytes(12, FILLER)))
    );
    assert_eq!(env.snapshots(), before, "snapshots after restart");
    let out = env.run("stratafs", &reference, "after", "cat /etc/msg");
    assert_eq!(out, "hello from layer 2\n");

    // The lazy layer's daemon dies while the snapshotter is down: the next start remounts it.
    env.sn.stop();
    let daemons = env.sn.daemons();
    assert!(!daemons.is_empty(), "no lazy mount daemon recorded");
    for pid in &daemons {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    // Gone (reaped by init) before the snapshotter starts again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemons
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "daemons {daemons:?} still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.sn.spawn();
    env.wait_snapshotter();
    let out = env.run(
        "stratafs",
        &reference,
        "remounted",
        "cat /etc/msg /etc/base-release",
    );
    assert_eq!(out, "hello from layer 2\nstratafs test base\n");
    assert_eq!(env.snapshots(), before);
}

/// Waits until `f` holds (checked every 20 ms), at most `secs` seconds; panics with `what`.
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} (waited {secs} s)");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lazy mounts' daemon logs, for failure messages.
fn mount_logs(env: &Env) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(env.sn.cli.root().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.push_str(&format!("--- {}\n", e.path().display()));
        out.push_str(&tail(
            &std::fs::read_to_string(e.path()).unwrap_or_default(),
            60,
        ));
        out.push('\n');
    }
    out
}

#[test]
fn a_container_runs_on_while_its_lazy_mount_daemons_are_killed_ten_times_and_upgraded() {
    let env = env();
    let image = two_layer_image();
    let reference = env.push("snap/crash", &image);
    env.rpull(&reference);

    // The container checks the files' sums (exec'ing sha256sum from its lazily served rootfs
    // each time) until told to stop, and counts its rounds in a shared directory.
    let sync = env.run_dir.path().join("crash-sync");
    std::fs::create_dir_all(&sync).unwrap();
    let sums = format!(
        "{}  /opt/filler1\n{}  /opt/filler2\n{}  /opt/small\n{}  /etc/msg\n",
        sha256_hex(&bytes(11, FILLER)),
        sha256_hex(&bytes(12, FILLER)),
        sha256_hex(&bytes(13, 20_000)),
        sha256_hex(b"hello from layer 2\n"),
    );
    std::fs::write(sync.join("sums"), sums).unwrap();
    let bind = format!(
        "type=bind,src={},dst=/sync,options=rbind:rw",
        sync.display()
    );
    let script = "n=0; while [ ! -e /sync/stop ]; do \
        /usr/bin/sha256sum --quiet -c /sync/sums || exit 1; \
        n=$((n+1)); echo $n > /sync/rounds.tmp && /bin/cat /sync/rounds.tmp > /sync/rounds; \
        done; echo ok $n";
    let mut child = env
        .ctr_run_command_with(&["--mount", &bind], "stratafs", &reference, "crash", script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rounds = || -> u64 {
        std::fs::read_to_string(sync.join("rounds"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    // The first kills come while the first round still fetches the files lazily.
    wait_until(120, "no lazy mount serves the container", || {
        !env.sn.daemons().is_empty()
    });
    let mut killed = 0;
    for round in 0..10 {
        let before = env.sn.daemons();
        for pid in &before {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            killed += 1;
        }
        wait_until(
            30,
            &format!("round {round}: no new serving processes"),
            || {
                let now = env.sn.daemons();
                now.len() == before.len()
                    && now.iter().all(|p| !before.contains(p))
                    && now
                        .iter()
                        .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            },
        );
        let seen = rounds();
        let deadline = Instant::now() + Duration::from_secs(60);
        while rounds() <= seen {
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "round {round}: the container exited ({status}): {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    mount_logs(&env)
                );
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the container made no progress in 60 s\n{}",
                mount_logs(&env)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // And an upgrade of every serving process (`stratafs upgrade`: the holder starts the binary
    // installed at its path again, which takes the mount over).
    let before = env.sn.daemons();
    let said = env.sn.cli.ok(&["upgrade"]);
    let after = env.sn.daemons();
    assert!(
        after.len() == before.len() && after.iter().all(|p| !before.contains(p)),
        "upgrade left {after:?} (was {before:?}): {said}"
    );
    let seen = rounds();
    wait_until(60, "no progress after the upgrade", || rounds() > seen);
    std::fs::write(sync.join("stop"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let out = env.expect_ok("container across ten crashes and an upgrade", out);
    assert!(out.starts_with("ok "), "{out}");
    eprintln!(
        "{killed} serving processes killed; the container made {}",
        out.trim()
    );
}

#[test]
fn after_a_reboot_containers_start_from_complete_cached_layers_with_the_registry_down() {
    // Background fetch completes the layers once a container ran.
    let env = env_with(|| {
        Snapshotter::start_configured(
            "[mount]\nbackground_fetch = true\nbackground_delay_secs = 0\n",
            &[],
        )
    });
    let image = two_layer_image();
    let reference = env.push("snap/reboot", &image);
    env.rpull(&reference);
    let out = env.run("stratafs", &reference, "before", "cat /etc/msg");
    assert_eq!(out, "hello from layer 2\n");
    let layers: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
    wait_until(120, "the layers were not all cached", || {
        let stats: serde_json::Value =
            serde_json::from_str(&env.sn.cli.ok(&["cache", "stats", "--json"])).unwrap();
        layers.iter().all(|d| {
            stats["layers"].as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r["digest"].as_str() == Some(d) && r["complete"] == true)
            })
        })
    });

    // The reboot: snapshotter, mount processes (holders first, so that none restarts a server)
    // and mounts all gone; the registry down.
    let mut env = env;
    env.sn.stop();
    let records: Vec<serde_json::Value> = std::fs::read_dir(env.sn.cli.root().join("run/mounts"))
        .unwrap()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    assert!(!records.is_empty(), "no lazy mount recorded");
    let mut pids = Vec::new();
    for key in ["holder", "pid"] {
        for r in &records {
            if let Some(pid) = r[key].as_u64() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                pids.push(pid);
            }
        }
    }
    wait_until(10, "mount processes survived SIGKILL", || {
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    let mut mounted = common::containerd::mounts_under(&env.sn.cli.root());
    mounted.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounted {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    env.reg.stop();

    env.sn.spawn();
    env.wait_snapshotter();
    let out = env.run(
        "stratafs",
        &reference,
        "after",
        "cat /etc/msg /etc/base-release; sha256sum /opt/filler2",
    );
    assert_eq!(
        out,
        format!(
            "hello from layer 2\nstratafs test base\n{}  /opt/filler2\n",
            sha256_hex(&bytes(12, FILLER))
        )
    );
}

#[test]
fn plain_ctr_pull_works_eagerly() {
    let env = env();
    let image = two_layer_image();
    env.reg.push_image("snap/eager", "v1", &image, &Auth::None);
    let reference = format!("{}/snap/eager:v1", env.reg.addr());
    let mark = env.reg.log_mark();
    env.ctd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "stratafs",
        &reference,
    ]);
    let served = env.served(mark);
    for l in &image.layers {
        assert_eq!(
            served.get(&l.digest).copied(),
            Some(l.blob.len() as u64),
            "{served:?}"
        );
    }
    let out = env.run(
        "stratafs",
        &reference,
        "eager",
        "cat /etc/msg; sha256sum /opt/small",
    );
    assert_eq!(
        out,
        format!(
            "hello from layer 2\n{}  /opt/small\n",
            sha256_hex(&bytes(13, 20_000))
        )
    );
    assert_eq!(env.snapshots().len(), 2);
}

/// Base gzip (lazy through its index), a plain zstd layer, a gzip layer above it with a
/// 4 MiB file no command reads.
fn zstd_in_the_middle() -> Image {
    let zstd = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/msg", b"from the zstd layer\n", 0o644)
        .dir("opt", 0o755)
        .file("opt/filler2", &bytes(21, 2 * 1024 * 1024), 0o644)
        .build(Compression::Zstd);
    let top = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/top", b"from the top gzip layer\n", 0o644)
        .whiteout("opt/filler2")
        .file("opt/filler3", &bytes(23, 4 * 1024 * 1024), 0o644)
        .build(Compression::Gzip);
    ImageBuilder::new()
        .arch(hostfs::host_arch())
        .layer(hostfs::base_layer(FILLER, Compression::Gzip))
        .layer(zstd)
        .layer(top)
        .build(ManifestFlavour::Oci)
}

const ZSTD_IN_THE_MIDDLE_SAYS: &str =
    "stratafs test base\nfrom the zstd layer\nfrom the top gzip layer\nfiller1\nfiller3\n";

#[test]
fn a_plain_zstd_layer_is_streamed_by_the_mount_and_the_layers_above_stay_lazy() {
    let env = env();
    let image = zstd_in_the_middle();
    let reference = env.push("snap/zstd", &image);
    let mark = env.reg.log_mark();
    env.rpull(&reference);
    let out = env.run(
        "stratafs",
        &reference,
        "zstd",
        "cat /etc/base-release /etc/msg /etc/top; ls /opt",
    );
    assert_eq!(out, ZSTD_IN_THE_MIDDLE_SAYS);
    let served = env.served(mark);
    let got = |i: usize| served.get(&image.layers[i].digest).copied().unwrap_or(0);
    let whole = |i: usize| image.layers[i].blob.len() as u64;
    // The zstd layer is streamed once (by the mount, not also by containerd); the layers
    // below and above it are read by range.
    assert_eq!(got(1), whole(1), "{served:?}");
    assert!(got(0) * 3 < whole(0), "base layer not lazy: {served:?}");
    assert!(got(2) * 3 < whole(2), "top layer not lazy: {served:?}");
    assert!(!env.sn.log().contains("not lazy"), "{}", env.sn.log());
}

#[test]
fn layers_that_cannot_be_served_lazily_fall_back_to_containerd() {
    // One streaming pass may keep 8 MiB: ten times the zstd layer's 2 MiB does not fit.
    let env = env_with(|| {
        Snapshotter::start_configured(
            "[mount]\nbackground_fetch = false\n[cache]\nmax_size = \"16M\"\n",
            &[],
        )
    });
    let image = zstd_in_the_middle();
    let reference = env.push("snap/mixed", &image);
    let mark = env.reg.log_mark();
    env.rpull(&reference);
    let out = env.run(
        "stratafs",
        &reference,
        "mixed",
        "cat /etc/base-release /etc/msg /etc/top; ls /opt",
    );
    assert_eq!(out, ZSTD_IN_THE_MIDDLE_SAYS);
    let served = env.served(mark);
    let got = |i: usize| served.get(&image.layers[i].digest).copied().unwrap_or(0);
    // The base is lazy; the zstd layer and the one above it were downloaded whole.
    assert!(
        got(0) * 3 < image.layers[0].blob.len() as u64,
        "base layer not lazy: {served:?}"
    );
    assert_eq!(got(1), image.layers[1].blob.len() as u64, "{served:?}");
    assert_eq!(got(2), image.layers[2].blob.len() as u64, "{served:?}");
    let log = env.sn.log();
    assert!(
        log.contains("not lazy") && log.contains("[cache] max_size"),
        "{log}"
    );
}

#[test]
fn a_second_snapshotter_refuses_and_the_first_keeps_working() {
    let env = env();
    let first = env.sn.pid().expect("the first runs");
    // Same socket, another store: the socket is answered, so it is not taken over.
    let other = Stratafs::new();
    let out = other
        .command()
        .args(["snapshotter", "--address"])
        .arg(&env.sn.socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is in use") && err.contains(&format!("pid {first}")),
        "{err}"
    );
    // Same store, another socket: one snapshotter per store.
    let socket = env.sn.socket.with_file_name("second.sock");
    let out = env
        .sn
        .cli
        .command()
        .args(["snapshotter", "--address"])
        .arg(&socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("another stratafs snapshotter") && err.contains(&format!("pid {first}")),
        "{err}"
    );
    assert!(!socket.exists());
    // The first still answers containerd.
    env.ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "stratafs",
        "prepare",
        "probe",
        "",
    ]);
    env.ctd
        .ctr_ok(&["snapshots", "--snapshotter", "stratafs", "rm", "probe"]);
    assert_eq!(env.sn.pid(), Some(first));
}

/// The same `ctr snapshots` calls against containerd's overlayfs snapshotter and stratafs:
/// every call must succeed or fail alike, and what they print must agree. (containerd's
/// metadata layer answers some calls itself; the rest reach the snapshotter.)
#[test]
fn snapshot_api_matches_the_overlayfs_snapshotter() {
    let env = env();
    let steps: &[&[&str]] = &[
        &["prepare", "a", ""],
        &["prepare", "a", ""],
        &["commit", "c-a", "a"],
        &["commit", "c-missing", "missing"],
        &["commit", "c-a", "a"],
        &["prepare", "b", "c-a"],
        &["prepare", "orphan", "no-such-parent"],
        &["info", "b"],
        &["info", "c-a"],
        &["info", "missing"],
        &["rm", "c-a"],
        &["label", "b", "stratafs.test/x=1", "stratafs.test/y=2"],
        &["label", "b", "stratafs.test/x="],
        &["info", "b"],
        &["tree"],
        &["ls"],
        &["rm", "b"],
        &["rm", "c-a"],
        &["rm", "c-a"],
        &["ls"],
    ];
    let mut transcripts = Vec::new();
    for sn in ["overlayfs", "stratafs"] {
        let mut t = Vec::new();
        for step in steps {
            let mut args = vec!["snapshots", "--snapshotter", sn];
            args.extend_from_slice(step);
            let out = env.ctd.ctr(&args);
            let stdout = normalise(&String::from_utf8_lossy(&out.stdout));
            t.push(format!("{step:?} -> {} {stdout}", out.status.success()));
            if !out.status.success() {
                eprintln!(
                    "{sn} {step:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        transcripts.push(t);
    }
    for (o, s) in transcripts[0].iter().zip(&transcripts[1]) {
        assert_eq!(
            o,
            s,
            "overlayfs vs stratafs\nsnapshotter log:\n{}",
            env.sn.log()
        );
    }
    // Mounts: the same kinds of mount (bind for a parentless active snapshot, overlay above).
    for sn in ["overlayfs", "stratafs"] {
        env.ctd
            .ctr_ok(&["snapshots", "--snapshotter", sn, "prepare", "m1", ""]);
        let m = env
            .ctd
            .ctr_ok(&["snapshots", "--snapshotter", sn, "mounts", "/tmp/x", "m1"]);
        assert!(m.contains("mount -t bind"), "{sn}: {m}");
        env.ctd
            .ctr_ok(&["snapshots", "--snapshotter", sn, "commit", "m1c", "m1"]);
        env.ctd
            .ctr_ok(&["snapshots", "--snapshotter", sn, "prepare", "m2", "m1c"]);
        let m = env
            .ctd
            .ctr_ok(&["snapshots", "--snapshotter", sn, "mounts", "/tmp/x", "m2"]);
        assert!(
            m.contains("mount -t overlay") && m.contains("upperdir="),
            "{sn}: {m}"
        );
        // A view of one committed snapshot: its directory, read-only. (Views carry no
        // garbage-collection root, so containerd may collect them at any time: not compared
        // in the sequence above.)
        let m = env.ctd.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            sn,
            "view",
            "--target",
            "/tmp/x",
            "v1",
            "m1c",
        ]);
        assert!(m.contains("mount -t bind") && m.contains("ro"), "{sn}: {m}");
    }
}

/// Drops what differs by nature between runs: timestamps (incl. ctr's `containerd.io/gc.root`
/// label) and the order of `ctr snapshots label`'s comma-separated map.
fn normalise(s: &str) -> String {
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z").unwrap();
    let mut out = String::new();
    for line in s.lines() {
        if line.contains("\"Created\"") || line.contains("\"Updated\"") {
            continue;
        }
        let line = time.replace_all(line.trim_end(), "TIME");
        if line.contains('=') && line.contains(',') && !line.contains('{') {
            let mut parts: Vec<&str> = line.split(',').collect();
            parts.sort();
            out.push_str(&parts.join(","));
        } else {
            out.push_str(&line);
        }
        out.push('\n');
    }
    out
}
