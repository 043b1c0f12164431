//! A real `docker-registry` (CNCF distribution 2.8) process per test.
//!
//! Each [`Registry`] owns a temp dir holding its YAML config, storage root,
//! optional htpasswd file / token root cert, and a log file receiving both
//! the registry's logrus output (stderr) and its Apache-combined access log
//! (stdout). The process is killed on drop.

use super::push::{Auth, Response};
use super::token::TokenAuthConfig;
use super::{free_port, push};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Path of the registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// User-Agent of the readiness probes; such lines are hidden from
/// [`Registry::access_log`].
const PROBE_UA: &str = "stratafs-test-harness-probe";

/// How long to wait for the registry to answer `/v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for [`Registry::start`]. At most one of `htpasswd` / `token`.
#[derive(Clone, Debug, Default)]
pub struct RegistryOpts {
    /// Require HTTP Basic auth with this (user, password).
    pub htpasswd: Option<(String, String)>,
    /// Require bearer tokens from a [`super::TokenServer`].
    pub token: Option<TokenAuthConfig>,
    /// Run as a pull-through cache of this upstream registry URL.
    pub proxy_remote: Option<String>,
    /// Serve HTTPS with this certificate and key (see [`TestCa`]).
    pub tls: Option<TlsFiles>,
    /// Answer blob GETs with a redirect to this base URL plus the blob's storage path (the
    /// `redirect` storage middleware: what a registry backed by a CDN or object store does).
    pub redirect: Option<String>,
}

/// A server certificate and key (PEM files) for a TLS registry.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway certificate authority that signs a server certificate for 127.0.0.1/localhost.
pub struct TestCa {
    /// The CA certificate (PEM), to give clients as an extra trusted CA.
    pub ca_cert: PathBuf,
    /// The server certificate and key signed by the CA.
    pub server: TlsFiles,
}

impl TestCa {
    /// Writes a CA and a server certificate for `127.0.0.1` and `localhost` into `dir`.
    pub fn new(dir: &Path) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stratafs test CA");
        let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server = params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("sign server cert");
        let files = TestCa {
            ca_cert: dir.join("ca.pem"),
            server: TlsFiles {
                cert: dir.join("server.pem"),
                key: dir.join("server.key"),
            },
        };
        fs::write(&files.ca_cert, ca.pem()).unwrap();
        fs::write(&files.server.cert, server.pem()).unwrap();
        fs::write(&files.server.key, server_key.serialize_pem()).unwrap();
        files
    }
}

/// One parsed access-log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// HTTP method (`GET`, `HEAD`, ...).
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Request URI exactly as logged (path plus query).
    pub uri: String,
    /// Response status.
    pub status: u16,
    /// Body bytes the handler wrote. Not always what went on the wire: a
    /// `HEAD` on a manifest logs the manifest size, a `HEAD` on a blob 0.
    pub bytes: u64,
    /// Request User-Agent (empty if none).
    pub user_agent: String,
}

/// A running (or stopped) registry process.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Mutex<Option<Child>>,
    baseline: Mutex<usize>,
}

impl Registry {
    /// Configure and start a registry; panics (with the log) if it does not
    /// answer `GET /v2/` within 15 s.
    pub fn start(opts: RegistryOpts) -> Registry {
        assert!(
            opts.htpasswd.is_none() || opts.token.is_none(),
            "RegistryOpts: htpasswd and token auth are mutually exclusive"
        );
        let dir = tempfile::Builder::new()
            .prefix("stratafs-registry-")
            .tempdir()
            .expect("registry tempdir");
        let auth_yaml = auth_section(dir.path(), &opts);
        let mut reg = Registry {
            dir,
            port: 0,
            tls: opts.tls.is_some(),
            child: Mutex::new(None),
            baseline: Mutex::new(0),
        };
        let mut last_err = String::new();
        for _attempt in 0..5 {
            reg.port = free_port();
            let config = config_yaml(reg.dir(), reg.port, &auth_yaml, &opts);
            fs::write(reg.dir().join("config.yml"), config).expect("write registry config");
            let _ = fs::remove_file(reg.log_path());
            match reg.spawn_and_wait() {
                Ok(()) => return reg,
                Err(log) if log.contains("address already in use") => last_err = log,
                Err(log) => panic!("docker-registry did not start:\n{log}"),
            }
        }
        panic!("docker-registry: no free port after 5 attempts:\n{last_err}")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's temp dir (config, log, storage).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Storage root directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Path of the combined log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Whole log file contents (logrus lines and access lines).
    pub fn log_contents(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the blob with this digest is in the storage root.
    pub fn has_blob(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .exists()
    }

    /// Process id of the running registry, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// All access-log entries since start (or the last
    /// [`clear_access_log`](Self::clear_access_log)), readiness probes
    /// excluded. Waits briefly for the log to stop growing, since the
    /// registry logs a request only after the client may have seen the
    /// response.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let base = *self.baseline.lock().unwrap();
        self.access_log_since(base)
    }

    /// A mark for [`access_log_since`](Self::access_log_since): the number
    /// of (non-probe) entries logged so far.
    pub fn log_mark(&self) -> usize {
        self.all_entries().len()
    }

    /// Entries logged after `mark`.
    pub fn access_log_since(&self, mark: usize) -> Vec<AccessEntry> {
        let all = self.all_entries();
        all.get(mark..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Bytes of blob `digest` the registry served (GETs) after `mark`.
    pub fn blob_bytes_since(&self, mark: usize, digest: &str) -> u64 {
        self.access_log_since(mark)
            .iter()
            .filter(|e| e.method == "GET" && e.path.ends_with(digest))
            .map(|e| e.bytes)
            .sum()
    }

    /// Make [`access_log`](Self::access_log) forget entries logged so far.
    pub fn clear_access_log(&self) {
        let mark = self.log_mark();
        *self.baseline.lock().unwrap() = mark;
    }

    /// Poll entries after `mark` until `pred` holds; panics after `timeout`.
    pub fn wait_access_log(
        &self,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&[AccessEntry]) -> bool,
    ) -> Vec<AccessEntry> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.access_log_since(mark);
            if pred(&entries) {
                return entries;
            }
            if Instant::now() > deadline {
                panic!("access log condition not met after {timeout:?}: {entries:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the process (SIGTERM, then SIGKILL after 5 s) and reap it.
    pub fn stop(&self) {
        if let Some(child) = self.child.lock().unwrap().take() {
            super::terminate(child, Duration::from_secs(5));
        }
    }

    /// Stop and start again on the same port with the same storage.
    pub fn restart(&self) {
        self.stop();
        if let Err(log) = self.spawn_and_wait() {
            panic!("docker-registry did not restart:\n{log}");
        }
    }

    /// Push an image (see [`push::push_image`]).
    pub fn push_image(&self, repo: &str, tag: &str, image: &super::Image, auth: &Auth) -> String {
        push::push_image(&self.url(), repo, tag, image, auth)
    }

    /// Push an index (see [`push::push_index`]).
    pub fn push_index(&self, repo: &str, tag: &str, index: &super::Index, auth: &Auth) -> String {
        push::push_index(&self.url(), repo, tag, index, auth)
    }

    /// GET a manifest accepting all manifest types.
    pub fn get_manifest(&self, repo: &str, reference: &str, auth: &Auth) -> Response {
        push::get_manifest(&self.url(), repo, reference, auth)
    }

    fn all_entries(&self) -> Vec<AccessEntry> {
        settled_log(&self.log_path())
            .lines()
            .filter_map(parse_access_line)
            .filter(|e| e.user_agent != PROBE_UA)
            .collect()
    }

    /// Spawn the process and wait for `/v2/`; on failure return the log.
    fn spawn_and_wait(&self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REGISTRY_BIN}: {e}"));
        *self.child.lock().unwrap() = Some(child);
        let probe = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(1))
            .user_agent(PROBE_UA)
            .build();
        let url = format!("{}/v2/", self.url());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = {
                let mut guard = self.child.lock().unwrap();
                let child = guard.as_mut().expect("child");
                match child.try_wait() {
                    Ok(Some(status)) => {
                        guard.take();
                        Some(status)
                    }
                    _ => None,
                }
            };
            if let Some(status) = exited {
                return Err(format!("exited with {status}\n{}", self.log_contents()));
            }
            if self.tls {
                // The test CA is not in the probe's roots: listening is ready enough.
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return Ok(());
                }
            } else {
                match probe.get(&url).call() {
                    Ok(r) if r.status() == 200 => return Ok(()),
                    Err(ureq::Error::Status(401, _)) => return Ok(()),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer on {url} after {START_TIMEOUT:?}\n{}",
                    self.log_contents()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.child.lock() {
            if let Some(mut child) = guard.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Read the log once it has not grown for 40 ms (at most ~2 s).
fn settled_log(path: &Path) -> String {
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = size(path);
    loop {
        std::thread::sleep(Duration::from_millis(40));
        let now = size(path);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    fs::read_to_string(path).unwrap_or_default()
}

/// The `auth:` YAML section (empty if no auth), writing the files it needs.
fn auth_section(dir: &Path, opts: &RegistryOpts) -> String {
    if let Some((user, pass)) = &opts.htpasswd {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, pass])
            .output()
            .expect("run htpasswd");
        assert!(out.status.success(), "htpasswd failed: {out:?}");
        let path = dir.join("htpasswd");
        fs::write(&path, &out.stdout).expect("write htpasswd");
        return format!(
            "auth:\n  htpasswd:\n    realm: stratafs-test-realm\n    path: {}\n",
            path.display()
        );
    }
    if let Some(tok) = &opts.token {
        // Own copy, so the registry can restart after the token server's
        // temp dir is gone.
        let path = dir.join("token-root.pem");
        fs::copy(&tok.rootcertbundle, &path).expect("copy rootcertbundle");
        return format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tok.realm,
            tok.service,
            tok.issuer,
            path.display()
        );
    }
    String::new()
}

/// Full registry config for a port.
fn config_yaml(dir: &Path, port: u16, auth: &str, opts: &RegistryOpts) -> String {
    let mut y = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: stratafs-test-secret\n",
        dir.join("data").display()
    );
    if let Some(tls) = &opts.tls {
        y.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    y.push_str(auth);
    if let Some(remote) = &opts.proxy_remote {
        y.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
    }
    if let Some(base) = &opts.redirect {
        y.push_str(&format!(
            "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base}\n"
        ));
    }
    y
}

/// Parse one Apache-combined access line, e.g.
/// `127.0.0.1 - - [23/Nov/2026:06:53:25 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
/// Returns `None` for logrus lines and anything else.
pub fn parse_access_line(line: &str) -> Option<AccessEntry> {
    if line.starts_with("time=") {
        return None;
    }
    let close = line.find("] \"")?;
    let rest = &line[close + 2..];
    let (request, rest) = quoted(rest)?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_string();
    let uri = parts.next()?.to_string();
    let mut fields = rest.trim_start().splitn(3, ' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    let rest = fields.next().unwrap_or("");
    let (_referer, rest) = quoted(rest.trim_start())?;
    let (user_agent, _) = quoted(rest.trim_start())?;
    let path = uri.split('?').next().unwrap_or("").to_string();
    Some(AccessEntry {
        method,
        path,
        uri,
        status,
        bytes,
        user_agent,
    })
}

/// Split a leading double-quoted string (with backslash escapes) off `s`.
fn quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    out.push(n);
                }
            }
            '"' => return Some((out, &body[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// Checks what a lazy read of one small file from the upper of two TOC-indexed layers (eStargz,
/// zstd:chunked) cost, from the layer GETs in `fetched`: range reads only; the lower layer
/// (`lower`, a digest) served its TOC only (under 64 KiB); the upper one its TOC and one fetch
/// — the file's chunk and, as a miss does, the small chunks after it (32 KiB of them; the
/// bound is loose).
pub fn assert_small_toc_read(fetched: &[AccessEntry], lower: &str) {
    assert!(
        fetched.iter().all(|e| e.status == 206),
        "only range reads: {fetched:#?}"
    );
    let lower: u64 = fetched
        .iter()
        .filter(|e| e.path.ends_with(lower))
        .map(|e| e.bytes)
        .sum();
    assert!(lower < 64 * 1024, "{lower} bytes of the lower layer");
    let total: u64 = fetched.iter().map(|e| e.bytes).sum();
    assert!(
        total < 64 * 1024 + (512 << 10),
        "{total} layer bytes for one small file"
    );
}
