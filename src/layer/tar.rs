//! Tar entries of a layer: metadata plus where each file's bytes start in the uncompressed
//! stream. Paths are cleaned the way containerd does (`..` cannot climb above the root,
//! leading `/` and `./` are dropped); whiteouts and opaque markers are recorded as such.

use std::collections::BTreeMap;
use std::io::Read;

use super::entry::whiteout;
pub use super::entry::{clean_path, Entry, Kind};
use super::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME};

/// A PAX time (`1700000000.123456789`, `-1.5`) as whole seconds and nanoseconds (floored, as
/// `stat` shows times before 1970).
fn pax_time(value: &str) -> Option<(i64, u32)> {
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    let negative = whole.starts_with('-');
    let secs: i64 = whole.parse().ok()?;
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    if negative && nanos > 0 {
        Some((secs - 1, 1_000_000_000 - nanos))
    } else {
        Some((secs, nanos))
    }
}

/// Largest body of a metadata header (GNU long name or link, PAX extended or global), as Go's
/// archive/tar (containerd's reader) allows: a 1 GiB "long name" is a memory bomb, not a name.
pub const MAX_HEADER_BODY: u64 = 1 << 20;
/// Longest path, link target or xattr value kept for one entry (Linux allows 64 KiB xattr
/// values; no path lookup can use a longer name).
pub const MAX_NAME: usize = 64 << 10;
/// Most bytes of paths, link targets and xattrs one layer's entries may hold in all.
pub const MAX_METADATA: u64 = 256 << 20;

/// Passes a tar stream through unchanged while following its headers exactly as the `tar`
/// crate does (its own header parsing; GNU long names and links and PAX headers recognised
/// only in GNU/ustar headers; a PAX `size` record applied to the next entry and dropped at a
/// PAX global header; GNU sparse extension blocks), and fails the read that would deliver a
/// metadata header body over [`MAX_HEADER_BODY`] — before the `tar` crate could buffer it.
/// Stops looking at the first all-zero block (the end of the archive as the `tar` crate reads
/// it). [`HeaderGuard::data_start`] tells where the last entry the `tar` crate will return
/// has its data, so the reader can check the two agree.
pub(crate) struct HeaderGuard<R> {
    inner: R,
    /// Stream offset of the next byte read.
    pos: u64,
    /// Stream offset of the next header block.
    next: u64,
    block: Box<[u8; 512]>,
    have: usize,
    /// The next block at `next` is a GNU sparse extension block; data follows them.
    sparse_ext: bool,
    pending_data: u64,
    /// A PAX body being collected (its header's size), to find a `size` record.
    pax: Option<(u64, Vec<u8>)>,
    /// The `size` a PAX header gave the next entry.
    pax_size: Option<u64>,
    done: bool,
    data_start: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R> HeaderGuard<R> {
    pub(crate) fn new(inner: R) -> Self {
        HeaderGuard {
            inner,
            pos: 0,
            next: 0,
            block: Box::new([0; 512]),
            have: 0,
            sparse_ext: false,
            pending_data: 0,
            pax: None,
            pax_size: None,
            done: false,
            data_start: Default::default(),
        }
    }

    /// Where the data of the last entry the `tar` crate returns starts (updated as its header
    /// passes).
    pub(crate) fn data_start(&self) -> std::rc::Rc<std::cell::Cell<u64>> {
        self.data_start.clone()
    }

    fn header(&mut self) -> std::io::Result<()> {
        let at = self.next;
        if self.sparse_ext {
            // `GnuExtSparseHeader::isextended`, as the `tar` crate tests it.
            let extended = self.block[504] == 1;
            self.sparse_ext = extended;
            self.next += 512;
            if !extended {
                self.next += std::mem::take(&mut self.pending_data);
            }
            return Ok(());
        }
        if self.block.iter().all(|&x| x == 0) {
            self.done = true;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.block[..]);
        let kind = h.entry_type();
        let recognised = h.as_gnu().is_some() || h.as_ustar().is_some();
        let extension = recognised
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        let mut size = h.entry_size()?;
        if !extension {
            // This header is an entry the `tar` crate returns: a pending PAX record is used
            // (except by a global header, which still consumes it).
            let pax = self.pax_size.take();
            if !kind.is_pax_global_extensions() {
                size = pax.unwrap_or(size);
            }
        }
        let meta = extension || kind.is_pax_global_extensions();
        if meta && size > MAX_HEADER_BODY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "tar header at offset {at}: a {} body of {size} bytes is larger than the {MAX_HEADER_BODY}-byte limit",
                    if kind.is_gnu_longname() {
                        "GNU long name"
                    } else if kind.is_gnu_longlink() {
                        "GNU long link"
                    } else if kind.is_pax_local_extensions() {
                        "PAX extended header"
                    } else {
                        "PAX global header"
                    }
                ),
            ));
        }
        let padded = size
            .checked_next_multiple_of(512)
            .ok_or_else(|| std::io::Error::other("tar entry size overflows"))?;
        if kind.is_pax_local_extensions() && recognised {
            self.pax = Some((size, Vec::new()));
        }
        self.next += 512;
        if !extension {
            self.data_start.set(self.next);
        }
        if kind.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended()) {
            self.sparse_ext = true;
            self.pending_data = padded;
        } else {
            self.next = self
                .next
                .checked_add(padded)
                .ok_or_else(|| std::io::Error::other("tar entry size overflows"))?;
        }
        Ok(())
    }

    /// Collects PAX body bytes at stream offset `abs` and reads its `size` record when complete.
    fn pax_bytes(&mut self, abs: u64, data: &[u8]) {
        let Some((size, body)) = self.pax.as_mut() else {
            return;
        };
        let body_start = self.next - size.div_ceil(512) * 512;
        if abs < body_start || abs >= body_start + *size {
            return;
        }
        let want = (*size - body.len() as u64) as usize;
        body.extend_from_slice(&data[..data.len().min(want)]);
        if body.len() as u64 == *size {
            let body = std::mem::take(body);
            self.pax = None;
            self.pax_size = pax_size(&body);
        }
    }
}

/// The `size` record of a PAX extended header body, read as the `tar` crate reads it (records
/// split at newlines; the first malformed record ends the search).
fn pax_size(body: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(body) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut i = 0;
        while i < n && !self.done {
            let abs = self.pos + i as u64;
            if abs < self.next {
                let skip = ((self.next - abs) as usize).min(n - i);
                if self.pax.is_some() {
                    let data = buf[i..i + skip].to_vec();
                    self.pax_bytes(abs, &data);
                }
                i += skip;
                continue;
            }
            let take = (512 - self.have).min(n - i);
            self.block[self.have..self.have + take].copy_from_slice(&buf[i..i + take]);
            self.have += take;
            i += take;
            if self.have == 512 {
                self.have = 0;
                self.header()?;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads every entry of a tar stream. `limit` bounds each entry's declared size (a hostile
/// layer cannot claim more data than the stream has); at most `max_entries` entries, metadata
/// header bodies of at most [`MAX_HEADER_BODY`], names and xattr values of at most [`MAX_NAME`]
/// and [`MAX_METADATA`] of them in all are accepted, so a small hostile layer cannot make the
/// index (or the memory holding it) large.
///
/// Some writers (umoci 0.4's `insert`, seen here) end the stream right after the last file's
/// data, without its block padding and the end-of-archive blocks. That is accepted when every
/// entry's data lies inside the stream; a stream cut inside an entry's data is an error.
pub fn read_entries(
    reader: impl Read,
    limit: u64,
    max_entries: usize,
) -> Result<Vec<Entry>, String> {
    let guard = HeaderGuard::new(reader);
    let data_start = guard.data_start();
    let mut padded = PaddedAtEof {
        inner: guard,
        real: 0,
        zeros: 0,
    };
    let entries = read_entries_strict(&mut padded, limit, max_entries, &data_start)?;
    if let Some(e) = entries.iter().find(|e| e.offset + e.size > padded.real) {
        return Err(format!(
            "tar stream truncated: entry {:?} needs bytes up to {} but the stream has {}",
            e.path,
            e.offset + e.size,
            padded.real
        ));
    }
    Ok(entries)
}

/// Yields zeros (up to one padding block and the end-of-archive blocks) after `inner` ends,
/// counting the real bytes.
struct PaddedAtEof<R> {
    inner: R,
    real: u64,
    zeros: u64,
}

impl<R: Read> Read for PaddedAtEof<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.real += n as u64;
            return Ok(n);
        }
        let n = buf.len().min((3 * 512 - self.zeros) as usize);
        buf[..n].fill(0);
        self.zeros += n as u64;
        Ok(n)
    }
}

fn read_entries_strict(
    reader: impl Read,
    limit: u64,
    max_entries: usize,
    data_start: &std::cell::Cell<u64>,
) -> Result<Vec<Entry>, String> {
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let mut metadata = 0u64;
    let entries = archive.entries().map_err(|e| e.to_string())?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading tar entry: {e}"))?;
        if entry.raw_file_position() != data_start.get() {
            return Err(format!(
                "tar structure not understood at offset {} (header bounds cannot be checked)",
                entry.raw_file_position()
            ));
        }
        if out.len() >= max_entries {
            return Err(format!(
                "more than {max_entries} entries ([index] max_entries)"
            ));
        }
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if raw_path.len() > MAX_NAME {
            return Err(format!(
                "entry name of {} bytes (starting {:?}) is longer than {MAX_NAME}",
                raw_path.len(),
                raw_path.chars().take(64).collect::<String>()
            ));
        }
        let path = clean_path(&raw_path)?;
        let header = entry.header();
        let size = entry.size();
        if size > limit {
            return Err(format!(
                "entry {raw_path:?} claims {size} bytes, more than the layer holds"
            ));
        }
        let link = || -> Result<String, String> {
            let l = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            Ok(l)
        };
        let device = |h: &tar::Header| -> (u32, u32) {
            (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            )
        };
        // eStargz artifacts are not image content; hidden as stargz-snapshotter hides them,
        // so a streamed index and a TOC-built one show the same tree.
        if [TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&path.as_str()) {
            continue;
        }
        let (path, kind) = if let Some(marker) = whiteout(&path)? {
            marker
        } else {
            let et = header.entry_type();
            let kind = match et {
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink { target: link()? },
                tar::EntryType::Link => Kind::Hardlink {
                    target: clean_path(&link()?)?,
                },
                tar::EntryType::Char => {
                    let (major, minor) = device(header);
                    Kind::Char { major, minor }
                }
                tar::EntryType::Block => {
                    let (major, minor) = device(header);
                    Kind::Block { major, minor }
                }
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::XGlobalHeader => continue,
                other => {
                    return Err(format!(
                        "entry {raw_path:?} has unsupported tar type {other:?}"
                    ))
                }
            };
            (path, kind)
        };
        let mut xattrs = BTreeMap::new();
        let mut pax_mtime = None;
        if let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? {
            for ext in exts {
                let ext = ext.map_err(|e| e.to_string())?;
                let key = ext.key().ok();
                if let Some(name) = key.and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
                } else if key == Some("mtime") {
                    pax_mtime = ext.value().ok().and_then(pax_time);
                }
            }
        }
        let link_len = match &kind {
            Kind::Symlink { target } | Kind::Hardlink { target } => target.len(),
            _ => 0,
        };
        let xattr_len: usize = xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        if link_len > MAX_NAME || xattrs.values().any(|v| v.len() > MAX_NAME) {
            return Err(format!(
                "entry {raw_path:?} has a link target or xattr value longer than {MAX_NAME} bytes"
            ));
        }
        metadata += (raw_path.len() + link_len + xattr_len) as u64;
        if metadata > MAX_METADATA {
            return Err(format!(
                "entry names, link targets and xattrs exceed {MAX_METADATA} bytes in all"
            ));
        }
        let header = entry.header();
        let (mtime, mtime_nsec) = pax_mtime.unwrap_or((header.mtime().unwrap_or(0) as i64, 0));
        out.push(Entry {
            mode: header.mode().map_err(|e| e.to_string())? & 0o7777,
            // Blank numeric fields read as 0, as Go's archive/tar (containerd) reads them.
            uid: header.uid().unwrap_or(0) as u32,
            gid: header.gid().unwrap_or(0) as u32,
            mtime,
            mtime_nsec,
            size: if kind == Kind::File { size } else { 0 },
            offset: entry.raw_file_position(),
            path,
            kind,
            xattrs,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[test]
fn pax_times() {
    assert_eq!(
        pax_time("1700000000.123456789"),
        Some((1_700_000_000, 123_456_789))
    );
    assert_eq!(pax_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
    assert_eq!(pax_time("1700000000"), Some((1_700_000_000, 0)));
    assert_eq!(pax_time("-1.25"), Some((-2, 750_000_000)));
    assert_eq!(pax_time("x"), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_like_containerd() {
        assert_eq!(clean_path("./etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(clean_path("/abs/x").unwrap(), "abs/x");
        assert_eq!(clean_path("../../etc/shadow").unwrap(), "etc/shadow");
        assert_eq!(clean_path("a/b/../../../c").unwrap(), "c");
        assert_eq!(clean_path("./").unwrap(), "");
        assert!(clean_path("a\0b").is_err());
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    fn append(tar: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }

    #[test]
    fn the_guard_follows_long_names_pax_sizes_and_global_headers() {
        // A long name, a PAX header whose `size` record gives the next file 2000 bytes (its
        // own header says 10), a global header, and files after them.
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("dir/{}", "n".repeat(300));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut tar = b.into_inner().unwrap();
        tar.truncate(tar.len() - 1024);
        let pax = b"16 size=2000000\n";
        let mut x = header("pax", tar::EntryType::XHeader, pax.len() as u64);
        x.set_cksum();
        append(&mut tar, &x, pax);
        append(
            &mut tar,
            &header("big", tar::EntryType::Regular, 10),
            &vec![7; 2_000_000],
        );
        let g = b"9 a=bcd\n";
        append(
            &mut tar,
            &header("g", tar::EntryType::XGlobalHeader, g.len() as u64),
            g,
        );
        append(
            &mut tar,
            &header("after", tar::EntryType::Regular, 5),
            b"hello",
        );
        tar.extend_from_slice(&[0; 1024]);
        let entries = read_entries(&tar[..], u64::MAX, 100).unwrap();
        let names: Vec<_> = entries.iter().map(|e| (e.path.as_str(), e.size)).collect();
        assert_eq!(
            names,
            [(long.as_str(), 3), ("big", 2_000_000), ("after", 5)]
        );

        // The same long name with a 2 MiB body is refused before it is read.
        let mut bomb = Vec::new();
        append(
            &mut bomb,
            &header("././@LongLink", tar::EntryType::GNULongName, 2 << 20),
            &vec![b'a'; 2 << 20],
        );
        let err = read_entries(&bomb[..], u64::MAX, 100).unwrap_err();
        assert!(
            err.contains("GNU long name") && err.contains("limit"),
            "{err}"
        );
    }
}
