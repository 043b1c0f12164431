//! An in-process [`Registry`] for unit tests: repositories held in memory, every request
//! counted, and faults on demand — range reads that fail, blobs whose stored bytes are
//! corrupted (so the layers above must notice). Integration tests use the real registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use oci_spec::image::Digest;

use super::{At, Fetched, Registry, RegistryError, RegistryFuture};
use crate::reference::Reference;

/// Requests a [`FakeRegistry`] has answered, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub manifests: u64,
    pub blobs: u64,
    pub ranges: u64,
    /// Bytes returned by range reads.
    pub range_bytes: u64,
}

/// Repositories in memory: blobs and manifests by digest (per repository), tags per repository.
#[derive(Default)]
pub struct FakeRegistry {
    /// (repository, digest) → bytes, for blobs and manifests alike.
    objects: Mutex<HashMap<(String, String), Vec<u8>>>,
    /// (repository, digest) → media type of a manifest.
    media_types: Mutex<HashMap<(String, String), String>>,
    /// (repository, tag) → manifest digest.
    tags: Mutex<HashMap<(String, String), Digest>>,
    requests: Mutex<Requests>,
    /// Range reads still to fail.
    failing_ranges: AtomicU64,
    /// Range reads wait while a test holds this for writing ([`FakeRegistry::hold_ranges`]).
    gate: std::sync::Arc<tokio::sync::RwLock<()>>,
    /// Fetches of this blob wait while a test holds `blob_gate` ([`FakeRegistry::hold_blob`]).
    held_blob: Mutex<Option<Digest>>,
    blob_gate: std::sync::Arc<tokio::sync::RwLock<()>>,
}

impl FakeRegistry {
    pub fn new() -> FakeRegistry {
        FakeRegistry::default()
    }

    /// Stores blob `data` in `repository`; returns its digest.
    pub fn add_blob(&self, repository: &str, data: &[u8]) -> Digest {
        let digest = crate::digest::sha256(data);
        self.objects
            .lock()
            .unwrap()
            .insert((repository.to_string(), digest.to_string()), data.to_vec());
        digest
    }

    /// Stores manifest `data` of `media_type` in `repository`, tagged `tag`; returns its digest.
    pub fn add_manifest(
        &self,
        repository: &str,
        tag: &str,
        media_type: &str,
        data: &[u8],
    ) -> Digest {
        let digest = self.add_blob(repository, data);
        let key = (repository.to_string(), digest.to_string());
        self.media_types
            .lock()
            .unwrap()
            .insert(key, media_type.to_string());
        self.tags
            .lock()
            .unwrap()
            .insert((repository.to_string(), tag.to_string()), digest.clone());
        digest
    }

    /// Flips one byte at `offset` of the stored object `digest`: what a registry (or a path to
    /// it) that corrupts data would send from then on.
    pub fn corrupt(&self, repository: &str, digest: &Digest, offset: usize) {
        let mut objects = self.objects.lock().unwrap();
        let data = objects
            .get_mut(&(repository.to_string(), digest.to_string()))
            .expect("object stored");
        data[offset] ^= 0xff;
    }

    /// The next `n` range reads fail as a registry answering 503 would.
    pub fn fail_ranges(&self, n: u64) {
        self.failing_ranges.store(n, Ordering::SeqCst);
    }

    /// Holds every range read until the guard is dropped.
    pub fn hold_ranges(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate
            .clone()
            .try_write_owned()
            .expect("ranges are held once at a time")
    }

    /// Holds every fetch of blob `digest` until the guard is dropped.
    pub fn hold_blob(&self, digest: &Digest) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        *self.held_blob.lock().unwrap() = Some(digest.clone());
        self.blob_gate
            .clone()
            .try_write_owned()
            .expect("blobs are held once at a time")
    }

    /// A 503 while range reads are still to fail.
    fn injected_fault(&self, reference: &Reference, digest: &Digest) -> Result<(), RegistryError> {
        let failing = self
            .failing_ranges
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match failing {
            Ok(_) => Err(RegistryError::Status {
                host: reference.registry().to_string(),
                url: format!("/v2/{}/blobs/{digest}", reference.repository()),
                status: 503,
                detail: "injected fault".into(),
            }),
            Err(_) => Ok(()),
        }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> Requests {
        *self.requests.lock().unwrap()
    }

    fn object(&self, reference: &Reference, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let key = (reference.repository().to_string(), digest.to_string());
        self.objects
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound {
                reference: format!("{}@{digest}", reference.name()),
                registry: reference.registry().to_string(),
            })
    }

    fn manifest(&self, reference: &Reference, digest: &Digest) -> Result<Fetched, RegistryError> {
        self.requests.lock().unwrap().manifests += 1;
        let data = self.object(reference, digest)?;
        verify(reference, "manifest", digest, &data)?;
        let key = (reference.repository().to_string(), digest.to_string());
        let media_type = self.media_types.lock().unwrap().get(&key).cloned();
        Ok(Fetched {
            media_type: media_type.unwrap_or_default(),
            digest: digest.clone(),
            data,
        })
    }
}

/// Checks `data` against `digest` as the real client does.
fn verify(
    reference: &Reference,
    what: &str,
    digest: &Digest,
    data: &[u8],
) -> Result<(), RegistryError> {
    crate::digest::verify(digest, data).map_err(|source| RegistryError::Digest {
        what: format!("{what} {digest}"),
        reference: reference.to_string(),
        source: Box::new(source),
    })
}

impl Registry for FakeRegistry {
    fn resolve<'a>(&'a self, reference: &'a Reference) -> RegistryFuture<'a, Fetched> {
        Box::pin(async move {
            let digest = match (reference.digest(), reference.tag()) {
                (Some(d), _) => d.clone(),
                (None, Some(tag)) => {
                    let key = (reference.repository().to_string(), tag.to_string());
                    let found = self.tags.lock().unwrap().get(&key).cloned();
                    found.ok_or_else(|| RegistryError::NotFound {
                        reference: reference.to_string(),
                        registry: reference.registry().to_string(),
                    })?
                }
                (None, None) => unreachable!("a parsed reference has a tag or a digest"),
            };
            self.manifest(reference, &digest)
        })
    }

    fn fetch_manifest<'a>(&'a self, (reference, digest): At<'a>) -> RegistryFuture<'a, Fetched> {
        Box::pin(async move { self.manifest(reference, digest) })
    }

    /// A registry without the referrers API (as the distribution registry before 3.0).
    fn referrers<'a>(&'a self, _: At<'a>, _: &'a str) -> RegistryFuture<'a, Option<Vec<u8>>> {
        Box::pin(async { Ok(None) })
    }

    fn fetch_blob<'a>(&'a self, at: At<'a>, cap: Option<u64>) -> RegistryFuture<'a, Vec<u8>> {
        let (reference, digest) = at;
        Box::pin(async move {
            let held = self.held_blob.lock().unwrap().as_ref() == Some(digest);
            let _open = match held {
                true => Some(self.blob_gate.read().await),
                false => None,
            };
            self.requests.lock().unwrap().blobs += 1;
            let data = self.object(reference, digest)?;
            let limit = cap.unwrap_or(4 << 20);
            if data.len() as u64 > limit {
                return Err(RegistryError::TooLarge {
                    what: format!("blob {digest}"),
                    reference: reference.to_string(),
                    limit,
                });
            }
            verify(reference, "blob", digest, &data)?;
            Ok(data)
        })
    }

    fn ranges_together(&self, _: At<'_>) -> bool {
        true
    }

    /// One request for all of them, as a registry answering `multipart/byteranges` does.
    fn read_ranges<'a>(
        &'a self,
        at: At<'a>,
        ranges: &'a [(u64, u64)],
    ) -> RegistryFuture<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let (reference, digest) = at;
            let _open = self.gate.read().await;
            self.injected_fault(reference, digest)?;
            let data = self.object(reference, digest)?;
            let out: Vec<Vec<u8>> = ranges
                .iter()
                .map(|&(offset, len)| piece(&data, offset, len))
                .collect();
            let mut requests = self.requests.lock().unwrap();
            requests.ranges += 1;
            requests.range_bytes += out.iter().map(|d| d.len() as u64).sum::<u64>();
            Ok(out)
        })
    }

    fn read_range<'a>(&'a self, at: At<'a>, offset: u64, len: u64) -> RegistryFuture<'a, Vec<u8>> {
        let (reference, digest) = at;
        Box::pin(async move {
            let _open = self.gate.read().await;
            self.requests.lock().unwrap().ranges += 1;
            self.injected_fault(reference, digest)?;
            let piece = piece(&self.object(reference, digest)?, offset, len);
            self.requests.lock().unwrap().range_bytes += piece.len() as u64;
            Ok(piece)
        })
    }
}

/// Bytes `offset..offset + len` of `data`, cut at its end.
fn piece(data: &[u8], offset: u64, len: u64) -> Vec<u8> {
    let end = offset.saturating_add(len).min(data.len() as u64);
    data[offset.min(end) as usize..end as usize].to_vec()
}
