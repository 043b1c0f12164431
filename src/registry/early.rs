//! Requests started before anything asks for them, held until something does: while an image
//! is being pulled for a mount, the first request that opening each of its layers will make
//! (a pinned index blob, an eStargz footer, a zstd:chunked TOC) starts as soon as the manifest
//! names it, beside the config's fetch instead of after it — one round trip less before the
//! mount answers.
//!
//! Only bytes are held, never trust: a taker uses them exactly as it would use its own
//! request's answer (a blob fetched whole was checked against its digest by the client; a
//! range is checked by whatever reads it, as any range is). A request that failed, or one
//! nobody started, leaves the taker to make its own. Entries are consumed by the one taker of
//! their key; [`Early::clear`] drops (and aborts) the rest, so what the process holds is at
//! most one answer per layer of the manifest, until the layers are open.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use oci_spec::image::Digest;
use tokio::task::JoinHandle;

use super::RegistryError;

/// What a held request asked for: a blob whole (`None`) or `len` bytes at `offset`.
pub type EarlyKey = (Digest, Option<(u64, u64)>);

/// A request under way (or answered) on the runtime.
type Request = JoinHandle<Result<Vec<u8>, RegistryError>>;

/// Requests started ahead, by what they ask for.
#[derive(Default)]
pub struct Early {
    held: Mutex<HashMap<EarlyKey, Request>>,
}

impl Early {
    /// Starts `request` for `key` on the runtime, unless one for `key` is already held.
    pub fn start<F>(&self, key: EarlyKey, request: F)
    where
        F: Future<Output = Result<Vec<u8>, RegistryError>> + Send + 'static,
    {
        let mut held = self.held.lock().unwrap();
        held.entry(key).or_insert_with(|| tokio::spawn(request));
    }

    /// The answer of the request held for `key`, waiting for it if it is still under way;
    /// `None` if none was started or it failed (the caller then asks itself).
    pub async fn take(&self, key: &EarlyKey) -> Option<Vec<u8>> {
        let handle = self.held.lock().unwrap().remove(key)?;
        match handle.await {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                tracing::debug!(blob = %key.0, error = %e, "request started early failed: asking again");
                None
            }
            Err(_) => None,
        }
    }

    /// How many requests are held.
    pub fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Whether no request is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every request nobody took, aborting those still under way.
    pub fn clear(&self) {
        for (_, handle) in self.held.lock().unwrap().drain() {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, range: Option<(u64, u64)>) -> EarlyKey {
        (crate::digest::sha256(&[n]), range)
    }

    #[tokio::test]
    async fn an_answer_is_taken_once_and_a_failure_leaves_the_asking_to_the_taker() {
        let early = Early::default();
        early.start(key(1, None), async { Ok(b"index".to_vec()) });
        // A second start for the same key keeps the first.
        early.start(key(1, None), async { Ok(b"other".to_vec()) });
        early.start(key(2, Some((10, 5))), async {
            Err(RegistryError::NotFound {
                reference: "r".into(),
                registry: "h".into(),
            })
        });
        assert_eq!(early.len(), 2);
        assert_eq!(
            early.take(&key(1, None)).await.as_deref(),
            Some(&b"index"[..])
        );
        assert_eq!(early.take(&key(1, None)).await, None, "taken once");
        assert_eq!(early.take(&key(2, Some((10, 5)))).await, None, "failed");
        assert_eq!(
            early.take(&key(2, Some((10, 6)))).await,
            None,
            "another range"
        );
        assert!(early.is_empty());
    }

    #[tokio::test]
    async fn clear_drops_and_aborts_what_nobody_took() {
        let early = Early::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        early.start(key(3, None), async move {
            let _tx = tx; // dropped when the request is aborted
            std::future::pending::<()>().await;
            Ok(Vec::new())
        });
        early.clear();
        assert!(early.is_empty());
        assert!(rx.await.is_err(), "the request under way was aborted");
    }
}
