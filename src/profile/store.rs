//! The profiles kept on disk, `<root>/profiles/<alg>-<chain hex>.json`: one per image rootfs
//! (its top ChainID), written atomically, merged into (the ranges of a later recording or of a
//! replayed pinned profile appended where not yet covered), bounded on read and write by
//! [`MAX_PROFILE_BYTES`].

use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use super::{pack, Profile, ProfileError, ProfileRange, MAX_PROFILE_BYTES, PROFILE_VERSION};

/// The profiles under `<root>/profiles/`, one per image rootfs (top ChainID).
#[derive(Clone, Debug)]
pub struct ProfileStore {
    dir: PathBuf,
}

impl ProfileStore {
    pub fn new(root: &Path) -> ProfileStore {
        ProfileStore {
            dir: crate::store::Layout::new(root).profiles(),
        }
    }

    /// The file of the rootfs named by ChainID `chain`.
    pub fn path(&self, chain: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.json", chain.algorithm(), chain.digest()))
    }

    /// The stored profile of `chain`, if any. A damaged file is reported, not used.
    pub fn get(&self, chain: &Digest) -> Result<Option<Profile>, ProfileError> {
        let path = self.path(chain);
        match std::fs::read(&path) {
            Ok(bytes) => Profile::parse(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }

    /// The profile recorded here for `image`'s rootfs; an error saying how to record one when
    /// there is none.
    pub fn recorded(&self, image: &crate::image::ImageRecord) -> Result<Profile, ProfileError> {
        let chain = image
            .chain_id()
            .ok_or_else(|| ProfileError::NoLayers(image.name.clone()))?;
        self.get(chain)?
            .ok_or_else(|| ProfileError::NotRecorded(image.name.clone()))
    }

    /// Stores `profile` as `chain`'s (atomically).
    pub fn put(&self, chain: &Digest, profile: &Profile) -> Result<(), ProfileError> {
        let path = self.path(chain);
        std::fs::create_dir_all(&self.dir).map_err(|e| ProfileError::Io {
            path: self.dir.clone(),
            source: e,
        })?;
        let mut bytes = serde_json::to_vec(profile).expect("a profile serializes");
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            // Keep what was read first, within the bound every reader enforces.
            let mut kept = profile.clone();
            while bytes.len() as u64 > MAX_PROFILE_BYTES && !kept.ranges.is_empty() {
                kept.ranges.truncate(kept.ranges.len() * 9 / 10);
                bytes = serde_json::to_vec(&kept).expect("a profile serializes");
            }
        }
        crate::store::write_atomic(&self.dir, &path, &bytes)
            .map_err(|source| ProfileError::Store { path, source })
    }

    /// Merges `ranges` into `chain`'s profile (a damaged stored one is replaced; one that
    /// cannot be read is left alone, with the error); returns it.
    pub fn merge_in(
        &self,
        chain: &Digest,
        ranges: &[ProfileRange],
    ) -> Result<Profile, ProfileError> {
        self.merge(chain, ranges, None)
    }

    /// Merges the profile an image pins, `pinned`, into `chain`'s: its ranges, and with
    /// `with_pack` its pack (which then names the stored profile's); returns it.
    pub fn keep_pinned(
        &self,
        chain: &Digest,
        pinned: &Profile,
        with_pack: bool,
    ) -> Result<Profile, ProfileError> {
        let pack = pinned.pack.as_ref().filter(|_| with_pack);
        self.merge(chain, &pinned.ranges, pack)
    }

    fn merge(
        &self,
        chain: &Digest,
        ranges: &[ProfileRange],
        pack: Option<&pack::Pack>,
    ) -> Result<Profile, ProfileError> {
        // One read-merge-write at a time in this process (a mount's recorder and the keeping of
        // its pinned profile may merge into the same file at once).
        static MERGING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = MERGING.lock().unwrap_or_else(|e| e.into_inner());
        let mut profile = match self.get(chain) {
            Ok(Some(p)) => p,
            Ok(None) => Profile {
                version: PROFILE_VERSION,
                ranges: Vec::new(),
                pack: None,
            },
            Err(e @ ProfileError::Invalid { .. }) => {
                tracing::warn!(error = %e, "replacing a damaged profile");
                Profile {
                    version: PROFILE_VERSION,
                    ranges: Vec::new(),
                    pack: None,
                }
            }
            Err(e) => return Err(e),
        };
        profile.merge(ranges);
        if let Some(pack) = pack {
            profile.pack = Some(pack.clone());
        }
        self.put(chain, &profile)?;
        Ok(profile)
    }
}
