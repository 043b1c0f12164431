//! Which files an ELF program or shared object makes the dynamic loader open, read from its
//! program headers and dynamic section: its interpreter (`PT_INTERP`) and the loader's cache
//! (`etc/ld.so.cache`) for a program, and the libraries it needs (`DT_NEEDED`, searched the way
//! the loader searches: `DT_RPATH`/`DT_RUNPATH` with `$ORIGIN`, then the system's library
//! directories), and theirs in turn. The loader walks that chain one file at a time, each a
//! round trip on a cold mount; an open of the program (or the import walk's fetch of a
//! Python extension module, `imports.rs`) predicts all of it, so [`super::ImageView`]
//! fetches the chain ahead, a level at a time.
//!
//! An ELF file is untrusted input (any layer may hold any bytes under any name). The parser
//! reads at most [`HEAD`] bytes of file and program headers (64-bit little-endian ELF only), a
//! dynamic segment of at most [`MAX_DYNAMIC`] bytes and at most [`MAX_STRTAB`] bytes of its
//! string table; it keeps at most [`MAX_NEEDED`] names of at most 255 bytes, resolves paths
//! with at most [`MAX_HOPS`] symbolic links, and a mount follows at most [`MAX_OBJECTS`] files.
//! A wrong answer costs bandwidth only: the files are fetched and verified like any read.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::tree::{FileType, NodeId, Tree, ROOT};

/// Bytes read for the file header and the program headers.
pub const HEAD: u64 = 4096;
/// Largest dynamic segment read.
pub const MAX_DYNAMIC: u64 = 64 << 10;
/// Most string-table bytes read (the names are usually within the first few KB).
pub const MAX_STRTAB: u64 = 256 << 10;
/// Most libraries kept from one file.
pub const MAX_NEEDED: usize = 64;
/// Most symbolic links followed resolving one path (as the kernel's limit).
pub const MAX_HOPS: usize = 40;
/// Most files a mount follows.
pub const MAX_OBJECTS: usize = 512;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// What the file and program headers say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Headers {
    /// `e_machine`: which system library directories apply.
    pub machine: u16,
    /// File offset and size of the interpreter's path.
    pub interp: Option<(u64, u64)>,
    /// File offset and size of the dynamic segment.
    pub dynamic: Option<(u64, u64)>,
    /// Loadable segments: (virtual address, file offset, size in the file).
    pub loads: Vec<(u64, u64, u64)>,
}

impl Headers {
    /// The file offset of virtual address `addr` (a loaded segment's bytes).
    pub fn file_offset(&self, addr: u64) -> Option<u64> {
        self.loads.iter().find_map(|&(vaddr, offset, size)| {
            (addr >= vaddr && addr - vaddr < size)
                .then_some(())
                .and_then(|()| offset.checked_add(addr - vaddr))
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The headers of a 64-bit little-endian ELF file from its first bytes (`head`, at most
/// [`HEAD`] are looked at); `None` for anything else, or program headers beyond `head`.
pub fn headers(head: &[u8]) -> Option<Headers> {
    let head = &head[..head.len().min(HEAD as usize)];
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let machine = u16_at(head, 18)?;
    let phoff = usize::try_from(u64_at(head, 32)?).ok()?;
    let phentsize = usize::from(u16_at(head, 54)?);
    let phnum = usize::from(u16_at(head, 56)?);
    if phentsize < 56 {
        return None;
    }
    let mut h = Headers {
        machine,
        ..Headers::default()
    };
    for k in 0..phnum.min(64) {
        let at = phoff.checked_add(k.checked_mul(phentsize)?)?;
        let ph = head.get(at..at.checked_add(56)?)?;
        let kind = u32_at(ph, 0)?;
        let offset = u64_at(ph, 8)?;
        let vaddr = u64_at(ph, 16)?;
        let filesz = u64_at(ph, 32)?;
        match kind {
            PT_LOAD if h.loads.len() < 16 => h.loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => h.dynamic = Some((offset, filesz)),
            PT_INTERP => h.interp = Some((offset, filesz)),
            _ => {}
        }
    }
    Some(h)
}

/// What the dynamic segment says: string-table offsets of the libraries needed and of the
/// search paths, and where the string table is.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub needed: Vec<u64>,
    /// `DT_RPATH` (used only without `DT_RUNPATH`, as the loader does) and `DT_RUNPATH`.
    pub rpath: Option<u64>,
    pub runpath: Option<u64>,
    /// Virtual address and size of the string table.
    pub strtab: Option<u64>,
    pub strsz: u64,
}

/// The dynamic segment's entries (16 bytes each, up to `DT_NULL`).
pub fn dynamic(seg: &[u8]) -> Dynamic {
    let mut d = Dynamic::default();
    for entry in seg.chunks_exact(16) {
        let (Some(tag), Some(val)) = (u64_at(entry, 0), u64_at(entry, 8)) else {
            break;
        };
        match tag {
            DT_NULL => break,
            DT_NEEDED if d.needed.len() < MAX_NEEDED => d.needed.push(val),
            DT_STRTAB => d.strtab = Some(val),
            DT_STRSZ => d.strsz = val,
            DT_RPATH => d.rpath = Some(val),
            DT_RUNPATH => d.runpath = Some(val),
            _ => {}
        }
    }
    d
}

/// The NUL-terminated string at `at` of `table`, if it is there, UTF-8, 1–255 bytes.
pub fn string_at(table: &[u8], at: u64) -> Option<&str> {
    let rest = table.get(usize::try_from(at).ok()?..)?;
    let end = rest.iter().take(256).position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end])
        .ok()
        .filter(|s| !s.is_empty())
}

/// The system library directories the loader searches for `machine`, after the file's own.
pub fn system_dirs(machine: u16) -> &'static [&'static str] {
    match machine {
        62 => &[
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        183 => &[
            "lib/aarch64-linux-gnu",
            "usr/lib/aarch64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        _ => &["lib64", "usr/lib64", "lib", "usr/lib", "usr/local/lib"],
    }
}

/// The node `path` names (from the root), following symbolic links anywhere in it.
pub fn follow(tree: &Tree, path: &str) -> Option<NodeId> {
    let mut parts: VecDeque<String> = path.split('/').map(str::to_string).collect();
    let (mut at, mut hops) = (ROOT, 0);
    while let Some(part) = parts.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                at = tree.node(at).parent;
                continue;
            }
            _ => {}
        }
        let id = tree.child(at, &part)?;
        match &tree.node(id).file_type {
            FileType::Symlink(target) => {
                hops += 1;
                if hops > MAX_HOPS {
                    return None;
                }
                if target.starts_with('/') {
                    at = ROOT;
                }
                for p in target.split('/').rev() {
                    parts.push_front(p.to_string());
                }
            }
            FileType::Dir => at = id,
            _ if parts.iter().all(|p| p.is_empty() || p == ".") => return Some(id),
            _ => return None,
        }
    }
    Some(at)
}

/// The regular file `path` names (from the root), following symbolic links anywhere in it.
pub fn follow_file(tree: &Tree, path: &str) -> Option<NodeId> {
    follow(tree, path).filter(|&id| tree.node(id).file_type == FileType::File)
}

/// The regular file the loader would find for `name`, needed by the file at `from` (its
/// directory is `$ORIGIN`), searching `paths` (colon-separated, from `DT_RPATH` or
/// `DT_RUNPATH`) and then the system directories of `machine`.
pub fn find_library(
    tree: &Tree,
    from: NodeId,
    name: &str,
    paths: &[&str],
    machine: u16,
) -> Option<NodeId> {
    let file = |path: &str| follow_file(tree, path);
    if name.contains('/') {
        return file(name);
    }
    let origin = tree.path(tree.node(from).parent);
    let own = paths
        .iter()
        .flat_map(|p| p.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin));
    own.chain(system_dirs(machine).iter().map(|d| d.to_string()))
        .take(32)
        .find_map(|dir| file(&format!("{dir}/{name}")))
}

/// Whether `name` (with these mode bits) may be an ELF program or shared object worth
/// following: executable, or named like a shared object.
pub fn may_be_elf(name: &str, mode: u32) -> bool {
    mode & 0o111 != 0 || super::is_shared_object(name)
}

/// Files read for their libraries, and files fetched, at once per followed open.
const NEEDED_PARALLEL: usize = 4;
/// Opens followed at once per mount (an open beyond that follows nothing): with
/// [`NEEDED_PARALLEL`], at most 32 files' headers (324 KiB each at most) are in memory.
pub const FOLLOWS: usize = 8;
/// Extension modules the import walk follows at once per mount, beside the opens' (the
/// walk's next ones wait for a turn): with [`NEEDED_PARALLEL`], 16 more files' headers.
pub const WALK_FOLLOWS: usize = 4;

/// A follow of an ELF file's libraries under way: when it ends, or its future is dropped,
/// opens waiting for it go on.
struct Following<'a>(&'a super::ImageView, NodeId, Arc<tokio::sync::Semaphore>);

impl Drop for Following<'_> {
    fn drop(&mut self) {
        self.0.elf_following.lock().unwrap().remove(&self.1);
        self.2.close();
    }
}

impl super::ImageView {
    /// Follows the libraries of `root`, an ELF file just opened: fetches the first `limit`
    /// bytes of each file the loader will open for it (as an open would), and follows theirs,
    /// each file once per mount, [`NEEDED_PARALLEL`] at a time. If another open of `root` is
    /// following them (the fetch at mount of what the image runs first, then its `exec`),
    /// waits for that instead: the caller fetches the file's rest after its libraries. False
    /// if it had no turn ([`FOLLOWS`] follows under way): a later open of `root` tries again.
    pub(super) async fn fetch_needed(&self, root: NodeId, limit: u64) -> bool {
        self.follow_needed(root, limit, false).await
    }

    /// [`fetch_needed`](Self::fetch_needed) of an extension module the import walk fetched
    /// (`walk`): python's import of it will have the loader open its libraries, so they are
    /// fetched now rather than when python gets there (on the cold-start benchmark, libcrypto
    /// behind `_hashlib` and `_ssl`, liblzma, libuuid: a chain of waits at the command's end).
    /// Such a follow waits for one of [`WALK_FOLLOWS`] turns rather than taking an open's.
    pub(super) async fn follow_needed(&self, root: NodeId, limit: u64, walk: bool) -> bool {
        let n = self.tree.node(root);
        if n.file_type != FileType::File || !may_be_elf(&n.name, n.mode) {
            return true;
        }
        let walk_turn = match walk {
            true if self.elf_followed.lock().unwrap().contains(&root) => return true,
            true => match self.elf_walk_follows.acquire().await {
                Ok(turn) => Some(turn),
                Err(_) => return true,
            },
            false => None,
        };
        let started = {
            let mut following = self.elf_following.lock().unwrap();
            match following.get(&root) {
                Some(done) => Err(done.clone()),
                None => {
                    let Some(turn) = walk_turn.or_else(|| self.elf_follows.try_acquire().ok())
                    else {
                        return false;
                    };
                    if !self.claim_elf(root) {
                        return true;
                    }
                    let done = Arc::new(tokio::sync::Semaphore::new(0));
                    following.insert(root, done.clone());
                    Ok((turn, done))
                }
            }
        };
        match started {
            Ok((_turn, done)) => {
                let _ending = Following(self, root, done);
                self.follow_libraries(root, limit).await
            }
            // Closed when that follow ends (or is dropped).
            // (The walk's follow does not wait: that open fetches them.)
            Err(done) if !walk => drop(done.acquire().await),
            Err(_) => {}
        }
        true
    }

    async fn follow_libraries(&self, root: NodeId, limit: u64) {
        use futures_util::stream::FuturesUnordered;
        use futures_util::StreamExt;
        // Files to read the headers of, and to fetch: each at most NEEDED_PARALLEL at once (a
        // parse holds up to 324 KiB of the file's bytes).
        let mut parses = FuturesUnordered::new();
        let mut to_parse = VecDeque::from([root]);
        let mut fetches = FuturesUnordered::new();
        let mut to_fetch = VecDeque::new();
        let mut files = 0usize;
        loop {
            while fetches.len() < NEEDED_PARALLEL {
                let Some(f) = to_fetch.pop_front() else {
                    break;
                };
                fetches.push(self.fetch_library(f, limit));
            }
            while parses.len() < NEEDED_PARALLEL {
                let Some(f) = to_parse.pop_front() else {
                    break;
                };
                parses.push(self.needed_of(f));
            }
            tokio::select! {
                Some(found) = parses.next(), if !parses.is_empty() => {
                    for f in found {
                        if self.claim_elf(f) {
                            files += 1;
                            to_fetch.push_back(f);
                            let n = self.tree.node(f);
                            if may_be_elf(&n.name, n.mode) {
                                to_parse.push_back(f);
                            }
                        }
                    }
                }
                Some(()) = fetches.next(), if !fetches.is_empty() => {}
                else => break,
            }
        }
        tracing::debug!(path = %self.tree.path(root), files, "libraries fetched");
    }

    /// Claims `file` for [`fetch_needed`](Self::fetch_needed): false if it was claimed before
    /// or the mount has followed [`MAX_OBJECTS`] files.
    fn claim_elf(&self, file: NodeId) -> bool {
        let mut followed = self.elf_followed.lock().unwrap();
        followed.len() < MAX_OBJECTS && followed.insert(file)
    }

    /// The first `limit` bytes of `file` as an open fetches them (in pieces, so the loader's
    /// first reads of it need not wait for all of it), unless cached.
    async fn fetch_library(&self, file: NodeId, limit: u64) {
        let Some((layer, offset, len)) = self.open_fetch(file, limit) else {
            return;
        };
        if !self.readers[layer].is_cached(offset, len) {
            self.prefetch_own(file, layer, offset, len, limit).await;
        }
    }

    /// The files the loader opens for ELF file `obj`: for a program its interpreter and the
    /// loader's cache, then the libraries it needs. Reads (fetching if need be) its headers,
    /// dynamic segment and string table; empty for anything that is not ELF.
    async fn needed_of(&self, obj: NodeId) -> Vec<NodeId> {
        let n = self.tree.node(obj);
        let (Some((layer, offset)), size) = (n.data, n.size) else {
            return Vec::new();
        };
        let reader = &self.readers[layer];
        if !reader.index().random_access() {
            return Vec::new();
        }
        let read = |at: u64, len: u64| async move {
            if at >= size || len == 0 {
                return None;
            }
            reader
                .read_exact(offset + at, len.min(size - at))
                .await
                .ok()
        };
        let Some(h) = read(0, HEAD).await.and_then(|head| headers(&head)) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        if let Some((at, len)) = h.interp {
            let path = read(at, len.min(256)).await;
            if let Some(p) = path.as_deref().and_then(|b| string_at(b, 0)) {
                found.extend(find_library(&self.tree, obj, p, &[], h.machine));
                found.extend(find_library(
                    &self.tree,
                    obj,
                    "/etc/ld.so.cache",
                    &[],
                    h.machine,
                ));
            }
        }
        let Some((at, len)) = h.dynamic else {
            return found;
        };
        let Some(seg) = read(at, len.min(MAX_DYNAMIC)).await else {
            return found;
        };
        let d = dynamic(&seg);
        let Some(table_at) = d.strtab.and_then(|a| h.file_offset(a)) else {
            return found;
        };
        let last = d
            .needed
            .iter()
            .chain(&d.rpath)
            .chain(&d.runpath)
            .max()
            .copied();
        let Some(last) = last else {
            return found;
        };
        let table_len = last.saturating_add(256).min(d.strsz.max(1)).min(MAX_STRTAB);
        let Some(table) = read(table_at, table_len).await else {
            return found;
        };
        let paths: Vec<&str> = match (d.runpath, d.rpath) {
            (Some(r), _) | (None, Some(r)) => string_at(&table, r).into_iter().collect(),
            (None, None) => Vec::new(),
        };
        for &name in &d.needed {
            if let Some(lib) = string_at(&table, name)
                .and_then(|name| find_library(&self.tree, obj, name, &paths, h.machine))
            {
                found.push(lib);
            }
        }
        found
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file: headers, an interpreter path, one loadable segment holding a
    /// string table, and a dynamic segment naming `needed` (and `runpath`, if any).
    pub(crate) fn elf(interp: Option<&str>, needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut name = |s: &str| {
            let at = strtab.len() as u64;
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
            at
        };
        let needed: Vec<u64> = needed.iter().map(|n| name(n)).collect();
        let runpath = runpath.map(&mut name);
        let (phoff, phnum) = (64u64, 3u64);
        let interp_at = phoff + 56 * phnum;
        let interp = interp
            .map(|s| [s.as_bytes(), b"\0"].concat())
            .unwrap_or_default();
        let strtab_at = interp_at + interp.len() as u64;
        let dynamic_at = strtab_at + strtab.len() as u64;
        let mut dynamic = Vec::new();
        let mut entry = |tag: u64, val: u64| {
            dynamic.extend_from_slice(&tag.to_le_bytes());
            dynamic.extend_from_slice(&val.to_le_bytes());
        };
        for n in &needed {
            entry(DT_NEEDED, *n);
        }
        if let Some(r) = runpath {
            entry(DT_RUNPATH, r);
        }
        // The string table's address: the segment maps file offset 0 at 0x400000.
        entry(DT_STRTAB, 0x400000 + strtab_at);
        entry(DT_STRSZ, strtab.len() as u64);
        entry(DT_NULL, 0);
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let total = dynamic_at + dynamic.len() as u64;
        let mut ph = |kind: u32, offset: u64, vaddr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[16..24].copy_from_slice(&vaddr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&p);
        };
        let interp_kind = if interp.is_empty() { 0 } else { PT_INTERP };
        ph(
            interp_kind,
            interp_at,
            0x400000 + interp_at,
            interp.len() as u64,
        );
        ph(PT_LOAD, 0, 0x400000, total);
        ph(
            PT_DYNAMIC,
            dynamic_at,
            0x400000 + dynamic_at,
            dynamic.len() as u64,
        );
        f.extend_from_slice(&interp);
        f.extend_from_slice(&strtab);
        f.extend_from_slice(&dynamic);
        f
    }

    #[test]
    fn headers_dynamic_section_and_names() {
        let f = elf(
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libm.so.6", "libc.so.6"],
            Some("$ORIGIN/../lib"),
        );
        let h = headers(&f).unwrap();
        assert_eq!(h.machine, 62);
        let (at, len) = h.interp.unwrap();
        let interp = &f[at as usize..(at + len) as usize];
        assert_eq!(string_at(interp, 0), Some("/lib64/ld-linux-x86-64.so.2"));
        let (at, len) = h.dynamic.unwrap();
        let d = dynamic(&f[at as usize..(at + len) as usize]);
        let strtab = h.file_offset(d.strtab.unwrap()).unwrap() as usize;
        let table = &f[strtab..strtab + d.strsz as usize];
        let names: Vec<&str> = d
            .needed
            .iter()
            .map(|&n| string_at(table, n).unwrap())
            .collect();
        assert_eq!(names, ["libm.so.6", "libc.so.6"]);
        assert_eq!(string_at(table, d.runpath.unwrap()), Some("$ORIGIN/../lib"));
    }

    #[test]
    fn anything_but_elf64_little_endian_is_refused_and_garbage_never_panics() {
        assert!(headers(b"#!/bin/sh\n").is_none());
        let mut f = elf(None, &["libc.so.6"], None);
        f[4] = 1; // ELFCLASS32
        assert!(headers(&f).is_none());
        // Program headers pointing anywhere, truncated files, junk dynamic segments.
        let f = elf(None, &["libc.so.6"], None);
        for cut in 0..f.len() {
            let _ = headers(&f[..cut]);
            let _ = dynamic(&f[cut..]);
            let _ = string_at(&f, cut as u64);
        }
        let mut bad = f.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(headers(&bad).is_none());
    }
}
