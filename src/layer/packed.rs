//! How a published layer index travels: its JSON, zstd-compressed ([`pack`]; gzip, as
//! indexes published before 2026-12-07 are, is read too). The index blob is fetched whole at
//! a layer's first open, before any of its reads can be served, so its size is part of every
//! cold mount: on the cold-start benchmark's image zstd (level 19) makes the three indexes
//! 520 KB against 674 KB with gzip (level 6).
//!
//! Untrusted input (the registry serves it; the manifest's pin vouches for it only once its
//! digest is checked, and a referrer index not even then). Bounds: at most `max` bytes of
//! JSON are produced, and a zstd frame may ask for a window of at most
//! 2^[`MAX_WINDOW_LOG`] bytes.

use std::io::Read;

/// zstd level of indexes packed here (slow to pack, once per `stratafs index push`; as fast
/// to unpack as any level).
const LEVEL: i32 = 19;
/// Largest zstd window (log2 of bytes) an index blob may ask of its reader: 8 MiB, more than
/// level 19 uses for an index of any size.
pub const MAX_WINDOW_LOG: u32 = 23;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// `json`, packed for publishing.
pub fn pack(json: &[u8]) -> Vec<u8> {
    zstd::encode_all(json, LEVEL).expect("in-memory zstd")
}

/// The JSON of packed index `blob` (zstd or gzip, told by its first bytes), at most `max`
/// bytes of it (`[index] max_toc_bytes`); the error says what is wrong.
pub fn unpack(blob: &[u8], max: u64) -> Result<Vec<u8>, String> {
    unpack_within(blob, max, "[index] max_toc_bytes")
}

/// [`unpack`] for any packed JSON (a startup profile's too), whose limit `max` the error
/// calls `limit`.
pub fn unpack_within(blob: &[u8], max: u64, limit: &str) -> Result<Vec<u8>, String> {
    let mut json = Vec::new();
    let read = if blob.starts_with(&ZSTD_MAGIC) {
        let mut d = zstd::stream::read::Decoder::new(blob).map_err(|e| e.to_string())?;
        d.window_log_max(MAX_WINDOW_LOG)
            .map_err(|e| e.to_string())?;
        d.take(max.saturating_add(1)).read_to_end(&mut json)
    } else if blob.starts_with(&GZIP_MAGIC) {
        flate2::read::GzDecoder::new(blob)
            .take(max.saturating_add(1))
            .read_to_end(&mut json)
    } else {
        return Err("neither zstd nor gzip".to_string());
    };
    read.map_err(|e| format!("decompressing: {e}"))?;
    if json.len() as u64 > max {
        return Err(format!("larger than the {max}-byte limit ({limit})"));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::tests::gzip;
    use std::io::Write;

    #[test]
    fn zstd_and_gzip_unpack_and_anything_else_is_refused() {
        let json = br#"{"version":6,"entries":[]}"#.repeat(100);
        let packed = pack(&json);
        assert!(packed.starts_with(&ZSTD_MAGIC));
        assert!(packed.len() < gzip(&json).len());
        assert_eq!(unpack(&packed, 1 << 20).unwrap(), json);
        assert_eq!(unpack(&gzip(&json), 1 << 20).unwrap(), json);
        assert!(unpack(&json, 1 << 20).unwrap_err().contains("neither"));
        // Truncated: an error, not a short index.
        assert!(unpack(&packed[..packed.len() / 2], 1 << 20).is_err());
    }

    #[test]
    fn more_than_the_limit_is_refused_without_unpacking_it_all() {
        let json = vec![b' '; 1 << 20];
        for blob in [pack(&json), gzip(&json)] {
            let e = unpack(&blob, 1000).unwrap_err();
            assert!(e.contains("1000-byte limit"), "{e}");
        }
    }

    #[test]
    fn a_frame_asking_for_a_larger_window_is_refused() {
        // A frame whose header asks for a 2^27-byte window (long-distance matching).
        let json = vec![b'x'; 4 << 10];
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.window_log(27).unwrap();
        e.long_distance_matching(true).unwrap();
        e.set_pledged_src_size(None).unwrap();
        e.write_all(&json).unwrap();
        let blob = e.finish().unwrap();
        let e = unpack(&blob, 1 << 20).unwrap_err();
        assert!(e.contains("too much memory"), "{e}");
    }
}
