//! Deterministic, pure-Rust construction of image layers, configs,
//! manifests and indexes (OCI and Docker schema 2 flavours).
//!
//! Everything here is byte-for-byte reproducible: tar headers carry
//! uid/gid/mtime 0 unless set explicitly, the gzip header has mtime 0 and
//! JSON is emitted with sorted keys, so two builds of the same description
//! yield the same digests.

use super::sha256_digest;
use serde_json::{json, Value};
use std::io::Write;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer blob compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (deterministic header, mtime 0).
    Gzip,
    /// zstd (level 3).
    Zstd,
}

/// OCI layer media type for a compression.
pub fn oci_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Docker layer media type for a compression (`Gzip` is the standard
/// `application/vnd.docker.image.rootfs.diff.tar.gzip`; the other two are
/// the non-standard names some tools use).
pub fn docker_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
        Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        Compression::Zstd => "application/vnd.docker.image.rootfs.diff.tar.zstd",
    }
}

/// What kind of tar entry an [`Entry`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file with its content.
    File(Vec<u8>),
    /// Directory.
    Dir,
    /// Symbolic link to the given target.
    Symlink(String),
    /// Hard link to the given (archive) path.
    Hardlink(String),
}

/// One tar entry with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive (no leading `/`).
    pub path: String,
    /// Entry kind and payload.
    pub kind: EntryKind,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

impl Entry {
    /// Entry owned by root with mtime 0.
    pub fn new(path: &str, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    /// Same entry with another owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Same entry with another mtime.
    pub fn mtime(mut self, mtime: u64) -> Entry {
        self.mtime = mtime;
        self
    }
}

/// Builder for a layer's list of entries, written to tar in insertion order.
#[derive(Clone, Debug, Default)]
pub struct LayerBuilder {
    entries: Vec<Entry>,
}

impl LayerBuilder {
    /// Empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder::default()
    }

    /// Add a regular file.
    pub fn file(self, path: &str, content: &[u8], mode: u32) -> LayerBuilder {
        self.entry(Entry::new(path, EntryKind::File(content.to_vec()), mode))
    }

    /// Add a directory.
    pub fn dir(self, path: &str, mode: u32) -> LayerBuilder {
        self.entry(Entry::new(path, EntryKind::Dir, mode))
    }

    /// Add a symlink `path -> target`.
    pub fn symlink(self, path: &str, target: &str) -> LayerBuilder {
        self.entry(Entry::new(
            path,
            EntryKind::Symlink(target.to_string()),
            0o777,
        ))
    }

    /// Add a hard link `path` to the earlier archive entry `target`.
    pub fn hardlink(self, path: &str, target: &str) -> LayerBuilder {
        let target = target.trim_start_matches('/').to_string();
        self.entry(Entry::new(path, EntryKind::Hardlink(target), 0o644))
    }

    /// Add an OCI whiteout deleting `path` from lower layers
    /// (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> LayerBuilder {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let wh = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        self.file(&wh, b"", 0o644)
    }

    /// Add an opaque-directory marker for `dir` (`dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> LayerBuilder {
        let dir = dir.trim_start_matches('/').trim_end_matches('/');
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// Add an arbitrary entry.
    pub fn entry(mut self, entry: Entry) -> LayerBuilder {
        self.entries.push(entry);
        self
    }

    /// The entries added so far.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The uncompressed tar archive.
    pub fn tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for e in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.mode);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            h.set_mtime(e.mtime);
            let res = match &e.kind {
                EntryKind::File(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    builder.append_data(&mut h, &e.path, data.as_slice())
                }
                EntryKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    let p = format!("{}/", e.path.trim_end_matches('/'));
                    builder.append_data(&mut h, p, std::io::empty())
                }
                EntryKind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    builder.append_link(&mut h, &e.path, target)
                }
                EntryKind::Hardlink(target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    builder.append_link(&mut h, &e.path, target)
                }
            };
            res.unwrap_or_else(|err| panic!("tar entry {}: {err}", e.path));
        }
        builder.into_inner().expect("finish tar")
    }

    /// Build the layer blob with the given compression.
    pub fn build(&self, compression: Compression) -> Layer {
        Layer::from_tar(self.tar(), compression)
    }
}

/// A layer blob plus its identifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Compressed (or plain) blob as stored in the registry.
    pub blob: Vec<u8>,
    /// `sha256:` digest of `blob`.
    pub digest: String,
    /// `sha256:` digest of the uncompressed tar.
    pub diff_id: String,
    /// Media type used in manifests (OCI by default).
    pub media_type: String,
    /// Compression of `blob`.
    pub compression: Compression,
}

/// Compress `data` deterministically.
pub fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::default());
            enc.write_all(data).expect("gzip write");
            enc.finish().expect("gzip finish")
        }
        Compression::Zstd => zstd::stream::encode_all(data, 3).expect("zstd"),
    }
}

impl Layer {
    /// Layer from an already built uncompressed tar.
    pub fn from_tar(tar: Vec<u8>, compression: Compression) -> Layer {
        let diff_id = sha256_digest(&tar);
        let blob = compress(&tar, compression);
        Layer {
            digest: sha256_digest(&blob),
            diff_id,
            blob,
            media_type: oci_media_type(compression).to_string(),
            compression,
        }
    }

    /// Same layer, labelled with the Docker media type.
    pub fn docker(mut self) -> Layer {
        self.media_type = docker_media_type(self.compression).to_string();
        self
    }

    /// Blob size in bytes.
    pub fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    /// Manifest descriptor JSON for this layer.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size()})
    }
}

/// Manifest format family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestFlavour {
    /// OCI image manifest / OCI image index.
    Oci,
    /// Docker schema 2 manifest / manifest list.
    Docker,
}

/// Target platform of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// GOARCH-style architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// GOOS-style OS (`linux`).
    pub os: String,
    /// Optional CPU variant (`v7`, `v8`).
    pub variant: Option<String>,
}

impl Platform {
    /// Platform without variant.
    pub fn new(os: &str, architecture: &str) -> Platform {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: None,
        }
    }

    /// JSON object `{architecture, os, variant?}`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"architecture": self.architecture, "os": self.os});
        if let Some(var) = &self.variant {
            v["variant"] = json!(var);
        }
        v
    }
}

/// Builder for a single-platform image.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    platform: Platform,
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    layers: Vec<Layer>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder {
            platform: Platform::new("linux", "amd64"),
            env: Vec::new(),
            cmd: None,
            entrypoint: None,
            working_dir: None,
            layers: Vec::new(),
        }
    }
}

impl ImageBuilder {
    /// linux/amd64 image without layers.
    pub fn new() -> ImageBuilder {
        ImageBuilder::default()
    }

    /// Set the architecture.
    pub fn arch(mut self, arch: &str) -> ImageBuilder {
        self.platform.architecture = arch.to_string();
        self
    }

    /// Set the OS.
    pub fn os(mut self, os: &str) -> ImageBuilder {
        self.platform.os = os.to_string();
        self
    }

    /// Set the CPU variant.
    pub fn variant(mut self, variant: &str) -> ImageBuilder {
        self.platform.variant = Some(variant.to_string());
        self
    }

    /// Append an `Env` entry (`KEY=value`).
    pub fn env(mut self, kv: &str) -> ImageBuilder {
        self.env.push(kv.to_string());
        self
    }

    /// Set `Cmd`.
    pub fn cmd(mut self, cmd: &[&str]) -> ImageBuilder {
        self.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Set `Entrypoint`.
    pub fn entrypoint(mut self, ep: &[&str]) -> ImageBuilder {
        self.entrypoint = Some(ep.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Set `WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> ImageBuilder {
        self.working_dir = Some(dir.to_string());
        self
    }

    /// Append a layer (bottom first).
    pub fn layer(mut self, layer: Layer) -> ImageBuilder {
        self.layers.push(layer);
        self
    }

    /// The config JSON (identical for both flavours).
    pub fn config_json(&self) -> Value {
        let mut cfg = json!({});
        if !self.env.is_empty() {
            cfg["Env"] = json!(self.env);
        }
        if let Some(cmd) = &self.cmd {
            cfg["Cmd"] = json!(cmd);
        }
        if let Some(ep) = &self.entrypoint {
            cfg["Entrypoint"] = json!(ep);
        }
        if let Some(wd) = &self.working_dir {
            cfg["WorkingDir"] = json!(wd);
        }
        let diff_ids: Vec<&str> = self.layers.iter().map(|l| l.diff_id.as_str()).collect();
        let mut v = self.platform.to_json();
        v["config"] = cfg;
        v["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
        v
    }

    /// Serialize config and manifest in the given flavour. For `Docker`,
    /// layers are relabelled with Docker media types.
    pub fn build(&self, flavour: ManifestFlavour) -> Image {
        let config = serde_json::to_vec(&self.config_json()).expect("config json");
        let config_digest = sha256_digest(&config);
        let (manifest_media_type, config_media_type) = match flavour {
            ManifestFlavour::Oci => (OCI_MANIFEST, OCI_CONFIG),
            ManifestFlavour::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
        };
        let layers: Vec<Layer> = match flavour {
            ManifestFlavour::Oci => self.layers.clone(),
            ManifestFlavour::Docker => self.layers.iter().cloned().map(Layer::docker).collect(),
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": {
                "mediaType": config_media_type,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers.iter().map(Layer::descriptor).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).expect("manifest json");
        Image {
            platform: self.platform.clone(),
            flavour,
            layers,
            manifest_digest: sha256_digest(&manifest),
            manifest_media_type: manifest_media_type.to_string(),
            manifest,
            config_digest,
            config_media_type: config_media_type.to_string(),
            config,
        }
    }
}

/// A built single-platform image: blobs plus manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Platform recorded in the config (and in index entries).
    pub platform: Platform,
    /// Manifest flavour.
    pub flavour: ManifestFlavour,
    /// Layers, bottom first, labelled for this flavour.
    pub layers: Vec<Layer>,
    /// Config JSON bytes.
    pub config: Vec<u8>,
    /// `sha256:` digest of `config`.
    pub config_digest: String,
    /// Config media type.
    pub config_media_type: String,
    /// Manifest JSON bytes.
    pub manifest: Vec<u8>,
    /// `sha256:` digest of `manifest`.
    pub manifest_digest: String,
    /// Manifest media type.
    pub manifest_media_type: String,
}

impl Image {
    /// Manifest size in bytes.
    pub fn manifest_size(&self) -> u64 {
        self.manifest.len() as u64
    }

    /// Config size in bytes.
    pub fn config_size(&self) -> u64 {
        self.config.len() as u64
    }

    /// Index/manifest-list entry for this image, with platform.
    pub fn index_descriptor(&self) -> Value {
        json!({
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": self.manifest_size(),
            "platform": self.platform.to_json(),
        })
    }
}

/// Builder for an OCI image index or Docker manifest list.
#[derive(Clone, Debug)]
pub struct IndexBuilder {
    flavour: ManifestFlavour,
    images: Vec<Image>,
}

impl IndexBuilder {
    /// Empty index of the given flavour.
    pub fn new(flavour: ManifestFlavour) -> IndexBuilder {
        IndexBuilder {
            flavour,
            images: Vec::new(),
        }
    }

    /// Add a platform image.
    pub fn image(mut self, image: Image) -> IndexBuilder {
        self.images.push(image);
        self
    }

    /// Serialize the index.
    pub fn build(&self) -> Index {
        let media_type = match self.flavour {
            ManifestFlavour::Oci => OCI_INDEX,
            ManifestFlavour::Docker => DOCKER_MANIFEST_LIST,
        };
        let doc = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": self.images.iter().map(Image::index_descriptor).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&doc).expect("index json");
        Index {
            digest: sha256_digest(&bytes),
            bytes,
            media_type: media_type.to_string(),
            images: self.images.clone(),
        }
    }
}

/// A built multi-platform index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    /// Index JSON bytes.
    pub bytes: Vec<u8>,
    /// `sha256:` digest of `bytes`.
    pub digest: String,
    /// Index media type.
    pub media_type: String,
    /// The referenced platform images, in index order.
    pub images: Vec<Image>,
}

impl Index {
    /// Index size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A one-layer gzip OCI image of these directories (0755) and files (0644), in this order.
pub fn gzip_image_of(dirs: &[String], files: &[(String, Vec<u8>)]) -> Image {
    let mut layer = LayerBuilder::new();
    for d in dirs {
        layer = layer.dir(d, 0o755);
    }
    for (path, content) in files {
        layer = layer.file(path, content, 0o644);
    }
    ImageBuilder::new()
        .layer(layer.build(Compression::Gzip))
        .build(ManifestFlavour::Oci)
}

/// Deterministic test file contents: half pseudo-random (xorshift) and half text, so gzip
/// shrinks them moderately, like real files.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 2 == 0 {
                x as u8
            } else {
                b"stratafs test bytes "[i % 20]
            }
        })
        .collect()
}
