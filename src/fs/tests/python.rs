//! Python source walked like bytecode: a module shipped as `.py` only, a script named on a
//! command line (`python3 app.py`, from the process's working directory), and the command
//! an image's config runs, walked at mount.

use super::*;

const SITE: &str = "usr/local/lib/python3.11/dist-packages";

/// An image with python 3.11, an app of source files in `app/` and packages in site-packages,
/// each file followed by 1 MiB of incompressible filler (files fetched or not are told apart
/// by span).
fn fixture() -> Vec<(String, Vec<u8>)> {
    let pyc = |seed| noise(seed, 8 << 10);
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("usr/bin/python3".into(), b"-> python3.11".to_vec()),
        (
            "usr/bin/python3.11".into(),
            super::super::elf::tests::elf(None, &[], None),
        ),
        (
            "usr/bin/env".into(),
            super::super::elf::tests::elf(None, &[], None),
        ),
        ("usr/lib/python3.11/os.py".into(), b"import abc\n".to_vec()),
        (
            "usr/lib/python3.11/__pycache__/os.cpython-311.pyc".into(),
            pyc(1),
        ),
        // The app: a script, its own module (source only), and a `#!` script.
        (
            "app/main.py".into(),
            b"'''an app'''\nimport helper\nimport os\n\ndef later():\n    import other\n".to_vec(),
        ),
        ("app/helper.py".into(), b"from pkg import mod\n".to_vec()),
        (
            "app/run".into(),
            b"#!/usr/bin/env python3\nimport third\n".to_vec(),
        ),
    ];
    for (k, package) in ["pkg", "other", "third", "fourth"].iter().enumerate() {
        files.push((format!("{SITE}/{package}/__init__.py"), Vec::new()));
        let pyc_path = format!("{SITE}/{package}/__pycache__/__init__.cpython-311.pyc");
        files.push((pyc_path, pyc(10 + k as u32)));
    }
    files.push((
        format!("{SITE}/pkg/__pycache__/mod.cpython-311.pyc"),
        pyc(20),
    ));
    let mut tree = Vec::new();
    for (k, file) in files.into_iter().enumerate() {
        tree.push(file);
        tree.push((format!("filler/{k:02}"), noise(100 + k as u32, 1 << 20)));
    }
    tree
}

fn init(package: &str) -> String {
    format!("{SITE}/{package}/__pycache__/__init__.cpython-311.pyc")
}

fn pkg_mod() -> String {
    format!("{SITE}/pkg/__pycache__/mod.cpython-311.pyc")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_of_a_source_module_fetches_what_it_imports_through_other_source() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let view = lazy_view(&registry, dir.path(), &fixture()).await;
    view.follow_imports(true);
    let cached = |path: &str| cached(&view, path);
    view.fetch_imports(view.lookup("app/main.py").unwrap(), 8 << 20)
        .await;
    for path in [
        "app/helper.py".to_string(),
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc".into(),
        init("pkg"),
        pkg_mod(),
    ] {
        assert!(cached(&path), "{path} imported but not fetched");
    }
    assert!(
        !cached(&init("other")),
        "imported by a function, fetched at the module's open"
    );
    assert!(!cached(&init("third")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_command_lines_script_has_its_imports_fetched_at_the_first_bytecode_open() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let view = lazy_view(&registry, dir.path(), &fixture()).await;
    view.follow_imports(true);
    let cached = |path: &str| cached(&view, path);
    let opened = view
        .lookup("usr/lib/python3.11/__pycache__/os.cpython-311.pyc")
        .unwrap();
    // A process whose command line reads `python3 main.py`, run from a directory `app` (a
    // shell named so, running a `main.py` of its own there that waits for its standard
    // input): its working directory, seen from here, has this machine's path in front.
    let host = tempfile::tempdir().unwrap();
    let app = host.path().join("app");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("main.py"), "read line\n").unwrap();
    let mut child = std::process::Command::new("sh")
        .arg0("python3")
        .arg("main.py")
        .current_dir(&app)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cmdline = format!("/proc/{}/cmdline", child.id());
    while std::fs::read(&cmdline).unwrap().is_empty() {
        std::thread::yield_now();
    }
    view.follow_command(opened, child.id(), 8 << 20).await;
    for path in [
        "app/main.py".to_string(),
        "app/helper.py".into(),
        init("pkg"),
        pkg_mod(),
    ] {
        assert!(cached(&path), "{path}: the script imports it");
    }
    assert!(!cached(&init("other")) && !cached(&init("third")));
    // The script's own open walks nothing more: the command line's walk had it.
    let before = registry.requests();
    view.fetch_imports(view.lookup("app/main.py").unwrap(), 8 << 20)
        .await;
    assert_eq!(registry.requests().ranges, before.ranges);
    drop(child.stdin.take());
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_walks_the_imports_of_the_python_command_its_config_runs() {
    let registry = Arc::new(FakeRegistry::new());
    let hints = |args: &[&str], working_dir: &str| StartHints {
        program: Some(args[0].to_string()),
        path: vec!["/usr/bin".into()],
        working_dir: working_dir.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        locale: None,
    };
    let cases: [(&[&str], &str, Vec<String>); 5] = [
        // `python3 main.py` from the working directory: its imports and its module's.
        (
            &["python3", "main.py"],
            "/app",
            vec![init("pkg"), pkg_mod()],
        ),
        // A `#!` script whose interpreter (through `env`) is python.
        (&["./run"], "/app", vec![init("third")]),
        (
            &["python3", "-c", "import fourth"],
            "/",
            vec![init("fourth")],
        ),
        // A program that runs the rest of its command line (an entrypoint's `exec "$@"`).
        (
            &["env", "python3", "main.py"],
            "/app",
            vec![init("pkg"), pkg_mod()],
        ),
        // `-m` of the app's own module, found from the working directory.
        (
            &["python3", "-m", "helper"],
            "/app",
            vec![init("pkg"), pkg_mod()],
        ),
    ];
    for (args, working_dir, imported) in cases {
        let dir = tempfile::tempdir().unwrap();
        let view = lazy_view(&registry, dir.path(), &fixture()).await;
        view.follow_imports(true);
        let cached = |path: &str| cached(&view, path);
        view.fetch_program(&hints(args, working_dir), 8 << 20).await;
        for path in &imported {
            assert!(cached(path), "{args:?}: {path} not fetched at mount");
        }
        for package in ["pkg", "other", "third", "fourth"] {
            let path = init(package);
            if !imported.contains(&path) {
                assert!(!cached(&path), "{args:?}: {path} fetched");
            }
        }
    }
}

/// What python and the C library read as they start, before the program's first line: the
/// locale's data, the conversion-module cache and the time zone; `encodings` with its codec,
/// the `.pth` files of the site directories and what their import lines name, `sitecustomize`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_fetches_what_python_and_the_c_library_read_as_they_start() {
    let registry = Arc::new(FakeRegistry::new());
    let lib = "usr/lib/python3.11";
    let extra: Vec<(String, Vec<u8>)> = vec![
        (format!("{lib}/encodings/__init__.py"), Vec::new()),
        (
            format!("{lib}/encodings/__pycache__/__init__.cpython-311.pyc"),
            noise(40, 8 << 10),
        ),
        (
            format!("{lib}/encodings/__pycache__/aliases.cpython-311.pyc"),
            noise(41, 8 << 10),
        ),
        (
            format!("{lib}/encodings/__pycache__/utf_8.cpython-311.pyc"),
            noise(42, 8 << 10),
        ),
        (
            format!("{lib}/encodings/__pycache__/cp1252.cpython-311.pyc"),
            noise(43, 8 << 10),
        ),
        (
            "usr/lib/python3/dist-packages/hack.pth".into(),
            b"import os; on = True; on and __import__('_hack').shim()\n/a/path\n".to_vec(),
        ),
        (
            "usr/lib/python3/dist-packages/_hack/__init__.py".into(),
            b"import sys\n".to_vec(),
        ),
        (format!("{lib}/sitecustomize.py"), b"x = 1\n".to_vec()),
        // The working directory is not on `sys.path` yet when python imports these.
        ("app/sitecustomize.py".into(), b"x = 2\n".to_vec()),
        (
            "usr/lib/locale/C.utf8/LC_CTYPE".into(),
            noise(44, 300 << 10),
        ),
        (
            "usr/lib/locale/en_US.utf8/LC_CTYPE".into(),
            noise(45, 300 << 10),
        ),
        (
            "usr/lib/locale/en_US.utf8/LC_MESSAGES/SYS_LC_MESSAGES".into(),
            b"messages".to_vec(),
        ),
        (
            "usr/lib/locale/de_DE.utf8/LC_CTYPE".into(),
            noise(46, 300 << 10),
        ),
        (
            "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache".into(),
            noise(47, 20 << 10),
        ),
        ("usr/share/zoneinfo/Etc/UTC".into(), b"TZif2".to_vec()),
        (
            "etc/localtime".into(),
            b"-> /usr/share/zoneinfo/Etc/UTC".to_vec(),
        ),
    ];
    let mut files = fixture();
    for (k, file) in extra.into_iter().enumerate() {
        files.push(file);
        files.push((format!("filler/x{k:02}"), noise(200 + k as u32, 1 << 20)));
    }
    let started = [
        format!("{lib}/encodings/__pycache__/__init__.cpython-311.pyc"),
        format!("{lib}/encodings/__pycache__/aliases.cpython-311.pyc"),
        format!("{lib}/encodings/__pycache__/utf_8.cpython-311.pyc"),
        "usr/lib/python3/dist-packages/hack.pth".into(),
        "usr/lib/python3/dist-packages/_hack/__init__.py".into(),
        format!("{lib}/sitecustomize.py"),
    ];
    let c_library = [
        "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        "usr/share/zoneinfo/Etc/UTC",
    ];
    let en_us = [
        "usr/lib/locale/en_US.utf8/LC_CTYPE",
        "usr/lib/locale/en_US.utf8/LC_MESSAGES/SYS_LC_MESSAGES",
    ];
    let c_utf8 = "usr/lib/locale/C.utf8/LC_CTYPE";
    let hints = |args: &[&str], locale: Option<&str>| StartHints {
        program: Some(args[0].to_string()),
        path: vec!["/usr/bin".into()],
        working_dir: "/app".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        locale: locale.map(str::to_string),
    };
    // python with no locale set: its start, the C library's files with `C.UTF-8`'s data (python
    // takes it in the C locale), the command's imports.
    let dir = tempfile::tempdir().unwrap();
    let view = lazy_view(&registry, dir.path(), &files).await;
    view.follow_imports(true);
    view.fetch_program(&hints(&["python3", "-c", "import pkg"], None), 8 << 20)
        .await;
    let cached = |path: &str| cached(&view, path);
    for path in started.iter().map(String::as_str).chain(c_library) {
        assert!(cached(path), "{path} not fetched at mount");
    }
    assert!(cached(c_utf8) && cached(&init("pkg")));
    for path in [
        format!("{lib}/encodings/__pycache__/cp1252.cpython-311.pyc"),
        "usr/lib/locale/de_DE.utf8/LC_CTYPE".into(),
        "app/sitecustomize.py".into(),
        init("other"),
    ] {
        assert!(!cached(&path), "{path} fetched");
    }
    for path in en_us {
        assert!(!cached(path), "{path} fetched with no locale set");
    }
    // Another program, the config's locale set: the C library's files for it, nothing of
    // python's.
    let dir = tempfile::tempdir().unwrap();
    let view = lazy_view(&registry, dir.path(), &files).await;
    view.follow_imports(true);
    view.fetch_program(&hints(&["env"], Some("en_US.UTF-8")), 8 << 20)
        .await;
    let cached = |path: &str| super::cached(&view, path);
    let program = "usr/bin/env";
    assert!(cached(program));
    for path in c_library.into_iter().chain(en_us) {
        assert!(cached(path), "{path} not fetched for {program}");
    }
    for path in started.iter().map(String::as_str).chain([c_utf8]) {
        assert!(!cached(path), "{path} fetched for {program}");
    }
}
