//! The entry model every layer format maps into: what an entry is ([`Kind`]), its metadata
//! and where its bytes start ([`Entry`]), and the path rules all formats share — paths cleaned
//! the way containerd cleans them ([`clean_path`]) and whiteouts and opaque markers recognised
//! by name ([`whiteout`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum Kind {
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// A hard link to `target` (a path in this layer or below).
    Hardlink {
        target: String,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `.wh.NAME`: hides `path` from lower layers.
    Whiteout,
    /// `.wh..wh..opq`: `path` (a directory) hides its lower contents.
    Opaque,
}

/// One entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Cleaned path without leading `/` ("" is the root directory).
    pub path: String,
    #[serde(flatten)]
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    /// Nanoseconds of the modification time (from a PAX `mtime` record).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime_nsec: u32,
    /// Offset of the file's data in the uncompressed tar stream.
    pub offset: u64,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "xattr_map"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Whether a file named `name` (its last path component) is a shared object (`libc.so.6`,
/// `_umath.cpython-311-x86_64-linux-gnu.so`): loaded only when something names it (a
/// library's `DT_NEEDED`, `dlopen`, an import), never because it lies next to a file read.
pub fn is_shared_object(name: &str) -> bool {
    name.ends_with(".so") || name.contains(".so.")
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Cleans a tar path: drops `/`, `.` and empty components, and resolves `..` without ever
/// leaving the root. Fails on NUL bytes.
pub fn clean_path(raw: &str) -> Result<String, String> {
    if raw.contains('\0') {
        return Err(format!("entry name {raw:?} contains a NUL byte"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// For a whiteout (`.wh.NAME`) or opaque marker (`.wh..wh..opq`) at cleaned `path`: the path
/// it applies to and its kind; `None` for other entries. A whiteout of the root is an error.
pub(crate) fn whiteout(path: &str) -> Result<Option<(String, Kind)>, String> {
    let name = path.rsplit('/').next().unwrap_or("");
    let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
    if name == OPAQUE {
        return Ok(Some((parent.to_string(), Kind::Opaque)));
    }
    let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) else {
        return Ok(None);
    };
    let hidden_path = match (parent, hidden) {
        ("", "") => return Err(format!("whiteout {path:?} names the root")),
        ("", hidden) => hidden.to_string(),
        (parent, hidden) => format!("{parent}/{hidden}"),
    };
    Ok(Some((hidden_path, Kind::Whiteout)))
}

mod xattr_map {
    //! xattr values are bytes: serialised as base64.
    use std::collections::BTreeMap;

    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let e = base64::engine::general_purpose::STANDARD;
        m.iter()
            .map(|(k, v)| (k.clone(), e.encode(v)))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let e = base64::engine::general_purpose::STANDARD;
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                e.decode(v)
                    .map(|v| (k, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}
