//! Where a registry's blobs are really served from.
//!
//! Many registries answer a blob GET with a redirect to a CDN or an object store — a signed
//! URL, valid for minutes (Docker Hub, GHCR, ECR, a distribution registry with the `redirect`
//! storage middleware). Following it on every range read of a lazily read layer costs a round
//! trip to the registry before each one to the store, and the registry is often the farther
//! of the two. So the URL a blob's range read was last redirected to — to another host — is
//! kept for [`FRESH`], and range reads of that blob go there directly, without the registry's
//! credentials; a failure there (an expired signature, an error status, a broken connection)
//! forgets it and the read asks the registry again.
//!
//! A location changes nothing a mount serves: what comes from it is checked like anything
//! from the registry (spans against their index, blobs against their digest), so a stale or
//! wrong one costs a request, never a byte. A location that fails the first time it is used
//! directly (a store whose signatures do not carry over to other ranges) is not replaced for
//! [`FRESH`]: the blob's reads go through the registry meanwhile, each costing one request, not
//! two. At most [`MAX_LOCATIONS`] are kept; their URLs (which carry signatures) are never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a blob's location is used before the registry is asked again (as
/// stargz-snapshotter's default blob check interval): well inside the validity of the signed
/// URLs registries hand out, so a cold start asks the registry about a blob about once.
pub(crate) const FRESH: Duration = Duration::from_secs(60);
/// Locations kept at most (a mount reads a few layers; a snapshotter a few images at once).
pub(crate) const MAX_LOCATIONS: usize = 1024;
/// Longest wait for one direct read (less if the registry's request timeout is shorter): a dead
/// store costs this before the read goes through the registry, which keeps a read inside the
/// mount's read timeout; a body it cuts short is finished through the registry from where
/// it stopped.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// The locations of blobs, keyed by the URL the registry serves each at.
#[derive(Default)]
pub(crate) struct Locations {
    known: Mutex<HashMap<String, Known>>,
}

struct Known {
    /// Where the blob is served from; `None` after a location failed at its first direct use.
    url: Option<String>,
    /// When it was learnt (or, with no `url`, when the last one failed).
    since: Instant,
    /// Whether a read went there directly and succeeded.
    worked: bool,
}

impl Locations {
    /// Where blob `asked` (its URL at the registry) is served from, if that was learnt less
    /// than [`FRESH`] before `now`.
    pub(crate) fn get(&self, asked: &str, now: Instant) -> Option<String> {
        let known = self.known.lock().unwrap();
        let k = known.get(asked)?;
        let fresh = now.saturating_duration_since(k.since) < FRESH;
        k.url.clone().filter(|_| fresh)
    }

    /// Notes that a request for `asked` was answered from `served`: kept only when that is
    /// another host — a redirect to a CDN or store, which takes no registry credentials (the
    /// registry's own host, on any port or scheme, may want them). Returns whether it was kept.
    pub(crate) fn learn(&self, asked: &str, served: &reqwest::Url, now: Instant) -> bool {
        let Ok(asked_url) = reqwest::Url::parse(asked) else {
            return false;
        };
        let http = matches!(served.scheme(), "http" | "https");
        if !http || served.host_str().is_none() || asked_url.host_str() == served.host_str() {
            return false;
        }
        let mut known = self.known.lock().unwrap();
        let fresh = |k: &Known| now.saturating_duration_since(k.since) < FRESH;
        if known
            .get(asked)
            .is_some_and(|k| k.url.is_none() && fresh(k))
        {
            return false;
        }
        if known.len() >= MAX_LOCATIONS && !known.contains_key(asked) {
            known.retain(|_, k| fresh(k));
            if known.len() >= MAX_LOCATIONS {
                known.clear();
            }
        }
        let url = Some(served.to_string());
        known.insert(
            asked.to_string(),
            Known {
                url,
                since: now,
                worked: false,
            },
        );
        true
    }

    /// Notes that a read of `asked` was served from `url` directly.
    pub(crate) fn worked(&self, asked: &str, url: &str) {
        if let Some(k) = self.known.lock().unwrap().get_mut(asked) {
            k.worked |= k.url.as_deref() == Some(url);
        }
    }

    /// Forgets the location of `asked` if it is still `url` (one learnt meanwhile stays): one
    /// that served reads before (an expired signature) may be replaced at once; one that failed
    /// at its first direct use is not replaced before [`FRESH`] from `now`.
    pub(crate) fn forget(&self, asked: &str, url: &str, now: Instant) {
        let mut known = self.known.lock().unwrap();
        let Some(k) = known
            .get_mut(asked)
            .filter(|k| k.url.as_deref() == Some(url))
        else {
            return;
        };
        if k.worked {
            known.remove(asked);
        } else {
            (k.url, k.since) = (None, now);
        }
    }
}

/// `url` for errors and logs: without its query (a signed URL's signature is a credential).
pub(crate) fn shown(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// The host (and port) of `url`, for logs: a signed URL's path and query are credentials.
pub(crate) fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASKED: &str = "https://registry.example/v2/app/blobs/sha256:aa";

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn a_redirect_elsewhere_is_kept_while_fresh() {
        let l = Locations::default();
        let t = Instant::now();
        let cdn = "https://cdn.example/blobs/aa?sig=secret";
        assert!(l.learn(ASKED, &url(cdn), t));
        assert_eq!(l.get(ASKED, t + FRESH / 2).as_deref(), Some(cdn));
        assert_eq!(l.get(ASKED, t + FRESH), None, "stale after FRESH");
        assert_eq!(
            l.get("https://registry.example/v2/app/blobs/sha256:bb", t),
            None
        );
    }

    #[test]
    fn the_registrys_own_host_or_another_scheme_is_not_a_location() {
        let l = Locations::default();
        let t = Instant::now();
        // Served by the registry itself (no redirect, or a redirect to its own host: its
        // credentials would be needed).
        assert!(!l.learn(ASKED, &url(ASKED), t));
        assert!(!l.learn(ASKED, &url("https://registry.example/other/path"), t));
        assert!(!l.learn(ASKED, &url("ftp://cdn.example/aa"), t));
        assert_eq!(l.get(ASKED, t), None);
        // Nor is the registry's host on another port or scheme (a plain-HTTP fallback).
        assert!(!l.learn(ASKED, &url("http://registry.example:8443/aa"), t));
        assert!(l.learn(ASKED, &url("https://cdn.registry.example/aa"), t));
    }

    #[test]
    fn forget_drops_only_the_location_that_failed() {
        let l = Locations::default();
        let t = Instant::now();
        l.learn(ASKED, &url("https://cdn.example/1"), t);
        l.learn(ASKED, &url("https://cdn.example/2"), t);
        l.worked(ASKED, "https://cdn.example/2");
        l.forget(ASKED, "https://cdn.example/1", t);
        assert_eq!(l.get(ASKED, t).as_deref(), Some("https://cdn.example/2"));
        // It had served reads (an expired signature, say): the next redirect is used at once.
        l.forget(ASKED, "https://cdn.example/2", t);
        assert_eq!(l.get(ASKED, t), None);
        assert!(l.learn(ASKED, &url("https://cdn.example/3"), t));
    }

    #[test]
    fn a_location_that_fails_at_once_is_not_replaced_for_a_while() {
        // A store whose signed URL covers only the range it was redirected for: every direct
        // read would fail and cost a second request, so the registry serves the blob's reads
        // (one request each) until FRESH has passed.
        let l = Locations::default();
        let t = Instant::now();
        l.learn(ASKED, &url("https://cdn.example/1"), t);
        l.forget(ASKED, "https://cdn.example/1", t);
        assert!(!l.learn(ASKED, &url("https://cdn.example/2"), t + FRESH / 2));
        assert_eq!(l.get(ASKED, t + FRESH / 2), None);
        assert!(l.learn(ASKED, &url("https://cdn.example/3"), t + FRESH));
        assert_eq!(
            l.get(ASKED, t + FRESH).as_deref(),
            Some("https://cdn.example/3")
        );
    }

    #[test]
    fn the_number_kept_is_bounded() {
        let t = Instant::now();
        let fill = |l: &Locations| {
            for k in 0..MAX_LOCATIONS {
                let asked = format!("https://registry.example/v2/app/blobs/sha256:{k}");
                l.learn(&asked, &url("https://cdn.example/x"), t);
            }
            assert_eq!(l.known.lock().unwrap().len(), MAX_LOCATIONS);
        };
        // Full of stale ones: they go.
        let l = Locations::default();
        fill(&l);
        l.learn(ASKED, &url("https://cdn.example/y"), t + FRESH);
        assert_eq!(l.known.lock().unwrap().len(), 1);
        // Full of fresh ones: all go (a new read is as likely to need it as any other).
        let l = Locations::default();
        fill(&l);
        l.learn(ASKED, &url("https://cdn.example/y"), t);
        assert_eq!(l.known.lock().unwrap().len(), 1);
        assert!(l.get(ASKED, t).is_some());
    }

    #[test]
    fn logs_name_only_the_host() {
        assert_eq!(
            host_of("https://cdn.example/blobs/aa?sig=secret"),
            "cdn.example"
        );
        assert_eq!(
            host_of("http://127.0.0.1:9000/x?X-Amz-Signature=s"),
            "127.0.0.1:9000"
        );
        assert_eq!(host_of("not a url"), "");
        let signed = url("https://cdn.example/blobs/aa?X-Amz-Signature=secret#x");
        assert_eq!(shown(&signed), "https://cdn.example/blobs/aa");
        let userinfo = url("https://user:pass@cdn.example/blobs/aa?sig=s");
        assert_eq!(shown(&userinfo), "https://cdn.example/blobs/aa");
    }
}
