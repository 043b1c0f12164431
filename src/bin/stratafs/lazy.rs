//! Commands that read image contents lazily: `ls`, `cat`, `index build`, `cache stats|prune`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use stratafs::fs::ImageView;
use stratafs::image::{ImageRecord, Platform};
use stratafs::report::{self, human_size};
use stratafs::status::CacheReport;
use stratafs::tree::FileType;

pub use stratafs::context::Context;

use crate::output::Progress;

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
        let platform = self.platform.as_ref();
        let image = self.ctx.image_to_open(&self.reference, platform).await?;
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
        let node = view.tree.node(child);
        match long {
            true => writeln!(out, "{}", report::LongLine { name: &name, node })?,
            false => writeln!(out, "{name}")?,
        }
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
            println!("{report}");
        }
        reports.push(report);
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
        println!("{}", t.ctx.layers.verify(&image, layer).await?);
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

/// Publishes the recorded profile bound to the image and, unless `keep_indexes`, the indexes
/// of its gzip layers again with single-block spans where the profile reads (each layer
/// streamed once to build them); with `pack`, its pack too.
pub async fn profile_push(
    t: &Target,
    tag: Option<&str>,
    keep_indexes: bool,
    pack: bool,
) -> Result<()> {
    let (image, mut profile) = recorded_profile(t).await?;
    let (parsed, tag) = stratafs::publish::bound_tag(&image, tag)?;
    let mut indexes = Vec::new();
    if !keep_indexes {
        let shaped: Vec<_> = image
            .layers
            .iter()
            .map(|l| (l, profile.ranges_of(&l.digest)))
            .filter(|(_, fine)| !fine.is_empty())
            .collect();
        let size = shaped.iter().map(|(l, _)| l.size).sum();
        let progress = t.progress(&format!("indexing {} for its profile", image.name), size);
        for (layer, fine) in shaped {
            if let Some(published) = t.ctx.layers.shaped_for_profile(&image, layer, fine).await? {
                indexes.push(published);
            }
        }
        progress.finish(&format!("{} indexes shaped to the profile", indexes.len()));
    }
    let mut packed = None;
    profile.pack = None;
    if pack {
        let spinner = crate::output::spinner();
        if let Some(s) = &spinner {
            s.set_message(format!("packing the spans of {}'s profile", image.name));
        }
        let built =
            stratafs::profile::pack::pack_for(&t.ctx.layers, &image, &profile, &indexes).await?;
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        if let Some((blob, p)) = built {
            crate::output::note(&format!(
                "packed the profile's spans: {} in {} frames",
                human_size(p.size),
                p.frames.len()
            ));
            profile.pack = Some(p);
            packed = Some(blob);
        }
    }
    let digest = stratafs::publish::bind_profile(
        &t.ctx.client,
        &t.ctx.store,
        &image,
        &profile,
        &indexes,
        packed.as_deref(),
        &tag,
    )
    .await?;
    let reindexed = match indexes.len() {
        0 => String::new(),
        n => format!(" and the indexes of {n} layers with spans shaped to it"),
    };
    let pack = match &profile.pack {
        Some(p) => format!(", its pack ({})", human_size(p.size)),
        None => String::new(),
    };
    println!(
        "pushed {}:{tag} as {digest}: {} with its profile ({} ranges, {}){pack}{reindexed} pinned by its manifest",
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
        let report = CacheReport::collect(ctx, !json)?;
        match json {
            true => println!("{}", serde_json::to_string_pretty(&report)?),
            false => print!("{report}"),
        }
        return Ok(());
    };
    let every = Duration::from_secs_f64(every.max(0.1));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut previous: Option<(Instant, CacheReport)> = None;
    loop {
        let now = Instant::now();
        let mut report = CacheReport::collect(ctx, !json)?;
        if let Some((then, before)) = &previous {
            report = report.with_rates_since(before, now.duration_since(*then).as_secs_f64());
        }
        if json {
            println!("{}", serde_json::to_string(&report)?); // one line per report
        } else if terminal {
            print!("\x1b[H\x1b[2J{report}"); // home, clear
        } else {
            let gap = if previous.is_some() { "\n" } else { "" };
            print!("{gap}{report}");
        }
        previous = Some((now, report));
        std::thread::sleep(every);
    }
}

pub fn cache_prune(ctx: &Context, max_size: u64) -> Result<()> {
    // Per-layer files of layers no image has (indexes, counters, copies) go too.
    ctx.store.collect_garbage()?;
    let (removed, freed) = ctx.chunks.prune(max_size)?;
    println!("removed {removed} chunks, freed {freed} bytes");
    Ok(())
}
