//! One GET to a registry, done properly: endpoint order, authorization, retries, fallback from
//! HTTPS to HTTP for loopback registries, and errors mapped to [`RegistryError`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};

use super::auth::{parse_challenges, AuthCache, Challenge, Credentials, HostAuth, TokenResponse};
use super::failure::{map_reqwest, tls_failure, untrusted};
use super::hosts::{Endpoint, HostConfig, RegistrySettings};
use super::RegistryError;
use crate::reference::Reference;

mod multirange;
mod range;

use range::RangeRead;

const USER_AGENT: &str = concat!("stratafs/", env!("CARGO_PKG_VERSION"));
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most time spent retrying a refused or failed connection: a registry that is not listening
/// is reported within seconds, not after the whole retry budget.
const CONNECT_RETRY: Duration = Duration::from_secs(3);

/// What to GET from a repository.
pub(crate) struct Request<'a> {
    pub reference: &'a Reference,
    /// Path below `/v2/<repository>/`, or an absolute path (`/v2/…`, as in an upload
    /// `Location`), or a full URL.
    pub path: String,
    pub accept: Option<&'static str>,
    /// What errors name (`docker.io/library/alpine:3` or `blob sha256:… of …`).
    pub subject: String,
    pub method: reqwest::Method,
    pub body: Option<(Vec<u8>, String)>,
    /// Whether a failed connection or a server error is tried again (as it is by default).
    pub retry: bool,
}

impl<'a> Request<'a> {
    /// A GET of `path` below the repository.
    pub(crate) fn get(
        reference: &'a Reference,
        path: String,
        accept: Option<&'static str>,
        subject: String,
    ) -> Self {
        Request {
            reference,
            path,
            accept,
            subject,
            method: reqwest::Method::GET,
            body: None,
            retry: true,
        }
    }

    fn url(&self, base: &str) -> String {
        if self.path.starts_with("http://") || self.path.starts_with("https://") {
            self.path.clone()
        } else if self.path.starts_with('/') {
            format!("{base}{}", self.path)
        } else {
            format!("{base}/v2/{}/{}", self.reference.repository(), self.path)
        }
    }
}

/// A small response body with the headers that matter for verification.
pub(crate) struct Body {
    pub data: Vec<u8>,
    pub content_type: Option<String>,
    pub content_digest: Option<String>,
}

/// Held while one request fetches a token for a (host, scope).
type TokenFlight = std::sync::Arc<tokio::sync::Mutex<()>>;

/// Shared HTTP state: clients per host (TLS settings differ), auth state, counters.
pub(crate) struct Transport {
    settings: RegistrySettings,
    hosts: BTreeMap<String, HostConfig>,
    clients: Mutex<HashMap<String, Client>>,
    auth: AuthCache,
    plain_http_hosts: Mutex<HashSet<String>>,
    requests: AtomicU64,
    /// Where blobs were redirected to (a CDN or store): range reads go there directly.
    locations: super::location::Locations,
    /// Endpoints (by host) that did not answer a request for several ranges with them
    /// ([`multirange`]): their ranges are asked for one request each.
    single_range_hosts: Mutex<HashSet<String>>,
    /// One token request at a time per (host, scope): concurrent requests that need the same
    /// token wait for the one fetching it (as containerd's authorizer does), so a cold mount
    /// reading many ranges at once asks the token service once.
    token_flights: Mutex<HashMap<(String, String), TokenFlight>>,
}

impl Transport {
    pub(crate) fn new(settings: RegistrySettings, hosts: BTreeMap<String, HostConfig>) -> Self {
        Transport {
            settings,
            hosts,
            clients: Mutex::default(),
            auth: AuthCache::default(),
            plain_http_hosts: Mutex::default(),
            single_range_hosts: Mutex::default(),
            requests: AtomicU64::new(0),
            locations: Default::default(),
            token_flights: Mutex::default(),
        }
    }

    pub(crate) fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// GETs a small document (at most `cap` bytes) from the first endpoint that has it.
    /// Mirrors that fail are skipped; the origin's error is final.
    pub(crate) async fn get_small(
        &self,
        endpoints: &[Endpoint],
        req: &Request<'_>,
        cap: u64,
        what: &str,
    ) -> Result<Body, RegistryError> {
        first_endpoint(endpoints, |ep| self.get_small_from(ep, req, cap, what)).await
    }

    /// GETs bytes `offset..offset+len` of a blob from the first endpoint that serves them.
    /// A body cut short is asked for again from where it broke (each byte crosses the link
    /// once), from the same endpoint (twice at most) or, for a mirror, from the next one. A
    /// server that ignores the Range header and sends the whole blob is handled by skipping.
    /// A blob the registry redirected elsewhere lately is read there directly
    /// ([`super::location`]).
    pub(crate) async fn get_range(
        &self,
        endpoints: &[Endpoint],
        req: &Request<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let range = RangeRead::new(offset, len, None);
        first_endpoint(endpoints, |ep| self.get_range_from(ep, req, &range)).await?;
        Ok(range.into_data())
    }

    /// As [`get_range`](Self::get_range), but handing the bytes to `sink` as they arrive, in
    /// order, each once (a body cut short is asked for again from where it broke).
    pub(crate) async fn get_range_to(
        &self,
        endpoints: &[Endpoint],
        req: &Request<'_>,
        offset: u64,
        len: u64,
        sink: super::Sink<'_>,
    ) -> Result<(), RegistryError> {
        let range = RangeRead::new(offset, len, Some(sink));
        first_endpoint(endpoints, |ep| self.get_range_from(ep, req, &range)).await
    }

    async fn get_range_from(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        range: &RangeRead<'_>,
    ) -> Result<(), RegistryError> {
        // A mirror serves many registries' repositories: each its own key.
        let asked = match ep.is_mirror {
            true => format!("{}?ns={}", req.url(&ep.base), req.reference.registry()),
            false => req.url(&ep.base),
        };
        if let Some(location) = self.locations.get(&asked, Instant::now()) {
            if self.get_range_at(ep, &location, range).await {
                self.locations.worked(&asked, &location);
                return Ok(());
            }
            self.locations.forget(&asked, &location, Instant::now());
            tracing::debug!(subject = %req.subject, host = %super::location::host_of(&location), "the blob's location failed: asking the registry again");
        }
        let mut body_retries = 2;
        loop {
            let (from, end) = (range.next(), range.offset + range.len);
            let resp = self
                .send(ep, req, Some(&format!("bytes={from}-{}", end - 1)))
                .await?;
            let url = super::location::shown(resp.url());
            if self.locations.learn(&asked, resp.url(), Instant::now()) {
                tracing::debug!(subject = %req.subject, host = %super::location::host_of(&url), "the registry redirects the blob: its range reads go there for a while");
            }
            let skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
                // A range that starts elsewhere than asked (a resumed read's above all) would
                // shift every byte after it: one that starts before is skipped to the byte
                // asked for, one that starts after is an error.
                match starts_at(&resp) {
                    Some(start) if start < from => from - start,
                    Some(start) if start > from => {
                        return Err(RegistryError::Status {
                            host: ep.host.clone(),
                            url,
                            status: 206,
                            detail: format!(
                                "{}: asked for bytes from {from}, answered bytes from {start}",
                                req.subject
                            ),
                        })
                    }
                    _ => 0,
                }
            } else {
                from
            };
            match range.read_body(resp, skip).await {
                Ok(()) if range.next() == end => return Ok(()),
                Ok(()) => {
                    return Err(RegistryError::Status {
                        host: ep.host.clone(),
                        url,
                        status: 206,
                        detail: format!(
                            "short read of {}: {} of {} bytes at offset {}",
                            req.subject,
                            range.next() - range.offset,
                            range.len,
                            range.offset
                        ),
                    })
                }
                Err(_) if body_retries > 0 && !ep.is_mirror => body_retries -= 1,
                Err(e) => return Err(map_reqwest(&ep.host, &url, e)),
            }
        }
    }

    /// Reads what is left of `range` from `location`, where the registry redirected its blob:
    /// whether it is complete. No registry credentials go there (the signed URL is its own).
    async fn get_range_at(&self, ep: &Endpoint, location: &str, range: &RangeRead<'_>) -> bool {
        let Ok(client) = self.client(&ep.host) else {
            return false;
        };
        let (from, end) = (range.next(), range.offset + range.len);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_secs(self.settings.request_timeout_secs);
        let sent = client
            .get(location)
            .header(reqwest::header::RANGE, format!("bytes={from}-{}", end - 1))
            .timeout(timeout.min(super::location::TIMEOUT))
            .send()
            .await;
        let m = crate::metrics::metrics();
        let resp = match sent {
            Ok(resp) => resp,
            Err(_) => {
                m.registry_request("error");
                return false;
            }
        };
        m.registry_request(resp.status().as_str());
        // A 206 must be the range asked for (one that is not would fail every read of the
        // blob until the location went stale).
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT if starts_at(&resp) == Some(from) => 0,
            StatusCode::OK => from,
            _ => return false,
        };
        range.read_body(resp, skip).await.is_ok() && range.next() == end
    }

    async fn get_small_from(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        cap: u64,
        what: &str,
    ) -> Result<Body, RegistryError> {
        let mut body_retries = 2;
        loop {
            let resp = self.send(ep, req, None).await?;
            let url = super::location::shown(resp.url());
            let headers = resp.headers().clone();
            match read_capped(resp, cap).await {
                Ok(Some(data)) => {
                    return Ok(Body {
                        data,
                        content_type: header(&headers, CONTENT_TYPE.as_str()),
                        content_digest: header(&headers, "docker-content-digest"),
                    })
                }
                Ok(None) => {
                    return Err(RegistryError::TooLarge {
                        what: what.to_string(),
                        reference: req.reference.to_string(),
                        limit: cap,
                    })
                }
                Err(_) if body_retries > 0 && !ep.is_mirror => body_retries -= 1,
                Err(e) => return Err(map_reqwest(&ep.host, &url, e)),
            }
        }
    }

    /// Sends the request to one endpoint and returns its successful (2xx) response; a failure
    /// is counted in the metrics by kind.
    pub(crate) async fn send(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        range: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let result = self.send_retrying(ep, req, range).await;
        if let Err(e) = &result {
            crate::metrics::metrics().registry_error(e.kind());
        }
        result
    }

    /// Sends `req` to the first of `endpoints` that answers it with success, as
    /// [`send`](Self::send) does, but uncounted in the registry errors and with failures left
    /// to the caller (no warning when a mirror fails).
    pub(crate) async fn send_quietly(
        &self,
        endpoints: &[Endpoint],
        req: &Request<'_>,
    ) -> Result<(), RegistryError> {
        let mut last = None;
        for ep in endpoints {
            match self.send_retrying(ep, req, None).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    async fn send_retrying(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        range: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let m = crate::metrics::metrics();
        let counted = |status: &str| m.registry_request(status);
        let repo = req.reference.repository();
        let actions = if req.method == reqwest::Method::GET || req.method == reqwest::Method::HEAD {
            "pull"
        } else {
            "pull,push"
        };
        let scope = format!("repository:{repo}:{actions}");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(self.settings.retry_max_elapsed_secs);
        let retry = !ep.is_mirror && req.retry;
        let mut attempt = 1;
        let mut backoff = Duration::from_millis(100);
        // Each is done at most once per request: answer a 401 challenge, renew a token on 403.
        let mut challenge_answered = false;
        let mut token_renewed = false;
        let mut base = if self.plain_http_hosts.lock().unwrap().contains(&ep.host) {
            format!("http://{}", ep.host)
        } else {
            ep.base.clone()
        };
        loop {
            let url = req.url(&base);
            let mut builder = self
                .client(&ep.host)?
                .request(req.method.clone(), &url)
                .timeout(Duration::from_secs(self.settings.request_timeout_secs));
            if let Some((body, content_type)) = &req.body {
                builder = builder
                    .header(CONTENT_TYPE, content_type.as_str())
                    .body(body.clone());
            }
            if ep.is_mirror {
                builder = builder.query(&[("ns", req.reference.registry())]);
            }
            if let Some(accept) = req.accept {
                builder = builder.header(ACCEPT, accept);
            }
            if let Some(range) = range {
                builder = builder.header(reqwest::header::RANGE, range);
            }
            let sent = self.authorization(ep, req, &scope).await?;
            if let Some(auth) = &sent {
                builder = builder.header(AUTHORIZATION, auth);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match builder.send().await {
                Ok(r) => {
                    counted(r.status().as_str());
                    r
                }
                Err(e) => {
                    counted("error");
                    // A server that does not speak TLS gets plain HTTP; one whose certificate
                    // is not trusted gets a TLS error, not a downgrade.
                    let untrusted = tls_failure(&e).is_some_and(untrusted);
                    let err = map_reqwest(&ep.host, &url, e);
                    if ep.http_fallback && base.starts_with("https://") && !untrusted {
                        tracing::info!(host = %ep.host, error = %err, "no TLS on loopback registry, using plain HTTP");
                        base = format!("http://{}", ep.host);
                        self.plain_http_hosts
                            .lock()
                            .unwrap()
                            .insert(ep.host.clone());
                        continue;
                    }
                    let limit = match err {
                        RegistryError::Connect { .. } => {
                            Some(deadline.min(started + CONNECT_RETRY))
                        }
                        RegistryError::Timeout { .. } => Some(deadline),
                        _ => None,
                    };
                    if retry && limit.is_some_and(|l| Instant::now() + backoff < l) {
                        tracing::warn!(host = %ep.host, attempt, "{err}; retrying in {backoff:?}");
                        m.registry_retries.inc();
                        attempt += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    return Err(err);
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            match status {
                StatusCode::UNAUTHORIZED => {
                    let detail = if challenge_answered {
                        "credentials or token rejected".to_string()
                    } else {
                        challenge_answered = true;
                        match self.handle_challenge(ep, &scope, resp.headers(), sent.as_deref()) {
                            Ok(()) => continue,
                            Err(detail) => detail,
                        }
                    };
                    return Err(RegistryError::Unauthorized {
                        registry: ep.host.clone(),
                        reference: req.subject.clone(),
                        detail,
                    });
                }
                StatusCode::FORBIDDEN => {
                    if !token_renewed
                        && matches!(self.auth.scheme(&ep.host), Some(HostAuth::Bearer { .. }))
                    {
                        // The token may have been revoked or its scope changed: get a new one.
                        token_renewed = true;
                        self.auth.forget_token(&ep.host, &scope);
                        continue;
                    }
                    return Err(RegistryError::Denied {
                        registry: ep.host.clone(),
                        reference: req.subject.clone(),
                    });
                }
                StatusCode::NOT_FOUND => {
                    return Err(RegistryError::NotFound {
                        reference: req.subject.clone(),
                        registry: ep.host.clone(),
                    })
                }
                s if retry && (s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()) => {
                    let wait = retry_after(resp.headers()).unwrap_or(backoff);
                    if Instant::now() + wait < deadline {
                        tracing::warn!(host = %ep.host, status = %s, attempt, "{}: server error; retrying in {wait:?}", req.subject);
                        m.registry_retries.inc();
                        attempt += 1;
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    return Err(status_error(ep, &url, resp).await);
                }
                _ => return Err(status_error(ep, &url, resp).await),
            }
        }
    }

    /// Records how the host wants to be authenticated; the next attempt uses it.
    /// Returns why authentication is impossible otherwise.
    fn handle_challenge(
        &self,
        ep: &Endpoint,
        scope: &str,
        headers: &HeaderMap,
        sent: Option<&str>,
    ) -> Result<(), String> {
        let challenges: Vec<Challenge> = headers
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            Challenge::Basic => None,
        });
        if let Some((realm, service)) = bearer {
            // Forget the cached token only if it is the one this request was refused with:
            // one that another request fetched meanwhile is still good.
            let cached = self.auth.token(&ep.host, scope);
            if cached.is_some_and(|t| sent == Some(format!("Bearer {t}").as_str())) {
                self.auth.forget_token(&ep.host, scope);
            }
            self.auth
                .set_scheme(&ep.host, HostAuth::Bearer { realm, service });
            return Ok(());
        }
        if challenges.contains(&Challenge::Basic) {
            return match self.auth.credentials(&ep.host) {
                Some(Credentials::Basic { .. }) => {
                    self.auth.set_scheme(&ep.host, HostAuth::Basic);
                    Ok(())
                }
                _ => Err(format!(
                    "no credentials for {} in the Docker config (run `docker login {}`)",
                    ep.host, ep.host
                )),
            };
        }
        Err("the registry sent no usable WWW-Authenticate challenge".into())
    }

    /// The `Authorization` header for a request, fetching a token if the host needs one.
    async fn authorization(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        scope: &str,
    ) -> Result<Option<String>, RegistryError> {
        match self.auth.scheme(&ep.host) {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(match self.auth.credentials(&ep.host) {
                Some(Credentials::Basic { username, password }) => {
                    Some(basic(&username, &password))
                }
                _ => None,
            }),
            Some(HostAuth::Bearer { realm, service }) => {
                if let Some(t) = self.auth.token(&ep.host, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let flight = self
                    .token_flights
                    .lock()
                    .unwrap()
                    .entry((ep.host.clone(), scope.to_string()))
                    .or_default()
                    .clone();
                let _one_at_a_time = flight.lock().await;
                if let Some(t) = self.auth.token(&ep.host, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let token = self
                    .fetch_token(ep, req, &realm, service.as_deref(), scope)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let realm_host = realm
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .ok_or_else(|| {
                RegistryError::Auth(format!("invalid token realm {realm:?} from {}", ep.host))
            })?;
        let client = self.client(realm_host)?;
        let mut params = vec![("scope", scope)];
        if let Some(s) = service {
            params.push(("service", s));
        }
        let credentials = self.auth.credentials(&ep.host);
        let builder = match &credentials {
            Some(Credentials::IdentityToken(t)) => {
                params.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", t.as_str()),
                    ("client_id", "stratafs"),
                ]);
                client.post(realm).form(&params)
            }
            Some(Credentials::Basic { username, password }) => client
                .get(realm)
                .query(&params)
                .header(AUTHORIZATION, basic(username, password)),
            None => client.get(realm).query(&params),
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = builder
            .timeout(Duration::from_secs(self.settings.request_timeout_secs))
            .send()
            .await
            .map_err(|e| map_reqwest(realm_host, realm, e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: ep.host.clone(),
                reference: req.subject.clone(),
                detail: match credentials {
                    Some(_) => format!("token service {realm} rejected the credentials"),
                    None => format!(
                        "token service {realm} refused anonymous access (run `docker login {}`)",
                        ep.host
                    ),
                },
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Auth(format!(
                "token service {realm} answered {status}"
            )));
        }
        let data = resp
            .bytes()
            .await
            .map_err(|e| map_reqwest(realm_host, realm, e))?;
        let parsed: TokenResponse = serde_json::from_slice(&data).map_err(|e| {
            RegistryError::Auth(format!("token service {realm} sent invalid JSON: {e}"))
        })?;
        let (token, ttl) = parsed.into_token(realm)?;
        self.auth.set_token(&ep.host, scope, token.clone(), ttl);
        Ok(token)
    }

    /// Builds the HTTP client for `host` now if it is not built yet ([`Self::client`]).
    pub(crate) fn client_for(&self, host: &str) -> Result<(), RegistryError> {
        self.client(host).map(drop)
    }

    /// The HTTP client for `host`, built once with that host's TLS settings. Building it reads
    /// files (the system's TLS roots, the host's CA files): on a worker of a multi-threaded
    /// runtime the worker's other tasks move to another thread meanwhile.
    fn client(&self, host: &str) -> Result<Client, RegistryError> {
        if let Some(c) = self.clients.lock().unwrap().get(host) {
            return Ok(c.clone());
        }
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let client = match multi_threaded {
            true => tokio::task::block_in_place(|| self.build_client(host))?,
            false => self.build_client(host)?,
        };
        // Built twice at once (a request beside `ready_clients`): the first one kept is the
        // one every request uses, so connections opened through it are reused.
        let mut clients = self.clients.lock().unwrap();
        Ok(clients.entry(host.to_string()).or_insert(client).clone())
    }

    fn build_client(&self, host: &str) -> Result<Client, RegistryError> {
        let config = self.hosts.get(host).cloned().unwrap_or_default();
        let mut builder = Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(self.settings.connect_timeout_secs))
            .danger_accept_invalid_certs(config.skip_verify);
        for path in &config.ca_certs {
            let pem = std::fs::read(path).map_err(|e| {
                RegistryError::Config(format!("ca_certs {} for {host}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RegistryError::Config(format!("ca_certs {} for {host}: {e}", path.display()))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
            .build()
            .map_err(|e| RegistryError::Config(format!("http client for {host}: {e}")))
    }
}

/// Runs `attempt` on each endpoint in order until one succeeds. A mirror's failure moves on to
/// the next endpoint; the origin (always last) has the final word.
pub(crate) async fn first_endpoint<'a, T, F, Fut>(
    endpoints: &'a [Endpoint],
    attempt: F,
) -> Result<T, RegistryError>
where
    F: Fn(&'a Endpoint) -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let mut last = None;
    for ep in endpoints {
        match attempt(ep).await {
            Ok(v) => return Ok(v),
            Err(e) if ep.is_mirror => {
                tracing::warn!(mirror = %ep.base, error = %e, "mirror failed, trying the next host");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
}

fn basic(username: &str, password: &str) -> String {
    use base64::Engine;
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = header(headers, RETRY_AFTER.as_str())?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_BACKOFF * 2))
}

/// Reads a body of at most `cap` bytes; `None` if it is larger.
async fn read_capped(mut resp: Response, cap: u64) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if resp.content_length().is_some_and(|l| l > cap) {
        return Ok(None);
    }
    let mut data = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if (data.len() + chunk.len()) as u64 > cap {
            return Ok(None);
        }
        data.extend_from_slice(&chunk);
    }
    Ok(Some(data))
}

/// An error for an unexpected status, with the registry's own error message when it sent one.
async fn status_error(ep: &Endpoint, url: &str, resp: Response) -> RegistryError {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    let status = resp.status().as_u16();
    let body = read_capped(resp, 64 << 10)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let detail = match serde_json::from_slice::<Errors>(&body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|i| {
                format!(
                    "{}: {}",
                    i.code.as_deref().unwrap_or("?"),
                    i.message.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string(),
    };
    RegistryError::Status {
        host: ep.host.clone(),
        url: url.to_string(),
        status,
        detail,
    }
}

/// Where the range a 206 answer's `Content-Range` gives starts, if it gives one.
fn starts_at(r: &Response) -> Option<u64> {
    header(r.headers(), reqwest::header::CONTENT_RANGE.as_str()).and_then(|v| {
        v.strip_prefix("bytes ")?
            .split('-')
            .next()?
            .parse::<u64>()
            .ok()
    })
}
