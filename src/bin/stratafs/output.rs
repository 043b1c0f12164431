//! What the commands show besides their results: progress bars and summaries on stderr
//! (`--quiet` turns them off). The reports themselves render in [`stratafs::report`].

use std::io::IsTerminal;
use std::sync::Arc;

use stratafs::report::human_size;

/// `--quiet`: no progress bars or summaries on stderr.
pub static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Progress of an operation that fetches layer data: on a terminal a bar of the compressed
/// bytes fetched (refreshed from a byte counter); when it took a second or more, a one-line
/// summary, on a terminal or not. Nothing with `--quiet`.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    /// Compressed bytes fetched so far by the operation.
    fetched: Arc<dyn Fn() -> u64 + Send + Sync>,
    started: std::time::Instant,
    what: String,
}

impl Progress {
    /// Progress of `what` (up to `total` bytes) as `fetched` tells it, shown when
    /// [`update`](Self::update) is called.
    pub fn new(what: &str, total: u64, fetched: Arc<dyn Fn() -> u64 + Send + Sync>) -> Progress {
        let quiet = QUIET.load(std::sync::atomic::Ordering::Relaxed);
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        Progress {
            bar,
            ticker: None,
            fetched,
            started: std::time::Instant::now(),
            what: what.to_string(),
        }
    }

    /// Refreshes the bar from the counter every 100 ms (on a terminal) until it finishes.
    pub fn ticking(mut self) -> Progress {
        self.ticker = self.bar.as_ref().map(|bar| {
            let (bar, fetched) = (bar.clone(), self.fetched.clone());
            tokio::spawn(async move {
                loop {
                    bar.set_position(fetched());
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            })
        });
        self
    }

    /// Shows the current count.
    pub fn update(&self) {
        if let Some(bar) = &self.bar {
            bar.set_position((self.fetched)());
        }
    }

    /// Ends the display; `detail` completes the summary line.
    pub fn finish(self, detail: &str) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let elapsed = self.started.elapsed();
        if QUIET.load(std::sync::atomic::Ordering::Relaxed) || elapsed.as_secs_f64() < 1.0 {
            return;
        }
        let fetched = (self.fetched)();
        eprintln!(
            "{}: {detail}{}{} fetched in {:.1} s",
            self.what,
            if detail.is_empty() { "" } else { "; " },
            human_size(fetched),
            elapsed.as_secs_f64()
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A summary line on stderr, unless `--quiet`.
pub fn note(line: &str) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{line}");
    }
}

/// A spinner on stderr for steps without a byte count (`pull`), when it is a terminal.
pub fn spinner() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(s)
}
