//! Blob sources: where the bytes of a layer blob come from.
//!
//! The seam between the registry and the layer/cache stages. A [`BlobSource`] knows a blob's
//! size and reads byte ranges of it; it verifies nothing (callers check ranges against span
//! digests). Implementations: [`RegistrySource`] (HTTP Range requests), [`FileSource`] (a local
//! file, e.g. a downloaded blob) and [`FaultySource`] (wraps another and injects faults, for
//! tests). No registry types appear in the layer or cache signatures; they see only this trait.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use oci_spec::image::Digest;

use crate::reference::Reference;
use crate::registry::Registry;

/// A failed read, naming the blob.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("read of {len} bytes at {offset} is outside blob {digest} of {size} bytes")]
    OutOfRange {
        digest: Digest,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("injected fault: {0}")]
    Injected(String),
    /// The error of a request that several reads shared (each waiting read gets it).
    #[error("{0}")]
    Shared(#[source] Arc<SourceError>),
}

/// A boxed future, so the trait stays object safe.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, SourceError>> + Send + 'a>>;

/// A boxed future of bytes handed on as they arrive.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send + 'a>>;

/// A boxed future of several ranges' bytes.
pub type RangesFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Vec<u8>>, SourceError>> + Send + 'a>>;

/// Random access to one blob.
pub trait BlobSource: Send + Sync {
    /// The blob's size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `len` bytes at `offset`.
    fn read_range(&self, offset: u64, len: u64) -> ReadFuture<'_>;
    /// As [`read_range`](Self::read_range), but handing the bytes to `sink` in order as they
    /// arrive (the default: all at once).
    fn read_range_to<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: crate::registry::Sink<'a>,
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            sink(&self.read_range(offset, len).await?).await;
            Ok(())
        })
    }
    /// Whether [`read_ranges`](Self::read_ranges) asks for several ranges in one request
    /// (else it reads them one after another, and callers had better not wait for them all).
    fn ranges_together(&self) -> bool {
        false
    }
    /// Reads `ranges` (offset, length), each returned in the order asked; a source that can
    /// (a registry answering several ranges per request) asks for them together.
    fn read_ranges<'a>(&'a self, ranges: &'a [(u64, u64)]) -> RangesFuture<'a> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(ranges.len());
            for &(offset, len) in ranges {
                out.push(self.read_range(offset, len).await?);
            }
            Ok(out)
        })
    }
}

fn check_range(digest: &Digest, size: u64, offset: u64, len: u64) -> Result<(), SourceError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(SourceError::OutOfRange {
            digest: digest.clone(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// A blob in a registry, read with HTTP Range requests.
pub struct RegistrySource {
    client: Arc<dyn Registry>,
    reference: Reference,
    digest: Digest,
    size: u64,
    fetched: Arc<AtomicU64>,
    /// Ranges of this blob requested ahead ([`crate::registry::Early`]): a read of exactly
    /// such a range takes its answer instead of asking again.
    early: Option<Arc<crate::registry::Early>>,
}

impl RegistrySource {
    /// `size` comes from the manifest's descriptor, so no request is needed to learn it.
    /// Bytes read are added to `fetched` (shared by every source of one blob).
    pub fn new(
        client: Arc<dyn Registry>,
        reference: Reference,
        digest: Digest,
        size: u64,
        fetched: Arc<AtomicU64>,
    ) -> Self {
        RegistrySource {
            client,
            reference,
            digest,
            size,
            fetched,
            early: None,
        }
    }

    /// Reads take the answers of ranges of this blob requested ahead in `early`.
    pub fn with_early(mut self, early: Arc<crate::registry::Early>) -> Self {
        self.early = Some(early);
        self
    }

    /// Counts `n` bytes read of this blob (here and in the metrics).
    fn count(&self, n: usize) {
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
        crate::metrics::metrics().fetched(self.digest.as_ref(), n as u64);
    }
}

impl BlobSource for RegistrySource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> ReadFuture<'_> {
        Box::pin(async move {
            check_range(&self.digest, self.size, offset, len)?;
            let ahead = match &self.early {
                Some(early) => {
                    early
                        .take(&(self.digest.clone(), Some((offset, len))))
                        .await
                }
                None => None,
            };
            let data = match ahead.filter(|d| d.len() as u64 == len) {
                Some(data) => data,
                None => {
                    self.client
                        .read_range((&self.reference, &self.digest), offset, len)
                        .await?
                }
            };
            self.count(data.len());
            Ok(data)
        })
    }

    fn read_range_to<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: crate::registry::Sink<'a>,
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            check_range(&self.digest, self.size, offset, len)?;
            let counted = |bytes: &[u8]| {
                self.count(bytes.len());
                sink(bytes)
            };
            self.client
                .read_range_to((&self.reference, &self.digest), offset, len, &counted)
                .await?;
            Ok(())
        })
    }

    fn ranges_together(&self) -> bool {
        self.client.ranges_together((&self.reference, &self.digest))
    }

    fn read_ranges<'a>(&'a self, ranges: &'a [(u64, u64)]) -> RangesFuture<'a> {
        Box::pin(async move {
            for &(offset, len) in ranges {
                check_range(&self.digest, self.size, offset, len)?;
            }
            let data = self
                .client
                .read_ranges((&self.reference, &self.digest), ranges)
                .await?;
            self.count(data.iter().map(Vec::len).sum());
            Ok(data)
        })
    }
}

/// A blob in a local file.
pub struct FileSource {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

impl FileSource {
    pub fn open(path: impl Into<PathBuf>, digest: Digest) -> Result<Self, SourceError> {
        let path = path.into();
        let size = std::fs::metadata(&path)
            .map_err(|source| SourceError::Io {
                what: path.display().to_string(),
                source,
            })?
            .len();
        Ok(FileSource { path, digest, size })
    }
}

impl BlobSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> ReadFuture<'_> {
        Box::pin(async move {
            check_range(&self.digest, self.size, offset, len)?;
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let file = std::fs::File::open(&path)?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await
            .expect("blocking read task")
            .map_err(|source| SourceError::Io {
                what: self.path.display().to_string(),
                source,
            })
        })
    }
}

/// Faults a [`FaultySource`] injects.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Flip the byte at this blob offset in every read that covers it.
    pub flip_byte_at: Option<u64>,
    /// Fail every read while set.
    pub fail: bool,
    /// Pretend the blob ends here: reads past it fail.
    pub truncate_at: Option<u64>,
    /// Answer every read after this long (a slow link).
    pub delay: Option<std::time::Duration>,
}

/// Wraps a source and injects [`Faults`]; counts reads and bytes.
pub struct FaultySource<S> {
    inner: S,
    faults: Mutex<Faults>,
    reads: AtomicU64,
    bytes: AtomicU64,
    started: AtomicU64,
}

impl<S: BlobSource> FaultySource<S> {
    pub fn new(inner: S) -> Self {
        FaultySource {
            inner,
            faults: Mutex::default(),
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }

    /// Reads begun so far (answered or not).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    /// (reads, bytes) served so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// What every read goes through first: counted as begun, delayed, failed if told to.
    async fn begin(&self) -> Result<Faults, SourceError> {
        self.started.fetch_add(1, Ordering::Relaxed);
        let faults = self.faults.lock().unwrap().clone();
        if let Some(delay) = faults.delay {
            tokio::time::sleep(delay).await;
        }
        if faults.fail {
            return Err(SourceError::Injected("source unavailable".into()));
        }
        Ok(faults)
    }

    /// `len` bytes at `offset` from the inner source, truncated or corrupted as told.
    async fn range(&self, faults: &Faults, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        if faults.truncate_at.is_some_and(|t| offset + len > t) {
            return Err(SourceError::Injected("blob truncated".into()));
        }
        let mut data = self.inner.read_range(offset, len).await?;
        if let Some(at) = faults
            .flip_byte_at
            .filter(|at| (offset..offset + len).contains(at))
        {
            data[(at - offset) as usize] ^= 0xff;
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(data)
    }
}

impl<S: BlobSource> BlobSource for FaultySource<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_range(&self, offset: u64, len: u64) -> ReadFuture<'_> {
        Box::pin(async move {
            let faults = self.begin().await?;
            let data = self.range(&faults, offset, len).await?;
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(data)
        })
    }

    /// As a registry answering several ranges at once.
    fn ranges_together(&self) -> bool {
        true
    }

    /// One read for all of them (as a registry answering several ranges at once), with the
    /// same faults.
    fn read_ranges<'a>(&'a self, ranges: &'a [(u64, u64)]) -> RangesFuture<'a> {
        Box::pin(async move {
            let faults = self.begin().await?;
            let mut out = Vec::with_capacity(ranges.len());
            for &(offset, len) in ranges {
                out.push(self.range(&faults, offset, len).await?);
            }
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(out)
        })
    }
}

/// A blocking `Read` over a whole blob, fetched front to back in `chunk`-sized ranges with up
/// to `parallel` requests in flight. Runs on a blocking thread; the fetches run on `handle`.
pub struct SequentialReader {
    source: Arc<dyn BlobSource>,
    handle: tokio::runtime::Handle,
    next: u64,
    chunk: u64,
    parallel: usize,
    inflight: std::collections::VecDeque<tokio::task::JoinHandle<Result<Vec<u8>, SourceError>>>,
    current: Vec<u8>,
    pos: usize,
    /// The first error: every later read fails too, so no reader mistakes a gap for the end.
    failed: Option<String>,
}

impl SequentialReader {
    pub fn new(
        source: Arc<dyn BlobSource>,
        handle: tokio::runtime::Handle,
        chunk: u64,
        parallel: usize,
    ) -> Self {
        SequentialReader {
            source,
            handle,
            next: 0,
            chunk: chunk.max(1),
            parallel: parallel.max(1),
            inflight: Default::default(),
            current: Vec::new(),
            pos: 0,
            failed: None,
        }
    }
}

impl std::io::Read for SequentialReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(e.clone()));
        }
        if self.pos == self.current.len() {
            let size = self.source.size();
            while self.inflight.len() < self.parallel && self.next < size {
                let (offset, len) = (self.next, self.chunk.min(size - self.next));
                self.next += len;
                let source = self.source.clone();
                self.inflight.push_back(
                    self.handle
                        .spawn(async move { source.read_range(offset, len).await }),
                );
            }
            let Some(next) = self.inflight.pop_front() else {
                return Ok(0);
            };
            let result = match self.handle.block_on(next) {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(data) => self.current = data,
                Err(e) => {
                    self.inflight.drain(..).for_each(|t| t.abort());
                    self.failed = Some(e.clone());
                    return Err(std::io::Error::other(e));
                }
            }
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
