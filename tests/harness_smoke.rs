//! Smoke tests proving the integration-test harness (`tests/common`) works
//! against a real `docker-registry`.

mod common;

use common::*;
use std::io::Read;

/// A two-layer image description (gzip + zstd layers).
fn two_layers() -> ImageBuilder {
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello world\n", 0o644)
        .dir("usr/bin", 0o755)
        .symlink("bin", "usr/bin")
        .build(Compression::Gzip);
    let top = LayerBuilder::new()
        .file("usr/bin/tool", &vec![7u8; 100_000], 0o755)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .whiteout("etc/hello")
        .build(Compression::Zstd);
    ImageBuilder::new()
        .env("PATH=/usr/bin")
        .cmd(&["/bin/sh"])
        .layer(base)
        .layer(top)
}

fn count(log: &[AccessEntry], method: &str, status: u16, path_part: &str) -> usize {
    log.iter()
        .filter(|e| e.method == method && e.status == status && e.path.contains(path_part))
        .count()
}

#[test]
fn layers_are_deterministic_and_readable() {
    let a = two_layers().build(ManifestFlavour::Oci);
    let b = two_layers().build(ManifestFlavour::Oci);
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_eq!(a.layers[0].media_type, oci_media_type(Compression::Gzip));
    assert_eq!(a.layers[1].media_type, oci_media_type(Compression::Zstd));

    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&a.layers[0].blob[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(common::sha256_digest(&tar_bytes), a.layers[0].diff_id);
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["etc/", "etc/hello", "usr/bin/", "bin"]);

    let top = zstd::decode_all(&a.layers[1].blob[..]).unwrap();
    assert_eq!(common::sha256_digest(&top), a.layers[1].diff_id);

    let cfg: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"][1], a.layers[1].diff_id.as_str());
    assert_eq!(cfg["config"]["Cmd"][0], "/bin/sh");

    let d = two_layers().build(ManifestFlavour::Docker);
    assert_eq!(d.manifest_media_type, DOCKER_MANIFEST);
    assert_eq!(
        d.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(d.config_digest, a.config_digest);
}

#[test]
fn access_line_parser() {
    let line = r#"127.0.0.1 - - [23/Nov/2026:06:53:25 +0000] "GET /v2/a/blobs/sha256:ab?x=1 HTTP/1.1" 206 17 "" "ua \"quoted\" 1.0""#;
    let e = parse_access_line(line).unwrap();
    assert_eq!(e.method, "GET");
    assert_eq!(e.path, "/v2/a/blobs/sha256:ab");
    assert_eq!(e.uri, "/v2/a/blobs/sha256:ab?x=1");
    assert_eq!((e.status, e.bytes), (206, 17));
    assert_eq!(e.user_agent, r#"ua "quoted" 1.0"#);
    assert!(parse_access_line(r#"time="2026" level=info msg="x""#).is_none());
}

#[test]
fn push_and_pull_oci_image() {
    let reg = Registry::start(RegistryOpts::default());
    let img = two_layers().build(ManifestFlavour::Oci);
    let digest = reg.push_image("test/oci", "v1", &img, &Auth::None);
    assert_eq!(digest, img.manifest_digest);

    let mark = reg.log_mark();
    let resp = reg
        .get_manifest("test/oci", "v1", &Auth::None)
        .expect_status(200, "get manifest");
    assert_eq!(resp.body, img.manifest);
    assert_eq!(resp.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(img.manifest_digest.as_str())
    );
    let layer = &img.layers[1];
    let blob = get_blob(&reg.url(), "test/oci", &layer.digest, None, &Auth::None)
        .expect_status(200, "get blob");
    assert_eq!(blob.body, layer.blob);
    let part = get_blob(
        &reg.url(),
        "test/oci",
        &layer.digest,
        Some((10, 19)),
        &Auth::None,
    )
    .expect_status(206, "range get");
    assert_eq!(part.body, &layer.blob[10..20]);
    assert!(reg.has_blob(&layer.digest));

    let log = reg.access_log_since(mark);
    assert_eq!(log.len(), 3, "{log:#?}");
    assert_eq!(log[0].path, "/v2/test/oci/manifests/v1");
    assert_eq!((log[0].status, log[0].bytes), (200, img.manifest_size()));
    assert_eq!((log[1].status, log[1].bytes), (200, layer.size()));
    assert_eq!((log[2].status, log[2].bytes), (206, 10));
    assert!(log
        .iter()
        .all(|e| e.method == "GET" && e.user_agent == HARNESS_UA));

    // The push itself: 3 blobs (POST 202 + PUT 201 each) and a manifest PUT.
    let all = reg.access_log();
    assert_eq!(count(&all, "POST", 202, "/blobs/uploads/"), 3);
    assert_eq!(count(&all, "PUT", 201, "/blobs/uploads/"), 3);
    assert_eq!(count(&all, "PUT", 201, "/manifests/v1"), 1);
    reg.clear_access_log();
    assert!(reg.access_log().is_empty());
}

#[test]
fn push_and_pull_docker_image_and_indexes() {
    let reg = Registry::start(RegistryOpts::default());
    let img = two_layers().build(ManifestFlavour::Docker);
    reg.push_image("test/docker", "latest", &img, &Auth::None);
    let resp = get_manifest_accept(
        &reg.url(),
        "test/docker",
        "latest",
        DOCKER_MANIFEST,
        &Auth::None,
    )
    .expect_status(200, "get docker manifest");
    assert_eq!(resp.body, img.manifest);
    assert_eq!(resp.header("content-type"), Some(DOCKER_MANIFEST));

    for flavour in [ManifestFlavour::Oci, ManifestFlavour::Docker] {
        let amd = two_layers().build(flavour);
        let arm = two_layers().arch("arm64").variant("v8").build(flavour);
        let index = IndexBuilder::new(flavour).image(amd).image(arm).build();
        let tag = format!("multi-{flavour:?}");
        let digest = reg.push_index("test/multi", &tag, &index, &Auth::None);
        assert_eq!(digest, index.digest);
        let resp = reg
            .get_manifest("test/multi", &tag, &Auth::None)
            .expect_status(200, "get index");
        assert_eq!(resp.body, index.bytes);
        assert_eq!(resp.header("content-type"), Some(index.media_type.as_str()));
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["manifests"][1]["platform"]["variant"], "v8");
        let by_digest = reg
            .get_manifest("test/multi", &index.images[1].manifest_digest, &Auth::None)
            .expect_status(200, "get platform manifest");
        assert_eq!(by_digest.body, index.images[1].manifest);
    }
}

#[test]
fn htpasswd_auth() {
    let reg = Registry::start(RegistryOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let good = Auth::basic("alice", "s3cret");
    let img = two_layers().build(ManifestFlavour::Oci);
    reg.push_image("private/img", "v1", &img, &good);
    let anon = reg.get_manifest("private/img", "v1", &Auth::None);
    assert_eq!(anon.status, 401);
    assert!(anon
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm="));
    let wrong = reg.get_manifest("private/img", "v1", &Auth::basic("alice", "nope"));
    assert_eq!(wrong.status, 401);
    let ok = reg
        .get_manifest("private/img", "v1", &good)
        .expect_status(200, "authenticated pull");
    assert_eq!(ok.body, img.manifest);
    let log = reg.access_log();
    assert_eq!(count(&log, "GET", 401, "/manifests/v1"), 2, "{log:#?}");
}

/// Parse `Bearer realm="..",service="..",scope=".."` into pairs.
fn bearer_params(challenge: &str) -> Vec<(String, String)> {
    let rest = challenge.strip_prefix("Bearer ").expect("bearer challenge");
    rest.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

#[test]
fn token_auth() {
    let tokens = TokenServer::start(TokenServerOpts {
        credentials: Some(("bob".into(), "pw".into())),
        ..Default::default()
    });
    let reg = Registry::start(RegistryOpts {
        token: Some(tokens.auth_config()),
        ..Default::default()
    });
    let img = two_layers().build(ManifestFlavour::Oci);
    let push_token = Auth::Bearer(tokens.push_pull_token("sec/img"));
    reg.push_image("sec/img", "v1", &img, &push_token);
    assert_eq!(tokens.token_requests(), 0);

    // Anonymous: challenge pointing at the token server.
    let anon = reg.get_manifest("sec/img", "v1", &Auth::None);
    assert_eq!(anon.status, 401);
    let params = bearer_params(anon.header("www-authenticate").unwrap());
    let get = |k: &str| params.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(get("realm"), tokens.realm());
    assert_eq!(get("service"), "stratafs-test-registry");
    assert_eq!(get("scope"), "repository:sec/img:pull");

    // Token flow as a client would do it.
    let url = format!(
        "{}?service={}&scope={}",
        get("realm"),
        get("service"),
        get("scope")
    );
    let denied = request("GET", &url, &Auth::basic("bob", "bad"), &[], None);
    assert_eq!(denied.status, 401);
    let resp = request("GET", &url, &Auth::basic("bob", "pw"), &[], None)
        .expect_status(200, "token request");
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v["expires_in"], 300);
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"].as_str(), Some(token.as_str()));
    let pulled = reg
        .get_manifest("sec/img", "v1", &Auth::Bearer(token))
        .expect_status(200, "pull with token");
    assert_eq!(pulled.body, img.manifest);
    assert_eq!(tokens.token_requests(), 2);
    assert_eq!(tokens.scopes().last().unwrap(), "repository:sec/img:pull");
    assert_eq!(tokens.requests()[1].user.as_deref(), Some("bob"));

    // A token granting nothing is refused.
    tokens.set_grant(Grant::Nothing);
    let resp = request("GET", &url, &Auth::basic("bob", "pw"), &[], None)
        .expect_status(200, "empty token");
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let empty = Auth::Bearer(v["token"].as_str().unwrap().to_string());
    let refused = reg.get_manifest("sec/img", "v1", &empty);
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(refused
        .header("www-authenticate")
        .unwrap()
        .contains("insufficient_scope"));
}

#[test]
fn pull_through_mirror() {
    let origin = Registry::start(RegistryOpts::default());
    let img = two_layers().build(ManifestFlavour::Oci);
    origin.push_image("library/app", "1.0", &img, &Auth::None);
    let mirror = Registry::start(RegistryOpts {
        proxy_remote: Some(origin.url()),
        ..Default::default()
    });
    let origin_mark = origin.log_mark();
    let resp = mirror
        .get_manifest("library/app", "1.0", &Auth::None)
        .expect_status(200, "manifest via mirror");
    assert_eq!(resp.body, img.manifest);
    let layer = &img.layers[0];
    let blob = get_blob(
        &mirror.url(),
        "library/app",
        &layer.digest,
        None,
        &Auth::None,
    )
    .expect_status(200, "blob via mirror");
    assert_eq!(blob.body, layer.blob);

    let upstream = origin.wait_access_log(origin_mark, std::time::Duration::from_secs(5), |l| {
        l.iter().any(|e| e.path.contains("/blobs/"))
    });
    assert!(
        upstream
            .iter()
            .any(|e| e.path == "/v2/library/app/manifests/1.0" && e.status == 200),
        "{upstream:#?}"
    );
    assert!(upstream.iter().all(|e| e.user_agent != HARNESS_UA));
    let down = mirror.access_log();
    assert_eq!(count(&down, "GET", 200, "/manifests/1.0"), 1, "{down:#?}");
    assert_eq!(count(&down, "GET", 200, "/blobs/"), 1, "{down:#?}");
}

#[test]
fn restart_keeps_data_and_port() {
    let reg = Registry::start(RegistryOpts::default());
    let img = two_layers().build(ManifestFlavour::Oci);
    reg.push_image("keep/me", "v1", &img, &Auth::None);
    let url = reg.url();
    let pid = reg.pid();
    reg.restart();
    assert_eq!(reg.url(), url);
    assert_ne!(reg.pid(), pid);
    let resp = reg
        .get_manifest("keep/me", "v1", &Auth::None)
        .expect_status(200, "after restart");
    assert_eq!(resp.body, img.manifest);
    reg.stop();
    assert!(reg.pid().is_none());
    let log = reg.access_log();
    assert_eq!(count(&log, "GET", 200, "/manifests/v1"), 1);
}
