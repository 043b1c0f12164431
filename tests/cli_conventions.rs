//! The command line as people use it: output into a pipe that closes early, `--platform` on
//! an image already stored for another platform, refusing to remove what is mounted, and
//! errors that say what is wrong.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use common::mount::{mount_at, run, show, wait_mounted, MountGuard};
use common::*;

/// An image with one directory of 3000 files (a long `ls -l`).
fn many_files() -> Image {
    let mut b = LayerBuilder::new().dir("d", 0o755);
    for i in 0..3000 {
        b = b.file(&format!("d/file-with-a-long-name-{i:05}"), b"x", 0o644);
    }
    ImageBuilder::new()
        .layer(b.build(Compression::Gzip))
        .build(ManifestFlavour::Oci)
}

#[test]
fn output_into_a_pipe_that_closes_ends_quietly() {
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image("cli/many", "v1", &many_files(), &Auth::None);
    let reference = format!("{}/cli/many:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["pull", &reference]);
    for args in [
        &["ls", "-l", &reference, "/d"][..],
        &["images"],
        &["inspect", &reference],
        &["cache", "stats", "--json"],
    ] {
        for _ in 0..5 {
            // `stratafs … | head -1`: read one line, then close the pipe.
            let mut child = cli
                .command()
                .arg("--quiet")
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || out.status.signal() == Some(13),
                "{args:?}: {:?} {stderr}",
                out.status
            );
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
            assert!(!line.is_empty(), "{args:?} printed nothing");
        }
    }
}

/// One file, /etc/arch, saying which platform the image is for.
fn for_arch(arch: &str) -> Image {
    ImageBuilder::new()
        .arch(arch)
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/arch", arch.as_bytes(), 0o644)
                .build(Compression::Gzip),
        )
        .build(ManifestFlavour::Oci)
}

#[test]
fn platform_is_respected_when_the_image_is_stored_for_another() {
    let reg = Registry::start(RegistryOpts::default());
    let index = IndexBuilder::new(ManifestFlavour::Oci)
        .image(for_arch("amd64"))
        .image(for_arch("arm64"))
        .build();
    reg.push_index("cli/multi", "v1", &index, &Auth::None);
    let reference = format!("{}/cli/multi:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["pull", "--platform", "linux/amd64", &reference]);
    let cat = |platform: &str| cli.ok(&["cat", "--platform", platform, &reference, "/etc/arch"]);
    assert_eq!(cat("linux/arm64"), "arm64");
    assert_eq!(cat("linux/amd64"), "amd64");
    assert_eq!(
        cli.ok(&["ls", "--platform", "linux/arm64", &reference, "/etc"]),
        "arch\n"
    );
    // Without --platform, the image as stored (arm64 was asked for last).
    assert_eq!(cli.ok(&["cat", &reference, "/etc/arch"]), "arm64");

    // The mount too, by flag and by -o.
    for how in [
        &["--platform", "linux/amd64"][..],
        &["-o", "platform=linux/amd64"],
    ] {
        cli.ok(&["pull", "--platform", "linux/arm64", &reference]);
        let guard = MountGuard::new(Some(cli.root()));
        let out = run(
            cli.command()
                .arg("mount")
                .args(how)
                .arg(&reference)
                .arg(&guard.dir),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{}", show(&out));
        assert!(wait_mounted(&guard.dir, Duration::from_secs(5)).is_some());
        assert_eq!(std::fs::read(guard.path("/etc/arch")).unwrap(), b"amd64");
        // The name moves to arm64 while amd64 is mounted: collecting what no image uses
        // keeps what the mount serves.
        let indexes = || {
            std::fs::read_dir(cli.root().join("layers"))
                .unwrap()
                .count()
        };
        let before = indexes();
        cli.ok(&["ls", "--platform", "linux/arm64", &reference, "/"]);
        cli.ok(&["cache", "prune", "--all"]);
        assert!(
            indexes() >= before,
            "the mounted layer's index was collected"
        );
        assert_eq!(std::fs::read(guard.path("/etc/arch")).unwrap(), b"amd64");
        cli.ok(&["umount", guard.dir.to_str().unwrap()]);
    }
}

#[test]
fn mounted_images_are_not_removed_and_mount_errors_say_why() {
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image("cli/app", "v1", &for_arch("amd64"), &Auth::None);
    let reference = format!("{}/cli/app:v1", reg.addr());
    let cli = Stratafs::new();

    // A cause is said once, not once per layer of context.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratafs"))
        .arg("--root")
        .arg(cli.root())
        .args(["--config", "/nonexistent/stratafs.toml", "images"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("/nonexistent/stratafs.toml"), "{err}");

    let missing = std::env::temp_dir().join("stratafs-no-such-dir/mnt");
    let err = cli.fail(&["mount", &reference, missing.to_str().unwrap()]);
    assert!(
        err.contains("does not exist") && err.contains("mkdir -p"),
        "{err}"
    );

    let guard = MountGuard::new(Some(cli.root()));
    let dir = guard.dir.to_str().unwrap().to_string();
    cli.ok(&["mount", &reference, &dir]);
    assert!(mount_at(&guard.dir).is_some());
    let err = cli.fail(&["mount", &reference, &dir]);
    assert!(
        err.contains("already mounted")
            && err.contains("fuse.stratafs")
            && err.contains(&reference),
        "{err}"
    );
    let err = cli.fail(&["rmi", &reference]);
    assert!(err.contains("is mounted at") && err.contains(&dir), "{err}");
    assert!(cli.ok(&["images"]).contains(&reference));
    cli.ok(&["umount", &dir]);
    cli.ok(&["rmi", &reference]);
    assert!(!cli.ok(&["images"]).contains(&reference));
}

#[test]
fn cache_prune_needs_a_size_or_all() {
    let reg = Registry::start(RegistryOpts::default());
    reg.push_image("cli/prune", "v1", &for_arch("amd64"), &Auth::None);
    let reference = format!("{}/cli/prune:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["index", "build", &reference]);
    let bytes = || -> u64 {
        let s: serde_json::Value =
            serde_json::from_str(&cli.ok(&["cache", "stats", "--json"])).unwrap();
        s["bytes"].as_u64().unwrap()
    };
    assert!(bytes() > 0);
    let err = cli.fail(&["cache", "prune"]);
    assert!(err.contains("--max-size") || err.contains("--all"), "{err}");
    assert!(bytes() > 0, "nothing removed without asking");
    cli.ok(&["cache", "prune", "--all"]);
    assert_eq!(bytes(), 0);
}

#[test]
fn images_inspect_and_rmi_follow_the_usual_conventions() {
    let reg = Registry::start(RegistryOpts::default());
    let long_repo = "cli/a-repository-name-long-enough-to-break-fixed-width-columns-of-a-table";
    reg.push_image(long_repo, "v1", &for_arch("amd64"), &Auth::None);
    reg.push_image("cli/short", "v1", &many_files(), &Auth::None);
    let long = format!("{}/{long_repo}:v1", reg.addr());
    let short = format!("{}/cli/short:v1", reg.addr());
    let cli = Stratafs::new();
    let pulled = cli.pull_json(&long, &[]);
    cli.ok(&["pull", &short]);

    // Aligned columns whatever the name length; `images ls` is `images`.
    let table = cli.ok(&["images"]);
    assert_eq!(cli.ok(&["images", "ls"]), table);
    let lines: Vec<&str> = table.lines().collect();
    let column = lines[0].find("DIGEST").unwrap();
    for line in &lines[1..] {
        assert_eq!(line.find("sha256:"), Some(column), "{table}");
    }
    // -q: names only; --json: the shape `pull --json` prints.
    assert_eq!(cli.ok(&["images", "-q"]), format!("{long}\n{short}\n"));
    let all: serde_json::Value = serde_json::from_str(&cli.ok(&["images", "--json"])).unwrap();
    assert_eq!(all[0], pulled, "one JSON shape per image");

    // inspect by a short digest, as `images` shows it.
    let digest = pulled["digest"].as_str().unwrap();
    let prefix = &digest["sha256:".len()..][..12];
    let inspected: serde_json::Value = serde_json::from_str(&cli.ok(&["inspect", prefix])).unwrap();
    assert_eq!(inspected["record"]["name"], long.as_str());
    // rmi of several at once.
    let out = cli.ok(&["rmi", &long, &short]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(cli.ok(&["images", "-q"]), "");
}

#[test]
fn cache_stats_watch_follows_a_mount_as_it_reads() {
    let reg = Registry::start(RegistryOpts::default());
    let data = bytes(21, 3 << 20);
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("d", 0o755)
                .file("d/big", &data, 0o644)
                .build(Compression::Gzip),
        )
        .build(ManifestFlavour::Oci);
    reg.push_image("cli/watch", "v1", &image, &Auth::None);
    let reference = format!("{}/cli/watch:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);
    let cli = Stratafs::new();
    let guard = MountGuard::new(Some(cli.root()));
    cli.ok(&[
        "mount",
        "-o",
        "nobackground",
        &reference,
        guard.dir.to_str().unwrap(),
    ]);

    let mut watch = cli
        .command()
        .args(["cache", "stats", "--json", "--watch", "0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reports = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        let line = reports.next().expect("a report").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let layer = image.layers[0].digest.clone();
    let cached = |r: &serde_json::Value| {
        r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["digest"] == layer.as_str())
            .map(|l| {
                (
                    l["cached_bytes"].as_u64().unwrap(),
                    l["fetched_bytes"].as_u64().unwrap(),
                )
            })
            .unwrap()
    };
    let first = next();
    assert_eq!(cached(&first), (0, 0), "{first}");
    assert_eq!(first["mounts"][0]["layers"][0], layer.as_str(), "{first}");
    assert!(first["mounts"][0]["pid"].as_u64().unwrap() > 0, "{first}");

    assert!(std::fs::read(guard.path("/d/big")).unwrap() == data);
    // Later reports show what the read fetched and cached (the daemon saves its fetched
    // counter as it goes; the report after that must show it).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let report = next();
        let (cached_bytes, fetched_bytes) = cached(&report);
        if cached_bytes >= data.len() as u64 && fetched_bytes > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{report}");
    }
    let _ = watch.kill();
    let _ = watch.wait();
}
