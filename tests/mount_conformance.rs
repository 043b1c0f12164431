//! Conformance of the FUSE mount: an image built to be tricky is mounted with
//! `stratafs mount -o suid,dev` and every path of the mount (type, mode with setuid/setgid/
//! sticky, uid, gid, size, mtime, nlink, symlink target, device numbers, xattrs, content hash,
//! hard-link groups) is compared with a reference unpack of the same image bytes by an
//! independent tool, `umoci unpack`, from an OCI layout written here. One test per layer
//! format: gzip, plain tar, zstd, eStargz made by the real converter (`ctr-remote image
//! convert --estargz --oci` in a private containerd), and zstd:chunked made by `skopeo copy
//! --dest-compress-format zstd:chunked`.
//!
//! Needs root (FUSE, devices, `security.*` / `trusted.*` xattrs), `umoci`, `fuse3`, and for
//! eStargz `containerd` and `ctr-remote` (Debian package `stargz-snapshotter`), for
//! zstd:chunked `skopeo`; `.ci/setup`
//! installs them. Unlike `estargz_convert.rs`, which skips without containerd, these tests
//! FAIL with the reason when something they need is missing: a conformance run that silently
//! covers nothing would hide a gap in CI.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tricky::{self, Stat, TrickyLayer};
use common::*;

/// Layer annotation eStargz converters put on every converted layer.
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Entries eStargz adds to a layer's tar that are not part of the image's filesystem.
const ESTARGZ_META: [&str; 3] = [
    "/stargz.index.json",
    "/.prefetch.landmark",
    "/.no.prefetch.landmark",
];
/// How many differences a failure lists.
const SHOW: usize = 60;

/// The layer formats under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Gzip,
    Tar,
    Zstd,
    Estargz,
    ZstdChunked,
}

// ---------------------------------------------------------------------------------------------
// The image.

/// Size of the multi-MiB file: over eStargz's 4 MiB chunk size and many gzip checkpoints.
const BIG: usize = 5 * 1024 * 1024 + 4321;

/// `security.capability` for `cap_net_raw+ep` (VFS_CAP_REVISION_2, 20 bytes, little endian):
/// magic_etc = 0x02000001 (revision 2 | effective), permitted[0] = 1 << 13 (CAP_NET_RAW).
const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

const UNICODE: &str = "names/ünïcødé-名前.txt";
const UNICODE_DIR: &str = "names/日本語のディレクトリ";
const EMOJI: &str = "names/emoji 🦀 and spaces.txt";

/// A 150-byte file name: no ustar field can hold it (GNU `L` entry).
fn gnu_long_name() -> String {
    format!("names/gnu-{}", "g".repeat(140))
}

/// A 180-byte file name in PAX form (`path` record).
fn pax_long_name() -> String {
    format!("names/pax-{}", "p".repeat(170))
}

/// A directory and a 150+-byte path below it that fits the ustar prefix/name split.
fn ustar_prefix_dir() -> String {
    format!("names/prefix-{}", "d".repeat(60))
}
fn ustar_prefix_path() -> String {
    format!("{}/{}", ustar_prefix_dir(), "f".repeat(80))
}

/// Symlink targets over 100 bytes.
fn long_target(tag: &str) -> String {
    format!("/{tag}/{}/target", "t".repeat(120))
}

/// Four layers (base, changes, an empty layer, more changes) using every feature the issue
/// lists. Whiteouts, opaque markers and replacements act on lower layers.
fn tricky_layers() -> Vec<TrickyLayer> {
    let l0 = TrickyLayer::new()
        .dir(".", 0o755)
        .mtime(1_500_000_000)
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file("etc/deleted", b"whited out in layer 1\n", 0o644)
        .file("etc/recreated", b"first life\n", 0o644)
        .mtime(1_550_000_000)
        .file("etc/phoenix", b"old phoenix\n", 0o644)
        .file("etc/hl-a", b"three names, one inode\n", 0o640)
        .owner(0, 42)
        .hardlink("etc/hl-b", "etc/hl-a")
        .hardlink("etc/hl-c", "etc/hl-a")
        .file("etc/xattrs", b"a file with xattrs\n", 0o644)
        .xattr("user.comment", b"hello xattr")
        .xattr("user.binary", &[0, 1, 2, 0xfe, 0xff])
        .xattr("trusted.stratafs", b"trusted value")
        .file("etc/empty-with-xattr", b"", 0o600)
        .xattr("user.empty-file", b"x")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", b"tool version 1\n", 0o755)
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .file("usr/bin/su", b"setuid root\n", 0o4755)
        .file("usr/bin/wall", b"setgid tty\n", 0o2755)
        .owner(0, 5)
        .file("usr/bin/both", b"setuid and setgid\n", 0o6750)
        .owner(0, 42)
        .file("usr/bin/ping", b"needs cap_net_raw\n", 0o755)
        .xattr("security.capability", &CAP_NET_RAW_EP)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libempty.so", b"", 0o644)
        .dir("tmp", 0o1777)
        .dir("srv", 0o755)
        .dir("srv/shared", 0o2775)
        .owner(1000, 1000)
        .xattr("user.dir", b"an xattr on a directory")
        .dir("srv/sticky-setgid", 0o3770)
        .owner(1000, 100)
        .dir("dev", 0o755)
        .char_dev("dev/null", 1, 3, 0o666)
        .char_dev("dev/tty", 5, 0, 0o620)
        .owner(0, 5)
        .char_dev("dev/big-char", 511, 1_000_000, 0o600)
        .block_dev("dev/loop0", 7, 0, 0o660)
        .owner(0, 6)
        .block_dev("dev/nvme0n1p9", 259, 70_000, 0o600)
        .dir("run", 0o755)
        .fifo("run/initctl", 0o600)
        .fifo("run/fifo-owned", 0o620)
        .owner(1000, 1000)
        .dir("links", 0o755)
        .symlink("links/abs", "/etc/passwd")
        .symlink("links/rel", "../etc/passwd")
        .symlink("links/dangling", "/does/not/exist")
        // Only trusted.* and security.* xattrs can be set on a symlink.
        .xattr("trusted.on-a-symlink", b"link xattr")
        .symlink("links/dangling-rel", "missing-sibling")
        .symlink("links/dir", "../usr/bin")
        // A hard link to a symlink: the symlink itself gets two names.
        .hardlink("links/hard-to-symlink", "links/dir")
        .symlink("links/owned", "../etc/passwd")
        .owner(1000, 1000)
        .mtime(1_234_567_890)
        .symlink("links/long-gnu", &long_target("gnu"))
        .symlink("links/long-pax", &long_target("pax"))
        .pax_names()
        .file(
            "links/was-file",
            b"replaced by a symlink in layer 3\n",
            0o644,
        )
        .dir("names", 0o755)
        .file(&gnu_long_name(), b"GNU long name\n", 0o644)
        .file(&pax_long_name(), b"PAX long name\n", 0o644)
        .pax_names()
        .dir(&ustar_prefix_dir(), 0o755)
        .pax_names()
        .file(&ustar_prefix_path(), b"ustar prefix field\n", 0o644)
        .pax_names()
        .hardlink(&format!("{}-hardlink", gnu_long_name()), &gnu_long_name())
        .file(UNICODE, "grüße, 世界\n".as_bytes(), 0o644)
        .dir(UNICODE_DIR, 0o755)
        .file(
            &format!("{UNICODE_DIR}/ファイル"),
            b"in a non-ASCII dir\n",
            0o644,
        )
        .file(EMOJI, b"crab\n", 0o644)
        .file("names/empty", b"", 0o644)
        .dir("swap", 0o755)
        .file("swap/child", b"gone when swap becomes a file\n", 0o644)
        .dir("swap/sub", 0o755)
        .file("swap/sub/deep", b"gone too\n", 0o644)
        .dir("swap2", 0o755)
        .file("swap2/child", b"gone with the whiteout\n", 0o644)
        .dir("opq", 0o755)
        .file("opq/a", b"hidden by the opaque marker\n", 0o644)
        .dir("opq/sub", 0o755)
        .file("opq/sub/b", b"hidden too\n", 0o644)
        .dir("vanish", 0o755)
        .file("vanish/x", b"the whole dir is whited out\n", 0o644)
        .dir("vanish/y", 0o755)
        .file("vanish/y/z", b"deep\n", 0o644)
        .dir("big", 0o755)
        .file("big/blob", &bytes(1, BIG), 0o644)
        .owner(1000, 1000)
        .symlink("big/link", "blob")
        .dir("pax", 0o755)
        // PAX overrides of the header fields, as Go's archive/tar and GNU tar --posix write
        // them: a sub-second mtime, and ids too large for the octal fields.
        .file("pax/mtime-frac", b"sub-second mtime\n", 0o644)
        .mtime(1_700_000_000)
        .pax("mtime", b"1700000000.123456789")
        .file("pax/big-ids", b"large uid and gid\n", 0o644)
        .pax("uid", b"3000000")
        .pax("gid", b"3000001")
        .dir("gnu", 0o755)
        // GNU base-256 numeric fields.
        .file("gnu/base256-ids", b"large ids in base-256\n", 0o644)
        .owner(4_000_000, 4_000_001)
        .dir("mtimes", 0o755)
        .file("mtimes/epoch-plus-one", b"old\n", 0o644)
        .mtime(1)
        .file("mtimes/year-2100", b"future\n", 0o644)
        .mtime(4_102_444_800);
    let l1 = TrickyLayer::new()
        // A directory over a directory: new metadata, children kept.
        .dir("etc", 0o750)
        .mtime(1_600_000_100)
        .whiteout("etc/deleted")
        .whiteout("etc/recreated")
        .whiteout("vanish")
        // A whiteout for a path no lower layer has: nothing to do.
        .whiteout("etc/never-existed")
        // New metadata for a directory replaces its xattrs too.
        .dir("srv/shared", 0o2770)
        .owner(1000, 1000)
        .xattr("user.dir2", b"layer 1's xattr")
        // An opaque marker in a directory this very layer creates.
        .dir("fresh", 0o755)
        .opaque("fresh")
        .file("fresh/file", b"in a new opaque dir\n", 0o644)
        .opaque("opq")
        .file("opq/c", b"the only child after the opaque marker\n", 0o644)
        // A file over a directory, without a whiteout; and with one.
        .file("swap", b"swap is a file now\n", 0o644)
        .whiteout("swap2")
        .file("swap2", b"swap2 is a file after a whiteout\n", 0o600)
        // A hard link to a file of a lower layer.
        .hardlink("usr/bin/tool-l1", "usr/bin/tool");
    let empty = TrickyLayer::new();
    let l3 = TrickyLayer::new()
        // The file becomes a directory again; its old children do not come back.
        .dir("swap", 0o700)
        .mtime(1_650_000_000)
        .file("swap/new-child", b"swap is a dir again\n", 0o644)
        // Deleted in layer 1, re-created here with other content and metadata.
        .file(
            "etc/recreated",
            b"second life, longer than the first\n",
            0o600,
        )
        .owner(1000, 1000)
        .mtime(1_650_000_000)
        // Whiteout and re-creation in the same layer.
        .whiteout("etc/phoenix")
        .file("etc/phoenix", b"new phoenix\n", 0o640)
        // One of three hard-linked names removed.
        .whiteout("etc/hl-b")
        // The hard-linked file replaced: the other two names keep the old inode.
        .file("usr/bin/tool", b"tool version 2, a new inode\n", 0o755)
        // A symlink replaced by a file, a file by a symlink, a symlink removed.
        .file("links/abs", b"no longer a link\n", 0o644)
        .symlink("links/was-file", "abs")
        .whiteout("links/dangling-rel")
        .whiteout("dev/tty");
    vec![l0, l1, empty, l3]
}

/// Facts about the merged tree written down from the layers above (not from any reader).
/// They are checked on both the umoci reference and the mount, so an equal but wrong pair
/// (or an unpacker that silently skipped a feature) cannot pass.
/// `whole_second_mtimes`: the format keeps modification times in whole seconds (eStargz, see
/// `toc_mtimes`).
fn expectations(tree: &BTreeMap<PathBuf, Stat>, whole_second_mtimes: bool) -> Vec<String> {
    let mut errs = Vec::new();
    let get = |p: &str| tree.get(Path::new(p));
    let absent = |p: &str, errs: &mut Vec<String>| {
        if get(p).is_some() {
            errs.push(format!("{p}: should not exist"));
        }
    };
    for p in [
        "/etc/deleted",
        "/etc/hl-b",
        "/vanish",
        "/opq/a",
        "/opq/sub",
        "/swap/child",
        "/swap/sub",
        "/swap2/child",
        "/links/dangling-rel",
        "/dev/tty",
    ] {
        absent(p, &mut errs);
    }
    for p in tree.keys() {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(".wh.")) {
            errs.push(format!("{}: whiteout name visible", p.display()));
        }
    }
    let sha = |data: &[u8]| Some(Ok(sha256_digest(data)));
    let mut check = |p: &str, what: &str, ok: &dyn Fn(&Stat) -> bool| match get(p) {
        None => errs.push(format!("{p}: missing (expected {what})")),
        Some(st) if !ok(st) => errs.push(format!("{p}: expected {what}, got {st}")),
        Some(_) => {}
    };
    check("/", "the ./ entry: mode 0755, mtime 1500000000", &|s| {
        s.kind == 'd' && s.mode == 0o755 && s.mtime == (1_500_000_000, 0)
    });
    check("/etc", "dir 0750 mtime 1600000100 (layer 1)", &|s| {
        s.kind == 'd' && s.mode == 0o750 && s.mtime == (1_600_000_100, 0)
    });
    check("/etc/passwd", "file kept under the re-stamped dir", &|s| {
        s.kind == '-'
    });
    check(
        "/etc/recreated",
        "layer 3's file: 0600 1000:1000 mtime 1650000000",
        &|s| {
            s.content == sha(b"second life, longer than the first\n")
                && s.mode == 0o600
                && (s.uid, s.gid) == (1000, 1000)
                && s.mtime == (1_650_000_000, 0)
        },
    );
    check("/etc/phoenix", "the re-created file", &|s| {
        s.content == sha(b"new phoenix\n") && s.mode == 0o640
    });
    check("/etc/hl-a", "nlink 2, linked to /etc/hl-c", &|s| {
        s.nlink == 2 && s.links == [PathBuf::from("/etc/hl-c")]
    });
    check(
        "/etc/xattrs",
        "user.comment, user.binary, trusted.*",
        &|s| {
            s.xattrs.as_ref().is_ok_and(|x| {
                x.get("user.comment").map(Vec::as_slice) == Some(b"hello xattr".as_slice())
                    && x.get("user.binary").map(Vec::as_slice)
                        == Some([0u8, 1, 2, 0xfe, 0xff].as_slice())
                    && x.get("trusted.stratafs").map(Vec::as_slice)
                        == Some(b"trusted value".as_slice())
            })
        },
    );
    check(
        "/etc/empty-with-xattr",
        "empty file with user.empty-file",
        &|s| {
            s.size == Some(0)
                && s.xattrs.as_ref().is_ok_and(|x| {
                    x.get("user.empty-file").map(Vec::as_slice) == Some(b"x".as_slice())
                })
        },
    );
    check("/usr/bin/tool", "version 2, nlink 1", &|s| {
        s.content == sha(b"tool version 2, a new inode\n") && s.nlink == 1 && s.links.is_empty()
    });
    for p in ["/usr/bin/tool-link", "/usr/bin/tool-l1"] {
        check(p, "version 1, nlink 2 (tool-link + tool-l1)", &|s| {
            s.content == sha(b"tool version 1\n") && s.nlink == 2 && s.links.len() == 1
        });
    }
    check("/usr/bin/su", "mode 4755", &|s| s.mode == 0o4755);
    check("/usr/bin/wall", "mode 2755 gid 5", &|s| {
        s.mode == 0o2755 && s.gid == 5
    });
    check("/usr/bin/both", "mode 6750 gid 42", &|s| {
        s.mode == 0o6750 && s.gid == 42
    });
    check(
        "/usr/bin/ping",
        "security.capability cap_net_raw+ep",
        &|s| {
            s.xattrs.as_ref().is_ok_and(|x| {
                x.get("security.capability").map(Vec::as_slice) == Some(CAP_NET_RAW_EP.as_slice())
            })
        },
    );
    check("/usr/lib/libempty.so", "empty file", &|s| {
        s.kind == '-' && s.size == Some(0) && s.content == sha(b"")
    });
    check("/tmp", "dir 1777", &|s| s.kind == 'd' && s.mode == 0o1777);
    check(
        "/srv/shared",
        "dir 2770 1000:1000 with only layer 1's user.dir2",
        &|s| {
            s.mode == 0o2770
                && (s.uid, s.gid) == (1000, 1000)
                && s.xattrs.as_ref().is_ok_and(|x| {
                    x.keys().collect::<Vec<_>>() == ["user.dir2"]
                        && x["user.dir2"] == b"layer 1's xattr"
                })
        },
    );
    check("/links/dangling", "trusted.on-a-symlink", &|s| {
        s.xattrs.as_ref().is_ok_and(|x| {
            x.get("trusted.on-a-symlink").map(Vec::as_slice) == Some(b"link xattr".as_slice())
        })
    });
    check(
        "/links/hard-to-symlink",
        "a second name of the symlink /links/dir",
        &|s| {
            s.kind == 'l'
                && s.nlink == 2
                && s.links == [PathBuf::from("/links/dir")]
                && s.target.as_deref() == Some(Path::new("../usr/bin"))
        },
    );
    check("/fresh/file", "a file in a new opaque dir", &|s| {
        s.kind == '-'
    });
    check("/srv/sticky-setgid", "dir 3770", &|s| s.mode == 0o3770);
    check("/dev/null", "char 1:3 0666", &|s| {
        s.kind == 'c' && s.rdev == Some((1, 3)) && s.mode == 0o666
    });
    check("/dev/big-char", "char 511:1000000", &|s| {
        s.kind == 'c' && s.rdev == Some((511, 1_000_000))
    });
    check("/dev/loop0", "block 7:0 0660 gid 6", &|s| {
        s.kind == 'b' && s.rdev == Some((7, 0)) && s.gid == 6
    });
    check("/dev/nvme0n1p9", "block 259:70000", &|s| {
        s.kind == 'b' && s.rdev == Some((259, 70_000))
    });
    check("/run/initctl", "fifo 0600", &|s| {
        s.kind == 'p' && s.mode == 0o600
    });
    check("/run/fifo-owned", "fifo 1000:1000", &|s| {
        s.kind == 'p' && (s.uid, s.gid) == (1000, 1000)
    });
    check("/links/abs", "a file now", &|s| {
        s.kind == '-' && s.content == sha(b"no longer a link\n")
    });
    for (p, t) in [
        ("/links/rel", "../etc/passwd".to_string()),
        ("/links/dangling", "/does/not/exist".to_string()),
        ("/links/dir", "../usr/bin".to_string()),
        ("/links/was-file", "abs".to_string()),
        ("/links/long-gnu", long_target("gnu")),
        ("/links/long-pax", long_target("pax")),
        ("/big/link", "blob".to_string()),
    ] {
        let size = t.len() as u64;
        check(p, &format!("symlink to {t}"), &move |s| {
            s.kind == 'l' && s.target.as_deref() == Some(Path::new(&t)) && s.size == Some(size)
        });
    }
    check("/links/owned", "symlink 1000:1000 mtime 1234567890", &|s| {
        s.kind == 'l' && (s.uid, s.gid) == (1000, 1000) && s.mtime == (1_234_567_890, 0)
    });
    for (p, content) in [
        (format!("/{}", gnu_long_name()), &b"GNU long name\n"[..]),
        (format!("/{}-hardlink", gnu_long_name()), b"GNU long name\n"),
        (format!("/{}", pax_long_name()), b"PAX long name\n"),
        (format!("/{}", ustar_prefix_path()), b"ustar prefix field\n"),
        (format!("/{UNICODE}"), "grüße, 世界\n".as_bytes()),
        (format!("/{UNICODE_DIR}/ファイル"), b"in a non-ASCII dir\n"),
        (format!("/{EMOJI}"), b"crab\n"),
    ] {
        check(&p, "its content", &|s| s.content == sha(content));
    }
    check(&format!("/{}", gnu_long_name()), "nlink 2", &|s| {
        s.nlink == 2
    });
    check("/names/empty", "empty file", &|s| {
        s.kind == '-' && s.size == Some(0)
    });
    check("/opq/c", "the only child of /opq", &|s| s.kind == '-');
    check("/swap", "dir 0700 (layer 3)", &|s| {
        s.kind == 'd' && s.mode == 0o700
    });
    check("/swap/new-child", "layer 3's file", &|s| s.kind == '-');
    check("/swap2", "file 0600", &|s| {
        s.kind == '-' && s.mode == 0o600 && s.content == sha(b"swap2 is a file after a whiteout\n")
    });
    check("/big/blob", "the multi-MiB file", &|s| {
        s.size == Some(BIG as u64) && s.content == sha(&bytes(1, BIG)) && s.uid == 1000
    });
    if whole_second_mtimes {
        check("/pax/mtime-frac", "mtime 1700000000 (TOC)", &|s| {
            s.mtime == (1_700_000_000, 0)
        });
    } else {
        check(
            "/pax/mtime-frac",
            "mtime 1700000000.123456789 (PAX)",
            &|s| s.mtime == (1_700_000_000, 123_456_789),
        );
    }
    check("/pax/big-ids", "uid 3000000 gid 3000001 (PAX)", &|s| {
        (s.uid, s.gid) == (3_000_000, 3_000_001)
    });
    check(
        "/gnu/base256-ids",
        "uid 4000000 gid 4000001 (base-256)",
        &|s| (s.uid, s.gid) == (4_000_000, 4_000_001),
    );
    check("/mtimes/epoch-plus-one", "mtime 1", &|s| s.mtime == (1, 0));
    check("/mtimes/year-2100", "mtime 4102444800", &|s| {
        s.mtime == (4_102_444_800, 0)
    });
    let names: Vec<String> = tree
        .keys()
        .filter(|p| p.parent() == Some(Path::new("/opq")))
        .map(|p| p.display().to_string())
        .collect();
    if names != ["/opq/c"] {
        errs.push(format!("/opq: expected only /opq/c, got {names:?}"));
    }
    let names: Vec<String> = tree
        .keys()
        .filter(|p| p.parent() == Some(Path::new("/swap")))
        .map(|p| p.display().to_string())
        .collect();
    if names != ["/swap/new-child"] {
        errs.push(format!(
            "/swap: expected only /swap/new-child, got {names:?}"
        ));
    }
    errs
}

// ---------------------------------------------------------------------------------------------
// Mounting.

/// A mounted image; unmounts on drop (`stratafs umount`, then `umount -l` if that fails), so a
/// failing test leaves no mount behind.
struct Mounted<'a> {
    cli: &'a Stratafs,
    point: PathBuf,
}

impl Mounted<'_> {
    /// `stratafs umount`: the mount must be gone and no process of this store left.
    fn unmount(&self) -> Result<(), String> {
        let out = self
            .cli
            .command()
            .arg("umount")
            .arg(&self.point)
            .output()
            .map_err(|e| format!("run stratafs umount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "stratafs umount {} failed ({}): {}{}",
                self.point.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        if mount_entry(&self.point).is_some() {
            return Err(format!(
                "{} still mounted after stratafs umount",
                self.point.display()
            ));
        }
        let root = self.cli.root();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_mentioning(&root);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the mount daemon did not end within 10 s of stratafs umount: {left:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if mount_entry(&self.point).is_none() {
            return;
        }
        let ok = self
            .cli
            .command()
            .arg("umount")
            .arg(&self.point)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok || mount_entry(&self.point).is_some() {
            eprintln!("stratafs umount {} failed: umount -l", self.point.display());
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

/// (fstype, mount options, superblock options) of the mount at `point`.
fn mount_entry(point: &Path) -> Option<(String, String, String)> {
    common::mount::mount_at(point)
        .map(|m| (m.fstype, m.options.join(","), m.super_options.join(",")))
}

/// Processes whose command line mentions `path` (the daemon runs with `--root ROOT`).
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == me || !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push(format!("{name}: {cmdline}"));
        }
    }
    out
}

/// Everything these tests need, or why it is missing.
fn missing_prerequisite(format: Format) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2));
    if euid != Some("0") {
        return Some(format!(
            "needs root (FUSE mounts, devices, trusted.*/security.* xattrs); euid is {euid:?}"
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (kernel FUSE support, Debian package fuse3)".into());
    }
    let runs = |bin: &str, arg: &str| {
        Command::new(bin)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("umoci", "--version") {
        return Some("`umoci` not found (Debian package umoci, see .ci/setup)".into());
    }
    if format == Format::ZstdChunked && !runs("skopeo", "--version") {
        return Some("`skopeo` not found (Debian package skopeo, see .ci/setup)".into());
    }
    if format == Format::Estargz {
        if let Some(why) = Containerd::unavailable() {
            return Some(why);
        }
        if !runs("ctr-remote", "--version") {
            return Some(
                "`ctr-remote` not found (Debian package stargz-snapshotter, see .ci/setup)".into(),
            );
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The test.

/// The image as mounted, and the bytes umoci unpacks for the reference.
struct Prepared {
    reference: String,
    /// Manifest bytes for the OCI layout.
    manifest: Vec<u8>,
    /// Config and layer blobs for the OCI layout.
    blobs: Vec<Vec<u8>>,
}

fn prepare(format: Format, reg: &Registry) -> Prepared {
    let compression = match format {
        Format::Gzip | Format::Estargz | Format::ZstdChunked => Compression::Gzip,
        Format::Tar => Compression::None,
        Format::Zstd => Compression::Zstd,
    };
    let tars: Vec<Vec<u8>> = tricky_layers().iter().map(TrickyLayer::tar).collect();
    let image = tars
        .iter()
        .fold(ImageBuilder::new(), |b, tar| {
            b.layer(Layer::from_tar(tar.clone(), compression))
        })
        .build(ManifestFlavour::Oci);
    let repo = "conformance/tricky";
    let tag = format!("{format:?}").to_lowercase();
    reg.push_image(repo, &tag, &image, &Auth::None);
    let src = format!("{}/{repo}:{tag}", reg.addr());
    let mut blobs = vec![image.config.clone()];
    match format {
        Format::Gzip | Format::Tar => {
            blobs.extend(image.layers.iter().map(|l| l.blob.clone()));
            Prepared {
                reference: src,
                manifest: image.manifest.clone(),
                blobs,
            }
        }
        Format::Zstd => {
            // umoci 0.4 (Debian 12) refuses tar+zstd layers ("blob is not correct mediatype:
            // application/vnd.oci.image.layer.v1.tar+zstd").
            // The reference is unpacked from the same image with each layer decompressed: a
            // plain tar whose sha256 is the layer's diff_id, i.e. provably the very bytes the
            // zstd blob holds. The config (diff_ids) is unchanged.
            let mut layers = Vec::new();
            for (l, tar) in image.layers.iter().zip(&tars) {
                let plain = zstd::stream::decode_all(&l.blob[..]).expect("zstd layer");
                assert_eq!(
                    sha256_digest(&plain),
                    l.diff_id,
                    "zstd layer decompresses to its diff_id"
                );
                assert!(plain == *tar);
                layers.push(Layer::from_tar(plain, Compression::None));
            }
            let plain_image = layers
                .into_iter()
                .fold(ImageBuilder::new(), ImageBuilder::layer)
                .build(ManifestFlavour::Oci);
            assert_eq!(plain_image.config, image.config);
            blobs.extend(plain_image.layers.iter().map(|l| l.blob.clone()));
            Prepared {
                reference: src,
                manifest: plain_image.manifest,
                blobs,
            }
        }
        Format::ZstdChunked => {
            let dst = format!("{}/{repo}:zstd-chunked-converted", reg.addr());
            let (_dir, converted) = common::skopeo::convert_zstd_chunked(&src, &dst);
            // The reference: umoci 0.4 refuses zstd media types, so it unpacks each converted
            // layer decompressed — the very tar stream the zstd:chunked blob holds.
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(converted.join("manifest.json")).unwrap())
                    .unwrap();
            let mut layers = Vec::new();
            for layer in doc["layers"].as_array().expect("layers") {
                assert!(
                    layer["annotations"].as_object().is_some_and(|a| a
                        .keys()
                        .any(|k| k.ends_with("zstd-chunked.manifest-checksum"))),
                    "not a zstd:chunked layer: {layer}"
                );
                let hex = layer["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:");
                let blob = std::fs::read(converted.join(hex)).unwrap();
                let plain = zstd::stream::decode_all(&blob[..]).expect("zstd layer");
                layers.push(Layer::from_tar(plain, Compression::None));
            }
            let plain_image = layers
                .into_iter()
                .fold(ImageBuilder::new(), ImageBuilder::layer)
                .build(ManifestFlavour::Oci);
            let mut blobs = vec![plain_image.config.clone()];
            blobs.extend(plain_image.layers.iter().map(|l| l.blob.clone()));
            Prepared {
                reference: dst,
                manifest: plain_image.manifest,
                blobs,
            }
        }
        Format::Estargz => {
            let dst_tag = "estargz-converted";
            let dst = format!("{}/{repo}:{dst_tag}", reg.addr());
            let ctd = Containerd::start();
            // Fetch without unpacking: `ctr images pull` would also unpack with the overlayfs
            // snapshotter, whose applier cannot hard-link to a lower layer's file ("link
            // .../usr/bin/tool .../usr/bin/tool-l1: no such file or directory"), and the
            // converter needs only the content.
            ctd.ctr_ok(&["content", "fetch", "--plain-http", &src]);
            assert!(ctd.images().contains(&src), "{:?}", ctd.images());
            ctd.ctr_remote_ok(&["image", "convert", "--estargz", "--oci", &src, &dst]);
            ctd.push_plain_http(&dst);
            drop(ctd);
            let manifest = reg
                .get_manifest(repo, dst_tag, &Auth::None)
                .expect_status(200, "converted manifest")
                .body;
            let doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            assert_eq!(doc["mediaType"], OCI_MANIFEST, "{doc}");
            let digest = |d: &serde_json::Value| d["digest"].as_str().unwrap().to_string();
            let mut blobs = vec![
                get_blob(&reg.url(), repo, &digest(&doc["config"]), None, &Auth::None)
                    .expect_status(200, "converted config")
                    .body,
            ];
            let layers = doc["layers"].as_array().expect("layers");
            assert_eq!(layers.len(), image.layers.len(), "{doc}");
            for layer in layers {
                assert!(
                    layer["annotations"][TOC_DIGEST]
                        .as_str()
                        .is_some_and(|d| d.starts_with("sha256:")),
                    "not an eStargz layer: {layer}"
                );
                blobs.push(
                    get_blob(&reg.url(), repo, &digest(layer), None, &Auth::None)
                        .expect_status(200, "converted layer")
                        .body,
                );
            }
            Prepared {
                reference: dst,
                manifest,
                blobs,
            }
        }
    }
}

fn conformance(format: Format) {
    if let Some(why) = missing_prerequisite(format) {
        panic!("mount_conformance ({format:?}) cannot run: {why}");
    }
    let started = Instant::now();
    let reg = Registry::start(RegistryOpts::default());
    let prepared = prepare(format, &reg);

    // The reference: umoci's unpack of the same bytes.
    let work = tempfile::Builder::new()
        .prefix("stratafs-conformance-")
        .tempdir()
        .unwrap();
    let layout = work.path().join("layout");
    let blobs: Vec<&[u8]> = prepared.blobs.iter().map(Vec::as_slice).collect();
    tricky::write_oci_layout(&layout, "ref", &prepared.manifest, &blobs);
    let rootfs = tricky::umoci_unpack(&layout, "ref", &work.path().join("bundle"));
    let mut expected = tricky::walk(&rootfs);
    if format == Format::Estargz {
        // eStargz's own entries are part of its tar stream, so umoci extracts them; they are
        // not part of the image's filesystem and must not show in the mount (checked below).
        let removed: Vec<&str> = ESTARGZ_META
            .into_iter()
            .filter(|m| expected.remove(Path::new(m)).is_some())
            .collect();
        assert!(
            removed.contains(&"/stargz.index.json"),
            "umoci's unpack of the converted image has no /stargz.index.json: not eStargz layers?"
        );
    }

    // The mount.
    let cli = Stratafs::new();
    let point = work.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let out = cli
        .command()
        .args([
            "mount",
            "--plain-http",
            "--platform",
            "linux/amd64",
            "-o",
            "suid,dev",
        ])
        .arg(&prepared.reference)
        .arg(&point)
        .output()
        .expect("run stratafs mount");
    let mounted = Mounted {
        cli: &cli,
        point: point.clone(),
    };
    assert!(
        out.status.success(),
        "stratafs mount {} failed: {}\n{}",
        prepared.reference,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let (fstype, opts, _) = mount_entry(&point).unwrap_or_else(|| {
        panic!(
            "stratafs mount returned but {} is not mounted",
            point.display()
        )
    });
    assert!(fstype.starts_with("fuse"), "fstype {fstype}");
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "mounted read-only: options {opts}"
    );
    for o in ["nosuid", "nodev"] {
        assert!(
            !opts.split(',').any(|x| x == o),
            "-o suid,dev: options {opts} contain {o}"
        );
    }
    let write = std::fs::File::create(point.join("new-file"));
    assert!(
        write.as_ref().is_err_and(|e| e.raw_os_error() == Some(30)),
        "creating a file must fail with EROFS: {write:?}"
    );

    let got = tricky::walk(&point);
    eprintln!(
        "{format:?}: {} paths in the reference, {} in the mount ({:?} so far)",
        expected.len(),
        got.len(),
        started.elapsed()
    );

    // Reads through the mount are stable: a second pass (now from the cache) hashes the same.
    let big_again = tricky::stat(&point.join("big/blob")).content;
    // `stratafs umount` ends the mount and its daemon (checked before reporting differences,
    // so a failing comparison still tests it; the guard cleans up if it fails).
    let unmounted = mounted.unmount();
    eprintln!(
        "{format:?}: walked and unmounted in {:?}",
        started.elapsed()
    );

    let mut report = Vec::new();
    // No whiteout or eStargz metadata name is visible.
    let leaked: Vec<String> = got
        .keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".wh."))
                || ESTARGZ_META.iter().any(|m| Path::new(m) == *p)
        })
        .map(|p| p.display().to_string())
        .collect();
    section(
        &mut report,
        "names that must not be visible in the mount",
        &leaked,
    );
    // The reference really is what the layers describe (else the comparison proves little).
    section(
        &mut report,
        "umoci reference vs the facts written in this test",
        &expectations(&expected, false),
    );
    if format == Format::Estargz {
        toc_mtimes(&mut expected);
    }
    // The mount, field by field, against the reference.
    section(
        &mut report,
        &format!(
            "stratafs mount {} vs umoci unpack (expected = umoci, got = mount)",
            prepared.reference
        ),
        &tricky::diff(&expected, &got),
    );
    section(
        &mut report,
        "mount vs the facts written in this test",
        &expectations(&got, format == Format::Estargz),
    );
    let want_big = &expected[Path::new("/big/blob")].content;
    if big_again != *want_big {
        report.push(format!(
            "/big/blob read a second time: expected {want_big:?}, got {big_again:?}"
        ));
    }
    if let Err(e) = unmounted {
        report.push(format!("stratafs umount: {e}"));
    }
    assert!(
        report.is_empty(),
        "{format:?} conformance failed:\n{}",
        report.join("\n")
    );
    eprintln!("{format:?}: done in {:?}", started.elapsed());
}

/// Appends `title` and the first [`SHOW`] of `diffs` (with their count) to `report`, unless
/// `diffs` is empty.
fn section(report: &mut Vec<String>, title: &str, diffs: &[String]) {
    if diffs.is_empty() {
        return;
    }
    report.push(format!("{title}: {} difference(s)", diffs.len()));
    for d in diffs.iter().take(SHOW) {
        report.push(format!("  {d}"));
    }
    if diffs.len() > SHOW {
        report.push(format!("  ... and {} more", diffs.len() - SHOW));
    }
}

#[test]
fn gzip_mount_matches_umoci() {
    conformance(Format::Gzip);
}

#[test]
fn tar_mount_matches_umoci() {
    conformance(Format::Tar);
}

#[test]
fn zstd_mount_matches_umoci() {
    conformance(Format::Zstd);
}

#[test]
fn estargz_mount_matches_umoci() {
    conformance(Format::Estargz);
}

#[test]
fn zstd_chunked_mount_matches_umoci() {
    conformance(Format::ZstdChunked);
}

/// An eStargz layer is read through its TOC, whose `modtime` (RFC 3339) the converter writes
/// in whole seconds: a sub-second PAX mtime survives only in the tar header inside the blob,
/// which a lazy reader never fetches for metadata (stargz-snapshotter shows the same). So for
/// eStargz the reference's mtimes are compared truncated to seconds; every other field, and
/// the sub-second mtimes of the gzip, tar and zstd variants of the same layers, exactly.
fn toc_mtimes(tree: &mut BTreeMap<PathBuf, Stat>) {
    for stat in tree.values_mut() {
        stat.mtime.1 = 0;
    }
}
