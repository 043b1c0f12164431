//! The `stratafs` command line. Parses arguments, loads the config, and calls the library.

mod lazy;
mod mount;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use stratafs::config::{Config, DEFAULT_CONFIG};
use stratafs::image::{ImageRecord, Platform};
use stratafs::reference::Reference;
use stratafs::store::{Store, DEFAULT_ROOT};

#[derive(Parser)]
#[command(name = "stratafs", version, about = "Lazy container-image filesystem")]
struct Cli {
    /// Store directory.
    #[arg(long, global = true, env = "STRATAFS_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Configuration file (registry hosts, mirrors, TLS, timeouts).
    #[arg(long, global = true, env = "STRATAFS_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "STRATAFS_LOG", default_value = "warn")]
    log_level: String,
    /// No progress bars or summaries on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve an image and store its manifests and config (no layer data is downloaded).
    Pull {
        /// Platform os/arch[/variant] (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Use plain HTTP for the registry.
        #[arg(long)]
        plain_http: bool,
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
    Mount {
        /// Platform os/arch[/variant] (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Use plain HTTP for the registry.
        #[arg(long)]
        plain_http: bool,
        /// Serve from this process instead of a background daemon.
        #[arg(long)]
        foreground: bool,
        /// Report readiness on stdout (used when starting the daemon).
        #[arg(long, hide = true)]
        notify: bool,
        /// Mount only the chain with this ChainID: that layer and the ones below it.
        #[arg(long)]
        chain: Option<String>,
        /// Mount options, comma-separated: allow_other, suid, dev, noexec, read_timeout=SECS,
        /// nopassthrough, threads=N; also root=DIR, config=FILE, platform=P, plain_http.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Serve Prometheus metrics (`stratafs_*`) at this address, e.g. 127.0.0.1:9110.
        #[arg(long, value_name = "ADDR")]
        metrics_address: Option<String>,
        /// Image reference, e.g. docker.io/library/python:3.12.
        reference: String,
        /// Directory to mount the image at (must exist).
        mountpoint: PathBuf,
    },
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
        /// Platform of the images pulled for lazy layers (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Use plain HTTP for registries (else: loopback registries fall back to it).
        #[arg(long)]
        plain_http: bool,
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

#[derive(clap::Args)]
struct ImageArgs {
    /// Platform os/arch[/variant] (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Use plain HTTP for the registry.
    #[arg(long)]
    plain_http: bool,
    /// Image reference, e.g. docker.io/library/alpine:3.20 (pulled if not stored).
    reference: String,
}

impl ImageArgs {
    /// The image these arguments name, with a context for its registry.
    fn target(self, store: Store, config: &Config) -> Result<lazy::Target> {
        Ok(lazy::Target {
            ctx: lazy::Context::new(store, config, self.plain_http)?,
            platform: platform(&self.platform)?,
            reference: self.reference,
        })
    }
}

#[derive(Subcommand)]
enum IndexCommand {
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
enum ProfileCommand {
    /// The profile recorded here for an image's rootfs: its ranges and bytes.
    Show {
        /// Print the profile itself (JSON, docs/formats.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Publish the recorded profile bound to the image: push the image again with its
    /// manifest pinning the profile by digest, so cold mounts of it replay the profile.
    Push {
        /// Tag for the bound image (default: the reference's tag).
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        image: ImageArgs,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
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

/// The platform given on the command line, if any (commands that resolve an image then use
/// this machine's).
fn platform(p: &Option<String>) -> Result<Option<Platform>> {
    Ok(match p {
        Some(p) => Some(Platform::parse(p)?),
        None => None,
    })
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    output::QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    if !matches!(
        cli.command,
        Command::Mount { .. } | Command::Snapshotter { .. }
    ) {
        // As coreutils do: when the reader of our output goes away (`stratafs images | head`),
        // end quietly on SIGPIPE instead of failing (or panicking) on the next write. The
        // daemons keep ignoring it. Sockets are written with MSG_NOSIGNAL, so only our output
        // pipe can raise it.
        // SAFETY: setting a signal disposition to its default installs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(cli).await {
        let broken_pipe = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            // The reader of our output went away (`stratafs ls … | head`): not an error.
            std::process::exit(0);
        }
        eprintln!("stratafs: error: {}", message(&e));
        std::process::exit(1);
    }
}

async fn run(mut cli: Cli) -> Result<()> {
    if let Command::Mount {
        options,
        platform,
        plain_http,
        ..
    } = &mut cli.command
    {
        stratafs::daemon::control::take_global_options(
            options,
            &mut cli.root,
            &mut cli.config,
            platform,
            plain_http,
        );
    }
    let config = match &cli.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(DEFAULT_CONFIG.as_ref(), false)?,
    }
    .with_hosts_dir()?;
    let store =
        Store::open(&cli.root).with_context(|| format!("opening store {}", cli.root.display()))?;
    match cli.command {
        Command::Pull {
            platform,
            plain_http,
            json,
            reference,
        } => {
            let reference: Reference = reference.parse()?;
            let platform = self::platform(&platform)?.unwrap_or_else(Platform::host);
            let ctx = lazy::Context::new(store, &config, plain_http)?;
            let spinner = output::spinner();
            let started = Instant::now();
            let record = stratafs::pull::pull(
                ctx.client.as_ref(),
                &ctx.store,
                &reference,
                &platform,
                &|msg| {
                    if let Some(s) = &spinner {
                        s.set_message(msg.to_string());
                    }
                },
            )
            .await;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let record = record?;
            let published = ctx.fetch_published(&record).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&record.summary())?);
            } else {
                print_pull(&record);
                let pinned = record
                    .layers
                    .iter()
                    .filter(|l| l.annotations.contains_key(stratafs::fs::INDEX_ANNOTATION))
                    .count();
                if pinned > 0 {
                    println!(
                        "  stratafs indexes pinned by the manifest for {pinned} of {} layers (fetched on first read)",
                        record.layers.len()
                    );
                }
                if published > 0 {
                    println!(
                        "  unbound referrer indexes adopted for {published} of {} layers (not vouched for by the image)",
                        record.layers.len()
                    );
                }
                eprintln!(
                    "metadata fetched in {} HTTP requests, {} ms; no layer data downloaded",
                    ctx.client.requests_sent(),
                    started.elapsed().as_millis()
                );
            }
        }
        Command::Images { ls: _, json, quiet } => {
            let images = store.images.list()?;
            if json {
                let all: Vec<_> = images.iter().map(ImageRecord::summary).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if quiet {
                for i in images {
                    println!("{}", i.name);
                }
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            short(i.target.digest.as_ref()),
                            i.platform.to_string(),
                            output::human_size(i.layers_size()),
                            i.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        ]
                    })
                    .collect();
                output::print_table(
                    &["NAME", "DIGEST", "PLATFORM", "SIZE", "UPDATED"],
                    &rows,
                    &[3],
                );
            }
        }
        Command::Inspect { reference } => {
            let record = store.find_image(&reference)?;
            let manifest: serde_json::Value =
                serde_json::from_slice(&store.content.get(&record.manifest.digest)?)?;
            let image_config: serde_json::Value =
                serde_json::from_slice(&store.content.get(&record.config.digest)?)?;
            let out = serde_json::json!({
                "record": record,
                "manifest": manifest,
                "config": image_config,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Rmi { references } => {
            // Every reference is checked before anything is removed.
            let mounts = stratafs::daemon::mounts(store.root());
            let mut names = Vec::new();
            for reference in &references {
                let name = store.find_image(reference)?.name;
                if let Some(m) = mounts.iter().find(|m| m.image == name) {
                    anyhow::bail!(
                        "{name} is mounted at {} (serving pid {}): unmount it first (stratafs umount {})",
                        m.mountpoint.display(),
                        m.pid,
                        m.mountpoint.display()
                    );
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            for name in names {
                store.remove_image(&name)?;
                println!("removed {name}");
            }
        }
        Command::Ls { long, image, path } => {
            lazy::ls(&image.target(store, &config)?, &path, long).await?
        }
        Command::Cat { image, paths } => lazy::cat(&image.target(store, &config)?, &paths).await?,
        Command::Mount {
            platform,
            plain_http,
            foreground,
            notify,
            chain,
            options,
            metrics_address,
            reference,
            mountpoint,
        } => {
            let req = stratafs::daemon::control::MountRequest {
                root: cli.root.clone(),
                config: cli.config.clone(),
                log_level: cli.log_level.clone(),
                chain,
                platform,
                plain_http,
                foreground,
                notify,
                options,
                metrics_address,
                reference,
                mountpoint,
            };
            let mut config = config.clone();
            stratafs::daemon::control::bound_retries(&mut config, &req.options);
            let ctx = || lazy::Context::new(store, &config, plain_http);
            mount::mount(req, &config.mount, ctx).await?;
        }
        Command::Snapshotter {
            address,
            platform,
            plain_http,
            metrics_address,
        } => {
            let ctx = lazy::Context::new(store, &config, plain_http)?;
            let args = stratafs::snapshotter::daemons::SnapshotterArgs {
                address,
                platform,
                plain_http,
                metrics_address,
            };
            stratafs::snapshotter::daemons::run(ctx, cli.config.as_deref(), &cli.log_level, args)
                .await?;
        }
        Command::Umount { lazy, mountpoint } => {
            mount::umount(&cli.root, &mountpoint, lazy)?;
        }
        Command::Upgrade { mountpoints } => {
            mount::upgrade(&cli.root, &mountpoints)?;
        }
        Command::Index(IndexCommand::Verify { image }) => {
            lazy::index_verify(&image.target(store, &config)?).await?
        }
        Command::Index(IndexCommand::Push { bind, tag, image }) => {
            lazy::index_push(&image.target(store, &config)?, bind, tag.as_deref()).await?
        }
        Command::Index(IndexCommand::Build { json, image }) => {
            lazy::index_build(&image.target(store, &config)?, json).await?
        }
        Command::Profile(ProfileCommand::Show { json, image }) => {
            lazy::profile_show(&image.target(store, &config)?, json).await?
        }
        Command::Profile(ProfileCommand::Push { tag, image }) => {
            lazy::profile_push(&image.target(store, &config)?, tag.as_deref()).await?
        }
        Command::Cache(CacheCommand::Stats { json, watch }) => {
            lazy::cache_stats(&lazy::Context::new(store, &config, false)?, json, watch)?;
        }
        Command::Cache(CacheCommand::Prune { max_size, all: _ }) => {
            // clap requires one of the two: no size means --all.
            let max = match max_size {
                Some(s) => stratafs::config::parse_size(&s).map_err(anyhow::Error::msg)?,
                None => 0,
            };
            lazy::cache_prune(&lazy::Context::new(store, &config, false)?, max)?;
        }
    }
    Ok(())
}

/// An error and its causes on one line, each cause once: a cause whose text its context
/// already shows ("reading X: Permission denied" caused by "Permission denied") is not repeated.
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn print_pull(r: &ImageRecord) {
    println!("{}", r.name);
    println!("  digest:   {}", r.target.digest);
    if r.manifest.digest != r.target.digest {
        println!("  manifest: {}", r.manifest.digest);
    }
    println!("  platform: {}", r.platform);
    println!("  config:   {}", r.config.digest);
    println!(
        "  layers:   {} ({} compressed)",
        r.layers.len(),
        output::human_size(r.layers_size())
    );
    for (i, l) in r.layers.iter().enumerate() {
        println!(
            "    {:>2}  {}  {:>10}",
            i + 1,
            l.digest,
            output::human_size(l.size)
        );
        println!("        chain {}", l.chain_id);
    }
}

fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}
