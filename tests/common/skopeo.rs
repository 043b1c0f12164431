//! Image conversion with the real `skopeo` (Debian package).

use std::path::PathBuf;
use std::process::Command;

/// Runs `skopeo ARGS…` and panics with its stderr if it fails.
pub fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A zstd:chunked copy of the image `src` (`host:port/repo:tag` on a plain-HTTP registry),
/// pushed as `dst`. skopeo recompresses into a `dir:` layout first (a registry-to-registry copy
/// would reuse the gzip blobs), and that layout is pushed as it is. Returns the temp dir that
/// holds the layout (`manifest.json` and blobs by hex digest) and the layout's path.
pub fn convert_zstd_chunked(src: &str, dst: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let layout = tmp.path().join("zstd-chunked");
    let dir_ref = format!("dir:{}", layout.display());
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("docker://{src}"),
        &dir_ref,
    ]);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &dir_ref,
        &format!("docker://{dst}"),
    ]);
    (tmp, layout)
}
