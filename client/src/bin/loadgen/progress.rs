//! The progress display on stderr: a bar on a terminal, else a line a second.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::cli::{ProgressMode, TestMode};
use crate::plan::{Plan, Stop};
use units::Timestamp;

/// Counters the progress display reads.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) published: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) done: AtomicBool,
}

pub(crate) fn start_progress(
    plan: &Plan,
    progress: &Arc<Progress>,
) -> Option<thread::JoinHandle<()>> {
    let mode = match plan.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Lines,
        other => other,
    };
    if mode == ProgressMode::None {
        return None;
    }
    let (progress, plan) = (progress.clone(), plan.clone());
    thread::Builder::new()
        .name("progress".into())
        .spawn(move || show_progress(&plan, &progress, mode))
        .ok()
}

fn progress_line(plan: &Plan, progress: &Progress, elapsed: Duration) -> String {
    let published = progress.published.load(Ordering::Relaxed);
    let acked = progress.acked.load(Ordering::Relaxed);
    let received = progress.received.load(Ordering::Relaxed);
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let counted = if plan.publishes() {
        published
    } else {
        received
    };
    let mb_per_s = counted as f64 * plan.message_bytes as f64 / 1e6 / seconds;
    let mut line = format!("{:>6.1} s", elapsed.as_secs_f64());
    if plan.publishes() {
        let _ = write!(line, "  published {published}  acked {acked}");
    }
    if plan.test == TestMode::EndToEnd || plan.test == TestMode::Subscribe {
        let _ = write!(line, "  received {received}");
    }
    let _ = write!(line, "  {mb_per_s:.1} MB/s");
    line
}

fn show_progress(plan: &Plan, progress: &Progress, mode: ProgressMode) {
    let started = Timestamp::now();
    let bar = (mode == ProgressMode::Bar).then(|| {
        let (length, unit) = match plan.stop {
            Stop::TotalBytes(bytes) => (bytes.div_ceil(plan.message_bytes as u64), "msgs"),
            Stop::Duration(duration) => (duration.as_secs().max(1), "s"),
        };
        let bar = indicatif::ProgressBar::new(length);
        if let Ok(style) = indicatif::ProgressStyle::default_bar()
            .template(&format!("{{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}"))
        {
            bar.set_style(style);
        }
        bar
    });
    let mut last_line = Timestamp::now();
    while !progress.done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        let elapsed = Timestamp::now().saturating_duration_since(started);
        match &bar {
            Some(bar) => {
                let position = match plan.stop {
                    Stop::TotalBytes(_) if plan.publishes() => {
                        progress.published.load(Ordering::Relaxed)
                    }
                    Stop::TotalBytes(_) => progress.received.load(Ordering::Relaxed),
                    Stop::Duration(_) => elapsed.as_secs(),
                };
                bar.set_position(position);
                bar.set_message(progress_line(plan, progress, elapsed));
            }
            None if Timestamp::now().saturating_duration_since(last_line)
                >= Duration::from_secs(1) =>
            {
                last_line = Timestamp::now();
                eprintln!("{}", progress_line(plan, progress, elapsed));
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
