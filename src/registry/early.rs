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
//! most one answer per layer of the manifest, until the layers are open. A request is never
//! left running unreachable: a taker that is cancelled while it waits aborts the request it
//! took, and dropping an `Early` aborts what it holds.

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
    /// `None` if none was started or it failed (the caller then asks itself). Cancelled
    /// while it waits, it aborts the request.
    pub async fn take(&self, key: &EarlyKey) -> Option<Vec<u8>> {
        let taken = self.held.lock().unwrap().remove(key)?;
        let mut taken = AbortOnDrop(taken);
        match (&mut taken.0).await {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                tracing::debug!(blob = %key.0, error = %e, "request started early failed: asking again");
                None
            }
            Err(_) => None,
        }
    }

    /// How many requests are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Whether no request is held.
    #[cfg(test)]
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

impl Drop for Early {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, handle) in held.drain() {
            handle.abort();
        }
    }
}

/// A taken request, aborted if its taker goes away before it ends (a no-op once it has).
struct AbortOnDrop(Request);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
            early.take(&key(2, Some((10, 6)))).await,
            None,
            "another range"
        );
        assert_eq!(
            early.take(&key(3, Some((10, 5)))).await,
            None,
            "another blob"
        );
        assert_eq!(early.len(), 2, "neither taken by a read of something else");
        assert_eq!(
            early.take(&key(1, None)).await.as_deref(),
            Some(&b"index"[..])
        );
        assert_eq!(early.take(&key(1, None)).await, None, "taken once");
        assert_eq!(early.take(&key(2, Some((10, 5)))).await, None, "failed");
        assert!(early.is_empty());
    }

    #[tokio::test]
    async fn a_taker_waits_for_the_answer_and_one_cancelled_aborts_the_request() {
        let early = std::sync::Arc::new(Early::default());
        let (answer, answered) = tokio::sync::oneshot::channel::<Vec<u8>>();
        early.start(key(4, None), async move {
            Ok(answered.await.unwrap_or_default())
        });
        let taker = tokio::spawn({
            let early = early.clone();
            async move { early.take(&key(4, None)).await }
        });
        tokio::task::yield_now().await;
        answer.send(b"late".to_vec()).unwrap();
        assert_eq!(taker.await.unwrap().as_deref(), Some(&b"late"[..]));

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        early.start(key(5, None), async move {
            let _tx = tx; // dropped when the request is aborted
            std::future::pending::<()>().await;
            Ok(Vec::new())
        });
        let taker = tokio::spawn({
            let early = early.clone();
            async move { early.take(&key(5, None)).await }
        });
        // The taker has the request once the map no longer holds it.
        while !early.is_empty() {
            tokio::task::yield_now().await;
        }
        taker.abort();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the request of a cancelled taker was aborted"
        );
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
