//! Which modules a Python process was told to import on its command line: `python3 -c
//! 'import numpy, pandas, requests'` names them all before python gets to the first, and
//! `python3 -m pkg.tool` names the module it runs. The import walk (`imports.rs`) otherwise
//! learns of `pandas` only when python, done with `numpy`, opens `pandas/__init__`; while
//! python runs `numpy`'s initialisation and its libraries' code, the link would idle. On the
//! first open of a module's bytecode by a process, [`super::ImageView`] reads the process's
//! command line (`/proc/PID/cmdline`; the pid FUSE reports is in the daemon's namespace) and,
//! for a python command with `-c` or `-m`, walks the imports of the modules named in one walk,
//! an earlier module's files before any of a later one's (the later ones fill the walk's
//! slots while the earlier ones' files are being parsed).
//!
//! A command line is untrusted input (any process reading the mount has one). At most
//! [`MAX_CMDLINE`] bytes are read, at most [`MAX_CODE`] bytes of `-c` code are scanned, at most
//! [`MAX_MODULES`] names are kept; each process is looked at once, at most [`MAX_PROCESSES`]
//! per mount. A wrong guess wastes bandwidth only: the walk fetches files like an open and
//! every byte is verified like any read.

use crate::tree::NodeId;

/// Most bytes of a command line read.
pub const MAX_CMDLINE: u64 = 64 << 10;
/// Most bytes of `-c` code scanned for imports.
pub const MAX_CODE: usize = 16 << 10;
/// Most module names kept from one command line.
pub const MAX_MODULES: usize = 64;
/// Most processes whose command line one mount reads.
pub const MAX_PROCESSES: usize = 4096;

/// The modules a python command line (`argv`, from `/proc/PID/cmdline`) imports first: those
/// of the `import` and `from … import` statements of its `-c` code (a `from a import b`
/// gives `a` and `b`, which may be a module of package `a`), or its `-m` module. `None` for
/// anything else: not python, a script, code from standard input.
pub fn python_imports(argv: &[&str]) -> Option<Vec<String>> {
    let program = argv.first()?.rsplit('/').next()?;
    let version = program.strip_prefix("python")?;
    if !version.is_empty() && !version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let mut args = argv[1..].iter();
    while let Some(arg) = args.next() {
        let flags = arg.strip_prefix('-').filter(|f| !f.is_empty())?;
        if flags.starts_with('-') {
            // Long options: only `--check-hash-based-pycs MODE` takes a value.
            if *arg == "--" {
                return None;
            }
            if *arg == "--check-hash-based-pycs" {
                args.next();
            }
            continue;
        }
        // Short options, several to an argument (`-Bc CODE`); `c`, `m`, `W` and `X` take the
        // rest of the argument or the next one.
        for (at, flag) in flags.char_indices() {
            if !matches!(flag, 'c' | 'm' | 'W' | 'X') {
                continue;
            }
            let rest = &flags[at + 1..];
            let value = if rest.is_empty() { *args.next()? } else { rest };
            match flag {
                'c' => return Some(imports_of(value)),
                'm' => return Some(vec![value.to_string()]).filter(|_| is_dotted(value)),
                _ => break,
            }
        }
    }
    None
}

/// The modules the `import` statements of `code` name, in order (at most [`MAX_MODULES`]; only
/// the first [`MAX_CODE`] bytes are read). Statements are lines or `;`-separated; imports
/// inside blocks count too (an indented `import` may run as well).
pub fn imports_of(code: &str) -> Vec<String> {
    let mut end = code.len().min(MAX_CODE);
    while !code.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: Vec<String> = Vec::new();
    let mut keep = |name: &str| {
        let name = name.trim();
        if is_dotted(name) && out.len() < MAX_MODULES && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    };
    for statement in code[..end].split(['\n', ';']) {
        let words: Vec<&str> = statement.split_whitespace().collect();
        match words.as_slice() {
            ["import", ..] => {
                let list = statement.trim_start().strip_prefix("import").unwrap_or("");
                for item in list.split(',') {
                    keep(item.split_whitespace().next().unwrap_or(""));
                }
            }
            ["from", module, "import", ..] => {
                if !is_dotted(module) {
                    continue; // relative: no package to be relative to
                }
                keep(module);
                let list = statement.split_once(" import ").map_or("", |(_, l)| l);
                let list = list.trim().trim_start_matches('(').trim_end_matches(')');
                for item in list.split(',') {
                    keep(item.split_whitespace().next().unwrap_or(""));
                }
            }
            _ => {}
        }
    }
    out
}

/// A module name: identifiers joined by dots.
fn is_dotted(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_alphanumeric() || c == '_')
        })
}

impl super::ImageView {
    /// On an open of `opened` by process `pid`: the first time for that process and a module's
    /// bytecode, the modules its python command line names are walked as an open of each
    /// would walk them (`imports.rs`), in one walk, in the order written.
    pub async fn follow_command(&self, opened: NodeId, pid: u32, limit: u64) {
        if self.profiled.load(std::sync::atomic::Ordering::Relaxed)
            || pid == 0
            || !self.follows_imports_of(opened)
        {
            return;
        }
        {
            let mut seen = self.command_pids.lock().unwrap();
            if seen.len() >= MAX_PROCESSES || !seen.insert(pid) {
                return;
            }
        }
        let cmdline = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut bytes = Vec::new();
            let file = std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
            file.take(MAX_CMDLINE).read_to_end(&mut bytes).ok()?;
            Some(bytes)
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let argv: Vec<&str> = cmdline
            .split(|&b| b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .collect();
        let Some(names) = python_imports(&argv) else {
            return;
        };
        let Some(resolver) = super::imports::Resolver::new(&self.tree, opened) else {
            return;
        };
        let roots = resolver.files(&names);
        tracing::debug!(
            pid,
            ?names,
            roots = roots.len(),
            "following the imports of a command line"
        );
        self.walk_imports(&roots, limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_command_names_the_modules_of_its_code_or_its_module() {
        let code = "import numpy, pandas as pd , requests\nfrom os.path import join, (x)";
        assert_eq!(
            python_imports(&["/usr/bin/python3", "-c", code]).unwrap(),
            ["numpy", "pandas", "requests", "os.path", "join"]
        );
        assert_eq!(
            python_imports(&[
                "python3.11",
                "-BIc",
                "import a.b; print(1); from . import c"
            ])
            .unwrap(),
            ["a.b"]
        );
        assert_eq!(
            python_imports(&["python", "-W", "ignore", "-X", "dev", "-m", "http.server"]).unwrap(),
            ["http.server"]
        );
        assert_eq!(
            python_imports(&["python3", "-mjson.tool"]).unwrap(),
            ["json.tool"]
        );
        assert!(python_imports(&["python3", "-c", "print(1)"])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn anything_else_names_nothing_and_bounds_hold() {
        for argv in [
            &["python3", "script.py"][..],
            &["python3", "-"],
            &["python3", "--", "-c", "import x"],
            &["python3", "-c"],
            &["python3", "-m", "../etc"],
            &["pythonista", "-c", "import x"],
            &["/bin/sh", "-c", "import x"],
            &["chroot", "/mnt", "python3", "-c", "import x"],
            &[],
        ] {
            assert_eq!(python_imports(argv), None, "{argv:?}");
        }
        let many: String = (0..1000).map(|k| format!("import m{k}\n")).collect();
        assert_eq!(imports_of(&many).len(), MAX_MODULES);
        let long = format!("{}import late", "#".repeat(MAX_CODE));
        assert!(imports_of(&long).is_empty());
        assert!(
            imports_of("import é").len() == 1,
            "identifiers may be unicode"
        );
        let _ = imports_of(&"é".repeat(MAX_CODE));
    }
}
