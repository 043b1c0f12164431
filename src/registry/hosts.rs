//! Where requests for a registry go: mirrors first, then the origin, each with its TLS settings.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::RegistryError;
use crate::reference::DOCKER_HUB;

/// Client-wide registry settings (`[registry]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Time allowed for one request to connect.
    pub connect_timeout_secs: u64,
    /// Time allowed for one metadata request (manifest, config, token) from send to last byte.
    pub request_timeout_secs: u64,
    /// Total time spent retrying one request (connection errors, 5xx, 429) before giving up.
    pub retry_max_elapsed_secs: u64,
    /// Largest manifest, index or config accepted.
    pub max_manifest_bytes: u64,
    /// containerd's registry host directory (`<dir>/<host>/hosts.toml`), read for mirrors and
    /// TLS settings of registries the config file's `[hosts]` does not name; empty: none.
    pub config_path: PathBuf,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            connect_timeout_secs: 10,
            request_timeout_secs: 30,
            retry_max_elapsed_secs: 60,
            max_manifest_bytes: 8 << 20,
            config_path: PathBuf::from("/etc/containerd/certs.d"),
        }
    }
}

/// Settings for one registry host (`[hosts."HOST[:PORT]"]` in the config file).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Mirror base URLs (`https://mirror.example.com`), tried in order before the origin.
    /// A pull-through cache is a mirror.
    pub mirrors: Vec<String>,
    /// Talk plain HTTP to this host.
    pub plain_http: bool,
    /// Extra PEM CA certificate files trusted for this host.
    pub ca_certs: Vec<PathBuf>,
    /// Accept any TLS certificate from this host (insecure).
    pub skip_verify: bool,
    /// Mirrors asked only for content by digest (blobs, manifests by digest), never to resolve
    /// a tag (containerd's `capabilities = ["pull"]`); tried after `mirrors`.
    pub pull_only_mirrors: Vec<String>,
}

/// One place a request can be sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port]` (plus a path prefix for mirrors), without a trailing `/`.
    pub base: String,
    /// `host[:port]`: the key for TLS settings, credentials and tokens.
    pub host: String,
    pub is_mirror: bool,
    /// HTTPS first, then plain HTTP if TLS cannot be established (loopback registries).
    pub http_fallback: bool,
}

/// The endpoints to try for `registry` (as written in names), mirrors first.
pub(crate) fn endpoints(
    hosts: &BTreeMap<String, HostConfig>,
    registry: &str,
    api_host: &str,
    force_plain_http: bool,
    by_digest: bool,
) -> Result<Vec<Endpoint>, RegistryError> {
    // `_default` (containerd's name) configures registries without an entry of their own.
    let config = hosts
        .get(registry)
        .or_else(|| hosts.get("_default"))
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let pull_only = config.pull_only_mirrors.iter().filter(|_| by_digest);
    for mirror in config.mirrors.iter().chain(pull_only) {
        let base = mirror.trim_end_matches('/');
        let base = base.strip_suffix("/v2").unwrap_or(base).to_string();
        let host = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"))
            .ok_or_else(|| {
                RegistryError::Config(format!(
                    "mirror {mirror:?} of {registry} must start with http:// or https://"
                ))
            })?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        out.push(Endpoint {
            base,
            host,
            is_mirror: true,
            http_fallback: false,
        });
    }
    let plain = force_plain_http || config.plain_http;
    let scheme = if plain { "http" } else { "https" };
    out.push(Endpoint {
        base: format!("{scheme}://{api_host}"),
        host: api_host.to_string(),
        is_mirror: false,
        http_fallback: !plain && registry != DOCKER_HUB && is_loopback(api_host),
    });
    Ok(out)
}

/// Whether `host[:port]` names this machine (`localhost`, 127.0.0.0/8, ::1).
pub(crate) fn is_loopback(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_and_loopback_falls_back_to_http() {
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "docker.io".to_string(),
            HostConfig {
                mirrors: vec![
                    "http://127.0.0.1:5001/".into(),
                    "https://m.example/v2".into(),
                ],
                ..Default::default()
            },
        );
        let eps = endpoints(&hosts, "docker.io", "registry-1.docker.io", false, false).unwrap();
        let bases: Vec<_> = eps.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://127.0.0.1:5001",
                "https://m.example",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(eps[0].host, "127.0.0.1:5001");
        assert!(eps[0].is_mirror && !eps[2].is_mirror && !eps[2].http_fallback);

        let eps = endpoints(&hosts, "127.0.0.1:5000", "127.0.0.1:5000", false, false).unwrap();
        assert_eq!(eps.len(), 1);
        assert!(eps[0].http_fallback && eps[0].base.starts_with("https://"));
        let eps = endpoints(&hosts, "127.0.0.1:5000", "127.0.0.1:5000", true, false).unwrap();
        assert_eq!(eps[0].base, "http://127.0.0.1:5000");
        let eps = endpoints(&hosts, "r.example", "r.example", false, false).unwrap();
        assert!(!eps[0].http_fallback);

        hosts.insert(
            "bad".into(),
            HostConfig {
                mirrors: vec!["ftp://x".into()],
                ..Default::default()
            },
        );
        assert!(endpoints(&hosts, "bad", "bad", false, false).is_err());
    }

    #[test]
    fn loopback_detection() {
        for h in [
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "a.localhost",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1:5000", "example.com", "[2001:db8::1]:5000"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
