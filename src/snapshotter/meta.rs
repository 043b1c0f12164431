//! The snapshotter's durable metadata: every snapshot's name, parent, kind, labels, timestamps,
//! recorded usage and, for lazy snapshots, the image layer that backs it.
//!
//! One JSON file, `<root>/snapshotter/metadata.json`, rewritten atomically (temp file, fsync,
//! rename) after every change, so a crash leaves either the old or the new state. Each
//! snapshot owns the directory `<root>/snapshotter/snapshots/<id>/`, named by a number that is
//! never reused, so a name can be committed, removed and prepared again without two snapshots
//! ever sharing a directory. This module only keeps records; the rules of the snapshots API
//! (which parent may be used, what may be removed) live in `service`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::write_atomic;

use super::SnapshotterError;

/// The kind of a snapshot, as containerd names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// The image layer a lazy snapshot presents: the chain `chain_id` of `image`, served by a
/// stratafs FUSE mount at the snapshot's `fs` directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayer {
    /// The image's name in the stratafs store.
    pub image: String,
    pub chain_id: String,
    /// The layer blob's digest.
    pub digest: String,
}

/// Disk usage recorded when a snapshot was committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    /// The parent's name, or empty.
    #[serde(default)]
    pub parent: String,
    pub kind: Kind,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyLayer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// The metadata file and the snapshot directories under `<root>/snapshotter/`.
pub struct Meta {
    dir: PathBuf,
    state: State,
}

impl Meta {
    /// Opens (or creates) the metadata under `dir`.
    pub fn open(dir: &Path) -> Result<Meta, SnapshotterError> {
        let io = |e: std::io::Error| SnapshotterError::Io(dir.display().to_string(), e);
        std::fs::create_dir_all(dir.join("snapshots")).map_err(io)?;
        std::fs::create_dir_all(dir.join("tmp")).map_err(io)?;
        let path = dir.join("metadata.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| SnapshotterError::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(SnapshotterError::Io(path.display().to_string(), e)),
        };
        Ok(Meta {
            dir: dir.to_path_buf(),
            state,
        })
    }

    /// The directory of snapshot `id` (holding `fs` and, for active snapshots, `work`).
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join("snapshots").join(id.to_string())
    }

    /// `<root>/snapshotter/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub fn get(&self, name: &str) -> Option<&Snapshot> {
        self.state.snapshots.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Snapshot> {
        self.state.snapshots.values()
    }

    /// Whether any snapshot has `name` as its parent.
    pub fn has_children(&self, name: &str) -> bool {
        self.state.snapshots.values().any(|s| s.parent == name)
    }

    /// A fresh, never used directory id.
    pub fn next_id(&mut self) -> u64 {
        self.state.next_id += 1;
        self.state.next_id
    }

    /// Adds or replaces a record and saves.
    pub fn put(&mut self, snapshot: Snapshot) -> Result<(), SnapshotterError> {
        let previous = self
            .state
            .snapshots
            .insert(snapshot.name.clone(), snapshot.clone());
        self.save().inspect_err(|_| {
            // Keep memory equal to disk.
            match previous {
                Some(p) => self.state.snapshots.insert(p.name.clone(), p),
                None => self.state.snapshots.remove(&snapshot.name),
            };
        })
    }

    /// Removes a record and saves; returns it.
    pub fn remove(&mut self, name: &str) -> Result<Option<Snapshot>, SnapshotterError> {
        let Some(removed) = self.state.snapshots.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.state.snapshots.insert(name.to_string(), removed);
            return Err(e);
        }
        Ok(Some(removed))
    }

    /// Replaces the record `from` with `to` (a commit renames), in one save.
    pub fn rename(&mut self, from: &str, to: Snapshot) -> Result<(), SnapshotterError> {
        let old = self.state.snapshots.remove(from);
        self.state.snapshots.insert(to.name.clone(), to.clone());
        self.save().inspect_err(|_| {
            self.state.snapshots.remove(&to.name);
            if let Some(o) = old.clone() {
                self.state.snapshots.insert(from.to_string(), o);
            }
        })
    }

    fn save(&self) -> Result<(), SnapshotterError> {
        let bytes = serde_json::to_vec_pretty(&self.state).expect("metadata serialises");
        write_atomic(
            &self.dir.join("tmp"),
            &self.dir.join("metadata.json"),
            &bytes,
        )
        .map_err(|e| SnapshotterError::Corrupt(format!("saving snapshot metadata: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(meta: &mut Meta, name: &str, parent: &str, kind: Kind) -> Snapshot {
        Snapshot {
            id: meta.next_id(),
            name: name.into(),
            parent: parent.into(),
            kind,
            created: Utc::now(),
            updated: Utc::now(),
            labels: BTreeMap::new(),
            lazy: None,
            usage: None,
        }
    }

    #[test]
    fn records_survive_reopen_and_ids_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut meta = Meta::open(dir.path()).unwrap();
        let a = snap(&mut meta, "a", "", Kind::Committed);
        meta.put(a.clone()).unwrap();
        let b = snap(&mut meta, "b", "a", Kind::Active);
        meta.put(b.clone()).unwrap();
        assert!(meta.has_children("a"));
        assert!(!meta.has_children("b"));
        meta.remove("b").unwrap();
        let reopened = Meta::open(dir.path()).unwrap();
        assert_eq!(reopened.get("a"), Some(&a));
        assert_eq!(reopened.get("b"), None);
        let mut reopened = reopened;
        assert!(reopened.next_id() > b.id);
    }

    #[test]
    fn corrupt_metadata_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metadata.json"), b"{not json").unwrap();
        let err = Meta::open(dir.path()).err().expect("an error");
        assert!(err.to_string().contains("metadata.json"), "{err}");
    }
}
