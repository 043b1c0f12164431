//! containerd's registry host configuration — `<config_path>/<host>/hosts.toml`, the layout of
//! `/etc/containerd/certs.d` that pull-through caches, Spegel and Dragonfly plug into — read as
//! a source of mirrors and TLS settings beside stratafs's own `[hosts]`.
//!
//! Per directory `HOST[:PORT]` (or `_default`, for registries without a directory of their
//! own), `hosts.toml` may say:
//! - `server = "URL"`: the registry itself; an `http://` URL makes it plain HTTP;
//! - `ca` (a path or a list, relative paths from that directory) and `skip_verify`: TLS
//!   settings of the server;
//! - `[host."URL"]` tables, tried in order before the server: `capabilities` (default pull,
//!   resolve and push; a host without `pull` is not used; one with `pull` but not `resolve` is
//!   asked only for content by digest, never to resolve a tag), `ca`, `skip_verify`,
//!   `override_path` (supported when the URL's path ends in `/v2`).
//!
//! Settings stratafs cannot honour (`header`, `client` certificates) make that host entry be
//! skipped with a warning rather than half-applied. A registry that has an entry in stratafs's
//! own config file is configured by that entry alone: the file named explicitly wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::hosts::HostConfig;

/// The host entries found under `dir`, merged under `own` (entries of `own` win whole). A
/// missing `dir` gives `own` unchanged.
pub fn merge(
    dir: &Path,
    own: &BTreeMap<String, HostConfig>,
) -> Result<BTreeMap<String, HostConfig>, String> {
    let mut out = own.clone();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    let mut names: Vec<_> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for registry in names {
        let file = dir.join(&registry).join("hosts.toml");
        if own.contains_key(&registry) || !file.is_file() {
            continue;
        }
        // One broken file must not stop every command: it is skipped, loudly.
        let result = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|text| {
                let mut entries = out.clone();
                read(&file, &registry, &text, &mut entries).map(|()| entries)
            });
        match result {
            Ok(entries) => out = entries,
            Err(e) => tracing::warn!("ignoring containerd host configuration: {e}"),
        }
    }
    Ok(out)
}

/// The `host[:port]` stratafs connects to for registry `name` (Docker Hub's API host for
/// `docker.io`).
fn api_host(name: &str) -> &str {
    if name == crate::reference::DOCKER_HUB {
        crate::reference::DOCKER_HUB_API_HOST
    } else {
        name
    }
}

/// A URL's `host[:port]`.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    rest.split('/').next().filter(|h| !h.is_empty())
}

fn ca_paths(value: Option<&toml::Value>, base: &Path, file: &Path) -> Result<Vec<PathBuf>, String> {
    let paths: Vec<&str> = match value {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![s.as_str()],
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{}: `ca` entries must be paths", file.display()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(format!(
                "{}: `ca` must be a path or a list of paths",
                file.display()
            ))
        }
    };
    Ok(paths.into_iter().map(|p| base.join(p)).collect())
}

/// Adds the `ca` and `skip_verify` of `table` to the TLS settings of connections to `host`.
fn add_tls(
    out: &mut BTreeMap<String, HostConfig>,
    host: &str,
    table: &toml::Table,
    base: &Path,
    file: &Path,
) -> Result<(), String> {
    let tls = out.entry(host.to_string()).or_default();
    tls.ca_certs.extend(ca_paths(table.get("ca"), base, file)?);
    tls.skip_verify |= table
        .get("skip_verify")
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    Ok(())
}

fn read(
    file: &Path,
    registry: &str,
    text: &str,
    out: &mut BTreeMap<String, HostConfig>,
) -> Result<(), String> {
    let at = |detail: String| format!("{}: {detail}", file.display());
    let table: toml::Table = text.parse().map_err(|e| at(format!("{e}")))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut config = HostConfig::default();
    for (key, value) in &table {
        match key.as_str() {
            "server" => {
                let url = value
                    .as_str()
                    .ok_or_else(|| at("`server` must be a URL".into()))?;
                let host = url_host(url).ok_or_else(|| {
                    at(format!(
                        "server {url:?} must start with http:// or https://"
                    ))
                })?;
                // stratafs talks to the registry itself: `server` is honoured only when it
                // names that registry (for its scheme and TLS settings).
                if registry == "_default" || host != api_host(registry) {
                    tracing::warn!(file = %file.display(), server = url, "ignoring `server`: stratafs talks to the registry itself ({})", api_host(registry));
                } else {
                    config.plain_http = url.starts_with("http://");
                    add_tls(out, host, &table, base, file)?;
                }
            }
            "ca" | "skip_verify" | "capabilities" | "override_path" => {}
            "host" => {
                let hosts = value
                    .as_table()
                    .ok_or_else(|| at("`host` must be a table".into()))?;
                for (url, entry) in hosts {
                    let entry = entry
                        .as_table()
                        .ok_or_else(|| at(format!("host {url:?} must be a table")))?;
                    mirror(file, base, url, entry, &mut config, out)?;
                }
            }
            other => {
                tracing::warn!(file = %file.display(), "ignoring `{other}`: stratafs does not support it")
            }
        }
    }
    if !table.contains_key("server")
        && (table.contains_key("ca") || table.contains_key("skip_verify"))
    {
        // TLS settings of the registry itself, named by its directory.
        if registry == "_default" {
            tracing::warn!(file = %file.display(), "ignoring `ca`/`skip_verify` of _default: set them per registry");
        } else {
            add_tls(out, api_host(registry), &table, base, file)?;
        }
    }
    let entry = out.entry(registry.to_string()).or_default();
    entry.mirrors.extend(config.mirrors);
    entry.pull_only_mirrors.extend(config.pull_only_mirrors);
    entry.plain_http |= config.plain_http;
    Ok(())
}

/// One `[host."URL"]` table.
fn mirror(
    file: &Path,
    base: &Path,
    url: &str,
    entry: &toml::Table,
    config: &mut HostConfig,
    out: &mut BTreeMap<String, HostConfig>,
) -> Result<(), String> {
    let skip = |why: &str| {
        tracing::warn!(file = %file.display(), host = url, "skipping this host: {why}");
        Ok(())
    };
    let host = url_host(url).ok_or_else(|| {
        format!(
            "{}: host {url:?} must start with http:// or https://",
            file.display()
        )
    })?;
    if let Some(k) = entry
        .keys()
        .find(|k| matches!(k.as_str(), "header" | "client"))
    {
        return skip(&format!("stratafs does not support `{k}`"));
    }
    if let Some(k) = entry.keys().find(|k| {
        !matches!(
            k.as_str(),
            "capabilities" | "ca" | "skip_verify" | "override_path"
        )
    }) {
        return Err(format!(
            "{}: host {url:?}: unknown key `{k}`",
            file.display()
        ));
    }
    let override_path = entry
        .get("override_path")
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    let path = url
        .trim_end_matches('/')
        .splitn(4, '/')
        .nth(3)
        .unwrap_or("");
    if override_path && !(path == "v2" || path.ends_with("/v2")) {
        return skip("override_path is supported only for a URL whose path ends in /v2");
    }
    let capabilities: Vec<&str> = match entry.get("capabilities") {
        None => vec!["pull", "resolve", "push"],
        Some(v) => v
            .as_array()
            .ok_or_else(|| {
                format!(
                    "{}: host {url:?}: `capabilities` must be a list",
                    file.display()
                )
            })?
            .iter()
            .filter_map(toml::Value::as_str)
            .collect(),
    };
    add_tls(out, host, entry, base, file)?;
    match (
        capabilities.contains(&"pull"),
        capabilities.contains(&"resolve"),
    ) {
        (true, true) => config.mirrors.push(url.to_string()),
        (true, false) => config.pull_only_mirrors.push(url.to_string()),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_gives_mirrors_in_order_and_tls_settings() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.example:5000");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"
server = "http://registry.example:5000"
[host."http://zz-cache:5001"]
  capabilities = ["pull", "resolve"]
[host."https://aa-blobs.example/v2"]
  capabilities = ["pull"]
  ca = "blobs-ca.pem"
  override_path = true
[host."https://with-header.example"]
  [host."https://with-header.example".header]
    x-token = ["t"]
"#,
        )
        .unwrap();
        let merged = merge(dir.path(), &BTreeMap::new()).unwrap();
        let r = &merged["registry.example:5000"];
        assert_eq!(
            r.mirrors,
            ["http://zz-cache:5001"],
            "in file order; header host skipped"
        );
        assert_eq!(r.pull_only_mirrors, ["https://aa-blobs.example/v2"]);
        assert!(r.plain_http);
        assert_eq!(
            merged["aa-blobs.example"].ca_certs,
            [reg.join("blobs-ca.pem")]
        );
        // stratafs's own entry wins whole.
        let mut own = BTreeMap::new();
        own.insert("registry.example:5000".to_string(), HostConfig::default());
        let merged = merge(dir.path(), &own).unwrap();
        assert!(merged["registry.example:5000"].mirrors.is_empty());
        // A file stratafs cannot understand is skipped (with a warning), not fatal.
        std::fs::write(
            reg.join("hosts.toml"),
            "[host.\"http://m\"]\nmirror = true\n",
        )
        .unwrap();
        let merged = merge(dir.path(), &BTreeMap::new()).unwrap();
        assert!(!merged.contains_key("registry.example:5000"), "{merged:?}");
        // A server that names another host does not make this registry plain HTTP.
        std::fs::write(
            reg.join("hosts.toml"),
            "server = \"http://elsewhere:5000\"\n",
        )
        .unwrap();
        let merged = merge(dir.path(), &BTreeMap::new()).unwrap();
        assert!(!merged["registry.example:5000"].plain_http);
        assert!(merge(&dir.path().join("absent"), &BTreeMap::new())
            .unwrap()
            .is_empty());
    }
}
