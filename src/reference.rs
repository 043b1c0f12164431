//! Image references: parsing and normalising names the way Docker and containerd do.
//!
//! First stage of the pipeline: a user's string (`alpine`, `host:5000/ns/app:v1`,
//! `repo@sha256:…`) becomes a [`Reference`] with an explicit registry, repository, tag and/or
//! digest. Nothing here touches the network.
//!
//! Rules: the first path component is a registry host when it contains `.` or `:` or is
//! `localhost`; otherwise the registry is `docker.io`, and a single-component name gets the
//! `library/` namespace. `index.docker.io` is written `docker.io`. With neither tag nor digest the
//! tag is `latest`. A reference with both keeps both; the digest decides what is pulled.

use std::fmt;

use oci_spec::image::Digest;

/// The registry Docker Hub images live on, as written in normalised names.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// An error in an image reference; the message names the reference.
#[derive(Debug, thiserror::Error)]
#[error("invalid reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

/// A fully qualified image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let fail = |reason: &str| ReferenceError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(fail("empty reference"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail("contains whitespace or control characters"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                let digest = crate::digest::parse(d).map_err(|e| fail(&e.to_string()))?;
                (n, Some(digest))
            }
            None => (input, None),
        };
        // A ':' after the last '/' starts the tag (a ':' before it belongs to host:port).
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].find(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|r| fail(&r))?;
        }
        let (registry, repository) = split_registry(name);
        let registry = validate_registry(registry).map_err(|r| fail(&r))?;
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        validate_repository(&repository).map_err(|r| fail(&r))?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(fail("name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry as written in the name (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host:port that serves the registry API for this name.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn validate_registry(registry: &str) -> Result<String, String> {
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB
    } else {
        registry
    };
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry {registry:?}: unclosed '['"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {registry:?}: invalid IPv6 address"));
        }
        (h, after.strip_prefix(':'))
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    let host_ok = !host.is_empty()
        && (registry.starts_with('[')
            || host.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }));
    if !host_ok {
        return Err(format!("registry host {host:?} is not a valid host name"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("registry port {p:?} is not a valid port"));
        }
    }
    Ok(registry.to_string())
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".to_string());
    }
    for component in repository.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "path component {component:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), String> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "tag {tag:?} must be 1-128 of [A-Za-z0-9_.-] not starting with '.' or '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.19"), "docker.io/library/alpine:3.19");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/alpine");
    }

    #[test]
    fn hosts_with_ports_and_paths() {
        let r = Reference::parse("127.0.0.1:5000/ns/sub/app:v1.2").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "ns/sub/app");
        assert_eq!(r.tag(), Some("v1.2"));
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(norm("ghcr.io/o/r"), "ghcr.io/o/r:latest");
        assert_eq!(norm("[::1]:5000/app:x"), "[::1]:5000/app:x");
    }

    #[test]
    fn digests_with_and_without_tags() {
        let r = Reference::parse(&format!("repo@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/repo@{D}"));
        let r = Reference::parse(&format!("h.io:443/repo:t@{D}")).unwrap();
        assert_eq!(r.tag(), Some("t"));
        assert_eq!(r.manifest_reference(), D, "digest wins over tag");
        assert_eq!(r.to_string(), format!("h.io:443/repo:t@{D}"));
    }

    #[test]
    fn invalid_references_are_rejected_with_reasons() {
        let cases = [
            ("", "empty"),
            ("Alpine", "lowercase"),
            ("alpine:", "tag"),
            ("alpine:-x", "tag"),
            ("alpine@sha256:abc", "digest"),
            ("a//b", "path component"),
            ("a/b_", "path component"),
            ("a/.b", "path component"),
            ("host:99999/a", "port"),
            ("host:0/a", "port"),
            ("with space", "whitespace"),
            ("bad_host.io/a", "host"),
            (&format!("a:{}", "t".repeat(129)), "tag"),
            (&format!("h.io/{}", "a".repeat(260)), "255"),
        ];
        for (input, want) in cases {
            let err = Reference::parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err}");
            assert!(
                err.contains(&format!("{input:?}")),
                "names the input: {err}"
            );
        }
    }

    #[test]
    fn separators_in_path_components() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1/b2"] {
            assert!(Reference::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["a..b", "a___b", "a-.b", "-a"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
