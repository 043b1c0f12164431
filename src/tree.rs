//! The merged view of a chain of layers, with OCI overlay semantics.
//!
//! Sixth stage of the pipeline: a pure data structure (no FUSE, no I/O). Layers are applied
//! base first. In each layer, whiteouts and opaque markers act first, on what the lower layers
//! built: a whiteout removes a path, an opaque marker empties a directory. Then the layer's
//! entries are added: a directory over a directory updates its metadata and keeps its
//! children; anything else replaces what was there (a file may replace a directory and back).
//! Hard links share their target's inode. Inode numbers are stable for a given chain.

use std::collections::{BTreeMap, HashMap};

use crate::layer::{Entry, Kind};

/// Index of a node in the tree.
pub type NodeId = usize;
/// The root directory.
pub const ROOT: NodeId = 0;

/// A file type as presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileType {
    File,
    Dir,
    Symlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// A name in the merged tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub parent: NodeId,
    pub file_type: FileType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// (layer index, offset of the data in that layer's tar stream), for regular files.
    pub data: Option<(usize, u64)>,
    pub ino: u64,
    pub nlink: u32,
    pub children: BTreeMap<String, NodeId>,
    removed: bool,
}

/// A layer whose entries cannot be merged.
#[derive(Debug, thiserror::Error)]
#[error("layer {layer}: {detail}")]
pub struct TreeError {
    pub layer: usize,
    pub detail: String,
}

/// The merged tree of a chain of layers.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Live node per inode number (`usize::MAX`: none); index 0 is unused.
    inos: Vec<NodeId>,
}

impl Tree {
    /// Merges `layers` (each a list of entries in tar order), base first.
    pub fn build<'a>(layers: impl IntoIterator<Item = &'a [Entry]>) -> Result<Tree, TreeError> {
        let mut tree = Tree {
            nodes: vec![dir_node("", ROOT, 0o755)],
            inos: Vec::new(),
        };
        for (layer, entries) in layers.into_iter().enumerate() {
            for e in entries {
                match e.kind {
                    Kind::Whiteout => {
                        if let Some(id) = tree.lookup(&e.path) {
                            tree.remove(id);
                        }
                    }
                    Kind::Opaque => {
                        if let Some(id) = tree.lookup(&e.path) {
                            let children: Vec<NodeId> =
                                tree.nodes[id].children.values().copied().collect();
                            for c in children {
                                tree.remove(c);
                            }
                        }
                    }
                    _ => {}
                }
            }
            // A layer lists a directory's entries together: the directory of the entry before
            // is looked up once, not again from the root for each of them.
            let mut last_dir: Option<(&str, NodeId)> = None;
            for e in entries {
                if !matches!(e.kind, Kind::Whiteout | Kind::Opaque) {
                    tree.add(e, layer, &mut last_dir)?;
                }
            }
        }
        tree.count_links();
        Ok(tree)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// A live node with inode number `ino` (for hard links, any of its names).
    pub fn by_ino(&self, ino: u64) -> Option<NodeId> {
        self.inos
            .get(ino as usize)
            .copied()
            .filter(|&id| id != usize::MAX)
    }

    /// A digest of everything the kernel learns about the tree: every live name with its inode
    /// number, type, size, ownership, mode, times, link count and extended attributes. Two
    /// trees with the same fingerprint answer every lookup and getattr alike, so a process may
    /// take over a mount served from the other (inode numbers are what the kernel holds).
    /// (A mount's takeover compares fingerprints written by other versions: the bytes hashed
    /// never change.)
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest as _, Sha256};
        use std::fmt::Write as _;
        let mut h = Sha256::new();
        // One line per node, written into one buffer rather than a string allocated each.
        let mut line = String::with_capacity(256);
        for id in self.walk() {
            let n = &self.nodes[id];
            line.clear();
            let _ = write!(
                line,
                "{}\0{}\0{}\0{:?}\0{} {} {} {} {} {} {}\0",
                n.name,
                n.ino,
                self.nodes[n.parent].ino,
                n.file_type,
                n.size,
                n.mode,
                n.uid,
                n.gid,
                n.mtime,
                n.mtime_nsec,
                n.nlink
            );
            h.update(line.as_bytes());
            for (k, v) in &n.xattrs {
                line.clear();
                let _ = write!(line, "{k}\0{}\0", v.len());
                h.update(line.as_bytes());
                h.update(v);
            }
        }
        hex::encode(h.finalize())
    }

    /// Inodes in the tree (hard links count once).
    pub fn inodes(&self) -> usize {
        self.inos.iter().filter(|&&id| id != usize::MAX).count()
    }

    /// The node at `path` (`""` or `/` is the root).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let mut id = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            id = *self.nodes[id].children.get(part)?;
        }
        Some(id)
    }

    /// The child `name` of directory `dir`.
    pub fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.nodes[dir].children.get(name).copied()
    }

    /// Path of a node, without a leading `/`.
    pub fn path(&self, mut id: NodeId) -> String {
        let mut parts = Vec::new();
        while id != ROOT {
            parts.push(self.nodes[id].name.as_str());
            id = self.nodes[id].parent;
        }
        parts.reverse();
        parts.join("/")
    }

    /// Every live node, parents before children.
    pub fn walk(&self) -> Vec<NodeId> {
        let mut out = vec![ROOT];
        let mut i = 0;
        while i < out.len() {
            out.extend(self.nodes[out[i]].children.values().copied());
            i += 1;
        }
        out
    }

    /// Adds `e` of layer `layer`; `last_dir` is the directory (path, node) the entry before
    /// went into, kept while it stays live.
    fn add<'e>(
        &mut self,
        e: &'e Entry,
        layer: usize,
        last_dir: &mut Option<(&'e str, NodeId)>,
    ) -> Result<(), TreeError> {
        let err = |detail: String| TreeError { layer, detail };
        if e.path.is_empty() {
            if e.kind == Kind::Dir {
                let root = &mut self.nodes[ROOT];
                (root.mode, root.uid, root.gid) = (e.mode, e.uid, e.gid);
                (root.mtime, root.mtime_nsec) = (e.mtime, e.mtime_nsec);
                root.xattrs = e.xattrs.clone();
            }
            return Ok(());
        }
        let (parent_path, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
        let parent = match *last_dir {
            Some((path, id))
                if path == parent_path
                    && !self.nodes[id].removed
                    && self.nodes[id].file_type == FileType::Dir =>
            {
                id
            }
            _ => self.ensure_dir(parent_path),
        };
        *last_dir = Some((parent_path, parent));
        if let Some(existing) = self.child(parent, name) {
            if e.kind == Kind::Dir && self.nodes[existing].file_type == FileType::Dir {
                let n = &mut self.nodes[existing];
                (n.mode, n.uid, n.gid) = (e.mode, e.uid, e.gid);
                (n.mtime, n.mtime_nsec) = (e.mtime, e.mtime_nsec);
                n.xattrs = e.xattrs.clone();
                return Ok(());
            }
            self.remove(existing);
        }
        let id = self.nodes.len();
        let mut node = Node {
            name: name.to_string(),
            parent,
            file_type: FileType::File,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            size: 0,
            xattrs: e.xattrs.clone(),
            data: None,
            ino: id as u64 + 1,
            nlink: 1,
            children: BTreeMap::new(),
            removed: false,
        };
        match &e.kind {
            Kind::File => {
                node.size = e.size;
                node.data = Some((layer, e.offset));
            }
            Kind::Dir => node.file_type = FileType::Dir,
            Kind::Symlink { target } => {
                node.size = target.len() as u64;
                node.file_type = FileType::Symlink(target.clone());
            }
            Kind::Char { major, minor } => node.file_type = FileType::Char(*major, *minor),
            Kind::Block { major, minor } => node.file_type = FileType::Block(*major, *minor),
            Kind::Fifo => node.file_type = FileType::Fifo,
            Kind::Hardlink { target } => {
                let t = self.lookup(target).ok_or_else(|| {
                    err(format!(
                        "hard link {:?} points at missing {target:?}",
                        e.path
                    ))
                })?;
                let t = &self.nodes[t];
                if t.file_type == FileType::Dir {
                    return Err(err(format!(
                        "hard link {:?} points at directory {target:?}",
                        e.path
                    )));
                }
                // The link is another name for the target's inode: same type, data and metadata.
                node = Node {
                    name: node.name,
                    parent,
                    children: BTreeMap::new(),
                    ..t.clone()
                };
            }
            Kind::Whiteout | Kind::Opaque => unreachable!("handled before entries"),
        }
        self.nodes.push(node);
        self.nodes[parent].children.insert(name.to_string(), id);
        Ok(())
    }

    /// The directory at `path`, creating missing (or replacing non-directory) components.
    fn ensure_dir(&mut self, path: &str) -> NodeId {
        let mut id = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            id = match self.child(id, part) {
                Some(c) if self.nodes[c].file_type == FileType::Dir => c,
                other => {
                    if let Some(c) = other {
                        self.remove(c);
                    }
                    let new = self.nodes.len();
                    let mut n = dir_node(part, id, 0o755);
                    n.ino = new as u64 + 1;
                    self.nodes.push(n);
                    self.nodes[id].children.insert(part.to_string(), new);
                    new
                }
            };
        }
        id
    }

    fn remove(&mut self, id: NodeId) {
        let parent = self.nodes[id].parent;
        let name = self.nodes[id].name.clone();
        self.nodes[parent].children.remove(&name);
        let mut stack = vec![id];
        while let Some(n) = stack.pop() {
            self.nodes[n].removed = true;
            stack.extend(std::mem::take(&mut self.nodes[n].children).into_values());
        }
    }

    /// Link counts: names per inode for files, 2 + subdirectories for directories.
    fn count_links(&mut self) {
        let live = self.walk();
        let mut names: HashMap<u64, u32> = HashMap::new();
        for &id in &live {
            *names.entry(self.nodes[id].ino).or_default() += 1;
        }
        for &id in &live {
            let n = &self.nodes[id];
            let nlink = if n.file_type == FileType::Dir {
                2 + n
                    .children
                    .values()
                    .filter(|c| self.nodes[**c].file_type == FileType::Dir)
                    .count() as u32
            } else {
                names[&n.ino]
            };
            self.nodes[id].nlink = nlink;
        }
        self.inos = vec![usize::MAX; self.nodes.len() + 1];
        for &id in &live {
            self.inos[self.nodes[id].ino as usize] = id;
        }
        debug_assert!(live.iter().all(|&id| !self.nodes[id].removed));
    }
}

fn dir_node(name: &str, parent: NodeId, mode: u32) -> Node {
    Node {
        name: name.to_string(),
        parent,
        file_type: FileType::Dir,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        xattrs: BTreeMap::new(),
        data: None,
        ino: 1,
        nlink: 2,
        children: BTreeMap::new(),
        removed: false,
    }
}

/// Permission bits as `ls -l` shows them (`rwsr-xr-t`).
pub fn mode_string(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    for (shift, special, special_char) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => special_char,
            (false, true) => special_char.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
impl Tree {
    /// A one-layer tree of regular files at `paths` (their directories implied), for tests.
    pub fn from_files(paths: &[&str]) -> Tree {
        let entries: Vec<Entry> = paths
            .iter()
            .map(|p| Entry {
                path: p.to_string(),
                kind: Kind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 1,
                mtime: 0,
                mtime_nsec: 0,
                offset: 512,
                xattrs: BTreeMap::new(),
            })
            .collect();
        Tree::build([&entries[..]]).expect("a tree of files")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 3,
            mtime: 0,
            mtime_nsec: 0,
            offset: 512,
            xattrs: BTreeMap::new(),
        }
    }

    fn names(t: &Tree, path: &str) -> Vec<String> {
        t.node(t.lookup(path).unwrap())
            .children
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn whiteouts_opaque_dirs_and_replacements() {
        let l0 = [
            e("etc", Kind::Dir),
            e("etc/a", Kind::File),
            e("etc/b", Kind::File),
            e("opq", Kind::Dir),
            e("opq/old", Kind::File),
            e("x", Kind::Dir),
            e("x/inner", Kind::File),
            e("y", Kind::File),
        ];
        let l1 = [
            e("etc/a", Kind::Whiteout),
            e("opq", Kind::Opaque),
            e("opq", Kind::Dir),
            e("opq/new", Kind::File),
            e("x", Kind::File), // a file replaces a directory
            e("y", Kind::Dir),  // a directory replaces a file
            e("y/z", Kind::File),
            e(
                "etc/c",
                Kind::Hardlink {
                    target: "etc/b".into(),
                },
            ),
        ];
        let l2 = [e("x", Kind::Dir), e("etc/b", Kind::Whiteout)];
        let t = Tree::build([&l0[..], &l1[..], &l2[..]]).unwrap();
        assert_eq!(names(&t, "etc"), ["c"]);
        assert_eq!(names(&t, "opq"), ["new"]);
        assert_eq!(t.node(t.lookup("x").unwrap()).file_type, FileType::Dir);
        assert!(
            names(&t, "x").is_empty(),
            "x/inner stays hidden after dir → file → dir"
        );
        assert_eq!(names(&t, "y"), ["z"]);
        let c = t.node(t.lookup("etc/c").unwrap());
        assert_eq!(c.data, Some((0, 512)), "hard link keeps the target's data");
        assert_eq!(c.nlink, 1, "the other name was whited out");
        assert_eq!(t.path(t.lookup("opq/new").unwrap()), "opq/new");
    }

    /// `bin/`, `bin/a` and `bin/b`, a hard link to `bin/a`.
    fn linked() -> [Entry; 3] {
        [
            e("bin", Kind::Dir),
            e("bin/a", Kind::File),
            e(
                "bin/b",
                Kind::Hardlink {
                    target: "bin/a".into(),
                },
            ),
        ]
    }

    #[test]
    fn hardlinks_share_inodes_and_dirs_count_subdirs() {
        let [bin, a, b] = linked();
        let l0 = [
            bin,
            a,
            b,
            e("bin/sub", Kind::Dir),
            e("implicit/deep/file", Kind::File),
        ];
        let t = Tree::build([&l0[..]]).unwrap();
        let a = t.node(t.lookup("bin/a").unwrap());
        let b = t.node(t.lookup("bin/b").unwrap());
        assert_eq!(a.ino, b.ino);
        assert_eq!((a.nlink, b.nlink), (2, 2));
        assert_eq!(t.node(t.lookup("bin").unwrap()).nlink, 3);
        assert_eq!(
            t.node(t.lookup("implicit/deep").unwrap()).file_type,
            FileType::Dir
        );
        let err = Tree::build([&[e(
            "x",
            Kind::Hardlink {
                target: "nope".into(),
            },
        )][..]])
        .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// The fingerprint is what a process taking over a mount compares with the one the mount's
    /// record holds, written by whichever version served it before: its bytes never change.
    #[test]
    fn the_fingerprint_is_the_same_across_versions() {
        let mut x = e("etc/conf", Kind::File);
        x.xattrs.insert("user.k".into(), b"v1".to_vec());
        x.mtime = 1_700_000_000;
        x.mtime_nsec = 7;
        x.uid = 1000;
        let [bin, a, b] = linked();
        let l0 = [
            bin,
            a,
            b,
            e("bin/sh", Kind::Symlink { target: "a".into() }),
            x,
        ];
        let t = Tree::build([&l0[..]]).unwrap();
        assert_eq!(
            t.fingerprint(),
            "82a297f9bfe8bcc5c744c0a0f3498efe324597e8dee3a94d836a44ab0c6baea6"
        );
    }

    /// An entry that replaces the directory the entries before it went into: later entries
    /// under that path go into a new directory, never into the one it replaced.
    #[test]
    fn entries_after_a_replaced_directory_go_into_a_new_one() {
        // Directories end in `/`.
        let l0 =
            ["a/", "a/b/", "a/b/x", "a/b", "a/b/c", "a/d"].map(|p| match p.strip_suffix('/') {
                Some(dir) => e(dir, Kind::Dir),
                None => e(p, Kind::File),
            });
        let t = Tree::build([&l0[..]]).unwrap();
        assert_eq!(names(&t, "a"), ["b", "d"]);
        assert_eq!(names(&t, "a/b"), ["c"]);
        assert_eq!(t.node(t.lookup("a/b").unwrap()).file_type, FileType::Dir);
        assert!(t.lookup("a/b/x").is_none());
    }
}
