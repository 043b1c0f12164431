//! Which files a Python module imports, found in the image: an open of
//! `pkg/__pycache__/mod.cpython-311.pyc` predicts the opens of the modules its body imports
//! (its bytecode's import statements, [`super::pyc`]), long before python gets to them, so
//! [`super::ImageView`] can fetch a whole level of the import graph in one round trip
//! instead of one round trip per module. Python source (`mod.py` without bytecode, a
//! script) is read the same way ([`super::pysource`]), in an image with a python
//! ([`interpreter_tag`]); any program's open of a `.py` file starts the walk (a wrong guess
//! costs bandwidth only, at most [`MAX_FOLLOWED`] files a mount). An extension module the
//! walk fetches has its libraries followed too ([`super::elf`]), unless only a guess (a name
//! a body reads, one it may import by name) led to it.

use super::pyc::{pyc_imports, Import, MAX_PYC};
use super::pysource::source_imports;
use crate::tree::{FileType, NodeId, Tree};
use tracing::Instrument;

/// Where a module's imports are looked up: its package and the packages above it (relative
/// imports), the directory holding its top package, and the interpreter's library
/// directories (`/usr/lib/python3.11`, its `lib-dynload`, `site-packages`, `dist-packages`,
/// under `/usr` and `/usr/local`, and Debian's `/usr/lib/python3/dist-packages`).
pub struct Resolver<'a> {
    tree: &'a Tree,
    /// `cpython-311`: the bytecode files' tag.
    tag: String,
    /// The module's package and those above it (`packages` of them: its relative imports'
    /// starting points), then the directory holding the top one and the library directories
    /// (where absolute imports are looked up).
    roots: Vec<NodeId>,
    packages: usize,
    package: NodeId,
}

impl<'a> Resolver<'a> {
    /// For Python source in directory `dir` — a module's `.py` there, or a script python
    /// runs (then `dir` is the first directory of `sys.path`, as for `-c` code the working
    /// directory is) — of the interpreter whose bytecode files are tagged `tag`.
    pub fn at(tree: &'a Tree, dir: NodeId, tag: String) -> Resolver<'a> {
        let package = dir;
        let mut roots = vec![package];
        // The packages above (relative imports), then the directory of the top package.
        let mut dir = package;
        let mut packages = 0;
        for _ in 0..8 {
            if !is_package(tree, dir, &tag) {
                break;
            }
            packages += 1;
            let up = tree.node(dir).parent;
            if up == dir {
                break;
            }
            dir = up;
            roots.push(dir);
        }
        let version = tag
            .strip_prefix("cpython-3")
            .map(|minor| format!("python3.{minor}"));
        for prefix in ["usr/local/lib", "usr/lib"] {
            if let Some(v) = &version {
                for sub in ["", "/lib-dynload", "/site-packages", "/dist-packages"] {
                    if let Some(d) = tree.lookup(&format!("{prefix}/{v}{sub}")) {
                        roots.push(d);
                    }
                }
            }
        }
        if let Some(d) = tree.lookup("usr/lib/python3/dist-packages") {
            roots.push(d);
        }
        let mut seen = std::collections::HashSet::new();
        roots.retain(|r| seen.insert(*r));
        Resolver {
            tree,
            tag,
            roots,
            packages: packages.min(8),
            package,
        }
    }

    /// For the modules python imports as it starts, before `sys.path` has its first entry
    /// (the script's directory or the working directory): the library directories only.
    pub fn library(tree: &'a Tree, tag: String) -> Resolver<'a> {
        let mut r = Resolver::at(tree, crate::tree::ROOT, tag);
        if r.roots.first() == Some(&crate::tree::ROOT) {
            r.roots.remove(0);
        }
        r.packages = 0;
        r
    }

    /// The directories looked in that are site directories (`site-packages`,
    /// `dist-packages`; no package's name has a `-`), in lookup order.
    pub fn site_dirs(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.roots.iter().copied().filter(|&d| {
            let name = self.tree.node(d).name.as_str();
            name == "site-packages" || name == "dist-packages"
        })
    }

    /// For a script or `-c` code (python's `__main__`): no relative imports, and absolute ones
    /// looked up from its directory first, as `sys.path` starts there, even if that
    /// directory is a package.
    pub fn for_main(mut self) -> Resolver<'a> {
        self.packages = 0;
        self
    }

    /// The bytecode files' tag (`cpython-311`).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The files python opens for import statements `imports` ([`pyc_imports`]), in their
    /// order: for each, the packages on the way to its module and the module (absolute
    /// imports from the first root that has the module's first part, relative ones from
    /// the package `level` steps up), then each name imported from a package that is a
    /// module of it. Also the packages the statements import, the module's own first.
    pub fn imports(&self, imports: &[Import]) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut out = Vec::new();
        let mut packages = vec![self.package];
        for import in imports {
            let parts: Vec<&str> = match import.module.as_str() {
                "" => Vec::new(),
                module => module.split('.').collect(),
            };
            if parts.iter().any(|p| p.is_empty()) {
                continue;
            }
            let found = if import.level == 0 {
                if parts.is_empty() {
                    continue;
                }
                self.roots[self.packages.min(self.roots.len() - 1)..]
                    .iter()
                    .find_map(|&root| self.path(root, &parts, &mut out))
            } else {
                // Beyond the top package, python raises ImportError.
                let up = import.level as usize - 1;
                (up < self.packages)
                    .then(|| self.path(self.roots[up], &parts, &mut out))
                    .flatten()
            };
            if let Some(Some(package)) = found {
                for name in &import.names {
                    if let Some((files, _)) = self.module(package, name) {
                        out.extend(files);
                    }
                }
                if !packages.contains(&package) {
                    packages.push(package);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|f| seen.insert(*f));
        (out, packages)
    }

    /// The files of the modules of `packages` that `names` name (the undotted ones), in
    /// the order of the packages: a module body's `pkg.sub` imports submodule `sub` when
    /// `pkg` imports it lazily (on first use, as numpy does its `random`).
    pub fn submodules(&self, packages: &[NodeId], names: &[String]) -> Vec<NodeId> {
        let mut out = Vec::new();
        for &p in packages {
            for name in names {
                if !name.contains('.') && !name.is_empty() {
                    if let Some((files, _)) = self.module(p, name) {
                        out.extend(files);
                    }
                }
            }
        }
        out
    }

    /// Module `parts` (dotted, perhaps none) under `dir`: `None` when `dir` has no first
    /// part; else the files of each part found pushed to `out`, and the package the last
    /// part is, if every part is found and the last is a package (`dir` for no parts).
    fn path(&self, dir: NodeId, parts: &[&str], out: &mut Vec<NodeId>) -> Option<Option<NodeId>> {
        let mut dir = dir;
        for (k, part) in parts.iter().enumerate() {
            let Some((files, package)) = self.module(dir, part) else {
                return (k > 0).then_some(None);
            };
            out.extend(files);
            match package {
                Some(p) => dir = p,
                None => return Some(None),
            }
        }
        Some(Some(dir))
    }

    /// The files python would open for the modules `names` may refer to, in the order of
    /// `names` (see [`Imports::names`](super::pyc::Imports::names)): for each dotted name, each package on the way and the
    /// module, from the first root that has its first part; then each name as a module of
    /// the module's own package and of each package found (`from . import x`,
    /// `from a.b import c`).
    pub fn files(&self, names: &[String]) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut packages = vec![self.package];
        for name in names {
            let parts: Vec<&str> = name.split('.').collect();
            if parts.iter().any(|p| p.is_empty()) {
                continue;
            }
            for &root in &self.roots {
                let mut dir = root;
                let mut found = false;
                for (k, part) in parts.iter().enumerate() {
                    let Some((files, package)) = self.module(dir, part) else {
                        break;
                    };
                    found = true;
                    out.extend(files);
                    match package {
                        Some(p) if k + 1 < parts.len() => dir = p,
                        Some(p) => {
                            if !packages.contains(&p) {
                                packages.push(p);
                            }
                            break;
                        }
                        None => break,
                    }
                }
                if found {
                    break;
                }
            }
        }
        out.extend(self.submodules(&packages, names));
        let mut seen = std::collections::HashSet::new();
        out.retain(|f| seen.insert(*f));
        out
    }

    /// The files python opens for `__import__(name)` of each of `names`: absolute imports,
    /// as statements of level 0 — no name tried as a module of another package (`pandas`
    /// calls `__import__` on its hard dependencies, and its body's strings then named
    /// `numpy.testing`, and through it `unittest`, which nothing imports).
    pub fn imported_by_name(&self, names: &[String]) -> Vec<NodeId> {
        let statements: Vec<Import> = names
            .iter()
            .map(|name| Import {
                level: 0,
                module: name.clone(),
                names: Vec::new(),
            })
            .collect();
        self.imports(&statements).0
    }

    /// Module `name` in directory `dir`: the files python opens for it (its bytecode, else its
    /// source; an extension module) and, for a package, its directory.
    fn module(&self, dir: NodeId, name: &str) -> Option<(Vec<NodeId>, Option<NodeId>)> {
        let tree = self.tree;
        let d = tree.node(dir);
        // Most names a module's body uses are no module at all (attributes, globals): those
        // are turned away by two ordered lookups, before any file name is put together.
        if !names_module(d, name)
            && !tree
                .child(dir, "__pycache__")
                .is_some_and(|c| names_module(tree.node(c), name))
        {
            return None;
        }
        if let Some(&sub) = d.children.get(name) {
            if tree.node(sub).file_type == FileType::Dir && is_package(tree, sub, &self.tag) {
                return Some((self.source(sub, "__init__"), Some(sub)));
            }
        }
        let mut files = self.source(dir, name);
        let prefix = format!("{name}.");
        files.extend(
            d.children
                .range(prefix.clone()..)
                .take_while(|(n, _)| n.starts_with(&prefix))
                .filter(|(n, &c)| n.ends_with(".so") && tree.node(c).file_type == FileType::File)
                .map(|(_, &c)| c),
        );
        (!files.is_empty()).then_some((files, None))
    }

    /// `dir/__pycache__/NAME.TAG.pyc` if there is one, else `dir/NAME.py`.
    fn source(&self, dir: NodeId, name: &str) -> Vec<NodeId> {
        let tree = self.tree;
        let pyc = tree
            .child(dir, "__pycache__")
            .and_then(|c| tree.child(c, &format!("{name}.{}.pyc", self.tag)));
        let file = pyc.or_else(|| tree.child(dir, &format!("{name}.py")));
        file.filter(|&f| tree.node(f).file_type == FileType::File)
            .into_iter()
            .collect()
    }
}

/// Whether directory `d` has an entry `name` or `name.…` (a module's file or package).
fn names_module(d: &crate::tree::Node, name: &str) -> bool {
    d.children
        .range::<str, _>((std::ops::Bound::Included(name), std::ops::Bound::Unbounded))
        .map(|(n, _)| n)
        .take_while(|n| n.starts_with(name))
        .any(|n| n.len() == name.len() || n.as_bytes()[name.len()] == b'.')
}

/// Whether directory `dir` is a regular package (has `__init__.py` or its bytecode).
fn is_package(tree: &Tree, dir: NodeId, tag: &str) -> bool {
    tree.child(dir, "__init__.py").is_some()
        || tree
            .child(dir, "__pycache__")
            .and_then(|c| tree.child(c, &format!("__init__.{tag}.pyc")))
            .is_some()
}

/// For the bytecode file `pyc` (`…/pkg/__pycache__/mod.TAG.pyc`): its package's directory
/// and the tag; `None` for any other file.
fn bytecode(tree: &Tree, pyc: NodeId) -> Option<(NodeId, String)> {
    let n = tree.node(pyc);
    let rest = n.name.split_once('.')?.1;
    let tag = rest.strip_suffix(".pyc")?.split('.').next()?.to_string();
    let cache = tree.node(n.parent);
    (cache.name == "__pycache__").then_some((cache.parent, tag))
}

/// The bytecode tag of the image's python 3 (`cpython-311`): that of the interpreter
/// `usr/bin/python3` leads to (`python3.11`), else that of the newest `python3.N` library
/// directory holding an `os.py`; `None` in an image without one.
pub fn interpreter_tag(tree: &Tree) -> Option<String> {
    let minor = |name: &str| {
        let m = name.strip_prefix("python3.")?;
        (!m.is_empty() && m.len() <= 3 && m.chars().all(|c| c.is_ascii_digit()))
            .then(|| m.parse::<u32>().ok())
            .flatten()
    };
    let found = super::elf::follow_file(tree, "usr/bin/python3")
        .and_then(|p| minor(&tree.node(p).name))
        .or_else(|| {
            ["usr/local/lib", "usr/lib"]
                .iter()
                .filter_map(|d| tree.lookup(d))
                .flat_map(|d| tree.node(d).children.iter())
                .filter(|(_, &c)| tree.child(c, "os.py").is_some())
                .filter_map(|(name, _)| minor(name))
                .max()
        })?;
    Some(format!("cpython-3{found}"))
}

/// Files whose imports one mount follows at most.
pub const MAX_FOLLOWED: usize = 4096;
/// Fetches of imported modules under way at once, per mount.
pub const IMPORT_FETCHES: usize = 8;
/// The small files a module imports (each at most this size) are fetched together as soon as
/// its bytecode is parsed, files that touch in the layer in one request: a package's modules
/// lie side by side, and where each file is its own chunk (eStargz, zstd:chunked) one request
/// per file made the walk wait for round trips, not for the link.
pub(super) const BATCH_FILE_MAX: u64 = 256 << 10;
/// Requests of one module's batch in flight at once.
const BATCH_PARALLEL: usize = 4;

impl super::ImageView {
    /// Whether an open of `node` has the modules it imports fetched (it is a module's
    /// bytecode or Python source, and the mount follows imports).
    pub(super) fn follows_imports_of(&self, node: NodeId) -> bool {
        self.imports.load(std::sync::atomic::Ordering::Relaxed) && self.module(node).is_some()
    }

    /// Whether module file `node` is bytecode or source, its directory and its python's
    /// bytecode tag: a module's bytecode, or a `.py` file (a module without bytecode, or a
    /// script python runs) in an image with a python ([`interpreter_tag`]). `None` for any
    /// other file. Cheap: on every open.
    fn module(&self, node: NodeId) -> Option<(NodeId, String, bool)> {
        if let Some((dir, tag)) = bytecode(&self.tree, node) {
            return Some((dir, tag, false));
        }
        let n = self.tree.node(node);
        if n.file_type != FileType::File || !n.name.ends_with(".py") {
            return None;
        }
        Some((n.parent, self.python_tag()?.to_string(), true))
    }

    /// Where the imports of module file `node` are looked up, and whether it is source
    /// ([`module`](Self::module)).
    pub(super) fn module_resolver(&self, node: NodeId) -> Option<(Resolver<'_>, bool)> {
        let (dir, tag, source) = self.module(node)?;
        Some((Resolver::at(&self.tree, dir, tag), source))
    }

    /// The image's python's bytecode tag ([`interpreter_tag`]), found once per view.
    pub(super) fn python_tag(&self) -> Option<&str> {
        self.python_tag
            .get_or_init(|| interpreter_tag(&self.tree))
            .as_deref()
    }

    /// Follows the imports of `root`, a module's bytecode or source just opened: fetches the
    /// files of the modules it imports (bytecode and source whole, an extension module's
    /// first `limit` bytes, as an open would), then those they import, and so on — each file once per
    /// mount — in the order python would get to them (depth first, the order of each
    /// module's names), [`IMPORT_FETCHES`] at a time across the mount.
    pub(super) async fn fetch_imports(&self, root: NodeId, limit: u64) {
        if self.follows_imports_of(root) {
            self.walk_imports(&[root], limit).await
        }
    }

    /// [`fetch_imports`](Self::fetch_imports) of each of `roots` (any regular files: an
    /// extension module is fetched, not parsed) in one walk: a file under an earlier root goes
    /// before any under a later one, so a later root's files are fetched while the earlier
    /// walks wait for their files to be parsed, not instead of them.
    pub(super) async fn walk_imports(&self, roots: &[NodeId], limit: u64) {
        use futures_util::stream::FuturesUnordered;
        use futures_util::StreamExt;
        use std::cmp::Reverse;
        if !self.imports.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut queue = std::collections::BinaryHeap::new();
        // Each file with its place in the walk and whether a guess led to it (a name its
        // importer reads, or one it may import by name: `Imports::names`, `Imports::dynamic`)
        // rather than import statements alone.
        for (k, &root) in roots.iter().enumerate() {
            if self.tree.node(root).file_type == FileType::File && self.claim_import(root) {
                queue.push(Reverse((vec![k as u32], root, false)));
            }
        }
        let Some(Reverse((_, root, _))) = queue.peek().cloned() else {
            return;
        };
        let mut running = FuturesUnordered::new();
        // The libraries of the extension modules fetched, followed as an open of each would
        // (`elf.rs`), beside the walk rather than in its turns.
        let mut libraries = FuturesUnordered::new();
        let mut files = 0usize;
        loop {
            while running.len() < IMPORT_FETCHES {
                let Some(Reverse((order, node, guessed))) = queue.pop() else {
                    break;
                };
                files += 1;
                running.push(async move {
                    let (found, stated) = self.fetch_module(node, limit).await;
                    (order, node, guessed, found, stated)
                });
            }
            tokio::select! {
                Some((order, node, guessed, found, stated)) = running.next(), if !running.is_empty() => {
                    // An extension module: its libraries too, unless only a guess led here (on
                    // the cold-start benchmark, `_dbm`'s libdb, 0.9 MB that nothing loads).
                    let n = self.tree.node(node);
                    if !guessed && limit > 0 && super::is_shared_object(&n.name) {
                        libraries.push(
                            self.follow_needed(node, limit, true)
                                .instrument(tracing::debug_span!("needed")),
                        );
                    }
                    for (k, file) in found.into_iter().enumerate() {
                        if self.claim_import(file) {
                            let mut at = order.clone();
                            at.push(k as u32);
                            queue.push(Reverse((at, file, guessed || k >= stated)));
                        }
                    }
                }
                Some(_) = libraries.next(), if !libraries.is_empty() => {}
                else => break,
            }
        }
        tracing::debug!(path = %self.tree.path(root), files, "imports fetched");
    }

    /// Claims `file` for [`fetch_imports`](Self::fetch_imports): false if it was claimed
    /// before or the mount has followed [`MAX_FOLLOWED`] files.
    pub(super) fn claim_import(&self, file: NodeId) -> bool {
        let mut followed = self.imports_followed.lock().unwrap();
        followed.len() < MAX_FOLLOWED && followed.insert(file)
    }

    /// Fetches module file `node` ahead of python's open of it; for bytecode or source, the
    /// files of the modules it imports (none if a fetch fails: the reads will tell), and how
    /// many of the first of them its import statements name (the rest are guesses).
    async fn fetch_module(&self, node: NodeId, limit: u64) -> (Vec<NodeId>, usize) {
        let n = self.tree.node(node);
        let Some((layer, offset)) = n.data.filter(|_| n.file_type == FileType::File) else {
            return (Vec::new(), 0);
        };
        let reader = &self.readers[layer];
        let resolver = self.module_resolver(node).filter(|_| n.size <= MAX_PYC);
        let len = if resolver.is_some() {
            n.size
        } else {
            n.size.min(limit)
        };
        if len == 0 {
            return (Vec::new(), 0);
        }
        // One of IMPORT_FETCHES across the mount, from the fetch to the parse: what the walk
        // holds in memory is bounded too.
        let _turn = self.import_fetches.acquire().await;
        if !reader.is_cached(offset, len) {
            if !reader.index().random_access() {
                return (Vec::new(), 0);
            }
            if let Err(e) = reader.prefetch_walk(offset, len).await {
                tracing::debug!(path = %self.tree.path(node), error = %e, "fetch of an imported module failed");
                return (Vec::new(), 0);
            }
        }
        let Some((resolver, source)) = resolver else {
            return (Vec::new(), 0);
        };
        // From the cache, just filled (a span evicted meanwhile is fetched again).
        let Ok(bytes) = reader.read(offset, len).await else {
            return (Vec::new(), 0);
        };
        if source {
            let found = self.source_modules(&resolver, bytes).await;
            let stated = found.len();
            return (found, stated);
        }
        let imports = tokio::task::spawn_blocking(move || pyc_imports(&bytes))
            .await
            .unwrap_or_default();
        // What its statements import, then what the names it reads of the packages it
        // imports may import lazily: fetched, then followed in turn.
        let (found, lazy, stated) = match &imports.statements {
            Some(statements) => {
                let (found, packages) = resolver.imports(statements);
                let lazy: Vec<NodeId> = resolver
                    .submodules(&packages, &imports.names)
                    .into_iter()
                    .filter(|f| !found.contains(f))
                    .collect();
                let stated = found.len();
                (found, lazy, stated)
            }
            None => (resolver.files(&imports.names), Vec::new(), 0),
        };
        // What it imports by name at run time (`__import__(name)`), after the rest.
        let dynamic: Vec<NodeId> = resolver
            .imported_by_name(&imports.dynamic)
            .into_iter()
            .filter(|f| !found.contains(f) && !lazy.contains(f))
            .collect();
        let found = [found, lazy, dynamic].concat();
        self.fetch_batch(&found).await;
        (found, stated)
    }

    /// The files of the modules that Python source `bytes` imports, looked up by `resolver`,
    /// with the small ones fetched together ([`fetch_batch`](Self::fetch_batch)).
    pub(super) async fn source_modules(
        &self,
        resolver: &Resolver<'_>,
        bytes: Vec<u8>,
    ) -> Vec<NodeId> {
        let statements = tokio::task::spawn_blocking(move || source_imports(&bytes))
            .await
            .unwrap_or_default();
        let (found, _) = resolver.imports(&statements);
        self.fetch_batch(&found).await;
        found
    }

    /// Fetches the small files among `files` that the walk has not claimed yet and that are
    /// not cached, those of a layer that touch in one request ([`BATCH_FILE_MAX`]).
    pub(super) async fn fetch_batch(&self, files: &[NodeId]) {
        use futures_util::StreamExt;
        let mut runs: std::collections::BTreeMap<usize, Vec<(u64, u64)>> = Default::default();
        {
            let followed = self.imports_followed.lock().unwrap();
            for &f in files.iter().filter(|f| !followed.contains(f)) {
                let n = self.tree.node(f);
                let Some((layer, offset)) = n.data.filter(|_| n.file_type == FileType::File) else {
                    continue;
                };
                let reader = &self.readers[layer];
                if n.size > 0
                    && n.size <= BATCH_FILE_MAX
                    && reader.index().random_access()
                    && !reader.is_cached(offset, n.size)
                {
                    runs.entry(layer)
                        .or_default()
                        .push((offset, offset + n.size));
                }
            }
        }
        let requests = runs.into_iter().flat_map(|(layer, runs)| {
            super::touching(runs)
                .into_iter()
                .map(move |(s, e)| (layer, s, e))
        });
        let mut fetches = futures_util::stream::iter(requests)
            .map(|(layer, s, e)| self.readers[layer].prefetch_walk(s, e - s))
            .buffer_unordered(BATCH_PARALLEL);
        while let Some(fetched) = fetches.next().await {
            if let Err(e) = fetched {
                tracing::debug!(error = %e, "fetch of imported modules failed");
            }
        }
    }
}
