//! The `stratafs` command line. Parses arguments, loads the config, and calls the library.

mod lazy;
mod mount;
mod output;

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use stratafs::cli::{CacheCommand, Cli, Command, ImageArgs, IndexCommand, ProfileCommand};
use stratafs::config::{Config, DEFAULT_CONFIG};
use stratafs::daemon::control;
use stratafs::image::{ImageRecord, Platform};
use stratafs::reference::Reference;
use stratafs::report;
use stratafs::store::Store;

/// The image `args` name, with a context for its registry.
fn target(args: ImageArgs, store: Store, config: &Config) -> Result<lazy::Target> {
    Ok(lazy::Target {
        ctx: lazy::Context::new(store, config, args.registry.plain_http)?,
        platform: args.registry.platform()?,
        reference: args.reference,
    })
}

#[tokio::main]
async fn main() {
    // Two malloc arenas, not glibc's eight per core: the daemons decode on many threads (the
    // tokio workers and blocking pool), and an arena each left memory they had freed counted
    // in their peak (cold start, zstd:chunked: VmHWM 60.0–67.8 MiB with the default arenas,
    // 57.4–59.5 MiB with two; no slower, docs/benchmarks.md).
    // SAFETY: mallopt only changes a glibc tunable; called before this process allocates much.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
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
    if let Command::Mount(args) = &mut cli.command {
        args.take_global_options(&mut cli.root, &mut cli.config);
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
            registry,
            json,
            reference,
        } => {
            let reference: Reference = reference.parse()?;
            let platform = registry.platform()?.unwrap_or_else(Platform::host);
            let ctx = lazy::Context::new(store, &config, registry.plain_http)?;
            let spinner = output::spinner();
            let started = Instant::now();
            let on_step = |msg: &str| {
                if let Some(s) = &spinner {
                    s.set_message(msg.to_string());
                }
            };
            let pulled = stratafs::pull::pull(
                ctx.client.as_ref(),
                &ctx.store,
                &reference,
                &platform,
                &on_step,
            )
            .await;
            if let Some(s) = &spinner {
                s.finish_and_clear();
            }
            let image = pulled?;
            let adopted = ctx.fetch_published(&image).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&image.summary())?);
            } else {
                print!(
                    "{}",
                    report::Pulled {
                        image: &image,
                        adopted
                    }
                );
                let (requests, ms) = (ctx.client.requests_sent(), started.elapsed().as_millis());
                output::note(&format!("metadata fetched in {requests} HTTP requests, {ms} ms; no layer data downloaded"));
            }
        }
        Command::Images { ls: _, json, quiet } => {
            let images = store.images.list()?;
            if json {
                let all: Vec<_> = images.iter().map(ImageRecord::summary).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if quiet {
                images.iter().for_each(|i| println!("{}", i.name));
            } else {
                print!("{}", report::images(&images));
            }
        }
        Command::Inspect { reference } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&store.inspect(&reference)?)?
            )
        }
        Command::Rmi { references } => {
            // Not println!: a closed stdout must not stop the removals half-way.
            stratafs::daemon::remove_images(&store, &references, |name| {
                let _ = writeln!(std::io::stdout(), "removed {name}");
            })?
        }
        Command::Ls { long, image, path } => {
            lazy::ls(&target(image, store, &config)?, &path, long).await?
        }
        Command::Cat { image, paths } => lazy::cat(&target(image, store, &config)?, &paths).await?,
        Command::Mount(args) => {
            let req = args.into_request(&cli.root, cli.config.as_deref(), &cli.log_level);
            let plain_http = req.plain_http;
            let mut config = config.clone();
            control::bound_retries(&mut config, &req.options);
            let ctx = || lazy::Context::new(store, &config, plain_http);
            mount::mount(req, &config.mount, ctx).await?;
        }
        Command::Snapshotter {
            address,
            registry,
            metrics_address,
        } => {
            let ctx = lazy::Context::new(store, &config, registry.plain_http)?;
            let args = stratafs::snapshotter::daemons::SnapshotterArgs {
                address,
                platform: registry.platform,
                plain_http: registry.plain_http,
                metrics_address,
            };
            stratafs::snapshotter::daemons::run(ctx, cli.config.as_deref(), &cli.log_level, args)
                .await?;
        }
        Command::Umount { lazy, mountpoint } => mount::umount(&cli.root, &mountpoint, lazy)?,
        Command::Upgrade { mountpoints } => mount::upgrade(&cli.root, &mountpoints)?,
        Command::Index(IndexCommand::Verify { image }) => {
            lazy::index_verify(&target(image, store, &config)?).await?
        }
        Command::Index(IndexCommand::Push { bind, tag, image }) => {
            lazy::index_push(&target(image, store, &config)?, bind, tag.as_deref()).await?
        }
        Command::Index(IndexCommand::Build { json, image }) => {
            lazy::index_build(&target(image, store, &config)?, json).await?
        }
        Command::Profile(ProfileCommand::Show { json, image }) => {
            lazy::profile_show(&target(image, store, &config)?, json).await?
        }
        Command::Profile(ProfileCommand::Push {
            tag,
            keep_indexes,
            no_pack,
            image,
        }) => {
            lazy::profile_push(
                &target(image, store, &config)?,
                tag.as_deref(),
                keep_indexes,
                !no_pack,
            )
            .await?
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
