//! `stratafs mount`, `umount` and `upgrade`: the library's [`stratafs::daemon::control`] with
//! progress and results on the terminal.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use stratafs::context::Context;
use stratafs::daemon::control::{self, Event, MountRequest, Mounted, Unmounted};

use crate::output::Progress;

pub async fn mount(
    req: MountRequest,
    settings: &stratafs::config::MountSettings,
    ctx: impl FnOnce() -> Result<Context, stratafs::context::ContextError>,
) -> Result<()> {
    let fetched = Arc::new(AtomicU64::new(0));
    let mut progress: Option<Progress> = None;
    let mut on_event = |event: Event<'_>| match event {
        Event::Progress {
            fetched: now,
            total,
        } => {
            fetched.store(now, Ordering::Relaxed);
            let counter = fetched.clone();
            let what = format!("mounting {}", req.reference);
            let count = Arc::new(move || counter.load(Ordering::Relaxed));
            progress
                .get_or_insert_with(|| Progress::new(&what, total, count))
                .update();
        }
        Event::DetachedDead(at) => eprintln!(
            "{}: its daemon is gone (transport endpoint is not connected); detached it",
            at.display()
        ),
    };
    match control::mount(&req, settings, ctx, &mut on_event).await? {
        Mounted::Daemon {
            message,
            holder,
            log,
        } => {
            if let Some(p) = progress.take() {
                p.finish("");
            }
            println!("{message} (holder pid {holder}, log {})", log.display());
        }
        Mounted::Held(code) if code != 0 => std::process::exit(code),
        Mounted::Held(_) | Mounted::Served => {}
    }
    Ok(())
}

pub fn umount(root: &Path, mountpoint: &Path, lazy: bool) -> Result<()> {
    let at = control::absolute(mountpoint)?;
    control::umount(root, &at, lazy, &mut |how| match how {
        Unmounted::Detached => println!(
            "{}: detached a dead mount (its daemon was gone)",
            at.display()
        ),
        Unmounted::Unmounted => println!("unmounted {}", at.display()),
    })?;
    Ok(())
}

pub fn upgrade(root: &Path, mountpoints: &[PathBuf]) -> Result<()> {
    let n = control::upgrade(root, mountpoints, &mut |u| {
        let at = u.mountpoint.display();
        println!("{at}: served by pid {} ({}), was {}", u.pid, u.exe, u.was);
    })?;
    if n == 0 {
        println!("no mounts to upgrade");
    }
    Ok(())
}
