//! A `stratafs snapshotter` process per test, on its own store and socket, logging to a file
//! beside the store. Dropping it stops the process (lazy mounts stay while it runs, as in
//! production) and then detaches every mount left under its store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Stratafs;

/// A `stratafs snapshotter` process on its own store.
pub struct Snapshotter {
    pub cli: Stratafs,
    pub socket: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Snapshotter {
    /// Starts one on a fresh store, with on-demand reads only (so the bytes the registry
    /// serves measure laziness).
    pub fn start() -> Snapshotter {
        Snapshotter::start_with(&[])
    }

    /// [`start`](Self::start) with more `stratafs snapshotter` arguments.
    pub fn start_with(args: &[&str]) -> Snapshotter {
        Snapshotter::start_configured("[mount]\nbackground_fetch = false\n", args)
    }

    /// One with this configuration file and these `stratafs snapshotter` arguments.
    pub fn start_configured(config: &str, args: &[&str]) -> Snapshotter {
        let mut cli = Stratafs::new();
        cli.set_config(config);
        let socket = cli.root().parent().unwrap().join("snapshotter.sock");
        let mut s = Snapshotter {
            cli,
            socket,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn log_path(&self) -> PathBuf {
        self.cli.root().parent().unwrap().join("snapshotter.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = self.cli.command();
        cmd.args(["--log-level", "info", "snapshotter", "--address"])
            .arg(&self.socket)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start stratafs snapshotter"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("snapshotter exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "snapshotter did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; lazy mounts stay.
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(10));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The lazy mounts' daemons (pids from the mount records).
    pub fn daemons(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.cli.root().join("run/mounts")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
            .collect()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop();
        let mut mounts = super::containerd::mounts_under(&self.cli.root());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
