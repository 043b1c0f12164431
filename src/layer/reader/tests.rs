use super::*;
use crate::cache::DiskChunks;
use crate::image::Compression;
use crate::layer::{build_index, gzip};
use crate::source::{FaultySource, FileSource};
use std::io::Write;
use want::MIN_MISS_FETCH;

/// Half random, half text: compressible like real files, with many deflate blocks.
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 2 == 0 {
                (x >> 56) as u8
            } else {
                b'a' + (i % 23) as u8
            }
        })
        .collect()
}

/// A gzip layer holding `files` in this order, indexed with 32 KiB spans (anchors every 64
/// KiB, a light checkpoint between each two: the layout of indexes built before 2026-12-04,
/// at half its scale), read through a counting source.
fn gzip_layer(
    dir: &std::path::Path,
    files: &[(&str, &[u8])],
) -> (LayerReader, Arc<FaultySource<FileSource>>) {
    let mut b = ::tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = ::tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&tar).unwrap();
    let blob = e.finish().unwrap();
    let digest = crate::digest::sha256(&blob);
    let mut windows = Vec::new();
    let index = build_index(
        &blob[..],
        Compression::Gzip,
        &digest,
        &crate::digest::sha256(&tar),
        blob.len() as u64,
        32 << 10,
        &mut |_, _| Ok(()),
        &mut windows,
        &crate::layer::Limits::default(),
    )
    .unwrap();
    std::fs::write(dir.join("windows"), &windows).unwrap();
    let windows = Arc::new(
        FileSource::open(dir.join("windows"), index.windows.clone().unwrap().digest).unwrap(),
    );
    let path = dir.join("blob");
    std::fs::write(&path, &blob).unwrap();
    let source = Arc::new(FaultySource::new(FileSource::open(&path, digest).unwrap()));
    let cache = Arc::new(Cache::new(Arc::new(DiskChunks::open(dir).unwrap()), 1024));
    let reader =
        LayerReader::new(Arc::new(index), source.clone(), cache).with_windows(Some(windows));
    (reader, source)
}

/// A gzip layer holding one 2 MiB file ([`gzip_layer`]): the reader, its source, the file's
/// offset and size, and the number of spans.
fn setup(dir: &std::path::Path) -> (LayerReader, Arc<FaultySource<FileSource>>, u64, u64, usize) {
    let data = file_bytes(2 << 20, 0x2545_f491_4f6c_dd1d);
    let (reader, source) = gzip_layer(dir, &[("big", &data)]);
    let index = reader.index();
    let (offset, size, spans) = (
        index.entries[0].offset,
        index.entries[0].size,
        index.spans.len(),
    );
    (reader, source, offset, size, spans)
}

#[tokio::test]
async fn a_complete_layer_is_checked_against_its_diff_id() {
    let dir = tempfile::tempdir().unwrap();
    let (honest, _, offset, size, _) = setup(dir.path());
    let all = honest.read(offset, size).await.unwrap();
    assert_eq!(all.len() as u64, size);
    assert_eq!(honest.completeness.load(Ordering::Relaxed), VERIFIED);

    // The same spans under an index that claims another diff_id: reading the last span
    // completes the layer, the check fails, and the reader refuses to go on.
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, offset, size, _) = setup(dir.path());
    let mut lying = (*reader.index).clone();
    lying.diff_id = crate::digest::sha256(b"some other layer");
    let cache = reader.cache.clone();
    let reader = LayerReader::new(Arc::new(lying), source, cache);
    let err = reader.read(offset, size).await.unwrap_err().to_string();
    assert!(err.contains("does not describe the layer"), "{err}");
    assert_eq!(
        reader.cache.stats.index_mismatches.load(Ordering::Relaxed),
        1
    );
    let err = reader.read(offset, 10).await.unwrap_err().to_string();
    assert!(err.contains("index verify"), "{err}");
}

#[tokio::test]
async fn a_published_index_is_checked_span_by_span_and_as_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, offset, size, _) = setup(dir.path());
    let mut published = (*reader.index).clone();
    published.published = Some(crate::digest::sha256(b"index blob"));
    let honest = Arc::new(published.clone());
    let cache = reader.cache.clone();
    // An honest published index: the complete layer verifies, and the index is stored
    // again under its pin, marked checked.
    let store_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(store_dir.path().join("tmp")).unwrap();
    let store = crate::layer::IndexStore::new(store_dir.path());
    let r = LayerReader::new(honest.clone(), source.clone(), cache.clone())
        .with_windows(reader.windows.clone())
        .remembering_checks_in(store.clone());
    let mut pos = 0;
    while pos < size {
        let got = r.read(offset + pos, 100 << 10).await.unwrap();
        pos += got.len() as u64;
    }
    assert_eq!(r.completeness.load(Ordering::Relaxed), VERIFIED);
    let pin = honest.published.clone().unwrap();
    let kept = store
        .get(&honest.blob, Some(&pin))
        .unwrap()
        .expect("stored");
    assert!(kept.published.is_none(), "marked checked");
    assert!(
        store.get(&honest.blob, None).unwrap().is_none(),
        "not as the shared index"
    );

    // A forged window (and the span digest to match what it makes): never used while the
    // span before is at hand, whose output is the real window — the span fails its digest
    // although its compressed bytes verify, so the index is refused as a whole.
    let mut forged = published.clone();
    let k = forged
        .spans
        .iter()
        .position(|s| {
            matches!(&s.fetch, Fetch::Gzip { checkpoint, .. }
            if forged.checkpoints[*checkpoint as usize].window_len > 0)
        })
        .unwrap();
    let Fetch::Gzip {
        checkpoint,
        in_start,
        in_end,
        ..
    } = forged.spans[k].fetch.clone()
    else {
        unreachable!()
    };
    let cp = &mut forged.checkpoints[checkpoint as usize];
    let real = r.read_window(cp).await.unwrap();
    let window: Vec<u8> = real.iter().map(|b| b ^ 0x55).collect();
    let mut file = std::fs::read(dir.path().join("windows")).unwrap();
    let deflated = crate::layer::deflate(&window);
    (cp.window_at, cp.window_len) = (file.len() as u64, deflated.len() as u64);
    file.extend_from_slice(&deflated);
    let raw = source
        .read_range(in_start, in_end - in_start)
        .await
        .unwrap();
    let out = gzip::decode_span(cp, &window, &raw, forged.spans[k].out_len as usize).unwrap();
    forged.spans[k].digest = crate::digest::sha256(&out);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("forged"), &file).unwrap();
    forged.windows = Some(crate::layer::Windows {
        digest: crate::digest::sha256(&file),
        size: file.len() as u64,
    });
    let windows: Arc<dyn BlobSource> = Arc::new(
        FileSource::open(dir.path().join("forged"), crate::digest::sha256(&file)).unwrap(),
    );
    let fresh = Arc::new(Cache::new(
        Arc::new(DiskChunks::open(dir.path()).unwrap()),
        1024,
    ));
    let r = LayerReader::new(Arc::new(forged.clone()), source.clone(), fresh.clone())
        .with_windows(Some(windows));
    r.prefetch(forged.spans[k - 1].out_offset, 10)
        .await
        .unwrap();
    let err = r
        .read(forged.spans[k].out_offset, 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not describe the layer"), "{err}");
    assert_eq!(fresh.stats.index_mismatches.load(Ordering::Relaxed), 1);

    // The same index claiming another entry list: caught at the first read of the
    // complete layer, counted, and refused from then on.
    let mut lying = published.clone();
    lying.entries[0].mode ^= 0o4000;
    let r = LayerReader::new(Arc::new(lying), source.clone(), cache.clone());
    let err = r.read(offset, 10).await.unwrap_err().to_string();
    assert!(err.contains("does not describe the layer"), "{err}");
    assert_eq!(cache.stats.index_mismatches.load(Ordering::Relaxed), 1);
    assert!(r.read(offset, 10).await.is_err());
}

/// Reader A's read of spans 0..=5, one request answered after 200 ms (failing if `fail`),
/// once that request is under way: (the reader, its source, A's read, where span 5 ends).
async fn a_run_of_six_spans_under_way(
    dir: &std::path::Path,
    fail: bool,
) -> (
    Arc<LayerReader>,
    Arc<FaultySource<FileSource>>,
    tokio::task::JoinHandle<Result<Vec<u8>, CacheError>>,
    u64,
) {
    let (reader, source, _, _, spans) = setup(dir);
    assert!(spans > 6);
    source.set_faults(crate::source::Faults {
        delay: Some(std::time::Duration::from_millis(200)),
        fail,
        ..Default::default()
    });
    let reader = Arc::new(reader);
    let end = {
        let s = &reader.index().spans[5];
        s.out_offset + s.out_len
    };
    let a = {
        let r = reader.clone();
        tokio::spawn(async move { r.read(0, end).await })
    };
    while source.started() == 0 {
        tokio::task::yield_now().await;
    }
    (reader, source, a, end)
}

#[tokio::test]
async fn a_read_of_a_span_another_run_is_fetching_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    // Reader A fetches spans 0..=5 with one request...
    let (reader, source, a, end) = a_run_of_six_spans_under_way(dir.path(), false).await;
    // ...and reader B, wanting bytes of span 3 while that request is in flight, waits
    // for it instead of fetching them again.
    let at = reader.index().spans[3].out_offset + 10;
    assert_eq!(reader.read(at, 100).await.unwrap().len(), 100);
    assert_eq!(a.await.unwrap().unwrap().len() as u64, end);
    assert_eq!(source.counts().0, 1, "one range request for both readers");
    // A span the run did not cover is fetched by whoever needs it.
    let beyond = reader.index().spans[6].out_offset;
    reader.read(beyond, 10).await.unwrap();
    assert_eq!(source.counts().0, 2);
}

#[tokio::test]
async fn a_span_at_a_light_checkpoint_waits_for_the_span_before_rather_than_fetch_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, _) = setup(dir.path());
    let reader = Arc::new(reader);
    assert!(reader.checkpoint_of(1).unwrap().light);
    let size = |k: usize| match reader.index().spans[k].fetch {
        Fetch::Gzip {
            in_start, in_end, ..
        } => in_end - in_start,
        _ => unreachable!("a gzip layer"),
    };
    source.set_faults(crate::source::Faults {
        delay: Some(std::time::Duration::from_millis(200)),
        ..Default::default()
    });
    // A fetches span 0 alone...
    let a = {
        let r = reader.clone();
        tokio::spawn(async move { r.prefetch(0, 10).await })
    };
    while source.started() == 0 {
        tokio::task::yield_now().await;
    }
    // ...and B, wanting span 1 (decoded from the end of span 0), waits for A, then fetches
    // span 1 alone, its window the end of span 0.
    let at = reader.index().spans[1].out_offset + 10;
    reader.prefetch(at, 10).await.unwrap();
    a.await.unwrap().unwrap();
    assert_eq!(source.counts(), (2, size(0) + size(1)));
    assert!(reader.is_cached(at, 10));
    // Span 2's span before is cached: fetched alone too (its window the end of span 1 if it
    // is light, else from the cache as well).
    let at = reader.index().spans[2].out_offset + 10;
    reader.prefetch(at, 10).await.unwrap();
    assert_eq!(source.counts(), (3, size(0) + size(1) + size(2)));
}

#[tokio::test]
async fn a_span_at_a_light_checkpoint_whose_span_before_was_evicted_is_fetched_from_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, _) = setup(dir.path());
    assert!(reader.checkpoint_of(1).unwrap().light);
    reader.prefetch(10, 10).await.unwrap();
    assert_eq!(source.counts().0, 1);
    // Span 0 goes (its mark stays): span 1 cannot take its window from it, nor from the
    // window file (a light checkpoint has none there), so it is fetched from span 0 on.
    reader
        .cache
        .remove(&reader.index().spans[0].digest)
        .unwrap();
    let span = &reader.index().spans[1];
    let got = reader.read(span.out_offset, span.out_len).await.unwrap();
    assert_eq!(crate::digest::sha256(&got), span.digest);
    assert_eq!(source.counts().0, 3, "span 1 alone, then again from span 0");
    assert!(reader.cache.contains(&reader.index().spans[0].digest));
}

#[tokio::test]
async fn a_read_waiting_for_a_run_that_fails_gets_its_error_without_fetching_again() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, a, _) = a_run_of_six_spans_under_way(dir.path(), true).await;
    // B waits for A's run (spans 0..=5); the run fails, and B gets its error: one request
    // (one retry budget, behind a real registry) for both.
    let at = reader.index().spans[3].out_offset + 10;
    let e = reader.read(at, 100).await.unwrap_err();
    assert!(e.to_string().contains("source unavailable"), "{e}");
    assert!(a.await.unwrap().is_err());
    assert_eq!(source.started(), 1, "B fetched again after A's run failed");
    // A later read fetches afresh.
    source.set_faults(Default::default());
    assert_eq!(reader.read(at, 100).await.unwrap().len(), 100);
}

#[tokio::test]
async fn sequential_misses_read_ahead_and_random_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, offset, size, spans) = setup(dir.path());
    assert!(spans >= 12, "{spans} spans");
    // A FUSE-like sequential reader: 16 KiB at a time.
    let mut pos = 0;
    while pos < size {
        let got = reader.read(offset + pos, 16 << 10).await.unwrap();
        pos += got.len() as u64;
    }
    let (sequential_reads, _) = source.counts();
    assert!(
        (sequential_reads as usize) * 3 < spans,
        "{sequential_reads} range reads for {spans} spans"
    );

    // Scattered single-span prefetches (profile replay) on a fresh cache fetch each from
    // the anchor before it (a light checkpoint needs the span before) to its end, nothing
    // ahead; the spans from the anchor on came along and are cached.
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, spans) = setup(dir.path());
    let light = |k: usize| reader.checkpoint_of(k).unwrap().light;
    // The last span before each anchor, and how many anchors before it.
    let lasts: Vec<usize> = (0..spans - 1).filter(|&k| !light(k + 1)).collect();
    let n = lasts.len();
    assert!(n >= 5 && lasts[0] >= 1, "anchors: {lasts:?}");
    let mut fetched = std::collections::HashSet::new();
    for g in [n - 2, 0, n / 2, n - 1, 1] {
        let k = lasts[g];
        let at = reader.index().spans[k].out_offset + 100;
        reader.prefetch(at, 10).await.unwrap();
        fetched.insert(g);
        // Span k is light: its run starts at the anchor before it.
        let anchor = (0..=k).rev().find(|&j| !light(j)).unwrap();
        assert!(anchor < k);
        for j in anchor..=k {
            assert!(reader.is_cached(reader.index().spans[j].out_offset, 1));
        }
        if !fetched.contains(&(g + 1)) {
            assert!(!reader.is_cached(reader.index().spans[k + 1].out_offset, 1));
        }
    }
    let (reads, bytes) = source.counts();
    assert_eq!(reads, 5);
    let max_span = reader
        .index()
        .spans
        .iter()
        .map(|s| match s.fetch {
            Fetch::Gzip {
                in_start, in_end, ..
            } => in_end - in_start,
            _ => 0,
        })
        .max()
        .unwrap();
    // Each from its anchor: at most 5 spans of this layer's sizes (64 KiB between anchors at
    // least, 32 KiB spans, each ending at the first deflate block boundary after that).
    assert!(bytes <= 5 * 5 * max_span, "{bytes} bytes");

    // A demand miss brings the spans after it too, up to MIN_MISS_FETCH compressed bytes:
    // a read of span 1 then covers span 3, and nothing is fetched twice.
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, spans) = setup(dir.path());
    for k in [1, 3, spans / 2, spans - 2] {
        let at = reader.index().spans[k].out_offset + 100;
        reader.read(at, 10).await.unwrap();
    }
    let (reads, bytes) = source.counts();
    assert!(max_span * 2 < MIN_MISS_FETCH, "spans of {max_span} bytes");
    assert_eq!(reads, 3, "1 (with 3), half-way, the end");
    assert!(bytes <= 3 * (MIN_MISS_FETCH + max_span), "{bytes} bytes");
    assert!(bytes >= 2 * MIN_MISS_FETCH, "{bytes} bytes");

    // A read alone fetches its own span; its neighbours, fetched after it in their own
    // request, are the same spans: a read of span 1 and its neighbours then cover span 3.
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, spans) = setup(dir.path());
    let at = reader.index().spans[1].out_offset + 100;
    reader.read_alone(at, 10).await.unwrap();
    let (reads, bytes) = source.counts();
    assert_eq!(reads, 1);
    // Its own span, and span 0 before it (span 1 is at a light checkpoint).
    assert!(reader.checkpoint_of(1).unwrap().light);
    assert!(bytes <= 2 * max_span, "a miss alone: {bytes} bytes");
    for k in [1, 3, spans / 2, spans - 2] {
        let at = reader.index().spans[k].out_offset + 100;
        reader.read_alone(at, 10).await.unwrap();
        reader.fetch_neighbours(at + 10).await.unwrap();
    }
    let (reads, bytes) = source.counts();
    assert!(max_span * 2 < MIN_MISS_FETCH, "spans of {max_span} bytes");
    assert_eq!(
        reads, 6,
        "1 and its neighbours (with 3), half-way and its neighbours, the end and its neighbours"
    );
    assert!(
        bytes <= 3 * (MIN_MISS_FETCH + 2 * max_span),
        "{bytes} bytes"
    );
    assert!(bytes >= 2 * MIN_MISS_FETCH, "{bytes} bytes");
}

/// The neighbours of a read reach `MIN_MISS_FETCH` compressed bytes into the files after it,
/// but not into a shared object: nothing loads a library for lying next to a file read.
#[tokio::test]
async fn neighbours_stop_before_a_shared_object() {
    let conf = file_bytes(40 << 10, 1);
    let big = file_bytes(1 << 20, 2);
    for (name, reaches) in [
        ("data.bin", true),
        ("libx.so.1", false),
        ("_m.cpython-311-x86_64-linux-gnu.so", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (reader, source) = gzip_layer(dir.path(), &[("a.conf", &conf), (name, &big)]);
        let (a, b) = (&reader.index().entries[0], &reader.index().entries[1]);
        let (end, next) = (a.offset + a.size, b.offset);
        reader.read_alone(a.offset, a.size).await.unwrap();
        let (before, _) = source.counts();
        reader.fetch_neighbours(end).await.unwrap();
        let (after, _) = source.counts();
        assert_eq!(after - before, u64::from(reaches), "{name}: requests");
        assert_eq!(reader.is_cached(next + (256 << 10), 1), reaches, "{name}");
    }
}

/// An open's fetch knows the bytes it wants: right after a read of the span before it (which
/// makes a read look sequential), it does not read ahead past them; a read there does.
#[tokio::test]
async fn an_open_fetch_reads_no_further_than_asked() {
    for open in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _, offset, _, _) = setup(dir.path());
        reader.read_alone(offset, 100).await.unwrap();
        let first = reader.index().span_at(offset).unwrap();
        let next = reader.index().spans[first + 1].out_offset;
        if open {
            reader.fetch_for_open(next, 1000).await.unwrap();
        } else {
            reader.read_alone(next, 1000).await.unwrap();
        }
        assert!(reader.is_cached(next, 1000));
        let further = reader.index().spans[first + 3].out_offset;
        assert_eq!(reader.is_cached(further, 1), !open, "open: {open}");
    }
}

/// Two files read sequentially at once, each in its own handle: each keeps its read-ahead
/// (the state is the handle's), where the layer's last fetch would see neither as sequential.
#[tokio::test]
async fn read_ahead_follows_each_handle_not_the_layer() {
    let interleaved = |by_handle: bool| async move {
        let dir = tempfile::tempdir().unwrap();
        let (reader, source, offset, size, spans) = setup(dir.path());
        let half = size / 2;
        let mut pos = [0, half];
        let mut ends = [0u64, 0];
        while pos[0] < half || pos[1] < size {
            for h in 0..2 {
                let limit = if h == 0 { half } else { size };
                if pos[h] >= limit {
                    continue;
                }
                let (at, len) = (offset + pos[h], (16 << 10).min(limit - pos[h]));
                let got = if by_handle {
                    let continues = ends[h] == at;
                    reader.read_continuing(at, len, true, continues).await
                } else {
                    reader.read_alone(at, len).await
                };
                pos[h] += got.unwrap().len() as u64;
                ends[h] = offset + pos[h];
            }
        }
        (source.counts().0 as usize, spans)
    };
    let (by_handle, spans) = interleaved(true).await;
    // Each handle: its first miss alone, then READAHEAD more spans per request.
    assert!(
        by_handle * 2 < spans,
        "{by_handle} range reads for {spans} spans"
    );
    let (by_layer, _) = interleaved(false).await;
    assert!(
        by_layer > by_handle,
        "without handles the interleaved readers lose their read-ahead: {by_layer} vs {by_handle}"
    );
}

/// In a fresh layer, a read of spans `0..=k` under way (each request served after 0.3 s),
/// then a fetch ahead of reads of the last span: whether that fetch's request started while
/// the read's was under way.
async fn ahead_starts_during_a_read_of(k: impl Fn(&LayerIndex) -> usize) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _, _, spans) = setup(dir.path());
    let reader = Arc::new(reader);
    let k = k(reader.index());
    assert!(k + 1 < spans);
    let end = reader.index().spans[k].out_offset + reader.index().spans[k].out_len;
    let last = reader.index().spans[spans - 1].out_offset;
    source.set_faults(crate::source::Faults {
        delay: Some(std::time::Duration::from_millis(300)),
        ..Default::default()
    });
    let read = {
        let r = reader.clone();
        tokio::spawn(async move { r.read_continuing(0, end, true, false).await })
    };
    while source.started() == 0 {
        tokio::task::yield_now().await;
    }
    let ahead = {
        let r = reader.clone();
        tokio::spawn(async move { r.prefetch(last, 10).await })
    };
    // The fetch ahead's request: whether it started while the read's was still being served.
    while source.started() < 2 {
        tokio::task::yield_now().await;
    }
    let during = source.counts().0 == 0;
    read.await.unwrap().unwrap();
    ahead.await.unwrap().unwrap();
    during
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_ahead_start_no_request_while_a_read_waits_for_a_large_one() {
    // A read of one span leaves the link to others...
    assert!(
        ahead_starts_during_a_read_of(|_| 0).await,
        "a small read holds nothing back"
    );
    // ...one of LARGE_READ compressed bytes or more has it to itself.
    let large = |index: &LayerIndex| {
        (0..index.spans.len())
            .find(|&k| budget::run_compressed(index, 0, k) >= budget::LARGE_READ)
            .expect("the layer holds over 1 MiB compressed")
    };
    assert!(
        !ahead_starts_during_a_read_of(large).await,
        "no request ahead of reads starts while a large read fetches"
    );
}

/// The setup's reader with its window file read through a counting source.
fn counting_windows(
    dir: &std::path::Path,
) -> (
    LayerReader,
    Arc<FaultySource<FileSource>>,
    Arc<FaultySource<FileSource>>,
) {
    let (reader, source, ..) = setup(dir);
    let digest = reader.index().windows.clone().unwrap().digest;
    let windows = Arc::new(FaultySource::new(
        FileSource::open(dir.join("windows"), digest).unwrap(),
    ));
    let reader = reader.with_windows(Some(windows.clone()));
    (reader, source, windows)
}

/// Three pieces far apart in the layer, each starting past an anchor (so each needs a window).
fn pieces_apart(reader: &LayerReader) -> Vec<(u64, u64)> {
    let spans = &reader.index().spans;
    [5, 15, 27]
        .iter()
        .map(|&k| (spans[k].out_offset + 7, spans[k].out_len))
        .collect()
}

/// A source that counts its reads and injects faults.
type Counted = Arc<FaultySource<FileSource>>;

/// [`counting_windows`] with `faults` on its window file, and its [`pieces_apart`].
fn windows_faulty(
    dir: &std::path::Path,
    faults: crate::source::Faults,
) -> (LayerReader, Counted, Counted, Vec<(u64, u64)>) {
    let (reader, source, windows) = counting_windows(dir);
    windows.set_faults(faults);
    let pieces = pieces_apart(&reader);
    (reader, source, windows, pieces)
}

/// Prefetches `pieces` started together; each must be cached after (its spans decoded and
/// checked by digest, with whatever windows they were given).
async fn prefetch_together(reader: &LayerReader, pieces: &[(u64, u64)]) {
    let fetched = futures_util::future::join_all(
        pieces
            .iter()
            .map(|&(offset, len)| reader.prefetch(offset, len)),
    )
    .await;
    assert!(fetched.iter().all(Result::is_ok), "{fetched:?}");
    for &(offset, len) in pieces {
        assert!(reader.is_cached(offset, len));
    }
}

#[tokio::test]
async fn the_windows_of_known_fetches_come_in_one_request_and_the_fetches_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let delayed = crate::source::Faults {
        delay: Some(std::time::Duration::from_millis(100)),
        ..Default::default()
    };
    let (reader, source, windows, pieces) = windows_faulty(dir.path(), delayed);
    // Claimed and requested at once: a fetch started before the request ends waits for it,
    // even once the caller has stopped waiting (the request runs on by itself).
    drop(reader.prefetch_windows(&pieces));
    prefetch_together(&reader, &pieces).await;
    assert_eq!(windows.counts().0, 1, "the three windows in one request");
    assert_eq!(
        source.counts().0,
        1,
        "the pieces, started together, share theirs"
    );
    // Asking again for cached spans asks for nothing.
    reader.prefetch_windows(&pieces).await;
    assert_eq!(windows.counts().0, 1);
}

#[tokio::test]
async fn windows_whose_request_failed_are_asked_for_again_by_later_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let failing = crate::source::Faults {
        fail: true,
        ..Default::default()
    };
    let (reader, _, windows, pieces) = windows_faulty(dir.path(), failing);
    reader.prefetch_windows(&pieces).await;
    assert_eq!(windows.started(), 1);
    windows.set_faults(Default::default());
    for &(offset, len) in &pieces {
        reader.prefetch(offset, len).await.unwrap();
    }
    assert_eq!(
        windows.counts().0,
        3,
        "each fetch asked for its window again"
    );
}

#[tokio::test]
async fn small_fetches_ahead_started_together_share_one_request_and_reads_do_not_wait_to_share() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _) = counting_windows(dir.path());
    let pieces = pieces_apart(&reader);
    prefetch_together(&reader, &pieces).await;
    assert_eq!(
        source.counts().0,
        1,
        "three pieces ahead of reads, one request"
    );
    // Reads a process waits for: each its own request, at once.
    let dir = tempfile::tempdir().unwrap();
    let (reader, source, _) = counting_windows(dir.path());
    let read = futures_util::future::join_all(
        pieces.iter().map(|&(offset, len)| reader.read(offset, len)),
    )
    .await;
    assert!(read.iter().all(Result::is_ok));
    assert_eq!(source.counts().0, 3);
}
