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
