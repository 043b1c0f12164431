//! Turning fetched bytes into a span's output: gzip from a checkpoint (with its window),
//! zstd frames, or stored bytes — each checked against the span's digest — and the CPU
//! priority of that work.

use super::ReadError;
use crate::cache::CacheError;
use crate::layer::{gzip, Fetch, LayerIndex};

/// Lowers the calling thread's CPU priority (nice 10) until dropped, then restores it. For
/// work done ahead of reads, so that it yields the CPU to the requests a workload is waiting
/// for. Pool threads are reused (tokio runs its async workers on them too), so a thread must
/// never stay lowered: nothing is lowered unless this process has shown, once, on a thread of
/// its own, that it can raise a priority back (CAP_SYS_NICE or RLIMIT_NICE; root has them).
pub(crate) struct LowerPriority(Option<(libc::id_t, libc::c_int)>);

/// This thread's id and nice value, if they can be had.
fn thread_priority() -> Option<(libc::id_t, libc::c_int)> {
    // SAFETY: plain syscalls about this thread; errno is this thread's own.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some((tid, nice))
    }
}

fn set_priority(tid: libc::id_t, nice: libc::c_int) -> bool {
    // SAFETY: a plain syscall on a thread id of this process.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0 }
}

/// Whether this process can lower a thread's priority and raise it back (tried once).
fn can_restore() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::spawn(|| {
            thread_priority().is_some_and(|(tid, nice)| {
                set_priority(tid, nice.max(10)) && set_priority(tid, nice)
            })
        })
        .join()
        .unwrap_or(false)
    })
}

impl LowerPriority {
    pub(crate) fn new() -> LowerPriority {
        let lowered = thread_priority()
            .filter(|&(tid, nice)| nice < 10 && can_restore() && set_priority(tid, 10));
        LowerPriority(lowered)
    }
}

impl Drop for LowerPriority {
    fn drop(&mut self) {
        if let Some((tid, nice)) = self.0 {
            if !set_priority(tid, nice) {
                tracing::warn!(nice, "could not restore a thread's CPU priority");
            }
        }
    }
}

/// Span `span` of `index` from its fetched (compressed) bytes `raw`, verified; `before` is
/// output known to precede the span (a gzip span's checkpoint window is taken from it).
pub(super) fn decode(
    index: &LayerIndex,
    span: &crate::layer::Span,
    raw: &[u8],
    before: Option<&[u8]>,
) -> SpanResult {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        crate::metrics::metrics().verification_failures.inc();
        CacheError::from(ReadError::Verification {
            blob: index.blob.to_string(),
            offset: span.out_offset,
            what: what.to_string(),
            detail: e.to_string(),
        })
    };
    let data = match &span.fetch {
        Fetch::Range { .. } => raw.to_vec(),
        Fetch::Gzip {
            checkpoint,
            in_digest,
            ..
        } => {
            crate::digest::verify(in_digest, raw).map_err(|e| bad("compressed bytes", &e))?;
            let cp = &index.checkpoints[*checkpoint as usize];
            let window = match cp.window_size() {
                0 => &[][..],
                _ => before.and_then(|b| cp.window_from(b)).ok_or_else(|| {
                    CacheError::from(ReadError::NoWindowAtHand {
                        blob: index.blob.to_string(),
                        offset: span.out_offset,
                    })
                })?,
            };
            gzip::decode_span(cp, window, raw, span.out_len as usize)
                .map_err(|e| bad("decompression", &e))?
        }
        Fetch::Member { skip, .. } => {
            gzip::decode_member(raw, *skip as usize, span.out_len as usize)
                .map_err(|e| bad("decompression", &e))?
        }
        Fetch::Zstd { .. } => {
            decode_zstd(raw, span.out_len).map_err(|e| bad("decompression", &e))?
        }
        Fetch::Cached => unreachable!("cache-only spans are streamed, not fetched"),
    };
    crate::digest::verify(&span.digest, &data).map_err(|e| bad("uncompressed bytes", &e))?;
    Ok(data)
}

pub(super) type SpanResult = Result<Vec<u8>, CacheError>;

/// The first `len` bytes decompressed from the zstd frames in `raw` (frames after the ones
/// holding them, such as the next entry's tar header, are not decoded).
pub(super) fn decode_zstd(raw: &[u8], len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(len as usize);
    zstd::stream::read::Decoder::new(raw)?
        .take(len)
        .read_to_end(&mut out)?;
    if out.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("zstd frames hold {} of {len} bytes", out.len()),
        ));
    }
    Ok(out)
}

pub(super) fn fetch_range(fetch: &Fetch) -> Option<(u64, u64)> {
    match fetch {
        Fetch::Range { in_start, in_end }
        | Fetch::Gzip {
            in_start, in_end, ..
        }
        | Fetch::Member {
            in_start, in_end, ..
        }
        | Fetch::Zstd { in_start, in_end } => Some((*in_start, *in_end)),
        Fetch::Cached => None,
    }
}
