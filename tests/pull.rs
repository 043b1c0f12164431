//! `stratafs pull` against the real CNCF distribution registry: tags and digests, OCI and Docker
//! media types, platform selection, failures that change nothing, auth, mirrors, and proof that
//! no layer byte is downloaded.

mod common;

use common::*;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const STRATAFS_UA: &str = "stratafs/";

/// A three-layer image with one layer of each compression.
fn three_layers(seed: &str) -> ImageBuilder {
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", format!("ID={seed}\n").as_bytes(), 0o644)
        .build(Compression::Gzip);
    let mid = LayerBuilder::new()
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", &vec![1u8; 300_000], 0o755)
        .build(Compression::Zstd);
    let top = LayerBuilder::new()
        .file("app.txt", seed.as_bytes(), 0o644)
        .build(Compression::None);
    ImageBuilder::new()
        .cmd(&["/bin/sh"])
        .layer(base)
        .layer(mid)
        .layer(top)
}

/// ChainIDs computed independently of the library.
fn expected_chains(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{p} {d}")))),
        };
        out.push(next);
    }
    out
}

/// Checks `pull --json` output against the image that was pushed.
fn assert_pulled(json: &Value, name: &str, target_digest: &str, image: &Image) {
    assert_eq!(json["name"], name);
    assert_eq!(json["digest"], target_digest);
    assert_eq!(json["manifest"], image.manifest_digest.as_str());
    assert_eq!(json["config"], image.config_digest.as_str());
    let p = &image.platform;
    let mut platform = format!("{}/{}", p.os, p.architecture);
    if let Some(v) = &p.variant {
        platform = format!("{platform}/{v}");
    }
    assert_eq!(json["platform"], platform.as_str());
    let layers = json["layers"].as_array().expect("layers array");
    assert_eq!(layers.len(), image.layers.len());
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    for ((got, want), chain) in layers
        .iter()
        .zip(&image.layers)
        .zip(expected_chains(&diff_ids))
    {
        assert_eq!(got["digest"], want.digest.as_str());
        assert_eq!(got["media_type"], want.media_type.as_str());
        assert_eq!(got["size"], want.size());
        assert_eq!(got["diff_id"], want.diff_id.as_str());
        assert_eq!(got["chain_id"], chain.as_str());
    }
}

/// Requests stratafs (not the harness) sent, since `mark`.
fn stratafs_requests(reg: &Registry, mark: usize) -> Vec<AccessEntry> {
    reg.access_log_since(mark)
        .into_iter()
        .filter(|e| e.user_agent.starts_with(STRATAFS_UA))
        .collect()
}

/// Asserts that none of `image`'s layer blobs was requested.
fn assert_no_layer_requests(log: &[AccessEntry], image: &Image) {
    for layer in &image.layers {
        let hits: Vec<_> = log
            .iter()
            .filter(|e| e.path.contains(&layer.digest))
            .collect();
        assert!(
            hits.is_empty(),
            "layer {} was requested: {hits:?}",
            layer.digest
        );
    }
}

#[test]
fn pull_by_tag_stores_metadata_and_downloads_no_layer_bytes() {
    let reg = Registry::start(RegistryOpts::default());
    let image = three_layers("tag").build(ManifestFlavour::Oci);
    reg.push_image("team/app", "v1", &image, &Auth::None);
    let cli = Stratafs::new();
    let mark = reg.log_mark();

    let reference = format!("{}/team/app:v1", reg.addr());
    let json = cli.pull_json(&reference, &[]);
    assert_pulled(&json, &reference, &image.manifest_digest, &image);
    assert_eq!(json["chain_id"], json["layers"][2]["chain_id"]);

    let log = stratafs_requests(&reg, mark);
    assert_no_layer_requests(&log, &image);
    let blob_bytes: u64 = log
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .map(|e| e.bytes)
        .sum();
    assert_eq!(
        blob_bytes,
        image.config_size(),
        "only the config blob is read: {log:?}"
    );
    // The manifest and the config, nothing else: indexes the image pins are fetched when a
    // layer is first read, and unbound referrers are not searched for unless opted in.
    let requests: Vec<(String, u16)> = log.iter().map(|e| (e.path.clone(), e.status)).collect();
    assert_eq!(
        requests,
        [
            ("/v2/team/app/manifests/v1".to_string(), 200),
            (format!("/v2/team/app/blobs/{}", image.config_digest), 200),
        ]
    );

    // The store has the record, and inspect/images read it back.
    let images: Value = serde_json::from_str(&cli.ok(&["images", "--json"])).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1);
    assert_eq!(images[0]["name"], reference.as_str());
    let inspect: Value = serde_json::from_str(&cli.ok(&["inspect", &reference])).unwrap();
    assert_eq!(
        inspect["config"]["rootfs"]["diff_ids"][1],
        image.layers[1].diff_id.as_str()
    );
    assert_eq!(inspect["manifest"]["layers"].as_array().unwrap().len(), 3);
    let text = cli.ok(&["pull", &reference]);
    assert!(text.contains(&image.layers[0].digest), "{text}");
    assert!(text.contains("linux/amd64"), "{text}");
}

#[test]
fn docker_schema2_and_digest_references() {
    let reg = Registry::start(RegistryOpts::default());
    let image = three_layers("docker").build(ManifestFlavour::Docker);
    assert_eq!(image.manifest_media_type, DOCKER_MANIFEST);
    reg.push_image("lib/dock", "latest", &image, &Auth::None);
    let cli = Stratafs::new();

    let by_tag = format!("{}/lib/dock", reg.addr());
    let json = cli.pull_json(&by_tag, &[]);
    assert_pulled(
        &json,
        &format!("{by_tag}:latest"),
        &image.manifest_digest,
        &image,
    );
    assert_eq!(json["media_type"], DOCKER_MANIFEST);
    assert_eq!(
        json["layers"][0]["media_type"],
        docker_media_type(Compression::Gzip)
    );

    let by_digest = format!("{}/lib/dock@{}", reg.addr(), image.manifest_digest);
    let json = cli.pull_json(&by_digest, &[]);
    assert_pulled(&json, &by_digest, &image.manifest_digest, &image);

    let both = format!("{}/lib/dock:latest@{}", reg.addr(), image.manifest_digest);
    assert_pulled(
        &cli.pull_json(&both, &[]),
        &both,
        &image.manifest_digest,
        &image,
    );

    let images: Value = serde_json::from_str(&cli.ok(&["images", "--json"])).unwrap();
    assert_eq!(
        images.as_array().unwrap().len(),
        3,
        "three names, one image"
    );
}

#[test]
fn index_resolves_to_the_wanted_platform() {
    for flavour in [ManifestFlavour::Oci, ManifestFlavour::Docker] {
        let reg = Registry::start(RegistryOpts::default());
        let amd = three_layers("amd").build(flavour);
        let arm = three_layers("arm")
            .arch("arm64")
            .variant("v8")
            .build(flavour);
        let armv7 = three_layers("armv7")
            .arch("arm")
            .variant("v7")
            .build(flavour);
        let index = IndexBuilder::new(flavour)
            .image(arm.clone())
            .image(armv7.clone())
            .image(amd.clone())
            .build();
        reg.push_index("multi", "1", &index, &Auth::None);
        let cli = Stratafs::new();
        let reference = format!("{}/multi:1", reg.addr());
        let mark = reg.log_mark();

        let json = cli.pull_json(&reference, &[]);
        assert_pulled(&json, &reference, &index.digest, &amd);
        assert_eq!(json["media_type"], index.media_type.as_str());
        let log = stratafs_requests(&reg, mark);
        for other in [&arm, &armv7] {
            assert!(
                !log.iter().any(|e| e.path.contains(&other.manifest_digest)),
                "fetched another platform's manifest: {log:?}"
            );
        }
        assert_no_layer_requests(&log, &amd);

        let json = cli.pull_json(&reference, &["--platform", "linux/arm64"]);
        assert_pulled(&json, &reference, &index.digest, &arm);
        let json = cli.pull_json(&reference, &["--platform", "linux/arm/v7"]);
        assert_pulled(&json, &reference, &index.digest, &armv7);

        let before = cli.store_snapshot();
        let err = cli.fail(&["pull", "--platform", "linux/s390x", &reference]);
        assert!(
            err.contains("linux/s390x") && err.contains("linux/arm64/v8"),
            "{err}"
        );
        assert!(err.contains(&reference), "{err}");
        assert_eq!(
            before,
            cli.store_snapshot(),
            "failed pull changed the store"
        );
    }
}

#[test]
fn not_found_and_invalid_references_fail_clearly_and_change_nothing() {
    let reg = Registry::start(RegistryOpts::default());
    let image = three_layers("nf").build(ManifestFlavour::Oci);
    reg.push_image("here", "v1", &image, &Auth::None);
    let cli = Stratafs::new();
    cli.ok(&["pull", &format!("{}/here:v1", reg.addr())]);
    let before = cli.store_snapshot();

    let missing_tag = format!("{}/here:v2", reg.addr());
    let err = cli.fail(&["pull", &missing_tag]);
    assert!(
        err.contains("not found") && err.contains(&missing_tag),
        "{err}"
    );
    let missing_repo = format!("{}/nowhere:v1", reg.addr());
    let err = cli.fail(&["pull", &missing_repo]);
    assert!(
        err.contains("not found") && err.contains(&missing_repo),
        "{err}"
    );
    let err = cli.fail(&["pull", "Upper/Case"]);
    assert!(
        err.contains("invalid reference") && err.contains("lowercase"),
        "{err}"
    );
    let err = cli.fail(&["inspect", &missing_tag]);
    assert!(
        err.contains("not in the store") && err.contains(&missing_tag),
        "{err}"
    );
    let err = cli.fail(&["rmi", &missing_tag]);
    assert!(err.contains(&missing_tag), "{err}");
    assert_eq!(before, cli.store_snapshot());
}

/// Rewrites one byte of a blob in the registry's storage, keeping its length.
fn corrupt_in_registry(reg: &Registry, digest: &str) {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = reg
        .data_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut data = std::fs::read(&path).unwrap();
    let i = data
        .iter()
        .position(|&b| b == b'2')
        .expect("a '2' to change");
    data[i] = b'3';
    std::fs::write(&path, data).unwrap();
}

#[test]
fn corrupted_manifest_and_config_are_rejected() {
    let reg = Registry::start(RegistryOpts::default());
    let image = three_layers("corrupt").build(ManifestFlavour::Oci);
    reg.push_image("bad", "manifest", &image, &Auth::None);
    let other = three_layers("corrupt-config").build(ManifestFlavour::Oci);
    reg.push_image("bad", "config", &other, &Auth::None);
    corrupt_in_registry(&reg, &image.manifest_digest);
    corrupt_in_registry(&reg, &other.config_digest);
    let cli = Stratafs::new();
    let before = cli.store_snapshot();

    for reference in [
        format!("{}/bad:manifest", reg.addr()),
        format!("{}/bad@{}", reg.addr(), image.manifest_digest),
    ] {
        let err = cli.fail(&["pull", &reference]);
        assert!(err.contains("failed verification"), "{err}");
        assert!(
            err.contains(&image.manifest_digest),
            "names the digest: {err}"
        );
    }
    let err = cli.fail(&["pull", &format!("{}/bad:config", reg.addr())]);
    assert!(
        err.contains("failed verification") && err.contains(&other.config_digest),
        "{err}"
    );
    assert_eq!(
        before,
        cli.store_snapshot(),
        "nothing stored from corrupt content"
    );
}

#[test]
fn basic_auth_with_docker_credentials() {
    let reg = Registry::start(RegistryOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let image = three_layers("basic").build(ManifestFlavour::Oci);
    reg.push_image("private/app", "v1", &image, &Auth::basic("alice", "s3cret"));
    let reference = format!("{}/private/app:v1", reg.addr());

    let cli = Stratafs::new();
    let err = cli.fail(&["pull", &reference]);
    assert!(
        err.contains("unauthorized") && err.contains(&reg.addr()),
        "{err}"
    );
    assert!(err.contains("docker login"), "says how to fix it: {err}");

    cli.set_docker_login(&reg.addr(), "alice", "wrong");
    let err = cli.fail(&["pull", &reference]);
    assert!(
        err.contains("unauthorized") && err.contains("rejected"),
        "{err}"
    );

    cli.set_docker_login(&reg.addr(), "alice", "s3cret");
    let mark = reg.log_mark();
    let json = cli.pull_json(&reference, &[]);
    assert_pulled(&json, &reference, &image.manifest_digest, &image);
    assert_no_layer_requests(&stratafs_requests(&reg, mark), &image);
}

#[test]
fn basic_auth_with_a_containers_auth_file() {
    use base64::Engine;
    let reg = Registry::start(RegistryOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let image = three_layers("authfile").build(ManifestFlavour::Oci);
    reg.push_image("private/app", "v1", &image, &Auth::basic("alice", "s3cret"));
    let reference = format!("{}/private/app:v1", reg.addr());
    let cli = Stratafs::new();
    // podman/skopeo's auth.json, with a repository-scoped key as podman writes them.
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let file = dir.path().join("auth.json");
    std::fs::write(
        &file,
        serde_json::json!({"auths": {format!("{}/private", reg.addr()): {"auth": auth}}})
            .to_string(),
    )
    .unwrap();
    let pull = |env: &[(&str, &std::path::Path)]| {
        let mut cmd = cli.command();
        cmd.args(["pull", &reference]).env_remove("XDG_RUNTIME_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = pull(&[]);
    assert!(!out.status.success(), "no credentials anywhere");
    let out = pull(&[("REGISTRY_AUTH_FILE", &file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same file where podman keeps it for a logged-in user.
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(runtime.join("containers")).unwrap();
    std::fs::copy(&file, runtime.join("containers/auth.json")).unwrap();
    cli.ok(&["rmi", &reference]);
    let out = pull(&[("XDG_RUNTIME_DIR", &runtime)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bearer_token_flow_with_the_registry_token_auth() {
    let tokens = TokenServer::start(TokenServerOpts::default());
    let reg = Registry::start(RegistryOpts {
        token: Some(tokens.auth_config()),
        ..Default::default()
    });
    let image = three_layers("token").build(ManifestFlavour::Oci);
    let push = Auth::Bearer(tokens.push_pull_token("org/app"));
    reg.push_image("org/app", "v1", &image, &push);
    let reference = format!("{}/org/app:v1", reg.addr());
    let cli = Stratafs::new();

    let before = tokens.token_requests();
    let mark = reg.log_mark();
    let json = cli.pull_json(&reference, &[]);
    assert_pulled(&json, &reference, &image.manifest_digest, &image);
    let requests = tokens.requests();
    let ours = &requests[before..];
    assert_eq!(ours.len(), 1, "one token serves the whole pull: {ours:?}");
    assert_eq!(ours[0].scopes, ["repository:org/app:pull"]);
    assert_eq!(ours[0].service.as_deref(), Some("stratafs-test-registry"));
    assert!(ours[0].user.is_none(), "anonymous token request");
    let log = stratafs_requests(&reg, mark);
    assert_eq!(log.iter().filter(|e| e.status == 401).count(), 1, "{log:?}");
    assert_no_layer_requests(&log, &image);

    // A token service that grants nothing: a clear unauthorized error.
    tokens.set_grant(Grant::Nothing);
    let err = cli.fail(&["pull", &reference]);
    assert!(
        err.contains("unauthorized") && err.contains(&reg.addr()),
        "{err}"
    );
}

#[test]
fn a_cold_process_reading_in_parallel_asks_for_one_token() {
    let tokens = TokenServer::start(TokenServerOpts::default());
    let reg = Registry::start(RegistryOpts {
        token: Some(tokens.auth_config()),
        ..Default::default()
    });
    let image = three_layers("token-parallel").build(ManifestFlavour::Oci);
    reg.push_image(
        "org/par",
        "v1",
        &image,
        &Auth::Bearer(tokens.push_pull_token("org/par")),
    );
    let reference = format!("{}/org/par:v1", reg.addr());
    let cli = Stratafs::new();
    cli.ok(&["pull", &reference]);
    // A new process (no token yet) streams the three layers at once, with parallel range
    // requests each: they wait for one token request instead of each making one.
    let before = tokens.token_requests();
    let mark = reg.log_mark();
    cli.ok(&["ls", &reference, "/"]);
    let blob_gets = stratafs_requests(&reg, mark)
        .iter()
        .filter(|e| e.path.contains("/blobs/") && e.status == 206)
        .count();
    assert!(blob_gets >= 3, "{blob_gets} range requests");
    assert_eq!(
        tokens.token_requests() - before,
        1,
        "{:?}",
        &tokens.requests()[before..]
    );
}

#[test]
fn bearer_token_service_with_credentials() {
    let tokens = TokenServer::start(TokenServerOpts {
        credentials: Some(("bob".into(), "pw".into())),
        ..Default::default()
    });
    let reg = Registry::start(RegistryOpts {
        token: Some(tokens.auth_config()),
        ..Default::default()
    });
    let image = three_layers("token-creds").build(ManifestFlavour::Docker);
    reg.push_image(
        "org/app",
        "v1",
        &image,
        &Auth::Bearer(tokens.push_pull_token("org/app")),
    );
    let reference = format!("{}/org/app:v1", reg.addr());
    let cli = Stratafs::new();

    let err = cli.fail(&["pull", &reference]);
    assert!(
        err.contains("unauthorized") && err.contains("anonymous"),
        "{err}"
    );
    cli.set_docker_login(&reg.addr(), "bob", "pw");
    assert_pulled(
        &cli.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );
    let last = tokens.requests().pop().unwrap();
    assert_eq!(last.user.as_deref(), Some("bob"));
}

#[test]
fn mirror_is_tried_first_and_origin_is_the_fallback() {
    let origin = Registry::start(RegistryOpts::default());
    let image = three_layers("mirror").build(ManifestFlavour::Oci);
    origin.push_image("mirrored/app", "v1", &image, &Auth::None);
    let mirror = Registry::start(RegistryOpts {
        proxy_remote: Some(origin.url()),
        ..Default::default()
    });
    let mut cli = Stratafs::new();
    cli.set_config(&format!(
        "[hosts.\"{}\"]\nmirrors = [\"{}\"]\n",
        origin.addr(),
        mirror.url()
    ));
    let reference = format!("{}/mirrored/app:v1", origin.addr());

    let (origin_mark, mirror_mark) = (origin.log_mark(), mirror.log_mark());
    assert_pulled(
        &cli.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );
    let via_mirror = stratafs_requests(&mirror, mirror_mark);
    assert!(
        via_mirror
            .iter()
            .any(|e| e.path == "/v2/mirrored/app/manifests/v1" && e.status == 200),
        "manifest came from the mirror: {via_mirror:?}"
    );
    assert!(
        via_mirror
            .iter()
            .any(|e| e.path.ends_with(&image.config_digest) && e.status == 200),
        "{via_mirror:?}"
    );
    // The image came from the mirror. Only the search for published indexes, which the
    // pull-through cache does not answer, reached the origin.
    let to_origin = stratafs_requests(&origin, origin_mark);
    assert!(
        to_origin
            .iter()
            .all(|e| e.path.contains("/referrers/") || e.path.contains("/manifests/sha256-")),
        "stratafs fetched image content from the origin: {to_origin:?}"
    );
    assert_no_layer_requests(&origin.access_log_since(origin_mark), &image);

    // With the mirror down, the origin answers.
    mirror.stop();
    let origin_mark = origin.log_mark();
    assert_pulled(
        &cli.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );
    assert!(!stratafs_requests(&origin, origin_mark).is_empty());
}

#[test]
fn containerd_hosts_toml_configures_a_pull_through_cache() {
    let origin = Registry::start(RegistryOpts::default());
    let image = three_layers("hoststoml").build(ManifestFlavour::Oci);
    origin.push_image("mirrored/app", "v1", &image, &Auth::None);
    let cache = Registry::start(RegistryOpts {
        proxy_remote: Some(origin.url()),
        ..Default::default()
    });
    // Configured only through containerd's certs.d layout.
    let certs = tempfile::tempdir().unwrap();
    let host_dir = certs.path().join(origin.addr());
    std::fs::create_dir_all(&host_dir).unwrap();
    let write = |capabilities: &str| {
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = {capabilities}\n",
                origin.url(),
                cache.url()
            ),
        )
        .unwrap()
    };
    let config = format!("[registry]\nconfig_path = \"{}\"\n", certs.path().display());
    let reference = format!("{}/mirrored/app:v1", origin.addr());

    write(r#"["pull", "resolve"]"#);
    let mut cli = Stratafs::new();
    cli.set_config(&config);
    let (origin_mark, cache_mark) = (origin.log_mark(), cache.log_mark());
    assert_pulled(
        &cli.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );
    let via_cache = stratafs_requests(&cache, cache_mark);
    assert!(
        via_cache
            .iter()
            .any(|e| e.path == "/v2/mirrored/app/manifests/v1" && e.status == 200),
        "{via_cache:?}"
    );
    let to_origin = stratafs_requests(&origin, origin_mark);
    assert!(to_origin.is_empty(), "{to_origin:?}");

    // A pull-only mirror serves content by digest, but tags are resolved at the origin.
    write(r#"["pull"]"#);
    let mut cli = Stratafs::new();
    cli.set_config(&config);
    let (origin_mark, cache_mark) = (origin.log_mark(), cache.log_mark());
    cli.pull_json(&reference, &[]);
    let to_origin: Vec<String> = stratafs_requests(&origin, origin_mark)
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(to_origin, ["/v2/mirrored/app/manifests/v1"]);
    let via_cache = stratafs_requests(&cache, cache_mark);
    assert!(
        via_cache.iter().all(|e| !e.path.ends_with("/manifests/v1"))
            && via_cache
                .iter()
                .any(|e| e.path.ends_with(&image.config_digest) && e.status == 200),
        "{via_cache:?}"
    );
}

#[test]
fn concurrent_pulls_of_one_reference_both_succeed_and_rmi_collects() {
    let reg = Registry::start(RegistryOpts::default());
    let a = three_layers("a").build(ManifestFlavour::Oci);
    let b = three_layers("b").build(ManifestFlavour::Oci);
    reg.push_image("pair", "a", &a, &Auth::None);
    reg.push_image("pair", "b", &b, &Auth::None);
    let cli = Stratafs::new();
    let ref_a = format!("{}/pair:a", reg.addr());
    let ref_b = format!("{}/pair:b", reg.addr());

    let children: Vec<_> = (0..4)
        .map(|_| {
            cli.command()
                .args(["pull", "--json", &ref_a])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_pulled(&json, &ref_a, &a.manifest_digest, &a);
    }
    cli.ok(&["pull", &ref_b]);
    let root = cli.root();
    let blob = |d: &str| {
        root.join("content/blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    assert!(blob(&a.config_digest).is_file() && blob(&b.config_digest).is_file());
    // The gzip base layer differs (ID=a vs ID=b), so every chain differs too.
    let chains = std::fs::read_dir(root.join("chains")).unwrap().count();
    assert_eq!(chains, 6);

    assert!(cli.ok(&["rmi", &ref_a]).contains(&ref_a));
    assert!(!blob(&a.config_digest).exists() && !blob(&a.manifest_digest).exists());
    assert!(blob(&b.config_digest).is_file(), "b's content kept");
    assert_eq!(std::fs::read_dir(root.join("chains")).unwrap().count(), 3);
    let images: Value = serde_json::from_str(&cli.ok(&["images", "--json"])).unwrap();
    assert_eq!(images[0]["name"], ref_b.as_str());
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
}

#[test]
fn tls_registry_needs_its_ca_or_skip_verify() {
    let origin = Registry::start(RegistryOpts::default());
    let image = three_layers("tls").build(ManifestFlavour::Oci);
    origin.push_image("secure/app", "v1", &image, &Auth::None);
    let certs_dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs_dir.path());
    // A pull-through cache serving HTTPS with a certificate from the test CA.
    let tls = Registry::start(RegistryOpts {
        proxy_remote: Some(origin.url()),
        tls: Some(ca.server.clone()),
        ..Default::default()
    });
    let reference = format!("{}/secure/app:v1", tls.addr());

    // Not trusted: a TLS error naming the registry, and no downgrade to plain HTTP.
    let mut cli = Stratafs::new();
    let err = cli.fail(&["pull", &reference]);
    assert!(
        err.contains("tls error") && err.contains(&tls.addr()),
        "{err}"
    );
    assert!(err.contains("certificate"), "{err}");

    // Trusted through the host's ca_certs.
    cli.set_config(&format!(
        "[hosts.\"{}\"]\nca_certs = [\"{}\"]\n",
        tls.addr(),
        ca.ca_cert.display()
    ));
    let mark = tls.log_mark();
    assert_pulled(
        &cli.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );
    assert!(
        stratafs_requests(&tls, mark)
            .iter()
            .any(|e| e.path == "/v2/secure/app/manifests/v1"),
        "pulled over TLS from the TLS registry"
    );

    // Or accepted blindly with skip_verify.
    let mut blind = Stratafs::new();
    blind.set_config(&format!("[hosts.\"{}\"]\nskip_verify = true\n", tls.addr()));
    assert_pulled(
        &blind.pull_json(&reference, &[]),
        &reference,
        &image.manifest_digest,
        &image,
    );

    // A ca_certs file that does not exist is a clear configuration error.
    let mut broken = Stratafs::new();
    broken.set_config(&format!(
        "[hosts.\"{}\"]\nca_certs = [\"/nonexistent/ca.pem\"]\n",
        tls.addr()
    ));
    let err = broken.fail(&["pull", &reference]);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn http_proxy_from_the_environment_is_used() {
    let reg = Registry::start(RegistryOpts::default());
    let image = three_layers("proxy").build(ManifestFlavour::Oci);
    reg.push_image("proxied/app", "v1", &image, &Auth::None);
    let proxy = ForwardProxy::start();
    let cli = Stratafs::new();
    let reference = format!("{}/proxied/app:v1", reg.addr());
    let out = cli
        .command()
        .env("HTTP_PROXY", proxy.url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .args(["pull", "--plain-http", "--json", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_pulled(&json, &reference, &image.manifest_digest, &image);
    let through = proxy.requests();
    let manifest = format!("GET http://{}/v2/proxied/app/manifests/v1", reg.addr());
    assert!(
        through.contains(&manifest),
        "manifest went through the proxy: {through:?}"
    );
    assert!(
        through.iter().any(|r| r.ends_with(&image.config_digest)),
        "{through:?}"
    );
}

#[test]
fn several_ranges_of_a_blob_come_in_one_request() {
    // The distribution registry answers `multipart/byteranges`: a reader that knows several
    // ranges it needs (the checkpoint windows of a replay) asks once, and gets each right.
    let reg = Registry::start(RegistryOpts::default());
    let blob = bytes(11, 3 << 20);
    let digest = push_blob(&reg.url(), "multi/app", &blob, &Auth::None);
    let reference: stratafs::reference::Reference =
        format!("{}/multi/app:v1", reg.addr()).parse().unwrap();
    let client = stratafs::registry::RegistryClient::new(
        Default::default(),
        std::collections::BTreeMap::new(),
        true,
    );
    // Out of order, one touching another, one inside another: each comes back as asked.
    let ranges = [
        (2_000_000u64, 1_400u64),
        (17, 2_000),
        (2_017, 500),
        (1_000_000, 64 << 10),
        (1_000_100, 10),
        (3_145_000, 728),
    ];
    let mark = reg.log_mark();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt
        .block_on(client.read_blob_ranges(&reference, &digest.parse().unwrap(), &ranges))
        .unwrap();
    for (&(offset, len), data) in ranges.iter().zip(&got) {
        assert!(
            data[..] == blob[offset as usize..(offset + len) as usize],
            "bytes {offset}+{len} differ"
        );
    }
    let gets: Vec<AccessEntry> = reg
        .access_log_since(mark)
        .into_iter()
        .filter(|e| e.method == "GET" && e.path.ends_with(&digest))
        .collect();
    assert_eq!(gets.len(), 1, "one request for the six ranges: {gets:#?}");
}
