//! The `stratafs` command line's grammar: every command and argument with its help text
//! (clap). The binary parses its arguments with [`Cli`] and prints what the library returns.
//! The library builds command lines of its own — the serving daemon `mount` starts
//! ([`crate::daemon::control`]) and the mount daemons the snapshotter starts
//! ([`crate::snapshotter::daemons`]) — and its tests parse those with this grammar, so the two
//! cannot drift apart.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::daemon::control::MountRequest;
use crate::image::Platform;
use crate::store::DEFAULT_ROOT;

#[derive(Parser)]
#[command(name = "stratafs", version, about = "Lazy container-image filesystem")]
pub struct Cli {
    /// Store directory.
    #[arg(long, global = true, env = "STRATAFS_ROOT", default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Configuration file (registry hosts, mirrors, TLS, timeouts).
    #[arg(long, global = true, env = "STRATAFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "STRATAFS_LOG", default_value = "warn")]
    pub log_level: String,
    /// No progress bars or summaries on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Resolve an image and store its manifests and config (no layer data is downloaded).
    Pull {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print one JSON object instead of text (shape in docs/cli.md).
        #[arg(long)]
        json: bool,
        /// Image reference, e.g. docker.io/library/alpine:3.20.
        reference: String,
    },
    /// List pulled images (`images` or `images ls`).
    Images {
        /// `ls` (the same as no argument).
        #[arg(value_parser = ["ls"], hide = true)]
        ls: Option<String>,
        /// Print a JSON array of images, each in the shape `pull --json` prints (docs/cli.md).
        #[arg(long, conflicts_with = "quiet")]
        json: bool,
        /// Print only the image names, one per line.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a pulled image's record, manifest and config as JSON.
    Inspect {
        /// Image reference, or the (unique prefix of the) digest of its manifest or index.
        reference: String,
    },
    /// Remove pulled images and the metadata no other image uses.
    Rmi {
        /// Image references (or unique digest prefixes); a mounted image is refused.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// List a directory of an image (pulling its metadata if needed).
    Ls {
        /// Long listing: mode, links, owner, size, time, link target.
        #[arg(short, long)]
        long: bool,
        #[command(flatten)]
        image: ImageArgs,
        /// Directory or file in the image (default /).
        #[arg(default_value = "/")]
        path: String,
    },
    /// Print files of an image, fetching only the bytes they need.
    Cat {
        #[command(flatten)]
        image: ImageArgs,
        /// Files in the image, printed one after another.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Mount an image read-only at a directory; only the bytes read are fetched.
    Mount(MountArgs),
    /// Unmount an image mounted with `stratafs mount` and stop its daemon.
    Umount {
        /// Detach even while busy (processes keep what they have open).
        #[arg(long)]
        lazy: bool,
        /// Directory the image is mounted at.
        mountpoint: PathBuf,
    },
    /// Replace the process serving each mount with one started from the stratafs binary now
    /// installed (at the path the mount was started from); the mounts keep serving throughout.
    Upgrade {
        /// Mountpoints to upgrade (default: every mount of this store).
        mountpoints: Vec<PathBuf>,
    },
    /// Serve containerd's snapshots service (a proxy snapshotter) on a unix socket.
    Snapshotter {
        /// Socket to listen on.
        #[arg(long, default_value = "/run/stratafs/snapshotter.sock")]
        address: PathBuf,
        /// Platform and plain HTTP for the images pulled for lazy layers.
        #[command(flatten)]
        registry: RegistryArgs,
        /// Serve Prometheus metrics (`stratafs_*`, the snapshotter's and all its lazy mounts')
        /// at this address, e.g. 127.0.0.1:9111.
        #[arg(long, value_name = "ADDR")]
        metrics_address: Option<String>,
    },
    /// Layer indexes.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Startup profiles: what a workload reads first, recorded by mounts and replayed (in
    /// parallel, ahead of the reads) by the next cold mount.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// The chunk cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// `stratafs mount`'s arguments.
#[derive(clap::Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Serve from this process instead of a background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Report readiness on stdout (used when starting the daemon).
    #[arg(long, hide = true)]
    pub notify: bool,
    /// Mount only the chain with this ChainID: that layer and the ones below it.
    #[arg(long)]
    pub chain: Option<String>,
    /// Mount options, comma-separated: allow_other, suid, dev, noexec, read_timeout=SECS,
    /// nopassthrough, threads=N; also root=DIR, config=FILE, platform=P, plain_http.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Serve Prometheus metrics (`stratafs_*`) at this address, e.g. 127.0.0.1:9110.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,
    /// Image reference, e.g. docker.io/library/python:3.12.
    pub reference: String,
    /// Directory to mount the image at (must exist).
    pub mountpoint: PathBuf,
}

impl MountArgs {
    /// Moves the global settings among the `-o` options (root=, config=, platform=,
    /// plain_http, as `mount -t fuse.stratafs` passes them) into `root`, `config` and these.
    pub fn take_global_options(&mut self, root: &mut PathBuf, config: &mut Option<PathBuf>) {
        let (platform, plain_http) = (&mut self.registry.platform, &mut self.registry.plain_http);
        crate::daemon::control::take_global_options(
            &mut self.options,
            root,
            config,
            platform,
            plain_http,
        );
    }

    /// The mount these arguments ask for, of the store `root` with the configuration file
    /// `config` and the log filter `log_level` (passed on to the daemon).
    pub fn into_request(self, root: &Path, config: Option<&Path>, log_level: &str) -> MountRequest {
        MountRequest {
            root: root.to_path_buf(),
            config: config.map(Path::to_path_buf),
            log_level: log_level.to_string(),
            chain: self.chain,
            platform: self.registry.platform,
            plain_http: self.registry.plain_http,
            foreground: self.foreground,
            notify: self.notify,
            options: self.options,
            metrics_address: self.metrics_address,
            reference: self.reference,
            mountpoint: self.mountpoint,
        }
    }
}

#[derive(clap::Args)]
pub struct RegistryArgs {
    /// Platform os/arch[/variant] (default: this machine's).
    #[arg(long)]
    pub platform: Option<String>,
    /// Use plain HTTP for the registry (else only loopback registries fall back to it).
    #[arg(long)]
    pub plain_http: bool,
}

impl RegistryArgs {
    /// The platform given, if any (commands that resolve an image then use this machine's).
    pub fn platform(&self) -> Result<Option<Platform>, crate::image::PlatformError> {
        self.platform.as_deref().map(Platform::parse).transpose()
    }
}

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Image reference, e.g. docker.io/library/alpine:3.20 (pulled if not stored).
    pub reference: String,
}

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Stream each layer once to build its index (and fill the cache).
    Build {
        /// Print a JSON array, one object per layer (docs/cli.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Check the indexes the image is served with (published, eStargz TOC or stored) against
    /// its layers, streamed once; a mismatching index is replaced.
    Verify {
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Publish the image's layer indexes to its registry. With --bind (recommended): push the
    /// image again with its manifest pinning each index by digest, so pulling it trusts them.
    /// Without: as a referrer of its manifest, used only by stores that opt in to unbound
    /// referrers.
    Push {
        /// Pin the indexes in a new manifest of the image (pushed under --tag, or the
        /// reference's own tag).
        #[arg(long)]
        bind: bool,
        /// Tag for the bound image (default: the reference's tag).
        #[arg(long, requires = "bind")]
        tag: Option<String>,
        #[command(flatten)]
        image: ImageArgs,
    },
}

#[derive(Subcommand)]
pub enum ProfileCommand {
    /// The profile recorded here for an image's rootfs: its ranges and bytes.
    Show {
        /// Print the profile itself (JSON, docs/formats.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Publish the recorded profile bound to the image: push the image again with its
    /// manifest pinning the profile by digest, so cold mounts of it replay the profile, and
    /// the indexes of its gzip layers with single-block spans where the profile reads (its
    /// replay then fetches only those blocks; each layer is streamed once to build them), and
    /// the pack: the spans the replay fetches, compressed again with zstd in one blob, which
    /// a cold mount fetches instead of their ranges of the layers.
    Push {
        /// Tag for the bound image (default: the reference's tag).
        #[arg(long)]
        tag: Option<String>,
        /// Leave the layers' indexes as the image pins them (publish the profile only).
        #[arg(long)]
        keep_indexes: bool,
        /// Publish no pack: a cold mount fetches the profile's spans from the layers.
        #[arg(long)]
        no_pack: bool,
        #[command(flatten)]
        image: ImageArgs,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Chunks and bytes cached, layer indexes kept.
    Stats {
        /// Print one JSON object (docs/cli.md); with --watch, one per line.
        #[arg(long)]
        json: bool,
        /// Report again every SECS seconds (default 2), with each layer's fetch rate, until
        /// interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Remove least recently used chunks down to a size (`--max-size 1G`), or all (`--all`).
    Prune {
        /// Keep at most this much (bytes, or K/M/G/T).
        #[arg(long, value_name = "SIZE", required_unless_present = "all")]
        max_size: Option<String>,
        /// Remove every cached chunk.
        #[arg(long, conflicts_with = "max_size")]
        all: bool,
    },
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::daemon::control::MountRequest;

    fn parse(args: Vec<std::ffi::OsString>) -> Cli {
        let argv = std::iter::once("stratafs".into()).chain(args);
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("the grammar rejects it: {e}"))
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// What `stratafs mount` starts as its serving daemon parses as the same mount.
    #[test]
    fn the_daemon_command_line_parses_as_the_mount_asked_for() {
        let req = MountRequest {
            root: "/ignored".into(),
            config: None,
            log_level: "info".into(),
            chain: Some("sha256:abc".into()),
            platform: Some("linux/arm64".into()),
            plain_http: true,
            foreground: false,
            notify: false,
            options: vec!["allow_other".into(), "read_timeout=5".into()],
            metrics_address: Some("127.0.0.1:9110".into()),
            reference: "localhost:5000/app:1".into(),
            mountpoint: "relative".into(),
        };
        let args = crate::daemon::control::daemon_args(
            &req,
            Path::new("/var/lib/s"),
            Some(Path::new("/etc/s.toml")),
            Path::new("/mnt/a b"),
        );
        let cli = parse(args);
        assert_eq!(cli.root, Path::new("/var/lib/s"));
        assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/s.toml")));
        assert_eq!(cli.log_level, "info");
        let Command::Mount(m) = cli.command else {
            panic!("not a mount");
        };
        assert!(m.foreground && m.notify && m.registry.plain_http);
        let req = m.into_request(&cli.root, cli.config.as_deref(), &cli.log_level);
        assert_eq!(req.platform.as_deref(), Some("linux/arm64"));
        assert_eq!(req.chain.as_deref(), Some("sha256:abc"));
        assert_eq!(req.options, ["allow_other,read_timeout=5"]);
        assert_eq!(req.metrics_address.as_deref(), Some("127.0.0.1:9110"));
        assert_eq!(req.reference, "localhost:5000/app:1");
        assert_eq!(req.mountpoint, Path::new("/mnt/a b"));
    }

    /// What the snapshotter starts for a lazy layer parses as a detached mount of that chain.
    #[test]
    fn the_snapshotter_mount_command_line_parses() {
        let mounter = crate::snapshotter::daemons::DaemonMounter {
            root: "/var/lib/s".into(),
            config: None,
            log_level: "warn".into(),
            plain_http: false,
            metrics: true,
        };
        let cli = parse(mounter.mount_args("r/app:1", "sha256:c", Path::new("/snap/1/fs")));
        let Command::Mount(m) = cli.command else {
            panic!("not a mount");
        };
        assert!(!m.foreground, "the snapshotter's mounts run as daemons");
        assert_eq!(m.chain.as_deref(), Some("sha256:c"));
        assert_eq!(m.options, [crate::snapshotter::daemons::LAZY_MOUNT_OPTIONS]);
        assert_eq!(m.metrics_address.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(m.mountpoint, Path::new("/snap/1/fs"));
    }
}
