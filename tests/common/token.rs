//! In-process token issuer for the registry's `auth.token` mode
//! (distribution 2.8 / the Docker token-auth spec).
//!
//! A self-signed ECDSA P-256 certificate is generated per server; its PEM
//! is the registry's `rootcertbundle`. Tokens are ES256 JWTs whose header
//! carries `x5c: [base64(DER cert)]`; distribution verifies that chain
//! against the bundle (a self-signed leaf that is itself in the root pool
//! verifies) and then checks the signature with the leaf's key.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `service` the registry is configured with (the token `aud`).
pub const SERVICE: &str = "stratafs-test-registry";
/// `issuer` the registry trusts (the token `iss`).
pub const ISSUER: &str = "stratafs-test-issuer";

/// The registry-side `auth.token` settings matching a [`TokenServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenAuthConfig {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// Service name (token audience).
    pub service: String,
    /// Token issuer.
    pub issuer: String,
    /// PEM file with the signing certificate.
    pub rootcertbundle: PathBuf,
}

/// What a token grants, relative to the requested scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Exactly the requested actions.
    Requested,
    /// An empty `access` list (the registry then answers 401/403).
    Nothing,
    /// Only `pull` out of the requested actions.
    PullOnly,
    /// Answer the token request with HTTP 500 instead of a token.
    Error,
}

/// Configuration of a [`TokenServer`].
#[derive(Clone, Debug)]
pub struct TokenServerOpts {
    /// If set, `/token` demands these HTTP Basic (or OAuth2 password-grant)
    /// credentials and answers 401 otherwise.
    pub credentials: Option<(String, String)>,
    /// Granting policy.
    pub grant: Grant,
    /// Token lifetime in seconds (`expires_in`).
    pub expires_in: u64,
}

impl Default for TokenServerOpts {
    fn default() -> Self {
        TokenServerOpts {
            credentials: None,
            grant: Grant::Requested,
            expires_in: 300,
        }
    }
}

/// One request the token server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// HTTP method (`GET`, or `POST` for the OAuth2 form flow).
    pub method: String,
    /// `service` parameter.
    pub service: Option<String>,
    /// Every scope asked for (repeated params and space-separated lists
    /// flattened), e.g. `repository:foo/bar:pull,push`.
    pub scopes: Vec<String>,
    /// User name presented, if any.
    pub user: Option<String>,
    /// Whether a token was issued.
    pub issued: bool,
}

struct State {
    key: EncodingKey,
    cert_b64: String,
    opts: Mutex<TokenServerOpts>,
    requests: Mutex<Vec<TokenRequest>>,
    jti: AtomicU64,
}

/// Background HTTP token issuer on a loopback port.
pub struct TokenServer {
    dir: tempfile::TempDir,
    port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Generate the key/certificate and start serving.
    pub fn start(opts: TokenServerOpts) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-token-")
            .tempdir()
            .expect("token tempdir");
        let key_pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("cert params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stratafs test token signer");
        let cert = params.self_signed(&key_pair).expect("self-signed cert");
        std::fs::write(dir.path().join("root.pem"), cert.pem()).expect("write cert");
        let key = EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).expect("EC key");
        let state = Arc::new(State {
            key,
            cert_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            opts: Mutex::new(opts),
            requests: Mutex::new(Vec::new()),
            jti: AtomicU64::new(0),
        });
        let server = tiny_http::Server::http("127.0.0.1:0").expect("token server bind");
        let port = server.server_addr().to_ip().expect("ip listener").port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(100)) {
                        handle(&state, port, req);
                    }
                }
            })
        };
        TokenServer {
            dir,
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Registry settings trusting this server.
    pub fn auth_config(&self) -> TokenAuthConfig {
        TokenAuthConfig {
            realm: self.realm(),
            service: SERVICE.to_string(),
            issuer: ISSUER.to_string(),
            rootcertbundle: self.dir.path().join("root.pem"),
        }
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Change the granting policy for later requests.
    pub fn set_grant(&self, grant: Grant) {
        self.state.opts.lock().unwrap().grant = grant;
    }

    /// Number of `/token` requests served (any outcome).
    pub fn token_requests(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// All requests received, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Every scope asked for, in order, flattened over requests.
    pub fn scopes(&self) -> Vec<String> {
        self.requests().into_iter().flat_map(|r| r.scopes).collect()
    }

    /// Mint a token directly (no HTTP) for `sub` with explicit grants
    /// `(type, name, actions)`.
    pub fn mint(&self, sub: &str, access: &[(&str, &str, &[&str])]) -> String {
        let access: Vec<Value> = access
            .iter()
            .map(|(t, n, a)| json!({"type": t, "name": n, "actions": a}))
            .collect();
        let ttl = self.state.opts.lock().unwrap().expires_in;
        sign(&self.state, sub, access, ttl)
    }

    /// Token granting pull+push on `repo`.
    pub fn push_pull_token(&self, repo: &str) -> String {
        self.mint("harness", &[("repository", repo, &["pull", "push"])])
    }

    /// Token granting pull on `repo`.
    pub fn pull_token(&self, repo: &str) -> String {
        self.mint("harness", &[("repository", repo, &["pull"])])
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Build and sign a JWT with the given `access` claim.
fn sign(state: &State, sub: &str, access: Vec<Value>, ttl: u64) -> String {
    let now = now_secs();
    let jti = state.jti.fetch_add(1, Ordering::SeqCst);
    let claims = json!({
        "iss": ISSUER,
        "sub": sub,
        "aud": SERVICE,
        "exp": now + ttl,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": format!("stratafs-{now}-{jti}"),
        "access": access,
    });
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("JWT".to_string());
    header.x5c = Some(vec![state.cert_b64.clone()]);
    jsonwebtoken::encode(&header, &claims, &state.key).expect("sign JWT")
}

/// Percent-decode a form/query component (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `a=b&c=d` into pairs.
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `(user, password)` from an `Authorization: Basic` header.
fn basic_credentials(req: &tiny_http::Request) -> Option<(String, String)> {
    let h = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))?;
    let b64 = h.value.as_str().strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Grant for one scope string `type:name:actions` under a policy.
fn grant_scope(scope: &str, grant: &Grant) -> Option<Value> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .filter(|a| *grant != Grant::PullOnly || *a == "pull")
        .collect();
    Some(json!({"type": typ, "name": name, "actions": actions}))
}

/// Serve one HTTP request.
fn handle(state: &State, port: u16, mut req: tiny_http::Request) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if path != "/token" {
        let _ = req.respond(tiny_http::Response::from_string("not found").with_status_code(404));
        return;
    }
    let mut params = parse_form(query);
    let method = req.method().as_str().to_string();
    if method == "POST" {
        let mut body = String::new();
        let _ = req.as_reader().read_to_string(&mut body);
        params.extend(parse_form(&body));
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let presented = basic_credentials(&req).or_else(|| {
        if param("grant_type").as_deref() != Some("password") {
            return None;
        }
        Some((param("username")?, param("password")?))
    });
    let opts = state.opts.lock().unwrap().clone();
    let authorized = match &opts.credentials {
        None => true,
        Some(want) => presented.as_ref() == Some(want),
    };
    let issued = authorized && opts.grant != Grant::Error;
    state.requests.lock().unwrap().push(TokenRequest {
        method,
        service: param("service"),
        scopes: scopes.clone(),
        user: presented.as_ref().map(|(u, _)| u.clone()),
        issued,
    });
    let json_header =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).unwrap();
    if !authorized {
        let challenge = format!("Basic realm=\"http://127.0.0.1:{port}/token\"");
        let resp = tiny_http::Response::from_string(r#"{"details":"unauthorized"}"#)
            .with_status_code(401)
            .with_header(json_header)
            .with_header(
                tiny_http::Header::from_bytes(&b"WWW-Authenticate"[..], challenge.as_bytes())
                    .unwrap(),
            );
        let _ = req.respond(resp);
        return;
    }
    if opts.grant == Grant::Error {
        let resp = tiny_http::Response::from_string(r#"{"details":"injected failure"}"#)
            .with_status_code(500)
            .with_header(json_header);
        let _ = req.respond(resp);
        return;
    }
    let access: Vec<Value> = match opts.grant {
        Grant::Nothing => Vec::new(),
        _ => scopes
            .iter()
            .filter_map(|s| grant_scope(s, &opts.grant))
            .collect(),
    };
    let sub = presented
        .map(|(u, _)| u)
        .unwrap_or_else(|| "anonymous".to_string());
    let token = sign(state, &sub, access, opts.expires_in);
    let issued_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": opts.expires_in,
        "issued_at": issued_at,
    });
    let resp = tiny_http::Response::from_string(body.to_string()).with_header(json_header);
    let _ = req.respond(resp);
}
