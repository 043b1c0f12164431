//! What a program reads as it starts that no file of its own names: the C library's locale
//! data for the locale the image's config sets (`LC_ALL`, else `LC_CTYPE`, else `LANG`: the
//! files of `usr/lib/locale/<name>` with the codeset as the C library normalizes it,
//! `C.UTF-8` → `C.utf8`), its alias file and conversion-module cache (`gconv-modules.cache`),
//! and the time zone (`etc/localtime`); and for a python interpreter, the modules python
//! imports before the program's first line — `encodings` with its aliases and UTF-8 codec
//! (with a config that sets no locale, `C.UTF-8`'s data too: python takes it in the C locale),
//! the site directories' `.pth` files and the modules their import lines name,
//! `sitecustomize` and `usercustomize`, looked up in the library directories only.
//! Between the program's own pages each of these is a round trip the process waits for in
//! turn: on the cold-start benchmark, about 0.3 s of python's start over a 20 ms link.
//! [`super::ImageView::fetch_program`] fetches them beside the program.
//!
//! Guesses from the image's own files and its config, which is the publisher's: a wrong one —
//! a program that never sets a locale, a `.pth` line that imports nothing — costs bandwidth
//! only, and every byte fetched is verified as any read is. Bounds: at most
//! [`MAX_RUNTIME_FILES`] data files of at most [`RUNTIME_FILE_MAX`] bytes each; at most
//! [`MAX_PTH_FILES`] `.pth` files of at most [`PTH_MAX`] bytes each, at most
//! [`MAX_PTH_MODULES`] module names from them, of at most 255 bytes each.

use super::start::StartHints;
use crate::tree::{FileType, NodeId, Tree};

/// Most locale and time-zone files fetched.
pub const MAX_RUNTIME_FILES: usize = 32;
/// Largest such file fetched (a UTF-8 locale's `LC_CTYPE` is about 350 KB).
pub const RUNTIME_FILE_MAX: u64 = 1 << 20;
/// Most `.pth` files read.
pub const MAX_PTH_FILES: usize = 32;
/// Largest `.pth` file read.
pub const PTH_MAX: u64 = 64 << 10;
/// Most module names taken from `.pth` files.
pub const MAX_PTH_MODULES: usize = 32;

/// The modules every python 3 imports as it starts, before the site directories' and the
/// `customize` modules (since 3.11 the others it needs then are frozen into the interpreter).
const PYTHON_START: [&str; 3] = ["encodings", "encodings.aliases", "encodings.utf_8"];
/// What python before 3.11 imports as it starts beside [`PYTHON_START`] (since 3.11 frozen
/// into the interpreter).
const UNFROZEN_BEFORE_311: [&str; 10] = [
    "site",
    "os",
    "codecs",
    "io",
    "abc",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
];
/// The modules `site` imports after the `.pth` files' (either may be missing).
const SITE_CUSTOMIZE: [&str; 2] = ["sitecustomize", "usercustomize"];

/// The locale's name as the C library looks for its directory: the codeset lowercased and
/// stripped to letters and digits (`en_US.UTF-8@euro` → `en_US.utf8@euro`). `None` for the
/// built-in locales (`C`, `POSIX`) and names that are not a locale's.
pub fn locale_dir(name: &str) -> Option<String> {
    if name.is_empty() || name == "C" || name == "POSIX" || name.len() > 255 || name.contains('/') {
        return None;
    }
    let (base, modifier) = match name.split_once('@') {
        Some((b, m)) => (b, Some(m)),
        None => (name, None),
    };
    let mut out = match base.split_once('.') {
        Some((language, codeset)) => {
            let mut norm: String = codeset
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase())
                .collect();
            if norm.chars().all(|c| c.is_ascii_digit()) {
                norm.insert_str(0, "iso");
            }
            format!("{language}.{norm}")
        }
        None => base.to_string(),
    };
    if let Some(m) = modifier {
        out.push('@');
        out.push_str(m);
    }
    Some(out)
}

/// The C library's files a program of `hints` reads as it starts (those the image has), the
/// ones read first first: the locale's character data (`C.UTF-8`'s for `python` when the
/// config sets no other locale: python takes it in the C locale), the conversion-module
/// caches, the time zone, then the locale's other files and the alias file. At most
/// [`MAX_RUNTIME_FILES`], symbolic links followed.
pub fn c_runtime_files(tree: &Tree, hints: &StartHints, python: bool) -> Vec<NodeId> {
    let locale = hints
        .locale
        .as_deref()
        .and_then(locale_dir)
        .or_else(|| python.then(|| "C.utf8".to_string()));
    let mut paths = Vec::new();
    if let Some(name) = &locale {
        paths.push(format!("usr/lib/locale/{name}/LC_CTYPE"));
    }
    // The conversion modules' cache, where the C library's build puts it.
    for lib in ["usr/lib", "usr/lib64", "lib", "lib64"] {
        paths.push(format!("{lib}/gconv/gconv-modules.cache"));
        if let Some(dir) = tree.lookup(lib) {
            let triplets = tree.node(dir).children.iter().filter(|(sub, &child)| {
                tree.node(child).file_type == FileType::Dir && sub.contains("-linux-")
            });
            for (sub, _) in triplets.take(MAX_RUNTIME_FILES) {
                paths.push(format!("{lib}/{sub}/gconv/gconv-modules.cache"));
            }
        }
    }
    paths.push("etc/localtime".into());
    if let Some(name) = &locale {
        if let Some(dir) = super::elf::follow(tree, &format!("usr/lib/locale/{name}")) {
            let files = tree.node(dir).children.iter().take(MAX_RUNTIME_FILES);
            for (file, &child) in files {
                match &tree.node(child).file_type {
                    FileType::File => paths.push(format!("usr/lib/locale/{name}/{file}")),
                    // LC_MESSAGES/SYS_LC_MESSAGES
                    FileType::Dir => paths.extend(
                        tree.node(child)
                            .children
                            .keys()
                            .take(MAX_RUNTIME_FILES)
                            .map(|f| format!("usr/lib/locale/{name}/{file}/{f}")),
                    ),
                    _ => {}
                }
            }
        }
        paths.push("usr/lib/locale/locale-archive".into());
        paths.push("usr/share/locale/locale.alias".into());
    }
    let mut seen = std::collections::HashSet::new();
    paths
        .iter()
        .filter_map(|p| super::elf::follow_file(tree, p))
        .filter(|&id| {
            let n = tree.node(id);
            n.size > 0 && n.size <= RUNTIME_FILE_MAX && seen.insert(id)
        })
        .take(MAX_RUNTIME_FILES)
        .collect()
}

/// The `.pth` files of python's site directories (those among `resolver`'s library
/// directories; sorted by name within each, as `site` reads them), at most [`MAX_PTH_FILES`].
pub fn pth_files(tree: &Tree, resolver: &super::imports::Resolver<'_>) -> Vec<NodeId> {
    resolver
        .site_dirs()
        .flat_map(|d| {
            tree.node(d)
                .children
                .iter()
                .filter(|(name, _)| name.ends_with(".pth"))
                .map(|(_, &id)| id)
                .collect::<Vec<_>>()
        })
        .filter(|&id| {
            let n = tree.node(id);
            n.file_type == FileType::File && n.size <= PTH_MAX
        })
        .take(MAX_PTH_FILES)
        .collect()
}

/// What follows `import` in a statement that is one (`importlib = …` is not).
fn import_names(statement: &str) -> Option<&str> {
    statement
        .strip_prefix("import")
        .filter(|rest| rest.starts_with([' ', '\t']))
}

/// The modules a `.pth` file's import lines name: `site` runs each line that starts with
/// `import` — its `import` statements, and literal `__import__('name')` calls in it.
pub fn pth_modules(text: &[u8]) -> Vec<String> {
    let valid = |m: &str| {
        !m.is_empty()
            && m.len() <= 255
            && m.split('.').all(|p| {
                p.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    let mut out = Vec::new();
    let mut push = |module: &str| {
        if out.len() < MAX_PTH_MODULES && valid(module) {
            out.push(module.to_string());
        }
    };
    let text = String::from_utf8_lossy(&text[..text.len().min(PTH_MAX as usize)]);
    for line in text.lines().filter(|l| import_names(l).is_some()) {
        for statement in line.split(';').map(str::trim) {
            for name in import_names(statement)
                .into_iter()
                .flat_map(|n| n.split(','))
            {
                push(name.split_whitespace().next().unwrap_or(""));
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("__import__(") {
            rest = &rest[at + "__import__(".len()..];
            let quoted = rest.trim_start();
            let Some(quote) = quoted.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                continue;
            };
            if let Some(end) = quoted[1..].find(quote) {
                push(&quoted[1..1 + end]);
            }
        }
    }
    out
}

impl super::ImageView {
    /// Fetches what the program `hints` name reads as it starts beyond its own files and
    /// libraries: the C library's files ([`c_runtime_files`]), and for `python` (the program
    /// is a python interpreter) [`fetch_python_start`](Self::fetch_python_start).
    pub(super) async fn fetch_runtime(&self, hints: &StartHints, python: bool, limit: u64) {
        let python_start = async {
            if python {
                self.fetch_python_start(limit).await;
            }
        };
        futures_util::join!(self.fetch_c_runtime(hints, python), python_start);
    }

    /// Fetches [`c_runtime_files`]: the small ones that touch in one request, larger ones (a
    /// locale's `LC_CTYPE`) each in one, all at once.
    async fn fetch_c_runtime(&self, hints: &StartHints, python: bool) {
        let files = c_runtime_files(&self.tree, hints, python);
        let large = files.iter().filter_map(|&f| {
            let n = self.tree.node(f);
            let (layer, offset) = n.data?;
            let reader = &self.readers[layer];
            (n.size > super::imports::BATCH_FILE_MAX && reader.index().random_access())
                .then(|| reader.fetch_for_open(offset, n.size))
        });
        let (_, fetched) = futures_util::join!(
            self.fetch_batch(&files),
            futures_util::future::join_all(large)
        );
        for e in fetched.into_iter().filter_map(Result::err) {
            tracing::debug!(error = %e, "fetch of a start-up file failed");
        }
    }

    /// Fetches the modules python imports before the program's first line, theirs followed
    /// as imports are (with `follow_imports`), looked up in the library directories only
    /// (`sys.path` gets its first entry, the script's or working directory, after them):
    /// `encodings` and its codec at once; beside them the site directories' `.pth` files,
    /// then the modules their import lines name, `sitecustomize` and `usercustomize`.
    pub(super) async fn fetch_python_start(&self, limit: u64) {
        if !self.imports.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Some(tag) = self.python_tag().map(str::to_string) else {
            return;
        };
        let resolver = super::imports::Resolver::library(&self.tree, tag.clone());
        let encodings = async {
            let mut names: Vec<String> = PYTHON_START.iter().map(|s| s.to_string()).collect();
            // Before 3.11 the modules `site` needs were not frozen into the interpreter.
            let minor = tag
                .strip_prefix("cpython-3")
                .and_then(|m| m.parse::<u32>().ok());
            if minor.is_some_and(|m| m < 11) {
                names.extend(UNFROZEN_BEFORE_311.iter().map(|s| s.to_string()));
            }
            self.walk_imports(&resolver.files(&names), limit).await;
        };
        let site = async {
            let pth = pth_files(&self.tree, &resolver);
            self.fetch_batch(&pth).await;
            let mut names = Vec::new();
            for file in pth {
                let n = self.tree.node(file);
                let Some((layer, offset)) = n.data else {
                    continue;
                };
                // Only what the batch brought: a file it left out is not read here.
                let reader = &self.readers[layer];
                if !reader.is_cached(offset, n.size) {
                    continue;
                }
                if let Ok(text) = reader.read(offset, n.size).await {
                    names.extend(pth_modules(&text));
                }
            }
            names.truncate(MAX_PTH_MODULES);
            names.extend(SITE_CUSTOMIZE.iter().map(|s| s.to_string()));
            self.walk_imports(&resolver.files(&names), limit).await;
        };
        futures_util::join!(encodings, site);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locale_names_are_normalized_as_the_c_library_does() {
        assert_eq!(locale_dir("C.UTF-8").as_deref(), Some("C.utf8"));
        assert_eq!(locale_dir("en_US.UTF-8").as_deref(), Some("en_US.utf8"));
        assert_eq!(
            locale_dir("de_DE.ISO-8859-15@euro").as_deref(),
            Some("de_DE.iso885915@euro")
        );
        assert_eq!(locale_dir("en_GB").as_deref(), Some("en_GB"));
        for none in ["", "C", "POSIX", "../../etc", "a/b"] {
            assert_eq!(locale_dir(none), None, "{none}");
        }
    }

    #[test]
    fn a_pth_file_names_the_modules_of_its_import_lines() {
        let pth = concat!(
            "import os; var = 'X'; enabled = os.environ.get(var, 'local') == 'local'; ",
            "enabled and __import__('_distutils_hack').add_shim(); \n",
            "/some/path\n",
            "import a.b as c, d\n",
            "# import commented\n",
            "  import indented\n",
            "x = __import__('ignored')\n",
            "importlib = True and __import__('importlib.util')\n",
        )
        .as_bytes();
        assert_eq!(pth_modules(pth), ["os", "_distutils_hack", "a.b", "d"]);
        let many = format!("import {}\n", vec!["a"; 1000].join(","));
        assert_eq!(pth_modules(many.as_bytes()).len(), MAX_PTH_MODULES);
        assert!(pth_modules(b"import ../x; __import__('a b')\n").is_empty());
    }
}
