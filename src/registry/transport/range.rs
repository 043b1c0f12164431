//! A range of a blob read from a response body: into memory, or handed on as it arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use reqwest::Response;

use crate::registry::Sink;

/// A range of a blob being read, and its bytes received so far, across the requests (and
/// endpoints) that carry it.
pub(super) struct RangeRead<'s> {
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Bytes received so far (kept in `data`, or handed to `sink`).
    got: AtomicU64,
    data: Mutex<Vec<u8>>,
    sink: Option<Sink<'s>>,
}

impl<'s> RangeRead<'s> {
    /// `len` bytes at `offset`, kept in memory or, with `sink`, handed to it as they arrive.
    pub(super) fn new(offset: u64, len: u64, sink: Option<Sink<'s>>) -> RangeRead<'s> {
        let capacity = if sink.is_some() { 0 } else { len.min(64 << 20) };
        RangeRead {
            offset,
            len,
            got: AtomicU64::new(0),
            data: Mutex::new(Vec::with_capacity(capacity as usize)),
            sink,
        }
    }

    /// The bytes kept (none when they went to a sink).
    pub(super) fn into_data(self) -> Vec<u8> {
        self.data.into_inner().unwrap()
    }

    /// The blob offset of the next byte wanted.
    pub(super) fn next(&self) -> u64 {
        self.offset + self.got.load(Ordering::Relaxed)
    }

    /// Appends the body's bytes, after skipping `skip` (for servers that ignore Range), until
    /// the range is complete or the body ends.
    pub(super) async fn read_body(
        &self,
        mut resp: Response,
        mut skip: u64,
    ) -> Result<(), reqwest::Error> {
        while let Some(chunk) = resp.chunk().await? {
            let mut chunk = &chunk[..];
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                chunk = &chunk[n as usize..];
                skip -= n;
            }
            let left = self.len - self.got.load(Ordering::Relaxed);
            let take = left.min(chunk.len() as u64) as usize;
            match self.sink {
                Some(sink) => sink(&chunk[..take]).await,
                None => self.data.lock().unwrap().extend_from_slice(&chunk[..take]),
            }
            self.got.fetch_add(take as u64, Ordering::Relaxed);
            if take as u64 == left {
                break;
            }
        }
        Ok(())
    }
}
