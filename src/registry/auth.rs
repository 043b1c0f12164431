//! Registry authentication: `WWW-Authenticate` challenges, credentials from the Docker config
//! (including credential helpers), and bearer tokens cached per host and scope.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::RegistryError;
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API_HOST};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses the challenges of a `WWW-Authenticate` header value, in order. Unknown schemes are
/// skipped; a Bearer challenge without a realm is ignored.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        let scheme_end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
        let scheme = rest[..scheme_end]
            .trim_end_matches(',')
            .to_ascii_lowercase();
        rest = rest[scheme_end..].trim_start();
        let mut params = HashMap::new();
        // key=value or key="quoted, value" pairs until a token not followed by '='.
        while let Some(eq) = rest.find('=') {
            let key = rest[..eq].trim();
            if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == ',') {
                break;
            }
            let after = rest[eq + 1..].trim_start();
            let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut end = q.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &q[end.min(q.len())..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            params.insert(key.to_ascii_lowercase(), value);
            rest = remaining.trim_start().trim_start_matches(',').trim_start();
        }
        match scheme.as_str() {
            "basic" => out.push(Challenge::Basic),
            "bearer" => {
                if let Some(realm) = params.remove("realm") {
                    out.push(Challenge::Bearer {
                        realm,
                        service: params.remove("service"),
                        scope: params.remove("scope"),
                    });
                }
            }
            _ => {}
        }
        if scheme.is_empty() {
            break;
        }
    }
    out
}

/// Credentials for a registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credentials {
    Basic { username: String, password: String },
    IdentityToken(String),
}

/// Looks up credentials for `host`, in order: the containers auth file named by
/// `$REGISTRY_AUTH_FILE` (podman, skopeo, buildah); the Docker config (`$DOCKER_CONFIG/config.json`
/// or `~/.docker/config.json`, credential helpers included); the containers auth files
/// `$XDG_RUNTIME_DIR/containers/auth.json` and `~/.config/containers/auth.json`.
pub(crate) fn docker_credentials(host: &str) -> Option<Credentials> {
    let file = |p: std::path::PathBuf| containers_auth(&p, host);
    if let Some(c) = std::env::var_os("REGISTRY_AUTH_FILE").and_then(|p| file(p.into())) {
        return Some(c);
    }
    if let Some(c) = docker_config_credentials(host) {
        return Some(c);
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| std::path::PathBuf::from(d).join("containers/auth.json"));
    let home = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".config/containers/auth.json"));
    runtime.into_iter().chain(home).find_map(file)
}

/// Credentials for `host` in a containers auth file (`{"auths": {"HOST": {"auth":
/// base64("user:password")}}}`, or `identitytoken`); keys may carry a scheme or a repository
/// path after the host.
fn containers_auth(path: &std::path::Path, host: &str) -> Option<Credentials> {
    use base64::Engine;
    let text = std::fs::read(path).ok()?;
    let doc: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable containers auth file");
            return None;
        }
    };
    let wanted = if host == DOCKER_HUB_API_HOST {
        DOCKER_HUB
    } else {
        host
    };
    let entry = doc["auths"].as_object()?.iter().find_map(|(key, v)| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let key_host = key.split('/').next().unwrap_or(key);
        let key_host = if key_host == "index.docker.io" || key_host == DOCKER_HUB_API_HOST {
            DOCKER_HUB
        } else {
            key_host
        };
        (key_host == wanted).then_some(v)
    })?;
    if let Some(token) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
        return Some(Credentials::IdentityToken(token.to_string()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .ok()?;
    let (username, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credentials::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// Credentials for `host` from the Docker config and its credential helpers.
fn docker_config_credentials(host: &str) -> Option<Credentials> {
    let key = if host == DOCKER_HUB || host == DOCKER_HUB_API_HOST {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    match docker_credential::get_credential(key) {
        Ok(docker_credential::DockerCredential::UsernamePassword(username, password)) => {
            Some(Credentials::Basic { username, password })
        }
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
            Some(Credentials::IdentityToken(t))
        }
        Err(e) => {
            tracing::debug!(host, error = ?e, "no docker credentials");
            None
        }
    }
}

/// The token endpoint's answer.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long it may be used (a little less than it is valid).
    pub(crate) fn into_token(self, realm: &str) -> Result<(String, Duration), RegistryError> {
        let token = self
            .token
            .or(self.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RegistryError::Auth(format!("token endpoint {realm} returned no token"))
            })?;
        // The distribution spec's default lifetime is 60 s; keep a margin for clock skew.
        let secs = self.expires_in.unwrap_or(60).max(10);
        Ok((token, Duration::from_secs(secs - secs / 10)))
    }
}

/// How requests to one host are authorised right now.
#[derive(Clone, Debug)]
pub(crate) enum HostAuth {
    /// The host asked for Basic; send credentials up front.
    Basic,
    /// The host asked for bearer tokens from this realm/service.
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// What the client remembers between requests: how each host authenticates and the tokens held.
#[derive(Default)]
pub(crate) struct AuthCache {
    schemes: Mutex<HashMap<String, HostAuth>>,
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
    credentials: Mutex<HashMap<String, Option<Credentials>>>,
}

impl AuthCache {
    pub(crate) fn scheme(&self, host: &str) -> Option<HostAuth> {
        self.schemes.lock().unwrap().get(host).cloned()
    }

    pub(crate) fn set_scheme(&self, host: &str, auth: HostAuth) {
        self.schemes.lock().unwrap().insert(host.to_string(), auth);
    }

    /// A cached, unexpired token for `host` and `scope`.
    pub(crate) fn token(&self, host: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap();
        tokens
            .get(&(host.to_string(), scope.to_string()))
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    pub(crate) fn set_token(&self, host: &str, scope: &str, token: String, ttl: Duration) {
        self.tokens.lock().unwrap().insert(
            (host.to_string(), scope.to_string()),
            (token, Instant::now() + ttl),
        );
    }

    pub(crate) fn forget_token(&self, host: &str, scope: &str) {
        self.tokens
            .lock()
            .unwrap()
            .remove(&(host.to_string(), scope.to_string()));
    }

    /// Credentials for `host`, looked up once per client.
    pub(crate) fn credentials(&self, host: &str) -> Option<Credentials> {
        let mut creds = self.credentials.lock().unwrap();
        creds
            .entry(host.to_string())
            .or_insert_with(|| docker_credentials(host))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_quoted_commas() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            }]
        );
    }

    #[test]
    fn parses_basic_multiple_and_odd_spacing() {
        assert_eq!(
            parse_challenges(r#"Basic realm="Registry Realm""#),
            vec![Challenge::Basic]
        );
        let c = parse_challenges(
            r#"Basic realm="x", Bearer realm=https://t.example/token , service = "s""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Challenge::Basic);
        match &c[1] {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                assert_eq!(realm, "https://t.example/token");
                assert_eq!(service.as_deref(), Some("s"));
                assert!(scope.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_challenges(r#"bearer REALM="r\"q""#)[0],
            Challenge::Bearer {
                realm: "r\"q".into(),
                service: None,
                scope: None
            }
        );
    }

    #[test]
    fn ignores_unknown_and_incomplete_challenges() {
        assert!(parse_challenges("Negotiate abc").is_empty());
        assert!(parse_challenges(r#"Bearer service="s""#).is_empty());
        assert!(parse_challenges("").is_empty());
    }

    #[test]
    fn token_cache_expires_and_forgets() {
        let cache = AuthCache::default();
        cache.set_token("h", "s", "t1".into(), Duration::from_secs(60));
        assert_eq!(cache.token("h", "s").as_deref(), Some("t1"));
        assert_eq!(cache.token("h", "other"), None);
        cache.forget_token("h", "s");
        assert_eq!(cache.token("h", "s"), None);
        cache.set_token("h", "s", "t2".into(), Duration::ZERO);
        assert_eq!(cache.token("h", "s"), None, "expired");
    }

    #[test]
    fn token_response_prefers_token_and_keeps_margin() {
        let r: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).unwrap();
        let (t, ttl) = r.into_token("realm").unwrap();
        assert_eq!(t, "a");
        assert_eq!(ttl, Duration::from_secs(270));
        let r: TokenResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert!(r.into_token("realm").is_err());
    }
}
