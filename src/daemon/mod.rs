//! The lifecycle of mount daemons, shared by `stratafs mount`, `umount`, `cache stats` and the
//! snapshotter: the record each serving process keeps under `<root>/run/mounts/`, finding the
//! process that serves a mountpoint, and ([`holder`]) the process that keeps a mount's FUSE
//! connection open while the serving process dies, restarts or is upgraded. [`serve`] is the
//! serving process; [`control`] is the other side — starting a daemon and reading its report,
//! unmounting, upgrading — for `stratafs mount`, `umount` and `upgrade`.
//!
//! Files per mountpoint (name: the mountpoint with every byte other than letters, digits, `.`
//! and `_` written `-XX`, so distinct paths never share one):
//! - `<root>/run/mounts/NAME.json`: the [`MountRecord`], rewritten whole by each serving process;
//! - `<root>/run/mounts/NAME.backing`: the passthrough backing ids in use
//!   ([`crate::fuse::BackingLog`]), for the next serving process.

pub mod control;
pub mod holder;
pub mod serve;

use std::path::{Path, PathBuf};

use crate::store::Layout;

/// What a serving process records about itself, for `umount`, `cache stats`, the snapshotter,
/// humans, and the process that takes over after it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub image: String,
    pub chain_id: String,
    /// The process serving the mount now.
    pub pid: u32,
    pub layers: Vec<String>,
    /// Where the daemon serves Prometheus metrics, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// The process holding the FUSE connection (it restarts the serving one), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u32>,
    /// Whether the kernel accepted FUSE passthrough at the mount's INIT.
    #[serde(default)]
    pub passthrough: bool,
    /// [`crate::tree::Tree::fingerprint`] of the tree served: a process taking over must serve
    /// the same one. Empty while layers without an index still stream (no inode but the
    /// root's has been handed out: any tree will do).
    #[serde(default)]
    pub tree: String,
    /// The image record served and how many of its layers (a process taking over serves
    /// these, whatever the name means by then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<(crate::image::ImageRecord, usize)>,
}

/// A record that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot record the mount at {path}: {source}")]
pub struct RecordError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Where the record of the mount at `mountpoint` lives.
pub fn record_path(root: &Path, mountpoint: &Path) -> PathBuf {
    Layout::new(root)
        .mounts()
        .join(format!("{}.json", escape(mountpoint)))
}

/// Where the passthrough backing log of the mount at `mountpoint` lives.
pub fn backing_log_path(root: &Path, mountpoint: &Path) -> PathBuf {
    Layout::new(root)
        .mounts()
        .join(format!("{}.backing", escape(mountpoint)))
}

/// Writes a mount record whole or not at all (the store's atomic write through `<root>/tmp`).
pub fn write_record(root: &Path, record: &MountRecord) -> Result<(), RecordError> {
    let path = record_path(root, &record.mountpoint);
    let fail = |source| RecordError {
        path: path.clone(),
        source,
    };
    let tmp = Layout::new(root).tmp();
    std::fs::create_dir_all(path.parent().expect("record dir")).map_err(fail)?;
    std::fs::create_dir_all(&tmp).map_err(fail)?;
    let data = serde_json::to_vec_pretty(record).map_err(|e| fail(e.into()))?;
    crate::store::write_atomic(&tmp, &path, &data).map_err(|e| fail(std::io::Error::other(e)))?;
    Ok(())
}

/// The record of the mount at `mountpoint`, whether or not its process is alive.
pub fn read_record(root: &Path, mountpoint: &Path) -> Option<MountRecord> {
    let data = std::fs::read(record_path(root, mountpoint)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Removes the files of the mount at `mountpoint` (after it ended).
pub fn remove_record(root: &Path, mountpoint: &Path) {
    let _ = std::fs::remove_file(record_path(root, mountpoint));
    let _ = std::fs::remove_file(backing_log_path(root, mountpoint));
}

/// Mounts recorded under `<root>/run/mounts/` whose serving process is alive, or whose holder
/// is (starting the next serving process).
pub fn mounts(root: &Path) -> Vec<MountRecord> {
    let Ok(dir) = std::fs::read_dir(Layout::new(root).mounts()) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<MountRecord>(&b).ok())
        .filter(|r| alive(r.pid) || r.holder.is_some_and(alive))
        .collect()
}

/// Why `stratafs rmi` removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{image} is mounted at {} (serving pid {pid}): unmount it first (stratafs umount {0})", .mountpoint.display())]
    Mounted {
        image: String,
        mountpoint: PathBuf,
        pid: u32,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Removes the images `references` name (names or unique digest prefixes), and the metadata
/// no other image uses, calling `removed` with each name once it is gone. Every reference is
/// checked first: an unknown one, or an image a mount of the store serves, removes nothing.
pub fn remove_images(
    store: &crate::store::Store,
    references: &[String],
    mut removed: impl FnMut(&str),
) -> Result<(), RemoveError> {
    let mounts = mounts(store.root());
    let mut names = Vec::new();
    for reference in references {
        let name = store.find_image(reference)?.name;
        if let Some(m) = mounts.iter().find(|m| m.image == name) {
            return Err(RemoveError::Mounted {
                image: name,
                mountpoint: m.mountpoint.clone(),
                pid: m.pid,
            });
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in &names {
        store.remove_image(name)?;
        removed(name);
    }
    Ok(())
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `pid` is a live `stratafs mount --foreground … MOUNTPOINT` process (a holder or a
/// serving process of that mount), from its command line.
pub fn is_mount_process(pid: u32, mountpoint: &Path) -> bool {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter().any(|a| *a == b"--foreground")
        && args.iter().any(|a| *a == b"mount")
        && args.iter().rev().find(|a| !a.is_empty()) == Some(&want)
        && alive(pid)
}

/// The live holder of the mount at `mountpoint`, from its record.
pub fn live_holder(root: &Path, mountpoint: &Path) -> Option<u32> {
    read_record(root, mountpoint)
        .and_then(|r| r.holder)
        .filter(|&h| is_mount_process(h, mountpoint))
}

/// The state of `mountpoint`: live while its holder lives, even while no process serves it
/// (probing the mount then would wait for the next one); else as probed.
pub fn mount_state(root: &Path, mountpoint: &Path) -> crate::fuse::MountState {
    match live_holder(root, mountpoint) {
        Some(_) => crate::fuse::MountState::Live,
        None => crate::fuse::mount_state(mountpoint),
    }
}

/// The pid of a `stratafs mount --foreground` process for `mountpoint` (the holder, when there
/// is one: the holder of the record, else the lowest pid), from the processes' command lines.
pub fn find_daemon(root: &Path, mountpoint: &Path) -> Option<u32> {
    if let Some(holder) = live_holder(root, mountpoint) {
        return Some(holder);
    }
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && is_mount_process(pid, mountpoint))
        .min()
}

/// A mountpoint as a file name: `/mnt/py` → `mnt-2fpy`.
pub fn escape(mountpoint: &Path) -> String {
    // Letters, digits, `.` and `_` stay; every other byte becomes `-XX` (hex), `-` included,
    // so distinct paths (`/mnt/a-b`, `/mnt/a/b`, `/mnt/a b`) never share a name.
    use std::os::unix::ffi::OsStrExt;
    let bytes = mountpoint.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    if trimmed.is_empty() {
        return "root".into();
    }
    let mut s = String::with_capacity(trimmed.len());
    for &b in trimmed {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' {
            s.push(b as char);
        } else {
            s.push_str(&format!("-{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_unambiguous() {
        let names: Vec<String> = ["/mnt/a-b", "/mnt/a/b", "/mnt/a b", "/mnt/a_b", "/"]
            .iter()
            .map(|p| escape(Path::new(p)))
            .collect();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(escape(Path::new("/mnt/a-b")), "mnt-2fa-2db");
    }
}
