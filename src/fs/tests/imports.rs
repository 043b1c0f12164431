//! A module's bytecode opened: the modules it imports fetched, with what they load and
//! what they import by name at run time, side by side in one request.

use super::*;

/// The files a module's body imports (os, json.decoder, .sibling, .sub (leaf, other),
/// pkg.deep.mod: `testdata/example.cpython-311.pyc`, see imports.rs; its function imports
/// never_at_import_time and its class also_later), and a tree holding the module and the
/// packages' `__init__.py` files (the imported files are the caller's to add).
fn import_fixture() -> (Vec<String>, Vec<(String, Vec<u8>)>) {
    let module = include_bytes!("../testdata/example.cpython-311.pyc").to_vec();
    let lib = "usr/lib/python3.11";
    let imported = vec![
        format!("{lib}/__pycache__/os.cpython-311.pyc"),
        format!("{lib}/json/__pycache__/__init__.cpython-311.pyc"),
        format!("{lib}/json/__pycache__/decoder.cpython-311.pyc"),
        "app/pkg/__pycache__/sibling.cpython-311.pyc".to_string(),
        "app/pkg/sub/__pycache__/__init__.cpython-311.pyc".to_string(),
        "app/pkg/sub/__pycache__/leaf.cpython-311.pyc".to_string(),
        "app/pkg/sub/other.cpython-311-x86_64-linux-gnu.so".to_string(),
        "app/pkg/deep/__pycache__/__init__.cpython-311.pyc".to_string(),
        "app/pkg/deep/__pycache__/mod.cpython-311.pyc".to_string(),
    ];
    let tree = vec![
        ("app/pkg/__init__.py".into(), Vec::new()),
        ("app/pkg/sub/__init__.py".into(), Vec::new()),
        ("app/pkg/deep/__init__.py".into(), Vec::new()),
        (format!("{lib}/json/__init__.py"), Vec::new()),
        ("app/pkg/__pycache__/example.cpython-311.pyc".into(), module),
    ];
    (imported, tree)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_of_a_modules_bytecode_fetches_the_modules_it_imports() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (imported, mut tree) = import_fixture();
    let lib = "usr/lib/python3.11";
    // Not imported: what its function and class import, a module it never names, and
    // modules of the library directories named like what the body uses but imports from
    // elsewhere (`thing`, from pkg.deep.mod) or defines (`later`, `K`): an absolute import
    // of `thing` would find these, but the body has none.
    let not_imported = [
        "app/pkg/__pycache__/never_at_import_time.cpython-311.pyc".to_string(),
        format!("{lib}/__pycache__/also_later.cpython-311.pyc"),
        "app/pkg/__pycache__/unrelated.cpython-311.pyc".to_string(),
        format!("{lib}/__pycache__/thing.cpython-311.pyc"),
        format!("{lib}/__pycache__/later.cpython-311.pyc"),
        format!("{lib}/K.cpython-311-x86_64-linux-gnu.so"),
    ];
    // Each file with 1 MiB of filler after it: files fetched or not are told apart by span.
    for (k, path) in imported.iter().chain(&not_imported).enumerate() {
        tree.push((path.clone(), noise(10 + k as u32, 20 << 10)));
        tree.push((format!("filler/{k}"), noise(100 + k as u32, 1 << 20)));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let cached = |path: &str| cached(&view, path);
    let root = view
        .lookup("app/pkg/__pycache__/example.cpython-311.pyc")
        .unwrap();

    // Off (the default of a view; mounts turn it on from the config): nothing is followed.
    view.fetch_imports(root, 8 << 20).await;
    assert!(imported.iter().all(|p| !cached(p)));

    view.follow_imports(true);
    view.fetch_imports(root, 8 << 20).await;
    for p in &imported {
        assert!(cached(p), "{p} imported but not fetched");
    }
    for p in &not_imported {
        assert!(
            !cached(p),
            "{p} fetched but not imported by the module's body"
        );
    }
    // Each file once per mount: a second open follows nothing.
    let before = registry.requests();
    std::fs::remove_dir_all(crate::store::Layout::new(dir.path()).chunks()).unwrap();
    view.fetch_imports(root, 8 << 20).await;
    assert_eq!(registry.requests().ranges, before.ranges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_fetches_the_libraries_of_the_extension_modules_it_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    let (imported, mut tree) = import_fixture();
    let elf = |needed: &[&str], seed| {
        [
            super::elf::tests::elf(None, needed, None),
            noise(seed, 200 << 10),
        ]
        .concat()
    };
    // The extension module the body imports (`from .sub import other`) needs libother,
    // which needs libdeep; libunused is needed by nothing.
    let ext = "app/pkg/sub/other.cpython-311-x86_64-linux-gnu.so";
    let libs = [
        (
            "usr/lib/x86_64-linux-gnu/libother.so.1",
            elf(&["libdeep.so.2"], 1),
        ),
        ("usr/lib/x86_64-linux-gnu/libdeep.so.2", elf(&[], 2)),
        ("usr/lib/x86_64-linux-gnu/libunused.so.1", elf(&[], 3)),
    ];
    for (k, path) in imported.iter().enumerate() {
        let data = match path.as_str() {
            p if p == ext => elf(&["libother.so.1"], 4),
            _ => noise(10 + k as u32, 20 << 10),
        };
        tree.push((path.clone(), data));
        tree.push((format!("filler/{k}"), noise(100 + k as u32, 1 << 20)));
    }
    for (k, (path, data)) in libs.iter().enumerate() {
        tree.push((path.to_string(), data.clone()));
        tree.push((format!("filler/lib{k}"), noise(200 + k as u32, 1 << 20)));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let root = view
        .lookup("app/pkg/__pycache__/example.cpython-311.pyc")
        .unwrap();
    view.follow_imports(true);
    view.fetch_imports(root, 8 << 20).await;
    // Fetched before python imports the module and the loader opens its libraries.
    assert!(cached(&view, ext));
    assert!(cached(&view, "usr/lib/x86_64-linux-gnu/libother.so.1"));
    assert!(cached(&view, "usr/lib/x86_64-linux-gnu/libdeep.so.2"));
    assert!(!cached(&view, "usr/lib/x86_64-linux-gnu/libunused.so.1"));
    // Followed once: python's open of the module fetches nothing more.
    let before = registry.requests();
    view.prefetch_file(view.lookup(ext).unwrap(), 8 << 20).await;
    assert_eq!(registry.requests().ranges, before.ranges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_fetches_what_a_module_imports_by_name_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    // `for package in ("urllib3", "idna"): locals()[package] = __import__(package)`
    // (requests.packages); urllib3 is not in the image.
    let mut tree = vec![
        ("app/pkg/__init__.py".to_string(), Vec::new()),
        (
            "app/pkg/__pycache__/packages.cpython-311.pyc".to_string(),
            include_bytes!("../testdata/dynamic.cpython-311.pyc").to_vec(),
        ),
        ("app/idna/__init__.py".to_string(), Vec::new()),
    ];
    tree.push(("filler/0".into(), noise(1, 1 << 20)));
    tree.push((
        "app/idna/__pycache__/__init__.cpython-311.pyc".into(),
        noise(2, 20 << 10),
    ));
    tree.push(("filler/1".into(), noise(3, 1 << 20)));
    // Absolute imports only: not the body's own package's `idna`, nor a module of `idna`
    // named like another of the strings.
    let not_imported = [
        "app/pkg/idna/__pycache__/__init__.cpython-311.pyc",
        "app/idna/__pycache__/urllib3.cpython-311.pyc",
    ];
    tree.push(("app/pkg/idna/__init__.py".into(), Vec::new()));
    for (k, path) in not_imported.iter().enumerate() {
        tree.push((path.to_string(), noise(10 + k as u32, 20 << 10)));
        tree.push((format!("filler/n{k}"), noise(20 + k as u32, 1 << 20)));
    }
    let view = lazy_view(&registry, dir.path(), &tree).await;
    let root = view
        .lookup("app/pkg/__pycache__/packages.cpython-311.pyc")
        .unwrap();
    view.follow_imports(true);
    view.fetch_imports(root, 8 << 20).await;
    assert!(cached(
        &view,
        "app/idna/__pycache__/__init__.cpython-311.pyc"
    ));
    assert!(!cached(&view, "filler/1"));
    for path in not_imported {
        assert!(!cached(&view, path), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modules_imports_that_lie_side_by_side_come_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FakeRegistry::new());
    // What the module's body imports, side by side in the layer, each a few spans long (a
    // span per few KiB, as chunks of eStargz or zstd:chunked are per file).
    let (imported, mut tree) = import_fixture();
    tree.push(("filler/before".into(), noise(99, 1 << 20)));
    for (k, path) in imported.iter().enumerate() {
        tree.push((path.clone(), noise(10 + k as u32, 20 << 10)));
    }
    tree.push(("filler/after".into(), noise(98, 1 << 20)));
    let files: Vec<(&str, Vec<u8>)> = tree.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    push(&registry, &files);
    let open_small = || async {
        let record = pull(&registry, dir.path()).await;
        let chunks = Arc::new(DiskChunks::open(dir.path()).unwrap());
        let layers = Layers::new(
            dir.path(),
            registry.clone(),
            Arc::new(Cache::new(chunks, 8)),
        )
        .with_span(8 << 10);
        ImageView::open(&layers, &record).await.unwrap()
    };
    drop(open_small().await);
    std::fs::remove_dir_all(crate::store::Layout::new(dir.path()).chunks()).unwrap();
    let view = open_small().await;
    view.follow_imports(true);
    let root = view
        .lookup("app/pkg/__pycache__/example.cpython-311.pyc")
        .unwrap();
    let before = registry.requests();
    view.fetch_imports(root, 8 << 20).await;
    let after = registry.requests();
    for p in &imported {
        assert!(cached(&view, p), "{p} imported but not fetched");
    }
    assert!(!cached(&view, "filler/before") && !cached(&view, "filler/after"));
    // The module itself, then its nine imports together.
    assert!(
        after.ranges - before.ranges <= 2,
        "{} requests for the module and its nine imports",
        after.ranges - before.ranges
    );
}
