//! ELF library following on a real registry and a real FUSE mount: opening a program fetches
//! what the dynamic loader will open for it — its interpreter (found through the image's own
//! symbolic links, as Debian lays them out), the loader's cache and the libraries it needs —
//! so that their reads need no request, and leaves alone a library it does not need; the
//! program then runs from the mount. A mount of an image whose config runs that program
//! fetches the same, and the user and group databases, before anything opens them. The
//! program and libraries are this machine's own.

mod common;

use std::io::Read;

use common::mount::MountGuard;
use common::*;

const PROGRAM: &str = "usr/bin/true";
const ARCH: &str = "usr/lib/x86_64-linux-gnu";

/// What the loader opens for `true`: found by its `PT_INTERP`, the cache, its `DT_NEEDED`.
fn loaded() -> Vec<String> {
    vec![
        format!("{ARCH}/ld-linux-x86-64.so.2"),
        "etc/ld.so.cache".into(),
        format!("{ARCH}/libc.so.6"),
    ]
}

/// A library in the same directory that `true` does not need.
fn unneeded() -> String {
    format!("{ARCH}/libz.so.1")
}

fn host(path: &str) -> Vec<u8> {
    std::fs::read(format!("/{path}")).unwrap_or_else(|e| {
        panic!("/{path}: {e} (this test takes its program and libraries from the machine)")
    })
}

/// The user and group databases a container runtime reads.
const DATABASES: [(&str, &[u8]); 2] = [
    ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ("etc/group", b"root:x:0:\n"),
];

/// One gzip layer laid out as Debian's merged /usr: `lib` → `usr/lib`, `lib64` →
/// `usr/lib64`, whose loader is an absolute link into `/lib/x86_64-linux-gnu`, and the user
/// and group databases. Every file is followed by 1 MiB of filler, so a fetch of one file's
/// spans does not bring another's. With `cmd`, the config runs it (on `PATH=/usr/bin`).
fn image(cmd: Option<&[&str]>) -> Image {
    let mut b = LayerBuilder::new();
    for d in [
        "etc",
        "usr",
        "usr/bin",
        "usr/lib",
        ARCH,
        "usr/lib64",
        "filler",
    ] {
        b = b.dir(d, 0o755);
    }
    b = b
        .symlink("lib", "usr/lib")
        .symlink("lib64", "usr/lib64")
        .symlink(
            "usr/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
    let files = std::iter::once(PROGRAM.to_string())
        .chain(loaded())
        .chain([unneeded()]);
    for (k, path) in files.enumerate() {
        let mode = if path == PROGRAM || path.contains("ld-linux") {
            0o755
        } else {
            0o644
        };
        b = b.file(&path, &host(&path), mode);
        b = b.file(
            &format!("filler/{k}"),
            &bytes(700 + k as u64, 1 << 20),
            0o644,
        );
    }
    for (k, (path, data)) in DATABASES.into_iter().enumerate() {
        b = b.file(path, data, 0o644);
        b = b.file(
            &format!("filler/db{k}"),
            &bytes(800 + k as u64, 1 << 20),
            0o644,
        );
    }
    let mut builder = ImageBuilder::new().layer(b.build(Compression::Gzip));
    if let Some(cmd) = cmd {
        builder = builder.env("PATH=/usr/bin").cmd(cmd);
    }
    builder.build(ManifestFlavour::Oci)
}

/// Reading `files` (contents, path) from the mount needs no request for `layer`: they were
/// fetched ahead. Reading the library the program does not need does: it was not.
fn assert_cached_but_the_unneeded_library(
    reg: &Registry,
    guard: &MountGuard,
    layer: &str,
    files: Vec<(Vec<u8>, String)>,
) {
    let mark = reg.log_mark();
    for (data, path) in files {
        assert!(std::fs::read(guard.path(&path)).unwrap() == data, "{path}");
    }
    assert_eq!(
        reg.blob_bytes_since(mark, layer),
        0,
        "fetched again when read: {:#?}",
        reg.access_log_since(mark)
    );
    let mark = reg.log_mark();
    assert!(std::fs::read(guard.path(&unneeded())).unwrap() == host(&unneeded()));
    assert!(
        reg.blob_bytes_since(mark, layer) > 0,
        "{} was fetched ahead though nothing needs it",
        unneeded()
    );
}

#[test]
fn opening_a_program_fetches_its_interpreter_and_libraries_before_the_loader_opens_them() {
    let reg = Registry::start(RegistryOpts::default());
    let image = image(None);
    let layer = image.layers[0].digest.clone();
    reg.push_image("elf/app", "v1", &image, &Auth::None);
    let reference = format!("{}/elf/app:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);

    let cli = Stratafs::new();
    let guard = MountGuard::lazy(&cli, &reference, "warn,stratafs=debug");
    let dir = guard.dir.to_str().unwrap().to_string();
    // The mount's own fetch (the user and group databases: the config names no program)
    // ends before the registry's log is counted below.
    cli.wait_for_mount_log("fetched what the image runs first");
    // The kernel's first read of a program it executes: its ELF header.
    let mut head = [0u8; 64];
    std::fs::File::open(guard.path(PROGRAM))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    cli.wait_for_mount_log("libraries fetched");
    let log = cli.mount_logs();
    let line = log
        .lines()
        .find(|l| l.contains("libraries fetched"))
        .unwrap();
    assert!(
        line.contains(PROGRAM) && line.contains("files=3"),
        "the loader, its cache and libc: {line}"
    );

    // All of it is cached: the loader's reads of these files need no request.
    let files = loaded().into_iter().map(|p| (host(&p), p)).collect();
    assert_cached_but_the_unneeded_library(&reg, &guard, &layer, files);

    // And the program runs from the mount, loader and libraries served by it.
    let status = std::process::Command::new("chroot")
        .args([&dir, "/usr/bin/true"])
        .status()
        .expect("chroot");
    assert!(status.success(), "true in a chroot of the mount: {status}");
    cli.ok(&["umount", &dir]);
}

#[test]
fn a_mount_fetches_the_program_its_config_runs_and_the_user_databases_before_any_open() {
    let reg = Registry::start(RegistryOpts::default());
    let image = image(Some(&["true", "--version"]));
    let layer = image.layers[0].digest.clone();
    reg.push_image("elf/run", "v1", &image, &Auth::None);
    let reference = format!("{}/elf/run:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);

    let cli = Stratafs::new();
    let guard = MountGuard::lazy(&cli, &reference, "warn,stratafs=debug");
    // Nothing opens a file: the mount's own fetch, to its end.
    cli.wait_for_mount_log("fetched what the image runs first");
    let log = cli.mount_logs();
    let line = log
        .lines()
        .find(|l| l.contains("libraries fetched"))
        .unwrap_or_else(|| panic!("no libraries followed: {log}"));
    assert!(
        line.contains(PROGRAM) && line.contains("files=3"),
        "the loader, its cache and libc of the config's program: {line}"
    );

    // The program, what the loader opens for it and the databases are cached.
    let files = std::iter::once(PROGRAM.to_string())
        .chain(loaded())
        .map(|p| (host(&p), p))
        .chain(DATABASES.map(|(p, data)| (data.to_vec(), p.to_string())))
        .collect();
    assert_cached_but_the_unneeded_library(&reg, &guard, &layer, files);
    let dir = guard.dir.to_str().unwrap().to_string();
    cli.ok(&["umount", &dir]);
}
