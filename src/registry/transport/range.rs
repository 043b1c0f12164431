//! A range of a blob read from a response body: into memory, or handed on as it arrives.

use std::sync::Mutex;

use reqwest::Response;

/// A range of a blob being read, and its bytes received so far, across the requests (and
/// endpoints) that carry it.
pub(super) struct RangeRead<'s> {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) data: Mutex<Vec<u8>>,
    /// Where the bytes go as they arrive, if not into `data`; `passed` of them so far.
    pub(super) sink: Option<crate::registry::Sink<'s>>,
    pub(super) passed: Mutex<u64>,
}

impl RangeRead<'_> {
    /// The blob offset of the next byte wanted.
    pub(super) fn next(&self) -> u64 {
        self.offset + self.got()
    }

    fn got(&self) -> u64 {
        match self.sink {
            Some(_) => *self.passed.lock().unwrap(),
            None => self.data.lock().unwrap().len() as u64,
        }
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
            let left = self.len - self.got();
            let take = left.min(chunk.len() as u64) as usize;
            match self.sink {
                Some(sink) => {
                    sink(&chunk[..take]);
                    *self.passed.lock().unwrap() += take as u64;
                }
                None => self.data.lock().unwrap().extend_from_slice(&chunk[..take]),
            }
            if take as u64 == left {
                break;
            }
        }
        Ok(())
    }
}
