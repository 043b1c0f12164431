//! How results read for people: sizes in binary units, aligned tables, and the text of each
//! command's report as `Display` impls over the library's own report types (an image pulled,
//! the images stored, a long directory listing, an index built or verified, the cache's
//! state). The binary only prints these; `--json` prints the same types serialized.
//!
//! Rendering does no I/O: whatever a report shows is gathered before it is displayed.

use std::fmt;

use crate::fs::{IndexReport, VerifyReport};
use crate::image::ImageRecord;
use crate::status::CacheReport;
use crate::tree::{FileType, Node};

/// `bytes` in B, KiB, MiB, GiB or TiB, one decimal above bytes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An aligned table: every column as wide as its widest cell, the columns in `right`
/// right-aligned (sizes and counts), two spaces between columns, no trailing blanks.
pub struct Table<'a> {
    pub header: &'a [&'a str],
    pub rows: Vec<Vec<String>>,
    pub right: &'a [usize],
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = |c: usize| {
            let cells = self.rows.iter().map(|r| r[c].chars().count());
            cells.chain([self.header[c].len()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (c, cell) in cells.enumerate() {
                let w = widths[c];
                if c > 0 {
                    out.push_str("  ");
                }
                out.push_str(&if self.right.contains(&c) {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                });
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(&mut self.header.iter().copied())?;
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

/// What `stratafs pull` tells about the image it stored: digests, platform, layers with their
/// ChainIDs, and where its indexes will come from. `adopted`: layers that adopted an unbound
/// referrer index during the pull.
pub struct Pulled<'a> {
    pub image: &'a ImageRecord,
    pub adopted: usize,
}

impl fmt::Display for Pulled<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.image;
        writeln!(f, "{}", r.name)?;
        writeln!(f, "  digest:   {}", r.target.digest)?;
        if r.manifest.digest != r.target.digest {
            writeln!(f, "  manifest: {}", r.manifest.digest)?;
        }
        writeln!(f, "  platform: {}", r.platform)?;
        writeln!(f, "  config:   {}", r.config.digest)?;
        let (n, size) = (r.layers.len(), human_size(r.layers_size()));
        writeln!(f, "  layers:   {n} ({size} compressed)")?;
        for (i, l) in r.layers.iter().enumerate() {
            writeln!(
                f,
                "    {:>2}  {}  {:>10}",
                i + 1,
                l.digest,
                human_size(l.size)
            )?;
            writeln!(f, "        chain {}", l.chain_id)?;
        }
        let pinned = r
            .layers
            .iter()
            .filter(|l| crate::fs::pinned_index(l).is_some_and(|p| p.1));
        let pinned = pinned.count();
        if pinned > 0 {
            writeln!(f, "  stratafs indexes pinned by the manifest for {pinned} of {n} layers (fetched on first read)")?;
        }
        if self.adopted > 0 {
            let adopted = self.adopted;
            writeln!(f, "  unbound referrer indexes adopted for {adopted} of {n} layers (not vouched for by the image)")?;
        }
        Ok(())
    }
}

/// `stratafs images`: one row per stored image.
pub fn images(images: &[ImageRecord]) -> Table<'static> {
    let row = |i: &ImageRecord| {
        vec![
            i.name.clone(),
            i.target.digest.as_ref().chars().take(19).collect(),
            i.platform.to_string(),
            human_size(i.layers_size()),
            i.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]
    };
    Table {
        header: &["NAME", "DIGEST", "PLATFORM", "SIZE", "UPDATED"],
        rows: images.iter().map(row).collect(),
        right: &[3],
    }
}

/// One line of `ls -l`: type and mode, links, owner, size (or device numbers), time, name
/// and a symlink's target.
pub struct LongLine<'a> {
    pub name: &'a str,
    pub node: &'a Node,
}

impl fmt::Display for LongLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.node;
        let (kind, size, target) = match &n.file_type {
            FileType::File => ('-', n.size.to_string(), String::new()),
            FileType::Dir => ('d', n.size.to_string(), String::new()),
            FileType::Symlink(t) => ('l', n.size.to_string(), format!(" -> {t}")),
            FileType::Char(ma, mi) => ('c', format!("{ma}, {mi}"), String::new()),
            FileType::Block(ma, mi) => ('b', format!("{ma}, {mi}"), String::new()),
            FileType::Fifo => ('p', "0".into(), String::new()),
        };
        let when = chrono::DateTime::from_timestamp(n.mtime, 0).unwrap_or_default();
        write!(
            f,
            "{kind}{} {:>3} {:>5} {:>5} {size:>10} {} {}{target}",
            crate::tree::mode_string(n.mode),
            n.nlink,
            n.uid,
            n.gid,
            when.format("%Y-%m-%d %H:%M"),
            self.name
        )
    }
}

impl fmt::Display for IndexReport {
    /// One line of `stratafs index build`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.built {
            let rate = self.blob_size as f64 / self.seconds.max(1e-9) / 1e6;
            format!("built in {:.2}s ({rate:.0} MB/s compressed)", self.seconds)
        } else {
            "already indexed".into()
        };
        write!(
            f,
            "{}  {:>6} entries  {:>5} spans  {:>4} checkpoints  {:>10} -> {:>10} bytes  {how}",
            self.blob, self.entries, self.spans, self.checkpoints, self.blob_size, self.size
        )
    }
}

impl fmt::Display for VerifyReport {
    /// One line of `stratafs index verify`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {:?} index matches the layer: {} entries, {} files ({} bytes) compared",
            self.blob, self.format, self.entries, self.files, self.bytes
        )
    }
}

impl fmt::Display for CacheReport {
    /// `stratafs cache stats`: totals, a table of layers (with fetch rates when the report
    /// has them), and per mount what its layers fetched and hold.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let human = human_size;
        let cap = human(self.max_size);
        writeln!(
            f,
            "cache: {} chunks, {} (cap {cap})",
            self.chunks,
            human(self.bytes)
        )?;
        let rate = |digest: &str| {
            let r = self.rates.as_ref()?.get(digest)?;
            Some(format!("{}/s", human(*r as u64)))
        };
        let row = |r: &crate::status::LayerStatus| {
            let state = match (r.indexed, r.complete) {
                (false, _) => "not indexed",
                (_, true) => "complete",
                _ => "partial",
            };
            let mut row = vec![
                r.digest.clone(),
                format!("{}/{}", r.cached_spans, r.spans),
                human(r.cached_bytes),
                human(r.size),
                human(r.fetched_bytes),
            ];
            if self.rates.is_some() {
                row.push(rate(&r.digest).unwrap_or_default());
            }
            row.push(state.to_string());
            row
        };
        let (header, right): (&[&str], &[usize]) = match self.rates {
            Some(_) => (
                &[
                    "LAYER", "SPANS", "CACHED", "SIZE", "FETCHED", "RATE", "STATE",
                ],
                &[1, 2, 3, 4, 5],
            ),
            None => (
                &["LAYER", "SPANS", "CACHED", "SIZE", "FETCHED", "STATE"],
                &[1, 2, 3, 4],
            ),
        };
        let rows = self.layers.iter().map(row).collect();
        write!(
            f,
            "{}",
            Table {
                header,
                rows,
                right
            }
        )?;
        for m in &self.mounts {
            let in_flight = m.in_flight.map(|n| format!(", {n} fetches in flight"));
            let (at, image, pid) = (m.mountpoint.display(), &m.image, m.pid);
            let in_flight = in_flight.unwrap_or_default();
            writeln!(
                f,
                "\nmounted at {at}: {image} (serving pid {pid}{in_flight})"
            )?;
            for layer in &m.layers {
                let Some(r) = self.layers.iter().find(|r| r.digest == *layer) else {
                    continue;
                };
                let speed = rate(layer).map(|r| format!(", {r}")).unwrap_or_default();
                let (fetched, blob) = (human(r.fetched_bytes), human(r.blob_size));
                let (cached, size) = (human(r.cached_bytes), human(r.size));
                writeln!(f, "  {layer}  fetched {fetched} of {blob} compressed{speed}; {cached} of {size} cached")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let t = Table {
            header: &["NAME", "SIZE", "NOTE"],
            rows: vec![
                vec!["a".into(), "10 B".into(), String::new()],
                vec!["longer".into(), "1.0 KiB".into(), "x".into()],
            ],
            right: &[1],
        };
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME       SIZE  NOTE");
        assert_eq!(lines[1], "a          10 B");
        assert_eq!(lines[2], "longer  1.0 KiB  x");
    }
}
