//! Conformance helpers: layers using every tar feature images use, an OCI image layout for
//! `umoci unpack` (the independent reference), and a walker that records everything a
//! filesystem shows about each path, so two trees can be compared field by field.
//!
//! * [`TrickyLayer`]: a tar layer builder beyond [`super::LayerBuilder`]: devices, fifos,
//!   setuid/setgid/sticky modes, xattrs (PAX `SCHILY.xattr.*`), long names and link targets in
//!   GNU (`L`/`K` entries), PAX (`path`/`linkpath` records) or ustar-prefix form, PAX
//!   overrides of mtime and owner, and the root directory entry `./`.
//! * [`write_oci_layout`] / [`umoci_unpack`]: an OCI layout from the very bytes pushed to the
//!   registry, unpacked by `umoci` (Debian package `umoci`).
//! * [`walk`] / [`diff`]: `lstat`, `readlink`, `llistxattr`/`lgetxattr` (raw libc calls: std
//!   links libc anyway) and a sha256 of every regular file; differences as readable lines.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Default mtime of entries: not 0, so a reader that drops mtimes shows.
pub const DEFAULT_MTIME: u64 = 1_600_000_000;

/// What a [`TarEntry`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarKind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    /// Hard link to an earlier archive path (in this layer or a lower one).
    Hardlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// How names and link targets that do not fit the 100-byte header fields are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameFormat {
    /// GNU header; long names and targets as `././@LongLink` entries (`L`, `K`).
    Gnu,
    /// ustar header, preceded by a PAX `x` header carrying `path` / `linkpath` when they do
    /// not fit (a path up to 255 bytes that can be split at a `/` uses the ustar prefix field
    /// instead, as tar writers do) and any extra records.
    Pax,
}

/// One tar entry.
#[derive(Clone, Debug)]
pub struct TarEntry {
    pub path: String,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub format: NameFormat,
    /// Extra PAX records (`SCHILY.xattr.NAME`, `mtime`, `uid`, ...), in order. Non-empty
    /// forces [`NameFormat::Pax`].
    pub pax: Vec<(String, Vec<u8>)>,
}

/// A layer described entry by entry; the builder methods that change metadata apply to the
/// entry added last.
#[derive(Clone, Debug, Default)]
pub struct TrickyLayer {
    entries: Vec<TarEntry>,
}

impl TrickyLayer {
    pub fn new() -> TrickyLayer {
        TrickyLayer::default()
    }

    /// Adds an entry owned by 0:0 with mtime [`DEFAULT_MTIME`] and GNU names.
    pub fn add(mut self, path: &str, kind: TarKind, mode: u32) -> TrickyLayer {
        self.entries.push(TarEntry {
            path: path.to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            format: NameFormat::Gnu,
            pax: Vec::new(),
        });
        self
    }

    pub fn file(self, path: &str, content: &[u8], mode: u32) -> TrickyLayer {
        self.add(path, TarKind::File(content.to_vec()), mode)
    }

    pub fn dir(self, path: &str, mode: u32) -> TrickyLayer {
        self.add(path, TarKind::Dir, mode)
    }

    pub fn symlink(self, path: &str, target: &str) -> TrickyLayer {
        self.add(path, TarKind::Symlink(target.to_string()), 0o777)
    }

    pub fn hardlink(self, path: &str, target: &str) -> TrickyLayer {
        self.add(path, TarKind::Hardlink(target.to_string()), 0o644)
    }

    pub fn char_dev(self, path: &str, major: u32, minor: u32, mode: u32) -> TrickyLayer {
        self.add(path, TarKind::Char(major, minor), mode)
    }

    pub fn block_dev(self, path: &str, major: u32, minor: u32, mode: u32) -> TrickyLayer {
        self.add(path, TarKind::Block(major, minor), mode)
    }

    pub fn fifo(self, path: &str, mode: u32) -> TrickyLayer {
        self.add(path, TarKind::Fifo, mode)
    }

    /// An OCI whiteout for `path` (`dir/.wh.name`, an empty file).
    pub fn whiteout(self, path: &str) -> TrickyLayer {
        let wh = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        self.file(&wh, b"", 0o644)
    }

    /// An opaque marker for `dir` (`dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> TrickyLayer {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    fn last(&mut self) -> &mut TarEntry {
        self.entries.last_mut().expect("no entry added yet")
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> TrickyLayer {
        (self.last().uid, self.last().gid) = (uid, gid);
        self
    }

    pub fn mtime(mut self, mtime: u64) -> TrickyLayer {
        self.last().mtime = mtime;
        self
    }

    /// Write the last entry in PAX form.
    pub fn pax_names(mut self) -> TrickyLayer {
        self.last().format = NameFormat::Pax;
        self
    }

    /// An extra PAX record on the last entry.
    pub fn pax(mut self, key: &str, value: &[u8]) -> TrickyLayer {
        let e = self.last();
        e.format = NameFormat::Pax;
        e.pax.push((key.to_string(), value.to_vec()));
        self
    }

    /// An xattr on the last entry (`SCHILY.xattr.NAME`).
    pub fn xattr(self, name: &str, value: &[u8]) -> TrickyLayer {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }

    pub fn entries(&self) -> &[TarEntry] {
        &self.entries
    }

    /// The uncompressed tar archive (entries in insertion order, then two zero blocks).
    pub fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.entries {
            append_entry(&mut b, e).unwrap_or_else(|err| panic!("tar entry {}: {err}", e.path));
        }
        b.into_inner().expect("finish tar")
    }
}

/// One PAX extended-header record: `"<len> <key>=<value>\n"`, `len` counting itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    assert_eq!(out.len(), len);
    out
}

fn set_header_kind(h: &mut tar::Header, e: &TarEntry) -> std::io::Result<u64> {
    use tar::EntryType;
    let (ty, size) = match &e.kind {
        TarKind::File(data) => (EntryType::Regular, data.len() as u64),
        TarKind::Dir => (EntryType::Directory, 0),
        TarKind::Symlink(_) => (EntryType::Symlink, 0),
        TarKind::Hardlink(_) => (EntryType::Link, 0),
        TarKind::Char(..) => (EntryType::Char, 0),
        TarKind::Block(..) => (EntryType::Block, 0),
        TarKind::Fifo => (EntryType::Fifo, 0),
    };
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(e.mtime);
    if let TarKind::Char(major, minor) | TarKind::Block(major, minor) = e.kind {
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
    }
    Ok(size)
}

fn data_of(e: &TarEntry) -> &[u8] {
    match &e.kind {
        TarKind::File(data) => data,
        _ => &[],
    }
}

fn link_of(e: &TarEntry) -> Option<&str> {
    match &e.kind {
        TarKind::Symlink(t) | TarKind::Hardlink(t) => Some(t),
        _ => None,
    }
}

/// The name as written in the archive: directories end in `/`, the root is `./`.
fn archive_name(e: &TarEntry) -> String {
    match e.kind {
        TarKind::Dir if e.path == "." || e.path.is_empty() => "./".to_string(),
        TarKind::Dir => format!("{}/", e.path.trim_end_matches('/')),
        _ => e.path.clone(),
    }
}

fn append_entry(b: &mut tar::Builder<Vec<u8>>, e: &TarEntry) -> std::io::Result<()> {
    let name = archive_name(e);
    if e.format == NameFormat::Gnu && e.pax.is_empty() {
        let mut h = tar::Header::new_gnu();
        set_header_kind(&mut h, e)?;
        if name == "./" {
            // tar-rs normalises `./` away; write the field by hand.
            h.as_old_mut().name[..2].copy_from_slice(b"./");
            h.set_cksum();
            return b.append(&h, std::io::empty());
        }
        return match link_of(e) {
            Some(target) => b.append_link(&mut h, &name, target),
            None => b.append_data(&mut h, &name, data_of(e)),
        };
    }
    let mut h = tar::Header::new_ustar();
    set_header_kind(&mut h, e)?;
    let mut records = Vec::new();
    let fits = name != "./" && name.len() <= 255 && h.set_path(&name).is_ok();
    if !fits {
        records.extend(pax_record("path", name.as_bytes()));
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        let n = name.len().min(field.len());
        field[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
    if let Some(target) = link_of(e) {
        if h.set_link_name(target).is_err() {
            records.extend(pax_record("linkpath", target.as_bytes()));
            let field = &mut h.as_old_mut().linkname;
            field.fill(0);
            let n = target.len().min(field.len());
            field[..n].copy_from_slice(&target.as_bytes()[..n]);
        }
    }
    for (k, v) in &e.pax {
        records.extend(pax_record(k, v));
    }
    if !records.is_empty() {
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(records.len() as u64);
        x.set_mode(0o644);
        x.set_mtime(e.mtime);
        x.set_path("PaxHeaders.0/entry")?;
        x.set_cksum();
        b.append(&x, &records[..])?;
    }
    h.set_cksum();
    b.append(&h, data_of(e))
}

/// Writes an OCI image layout (`oci-layout`, `index.json` naming the manifest `tag`,
/// `blobs/sha256/*`) holding the manifest and `blobs` (config and layers) exactly as given.
pub fn write_oci_layout(dir: &Path, tag: &str, manifest: &[u8], blobs: &[&[u8]]) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).unwrap();
    let put = |bytes: &[u8]| -> String {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blob_dir.join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    };
    for b in blobs {
        put(b);
    }
    let digest = put(manifest);
    let media_type = serde_json::from_slice::<serde_json::Value>(manifest).unwrap()["mediaType"]
        .as_str()
        .unwrap_or(super::OCI_MANIFEST)
        .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::OCI_INDEX,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// `umoci unpack --image LAYOUT:TAG BUNDLE` (as root: owners, devices and all xattrs
/// applied); returns `BUNDLE/rootfs`. Panics with umoci's output if it fails.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .output()
        .unwrap_or_else(|e| {
            panic!("run umoci: {e} (install the Debian package umoci, see .ci/setup)")
        });
    assert!(
        out.status.success(),
        "umoci unpack {}:{tag} failed ({}):\n{}\n{}",
        layout.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

/// Everything compared about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `-` file, `d` dir, `l` symlink, `c` char device, `b` block device, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `st_size`; `None` for directories, whose size is the host filesystem's business
    /// (ext4 reports its block size), not the image's.
    pub size: Option<u64>,
    /// (seconds, nanoseconds).
    pub mtime: (i64, i64),
    pub nlink: u64,
    pub target: Option<PathBuf>,
    /// (major, minor) of devices.
    pub rdev: Option<(u32, u32)>,
    /// All xattrs (`llistxattr` / `lgetxattr`), or the error listing them.
    pub xattrs: Result<BTreeMap<String, Vec<u8>>, String>,
    /// `sha256:` of the content of regular files (or the read error).
    pub content: Option<Result<String, String>>,
    /// The other paths of the tree with the same inode (hard links), sorted.
    pub links: Vec<PathBuf>,
    /// `st_ino` within its own tree (only used to group hard links; not compared).
    pub ino: u64,
}

/// Fields compared by [`diff`] (`ino` is not: inode numbers are per filesystem).
const FIELDS: [&str; 12] = [
    "kind", "mode", "uid", "gid", "size", "mtime", "nlink", "target", "rdev", "xattrs", "content",
    "links",
];

impl Stat {
    fn field(&self, name: &str) -> String {
        match name {
            "kind" => self.kind.to_string(),
            "mode" => format!("{:04o}", self.mode),
            "uid" => self.uid.to_string(),
            "gid" => self.gid.to_string(),
            "size" => format!("{:?}", self.size),
            "mtime" => format!("{}.{:09}", self.mtime.0, self.mtime.1),
            "nlink" => self.nlink.to_string(),
            "target" => format!("{:?}", self.target),
            "rdev" => format!("{:?}", self.rdev),
            "xattrs" => match &self.xattrs {
                Ok(x) => format!(
                    "{{{}}}",
                    x.iter()
                        .map(|(k, v)| format!("{k}={}", show_bytes(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => format!("error: {e}"),
            },
            "content" => format!("{:?}", self.content),
            "links" => format!("{:?}", self.links),
            other => panic!("no field {other}"),
        }
    }
}

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = FIELDS
            .iter()
            .map(|n| format!("{n}={}", self.field(n)))
            .collect();
        write!(f, "{}", parts.join(" "))
    }
}

/// Printable bytes: UTF-8 text quoted, anything else as hex.
pub fn show_bytes(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(v)),
    }
}

/// Every path under `root` (the root itself as `/`), keyed by its absolute path inside the
/// tree. Does not follow symlinks; never opens fifos or devices.
pub fn walk(root: &Path) -> BTreeMap<PathBuf, Stat> {
    let mut out = BTreeMap::new();
    walk_into(root, Path::new("/"), &mut out);
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (path, st) in &out {
        if st.kind != 'd' {
            by_ino.entry(st.ino).or_default().push(path.clone());
        }
    }
    for (path, st) in out.iter_mut() {
        if st.kind != 'd' {
            st.links = by_ino[&st.ino]
                .iter()
                .filter(|p| *p != path)
                .cloned()
                .collect();
        }
    }
    out
}

fn walk_into(host: &Path, path: &Path, out: &mut BTreeMap<PathBuf, Stat>) {
    let st = stat(host);
    let is_dir = st.kind == 'd';
    out.insert(path.to_path_buf(), st);
    if !is_dir {
        return;
    }
    let mut names: Vec<_> = std::fs::read_dir(host)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", host.display()))
        .map(|d| {
            d.unwrap_or_else(|e| panic!("read_dir {}: {e}", host.display()))
                .file_name()
        })
        .collect();
    names.sort();
    for name in names {
        walk_into(&host.join(&name), &path.join(&name), out);
    }
}

/// What [`walk`] records about one host path.
pub fn stat(host: &Path) -> Stat {
    let md =
        std::fs::symlink_metadata(host).unwrap_or_else(|e| panic!("lstat {}: {e}", host.display()));
    let ft = md.file_type();
    let kind = if ft.is_file() {
        '-'
    } else if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    let rdev = matches!(kind, 'c' | 'b').then(|| (dev_major(md.rdev()), dev_minor(md.rdev())));
    let target = (kind == 'l').then(|| {
        std::fs::read_link(host).unwrap_or_else(|e| panic!("readlink {}: {e}", host.display()))
    });
    let content = (kind == '-').then(|| hash_file(host));
    Stat {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: (kind != 'd').then_some(md.size()),
        mtime: (md.mtime(), md.mtime_nsec()),
        nlink: md.nlink(),
        target,
        rdev,
        xattrs: xattrs(host),
        content,
        links: Vec::new(),
        ino: md.ino(),
    }
}

/// glibc's `major()` for a 64-bit `dev_t`.
pub fn dev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// glibc's `minor()` for a 64-bit `dev_t`.
pub fn dev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

fn hash_file(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

mod sys {
    use std::os::raw::{c_char, c_void};
    extern "C" {
        pub fn llistxattr(path: *const c_char, list: *mut c_char, size: usize) -> isize;
        pub fn lgetxattr(
            path: *const c_char,
            name: *const c_char,
            value: *mut c_void,
            size: usize,
        ) -> isize;
    }
}

/// EOPNOTSUPP / ENOTSUP on Linux.
const ENOTSUP: i32 = 95;
/// ERANGE: the buffer was too small (the value grew between two calls).
const ERANGE: i32 = 34;

/// Calls `f(buf, len)` with a growing buffer until the answer fits.
fn sized_call(mut f: impl FnMut(*mut u8, usize) -> isize) -> Result<Vec<u8>, std::io::Error> {
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize + 1];
        let m = f(buf.as_mut_ptr(), buf.len());
        if m < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
}

/// All xattrs of `path` itself (not following symlinks). A filesystem without xattr support
/// has none.
pub fn xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let list = match sized_call(|buf, len| unsafe { sys::llistxattr(c.as_ptr(), buf.cast(), len) })
    {
        Ok(list) => list,
        Err(e) if e.raw_os_error() == Some(ENOTSUP) => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("llistxattr: {e}")),
    };
    let mut out = BTreeMap::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let value = sized_call(|buf, len| unsafe {
            sys::lgetxattr(c.as_ptr(), cname.as_ptr(), buf.cast(), len)
        })
        .map_err(|e| format!("lgetxattr {}: {e}", OsStr::from_bytes(name).display()))?;
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(out)
}

/// Differences between two walks, one line each: paths only on one side, then every
/// differing field as `path: field: expected X, got Y`.
pub fn diff(expected: &BTreeMap<PathBuf, Stat>, got: &BTreeMap<PathBuf, Stat>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, e) in expected {
        match got.get(path) {
            None => out.push(format!("{}: missing (expected {e})", path.display())),
            Some(g) => {
                for f in FIELDS {
                    let (ev, gv) = (e.field(f), g.field(f));
                    if ev != gv {
                        out.push(format!("{}: {f}: expected {ev}, got {gv}", path.display()));
                    }
                }
            }
        }
    }
    for (path, g) in got {
        if !expected.contains_key(path) {
            out.push(format!("{}: unexpected (got {g})", path.display()));
        }
    }
    out
}
