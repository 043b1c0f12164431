//! Running the real `stratafs` binary against a private store, config and Docker config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `stratafs` invocation context: its own `--root`, optional `--config`, and a
/// `DOCKER_CONFIG` directory (empty unless a test writes credentials) so the host's
/// credentials never leak into a test.
pub struct Stratafs {
    dir: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl Stratafs {
    pub fn new() -> Stratafs {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-cli-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("docker")).unwrap();
        Stratafs { dir, config: None }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The logs of every mount daemon of this store, concatenated.
    pub fn mount_logs(&self) -> String {
        let mut log = String::new();
        for e in std::fs::read_dir(self.root().join("logs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            log.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        log
    }

    /// Waits until a mount daemon of this store has logged `line` (panics after 30 s).
    pub fn wait_for_mount_log(&self, line: &str) {
        self.wait_for_mount_logs(line, 1);
    }

    /// Waits until the mount logs of this store hold `line` `n` times.
    pub fn wait_for_mount_logs(&self, line: &str, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.mount_logs().matches(line).count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "no {line:?} in the mount logs: {}",
                self.mount_logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// (serving pid, holder pid) of this store's mount at `dir`, from `cache stats --json`.
    pub fn serving(&self, dir: &Path) -> Option<(u32, u32)> {
        let stats: serde_json::Value =
            serde_json::from_str(&self.ok(&["cache", "stats", "--json"]))
                .expect("cache stats --json");
        let m = stats["mounts"]
            .as_array()?
            .iter()
            .find(|m| m["mountpoint"].as_str() == dir.to_str())?;
        Some((m["pid"].as_u64()? as u32, m["holder"].as_u64()? as u32))
    }

    /// Writes `text` as the `--config` file for later invocations.
    pub fn set_config(&mut self, text: &str) {
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        self.config = Some(path);
    }

    /// Writes a Docker `config.json` with Basic credentials for `registry`.
    pub fn set_docker_login(&self, registry: &str, user: &str, password: &str) {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
        std::fs::write(
            self.dir.path().join("docker/config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    }

    /// The command with root, config and environment set; add arguments and run.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stratafs"));
        cmd.arg("--root").arg(self.root());
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        } else {
            cmd.arg("--config").arg(self.dir.path().join("absent.toml"));
            // An explicit --config must exist: write an empty one.
            std::fs::write(self.dir.path().join("absent.toml"), "").unwrap();
        }
        cmd.env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env_remove("STRATAFS_ROOT")
            .env_remove("STRATAFS_CONFIG")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run stratafs")
    }

    /// Runs and returns the output with the process's peak resident memory (VmHWM, as
    /// `wait4` reports it for this one child), in bytes.
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which std cannot do
    pub fn run_peak(&self, args: &[&str]) -> (Output, u64) {
        use std::io::Read;
        use std::process::Stdio;
        let mut child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run stratafs");
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).unwrap();
            v
        });
        let mut stderr = Vec::new();
        err.read_to_end(&mut stderr).unwrap();
        let stdout = reader.join().unwrap();
        let mut status = 0;
        // SAFETY: rusage is plain data; the pid is our own child, not yet waited for.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        assert_eq!(pid, child.id() as i32, "wait4");
        let output = Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(status),
            stdout,
            stderr,
        };
        (output, usage.ru_maxrss as u64 * 1024)
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "stratafs {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "stratafs {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `cat REF PATH`: the file's bytes (fails the test if the command fails).
    pub fn cat(&self, reference: &str, path: &str) -> Vec<u8> {
        let out = self.run(&["cat", reference, path]);
        assert!(
            out.status.success(),
            "cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `ls REF PATH`: the names listed.
    pub fn ls(&self, reference: &str, path: &str) -> Vec<String> {
        self.ok(&["ls", reference, path])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `pull --json`, parsed.
    pub fn pull_json(&self, reference: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["pull", "--json"];
        args.extend_from_slice(extra);
        args.push(reference);
        serde_json::from_str(&self.ok(&args)).expect("pull --json prints JSON")
    }

    /// Every file in the store with its bytes (the lock file and tmp/ excluded), to check
    /// that a failed operation changed nothing.
    pub fn store_snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let root = self.root();
        if root.exists() {
            walk(&root, &root, &mut out);
        }
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if rel == Path::new("lock") {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            out.insert(rel, std::fs::read(&path).unwrap());
        }
    }
}
