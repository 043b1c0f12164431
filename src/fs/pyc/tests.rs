//! Tests of the bytecode import finder, on files `python3.11 -m py_compile` wrote.

use super::*;

/// `python3.11 -m py_compile` of:
///
/// ```python
/// import os, json.decoder
/// from . import sibling
/// from .sub import leaf, other
/// from pkg.deep.mod import thing
/// def later():
///     import never_at_import_time
/// class K:
///     import also_later
/// ```
fn pyc_names(pyc: &[u8]) -> Vec<String> {
    pyc_imports(pyc).names
}

const PYC: &[u8] = include_bytes!("../testdata/example.cpython-311.pyc");

/// [`PYC`] with 3.13's magic (3571): the same layout of code objects, other instruction
/// numbers, so its instructions are not decoded.
fn newer() -> Vec<u8> {
    let mut newer = PYC.to_vec();
    newer[..2].copy_from_slice(&3571u16.to_le_bytes());
    newer
}

#[test]
fn names_of_the_module_body_not_of_its_functions() {
    // Without decoded statements, the names are the body's, constants included.
    let names = pyc_names(&newer());
    for want in [
        "os",
        "json.decoder",
        "sub",
        "pkg.deep.mod",
        "sibling",
        "leaf",
        "other",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    for not in ["never_at_import_time", "also_later"] {
        assert!(!names.iter().any(|n| n == not), "{not} in {names:?}");
    }
}

#[test]
fn the_import_statements_of_the_module_body_in_the_order_they_run() {
    let import = |level, module: &str, names: &[&str]| Import {
        level,
        module: module.into(),
        names: names.iter().map(|n| n.to_string()).collect(),
    };
    assert_eq!(
        pyc_imports(PYC),
        Imports {
            statements: Some(vec![
                import(0, "os", &[]),
                import(0, "json.decoder", &[]),
                import(1, "", &["sibling"]),
                import(1, "sub", &["leaf", "other"]),
                import(0, "pkg.deep.mod", &["thing"]),
            ]),
            names: pyc_names(PYC),
            dynamic: Vec::new(),
        }
    );
}

#[test]
fn names_a_body_imports_by_name_at_run_time() {
    // `for package in ("urllib3", "idna"): locals()[package] = __import__(package)`, as
    // requests.packages does, and a docstring that names no module.
    let imports = pyc_imports(include_bytes!("../testdata/dynamic.cpython-311.pyc"));
    assert_eq!(imports.dynamic, ["urllib3", "idna"]);
    // A body that calls neither `__import__` nor `import_module`: none.
    assert!(pyc_imports(PYC).dynamic.is_empty());
}

#[test]
fn bytecode_of_a_python_whose_instructions_are_not_known_gives_its_names() {
    let imports = pyc_imports(&newer());
    assert_eq!(imports.statements, None);
    assert!(imports.names.iter().any(|n| n == "sibling"));
    // Decoded, the same body's statements say what it imports; its names are the
    // attributes it reads, of which it reads none.
    let decoded = pyc_imports(PYC);
    assert!(decoded.statements.is_some());
    assert!(decoded.names.is_empty(), "{:?}", decoded.names);
}

#[test]
fn blocks_that_never_run_on_import_are_left_out() {
    // `python3.11 -m py_compile` of:
    //
    // ```python
    // import os
    // import typing
    // from typing import TYPE_CHECKING, Literal
    // if TYPE_CHECKING:
    //     import typed_only
    // if typing.TYPE_CHECKING:
    //     from pkg import typed_too
    // Mode = Literal["linear", "polynomial"]
    // path = os.path.join("a", "b")
    // os.environ.get("X")
    // if __name__ == "__main__":
    //     import script_only
    // import after
    // ```
    let imports = pyc_imports(include_bytes!("../testdata/guarded.cpython-311.pyc"));
    let modules: Vec<String> = imports
        .statements
        .expect("decoded")
        .into_iter()
        .map(|i| i.module)
        .collect();
    assert_eq!(modules, ["os", "typing", "typing", "after"]);
    // The attributes it reads, not its constants (`"polynomial"`) nor its globals.
    for want in ["path", "join", "environ", "get"] {
        assert!(
            imports.names.iter().any(|n| n == want),
            "{want}: {:?}",
            imports.names
        );
    }
    for not in [
        "polynomial",
        "linear",
        "Mode",
        "script_only",
        "typed_only",
        "after",
    ] {
        assert!(
            !imports.names.iter().any(|n| n == not),
            "{not}: {:?}",
            imports.names
        );
    }
}

#[test]
fn a_module_with_a_module_getattr_names_what_it_lists() {
    // `python3.11 -m py_compile` of:
    //
    // ```python
    // __all__ = ["alpha", "beta"]
    // _LAZY = ("gamma", "delta", "epsilon")
    // def __getattr__(name):
    //     import importlib
    //     return importlib.import_module("." + name, __name__)
    // ```
    let imports = pyc_imports(include_bytes!("../testdata/lazy.cpython-311.pyc"));
    assert_eq!(imports.statements, Some(Vec::new()));
    assert_eq!(
        imports.names,
        ["alpha", "beta", "gamma", "delta", "epsilon"]
    );
}

/// A module body of 1,024 `from S import S, S, …`, its tuple of names one string `s` and
/// 150,000 back references to it (5 bytes each).
fn repeated(s: &str) -> Vec<u8> {
    let n = 150_000u32;
    let mut pyc = PYC[..16].to_vec();
    pyc.push(b'c');
    pyc.extend([0u8; 20]);
    let code: Vec<u8> = (0..1024)
        .flat_map(|_| [LOAD_CONST, 0, LOAD_CONST, 1, IMPORT_NAME, 0])
        .collect();
    pyc.push(b's');
    pyc.extend((code.len() as u32).to_le_bytes());
    pyc.extend(&code);
    pyc.push(b'(');
    pyc.extend(2u32.to_le_bytes());
    pyc.push(b'i');
    pyc.extend(0i32.to_le_bytes());
    pyc.push(b'(');
    pyc.extend(n.to_le_bytes());
    pyc.push(b'a' | 0x80);
    pyc.extend((s.len() as u32).to_le_bytes());
    pyc.extend(s.as_bytes());
    for _ in 1..n {
        pyc.push(b'r');
        pyc.extend(0u32.to_le_bytes());
    }
    pyc.push(b'(');
    pyc.extend(1u32.to_le_bytes());
    pyc.push(b'r');
    pyc.extend(0u32.to_le_bytes());
    assert!(pyc.len() as u64 <= MAX_PYC);
    pyc
}

#[test]
fn back_references_do_not_multiply_what_is_kept() {
    // Each name kept is a copy: what is kept is bounded in number and length, not by the
    // references.
    let s = "m".repeat(100);
    let imports = pyc_imports(&repeated(&s));
    let statements = imports.statements.expect("the body's instructions decoded");
    assert_eq!(statements.len(), MAX_IMPORTS);
    assert!(statements.iter().all(|i| i.module == s));
    let names: usize = statements.iter().map(|i| i.names.len()).sum();
    assert_eq!(names, MAX_NAMES, "names kept across the statements");
    // Not decoded (3.13's magic): the body's names, as many at most.
    let mut newer = repeated(&s);
    newer[..2].copy_from_slice(&3571u16.to_le_bytes());
    assert_eq!(pyc_imports(&newer).names.len(), MAX_NAMES);
    // A name longer than MAX_NAME_LEN is no module's: not kept.
    let long = pyc_imports(&repeated(&"m".repeat(MAX_NAME_LEN + 1)));
    assert_eq!(long.statements, Some(Vec::new()));
    assert!(long.names.is_empty());
}

#[test]
fn damaged_or_foreign_input_gives_what_it_can_and_never_panics() {
    assert!(pyc_names(b"").is_empty());
    assert!(pyc_names(&[0u8; 64]).is_empty(), "not a known magic");
    // Every truncation and every single flipped byte: no panic, no huge allocation.
    for n in 0..PYC.len() {
        let _ = pyc_names(&PYC[..n]);
        let _ = pyc_imports(&PYC[..n]);
    }
    for i in 16..PYC.len() {
        let mut bad = PYC.to_vec();
        bad[i] ^= 0xff;
        let _ = pyc_names(&bad);
        let _ = pyc_imports(&bad);
    }
    // A tuple claiming two billion items.
    let mut huge = PYC[..16].to_vec();
    huge.extend_from_slice(&[b'(', 0xff, 0xff, 0xff, 0x7f]);
    assert!(pyc_names(&huge).is_empty());
    assert_eq!(pyc_imports(&huge), Imports::default());
    // Nesting deeper than MAX_DEPTH.
    let mut deep = PYC[..16].to_vec();
    deep.extend(std::iter::repeat_n(b')', 1000).flat_map(|t| [t, 1]));
    assert!(pyc_names(&deep).is_empty());
}
