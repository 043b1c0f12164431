use super::*;
use std::io::Write;

/// A tar with `n` files of pseudo-random, partly compressible content.
fn sample_tar(n: usize) -> Vec<u8> {
    sample_tar_with(n, 3)
}

/// `n` files, one byte in `random_every` random (more random: deflate blocks of fewer
/// bytes of output, so more block boundaries to put checkpoints at).
fn sample_tar_with(n: usize, random_every: usize) -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut seed = 7u64;
    for i in 0..n {
        let len = (i * 7919) % 150_000 + 1;
        let data: Vec<u8> = (0..len)
            .map(|j| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if j % random_every == 0 {
                    (seed >> 56) as u8
                } else {
                    b'a' + (j % 26) as u8
                }
            })
            .collect();
        let mut h = ::tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("dir/file-{i}"), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn index(
    blob: &[u8],
    tar: &[u8],
    c: Compression,
    span: u64,
) -> (LayerIndex, Vec<(Digest, Vec<u8>)>) {
    let (idx, chunks, _) = index_with_windows(blob, tar, c, span);
    (idx, chunks)
}

type Chunks = Vec<(Digest, Vec<u8>)>;

fn index_with_windows(
    blob: &[u8],
    tar: &[u8],
    c: Compression,
    span: impl Into<SpanPlan>,
) -> (LayerIndex, Chunks, Vec<u8>) {
    let (mut chunks, mut windows) = (Vec::new(), Vec::new());
    let idx = build_index(
        blob,
        c,
        &crate::digest::sha256(blob),
        &crate::digest::sha256(tar),
        blob.len() as u64,
        span,
        &mut |d, data| {
            chunks.push((d.clone(), data.to_vec()));
            Ok(())
        },
        &mut windows,
        &Limits::default(),
    )
    .unwrap();
    (idx, chunks, windows)
}

/// Decodes every span from the blob alone and checks it against the tar.
fn check_all_spans(idx: &LayerIndex, blob: &[u8], tar: &[u8]) {
    assert_eq!(idx.size, tar.len() as u64);
    let mut covered = 0;
    for span in &idx.spans {
        assert_eq!(span.out_offset, covered, "spans are contiguous");
        let want = &tar[span.out_offset as usize..(span.out_offset + span.out_len) as usize];
        let got = match &span.fetch {
            Fetch::Gzip {
                checkpoint,
                in_start,
                in_end,
                in_digest,
            } => {
                let comp = &blob[*in_start as usize..*in_end as usize];
                crate::digest::verify(in_digest, comp).unwrap();
                // From its checkpoint, which may start before the span (spans between two
                // checkpoints share the first): the output before the span is skipped.
                let cp = &idx.checkpoints[*checkpoint as usize];
                let end = cp.out_offset as usize;
                let skip = (span.out_offset - cp.out_offset) as usize;
                let mut out = gzip::decode_span(
                    cp,
                    &tar[end - cp.window_size()..end],
                    comp,
                    skip + span.out_len as usize,
                )
                .unwrap();
                out.drain(..skip);
                out
            }
            Fetch::Range { in_start, in_end } => {
                blob[*in_start as usize..*in_end as usize].to_vec()
            }
            Fetch::Cached | Fetch::Member { .. } | Fetch::Zstd { .. } => continue,
        };
        assert!(got == want, "span at {} differs", span.out_offset);
        crate::digest::verify(&span.digest, &got).unwrap();
        covered += span.out_len;
    }
    if idx.random_access() {
        assert_eq!(covered, tar.len() as u64);
    }
}

#[test]
fn published_gzip_indexes_must_keep_windows_in_their_file_and_spans_a_window_long() {
    let tar = sample_tar(60);
    let blob = gzip(&tar);
    let (idx, _) = index(&blob, &tar, Compression::Gzip, 64 * 1024);
    idx.validate(1000).unwrap();
    let windowed = idx
        .checkpoints
        .iter()
        .position(|c| c.window_len > 0)
        .expect("a windowed checkpoint");
    // A window outside the window file, or longer than a deflated window can be.
    let mut bad = idx.clone();
    bad.checkpoints[windowed].window_at = bad.windows.as_ref().unwrap().size;
    assert!(bad.validate(1000).unwrap_err().contains("window file"));
    let mut bad = idx.clone();
    bad.checkpoints[windowed].window_len = MAX_WINDOW_LEN + 1;
    assert!(bad.validate(1000).unwrap_err().contains("window file"));
    let mut bad = idx.clone();
    bad.windows = None;
    assert!(bad.validate(1000).unwrap_err().contains("window file"));
    // A span shorter than a window (so the span before a checkpoint would not hold all of
    // its window, and a reader would have to trust the window file).
    let mut bad = idx.clone();
    bad.spans[0].out_len = 100;
    let err = bad.validate(1000).unwrap_err();
    assert!(err.contains("shorter than a checkpoint window"), "{err}");
}

#[test]
fn gzip_spans_decode_independently() {
    let tar = sample_tar(60);
    let blob = gzip(&tar);
    let (idx, chunks, windows) = index_with_windows(&blob, &tar, Compression::Gzip, 256 * 1024);
    assert!(
        idx.checkpoints.len() > 5,
        "{} checkpoints",
        idx.checkpoints.len()
    );
    assert_eq!(idx.entries.len(), 60);
    assert_eq!(chunks.len(), idx.spans.len());
    check_all_spans(&idx, &blob, &tar);
    // Every checkpoint's window in the window file is the output just before it, but for bytes
    // the stream after it never copies (zeroed: sparse), and its span decodes from it; the
    // index names the file by its digest and size.
    let named = idx.windows.clone().expect("a window file");
    assert_eq!(named.size, windows.len() as u64);
    crate::digest::verify(&named.digest, &windows).unwrap();
    assert!(idx.checkpoints.iter().filter(|c| c.window_len > 0).count() > 4);
    let mut zeroed = 0;
    for (k, cp) in idx.checkpoints.iter().enumerate() {
        if cp.window_len == 0 {
            continue;
        }
        let at = cp.window_at as usize..(cp.window_at + cp.window_len) as usize;
        let w = inflate(&windows[at]).unwrap();
        let end = cp.out_offset as usize;
        assert_eq!(w.len(), cp.window_size());
        let real = &tar[end - w.len()..end];
        for (i, (&got, &want)) in w.iter().zip(real).enumerate() {
            assert!(got == want || got == 0, "window at {end}, byte {i}");
            zeroed += usize::from(got != want);
        }
        let span = idx
            .spans
            .iter()
            .find(|s| matches!(s.fetch, Fetch::Gzip { checkpoint, .. } if checkpoint as usize == k))
            .expect("an anchor starts a span");
        let Fetch::Gzip {
            in_start, in_end, ..
        } = span.fetch
        else {
            unreachable!()
        };
        let out = gzip::decode_span(
            cp,
            &w,
            &blob[in_start as usize..in_end as usize],
            span.out_len as usize,
        )
        .unwrap();
        let from = span.out_offset as usize;
        assert!(out[..] == tar[from..from + out.len()], "span at {from}");
    }
    assert!(zeroed > 0, "no window is sparse");
    // Every entry points at its data, as an independent tar reader sees it.
    let mut archive = ::tar::Archive::new(&tar[..]);
    for (entry, indexed) in archive.entries().unwrap().zip(&idx.entries) {
        let mut entry = entry.unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        assert_eq!(indexed.path, entry.path().unwrap().to_str().unwrap());
        assert_eq!(indexed.size, content.len() as u64);
        let at = indexed.offset as usize;
        assert!(
            tar[at..at + content.len()] == content[..],
            "{}",
            indexed.path
        );
    }
    let e = &idx.entries[17];
    assert!(idx.span_at(e.offset).is_some());
    assert!(idx.span_at(idx.size).is_none());
}

#[test]
fn gzip_checkpoints_between_anchors_are_light() {
    // Spans of 32 KiB between anchors every 64 KiB (indexes built before 2026-12-04 had 64 KiB
    // spans between anchors every 128 KiB; now every 64 KiB span is an anchor's).
    let tar = sample_tar_with(60, 2);
    let blob = gzip(&tar);
    let (idx, chunks, windows) = index_with_windows(&blob, &tar, Compression::Gzip, 32 << 10);
    idx.validate(1000).unwrap();
    assert_eq!(chunks.len(), idx.spans.len());
    assert_eq!(idx.spans.len(), idx.checkpoints.len());
    let anchors: Vec<&gzip::Checkpoint> = idx.checkpoints.iter().filter(|c| !c.light).collect();
    let light = idx.checkpoints.len() - anchors.len();
    // Anchors 64 KiB apart, spans of 32 KiB or a little more: about one light checkpoint
    // after each anchor.
    assert!(
        anchors.len() > 3 && light + 1 >= anchors.len(),
        "{} anchors, {light} light checkpoints",
        anchors.len()
    );
    // Windows for anchors only, at least CHECKPOINT_EVERY apart; light checkpoints have none
    // in the file but need one (the span before).
    let windowed: u64 = idx.checkpoints.iter().map(|c| c.window_len).sum();
    assert_eq!(windowed, windows.len() as u64);
    for pair in anchors.windows(2) {
        assert!(pair[1].out_offset - pair[0].out_offset >= gzip::CHECKPOINT_EVERY);
    }
    for cp in idx.checkpoints.iter().filter(|c| c.light) {
        assert_eq!((cp.window_at, cp.window_len), (0, 0));
        assert_eq!(cp.window_size(), gzip::WINDOW);
    }
    assert!(idx.spans[..idx.spans.len() - 1]
        .iter()
        .all(|s| s.out_len >= 32 << 10));
    // Each span decodes from its checkpoint with the output before it as the window.
    check_all_spans(&idx, &blob, &tar);
    // A light first checkpoint, or one with a window in the file, is refused.
    let k = idx.checkpoints.iter().position(|c| c.light).unwrap();
    let mut bad = idx.clone();
    bad.checkpoints[0].light = true;
    assert!(bad.validate(1000).unwrap_err().contains("light checkpoint"));
    let mut bad = idx.clone();
    bad.checkpoints[k].window_len = 100;
    assert!(bad.validate(1000).unwrap_err().contains("light checkpoint"));
    // So is a run of light checkpoints reaching too far from their anchor.
    let mut bad = idx.clone();
    for cp in &mut bad.checkpoints[1..] {
        *cp = gzip::Checkpoint {
            window_at: 0,
            window_len: 0,
            light: true,
            ..cp.clone()
        };
    }
    bad.windows = None;
    let err = bad.validate(1000).unwrap_err();
    assert!(err.contains("no anchor within"), "{err}");
}

#[test]
fn spans_are_single_blocks_where_the_plan_is_fine() {
    let tar = sample_tar_with(60, 2);
    let blob = gzip(&tar);
    let size = tar.len() as u64;
    let (coarse, _, _) = index_with_windows(&blob, &tar, Compression::Gzip, DEFAULT_SPAN);
    // Two ranges (unsorted, one overlapping another), and a one-byte one.
    let fine = vec![
        (size / 2, size / 2 + 300_000),
        (size / 5, size / 5 + 1),
        (size / 2 + 100, size / 2 + 200),
    ];
    let plan = SpanPlan {
        span: DEFAULT_SPAN,
        fine: fine.clone(),
    };
    let (idx, chunks, windows) = index_with_windows(&blob, &tar, Compression::Gzip, plan);
    idx.validate(1000).unwrap();
    assert_eq!(chunks.len(), idx.spans.len());
    assert_eq!((idx.size, &idx.entries), (coarse.size, &coarse.entries));
    // Spans of two blocks (about 125 KB of output here) elsewhere, of one where fine.
    assert!(
        idx.spans.len() >= coarse.spans.len() + 4,
        "{} against {}",
        idx.spans.len(),
        coarse.spans.len()
    );
    // Every checkpoint is an anchor, with its window in the file.
    assert!(idx.checkpoints.iter().all(|c| !c.light));
    let windowed: u64 = idx.checkpoints.iter().map(|c| c.window_len).sum();
    assert_eq!(windowed, windows.len() as u64);
    let near = |s: &Span, by: u64| {
        fine.iter()
            .any(|&(a, b)| s.out_offset < b + by && s.out_offset + s.out_len + by > a)
    };
    let last = idx.spans.len() - 1;
    for (k, s) in idx.spans.iter().enumerate() {
        if near(s, 0) {
            // Cut at the first block boundary a window's length in: one block here.
            assert!(
                s.out_len < DEFAULT_SPAN,
                "span at {} of {}",
                s.out_offset,
                s.out_len
            );
        } else if !near(s, DEFAULT_SPAN) && k != last {
            assert!(
                s.out_len >= DEFAULT_SPAN,
                "span at {} of {}",
                s.out_offset,
                s.out_len
            );
        }
    }
    check_all_spans(&idx, &blob, &tar);
}

#[test]
fn a_block_boundary_at_the_end_of_the_stream_makes_no_empty_span() {
    // Stored blocks (a boundary every 64 KiB), the data flushed (a boundary right at its end)
    // before the final empty block: a checkpoint there would start an empty span, which a
    // published index may not have.
    for n in [20, 21, 22, 23, 24] {
        let tar = sample_tar(n);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        e.write_all(&tar).unwrap();
        e.flush().unwrap();
        let blob = e.finish().unwrap();
        let (idx, _) = index(&blob, &tar, Compression::Gzip, 32 << 10);
        assert!(idx.spans.iter().all(|s| s.out_len > 0), "{n} entries");
        idx.validate(1000).unwrap();
        check_all_spans(&idx, &blob, &tar);
    }
}

#[test]
fn multi_member_gzip_is_followed_across_members() {
    let tar = sample_tar(40);
    // One gzip member per 100 KiB of tar, as eStargz does per file.
    let blob: Vec<u8> = tar.chunks(100 * 1024).flat_map(gzip).collect();
    let (idx, _) = index(&blob, &tar, Compression::Gzip, 64 * 1024);
    assert_eq!(idx.entries.len(), 40);
    check_all_spans(&idx, &blob, &tar);
}

#[test]
fn tar_and_zstd_layers() {
    let tar = sample_tar(20);
    let (idx, _) = index(&tar, &tar, Compression::None, 128 * 1024);
    assert!(idx.random_access());
    check_all_spans(&idx, &tar, &tar);
    let blob = zstd::encode_all(&tar[..], 3).unwrap();
    let (idx, chunks) = index(&blob, &tar, Compression::Zstd, 128 * 1024);
    assert!(!idx.random_access());
    let joined: Vec<u8> = chunks.into_iter().flat_map(|(_, d)| d).collect();
    assert!(joined == tar);
}

/// The error of indexing gzip `blob` (as a layer of digest `digest` and diff_id `diff_id`,
/// `size` bytes: 0 for unknown) that must fail.
fn refused(blob: &[u8], digest: &Digest, diff_id: &Digest, size: u64) -> LayerError {
    build_index(
        blob,
        Compression::Gzip,
        digest,
        diff_id,
        size,
        65536,
        &mut |_, _| Ok(()),
        &mut std::io::sink(),
        &Limits::default(),
    )
    .unwrap_err()
}

#[test]
fn wrong_digests_and_corruption_are_detected() {
    let tar = sample_tar(10);
    let blob = gzip(&tar);
    let wrong = crate::digest::sha256(b"other");
    let err = refused(&blob[..], &wrong, &crate::digest::sha256(&tar), 0);
    assert!(err.to_string().contains("blob digest mismatch"), "{err}");
    let err = refused(&blob[..], &crate::digest::sha256(&blob), &wrong, 0);
    assert!(err.to_string().contains("diff_id mismatch"), "{err}");
    let half = &blob[..blob.len() / 2];
    let err = refused(half, &crate::digest::sha256(&blob), &wrong, 0);
    assert!(
        err.to_string().contains("blob digest mismatch"),
        "cut in transit: {err}"
    );
    let err = refused(half, &crate::digest::sha256(half), &wrong, 0);
    assert!(
        err.to_string().contains("truncated"),
        "published truncated: {err}"
    );
    // A flipped byte inside a span fails its compressed digest.
    let (idx, _) = index(&blob, &tar, Compression::Gzip, 65536);
    if let Fetch::Gzip {
        in_start,
        in_end,
        in_digest,
        ..
    } = &idx.spans[1].fetch
    {
        let mut comp = blob[*in_start as usize..*in_end as usize].to_vec();
        comp[10] ^= 1;
        assert!(crate::digest::verify(in_digest, &comp).is_err());
    } else {
        panic!("gzip span expected");
    }
}

/// A deflate block that never ends — one fixed-Huffman block of length-258 copies, 13 bits
/// for each 258 bytes of output — is refused once its span would pass [`MAX_SPAN`], rather
/// than held in memory whole.
#[test]
fn an_endless_deflate_block_is_refused_at_the_span_bound() {
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// `len` bits of `v`, least significant first (deflate's order for all but codes).
        fn put(&mut self, v: u64, len: u32) {
            self.acc |= v << self.n;
            self.n += len;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code: most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            self.put(code.reverse_bits() >> (64 - len), len);
        }
    }
    let mut bits = Bits::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed codes
    bits.code(0x30, 8); // literal 0
    let copies = (MAX_SPAN + (1 << 20)) / 258;
    for _ in 0..copies {
        bits.code(0xc5, 8); // length symbol 285: 258 bytes
        bits.code(0, 5); // distance code 0: 1 byte back
    }
    bits.code(0, 7); // end of block
    bits.put(0, 7);
    let mut blob = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    blob.extend_from_slice(&bits.out);
    blob.extend_from_slice(&[0; 8]);
    let err = refused(
        &blob[..],
        &crate::digest::sha256(&blob),
        &crate::digest::sha256(b"any"),
        blob.len() as u64,
    );
    assert!(
        err.to_string()
            .contains("deflate block runs on for more than 64 MiB"),
        "{err}"
    );
}
