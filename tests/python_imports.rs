//! Import following on a real registry and a real FUSE mount: reading a Python module's
//! bytecode through the mount fetches the files of the modules its body imports before
//! python would open them, and not the modules its functions import; a module fetched whole
//! that way and then read by passthrough (unseen by the daemon; its local copy made at its
//! second open) still enters the startup profile; a process whose command line is
//! `python3 -c 'import …'` has the modules it names fetched at its first open of a module's
//! bytecode, and one whose command line is `python3 SCRIPT` those its script imports (found
//! from the process's working directory) — or, for an image whose config runs such a
//! script, at mount.

mod common;

use common::mount::MountGuard;
use common::*;

/// `python3.11 -m py_compile` of a module importing os, json.decoder, .sibling,
/// .sub (leaf, other) and pkg.deep.mod, whose function imports `never_at_import_time` and
/// whose class imports `also_later` (src/fs/imports.rs).
const MODULE: &[u8] = include_bytes!("../src/fs/testdata/example.cpython-311.pyc");
const ROOT: &str = "app/pkg/__pycache__/example.cpython-311.pyc";
const LIB: &str = "usr/lib/python3.11";

fn imported() -> Vec<String> {
    vec![
        format!("{LIB}/__pycache__/os.cpython-311.pyc"),
        format!("{LIB}/json/__pycache__/__init__.cpython-311.pyc"),
        format!("{LIB}/json/__pycache__/decoder.cpython-311.pyc"),
        "app/pkg/sub/__pycache__/__init__.cpython-311.pyc".into(),
        "app/pkg/sub/__pycache__/leaf.cpython-311.pyc".into(),
        EXTENSION.into(),
        "app/pkg/deep/__pycache__/__init__.cpython-311.pyc".into(),
        "app/pkg/deep/__pycache__/mod.cpython-311.pyc".into(),
    ]
}

const SITE: &str = "usr/local/lib/python3.11/dist-packages";

/// Packages only the module's function and class import, each in a directory of its own (an
/// open fetches its directory's small files too).
fn not_imported() -> Vec<String> {
    ["never_at_import_time", "also_later"]
        .iter()
        .map(|p| format!("{SITE}/{p}/__pycache__/__init__.cpython-311.pyc"))
        .collect()
}

/// The extension module: large enough to be opened for passthrough once cached whole.
const EXTENSION: &str = "app/pkg/sub/other.cpython-311-x86_64-linux-gnu.so";

fn content(k: usize) -> Vec<u8> {
    let extension = imported().iter().position(|p| p == EXTENSION);
    let len = if Some(k) == extension {
        3 << 20
    } else {
        40 << 10
    };
    bytes(500 + k as u64, len)
}

/// One gzip layer; every module file followed by 1 MiB of filler, so a fetch of one file's
/// spans does not bring another's.
fn image(cmd: Option<&[&str]>) -> Image {
    let mut b = LayerBuilder::new();
    for d in [
        "app",
        "app/pkg",
        "app/pkg/__pycache__",
        "app/pkg/sub",
        "app/pkg/sub/__pycache__",
        "app/pkg/deep",
        "app/pkg/deep/__pycache__",
        "usr",
        "usr/bin",
        "usr/lib",
        LIB,
        &format!("{LIB}/__pycache__"),
        &format!("{LIB}/json"),
        &format!("{LIB}/json/__pycache__"),
        "usr/local",
        "usr/local/lib",
        "usr/local/lib/python3.11",
        SITE,
        &format!("{SITE}/never_at_import_time"),
        &format!("{SITE}/never_at_import_time/__pycache__"),
        &format!("{SITE}/also_later"),
        &format!("{SITE}/also_later/__pycache__"),
        "filler",
    ] {
        b = b.dir(d, 0o755);
    }
    for init in [
        "app/pkg/__init__.py",
        "app/pkg/sub/__init__.py",
        "app/pkg/deep/__init__.py",
        &format!("{LIB}/json/__init__.py"),
        &format!("{SITE}/never_at_import_time/__init__.py"),
        &format!("{SITE}/also_later/__init__.py"),
    ] {
        b = b.file(init, b"", 0o644);
    }
    b = b.file(SCRIPT, SCRIPT_TEXT, 0o644);
    // An interpreter (no ELF: nothing to follow), for a config that runs python.
    b = b.symlink("usr/bin/python3", "python3.11");
    b = b.file("usr/bin/python3.11", b"#!not a program\n", 0o755);
    b = b.file(ROOT, MODULE, 0o644);
    for (k, path) in imported().iter().chain(&not_imported()).enumerate() {
        b = b.file(path, &content(k), 0o644);
        b = b.file(
            &format!("filler/{k}"),
            &bytes(900 + k as u64, 1 << 20),
            0o644,
        );
    }
    let builder = ImageBuilder::new().layer(b.build(Compression::Gzip));
    match cmd {
        Some(cmd) => builder.cmd(cmd),
        None => builder,
    }
    .build(ManifestFlavour::Oci)
}

/// A script, both python's and a shell's: in python it imports `also_later`; in a shell the
/// import fails (quietly), the next command opens a module's bytecode through the mount, as
/// python opens its first module before it runs a script, and the last waits for its
/// standard input to close (as python would still be running: the daemon reads the
/// process's command line and working directory after that open). Named without `.py`, as
/// `/usr/bin/pip3` is: its own open walks nothing, only the command line names it.
const SCRIPT: &str = "app/main";
const SCRIPT_TEXT: &[u8] =
    b"import also_later 2>/dev/null; read -r line < app/pkg/__pycache__/example.cpython-311.pyc || true; read -r wait || true\n";

/// The image pushed to a registry with its index bound, and a lazy mount of it (debug log):
/// (registry, layer digest, reference, cli, mount).
fn mounted() -> (Registry, String, String, Stratafs, MountGuard) {
    mounted_running(None)
}

/// [`mounted`], of the image whose config runs `cmd`.
fn mounted_running(cmd: Option<&[&str]>) -> (Registry, String, String, Stratafs, MountGuard) {
    let reg = Registry::start(RegistryOpts::default());
    let image = image(cmd);
    let layer = image.layers[0].digest.clone();
    reg.push_image("python/app", "v1", &image, &Auth::None);
    let reference = format!("{}/python/app:v1", reg.addr());
    Stratafs::new().ok(&["index", "push", "--bind", &reference]);
    let cli = Stratafs::new();
    let guard = MountGuard::lazy(&cli, &reference, "warn,stratafs=debug");
    (reg, layer, reference, cli, guard)
}

/// Reads `path` through the mount and checks it holds `want`; returns the bytes of `layer`
/// the registry served meanwhile, with its access log of that time (for messages).
fn read_fetching(
    reg: &Registry,
    layer: &str,
    guard: &MountGuard,
    path: &str,
    want: &[u8],
) -> (u64, Vec<AccessEntry>) {
    let mark = reg.log_mark();
    assert!(std::fs::read(guard.path(path)).unwrap() == want, "{path}");
    (
        reg.blob_bytes_since(mark, layer),
        reg.access_log_since(mark),
    )
}

#[test]
fn reading_a_modules_bytecode_fetches_what_it_imports_before_it_is_opened() {
    let (reg, layer, reference, cli, guard) = mounted();
    let dir = guard.dir.to_str().unwrap();
    assert!(std::fs::read(guard.path(ROOT)).unwrap() == MODULE);
    // The imports are fetched in the background of that read: wait for the daemon to say so.
    cli.wait_for_mount_log("imports fetched");
    let log = cli.mount_logs();
    let line = log.lines().find(|l| l.contains("imports fetched")).unwrap();
    assert!(line.contains(ROOT), "{line}");

    // What the module imports is cached: reading it needs no request.
    let mark = reg.log_mark();
    for (k, path) in imported().iter().enumerate() {
        if path == EXTENSION {
            continue; // read below, by passthrough
        }
        assert!(
            std::fs::read(guard.path(path)).unwrap() == content(k),
            "{path}"
        );
    }
    // The extension module, cached whole by the walk: its second open has its local copy
    // made, and a later open passes through to that copy (its reads unseen by the daemon).
    for _ in 0..2 {
        drop(std::fs::File::open(guard.path(EXTENSION)).unwrap());
    }
    cli.wait_for_mount_log("local copy made");
    let k = imported().iter().position(|p| p == EXTENSION).unwrap();
    assert!(std::fs::read(guard.path(EXTENSION)).unwrap() == content(k));
    assert_eq!(
        reg.blob_bytes_since(mark, &layer),
        0,
        "imported modules fetched again when read: {:#?}",
        reg.access_log_since(mark)
    );
    // What only its function and class import was not fetched.
    let n = imported().len();
    for (k, path) in not_imported().iter().enumerate() {
        let (fetched, _) = read_fetching(&reg, &layer, &guard, path, &content(n + k));
        assert!(
            fetched > 0,
            "{path} was fetched ahead though nothing imports it"
        );
    }
    cli.ok(&["umount", dir]);

    // The profile that mount recorded holds the extension module, which the kernel read by
    // passthrough: a cold mount of the same store replays it, and then reading the module
    // needs no request.
    cli.ok(&["cache", "prune", "--max-size", "0"]);
    let guard = MountGuard::lazy(&cli, &reference, "warn,stratafs=debug");
    cli.wait_for_mount_log("profile replayed");
    let k = imported().iter().position(|p| p == EXTENSION).unwrap();
    let (fetched, log) = read_fetching(&reg, &layer, &guard, EXTENSION, &content(k));
    assert_eq!(
        fetched, 0,
        "the extension module, read by passthrough, was not in the recorded profile: {log:#?}"
    );
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}

#[test]
fn a_python_command_line_has_the_modules_it_imports_fetched_at_its_first_bytecode_open() {
    use std::os::unix::process::CommandExt;
    let (reg, layer, _, cli, guard) = mounted();
    let dir = guard.dir.to_str().unwrap();
    // A process whose command line reads `python3 -c 'import never_at_import_time; …'` (a
    // shell named so) opens a module's bytecode through the mount itself (a builtin's
    // redirection), as python opens its first module, then waits for its standard input to
    // close (as python would still be running when the daemon reads its command line).
    let mut child = std::process::Command::new("sh")
        .arg0("python3")
        .args([
            "-c",
            "import never_at_import_time 2>/dev/null; read -r line < \"$0\" || true; read -r wait || true",
            guard.path(ROOT).to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cli.wait_for_mount_log(
        "imports fetched path=usr/local/lib/python3.11/dist-packages/never_at_import_time/",
    );
    // The open of the module also walks what its body imports (a 3 MiB extension module
    // among them): done too before the registry's log is read, or its requests ending meanwhile
    // would count as the reads' below.
    cli.wait_for_mount_log(&format!("imports fetched path={ROOT}"));
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(
        cli.mount_logs()
            .contains("following the imports of a command line"),
        "{}",
        cli.mount_logs()
    );

    // The module the command names is cached; the one it does not name is not.
    let n = imported().len();
    let [named, other] = [&not_imported()[0], &not_imported()[1]];
    let (fetched, log) = read_fetching(&reg, &layer, &guard, named, &content(n));
    assert_eq!(
        fetched,
        0,
        "{named}, which the command line imports, fetched when read: {log:#?}\n{}",
        cli.mount_logs()
    );
    let (fetched, _) = read_fetching(&reg, &layer, &guard, other, &content(n + 1));
    assert!(
        fetched > 0,
        "{other} was fetched ahead though nothing imports it"
    );
    cli.ok(&["umount", dir]);
}

#[test]
fn a_python_command_lines_script_has_the_modules_it_imports_fetched_at_its_first_bytecode_open() {
    use std::os::unix::process::CommandExt;
    let (reg, layer, _, cli, guard) = mounted();
    // `python3 app/main` from the mount's root (a shell named so runs it as a shell script).
    let mut child = std::process::Command::new("sh")
        .arg0("python3")
        .arg(SCRIPT)
        .current_dir(&guard.dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cli.wait_for_mount_log(
        "imports fetched path=usr/local/lib/python3.11/dist-packages/also_later/",
    );
    cli.wait_for_mount_log(&format!("imports fetched path={ROOT}"));
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let logs = cli.mount_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("following the imports of a command line"))
        .unwrap_or_else(|| panic!("no walk of the command line:\n{logs}"));
    assert!(
        line.contains(r#"command=Script("app/main")"#) && line.contains("roots=1"),
        "{line}"
    );
    let n = imported().len();
    let [other, named] = [&not_imported()[0], &not_imported()[1]];
    let (fetched, log) = read_fetching(&reg, &layer, &guard, named, &content(n + 1));
    assert_eq!(
        fetched,
        0,
        "{named}, which the script imports, fetched when read: {log:#?}\n{}",
        cli.mount_logs()
    );
    let (fetched, _) = read_fetching(&reg, &layer, &guard, other, &content(n));
    assert!(
        fetched > 0,
        "{other} was fetched ahead though nothing imports it"
    );
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}

#[test]
fn a_mount_fetches_the_imports_of_the_python_script_its_config_runs_before_any_open() {
    let (reg, layer, _, cli, guard) = mounted_running(Some(&["python3", SCRIPT]));
    // Nothing opens a file: the mount's own fetch, to its end.
    cli.wait_for_mount_log("fetched what the image runs first");
    let logs = cli.mount_logs();
    assert!(
        logs.lines().any(
            |l| l.contains("following the imports of the image's command")
                && l.contains(r#"command=Script("app/main")"#)
                && l.contains("roots=1")
        ),
        "{logs}"
    );
    let n = imported().len();
    let [other, named] = [&not_imported()[0], &not_imported()[1]];
    let (fetched, log) = read_fetching(&reg, &layer, &guard, named, &content(n + 1));
    assert_eq!(
        fetched, 0,
        "{named}, which the config's script imports, fetched when read: {log:#?}\n{logs}"
    );
    let (fetched, _) = read_fetching(&reg, &layer, &guard, other, &content(n));
    assert!(
        fetched > 0,
        "{other} was fetched ahead though nothing imports it"
    );
    cli.ok(&["umount", guard.dir.to_str().unwrap()]);
}
