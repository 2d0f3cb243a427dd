//! Progress of the passes that take more than a few seconds (training epochs, test and validation
//! passes, sample grids, ...): an indicatif bar where stderr is a terminal, and where it is not (a
//! Slurm log, a pipe) one log line every `--log-every` seconds with how far the pass is, its rate
//! and its message (bits/dim for training), so that a live run can be told from a hung one.
//! Only the process that speaks shows either (rank 0 of a data-parallel run).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

static SHOWN: AtomicBool = AtomicBool::new(true);
static EVERY_NS: AtomicU64 = AtomicU64::new(60_000_000_000);

/// Whether this process shows progress, and how often a line is logged where stderr is not a
/// terminal (zero: never).
pub fn configure(shown: bool, log_every: Duration) {
    SHOWN.store(shown, Ordering::SeqCst);
    EVERY_NS.store(log_every.as_nanos() as u64, Ordering::SeqCst);
}

/// One pass's progress over `total` items.
pub struct Progress {
    bar: ProgressBar,
    lines: Option<Mutex<Lines>>,
}

/// The log lines of a pass where stderr is not a terminal.
struct Lines {
    label: String,
    unit: &'static str,
    total: u64,
    message: String,
    started: Instant,
    last: Instant,
    every: Duration,
}

impl Progress {
    /// `label` names the pass (`epoch 3/15`, `test`), `unit` what is counted (`images`).
    pub fn new(label: &str, total: u64, unit: &'static str) -> Progress {
        let every = Duration::from_nanos(EVERY_NS.load(Ordering::SeqCst));
        let shown = SHOWN.load(Ordering::SeqCst);
        let terminal = std::io::stderr().is_terminal();
        let bar = if shown && terminal {
            let bar = ProgressBar::new(total);
            let template = format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, {{eta}} left, {{msg}}"
            );
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        let now = Instant::now();
        let lines = (shown && !terminal && !every.is_zero()).then(|| {
            Mutex::new(Lines {
                label: label.into(),
                unit,
                total,
                message: String::new(),
                started: now,
                last: now,
                every,
            })
        });
        Progress { bar, lines }
    }

    /// Progress that shows nothing (a pass inside another that shows its own).
    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            lines: None,
        }
    }

    /// `done` items of the total so far, and what to say beside them.
    pub fn update(&self, done: u64, message: Option<String>) {
        self.bar.set_position(done);
        if let Some(m) = &message {
            self.bar.set_message(m.clone());
        }
        if let Some(lines) = &self.lines {
            let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = message {
                l.message = m;
            }
            if l.last.elapsed() >= l.every {
                l.last = Instant::now();
                tracing::info!("{}", l.line(done));
            }
        }
    }

    /// `n` more items done. (A hidden bar keeps its position too: it is the one count.)
    pub fn advance(&self, n: u64) {
        self.update(self.bar.position() + n, None);
    }

    /// Runs `f` (a log line, say) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Clears the bar; the pass is over.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

impl Lines {
    /// The line for `done` items so far.
    fn line(&self, done: u64) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let percent = 100.0 * done as f64 / self.total.max(1) as f64;
        let mut line = format!(
            "{}: {}/{} {} ({percent:.0}%), {:.1} {}/s",
            self.label,
            done,
            self.total,
            self.unit,
            done as f64 / seconds,
            self.unit
        );
        if !self.message.is_empty() {
            line.push_str(", ");
            line.push_str(&self.message);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hidden bar (where nothing is drawn, and where log lines are written) still counts.
    #[test]
    fn advancing_counts_whatever_is_shown() {
        let p = Progress::hidden();
        p.advance(3);
        p.advance(2);
        assert_eq!(p.bar.position(), 5);
        p.update(7, Some("x".into()));
        p.advance(1);
        assert_eq!(p.bar.position(), 8);
    }

    /// A line says the pass, how far, the rate and the message.
    #[test]
    fn a_line_says_how_far_and_how_fast() {
        let now = Instant::now();
        let l = Lines {
            label: "epoch 2/5".into(),
            unit: "images",
            total: 200,
            message: "1.234 bits/dim".into(),
            started: now - Duration::from_secs(10),
            last: now,
            every: Duration::from_secs(60),
        };
        let line = l.line(50);
        assert!(
            line.starts_with("epoch 2/5: 50/200 images (25%), 5.0 images/s, 1.234 bits/dim"),
            "{line}"
        );
    }
}
