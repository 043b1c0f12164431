//! The open mode of every inode a serving process holds open, for the process that takes its
//! connection over.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How the open files of one inode are served: the kernel wants all of them alike (opening an
/// inode both ways, or with two backing ids, fails with EIO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Through the daemon, with the kernel's page cache.
    Cached,
    /// FUSE passthrough to the backing file with this id.
    Passthrough(u32),
}

/// The mode of every inode a serving process holds open, as an append-only log ("=INO" through
/// the daemon, "+INO ID" passthrough, "-INO" when its last open closed), so that a process
/// taking over opens them the same way. Compacted when mostly closed entries.
pub struct OpenLog {
    path: PathBuf,
    state: Mutex<LogState>,
}

struct LogState {
    file: std::fs::File,
    live: HashMap<u64, OpenMode>,
    lines: usize,
}

impl OpenLog {
    /// A new, empty log at `path`.
    pub fn create(path: &Path) -> std::io::Result<OpenLog> {
        Self::rewrite(path, HashMap::new())
    }

    /// The inodes still open according to the log at `path` (none if there is none).
    pub fn read(path: &Path) -> HashMap<u64, OpenMode> {
        let mut open = HashMap::new();
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            let (op, rest) = line.split_at(line.len().min(1));
            let mut f = rest.split(' ').map(str::parse::<u64>);
            match (op, f.next(), f.next()) {
                ("=", Some(Ok(ino)), None) => {
                    open.insert(ino, OpenMode::Cached);
                }
                ("+", Some(Ok(ino)), Some(Ok(id))) if id <= u32::MAX as u64 => {
                    open.insert(ino, OpenMode::Passthrough(id as u32));
                }
                ("-", Some(Ok(ino)), None) => {
                    open.remove(&ino);
                }
                _ => {
                    tracing::warn!(line, path = %path.display(), "ignoring a malformed open-log line")
                }
            }
        }
        open
    }

    /// Starts the log at `path` again with just `live` in it.
    pub fn rewrite(path: &Path, live: HashMap<u64, OpenMode>) -> std::io::Result<OpenLog> {
        let file = Self::write_state(path, &live)?;
        Ok(OpenLog {
            path: path.to_path_buf(),
            state: Mutex::new(LogState {
                file,
                lines: live.len(),
                live,
            }),
        })
    }

    /// Writes `live` whole over `path` (the store's atomic write, its temp file beside it);
    /// returns it open for appending.
    fn write_state(path: &Path, live: &HashMap<u64, OpenMode>) -> std::io::Result<std::fs::File> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let text: String = live
            .iter()
            .map(|(ino, mode)| Self::line(*ino, Some(*mode)))
            .collect();
        crate::store::write_atomic(dir, path, text.as_bytes()).map_err(std::io::Error::other)?;
        std::fs::OpenOptions::new().append(true).open(path)
    }

    fn line(ino: u64, mode: Option<OpenMode>) -> String {
        match mode {
            Some(OpenMode::Cached) => format!("={ino}\n"),
            Some(OpenMode::Passthrough(id)) => format!("+{ino} {id}\n"),
            None => format!("-{ino}\n"),
        }
    }

    /// Records `ino` opened in `mode` (`None`: its last open closed). False if the log could
    /// not be written (the caller then keeps the backing id open: a process taking over could
    /// otherwise use a closed one).
    pub(super) fn record(&self, ino: u64, mode: Option<OpenMode>) -> bool {
        use std::io::Write as _;
        let mut s = self.state.lock().unwrap();
        match mode {
            Some(m) => s.live.insert(ino, m),
            None => s.live.remove(&ino),
        };
        s.lines += 1;
        if s.lines > 4096 && s.lines > 4 * s.live.len() {
            match Self::write_state(&self.path, &s.live) {
                Ok(file) => {
                    s.file = file;
                    s.lines = s.live.len();
                    return true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot compact the open log"),
            }
        }
        match s.file.write_all(Self::line(ino, mode).as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record an open mode: a process taking over may fail opens of this file");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_replays_to_the_inodes_still_open_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/m.backing");
        let log = OpenLog::create(&path).unwrap();
        assert!(log.record(5, Some(OpenMode::Cached)));
        assert!(log.record(7, Some(OpenMode::Passthrough(3))));
        assert!(log.record(9, Some(OpenMode::Passthrough(4))));
        assert!(log.record(9, None));
        let open = OpenLog::read(&path);
        assert_eq!(
            open,
            HashMap::from([(5, OpenMode::Cached), (7, OpenMode::Passthrough(3))])
        );
        // A process taking over starts the log again from what it inherited.
        let log = OpenLog::rewrite(&path, open.clone()).unwrap();
        assert_eq!(OpenLog::read(&path), open);
        // Many opens and closes: the file is compacted, and still says the same.
        for i in 0..10_000u64 {
            log.record(100 + i, Some(OpenMode::Cached));
            log.record(100 + i, None);
        }
        assert_eq!(OpenLog::read(&path), open);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 4097 * 2, "{lines} lines after compaction");
        // Malformed lines are ignored.
        std::fs::write(&path, "+1 2\ngarbage\n=x\n-1\n=3\n").unwrap();
        assert_eq!(OpenLog::read(&path), HashMap::from([(3, OpenMode::Cached)]));
    }
}
