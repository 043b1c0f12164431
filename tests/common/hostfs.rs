//! Image layers made of this machine's own programs (dash, coreutils, …) and the shared
//! libraries they load, laid out exactly as here (usr-merge symlinks included), so tests can
//! run real programs from a mounted image or in a container.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::image::{Compression, Entry, EntryKind, Layer, LayerBuilder};

/// A root filesystem holding `programs` (each the first existing path of its candidates), their
/// libraries, and `/bin/sh` → dash (the first program must be dash). Returns the layer and the
/// number of entries directly in `usr/bin`.
pub fn host_rootfs(programs: &[&[&str]]) -> (BTreeMap<String, EntryKind>, BTreeMap<String, u32>) {
    let programs: Vec<PathBuf> = programs.iter().map(|c| host_program(c)).collect();
    let mut entries = BTreeMap::new();
    let mut modes = BTreeMap::new();
    for p in &programs {
        add_host_path(&mut entries, &mut modes, p, 0);
        for lib in libraries(p) {
            add_host_path(&mut entries, &mut modes, &lib, 0);
        }
    }
    // /bin/sh -> dash, next to dash wherever it resolved to.
    let dash_dir = programs[0]
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .strip_prefix("/")
        .unwrap()
        .to_string_lossy()
        .into_owned();
    entries.insert(format!("{dash_dir}/sh"), EntryKind::Symlink("dash".into()));
    if !entries.contains_key("bin") {
        entries.insert("bin".into(), EntryKind::Symlink(dash_dir.clone()));
    }
    (entries, modes)
}

/// A layer of `entries` with `modes` (directories and files default to 0755).
pub fn layer_of(
    entries: &BTreeMap<String, EntryKind>,
    modes: &BTreeMap<String, u32>,
) -> LayerBuilder {
    let mut layer = LayerBuilder::new();
    for (path, kind) in entries {
        let mode = match kind {
            EntryKind::Symlink(_) => 0o777,
            _ => modes.get(path).copied().unwrap_or(0o755),
        };
        layer = layer.entry(Entry::new(path, kind.clone(), mode));
    }
    layer
}

/// The image architecture name of this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Adds `path` (absolute, on this machine) to `entries` the way it resolves here: every symlink
/// on the way becomes the same symlink in the image, every directory a directory, and the file
/// at the end its bytes and mode.
pub fn add_host_path(
    entries: &mut BTreeMap<String, EntryKind>,
    modes: &mut BTreeMap<String, u32>,
    path: &Path,
    depth: usize,
) {
    assert!(depth < 40, "symlink loop at {}", path.display());
    let mut cur = PathBuf::from("/");
    let comps: Vec<_> = path
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    for (i, comp) in comps.iter().enumerate() {
        let next = cur.join(comp);
        let rel = next
            .strip_prefix("/")
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let meta =
            std::fs::symlink_metadata(&next).unwrap_or_else(|e| panic!("{}: {e}", next.display()));
        modes.insert(rel.clone(), meta.mode() & 0o7777);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&next).unwrap();
            entries.insert(
                rel,
                EntryKind::Symlink(target.to_string_lossy().into_owned()),
            );
            let mut resolved = if target.is_absolute() {
                PathBuf::from("/")
            } else {
                cur.clone()
            };
            for c in target.components() {
                match c {
                    std::path::Component::ParentDir => {
                        resolved.pop();
                    }
                    std::path::Component::Normal(n) => resolved.push(n),
                    _ => {}
                }
            }
            for c in &comps[i + 1..] {
                resolved.push(c);
            }
            return add_host_path(entries, modes, &resolved, depth + 1);
        } else if meta.is_dir() {
            entries.insert(rel, EntryKind::Dir);
            cur = next;
        } else {
            assert_eq!(i, comps.len() - 1, "{} is not a directory", next.display());
            entries.insert(rel, EntryKind::File(std::fs::read(&next).unwrap()));
            return;
        }
    }
}

/// The first of `candidates` that exists.
pub fn host_program(candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("none of {candidates:?} on this machine"))
}

/// The shared libraries and loader `ldd` lists for `program`.
pub fn libraries(program: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(program).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}: {out:?}", program.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// A host-program root filesystem (dash, cat, ls, wc, sha256sum, sleep) with `filler` bytes of
/// incompressible-ish data in /opt/filler1 and /etc/base-release.
pub fn base_layer(filler: usize, compression: Compression) -> Layer {
    let (mut entries, mut modes) = host_rootfs(&[
        &["/bin/dash", "/usr/bin/dash"],
        &["/usr/bin/cat", "/bin/cat"],
        &["/usr/bin/ls", "/bin/ls"],
        &["/usr/bin/wc", "/bin/wc"],
        &["/usr/bin/sha256sum", "/bin/sha256sum"],
        &["/usr/bin/sleep", "/bin/sleep"],
    ]);
    for dir in ["etc", "opt", "tmp"] {
        entries.insert(dir.into(), EntryKind::Dir);
        modes.insert(dir.into(), if dir == "tmp" { 0o1777 } else { 0o755 });
    }
    entries.insert(
        "opt/filler1".into(),
        EntryKind::File(super::bytes(11, filler)),
    );
    entries.insert(
        "etc/base-release".into(),
        EntryKind::File(b"stratafs test base\n".to_vec()),
    );
    modes.insert("opt/filler1".into(), 0o644);
    modes.insert("etc/base-release".into(), 0o644);
    layer_of(&entries, &modes).build(compression)
}

/// Two gzip layers for a host of this architecture: [`base_layer`] with `filler` bytes, then
/// /etc/msg holding `msg`, /opt/filler2 (`filler` bytes) and /opt/small (20,000 bytes of
/// `bytes(13, …)`).
pub fn two_layer_image(filler: usize, msg: &[u8]) -> super::Image {
    let upper = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/msg", msg, 0o644)
        .dir("opt", 0o755)
        .file("opt/filler2", &super::bytes(12, filler), 0o644)
        .file("opt/small", &super::bytes(13, 20_000), 0o644)
        .build(Compression::Gzip);
    super::ImageBuilder::new()
        .arch(host_arch())
        .layer(base_layer(filler, Compression::Gzip))
        .layer(upper)
        .build(super::ManifestFlavour::Oci)
}
