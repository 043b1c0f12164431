//! Which modules a Python process was told to import on its command line: `python3 -c
//! 'import numpy, pandas, requests'` names them all before python gets to the first,
//! `python3 -m pkg.tool` names the module it runs, and `python3 app.py` (or a `#!` script
//! such as `/usr/bin/pip3`, which the kernel runs as `python3 /usr/bin/pip3`) names a script
//! whose import statements say. The import walk (`imports.rs`) otherwise learns of `pandas`
//! only when python, done with `numpy`, opens `pandas/__init__`, and of a script's imports only
//! once python has started up and opens the script; while python runs `numpy`'s
//! initialisation and its libraries' code, the link would idle. On the first open of a
//! module's bytecode or source by a process, [`super::ImageView`] reads the process's command line
//! (`/proc/PID/cmdline`; the pid FUSE reports is in the daemon's namespace) and, for a python
//! command with `-c`, `-m` or a script, walks the imports of the modules named in one walk,
//! an earlier module's files before any of a later one's (the later ones fill the walk's
//! slots while the earlier ones' files are being parsed). The process's working directory
//! (`/proc/PID/cwd`, less its root `/proc/PID/root`: a chroot's directory; a container's
//! paths are shown from its own root) is where `-c` code's and `-m`'s modules are looked up
//! first, as `sys.path` starts there (the app's own package, `python3 -m app`). A script is
//! found in the image by its path: as given if absolute, else joined to that directory; the
//! longest tail of that path the image has is taken (a path seen from outside a chroot or
//! container has the mount's own path in front).
//!
//! A command line is untrusted input (any process reading the mount has one). At most
//! [`MAX_CMDLINE`] bytes are read, at most [`MAX_CODE`] bytes of `-c` code and
//! [`super::pysource::MAX_SOURCE`] of a script are scanned, at most [`MAX_MODULES`] names are
//! kept, a script's path is tried at most [`MAX_COMPONENTS`] ways; each process is looked
//! at once, at most [`MAX_PROCESSES`] per mount. A wrong guess wastes bandwidth only: the
//! walk fetches files like an open and every byte is verified like any read.

use super::pysource::dotted;
use crate::tree::NodeId;

/// Most bytes of a command line read.
pub const MAX_CMDLINE: u64 = 64 << 10;
/// Most bytes of `-c` code scanned for imports.
pub const MAX_CODE: usize = 16 << 10;
/// Most module names kept from one command line.
pub const MAX_MODULES: usize = 64;
/// Most processes whose command line one mount reads.
pub const MAX_PROCESSES: usize = 4096;
/// Most components of a script's path (the tails tried in the image).
pub const MAX_COMPONENTS: usize = 64;

/// What a python command line runs first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PythonCommand {
    /// The modules of the `import` and `from … import` statements of its `-c` code (a
    /// `from a import b` gives `a` and `b`, which may be a module of package `a`), or its
    /// `-m` module.
    Modules(Vec<String>),
    /// A script, by its path as given.
    Script(String),
}

/// What a python command line (`argv`, from `/proc/PID/cmdline`) runs first. `None` for
/// anything else: not python, code from standard input, an interactive python.
pub fn python_command(argv: &[&str]) -> Option<PythonCommand> {
    if !is_python(argv.first()?) {
        return None;
    }
    let script = |arg: &str| {
        (arg != "-" && !arg.is_empty() && arg.len() <= super::start::MAX_NAME)
            .then(|| PythonCommand::Script(arg.to_string()))
    };
    let mut args = argv[1..].iter();
    while let Some(arg) = args.next() {
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            return script(arg);
        };
        if flags.starts_with('-') {
            // Long options: only `--check-hash-based-pycs MODE` takes a value.
            if *arg == "--" {
                return script(args.next()?);
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
                'c' => return Some(PythonCommand::Modules(imports_of(value))),
                'm' => {
                    return dotted(value).then(|| PythonCommand::Modules(vec![value.to_string()]))
                }
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
        if dotted(name) && out.len() < MAX_MODULES && !out.iter().any(|n| n == name) {
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
                if !dotted(module) {
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

/// Whether `program` (a path or a name) is python's: `python`, `python3`, `python3.11`.
pub fn is_python(program: &str) -> bool {
    let name = program.rsplit('/').next().unwrap_or(program);
    name.strip_prefix("python")
        .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

impl super::ImageView {
    /// Whether an open of `opened` by `pid` leaves [`follow_command`](Self::follow_command)
    /// nothing to do: no process, not a module, or the process's command line read already
    /// (or as many as a mount reads).
    pub(super) fn command_followed(&self, opened: NodeId, pid: u32) -> bool {
        pid == 0 || !self.follows_imports_of(opened) || {
            let seen = self.command_pids.lock().unwrap();
            seen.len() >= MAX_PROCESSES || seen.contains(&pid)
        }
    }

    /// On an open of `opened` by process `pid`: the first time for that process and a module's
    /// bytecode or source, the modules its python command line names (or its script's statements
    /// import) are walked as an open of each would walk them (`imports.rs`), in one walk, in
    /// the order written.
    pub async fn follow_command(&self, opened: NodeId, pid: u32, limit: u64) {
        if self.profiled.load(std::sync::atomic::Ordering::Relaxed)
            || self.command_followed(opened, pid)
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
        let Some(command) = python_command(&argv) else {
            return;
        };
        let Some((resolver, _)) = self.module_resolver(opened) else {
            return;
        };
        let tag = resolver.tag().to_string();
        let cwd = tokio::task::spawn_blocking(move || process_cwd(pid))
            .await
            .ok()
            .flatten();
        let roots = match &command {
            // `sys.path` starts at the working directory (for `-m`, the module may be the
            // app's own package there); else where the opened module is looked up.
            PythonCommand::Modules(names) => match cwd.and_then(|c| self.directory(&c)) {
                Some(dir) => super::imports::Resolver::at(&self.tree, dir, tag).files(names),
                None => resolver.files(names),
            },
            PythonCommand::Script(path) => {
                let full = match (path.starts_with('/'), cwd) {
                    (true, _) => path.clone(),
                    (false, Some(cwd)) => format!("{cwd}/{path}"),
                    (false, None) => return,
                };
                let Some(script) = locate(&self.tree, &full) else {
                    return;
                };
                self.script_modules(script, tag).await
            }
        };
        tracing::debug!(
            pid,
            ?command,
            roots = roots.len(),
            "following the imports of a command line"
        );
        self.walk_imports(&roots, limit).await;
    }

    /// The directory of the image at `path`, if there is one.
    pub(super) fn directory(&self, path: &str) -> Option<NodeId> {
        super::elf::follow(&self.tree, path)
            .filter(|&d| self.tree.node(d).file_type == crate::tree::FileType::Dir)
    }

    /// The files of the modules script `script` imports, for a python whose bytecode files
    /// are tagged `tag` (its first [`MAX_SOURCE`](super::pysource::MAX_SOURCE) bytes read
    /// through the cache; `sys.path` starts at its directory). Nothing if the walk has had the
    /// script already (an open of it walked it), or it cannot be read by range.
    pub(super) async fn script_modules(&self, script: NodeId, tag: String) -> Vec<NodeId> {
        let n = self.tree.node(script);
        let Some((layer, offset)) = n
            .data
            .filter(|_| n.file_type == crate::tree::FileType::File)
        else {
            return Vec::new();
        };
        let reader = &self.readers[layer];
        let len = n.size.min(super::pysource::MAX_SOURCE as u64);
        if len == 0 || !reader.index().random_access() {
            return Vec::new();
        }
        // Claimed once read: a script that could not be read is left to its open's walk.
        let Ok(bytes) = reader.read(offset, len).await else {
            return Vec::new();
        };
        if !self.claim_import(script) {
            return Vec::new();
        }
        let resolver = super::imports::Resolver::at(&self.tree, n.parent, tag).for_main();
        self.source_modules(&resolver, bytes).await
    }
}

/// The working directory of process `pid` as the process sees it: `/proc/PID/cwd` with its
/// root (`/proc/PID/root`: a chroot's directory as seen from here; `/` for a container in a
/// mount namespace of its own, whose paths are shown from its root) taken off the front.
fn process_cwd(pid: u32) -> Option<String> {
    let link = |what: &str| {
        std::fs::read_link(format!("/proc/{pid}/{what}"))
            .ok()
            .and_then(|p| p.to_str().map(str::to_string))
    };
    within(&link("root")?, &link("cwd")?)
}

/// Path `path` (as seen from here) relative to root directory `root` (as seen from here),
/// as an absolute path: `None` if it is not under it.
fn within(root: &str, path: &str) -> Option<String> {
    match root {
        "/" => Some(path.to_string()),
        root => path
            .strip_prefix(root.trim_end_matches('/'))
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .map(|rest| format!("/{}", rest.trim_start_matches('/'))),
    }
}

/// The regular file of the image at the longest tail of `path` the image has (after `.` and
/// `..` are taken as written): `/usr/bin/pip3` as it is, `/run/mnt/app/main.py` (a path from
/// outside the mount) as `app/main.py`. At most [`MAX_COMPONENTS`] tails are tried.
pub fn locate(tree: &crate::tree::Tree, path: &str) -> Option<NodeId> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let skip = parts.len().saturating_sub(MAX_COMPONENTS);
    (skip..parts.len()).find_map(|k| super::elf::follow_file(tree, &parts[k..].join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(argv: &[&str]) -> Vec<String> {
        match python_command(argv) {
            Some(PythonCommand::Modules(m)) => m,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    fn script(argv: &[&str]) -> String {
        match python_command(argv) {
            Some(PythonCommand::Script(s)) => s,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    #[test]
    fn a_python_command_names_the_modules_of_its_code_or_its_module() {
        let code = "import numpy, pandas as pd , requests\nfrom os.path import join, (x)";
        assert_eq!(
            modules(&["/usr/bin/python3", "-c", code]),
            ["numpy", "pandas", "requests", "os.path", "join"]
        );
        assert_eq!(
            modules(&[
                "python3.11",
                "-BIc",
                "import a.b; print(1); from . import c"
            ]),
            ["a.b"]
        );
        assert_eq!(
            modules(&["python", "-W", "ignore", "-X", "dev", "-m", "http.server"]),
            ["http.server"]
        );
        assert_eq!(modules(&["python3", "-mjson.tool"]), ["json.tool"]);
        assert!(modules(&["python3", "-c", "print(1)"]).is_empty());
    }

    #[test]
    fn a_python_command_names_its_script() {
        assert_eq!(script(&["python3", "app.py", "-c", "x"]), "app.py");
        assert_eq!(
            script(&["/usr/bin/python3", "/usr/bin/pip3", "--version"]),
            "/usr/bin/pip3"
        );
        assert_eq!(
            script(&["python3.11", "-u", "-W", "error", "-X", "dev", "./run.py"]),
            "./run.py"
        );
        assert_eq!(
            script(&["python3", "--", "-c"]),
            "-c",
            "after --, a file's name"
        );
    }

    #[test]
    fn a_working_directory_is_taken_from_the_processs_root() {
        assert_eq!(within("/", "/srv/app").as_deref(), Some("/srv/app"));
        assert_eq!(within("/run/mnt", "/run/mnt/srv").as_deref(), Some("/srv"));
        assert_eq!(within("/run/mnt", "/run/mnt").as_deref(), Some("/"));
        assert_eq!(within("/run/mnt/", "/run/mnt/a").as_deref(), Some("/a"));
        assert_eq!(within("/run/mnt", "/run/mntx/a"), None);
        assert_eq!(within("/run/mnt", "/elsewhere"), None);
    }

    #[test]
    fn a_script_is_found_at_the_longest_tail_of_its_path_the_image_has() {
        let tree = crate::tree::Tree::from_files(&["app/main.py", "main.py", "usr/bin/pip3"]);
        let found = |path: &str| locate(&tree, path).map(|id| tree.path(id));
        assert_eq!(found("/usr/bin/pip3").as_deref(), Some("usr/bin/pip3"));
        assert_eq!(
            found("/run/mnt/app/main.py").as_deref(),
            Some("app/main.py")
        );
        assert_eq!(
            found("/run/mnt/./app/../main.py").as_deref(),
            Some("main.py")
        );
        assert_eq!(found("/run/mnt/other.py"), None);
        assert_eq!(found("/run/mnt/app"), None, "a directory is no script");
        let deep = format!("{}/main.py", "d/".repeat(10 * MAX_COMPONENTS));
        assert_eq!(found(&deep).as_deref(), Some("main.py"));
    }

    #[test]
    fn anything_else_names_nothing_and_bounds_hold() {
        for argv in [
            &["python3"][..],
            &["python3", "-"],
            &["python3", "-u"],
            &["python3", "--"],
            &["python3", "-c"],
            &["python3", "-m", "../etc"],
            &["pythonista", "-c", "import x"],
            &["/bin/sh", "-c", "import x"],
            &["chroot", "/mnt", "python3", "-c", "import x"],
            &[],
        ] {
            assert_eq!(python_command(argv), None, "{argv:?}");
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
