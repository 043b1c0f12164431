use super::stream::{runs_of, Unpacker};
use super::*;

/// [`Unpacker`] over `data` fed `piece` bytes at a time.
fn unpack_frame(
    data: &[u8],
    f: &Frame,
    mut deliver: impl FnMut(usize, Vec<u8>) -> Result<bool, crate::cache::CacheError>,
) -> Result<(usize, usize), String> {
    let mut done = None;
    for piece in [1, 7, 100, 4096, data.len().max(1)] {
        let mut u = Unpacker::new(f);
        let mut got = Vec::new();
        for c in data.chunks(piece) {
            u.feed(c, |s, b| {
                got.push((s, b));
                Ok(true)
            })?;
        }
        let n = u.finish()?;
        assert_eq!(n.0, got.len());
        // Fed in any pieces, the same spans come out.
        if done.is_none() {
            for (s, b) in got.iter().cloned() {
                deliver(s, b).map_err(|e| e.to_string())?;
            }
            done = Some(got);
        } else {
            assert_eq!(done.as_ref(), Some(&got), "fed {piece} bytes at a time");
        }
    }
    let got = done.unwrap_or_default();
    Ok((got.len(), 0))
}

fn frame(spans: &[(u32, u64, u64)], data: &[u8]) -> (Frame, Vec<u8>) {
    let z = zstd::bulk::compress(data, 3).unwrap();
    (
        Frame {
            len: z.len() as u64,
            spans: spans.to_vec(),
        },
        z,
    )
}

#[test]
fn a_frame_decodes_to_its_spans_and_no_further() {
    let data: Vec<u8> = (0..300u32).flat_map(|k| k.to_le_bytes()).collect();
    let (f, z) = frame(&[(0, 0, 1000), (0, 5000, 200)], &data);
    let mut got = Vec::new();
    let n = unpack_frame(&z, &f, |s, b| {
        got.push((s, b));
        Ok(true)
    })
    .unwrap();
    assert_eq!(n, (2, 0));
    assert_eq!(got[0].1, data[..1000]);
    assert_eq!(got[1].1, data[1000..1200]);
    // A frame that holds more than its spans is refused.
    let (mut f, z) = frame(&[(0, 0, 1000), (0, 5000, 200)], &data);
    f.spans.pop();
    let e = unpack_frame(&z, &f, |_, _| Ok(true)).unwrap_err();
    assert!(e.contains("more than its 1 spans"), "{e}");
    // Declaring more than the frame holds fails at the span that runs out.
    let (mut f, z) = frame(&[(0, 0, 1000)], &data[..1000]);
    f.spans.push((0, 1000, 10));
    let e = unpack_frame(&z, &f, |_, _| Ok(true)).unwrap_err();
    assert!(e.contains("span 1 of 2: the frame ended"), "{e}");
    let e = unpack_frame(b"not zstd at all", &f, |_, _| Ok(true)).unwrap_err();
    assert!(e.contains("span 0"), "{e}");
}

#[test]
fn a_frame_asking_for_a_larger_window_than_a_frame_is_refused() {
    // 16 MiB of incompressible-then-repeated data with an 8 MiB window: the decoder
    // refuses the window rather than allocating it.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    data.extend_from_slice(&vec![7u8; 15 << 20]);
    let mut c = zstd::bulk::Compressor::new(19).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG + 1))
        .unwrap();
    let z = c.compress(&data).unwrap();
    let f = Frame {
        len: z.len() as u64,
        spans: vec![(0, 0, 1 << 20)],
    };
    assert!(unpack_frame(&z, &f, |_, _| Ok(true)).is_err());
}

#[test]
fn the_frames_to_fetch_are_asked_for_in_one_range_per_run() {
    let frames: Vec<Frame> = [10, 20, 30, 40, 50]
        .iter()
        .map(|&len| Frame {
            len,
            spans: vec![(0, 0, 1)],
        })
        .collect();
    assert_eq!(runs_of(&frames, &[0, 1, 2, 3, 4]), vec![(0, 150)]);
    assert_eq!(runs_of(&frames, &[1, 2, 4]), vec![(10, 60), (100, 150)]);
    assert_eq!(runs_of(&frames, &[3]), vec![(60, 100)]);
    assert!(runs_of(&frames, &[]).is_empty());
}

#[test]
fn hostile_packs_are_refused_with_a_reason() {
    let good = Pack {
        digest: crate::digest::sha256(b"p").to_string(),
        size: 10,
        layers: vec!["sha256:aa".into()],
        frames: vec![Frame {
            len: 10,
            spans: vec![(0, 0, 100)],
        }],
    };
    assert_eq!(good.validate(), Ok(()));
    let bad = |edit: fn(&mut Pack), says: &str| {
        let mut p = good.clone();
        edit(&mut p);
        let e = p.validate().unwrap_err();
        assert!(e.contains(says), "{e}");
    };
    bad(|p| p.size = 11, "frames of 10 bytes");
    bad(|p| p.frames[0].spans[0].0 = 1, "span of layer 1");
    bad(|p| p.frames[0].spans[0].2 = MAX_SPAN + 1, "a span of");
    bad(
        |p| p.frames[0].spans = vec![(0, 0, MAX_SPAN); 5],
        "bytes of spans",
    );
    bad(|p| p.frames[0].spans.push((0, 0, u64::MAX)), "a span of");
    bad(|p| p.frames[0].spans.clear(), "0 spans");
    bad(|p| p.digest = "nope".into(), "pack digest");
    bad(
        |p| {
            p.frames = vec![p.frames[0].clone(); MAX_FRAMES + 1];
        },
        "frames",
    );
}

/// A pack blob served from memory, its stream in pieces of 4 KiB up to `stall_at` bytes of
/// the blob and then nothing more (the stream stays open), once `stalled` is notified.
struct Served {
    data: Vec<u8>,
    stall_at: u64,
    stalled: Arc<tokio::sync::Notify>,
}

impl BlobSource for Served {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_range(&self, offset: u64, len: u64) -> crate::source::ReadFuture<'_> {
        let bytes = self.data[offset as usize..(offset + len) as usize].to_vec();
        Box::pin(async move { Ok(bytes) })
    }

    fn read_range_to<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: crate::registry::Sink<'a>,
    ) -> crate::source::SinkFuture<'a> {
        Box::pin(async move {
            for at in (offset..offset + len).step_by(4096) {
                if at >= self.stall_at {
                    // The replay claims spans ahead of the stream the moment it starts it:
                    // once, before the stream's first turn comes back here.
                    tokio::task::yield_now().await;
                    self.stalled.notify_one();
                    std::future::pending::<()>().await;
                }
                let end = (at + 4096).min(offset + len) as usize;
                sink(&self.data[at as usize..end]).await;
            }
            Ok(())
        })
    }
}

/// Files of compressible text, several gzip spans each.
fn text_files() -> Vec<(String, Vec<u8>)> {
    (0..3u32)
        .map(|k| {
            let words = ["layer", "span", "frame", "pack", "stream", "claim", "read"];
            let text: Vec<u8> = (0..60_000u32)
                .flat_map(|i| {
                    let w = words[((i * 7 + k) ^ (i >> 5)) as usize % words.len()];
                    format!("{w} {} ", i % 97).into_bytes()
                })
                .collect();
            (format!("usr/share/doc/f{k}.txt"), text)
        })
        .collect()
}

/// A cold view of an image of [`text_files`] (its index stored, no chunk cached), the pack of
/// all its layer's spans, and those spans as a replay plans them.
async fn cold_view_and_pack(
    registry: &Arc<crate::registry::fake::FakeRegistry>,
    dir: &std::path::Path,
) -> (ImageView, Vec<u8>, Pack, Vec<(usize, u64, u64)>) {
    let view = crate::fs::tests::lazy_view(registry, dir, &text_files()).await;
    let readers = view.readers();
    let spans: Vec<(usize, usize)> = (0..readers[0].index().spans.len())
        .map(|i| (0, i))
        .collect();
    assert!(spans.len() > 4, "{} spans", spans.len());
    let (blob, pack) = build(readers, &spans, LEVEL).await.unwrap().unwrap();
    let planned = spans
        .iter()
        .map(|&(r, i)| {
            let s = &readers[r].index().spans[i];
            (r, s.out_offset, s.out_len)
        })
        .collect();
    // Building it read every span: the same store without its chunks is cold again.
    drop(view);
    std::fs::remove_dir_all(crate::store::Layout::new(dir).chunks()).unwrap();
    let view = crate::fs::tests::open(registry.clone(), dir).await.unwrap();
    (view, blob, pack, planned)
}

/// The file at `path` of `view`, read through its layer reader.
async fn read_file(view: &ImageView, path: &str) -> Vec<u8> {
    let n = view.tree.node(view.lookup(path).unwrap());
    let (layer, offset) = n.data.unwrap();
    view.readers()[layer]
        .read_exact(offset, n.size)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_pack_caches_every_span_it_holds_and_the_layer_is_not_read() {
    let registry = Arc::new(crate::registry::fake::FakeRegistry::new());
    let dir = tempfile::tempdir().unwrap();
    let (view, blob, pack, planned) = cold_view_and_pack(&registry, dir.path()).await;
    let before = registry.requests();
    let source = Arc::new(Served {
        data: blob,
        stall_at: u64::MAX,
        stalled: Default::default(),
    });
    let report = replay(&view, &pack, source, &planned).await;
    assert_eq!(report.delivered, planned.len(), "{report:?}");
    assert_eq!((report.refused, report.failed, report.skipped), (0, 0, 0));
    assert_eq!(report.bytes, pack.size);
    for (path, data) in text_files() {
        assert!(read_file(&view, &path).await == data, "{path}");
    }
    // Every byte came from the pack: not one range of the layer was read.
    assert_eq!(registry.requests().ranges, before.ranges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_span_claimed_for_a_stalled_pack_fetches_it_from_the_layer() {
    let registry = Arc::new(crate::registry::fake::FakeRegistry::new());
    let dir = tempfile::tempdir().unwrap();
    let (view, blob, pack, planned) = cold_view_and_pack(&registry, dir.path()).await;
    let view = Arc::new(view);
    let stalled = Arc::new(tokio::sync::Notify::new());
    // The stream brings nothing at all, and never ends.
    let source = Arc::new(Served {
        data: blob,
        stall_at: 0,
        stalled: stalled.clone(),
    });
    let replaying = {
        let view = view.clone();
        tokio::spawn(async move { replay(&view, &pack, source, &planned).await })
    };
    tokio::time::timeout(STALL * 20, stalled.notified())
        .await
        .expect("the pack's stream started");
    // The pack's first spans are claimed: a read of one waits for the stream until it has
    // stalled for STALL, then fetches its span from the layer.
    let (path, data) = text_files().remove(0);
    let before = registry.requests().ranges;
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(STALL * 20, read_file(&view, &path)).await;
    assert!(read.expect("the read waited for the stalled pack") == data);
    // It waited for the claim (the stall's clock started just before the read did).
    assert!(started.elapsed() >= STALL / 2, "{:?}", started.elapsed());
    assert!(registry.requests().ranges > before);
    // The stream, still bringing nothing, is then abandoned: the replay ends.
    let report = tokio::time::timeout(ABANDON * 4, replaying)
        .await
        .expect("the stalled pack was abandoned")
        .unwrap();
    assert_eq!((report.bytes, report.delivered, report.failed), (0, 0, 1));
}
