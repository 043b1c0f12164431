//! Tests of eStargz indexing against layers made by a small eStargz writer.

use std::io::Write;
use std::sync::Arc;

use serde_json::json;

use std::collections::BTreeMap;

use base64::Engine;

use super::*;
use crate::cache::{Cache, DiskChunks};
use crate::layer::reader::LayerReader;
use crate::layer::toc::{map_toc, Frames, Mapped, Toc, Unusable};
use crate::layer::{Entry, Fetch, Kind, Span};
use crate::source::{Faults, FaultySource, FileSource};

const CHUNK: usize = 4096;

enum Body<'a> {
    File(&'a [u8]),
    Dir,
    Symlink(&'a str),
    Hardlink(&'a str),
    Char(u32, u32),
    Fifo,
}

/// A minimal eStargz writer: a new gzip member for every chunk of every file (the tar
/// header goes at the end of the previous member), then the TOC member and the footer.
#[derive(Default)]
struct Writer {
    blob: Vec<u8>,
    tar: Vec<u8>,
    gz: Option<flate2::write::GzEncoder<Vec<u8>>>,
    toc: Vec<serde_json::Value>,
    /// Bytes of a file per chunk (`None`: [`CHUNK`]).
    chunk: Option<usize>,
}

impl Writer {
    fn write(&mut self, data: &[u8]) {
        self.tar.extend_from_slice(data);
        let gz = self.gz.get_or_insert_with(|| {
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default())
        });
        gz.write_all(data).unwrap();
    }

    fn close(&mut self) {
        if let Some(gz) = self.gz.take() {
            self.blob.extend(gz.finish().unwrap());
        }
    }

    fn header(name: &str, h: &mut ::tar::Header, xattrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        let keys: Vec<String> = xattrs
            .iter()
            .map(|(k, _)| format!("SCHILY.xattr.{k}"))
            .collect();
        if !xattrs.is_empty() {
            let pax = keys.iter().zip(xattrs).map(|(k, (_, v))| (k.as_str(), *v));
            b.append_pax_extensions(pax).unwrap();
        }
        b.append_data(h, name, std::io::empty()).unwrap();
        b.get_ref().clone()
    }

    fn add(&mut self, name: &str, body: Body<'_>, xattrs: &[(&str, &[u8])]) {
        use ::tar::EntryType as T;
        let mut h = ::tar::Header::new_ustar();
        let (ty, kind, data) = match body {
            Body::File(d) => (T::Regular, "reg", d),
            Body::Dir => (T::Directory, "dir", &[][..]),
            Body::Symlink(t) | Body::Hardlink(t) => {
                h.set_link_name(t).unwrap();
                let hard = matches!(body, Body::Hardlink(_));
                let (ty, kind) = if hard {
                    (T::Link, "hardlink")
                } else {
                    (T::Symlink, "symlink")
                };
                (ty, kind, &[][..])
            }
            Body::Char(major, minor) => {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
                (T::Char, "char", &[][..])
            }
            Body::Fifo => (T::Fifo, "fifo", &[][..]),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        let header = Self::header(name, &mut h, xattrs);
        self.write(&header);
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut entry = json!({
            "name": name, "type": kind, "size": data.len(), "modtime": "2023-11-14T22:13:20Z",
            "mode": 0o4755, "uid": 1000, "gid": 100,
            "xattrs": xattrs.iter().map(|(k, v)| (k.to_string(), b64.encode(v))).collect::<BTreeMap<_, _>>(),
        });
        if let Body::Char(major, minor) = body {
            (entry["devMajor"], entry["devMinor"]) = (json!(major), json!(minor));
        }
        if let Some(link) = h.link_name().unwrap() {
            entry["linkName"] = json!(link.to_string_lossy());
        }
        if data.is_empty() {
            self.toc.push(entry);
            return;
        }
        entry["digest"] = json!(crate::digest::sha256(data).to_string());
        let size = self.chunk.unwrap_or(CHUNK);
        for (i, chunk) in data.chunks(size).enumerate() {
            self.close();
            if i > 0 {
                entry = json!({"name": name, "type": "chunk"});
            }
            entry["offset"] = json!(self.blob.len());
            entry["chunkOffset"] = json!(i * size);
            if chunk.len() == size {
                entry["chunkSize"] = json!(size); // omitted for a last, partial chunk
            }
            entry["chunkDigest"] = json!(crate::digest::sha256(chunk).to_string());
            self.write(chunk);
            self.toc.push(entry.take());
        }
        self.write(&vec![0; (512 - data.len() % 512) % 512]);
    }

    /// (blob, uncompressed tar, TOC JSON, TOC offset).
    fn finish(mut self) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64) {
        self.close();
        let toc_offset = self.blob.len() as u64;
        let toc = serde_json::to_vec(&json!({"version": 1, "entries": self.toc})).unwrap();
        let mut h = ::tar::Header::new_ustar();
        h.set_size(toc.len() as u64);
        h.set_mode(0o644);
        self.write(&Self::header(TOC_NAME, &mut h, &[]));
        self.write(&toc);
        self.write(&vec![0; (512 - toc.len() % 512) % 512 + 1024]);
        self.close();
        self.blob.extend(footer(toc_offset));
        (self.blob, self.tar, toc, toc_offset)
    }
}

fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    f.extend(format!("{toc_offset:016x}STARGZ").bytes());
    f.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]); // empty stored block, trailer
    f
}

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

struct Layer {
    blob: Vec<u8>,
    tar: Vec<u8>,
    toc: Vec<u8>,
    toc_offset: u64,
    files: Vec<(String, Vec<u8>)>,
    digest: Digest,
    diff_id: Digest,
    dir: tempfile::TempDir,
}

impl Layer {
    fn source(&self) -> Arc<FaultySource<FileSource>> {
        let path = self.dir.path().join("blob");
        std::fs::write(&path, &self.blob).unwrap();
        Arc::new(FaultySource::new(
            FileSource::open(path, self.digest.clone()).unwrap(),
        ))
    }

    async fn index(&self, source: &dyn BlobSource) -> LayerIndex {
        let toc = crate::digest::sha256(&self.toc);
        estargz_index(
            source,
            &self.digest,
            &self.diff_id,
            Some(&toc),
            &Default::default(),
        )
        .await
        .unwrap()
        .expect("an eStargz layer")
    }

    /// A reader over a fresh in-memory cache and the layer's chunk directory.
    fn reader(&self, index: &LayerIndex, source: Arc<dyn BlobSource>) -> LayerReader {
        let chunks = Arc::new(DiskChunks::open(self.dir.path()).unwrap());
        let cache = Arc::new(Cache::new(chunks, 64));
        LayerReader::new(Arc::new(index.clone()), source, cache)
    }
}

fn sample() -> Layer {
    let mut w = Writer::default();
    let mut files = vec![
        ("etc/hosts".to_string(), b"127.0.0.1 localhost\n".to_vec()),
        ("usr/bin/big".to_string(), noise(10_000, 1)),
    ];
    w.add("etc/", Body::Dir, &[]);
    w.add(&files[0].0, Body::File(&files[0].1), &[]);
    w.add(&files[1].0, Body::File(&files[1].1), &[]);
    w.add(PREFETCH_LANDMARK, Body::File(&[0xf]), &[]);
    w.add("etc/empty", Body::File(b""), &[]);
    w.add("bin", Body::Symlink("usr/bin"), &[]);
    w.add("usr/bin/big-link", Body::Hardlink("usr/bin/big"), &[]);
    w.add("dev/null", Body::Char(1, 3), &[]);
    w.add("run/fifo", Body::Fifo, &[]);
    w.add("var/.wh.gone", Body::File(b""), &[]);
    w.add("var/cache/.wh..wh..opq", Body::File(b""), &[]);
    w.add("etc/xattr", Body::File(b"x"), &[("user.comment", b"hello")]);
    for i in 0..12 {
        files.push((format!("small/f{i}"), noise(300 + i * 50, i as u64 + 10)));
        let (name, data) = files.last().unwrap();
        w.add(name, Body::File(data), &[]);
    }
    files.push(("usr/lib/tail".into(), noise(5000, 99)));
    w.add("usr/lib/tail", Body::File(&files.last().unwrap().1), &[]);
    files.push(("etc/xattr".into(), b"x".to_vec()));
    Layer::of(w, files)
}

impl Layer {
    /// The layer `w` wrote, holding `files`.
    fn of(w: Writer, files: Vec<(String, Vec<u8>)>) -> Layer {
        let (blob, tar, toc, toc_offset) = w.finish();
        Layer {
            digest: crate::digest::sha256(&blob),
            diff_id: crate::digest::sha256(&tar),
            blob,
            tar,
            toc,
            toc_offset,
            files,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

fn entry<'a>(index: &'a LayerIndex, path: &str) -> &'a Entry {
    index.entries.iter().find(|e| e.path == path).unwrap()
}

#[tokio::test]
async fn footer_and_toc_only_then_every_file_reads_back() {
    let layer = sample();
    let source = layer.source();
    let index = layer.index(&*source).await;
    let toc_member = layer.blob.len() as u64 - FOOTER_SIZE - layer.toc_offset;
    assert_eq!(
        source.counts(),
        (2, FOOTER_SIZE + toc_member),
        "footer + TOC only"
    );
    assert_eq!(index.format, IndexFormat::Estargz);
    assert!(index.random_access() && index.checkpoints.is_empty());
    assert_eq!(index.spans.len(), 3 + 1 + 12 + 2 + 1, "one span per chunk");
    let total: usize = layer.files.iter().map(|f| f.1.len()).sum();
    assert_eq!(index.size, total as u64);
    assert_eq!(
        index.prefetch_end,
        Some(20 + 10_000),
        "landmark after hosts and big"
    );
    assert_eq!(entry(&index, "var/gone").kind, Kind::Whiteout);
    assert_eq!(entry(&index, "var/cache").kind, Kind::Opaque);
    assert_eq!(entry(&index, "etc/xattr").xattrs["user.comment"], b"hello");
    let hard = Kind::Hardlink {
        target: "usr/bin/big".into(),
    };
    assert_eq!(entry(&index, "usr/bin/big-link").kind, hard);

    // Same metadata as the streamed tar (which also lists the landmark and the TOC).
    let streamed = crate::layer::build_index(
        &layer.blob[..],
        Compression::Gzip,
        &layer.digest,
        &layer.diff_id,
        layer.blob.len() as u64,
        64 * 1024,
        &mut |_, _| Ok(()),
        &mut std::io::sink(),
        &crate::layer::Limits::default(),
    )
    .unwrap();
    let hidden = [PREFETCH_LANDMARK, TOC_NAME];
    let mut streamed: Vec<Entry> = streamed
        .entries
        .into_iter()
        .filter(|e| !hidden.contains(&e.path.as_str()))
        .collect();
    let mut ours = index.entries.clone();
    for e in streamed.iter_mut().chain(&mut ours) {
        e.offset = 0;
    }
    assert_eq!(ours, streamed);

    let reader = layer.reader(&index, source.clone());
    for (path, data) in &layer.files {
        let e = entry(&index, path);
        assert_eq!(e.size, data.len() as u64, "{path}");
        assert!(
            reader.read(e.offset, e.size).await.unwrap() == *data,
            "{path}"
        );
    }
    // A read across the chunk boundaries of a file.
    let big = entry(&index, "usr/bin/big");
    let got = reader.read(big.offset + 4000, 5000).await.unwrap();
    assert!(got[..] == layer.files[1].1[4000..9000]);
}

#[tokio::test]
async fn small_files_are_fetched_with_one_coalesced_read() {
    let layer = sample();
    let source = layer.source();
    let index = layer.index(&*source).await;
    let reader = layer.reader(&index, source.clone());
    let (first, last) = (entry(&index, "small/f0"), entry(&index, "small/f11"));
    let before = source.counts();
    let all = reader
        .read(first.offset, last.offset + last.size - first.offset)
        .await
        .unwrap();
    let (reads, bytes) = source.counts();
    assert_eq!(reads - before.0, 1, "twelve files, one range read");
    // From f0's chunk on (the chunks after f11 may come along), nothing before it.
    let from = match index.spans[index.span_at(first.offset).unwrap()].fetch {
        Fetch::Member { in_start, .. } => in_start,
        _ => panic!("not a member span"),
    };
    assert!(bytes - before.1 <= layer.toc_offset - from);
    let expected: Vec<u8> = layer.files[2..14]
        .iter()
        .flat_map(|f| f.1.clone())
        .collect();
    assert!(all == expected);
    for (path, data) in &layer.files[2..14] {
        let e = entry(&index, path);
        assert!(reader.read(e.offset, e.size).await.unwrap() == *data);
    }
    assert_eq!(source.counts().0, reads, "then served from the cache");
}

#[tokio::test]
async fn a_miss_fetches_the_small_chunks_after_it_too() {
    let layer = sample();
    let source = layer.source();
    let index = layer.index(&*source).await;
    let reader = layer.reader(&index, source.clone());
    let before = source.counts();
    // One small file read, as `import` reads one module: its directory's next files (and the
    // file after them, to the end of this small layer) come with the same range request.
    let f0 = entry(&index, "small/f0");
    assert!(reader.read(f0.offset, f0.size).await.unwrap() == layer.files[2].1);
    assert_eq!(source.counts().0 - before.0, 1);
    for (path, data) in &layer.files[2..15] {
        let e = entry(&index, path);
        assert!(
            reader.read(e.offset, e.size).await.unwrap() == *data,
            "{path}"
        );
    }
    assert_eq!(
        source.counts().0 - before.0,
        1,
        "the later files came with the first"
    );
}

#[tokio::test]
async fn a_walk_fetch_brings_a_few_next_files_and_a_prefetch_its_own_only() {
    // Forty modules of 2000 random bytes (a chunk and about 2 KB compressed each): 80 KB in
    // all, more than a walk's 32 KiB.
    let mut w = Writer::default();
    let mut files = Vec::new();
    for i in 0..40u64 {
        files.push((format!("pkg/__pycache__/m{i}.pyc"), noise(2000, 500 + i)));
        let (name, data) = files.last().unwrap();
        w.add(name, Body::File(data), &[]);
    }
    let layer = Layer::of(w, files);
    let source = layer.source();
    let index = layer.index(&*source).await;
    let m0 = entry(&index, "pkg/__pycache__/m0.pyc");
    let cached = |reader: &LayerReader| {
        layer
            .files
            .iter()
            .take_while(|(path, _)| {
                let e = entry(&index, path);
                reader.is_cached(e.offset, e.size)
            })
            .count()
    };

    let walk = layer.reader(&index, source.clone());
    let before = source.counts();
    walk.prefetch_walk(m0.offset, m0.size).await.unwrap();
    let (reads, bytes) = source.counts();
    assert_eq!(reads - before.0, 1, "one request");
    let fetched = bytes - before.1;
    assert!(
        (32 << 10..(32 << 10) + 2 * 2200).contains(&fetched),
        "at least 32 KiB, and not a file more than that: {fetched} bytes"
    );
    let near = cached(&walk);
    assert!((14..=17).contains(&near), "m0 and its next files: {near}");
    assert!(!{
        let e = entry(&index, "pkg/__pycache__/m39.pyc");
        walk.is_cached(e.offset, e.size)
    });
    for (path, data) in &layer.files[..near] {
        let e = entry(&index, path);
        assert!(
            walk.read(e.offset, e.size).await.unwrap() == *data,
            "{path}"
        );
    }
    assert_eq!(
        source.counts().0,
        reads,
        "served from what the walk fetched"
    );

    // A profile's prefetch reads exactly what it names (a cache of its own).
    let chunks = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::new(
        Arc::new(DiskChunks::open(chunks.path()).unwrap()),
        64,
    ));
    let exact = LayerReader::new(Arc::new(index.clone()), source.clone(), cache);
    exact.prefetch(m0.offset, m0.size).await.unwrap();
    assert_eq!(cached(&exact), 1, "m0 alone");
}

#[tokio::test]
async fn a_walk_fetch_is_padded_with_small_next_files_but_not_a_large_one() {
    // Six small modules (about 2 KB of the blob each), a 60 KB one that does not compress
    // in one chunk (as a large file's 4 MiB chunks of ctr-remote's), then more small ones.
    let mut w = Writer {
        chunk: Some(64 << 10),
        ..Writer::default()
    };
    let mut files = Vec::new();
    for (i, len) in [2000; 6]
        .into_iter()
        .chain([60_000])
        .chain([2000; 10])
        .enumerate()
    {
        files.push((
            format!("pkg/__pycache__/m{i:02}.pyc"),
            noise(len, 700 + i as u64),
        ));
        let (name, data) = files.last().unwrap();
        w.add(name, Body::File(data), &[]);
    }
    let layer = Layer::of(w, files);
    let source = layer.source();
    let index = layer.index(&*source).await;
    let is_cached = |reader: &LayerReader, path: &str| {
        let e = entry(&index, path);
        reader.is_cached(e.offset, e.size)
    };

    // From the first module: its five next ones come along (the fetch short of 32 KiB), the
    // large one does not (it would take the fetch past 48 KiB).
    let walk = layer.reader(&index, source.clone());
    let before = source.counts();
    let m00 = entry(&index, "pkg/__pycache__/m00.pyc");
    walk.prefetch_walk(m00.offset, m00.size).await.unwrap();
    let (reads, bytes) = source.counts();
    assert_eq!(reads - before.0, 1, "one request");
    assert!(bytes - before.1 < 32 << 10, "{} bytes", bytes - before.1);
    assert!(is_cached(&walk, "pkg/__pycache__/m05.pyc"));
    assert!(
        !is_cached(&walk, "pkg/__pycache__/m06.pyc"),
        "the large module came along"
    );

    // Asked for, the large module is fetched alone (it carries the minimum itself).
    let before = source.counts();
    let m06 = entry(&index, "pkg/__pycache__/m06.pyc");
    walk.prefetch_walk(m06.offset, m06.size).await.unwrap();
    let (reads, bytes) = source.counts();
    assert_eq!(reads - before.0, 1, "one request");
    assert!(
        (60_000..62_000).contains(&(bytes - before.1)),
        "{} bytes",
        bytes - before.1
    );
    assert!(is_cached(&walk, "pkg/__pycache__/m06.pyc"));
    assert!(!is_cached(&walk, "pkg/__pycache__/m07.pyc"));
    for (path, data) in &layer.files {
        let e = entry(&index, path);
        assert!(
            walk.read(e.offset, e.size).await.unwrap() == *data,
            "{path}"
        );
    }
}

#[tokio::test]
async fn padding_stops_at_one_and_a_half_times_the_minimum() {
    // A small module, then one chunk that takes the fetch just under 48 KiB (it comes along)
    // or just over it (it does not).
    for (len, along) in [(44_000, true), (48_000, false)] {
        let mut w = Writer {
            chunk: Some(64 << 10),
            ..Writer::default()
        };
        let files = vec![
            ("m0.pyc".to_string(), noise(2000, 1)),
            ("m1.pyc".to_string(), noise(len, 2)),
        ];
        for (name, data) in &files {
            w.add(name, Body::File(data), &[]);
        }
        let layer = Layer::of(w, files);
        let source = layer.source();
        let index = layer.index(&*source).await;
        let walk = layer.reader(&index, source.clone());
        let m0 = entry(&index, "m0.pyc");
        walk.prefetch_walk(m0.offset, m0.size).await.unwrap();
        let m1 = entry(&index, "m1.pyc");
        assert_eq!(walk.is_cached(m1.offset, m1.size), along, "{len} bytes");
    }
}

#[tokio::test]
async fn a_wrong_toc_digest_is_refused_and_none_is_accepted() {
    let layer = sample();
    let source = layer.source();
    let wrong = crate::digest::sha256(b"another TOC");
    let err = estargz_index(
        &*source,
        &layer.digest,
        &layer.diff_id,
        Some(&wrong),
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    let right = crate::digest::sha256(&layer.toc).to_string();
    for part in [
        layer.digest.to_string(),
        wrong.to_string(),
        right,
        "TOC digest mismatch".into(),
    ] {
        assert!(err.contains(&part), "{err} lacks {part}");
    }
    let unverified = estargz_index(
        &*source,
        &layer.digest,
        &layer.diff_id,
        None,
        &Default::default(),
    )
    .await;
    assert!(
        unverified.unwrap().is_some(),
        "no annotation: accepted with a warning"
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_chunk_is_caught_and_that_chunk_is_not_cached() {
    let layer = sample();
    let source = layer.source();
    let index = layer.index(&*source).await;
    let reader = layer.reader(&index, source.clone());
    let big = entry(&index, "usr/bin/big");
    let spans: Vec<&Span> = index
        .spans
        .iter()
        .filter(|s| s.out_offset >= big.offset && s.out_offset < big.offset + big.size)
        .collect();
    assert_eq!(spans.len(), 3);
    let Fetch::Member {
        in_start, in_end, ..
    } = spans[1].fetch
    else {
        panic!()
    };
    let flip = (in_start + in_end) / 2;
    source.set_faults(Faults {
        flip_byte_at: Some(flip),
        ..Faults::default()
    });
    let err = reader
        .read(big.offset, big.size)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("failed verification"), "{err}");
    // The damaged chunk is not cached; its neighbours, fetched with it and verified, are.
    let cached = DiskChunks::open(layer.dir.path()).unwrap();
    let on_disk = |s: &Span| crate::cache::ChunkStore::contains(&cached, &s.digest);
    assert_eq!(
        spans.iter().map(|s| on_disk(s)).collect::<Vec<_>>(),
        [true, false, true]
    );
    source.set_faults(Faults::default());
    assert!(reader.read(big.offset, big.size).await.unwrap() == layer.files[1].1);
}

#[tokio::test]
async fn other_blobs_are_not_estargz() {
    let layer = sample();
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer.tar).unwrap();
    for (i, blob) in [gz.finish().unwrap(), layer.tar.clone(), b"tiny".to_vec()]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("blob{i}"));
        std::fs::write(&path, blob).unwrap();
        let d = crate::digest::sha256(blob);
        let source = FaultySource::new(FileSource::open(path, d.clone()).unwrap());
        assert!(estargz_index(&source, &d, &d, None, &Default::default())
            .await
            .unwrap()
            .is_none());
        assert!(source.counts().1 <= FOOTER_SIZE, "only the footer is read");
    }
}

#[test]
fn footers_new_and_legacy() {
    let f = footer(0x1234);
    assert_eq!(f.len(), 51);
    assert_eq!(
        parse_footer(&f),
        Some(Footer {
            toc_offset: 0x1234,
            len: 51
        })
    );
    let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
    legacy.extend(b"00000000000000abSTARGZ");
    legacy.extend([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    let tail = [&[7u8; 4][..], &legacy].concat();
    assert_eq!(
        parse_footer(&tail),
        Some(Footer {
            toc_offset: 0xab,
            len: 47
        })
    );
    let mut bad = f.clone();
    bad[12] = b'X';
    assert_eq!(parse_footer(&bad), None, "other subfield");
    bad = f.clone();
    bad[40] ^= 1;
    assert_eq!(parse_footer(&bad), None, "not an empty member");
}

#[test]
fn inconsistent_tocs_are_errors_or_fallbacks() {
    let map = |entries: serde_json::Value| {
        let toc: Toc = serde_json::from_value(json!({"version": 1, "entries": entries})).unwrap();
        map_toc(&toc, 1000, Frames::Gzip)
    };
    let d = crate::digest::sha256(b"").to_string();
    let ok = json!([{"name": "a", "type": "reg", "size": 8, "offset": 10, "chunkSize": 4, "chunkDigest": d},
                    {"name": "a", "type": "chunk", "offset": 50, "chunkOffset": 4, "chunkDigest": d}]);
    let m = map(ok.clone()).unwrap();
    assert_eq!(
        m.spans[0].fetch,
        Fetch::Member {
            in_start: 10,
            in_end: 50,
            skip: 0
        }
    );
    assert_eq!(
        m.spans[1].fetch,
        Fetch::Member {
            in_start: 50,
            in_end: 1000,
            skip: 0
        }
    );
    let case = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = ok.clone();
        f(&mut v);
        map(v)
    };
    let corrupt = |r: Result<Mapped, Unusable>| matches!(r, Err(Unusable::Corrupt(_)));
    assert!(
        corrupt(case(&|v| v[1]["offset"] = json!(1000))),
        "chunk in the TOC"
    );
    assert!(
        corrupt(case(&|v| v[1]["offset"] = json!(5))),
        "out of blob order"
    );
    assert!(corrupt(case(&|v| v[1]["chunkOffset"] = json!(3))), "gap");
    assert!(
        corrupt(case(&|v| v[1]["chunkSize"] = json!(3))),
        "short of the size"
    );
    assert!(
        corrupt(case(&|v| v[1]["name"] = json!("b"))),
        "orphan chunk"
    );
    assert!(
        corrupt(case(&|v| v[1]["type"] = json!("socket"))),
        "unknown type"
    );
    let fallback = case(&|v| {
        v[1].as_object_mut().unwrap().remove("chunkDigest");
    });
    assert!(
        matches!(fallback, Err(Unusable::Fallback(_))),
        "no chunk digest"
    );
}

#[test]
fn inner_offsets_skip_into_a_shared_member() {
    // Small files packed into one member (eStargz `innerOffset`).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"first file|second file").unwrap();
    let member = gz.finish().unwrap();
    let got = crate::layer::gzip::decode_member(&member, 11, 6).unwrap();
    assert_eq!(got, b"second");
    assert!(crate::layer::gzip::decode_member(&member, 11, 100).is_err());
    let d = |s: &[u8]| crate::digest::sha256(s).to_string();
    let toc: Toc = serde_json::from_value(json!({"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 10, "offset": 10, "chunkDigest": d(b"first file")},
        {"name": "b", "type": "reg", "size": 11, "offset": 10, "innerOffset": 11,
         "chunkDigest": d(b"second file")},
    ]}))
    .unwrap();
    let m = map_toc(&toc, 500, Frames::Gzip).unwrap();
    let skip = |i: usize| match m.spans[i].fetch {
        Fetch::Member { skip, in_end, .. } => (skip, in_end),
        _ => panic!(),
    };
    assert_eq!((skip(0), skip(1)), ((0, 500), (11, 500)));
    assert_eq!((m.entries[1].offset, m.size), (10, 21));
}

#[tokio::test]
async fn the_index_round_trips_through_the_store() {
    let layer = sample();
    let index = layer.index(&*layer.source()).await;
    std::fs::create_dir_all(layer.dir.path().join("tmp")).unwrap();
    let store = crate::layer::IndexStore::new(layer.dir.path());
    store.put(&index, None).unwrap();
    let back = store
        .get(&layer.digest, None)
        .unwrap()
        .expect("a current index");
    assert_eq!(back.spans, index.spans);
    assert_eq!(back.entries, index.entries);
    assert_eq!(
        (back.format, back.prefetch_end),
        (index.format, Some(10_020))
    );
    // A version-1 index (no `format`) is not an error: it is rebuilt.
    let path = layer
        .dir
        .path()
        .join(format!("layers/{}.json", layer.digest.digest()));
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    old["version"] = json!(1);
    old.as_object_mut().unwrap().remove("format");
    std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
    assert!(store.get(&layer.digest, None).unwrap().is_none());
}
