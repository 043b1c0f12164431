//! The mount table: what is mounted where (/proc/self/mountinfo) and whether a mount answers.

use std::path::Path;

/// The state of a path as a mountpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum MountState {
    /// Not a stratafs mount.
    None,
    /// A stratafs mount that answers.
    Live,
    /// A FUSE mount whose daemon is gone ("transport endpoint is not connected").
    Dead,
}

/// One mount of this process's mount namespace, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    pub mountpoint: std::path::PathBuf,
    /// Per-mount options (`ro,nosuid,nodev,relatime`).
    pub options: Vec<String>,
    /// `fuse.stratafs`, `overlay`, …
    pub fstype: String,
    /// What was mounted (for stratafs: the image reference).
    pub source: String,
    /// Superblock options (`rw,user_id=0,group_id=0,default_permissions,allow_other`).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether `option` is among the per-mount or superblock options.
    pub fn has(&self, option: &str) -> bool {
        self.options
            .iter()
            .chain(&self.super_options)
            .any(|o| o == option)
    }
}

/// Every mount in /proc/self/mountinfo, in mount order (escapes undone).
pub fn mount_entries() -> Vec<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let dash = fields.iter().position(|f| *f == "-")?;
    let list = |f: Option<&&str>| -> Vec<String> {
        f.map(|o| o.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    };
    Some(MountEntry {
        dev: fields.get(2)?.to_string(),
        mountpoint: unescape(fields.get(4)?).into(),
        options: list(fields.get(5)),
        fstype: unescape(fields.get(dash + 1)?),
        source: unescape(fields.get(dash + 2)?),
        super_options: list(fields.get(dash + 3)),
    })
}

/// Looks `mountpoint` up in /proc/self/mountinfo and probes it.
pub fn mount_state(mountpoint: &Path) -> MountState {
    let mounted = mount_entries()
        .iter()
        .any(|m| m.mountpoint == mountpoint && m.fstype.starts_with("fuse"));
    if !mounted {
        return MountState::None;
    }
    // Opening the directory asks the daemon (attributes may be cached by the kernel).
    match std::fs::read_dir(mountpoint) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTCONN) => MountState::Dead,
        _ => MountState::Live,
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        let line = "36 35 0:42 / /mnt/my\\040app rw,nosuid - fuse.stratafs 127.0.0.1:5000/app:v1 rw,user_id=0";
        assert_eq!(
            parse_mountinfo_line(line),
            Some(MountEntry {
                dev: "0:42".into(),
                mountpoint: "/mnt/my app".into(),
                options: vec!["rw".into(), "nosuid".into()],
                fstype: "fuse.stratafs".into(),
                source: "127.0.0.1:5000/app:v1".into(),
                super_options: vec!["rw".into(), "user_id=0".into()],
            })
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }
}
