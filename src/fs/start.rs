//! What a container of the image runs first, as its config says, fetched at mount before
//! anything asks for it: the program its `Entrypoint` (else its `Cmd`) names — found on the
//! config's `PATH`, with what the loader opens for it (`elf.rs`), and a `#!` script's
//! interpreter — and the user and group databases a runtime reads to set up the process
//! (`/etc/passwd`, `/etc/group`: containerd's and CRI's user and supplementary groups). When
//! that runs python — `python3 -c CODE`, `-m MODULE`, `python3 app.py`, a `#!` script whose
//! interpreter is python, or python later on its command line (`docker-entrypoint.sh python3
//! app.py`, `env`, `tini --`) — the modules it imports are walked too (`command.rs`), from
//! the config's `WorkingDir`.
//!
//! Between the mount of a container's rootfs and its program's first read, containerd and
//! runc create the container (0.1–0.2 s); with no startup profile the link would idle then.
//! The config is the publisher's (its digest is in the manifest the user pulled), and a
//! program run with other arguments is still the same program; a wrong guess — a command line
//! that runs something else — costs the bandwidth of one program and its libraries, and
//! never changes a byte served: everything fetched is verified as any read is.
//!
//! Bounds: the hints keep at most [`MAX_PATH_DIRS`] directories of at most [`MAX_NAME`]
//! bytes each and at most [`MAX_ARGS`] arguments of at most [`MAX_ARG`] bytes each; a
//! script's first [`SHEBANG`] bytes are read; one interpreter is followed (for `env`, env and
//! the one program it runs).

use super::command::{is_python, python_command, PythonCommand};
use crate::tree::NodeId;

/// Most `PATH` directories searched for the program.
pub const MAX_PATH_DIRS: usize = 32;
/// Most arguments of the command line kept.
pub const MAX_ARGS: usize = 64;
/// Longest argument kept (a `-c` program's code; its first
/// [`MAX_CODE`](super::command::MAX_CODE) bytes are scanned).
pub const MAX_ARG: usize = 64 << 10;
/// Longest program name or `PATH` directory kept.
pub const MAX_NAME: usize = 4096;
/// Bytes of a script read for its `#!` line (the kernel reads 256).
pub const SHEBANG: u64 = 256;
/// Largest user or group database fetched.
const USER_DB_MAX: u64 = 1 << 20;
/// The `PATH` a runtime gives a process whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the image's config says a container runs first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartHints {
    /// The program as the config names it (a bare name is searched on `path`).
    pub program: Option<String>,
    /// The directories of the config's `PATH`, else the runtime's default.
    pub path: Vec<String>,
    /// The config's `WorkingDir` (a relative program path is relative to it).
    pub working_dir: String,
    /// The command line: the `Entrypoint`'s words then the `Cmd`'s, the program first (none
    /// past an argument longer than [`MAX_ARG`], at most [`MAX_ARGS`]).
    pub args: Vec<String>,
    /// The locale the config's environment sets for character handling: `LC_ALL`, else
    /// `LC_CTYPE`, else `LANG` (at most [`MAX_NAME`] bytes).
    pub locale: Option<String>,
}

impl StartHints {
    /// The hints of an image config (JSON); none from one that does not parse.
    pub fn from_config(config: &[u8]) -> StartHints {
        let Ok(parsed) = serde_json::from_slice::<oci_spec::image::ImageConfiguration>(config)
        else {
            return StartHints::default();
        };
        let Some(c) = parsed.config() else {
            return StartHints::default();
        };
        // An empty Entrypoint (`[""]`) means none: the Cmd runs.
        let entrypoint = c
            .entrypoint()
            .clone()
            .filter(|e| !(e.len() == 1 && e[0].is_empty()))
            .unwrap_or_default();
        let args: Vec<String> = entrypoint
            .into_iter()
            .chain(c.cmd().clone().unwrap_or_default())
            .take_while(|a| a.len() <= MAX_ARG)
            .take(MAX_ARGS)
            .collect();
        let program = args
            .first()
            .cloned()
            .filter(|p| !p.is_empty() && p.len() <= MAX_NAME);
        // The last PATH set wins, as in the process's environment.
        let path = c
            .env()
            .iter()
            .flatten()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let var = |name: &str| {
            let prefix = format!("{name}=");
            c.env()
                .iter()
                .flatten()
                .rev()
                .find_map(|e| e.strip_prefix(prefix.as_str()))
                .filter(|v| !v.is_empty() && v.len() <= MAX_NAME)
                .map(str::to_string)
        };
        let locale = var("LC_ALL")
            .or_else(|| var("LC_CTYPE"))
            .or_else(|| var("LANG"));
        StartHints {
            locale,
            program,
            path: path
                .split(':')
                .filter(|d| d.starts_with('/') && d.len() <= MAX_NAME)
                .take(MAX_PATH_DIRS)
                .map(str::to_string)
                .collect(),
            working_dir: c
                .working_dir()
                .clone()
                .filter(|d| d.len() <= MAX_NAME)
                .unwrap_or_default(),
            args,
        }
    }
}

impl super::ImageView {
    /// Fetches the user and group databases a runtime reads before the container's program
    /// starts (each whole, up to 1 MiB, both at once), with a startup profile or without: a
    /// profile recorded by `stratafs mount` and `chroot` has no runtime's reads, and these
    /// are the first reads of a container's start (`ctr run` reads `/etc/group` in a
    /// temporary mount of the rootfs before it creates the container), which a replay or the
    /// program's fetch under way would otherwise keep waiting. Failures are left to the reads.
    pub async fn fetch_user_databases(&self) {
        let fetches = ["etc/passwd", "etc/group"].map(|path| async move {
            let Some(node) = super::elf::follow(&self.tree, path) else {
                return;
            };
            let Some((layer, offset, len)) = self.open_fetch(node, USER_DB_MAX) else {
                return;
            };
            if let Err(e) = self.readers[layer].fetch_for_open(offset, len).await {
                tracing::debug!(%path, error = %e, "fetch ahead of the container's start failed");
            }
        });
        futures_util::future::join_all(fetches).await;
    }

    /// Fetches the program a container of the image runs first ([`StartHints`]; the module's
    /// docs) as an open of it would (its loader and libraries too), beside the interpreter a
    /// `#!` line names (and `env`'s program), and the modules a python command imports.
    /// Nothing once a startup profile replays: it knows better. Failures are left to the
    /// reads.
    pub async fn fetch_program(&self, hints: &StartHints, limit: u64) {
        if self.profiled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let program = async {
            let Some(node) = self.program(hints, hints.program.as_deref()) else {
                return;
            };
            tracing::debug!(path = %self.tree.path(node), "fetching the image's program ahead of its start");
            let args: Vec<&str> = hints.args.iter().map(String::as_str).collect();
            let python_at = match is_python(&self.tree.node(node).name) {
                true => Some(0),
                false => args
                    .iter()
                    .skip(1)
                    .position(|a| is_python(a))
                    .map(|k| k + 1),
            };
            let runs_python = python_at.is_some();
            // The script's first bytes come with its own fetch (one flight); its interpreter
            // is fetched beside the rest of it, not after, and a python script's imports too.
            let interpreters = async {
                let found = self.interpreters(node, hints).await;
                let fetch = async {
                    for &f in &found {
                        tracing::debug!(path = %self.tree.path(f), "and its interpreter");
                        self.prefetch_file(f, limit).await;
                    }
                };
                let python = found.iter().any(|&f| is_python(&self.tree.node(f).name));
                let script = hints.program.clone().unwrap_or_default();
                let imports = async {
                    if python {
                        let command = PythonCommand::Script(script);
                        self.walk_start(hints, command, Some(node), limit).await;
                    }
                };
                // Python's own start, unless the program is python or runs it (below).
                let runtime = async {
                    if python && !runs_python {
                        self.fetch_python_start(limit).await;
                    }
                };
                futures_util::join!(fetch, imports, runtime);
            };
            // A python program, or one that runs python with the rest of its command line
            // (an entrypoint script's `exec "$@"`, `env`, `tini --`): what that imports.
            let imports = async {
                if let Some(command) = python_at.and_then(|k| python_command(&args[k..])) {
                    self.walk_start(hints, command, None, limit).await;
                }
            };
            // What the program reads as it starts that none of its files names (`runtime.rs`):
            // the C library's locale data and time zone, and python's start-up modules.
            let runtime = self.fetch_runtime(hints, runs_python, limit);
            futures_util::join!(
                self.prefetch_file(node, limit),
                interpreters,
                imports,
                runtime
            );
        };
        program.await;
        tracing::debug!("fetched what the image runs first");
    }

    /// Walks the imports of python `command` (`imports.rs`) as it would run in a container of
    /// the image: `-c` code's and a script's from the working directory; `script` is the
    /// script's file if known.
    pub(super) async fn walk_start(
        &self,
        hints: &StartHints,
        command: PythonCommand,
        script: Option<NodeId>,
        limit: u64,
    ) {
        let Some(tag) = self.python_tag().map(str::to_string) else {
            return;
        };
        let roots = match &command {
            PythonCommand::Modules(names) => {
                let dir = self
                    .directory(&hints.working_dir)
                    .unwrap_or(crate::tree::ROOT);
                super::imports::Resolver::at(&self.tree, dir, tag).files(names)
            }
            PythonCommand::Script(path) => {
                let path = match path.starts_with('/') {
                    true => path.clone(),
                    false => format!("{}/{path}", hints.working_dir),
                };
                let Some(script) = script.or_else(|| super::elf::follow_file(&self.tree, &path))
                else {
                    return;
                };
                self.script_modules(script, tag).await
            }
        };
        tracing::debug!(
            ?command,
            roots = roots.len(),
            "following the imports of the image's command"
        );
        self.walk_imports(&roots, limit).await;
    }

    /// The regular file `name` runs: a path (relative to the working directory) as it is, a
    /// bare name the first executable match on the `PATH`, as `execvp` finds it.
    fn program(&self, hints: &StartHints, name: Option<&str>) -> Option<NodeId> {
        let name = name?;
        let file = |path: &str| super::elf::follow_file(&self.tree, path);
        if name.contains('/') {
            return match name.starts_with('/') {
                true => file(name),
                false => file(&format!("{}/{name}", hints.working_dir)),
            };
        }
        hints.path.iter().find_map(|dir| {
            file(&format!("{dir}/{name}")).filter(|&id| self.tree.node(id).mode & 0o111 != 0)
        })
    }

    /// What the kernel runs for a `#!` script: the interpreter its first line names, and for
    /// `env` (so named in that line, whatever file it is: busybox's is a link) the program
    /// `env` runs, found on the `PATH`. Nothing for anything else.
    async fn interpreters(&self, script: NodeId, hints: &StartHints) -> Vec<NodeId> {
        let Some((layer, offset, len)) = self.open_fetch(script, SHEBANG) else {
            return Vec::new();
        };
        // The first piece exactly as the open's fetch beside this asks for it (whichever
        // claims it first, one request of the same reach), then its first bytes from there.
        let piece = self.tree.node(script).size.min(super::OPEN_PIECE);
        let reader = &self.readers[layer];
        if reader.fetch_for_open(offset, piece).await.is_err() {
            return Vec::new();
        }
        let Ok(head) = reader.read(offset, len).await else {
            return Vec::new();
        };
        let Some(line) = shebang(&head) else {
            return Vec::new();
        };
        let mut words = line.split_ascii_whitespace();
        let Some(interpreter) = words.next().filter(|w| w.starts_with('/')) else {
            return Vec::new();
        };
        let mut found: Vec<NodeId> = self.program(hints, Some(interpreter)).into_iter().collect();
        if interpreter.rsplit('/').next() == Some("env") {
            found.extend(self.program(hints, env_program(words)));
        }
        found
    }
}

/// The text after `#!` on a script's first line (within `head`), if it has one.
fn shebang(head: &[u8]) -> Option<&str> {
    let line = head.strip_prefix(b"#!")?;
    std::str::from_utf8(&line[..line.iter().position(|&b| b == b'\n')?]).ok()
}

/// The program `env` runs, given its arguments: the first that is not an option (nor the
/// value of `-u`/`-C`, or of `-S`'s split string's own options) nor a `NAME=value`.
fn env_program<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    while let Some(w) = words.next() {
        match w {
            "-u" | "-C" | "--unset" | "--chdir" => {
                words.next();
            }
            _ if w.starts_with('-') || w.contains('=') => {}
            _ => return Some(w),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_runs_the_first_word_that_is_no_option_nor_assignment() {
        fn program(line: &str) -> Option<&str> {
            env_program(line.split_ascii_whitespace())
        }
        assert_eq!(program("python3 -u"), Some("python3"));
        assert_eq!(program("-S python3 -u"), Some("python3"));
        assert_eq!(program("-u HOME LANG=C -i node app.js"), Some("node"));
        assert_eq!(program("-C /srv --unset=X ruby"), Some("ruby"));
        assert_eq!(program("-i A=1"), None);
        assert_eq!(
            shebang(b"#!/usr/bin/env python3\nprint()"),
            Some("/usr/bin/env python3")
        );
        assert_eq!(
            shebang(b"#!/bin/sh"),
            None,
            "no end of line within the bytes read"
        );
        assert_eq!(shebang(b"\x7fELF"), None);
    }

    /// An image config (JSON) whose `config` is `c`.
    fn config(c: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": c,
        }))
        .unwrap()
    }

    #[test]
    fn the_command_line_is_the_entrypoint_then_the_cmd_within_bounds() {
        let args = |c| StartHints::from_config(&config(c)).args;
        assert_eq!(
            args(serde_json::json!({"Entrypoint": ["/init", "--"], "Cmd": ["python3", "app.py"]})),
            ["/init", "--", "python3", "app.py"]
        );
        assert_eq!(
            args(serde_json::json!({"Entrypoint": [""], "Cmd": ["python3", "-m", "app"]})),
            ["python3", "-m", "app"]
        );
        let many: Vec<String> = (0..1000).map(|k| k.to_string()).collect();
        assert_eq!(args(serde_json::json!({"Cmd": many})).len(), MAX_ARGS);
        let long = "x".repeat(MAX_ARG + 1);
        assert_eq!(
            args(serde_json::json!({"Cmd": ["python3", "-c", long, "more"]})),
            ["python3", "-c"],
            "nothing from an argument too long on"
        );
    }

    #[test]
    fn hints_come_from_entrypoint_else_cmd_and_the_config_path() {
        let h = StartHints::from_config(&config(serde_json::json!({
            "Entrypoint": ["/docker-entrypoint.sh"], "Cmd": ["nginx", "-g", "daemon off;"],
            "Env": ["PATH=/first", "A=1", "PATH=/opt/bin::.:/usr/bin"], "WorkingDir": "/srv",
        })));
        assert_eq!(h.program.as_deref(), Some("/docker-entrypoint.sh"));
        assert_eq!(h.path, ["/opt/bin", "/usr/bin"]);
        assert_eq!(h.working_dir, "/srv");
        let h = StartHints::from_config(&config(serde_json::json!({
            "Entrypoint": [""], "Cmd": ["python3"],
        })));
        assert_eq!(h.program.as_deref(), Some("python3"));
        assert_eq!(h.path.len(), 6, "the default PATH");
        assert_eq!(StartHints::from_config(b"{not json"), StartHints::default());
        let long = "d".repeat(MAX_NAME + 1);
        let h = StartHints::from_config(&config(serde_json::json!({
            "Cmd": [long.clone()], "Env": [format!("PATH={long}:/bin")],
        })));
        assert_eq!((h.program, h.path), (None, vec!["/bin".to_string()]));
    }
}
