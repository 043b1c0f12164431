//! Commands that read image contents lazily: `ls`, `cat`, `index build`, `cache stats|prune`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use stratafs::fs::ImageView;
use stratafs::image::{ImageRecord, Platform};
use stratafs::status::LayerStatus;
use stratafs::tree::FileType;

pub use stratafs::context::Context;

use crate::output::{human_size, print_table, Progress};

/// The image a command is about (`ImageArgs`), with the context that reaches it.
pub struct Target {
    pub ctx: Context,
    pub reference: String,
    pub platform: Option<Platform>,
}

impl Target {
    /// The image record (pulled if not stored).
    async fn image(&self) -> Result<ImageRecord> {
        let platform = self.platform.as_ref();
        Ok(self.ctx.image(&self.reference, platform).await?)
    }

    /// The merged view of the image, every layer indexed, with progress on stderr.
    async fn view(&self) -> Result<ImageView> {
        let image = self.image().await?;
        let progress = self.progress(&format!("opening {}", image.name), image.layers_size());
        let view = ImageView::open(&self.ctx.layers, &image).await?;
        progress.finish(&format!("{} layers indexed", image.layers.len()));
        Ok(view)
    }

    /// Starts showing the progress of `what`, which may fetch up to `total` compressed bytes
    /// (counted by this process's registry byte counters, refreshed every 100 ms).
    fn progress(&self, what: &str, total: u64) -> Progress {
        let meter = self.ctx.layers.fetch_meter();
        let start_bytes = meter.total();
        let fetched = Arc::new(move || meter.total().saturating_sub(start_bytes));
        Progress::new(what, total, fetched).ticking()
    }
}

pub async fn ls(t: &Target, path: &str, long: bool) -> Result<()> {
    let view = t.view().await?;
    let id = view.lookup(path)?;
    let node = view.tree.node(id);
    let entries: Vec<(String, usize)> = if node.file_type == FileType::Dir {
        node.children.iter().map(|(n, c)| (n.clone(), *c)).collect()
    } else {
        vec![(node.name.clone(), id)]
    };
    let mut out = std::io::stdout().lock();
    for (name, child) in entries {
        let n = view.tree.node(child);
        if !long {
            writeln!(out, "{name}")?;
            continue;
        }
        let (kind, size) = match &n.file_type {
            FileType::File => ('-', n.size.to_string()),
            FileType::Dir => ('d', n.size.to_string()),
            FileType::Symlink(_) => ('l', n.size.to_string()),
            FileType::Char(ma, mi) => ('c', format!("{ma}, {mi}")),
            FileType::Block(ma, mi) => ('b', format!("{ma}, {mi}")),
            FileType::Fifo => ('p', "0".into()),
        };
        let when = chrono::DateTime::from_timestamp(n.mtime, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M");
        let target = match &n.file_type {
            FileType::Symlink(t) => format!(" -> {t}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{kind}{} {:>3} {:>5} {:>5} {:>10} {when} {name}{target}",
            stratafs::tree::mode_string(n.mode),
            n.nlink,
            n.uid,
            n.gid,
            size
        )?;
    }
    Ok(())
}

pub async fn cat(t: &Target, paths: &[String]) -> Result<()> {
    let view = Arc::new(t.view().await?);
    match stratafs::fs::cat(&view, paths, &mut std::io::stdout().lock()).await {
        // Kept an io::Error, so a reader that went away (`| head`) is seen as such.
        Err(stratafs::fs::CatError::Output(e)) => Err(e.into()),
        r => Ok(r?),
    }
}

pub async fn index_build(t: &Target, json: bool) -> Result<()> {
    let image = t.image().await?;
    let progress = t.progress(&format!("indexing {}", image.name), image.layers_size());
    let mut reports = Vec::new();
    for layer in &image.layers {
        let (_, report) = t.ctx.layers.index(&image, layer).await?;
        if !json {
            println!(
                "{}  {:>6} entries  {:>5} spans  {:>4} checkpoints  {:>10} -> {:>10} bytes  {}",
                report.blob,
                report.entries,
                report.spans,
                report.checkpoints,
                report.blob_size,
                report.size,
                if report.built {
                    format!(
                        "built in {:.2}s ({:.0} MB/s compressed)",
                        report.seconds,
                        report.blob_size as f64 / report.seconds.max(1e-9) / 1e6
                    )
                } else {
                    "already indexed".into()
                }
            );
        }
        reports.push(serde_json::json!({
            "digest": report.blob, "built": report.built, "entries": report.entries,
            "spans": report.spans, "checkpoints": report.checkpoints,
            "blob_size": report.blob_size, "size": report.size, "seconds": report.seconds,
        }));
    }
    progress.finish(&format!("{} layers", image.layers.len()));
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}

pub async fn index_verify(t: &Target) -> Result<()> {
    let image = t.image().await?;
    for layer in &image.layers {
        let r = t.ctx.layers.verify(&image, layer).await?;
        println!(
            "{}  {:?} index matches the layer: {} entries, {} files ({} bytes) compared",
            r.blob, r.format, r.entries, r.files, r.bytes
        );
    }
    Ok(())
}

/// Publishes the image's layer indexes: bound to the image (`bind`: a new manifest pinning
/// them, pushed under `tag` or the reference's own tag) or as an unbound referrer.
pub async fn index_push(t: &Target, bind: bool, tag: Option<&str>) -> Result<()> {
    let image = t.image().await?;
    let progress = t.progress(&format!("indexing {}", image.name), image.layers_size());
    let indexes = t.ctx.layers.publishable(&image).await?;
    progress.finish(&format!("{} indexes to publish", indexes.len()));
    if !bind {
        let digest = stratafs::publish::push_indexes(&t.ctx.client, &image, &indexes).await?;
        println!(
            "pushed indexes of {} layers as {digest} (referrer of {}; used only by stores with [index] unbound_referrers = true — prefer --bind)",
            indexes.len(),
            image.manifest.digest
        );
        return Ok(());
    }
    let (parsed, tag) = stratafs::publish::bound_tag(&image, tag)?;
    let digest =
        stratafs::publish::bind_indexes(&t.ctx.client, &t.ctx.store, &image, &indexes, &tag)
            .await?;
    println!(
        "pushed {}:{tag} as {digest}: {} with the indexes of {} layers pinned by its manifest",
        parsed.name(),
        image.name,
        indexes.len()
    );
    Ok(())
}

pub async fn profile_show(t: &Target, json: bool) -> Result<()> {
    let (image, p) = recorded_profile(t).await?;
    if json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        println!(
            "{}: profile of {} ranges, {} of layer data, in the order first read",
            image.name,
            p.ranges.len(),
            human_size(p.bytes())
        );
    }
    Ok(())
}

async fn recorded_profile(t: &Target) -> Result<(ImageRecord, stratafs::profile::Profile)> {
    let image = t.image().await?;
    let profile = stratafs::profile::ProfileStore::new(t.ctx.store.root()).recorded(&image)?;
    Ok((image, profile))
}

pub async fn profile_push(t: &Target, tag: Option<&str>) -> Result<()> {
    let (image, profile) = recorded_profile(t).await?;
    let (parsed, tag) = stratafs::publish::bound_tag(&image, tag)?;
    let digest =
        stratafs::publish::bind_profile(&t.ctx.client, &t.ctx.store, &image, &profile, &tag)
            .await?;
    println!(
        "pushed {}:{tag} as {digest}: {} with its profile ({} ranges, {}) pinned by its manifest",
        parsed.name(),
        image.name,
        profile.ranges.len(),
        human_size(profile.bytes())
    );
    Ok(())
}

/// `cache stats`: one report, or (`watch`) a report every so many seconds with each layer's
/// fetch rate since the previous one, until interrupted.
pub fn cache_stats(ctx: &Context, json: bool, watch: Option<f64>) -> Result<()> {
    let Some(every) = watch else {
        let rows = stratafs::status::layers(&ctx.store, ctx.chunks.as_ref())?;
        return print_stats(ctx, json, &rows, None, false);
    };
    let every = Duration::from_secs_f64(every.max(0.1));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut previous: Option<(Instant, Vec<LayerStatus>)> = None;
    loop {
        let now = Instant::now();
        let layers = stratafs::status::layers(&ctx.store, ctx.chunks.as_ref())?;
        let rates = previous.as_ref().map(|(then, before)| {
            let seconds = now.duration_since(*then).as_secs_f64();
            stratafs::status::fetch_rates(before, &layers, seconds)
        });
        if terminal {
            print!("\x1b[H\x1b[2J"); // home, clear
        } else if previous.is_some() && !json {
            println!();
        }
        print_stats(ctx, json, &layers, rates.as_ref(), true)?;
        previous = Some((now, layers));
        std::thread::sleep(every);
    }
}

/// One report of `cache stats`; `rates` (bytes/s per layer) from the second report of a
/// watch on.
fn print_stats(
    ctx: &Context,
    json: bool,
    rows: &[LayerStatus],
    rates: Option<&std::collections::BTreeMap<String, f64>>,
    watching: bool,
) -> Result<()> {
    let (chunks, bytes) = ctx.chunks.usage()?;
    let mounts = stratafs::daemon::mounts(ctx.store.root());
    if json {
        let mounts: Vec<_> = mounts
            .iter()
            .map(|m| serde_json::json!({"mountpoint": m.mountpoint, "image": m.image, "pid": m.pid, "holder": m.holder, "layers": m.layers}))
            .collect();
        let out = serde_json::json!({
            "chunks": chunks, "bytes": bytes, "max_size": ctx.cache_cap, "layers": rows,
            "mounts": mounts,
        });
        if watching {
            println!("{}", serde_json::to_string(&out)?); // one line per report
        } else {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        return Ok(());
    }
    let human = human_size;
    println!(
        "cache: {chunks} chunks, {} (cap {})",
        human(bytes),
        human(ctx.cache_cap)
    );
    let rate = |digest: &str| {
        rates
            .and_then(|r| r.get(digest))
            .map(|r| format!("{}/s", human(*r as u64)))
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let state = match (r.indexed, r.complete) {
                (false, _) => "not indexed",
                (_, true) => "complete",
                _ => "partial",
            };
            let mut row = vec![
                r.digest.clone(),
                format!("{}/{}", r.cached_spans, r.spans),
                human(r.cached_bytes),
                human(r.size),
                human(r.fetched_bytes),
            ];
            if rates.is_some() {
                row.push(rate(&r.digest).unwrap_or_default());
            }
            row.push(state.to_string());
            row
        })
        .collect();
    let (header, right): (&[&str], &[usize]) = if rates.is_some() {
        (
            &[
                "LAYER", "SPANS", "CACHED", "SIZE", "FETCHED", "RATE", "STATE",
            ],
            &[1, 2, 3, 4, 5],
        )
    } else {
        (
            &["LAYER", "SPANS", "CACHED", "SIZE", "FETCHED", "STATE"],
            &[1, 2, 3, 4],
        )
    };
    print_table(header, &table, right);
    for m in mounts {
        // A daemon with a metrics endpoint also tells what it is fetching right now.
        let in_flight = stratafs::status::fetches_in_flight(&m)
            .map(|n| format!(", {n} fetches in flight"))
            .unwrap_or_default();
        println!(
            "\nmounted at {}: {} (serving pid {}{in_flight})",
            m.mountpoint.display(),
            m.image,
            m.pid
        );
        for layer in &m.layers {
            let Some(r) = rows.iter().find(|r| r.digest == *layer) else {
                continue;
            };
            let speed = rate(layer).map(|r| format!(", {r}")).unwrap_or_default();
            println!(
                "  {layer}  fetched {} of {} compressed{speed}; {} of {} cached",
                human(r.fetched_bytes),
                human(r.blob_size),
                human(r.cached_bytes),
                human(r.size)
            );
        }
    }
    Ok(())
}

pub fn cache_prune(ctx: &Context, max_size: u64) -> Result<()> {
    // Per-layer files of layers no image has (indexes, counters, copies) go too.
    ctx.store.collect_garbage()?;
    let (removed, freed) = ctx.chunks.prune(max_size)?;
    println!("removed {removed} chunks, freed {freed} bytes");
    Ok(())
}
