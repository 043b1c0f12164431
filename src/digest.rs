//! Content digests: computing and verifying `algorithm:hex` digests of byte strings.
//!
//! Every byte stratafs takes from a registry or from its own store is checked here against the
//! digest that names it. The digest type itself is `oci_spec::image::Digest`; this module adds
//! hashing for the algorithms the OCI image spec registers (sha256, sha512).

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::{Digest as _, Sha256, Sha512};

/// Why a digest could not be parsed or did not match.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: {1}")]
    Invalid(String, String),
    #[error("unsupported digest algorithm {0} in {1}")]
    Unsupported(String, Digest),
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
}

/// Parses a digest string such as `sha256:4f…` (validating length and hex).
pub fn parse(s: &str) -> Result<Digest, DigestError> {
    s.parse::<Digest>()
        .map_err(|e| DigestError::Invalid(s.to_string(), e.to_string()))
}

/// The sha256 digest of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    from_hex("sha256", &hex::encode(Sha256::digest(data)))
}

/// The digest of `data` computed with the algorithm of `like`.
pub fn compute_like(like: &Digest, data: &[u8]) -> Result<Digest, DigestError> {
    match like.algorithm() {
        DigestAlgorithm::Sha256 => Ok(sha256(data)),
        DigestAlgorithm::Sha512 => Ok(from_hex("sha512", &hex::encode(Sha512::digest(data)))),
        other => Err(DigestError::Unsupported(other.to_string(), like.clone())),
    }
}

/// Checks that `data` hashes to `expected`.
pub fn verify(expected: &Digest, data: &[u8]) -> Result<(), DigestError> {
    let actual = compute_like(expected, data)?;
    if &actual == expected {
        Ok(())
    } else {
        Err(DigestError::Mismatch {
            expected: expected.clone(),
            actual,
        })
    }
}

/// Builds a digest from an algorithm name and a lowercase hex string produced by a hasher.
pub(crate) fn from_hex(algorithm: &str, hex: &str) -> Digest {
    format!("{algorithm}:{hex}")
        .parse()
        .expect("hasher output is a valid digest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_string() {
        assert_eq!(
            sha256(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn verify_detects_mismatch_and_accepts_match() {
        let d = sha256(b"hello");
        assert!(verify(&d, b"hello").is_ok());
        assert!(matches!(
            verify(&d, b"hellp"),
            Err(DigestError::Mismatch { .. })
        ));
    }

    #[test]
    fn sha512_is_supported() {
        let d = parse(&format!("sha512:{}", hex::encode(Sha512::digest(b"x")))).unwrap();
        assert!(verify(&d, b"x").is_ok());
        assert!(verify(&d, b"y").is_err());
    }

    #[test]
    fn malformed_digests_are_rejected() {
        for bad in ["", "sha256", "sha256:abc", "sha256:ZZ", "md5"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
