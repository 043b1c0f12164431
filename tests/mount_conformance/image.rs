//! The image of the conformance tests: four layers using every feature the tests cover
//! (tricky names, long names and targets, hard links, devices, xattrs, whiteouts, opaque
//! directories, replacements), and the facts about their merged tree, written down from the
//! layers rather than read from any unpacker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::tricky::{Stat, TrickyLayer};
use crate::common::*;

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
pub fn tricky_layers() -> Vec<TrickyLayer> {
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
pub fn expectations(tree: &BTreeMap<PathBuf, Stat>, whole_second_mtimes: bool) -> Vec<String> {
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
