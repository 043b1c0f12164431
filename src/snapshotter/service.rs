//! The snapshots service: the rules of containerd's snapshot API over [`Meta`], the mounts
//! handed to containerd, and lazy snapshots through [`Resolver`] and [`Mounter`].
//!
//! Errors follow containerd's own snapshotters: a missing key is NOT_FOUND, a taken name
//! ALREADY_EXISTS, committing a non-active snapshot or removing one with children
//! FAILED_PRECONDITION, a parent that is not committed or an update of a field other than
//! labels INVALID_ARGUMENT.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::Utc;

use crate::cache::ChunkStore;
use crate::fuse::MountState;
use crate::layer::IndexStore;

use super::ahead::Ahead;
use super::filter::Filter;
use super::meta::{Kind, LazyLayer, Meta, Snapshot, Usage};
use super::proto;
use super::resolve::{Resolver, LABEL_TARGET};
use super::{Mounter, MounterError, SnapshotterError};

type Result<T> = std::result::Result<T, SnapshotterError>;

/// The snapshotter: metadata, lazy-layer resolution and mounting.
pub struct Snapshotter {
    meta: Mutex<Meta>,
    pub(super) resolver: Resolver,
    mounter: Arc<dyn Mounter>,
    chunks: Arc<dyn ChunkStore>,
    indexes: IndexStore,
    /// One mount or removal at a time per lazy mountpoint (two requests may need the same
    /// mount; mounts of other layers go on meanwhile).
    mounting: MountLocks,
    /// Pass `index=off` to overlayfs, as containerd does where the kernel knows the option.
    index_off: bool,
    /// The exclusive lock on `<root>/snapshotter/lock`, held while this snapshotter lives: one
    /// snapshotter per store.
    _instance: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the store's snapshotter lock (`DIR/lock`, exclusive, not waiting) and writes this
/// process's pid into `DIR/pid`; refuses, naming the other's pid, when another snapshotter
/// holds it.
fn claim_instance(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::Write as _;
    let io = |p: &Path, e| SnapshotterError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let lock_path = dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io(&lock_path, e))?;
    let pid_path = dir.join("pid");
    match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
            let mut pid = std::fs::File::create(&pid_path).map_err(|e| io(&pid_path, e))?;
            writeln!(pid, "{}", std::process::id()).map_err(|e| io(&pid_path, e))?;
            Ok(locked)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let other = std::fs::read_to_string(&pid_path).unwrap_or_default();
            Err(SnapshotterError::FailedPrecondition(format!(
                "another stratafs snapshotter (pid {}) serves the store {}: stop it first, or give this one another --root",
                other.trim(),
                dir.parent().unwrap_or(dir).display()
            )))
        }
        Err((_, e)) => Err(io(&lock_path, e.into())),
    }
}

/// A lock per lazy mountpoint.
#[derive(Clone, Default)]
struct MountLocks(Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>);

impl MountLocks {
    fn of(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(dir.to_path_buf()).or_default().clone()
    }

    fn forget(&self, dir: &Path) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(dir);
    }
}

/// Makes sure the FUSE mount of lazy layer `layer` (snapshot `name`) at `dir` answers: one
/// mount at a time per mountpoint (`mounting`), a dead one detached and mounted again, a live
/// one left alone. First, before taking the lock (a removal meanwhile need not wait), it waits
/// for the image's indexes fetched `ahead`, which a new mount would otherwise request again.
async fn mount_lazy(
    mounting: &MountLocks,
    mounter: Arc<dyn Mounter>,
    ahead: Option<Arc<Ahead>>,
    dir: PathBuf,
    layer: LazyLayer,
    name: &str,
) -> Result<()> {
    // Before the lock: a removal of the snapshot meanwhile does not wait for the fetches.
    if let Some(ahead) = ahead {
        ahead.wait(&layer.image).await;
    }
    let lock = mounting.of(&dir);
    let _one = lock.lock().await;
    // The snapshot's directory, not the mountpoint (a dead mount there fails a stat).
    if !dir.parent().is_some_and(Path::is_dir) {
        // Removed meanwhile (the snapshot went before its mount came).
        return Err(SnapshotterError::NotFound(name.to_string()));
    }
    let (probe, prober) = (dir.clone(), mounter.clone());
    let state = tokio::task::spawn_blocking(move || prober.state(&probe))
        .await
        .unwrap_or(MountState::Dead);
    match state {
        MountState::Live => return Ok(()),
        MountState::Dead => {
            tracing::warn!(snapshot = %name, "lazy layer's daemon is gone: mounting it again");
            mounter.detach(&dir);
        }
        MountState::None => {}
    }
    let LazyLayer {
        image, chain_id, ..
    } = layer;
    tokio::task::spawn_blocking(move || mounter.mount(&image, &chain_id, &dir))
        .await
        .map_err(|e| {
            SnapshotterError::Mount(name.to_string(), MounterError::Failed(e.to_string()))
        })?
        .map_err(|e| SnapshotterError::Mount(name.to_string(), e))
}

/// A mount for containerd (containerd.types.Mount).
fn mount(kind: &str, source: &Path, options: Vec<String>) -> proto::Mount {
    proto::Mount {
        r#type: kind.into(),
        source: source.to_string_lossy().into_owned(),
        target: String::new(),
        options,
    }
}

impl Snapshotter {
    /// Opens the snapshotter state under `<store root>/snapshotter`.
    pub fn open(
        resolver: Resolver,
        mounter: Arc<dyn Mounter>,
        chunks: Arc<dyn ChunkStore>,
    ) -> Result<Snapshotter> {
        let root = resolver.store.root().to_path_buf();
        let instance = claim_instance(&crate::store::Layout::new(&root).snapshotter())?;
        Ok(Snapshotter {
            _instance: instance,
            meta: Mutex::new(Meta::open(&crate::store::Layout::new(&root).snapshotter())?),
            indexes: IndexStore::new(&root),
            resolver,
            mounter,
            chunks,
            mounting: MountLocks::default(),
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        })
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a restart: makes sure the lazy layers that ordinary snapshots stand on answer
    /// again (a daemon that died is replaced; live ones are left alone). Requests need not
    /// wait for this: each mounts what it needs.
    pub async fn recover(&self) {
        let needed: Vec<Snapshot> = {
            let meta = self.meta();
            meta.all()
                .filter(|s| {
                    s.lazy.is_some() && meta.all().any(|c| c.parent == s.name && c.lazy.is_none())
                })
                .cloned()
                .collect()
        };
        for s in needed {
            if let Err(e) = self.ensure_mounted(&s).await {
                tracing::warn!(snapshot = %s.name, error = %e, "cannot remount lazy layer");
            }
        }
    }

    /// Prepare (active) or View: a new snapshot on `parent`, or a lazy layer for `labels`.
    pub async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<proto::Mount>> {
        if key.is_empty() {
            return Err(SnapshotterError::InvalidArgument(
                "empty snapshot key".into(),
            ));
        }
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_TARGET) {
                if self.try_lazy(target, parent, &labels).await? {
                    return Err(SnapshotterError::AlreadyExists(target.clone()));
                }
            }
        }
        // Directories and the metadata's fsync: disk work, off the runtime's worker.
        let snapshot = crate::cache::blocking(|| {
            let mut meta = self.meta();
            if meta.get(key).is_some() {
                return Err(SnapshotterError::AlreadyExists(key.into()));
            }
            if !parent.is_empty() {
                match meta.get(parent) {
                    None => return Err(SnapshotterError::NotFound(format!("{parent} (parent)"))),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(SnapshotterError::InvalidArgument(format!(
                            "parent {parent} is not a committed snapshot"
                        )))
                    }
                    Some(_) => {}
                }
            }
            let id = meta.next_id();
            let dir = meta.snapshot_dir(id);
            let made = std::fs::create_dir_all(dir.join("fs")).and_then(|_| match kind {
                Kind::Active => std::fs::create_dir_all(dir.join("work")),
                _ => Ok(()),
            });
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SnapshotterError::Io(dir.display().to_string(), e));
            }
            let now = Utc::now();
            let snapshot = Snapshot {
                id,
                name: key.into(),
                parent: parent.into(),
                kind,
                created: now,
                updated: now,
                labels: labels.into_iter().collect(),
                lazy: None,
                usage: None,
            };
            if let Err(e) = meta.put(snapshot.clone()) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            Ok(snapshot)
        })?;
        self.mounts_of(&snapshot).await
    }

    /// Creates the committed lazy snapshot `target` on `parent` if stratafs can serve it;
    /// false sends the layer down the ordinary path.
    async fn try_lazy(
        &self,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        {
            let meta = self.meta();
            if let Some(existing) = meta.get(target) {
                // containerd finds it by listing; only a committed one with this parent fits.
                return Ok(existing.kind == Kind::Committed && existing.parent == parent);
            }
            let parent_lazy =
                parent.is_empty() || meta.get(parent).is_some_and(|p| p.lazy.is_some());
            if !parent_lazy {
                tracing::info!(%target, %parent, "parent layer was applied by containerd: this layer is too");
                crate::metrics::metrics().snapshotter_layer("containerd");
                return Ok(false);
            }
        }
        let (layer, top) = match self.resolver.resolve(target, labels).await {
            Ok(resolved) => resolved,
            Err(reason) => {
                tracing::info!(%target, %reason, "not lazy: containerd applies this layer");
                crate::metrics::metrics().snapshotter_layer("containerd");
                return Ok(false);
            }
        };
        // The directory and the metadata's fsync: disk work, off the runtime's worker.
        let dir = crate::cache::blocking(|| -> Result<Option<PathBuf>> {
            let mut meta = self.meta();
            if meta.get(target).is_some() {
                return Ok(None);
            }
            let id = meta.next_id();
            let dir = meta.snapshot_dir(id).join("fs");
            std::fs::create_dir_all(&dir)
                .map_err(|e| SnapshotterError::Io(dir.display().to_string(), e))?;
            let now = Utc::now();
            let mut labels: std::collections::BTreeMap<_, _> = labels.clone().into_iter().collect();
            labels.insert(LABEL_TARGET.into(), target.into());
            tracing::info!(%target, image = %layer.image, layer = %layer.digest, "lazy layer");
            crate::metrics::metrics().snapshotter_layer("lazy");
            meta.put(Snapshot {
                id,
                name: target.into(),
                parent: parent.into(),
                kind: Kind::Committed,
                created: now,
                updated: now,
                labels,
                lazy: Some(layer.clone()),
                usage: None,
            })?;
            Ok(Some(dir))
        })?;
        let Some(dir) = dir else {
            return Ok(true);
        };
        if top {
            // The image's whole rootfs: a container runs on it next. Mounting it now lets the
            // mount (and its startup profile's replay) overlap containerd's own work until the
            // container asks for its mounts, which then waits for this mount, not a second.
            let (mounting, mounter, ahead, name) = (
                self.mounting.clone(),
                self.mounter.clone(),
                self.resolver.ahead.clone(),
                target.to_string(),
            );
            tokio::spawn(async move {
                if let Err(e) = mount_lazy(&mounting, mounter, ahead, dir, layer, &name).await {
                    tracing::warn!(snapshot = %name, error = %e, "mounting an image's rootfs ahead of its container failed (the container's request tries again)");
                }
            });
        }
        Ok(true)
    }

    /// The mounts of an active or view snapshot; mounts lazy layers below it first.
    async fn mounts_of(&self, s: &Snapshot) -> Result<Vec<proto::Mount>> {
        let (dir, lowers, lazy) = {
            let meta = self.meta();
            let mut lowers = Vec::new();
            let mut lazy = None;
            let mut parent = s.parent.clone();
            while let Some(p) = meta.get(&parent) {
                lowers.push(meta.snapshot_dir(p.id).join("fs"));
                if p.lazy.is_some() {
                    // Its mount is the whole merged chain below.
                    lazy = Some(p.clone());
                    break;
                }
                parent = p.parent.clone();
            }
            (meta.snapshot_dir(s.id), lowers, lazy)
        };
        if let Some(l) = &lazy {
            self.ensure_mounted(l).await?;
        }
        let ro = s.kind == Kind::View;
        let fs = dir.join("fs");
        if lowers.is_empty() {
            let mode = if ro { "ro" } else { "rw" };
            return Ok(vec![mount("bind", &fs, vec![mode.into(), "rbind".into()])]);
        }
        if ro && lowers.len() == 1 {
            return Ok(vec![mount(
                "bind",
                &lowers[0],
                vec!["ro".into(), "rbind".into()],
            )]);
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if !ro {
            options.push(format!("workdir={}", dir.join("work").display()));
            options.push(format!("upperdir={}", fs.display()));
        }
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        options.push(format!("lowerdir={}", lowerdir.join(":")));
        Ok(vec![mount("overlay", Path::new("overlay"), options)])
    }

    /// Makes sure the FUSE mount of lazy snapshot `s` answers.
    async fn ensure_mounted(&self, s: &Snapshot) -> Result<()> {
        let Some(layer) = s.lazy.clone() else {
            return Ok(());
        };
        let dir = self.meta().snapshot_dir(s.id).join("fs");
        let ahead = self.resolver.ahead.clone();
        mount_lazy(
            &self.mounting,
            self.mounter.clone(),
            ahead,
            dir,
            layer,
            &s.name,
        )
        .await
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<proto::Mount>> {
        let s = self.get(key)?;
        if s.kind == Kind::Committed {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} is committed, not active or a view"
            )));
        }
        self.mounts_of(&s).await
    }

    fn get(&self, key: &str) -> Result<Snapshot> {
        self.meta()
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotterError::NotFound(key.into()))
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        self.get(key)
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let s = self.get(key)?;
        if s.kind != Kind::Active {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let fs = self.meta().snapshot_dir(s.id).join("fs");
        let usage =
            disk_usage(&fs).map_err(|e| SnapshotterError::Io(fs.display().to_string(), e))?;
        let mut meta = self.meta();
        if meta.get(name).is_some() {
            return Err(SnapshotterError::AlreadyExists(name.into()));
        }
        if meta.get(key) != Some(&s) {
            return Err(SnapshotterError::NotFound(key.into()));
        }
        let now = Utc::now();
        meta.rename(
            key,
            Snapshot {
                name: name.into(),
                kind: Kind::Committed,
                created: now,
                updated: now,
                labels: labels.into_iter().collect(),
                usage: Some(usage),
                ..s
            },
        )
    }

    pub async fn remove(&self, key: &str) -> Result<()> {
        // The metadata's fsync: disk work, off the runtime's worker.
        let removed = crate::cache::blocking(|| {
            let mut meta = self.meta();
            if meta.get(key).is_none() {
                return Err(SnapshotterError::NotFound(key.into()));
            }
            if meta.has_children(key) {
                return Err(SnapshotterError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            let removed = meta.remove(key)?.expect("checked above");
            Ok((removed.clone(), meta.snapshot_dir(removed.id)))
        })?;
        self.remove_dir(&removed.1).await;
        Ok(())
    }

    /// Removes a snapshot directory, unmounting a lazy layer first; a directory that stays
    /// mounted is left for `Cleanup`.
    async fn remove_dir(&self, dir: &Path) {
        let fs = dir.join("fs");
        // Not while a mount of it is starting (a rootfs is mounted in the background).
        let lock = self.mounting.of(&fs);
        let _one = lock.lock().await;
        let (probe, mounter) = (fs.clone(), self.mounter.clone());
        let state = tokio::task::spawn_blocking(move || mounter.state(&probe))
            .await
            .unwrap_or(MountState::Live);
        if state != MountState::None {
            let mounter = self.mounter.clone();
            let target = fs.clone();
            let result = tokio::task::spawn_blocking(move || mounter.unmount(&target)).await;
            if !matches!(result, Ok(Ok(()))) {
                self.mounter.detach(&fs);
            }
        }
        let (dir, mounter) = (dir.to_path_buf(), self.mounter.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if mounter.state(&dir.join("fs")) == MountState::None {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove snapshot directory");
                }
            }
        })
        .await;
        self.mounting.forget(&fs);
    }

    /// Update: only labels may change — all of them (empty mask or `labels`) or the keys named
    /// `labels.KEY` (set, or removed when absent from `info`).
    pub fn update(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let mut meta = self.meta();
        let mut s = meta
            .get(name)
            .cloned()
            .ok_or_else(|| SnapshotterError::NotFound(name.into()))?;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            s.labels = labels.into_iter().collect();
        } else {
            for p in paths {
                let Some(key) = p.strip_prefix("labels.") else {
                    return Err(SnapshotterError::InvalidArgument(format!(
                        "cannot update {p:?} field on snapshot {name}"
                    )));
                };
                match labels.get(key) {
                    Some(v) => s.labels.insert(key.into(), v.clone()),
                    None => s.labels.remove(key),
                };
            }
        }
        s.updated = Utc::now();
        meta.put(s.clone())?;
        Ok(s)
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>> {
        let filter = Filter::parse(filters)?;
        Ok(self
            .meta()
            .all()
            .filter(|s| filter.matches(s))
            .cloned()
            .collect())
    }

    /// Disk usage: measured for active snapshots, recorded at commit for committed ones, and
    /// for lazy layers the bytes cached locally and the layer's entry count.
    pub async fn usage(&self, key: &str) -> Result<Usage> {
        let s = self.get(key)?;
        if let Some(layer) = &s.lazy {
            let digest = crate::digest::parse(&layer.digest)
                .map_err(|e| SnapshotterError::Corrupt(e.to_string()))?;
            let index = self.indexes.get_any(&digest).ok().flatten();
            return Ok(match index {
                Some(i) => Usage {
                    size: i
                        .spans
                        .iter()
                        .filter(|sp| self.chunks.contains(&sp.digest))
                        .map(|sp| sp.out_len as i64)
                        .sum(),
                    inodes: i.entries.len() as i64,
                },
                None => Usage::default(),
            });
        }
        match (s.kind, s.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            _ => {
                let fs = self.meta().snapshot_dir(s.id).join("fs");
                tokio::task::spawn_blocking(move || disk_usage(&fs))
                    .await
                    .map_err(|e| SnapshotterError::Corrupt(e.to_string()))?
                    .map_err(|e| SnapshotterError::Io(key.into(), e))
            }
        }
    }

    /// Removes directories (and unmounts lazy mounts) that no snapshot owns.
    pub async fn cleanup(&self) -> Result<()> {
        let (root, owned) = {
            let meta = self.meta();
            let owned: std::collections::HashSet<String> =
                meta.all().map(|s| s.id.to_string()).collect();
            (meta.snapshots_dir(), owned)
        };
        let entries = std::fs::read_dir(&root)
            .map_err(|e| SnapshotterError::Io(root.display().to_string(), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owned.contains(&name) {
                tracing::info!(dir = %entry.path().display(), "cleanup: removing unreferenced snapshot directory");
                self.remove_dir(&entry.path()).await;
            }
        }
        Ok(())
    }
}

/// Bytes in use (st_blocks × 512, each inode once) and the inode count under `dir`.
fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    let root_dev = std::fs::symlink_metadata(dir)?.dev();
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if md.dev() != root_dev || !seen.insert(md.ino()) {
            continue;
        }
        usage.inodes += 1;
        usage.size += md.blocks() as i64 * 512;
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(usage)
}
