//! Which files a Python module imports, read from its bytecode: an open of
//! `pkg/__pycache__/mod.cpython-311.pyc` predicts the opens of the modules its body imports,
//! long before python gets to them, so [`super::ImageView`] can fetch a whole level of the
//! import graph in one round trip instead of one round trip per module.
//!
//! A `.pyc` is untrusted input (any layer may hold any bytes under that name). The parser
//! ([`pyc_names`]) reads at most [`MAX_PYC`] bytes, nests at most [`MAX_DEPTH`] objects deep,
//! keeps at most [`MAX_NAMES`] strings of the module's own code and never allocates more than
//! the input could hold; anything it does not understand ends the parse with the names found
//! so far. A wrong guess wastes bandwidth, nothing more: every byte fetched is verified like
//! any read, and the guesses only pick which files are fetched ahead.

use crate::tree::{FileType, NodeId, Tree};

/// Bytecode files larger than this are not parsed (the largest of the benchmark image's 3,444
/// is 762 KB, a test module): at most [`IMPORT_FETCHES`] of them are in memory at once.
pub const MAX_PYC: u64 = 1 << 20;
/// Deepest nesting of marshal objects the parser follows.
pub const MAX_DEPTH: usize = 64;
/// Most names kept from one module.
pub const MAX_NAMES: usize = 4096;

/// The names a module's top-level code refers to that may name modules it imports: its
/// `co_names` (where `import a.b` and `from .c import d` keep `a.b` and `c`) and the strings of
/// its constant tuples of strings (where `from e import f, g` keeps `("f", "g")`). Code of the
/// module's functions and classes is skipped: imports there run later, if ever. Empty for
/// input that is not CPython 3.8–3.13 bytecode.
pub fn pyc_names(pyc: &[u8]) -> Vec<String> {
    if pyc.len() < 16 || pyc.len() as u64 > MAX_PYC || pyc[2..4] != *b"\r\n" {
        return Vec::new();
    }
    let layout = match u16::from_le_bytes([pyc[0], pyc[1]]) {
        3413..=3494 => Layout::Py38,
        3495..=3599 => Layout::Py311,
        _ => return Vec::new(),
    };
    let mut p = Parser {
        data: pyc,
        pos: 16,
        refs: Vec::new(),
        layout,
        top: None,
    };
    let _ = p.object(0);
    let Some((names, consts)) = p.top else {
        return Vec::new();
    };
    let mut out: Vec<String> = names;
    for c in consts {
        if let Obj::Tuple(items) = c {
            if !items.is_empty() && items.iter().all(|i| matches!(i, Obj::Str(_))) {
                out.extend(items.into_iter().filter_map(|i| match i {
                    Obj::Str(s) => Some(s),
                    _ => None,
                }));
            }
        }
    }
    out.truncate(MAX_NAMES);
    out
}

/// The order of a code object's fields.
#[derive(Clone, Copy)]
enum Layout {
    /// 3.8–3.10: six 32-bit fields, then code, consts, names, varnames, freevars, cellvars,
    /// filename, name, a 32-bit first line, lnotab.
    Py38,
    /// 3.11–3.13: five 32-bit fields, then code, consts, names, localsplusnames,
    /// localspluskinds, filename, name, qualname, a 32-bit first line, linetable,
    /// exceptiontable.
    Py311,
}

/// What the parser keeps of an object.
#[derive(Clone, Debug)]
enum Obj {
    Str(String),
    Tuple(Vec<Obj>),
    Other,
}

/// Input that ends the parse.
struct Stop;

struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    /// Objects stored for back references (marshal's `FLAG_REF`), `None` while being read.
    refs: Vec<Option<Obj>>,
    layout: Layout,
    /// The top-level code object's names and constants, once read.
    top: Option<(Vec<String>, Vec<Obj>)>,
}

impl Parser<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop)?;
        let b = self.data.get(self.pos..end).ok_or(Stop)?;
        self.pos = end;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.bytes(1)?[0])
    }

    fn i32(&mut self) -> Result<i32, Stop> {
        let b = self.bytes(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length that the rest of the input could hold (each item takes a byte at least).
    fn len(&mut self) -> Result<usize, Stop> {
        let n = usize::try_from(self.i32()?).map_err(|_| Stop)?;
        if n > self.data.len() - self.pos {
            return Err(Stop);
        }
        Ok(n)
    }

    fn string(&mut self, n: usize) -> Result<Obj, Stop> {
        let b = self.bytes(n)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => Obj::Str(s.to_string()),
            Err(_) => Obj::Other,
        })
    }

    fn items(&mut self, n: usize, depth: usize) -> Result<Vec<Obj>, Stop> {
        let mut items = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            items.push(self.object(depth + 1)?);
        }
        Ok(items)
    }

    fn object(&mut self, depth: usize) -> Result<Obj, Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop);
        }
        let code = self.u8()?;
        let (kind, flagged) = (code & 0x7f, code & 0x80 != 0);
        let slot = flagged.then(|| {
            self.refs.push(None);
            self.refs.len() - 1
        });
        let obj = match kind {
            b'0' | b'N' | b'F' | b'T' | b'S' | b'.' => Obj::Other,
            b'i' => self.bytes(4).map(|_| Obj::Other)?,
            b'I' | b'g' => self.bytes(8).map(|_| Obj::Other)?,
            b'y' => self.bytes(16).map(|_| Obj::Other)?,
            b'f' => {
                let n = self.u8()? as usize;
                self.bytes(n).map(|_| Obj::Other)?
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.u8()? as usize;
                    self.bytes(n)?;
                }
                Obj::Other
            }
            b'l' => {
                let n = self.i32()?.unsigned_abs() as usize;
                self.bytes(n.checked_mul(2).ok_or(Stop)?)
                    .map(|_| Obj::Other)?
            }
            b's' => {
                let n = self.len()?;
                self.bytes(n).map(|_| Obj::Other)?
            }
            b'u' | b't' | b'a' | b'A' => {
                let n = self.len()?;
                self.string(n)?
            }
            b'z' | b'Z' => {
                let n = self.u8()? as usize;
                self.string(n)?
            }
            b')' => {
                let n = self.u8()? as usize;
                Obj::Tuple(self.items(n, depth)?)
            }
            b'(' | b'[' | b'<' | b'>' => {
                let n = self.len()?;
                let items = self.items(n, depth)?;
                if kind == b'(' {
                    Obj::Tuple(items)
                } else {
                    Obj::Other
                }
            }
            b'{' => {
                loop {
                    if self.data.get(self.pos) == Some(&b'0') {
                        self.pos += 1;
                        break;
                    }
                    self.object(depth + 1)?;
                    self.object(depth + 1)?;
                }
                Obj::Other
            }
            b'r' => {
                let i = usize::try_from(self.i32()?).map_err(|_| Stop)?;
                self.refs.get(i).cloned().flatten().unwrap_or(Obj::Other)
            }
            b'c' => self.code(depth)?,
            _ => return Err(Stop),
        };
        if let Some(slot) = slot {
            self.refs[slot] = Some(obj.clone());
        }
        Ok(obj)
    }

    /// A code object: the first one read (the module's) keeps its names and constants.
    fn code(&mut self, depth: usize) -> Result<Obj, Stop> {
        let (ints, objects_before_line, objects_after_line) = match self.layout {
            Layout::Py38 => (6, 8, 1),
            Layout::Py311 => (5, 8, 2),
        };
        self.bytes(4 * ints)?;
        let is_top = self.top.is_none();
        if is_top {
            // Claimed now, so nested code objects (functions, classes) are not the module's.
            self.top = Some((Vec::new(), Vec::new()));
        }
        let mut consts = Vec::new();
        let mut names = Vec::new();
        for k in 0..objects_before_line {
            let obj = self.object(depth + 1)?;
            match (k, obj) {
                (1, Obj::Tuple(items)) => consts = items,
                (2, Obj::Tuple(items)) => {
                    names = items
                        .into_iter()
                        .filter_map(|i| match i {
                            Obj::Str(s) => Some(s),
                            _ => None,
                        })
                        .collect();
                    if is_top {
                        // The names are all the module's import statements need: keep them
                        // even if the rest of the file does not parse.
                        self.top = Some((names.clone(), consts.clone()));
                    }
                }
                _ => {}
            }
        }
        self.bytes(4)?;
        for _ in 0..objects_after_line {
            self.object(depth + 1)?;
        }
        if is_top {
            self.top = Some((names, consts));
        }
        Ok(Obj::Other)
    }
}

/// Where a module's imports are looked up: its package and the packages above it (relative
/// imports), the directory holding its top package, and the interpreter's library
/// directories (`/usr/lib/python3.11`, its `lib-dynload`, `site-packages`, `dist-packages`,
/// under `/usr` and `/usr/local`, and Debian's `/usr/lib/python3/dist-packages`).
pub struct Resolver<'a> {
    tree: &'a Tree,
    /// `cpython-311`: the bytecode files' tag.
    tag: String,
    roots: Vec<NodeId>,
    package: NodeId,
}

impl<'a> Resolver<'a> {
    /// For the bytecode file `pyc` (`…/pkg/__pycache__/mod.TAG.pyc`); `None` for any other
    /// file.
    pub fn new(tree: &'a Tree, pyc: NodeId) -> Option<Resolver<'a>> {
        let n = tree.node(pyc);
        let rest = n.name.split_once('.')?.1;
        let tag = rest.strip_suffix(".pyc")?.split('.').next()?.to_string();
        let cache = tree.node(n.parent);
        if cache.name != "__pycache__" {
            return None;
        }
        let package = cache.parent;
        let mut roots = vec![package];
        // The packages above (relative imports), then the directory of the top package.
        let mut dir = package;
        for _ in 0..8 {
            if !is_package(tree, dir, &tag) {
                break;
            }
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
        Some(Resolver {
            tree,
            tag,
            roots,
            package,
        })
    }

    /// The files python would open for the modules `names` may refer to, in the order of
    /// `names` (see [`pyc_names`]): for each dotted name, each package on the way and the
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
        for &p in &packages {
            for name in names {
                if !name.contains('.') && !name.is_empty() {
                    if let Some((files, _)) = self.module(p, name) {
                        out.extend(files);
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|f| seen.insert(*f));
        out
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

/// Files whose imports one mount follows at most.
pub const MAX_FOLLOWED: usize = 4096;
/// Fetches of imported modules under way at once, per mount.
pub const IMPORT_FETCHES: usize = 8;
/// The small files a module imports (each at most this size) are fetched together as soon as
/// its bytecode is parsed, files that touch in the layer in one request: a package's modules
/// lie side by side, and where each file is its own chunk (eStargz, zstd:chunked) one request
/// per file made the walk wait for round trips, not for the link.
const BATCH_FILE_MAX: u64 = 256 << 10;
/// Requests of one module's batch in flight at once.
const BATCH_PARALLEL: usize = 4;

impl super::ImageView {
    /// Whether an open of `node` has the modules it imports fetched (it is a module's
    /// bytecode, and the mount follows imports).
    pub(super) fn follows_imports_of(&self, node: NodeId) -> bool {
        self.imports.load(std::sync::atomic::Ordering::Relaxed)
            && Resolver::new(&self.tree, node).is_some()
    }

    /// Follows the imports of `root`, a module's bytecode just opened: fetches the files of
    /// the modules it imports (bytecode whole, an extension module's first `limit` bytes, as
    /// an open would), then those their bytecode imports, and so on — each file once per
    /// mount — in the order python would get to them (depth first, the order of each
    /// module's names), [`IMPORT_FETCHES`] at a time across the mount.
    pub(super) async fn fetch_imports(&self, root: NodeId, limit: u64) {
        self.walk_imports(&[root], limit).await
    }

    /// [`fetch_imports`](Self::fetch_imports) of each of `roots` in one walk: a file under an
    /// earlier root goes before any under a later one, so a later root's files are fetched
    /// while the earlier walks wait for their files to be parsed, not instead of them.
    pub(super) async fn walk_imports(&self, roots: &[NodeId], limit: u64) {
        use futures_util::stream::FuturesUnordered;
        use futures_util::StreamExt;
        use std::cmp::Reverse;
        if !self.imports.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut queue = std::collections::BinaryHeap::new();
        for (k, &root) in roots.iter().enumerate() {
            if Resolver::new(&self.tree, root).is_some() && self.claim_import(root) {
                queue.push(Reverse((vec![k as u32], root)));
            }
        }
        let Some(Reverse((_, root))) = queue.peek().cloned() else {
            return;
        };
        let mut running = FuturesUnordered::new();
        let mut files = 0usize;
        loop {
            while running.len() < IMPORT_FETCHES {
                let Some(Reverse((order, node))) = queue.pop() else {
                    break;
                };
                files += 1;
                running.push(async move { (order, self.fetch_module(node, limit).await) });
            }
            let Some((order, found)) = running.next().await else {
                break;
            };
            for (k, file) in found.into_iter().enumerate() {
                if self.claim_import(file) {
                    let mut at = order.clone();
                    at.push(k as u32);
                    queue.push(Reverse((at, file)));
                }
            }
        }
        tracing::debug!(path = %self.tree.path(root), files, "imports fetched");
    }

    /// Claims `file` for [`fetch_imports`](Self::fetch_imports): false if it was claimed
    /// before or the mount has followed [`MAX_FOLLOWED`] files.
    fn claim_import(&self, file: NodeId) -> bool {
        let mut followed = self.imports_followed.lock().unwrap();
        followed.len() < MAX_FOLLOWED && followed.insert(file)
    }

    /// Fetches module file `node` ahead of python's open of it; for bytecode, the files of
    /// the modules it imports (none if a fetch fails: the reads will tell).
    async fn fetch_module(&self, node: NodeId, limit: u64) -> Vec<NodeId> {
        let n = self.tree.node(node);
        let Some((layer, offset)) = n.data.filter(|_| n.file_type == FileType::File) else {
            return Vec::new();
        };
        let reader = &self.readers[layer];
        let resolver = Resolver::new(&self.tree, node).filter(|_| n.size <= MAX_PYC);
        let len = if resolver.is_some() {
            n.size
        } else {
            n.size.min(limit)
        };
        if len == 0 {
            return Vec::new();
        }
        // One of IMPORT_FETCHES across the mount, from the fetch to the parse: what the walk
        // holds in memory is bounded too.
        let _turn = self.import_fetches.acquire().await;
        if !reader.is_cached(offset, len) {
            if !reader.index().random_access() {
                return Vec::new();
            }
            if let Err(e) = reader.prefetch_walk(offset, len).await {
                tracing::debug!(path = %self.tree.path(node), error = %e, "fetch of an imported module failed");
                return Vec::new();
            }
        }
        let Some(resolver) = resolver else {
            return Vec::new();
        };
        // From the cache, just filled (a span evicted meanwhile is fetched again).
        let Ok(bytes) = reader.read(offset, len).await else {
            return Vec::new();
        };
        let names = tokio::task::spawn_blocking(move || pyc_names(&bytes))
            .await
            .unwrap_or_default();
        let found = resolver.files(&names);
        self.fetch_batch(&found).await;
        found
    }

    /// Fetches the small files among `files` that the walk has not claimed yet and that are
    /// not cached, those of a layer that touch in one request ([`BATCH_FILE_MAX`]).
    async fn fetch_batch(&self, files: &[NodeId]) {
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

#[cfg(test)]
mod tests {
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
    const PYC: &[u8] = include_bytes!("testdata/example.cpython-311.pyc");

    #[test]
    fn names_of_the_module_body_not_of_its_functions() {
        let names = pyc_names(PYC);
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
    fn damaged_or_foreign_input_gives_what_it_can_and_never_panics() {
        assert!(pyc_names(b"").is_empty());
        assert!(pyc_names(&[0u8; 64]).is_empty(), "not a known magic");
        // Every truncation and every single flipped byte: no panic, no huge allocation.
        for n in 0..PYC.len() {
            let _ = pyc_names(&PYC[..n]);
        }
        for i in 16..PYC.len() {
            let mut bad = PYC.to_vec();
            bad[i] ^= 0xff;
            let _ = pyc_names(&bad);
        }
        // A tuple claiming two billion items.
        let mut huge = PYC[..16].to_vec();
        huge.extend_from_slice(&[b'(', 0xff, 0xff, 0xff, 0x7f]);
        assert!(pyc_names(&huge).is_empty());
        // Nesting deeper than MAX_DEPTH.
        let mut deep = PYC[..16].to_vec();
        deep.extend(std::iter::repeat_n(b')', 1000).flat_map(|t| [t, 1]));
        assert!(pyc_names(&deep).is_empty());
    }
}
