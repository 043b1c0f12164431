//! The configuration file (`--config`, default `/etc/stratafs/config.toml`).
//!
//! Read once by the binary and handed to the stages that need it. A missing file at the default
//! path means defaults; a missing file named explicitly, an unknown key or a bad value is an
//! error naming the file. See `docs/configuration.md` for every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::registry::{HostConfig, RegistrySettings};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/stratafs/config.toml";

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Registry client settings (timeouts, retries, size caps).
    #[serde(default)]
    pub registry: RegistrySettings,
    /// Per-registry settings keyed by `host[:port]` as written in image names (`docker.io`).
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
    /// The chunk cache.
    #[serde(default)]
    pub cache: CacheSettings,
    /// Layer indexes.
    #[serde(default)]
    pub index: IndexSettings,
    /// FUSE mounts (defaults for `stratafs mount -o`).
    #[serde(default)]
    pub mount: MountSettings,
}

/// `[mount]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountSettings {
    /// Seconds a read may wait for the registry before it fails with EIO.
    pub read_timeout_secs: f64,
    /// FUSE dispatch threads per mount.
    pub threads: usize,
    /// Open fully cached files with FUSE passthrough (kernel ≥ 6.9).
    pub passthrough: bool,
    /// Fetch the rest of the image's layers in the background while mounted.
    pub background_fetch: bool,
    /// Cap on background fetching, compressed bytes per second (`20M`); unset: no cap.
    #[serde(deserialize_with = "size_opt")]
    pub background_bandwidth: Option<u64>,
    /// Seconds after mounting before background fetching starts.
    pub background_delay_secs: f64,
    /// Record what the workload reads first into the image's startup profile.
    pub profile_record: bool,
    /// Replay the image's startup profile (recorded here, or pinned by the image) on mount.
    pub profile_replay: bool,
    /// Ranges of a profile fetched at once during replay.
    pub profile_parallel: usize,
    /// On each open of a file, fetch what is not cached of its first this many bytes at once
    /// (`8M`; 0: off): an open for reading predicts the reads.
    #[serde(deserialize_with = "size")]
    pub open_prefetch: u64,
    /// On each open of a Python module's bytecode, fetch the modules it imports, and theirs
    /// (with `open_prefetch` on).
    pub follow_imports: bool,
    /// On mount of an image's whole rootfs, fetch `/etc/passwd` and `/etc/group` and, with no
    /// startup profile to replay, what its config says runs first (the program and its
    /// libraries; with `open_prefetch` on).
    pub fetch_start: bool,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            read_timeout_secs: 60.0,
            threads: 4,
            passthrough: true,
            background_fetch: true,
            background_bandwidth: None,
            background_delay_secs: 0.0,
            profile_record: true,
            profile_replay: true,
            profile_parallel: 12,
            open_prefetch: 8 << 20,
            follow_imports: true,
            fetch_start: true,
        }
    }
}

/// `[index]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexSettings {
    /// Use stratafs indexes that the image's manifest pins (a layer annotation
    /// `io.stratafs.index.digest`, written by `stratafs index push --bind`). They are vouched for
    /// by the image's publisher exactly as the layers are. False: build every index locally.
    pub published: bool,
    /// Also use indexes found as referrers of the image that its manifest does *not* pin
    /// (`stratafs index push` without `--bind`). Off by default: anyone who can push to the
    /// repository could publish one, and until a layer is complete nothing but the index says
    /// which bytes make which file. Each use is logged as a warning.
    pub unbound_referrers: bool,
    /// Most entries one layer index may hold (tar entries, TOC entries, published indexes);
    /// a layer with more is refused. Bounds the memory of a hostile layer (about 0.5 KiB per entry).
    pub max_entries: usize,
    /// Largest eStargz or zstd:chunked TOC, or published index, accepted (uncompressed JSON).
    #[serde(deserialize_with = "size")]
    pub max_toc_bytes: u64,
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            published: true,
            unbound_referrers: false,
            max_entries: 500_000,
            max_toc_bytes: 128 << 20,
        }
    }
}

/// `[cache]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Most disk space for cached chunks: bytes (`10GiB`, `500M`) or a share of the
    /// filesystem holding the root (`10%`, the default). Never unbounded.
    pub max_size: CacheCap,
    /// Chunks (of about 1 MiB) kept in memory.
    pub memory_chunks: usize,
    /// Most bytes of chunks kept in memory (`16M`).
    #[serde(deserialize_with = "size")]
    pub memory_size: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_size: CacheCap::Share(10.0),
            memory_chunks: 64,
            memory_size: 16 << 20,
        }
    }
}

/// The cache cap as configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheCap {
    Bytes(u64),
    /// Percent of the size of the filesystem that holds the store root.
    Share(f64),
}

impl CacheCap {
    /// The cap in bytes for a store at `root` (a share of its filesystem's size; 1 GiB if the
    /// filesystem cannot be measured).
    pub fn bytes(&self, root: &Path) -> u64 {
        match *self {
            CacheCap::Bytes(b) => b,
            CacheCap::Share(pct) => {
                let mut dir = root;
                // The root may not exist yet: measure the nearest existing ancestor.
                while !dir.exists() {
                    match dir.parent() {
                        Some(p) => dir = p,
                        None => break,
                    }
                }
                match nix::sys::statvfs::statvfs(dir) {
                    Ok(s) => {
                        let total = s.blocks() as f64 * s.fragment_size() as f64;
                        (total * pct / 100.0) as u64
                    }
                    Err(_) => 1 << 30,
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for CacheCap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(CacheCap::Bytes(b)),
            Raw::Text(t) => match t.trim().strip_suffix('%') {
                Some(pct) => match pct.trim().parse::<f64>() {
                    Ok(p) if p > 0.0 && p <= 100.0 => Ok(CacheCap::Share(p)),
                    _ => Err(serde::de::Error::custom(format!(
                        "invalid cache share {t:?} (use a percentage above 0 and at most 100)"
                    ))),
                },
                None => parse_size(&t)
                    .map(CacheCap::Bytes)
                    .map_err(serde::de::Error::custom),
            },
        }
    }
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    size_opt(d).map(|s| s.unwrap_or(0))
}

fn size_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(b) => Ok(Some(b)),
        Size::Text(t) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Parses `123`, `64K`, `500M`, `10G`, `1T` (binary units; `KiB`/`KB`/`k` all mean 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("invalid size unit in {text:?} (use K, M, G or T)")),
    };
    Ok((value * (1u64 << shift) as f64) as u64)
}

impl Config {
    /// Loads `path`; when `explicit` is false a missing file yields the defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Adds the registry host entries of containerd's `hosts.toml` files under
    /// `[registry] config_path` (see `registry::hosts_toml`): entries of this file win whole.
    pub fn with_hosts_dir(mut self) -> Result<Config, ConfigError> {
        let dir = self.registry.config_path.clone();
        if dir.as_os_str().is_empty() {
            return Ok(self);
        }
        self.hosts = crate::registry::hosts_toml::merge(&dir, &self.hosts)
            .map_err(|message| ConfigError::Parse { path: dir, message })?;
        Ok(self)
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cache_settings() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("10 MB").unwrap(), 10 << 20);
        assert!(parse_size("10X").is_err());
        let c = Config::parse("[cache]\nmax_size = \"2G\"").unwrap();
        assert_eq!(c.cache.max_size, CacheCap::Bytes(2 << 30));
        assert_eq!(
            Config::parse("[cache]\nmax_size = 42")
                .unwrap()
                .cache
                .max_size,
            CacheCap::Bytes(42)
        );
        let c = Config::parse("[cache]\nmax_size = \"25%\"").unwrap();
        assert_eq!(c.cache.max_size, CacheCap::Share(25.0));
        assert!(Config::parse("[cache]\nmax_size = \"0%\"").is_err());
        assert!(Config::parse("[cache]\nmax_size = \"150%\"").is_err());
        // The default is a share of the filesystem, never unbounded.
        let dir = tempfile::tempdir().unwrap();
        let cap = Config::default()
            .cache
            .max_size
            .bytes(&dir.path().join("not/yet"));
        assert!(cap > 0 && cap < u64::MAX, "{cap}");
        let idx = Config::parse("[index]\nmax_toc_bytes = \"16M\"\nmax_entries = 10").unwrap();
        assert_eq!(
            (idx.index.max_toc_bytes, idx.index.max_entries),
            (16 << 20, 10)
        );
        assert!(!Config::default().index.unbound_referrers);
    }

    #[test]
    fn parses_hosts_and_rejects_unknown_keys() {
        let c = Config::parse(
            r#"
            [registry]
            request_timeout_secs = 5
            [hosts."docker.io"]
            mirrors = ["https://mirror.example.com", "http://10.0.0.1:5000"]
            [hosts."my.registry:5000"]
            plain_http = true
            ca_certs = ["/etc/ssl/extra.pem"]
            skip_verify = true
            "#,
        )
        .unwrap();
        assert_eq!(c.registry.request_timeout_secs, 5);
        assert_eq!(
            c.registry.max_manifest_bytes,
            8 << 20,
            "defaults fill the rest"
        );
        assert_eq!(c.hosts["docker.io"].mirrors.len(), 2);
        assert!(c.hosts["my.registry:5000"].plain_http);
        let err = Config::parse("[hosts.\"x\"]\nmirror = []").unwrap_err();
        assert!(err.contains("mirror"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert!(Config::load(&missing, false).is_ok());
        let err = Config::load(&missing, true).unwrap_err().to_string();
        assert!(err.contains("none.toml"), "{err}");
    }
}
