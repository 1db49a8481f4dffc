//! Counters of what the agent did, and their display: a live line on a terminal (bytes done,
//! rate, ETA per phase), a log line every ten seconds otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Default)]
pub struct Counters {
    /// Data blocks fetched from the server (and verified).
    pub fetched_blocks: AtomicU64,
    /// Bytes received from the server (frames included).
    pub received_bytes: AtomicU64,
    /// Bytes written to the disk from fetched blocks.
    pub written_bytes: AtomicU64,
    /// Bytes made to read as zeroes (discarded, zeroed out or written as zeroes).
    pub zeroed_bytes: AtomicU64,
    /// Bytes found already right on the disk (differential mode).
    pub unchanged_bytes: AtomicU64,
    /// Bytes read from the disk to compare (differential mode).
    pub scanned_bytes: AtomicU64,
    /// Bytes read back and checked after the flush (`--verify`).
    pub verified_bytes: AtomicU64,
    /// Requests retried after a network/server failure or a corrupt answer.
    pub retries: AtomicU64,
    /// Bytes uploaded to the server (a capture's block frames).
    pub sent_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Totals {
    pub fetched_blocks: u64,
    pub received_bytes: u64,
    pub written_bytes: u64,
    pub zeroed_bytes: u64,
    pub unchanged_bytes: u64,
    pub scanned_bytes: u64,
    pub verified_bytes: u64,
    pub retries: u64,
    pub sent_bytes: u64,
}

impl Counters {
    pub fn totals(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            fetched_blocks: get(&self.fetched_blocks),
            received_bytes: get(&self.received_bytes),
            written_bytes: get(&self.written_bytes),
            zeroed_bytes: get(&self.zeroed_bytes),
            unchanged_bytes: get(&self.unchanged_bytes),
            scanned_bytes: get(&self.scanned_bytes),
            verified_bytes: get(&self.verified_bytes),
            retries: get(&self.retries),
            sent_bytes: get(&self.sent_bytes),
        }
    }
}

/// Where a write or capture is: its disk (index among the task's disks), its phase and the
/// phase's bytes done of total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub disk: usize,
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
    /// Seconds left in the phase at its rate so far (none before any progress).
    pub eta_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Reading,
    Writing,
    Verifying,
    /// A capture sending the blocks the server lacks.
    Uploading,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    total: u64,
    /// The phase counter's value when the phase began.
    base: u64,
    since: Instant,
    disk: usize,
}

/// The live display; its ticker stops when this is dropped.
#[derive(Debug)]
pub struct Progress {
    counters: Arc<Counters>,
    state: Arc<Mutex<State>>,
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts the display; every tick also goes to `watch` when given (the deployment
    /// reporter sends it on to the server).
    pub fn start(
        counters: Arc<Counters>,
        watch: Option<tokio::sync::watch::Sender<Snapshot>>,
    ) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let state = Arc::new(Mutex::new(State {
            phase: Phase::Writing,
            total: 0,
            base: 0,
            since: Instant::now(),
            disk: 0,
        }));
        let interactive = !bar.is_hidden();
        let ticker = {
            let (counters, state, bar) = (counters.clone(), state.clone(), bar.clone());
            tokio::spawn(async move {
                let mut last_log = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let Ok(s) = state.lock() else { return };
                    let done = phase_counter(&counters, s.phase).saturating_sub(s.base);
                    bar.set_position(done);
                    if let Some(w) = &watch {
                        let secs = s.since.elapsed().as_secs_f64();
                        let eta_secs = (done > 0 && secs > 0.0).then(|| {
                            (s.total.saturating_sub(done) as f64 * secs / done as f64).ceil() as u64
                        });
                        w.send_replace(Snapshot {
                            disk: s.disk,
                            phase: phase_name(s.phase),
                            done,
                            total: s.total,
                            eta_secs,
                        });
                    }
                    if !interactive && last_log.elapsed() >= Duration::from_secs(10) {
                        last_log = Instant::now();
                        let secs = s.since.elapsed().as_secs_f64().max(0.001);
                        let t = counters.totals();
                        tracing::info!(
                            "{}: {} of {} MiB ({:.0} MiB/s); written {} MiB, zeroed {} MiB, unchanged {} MiB, fetched {} blocks",
                            phase_name(s.phase),
                            done >> 20,
                            s.total >> 20,
                            done as f64 / secs / 1048576.0,
                            t.written_bytes >> 20,
                            t.zeroed_bytes >> 20,
                            t.unchanged_bytes >> 20,
                            t.fetched_blocks
                        );
                    }
                }
            })
        };
        Progress {
            counters,
            state,
            bar,
            ticker,
        }
    }

    /// Starts a phase of `total` bytes on disk `disk` of the task.
    pub fn phase_of(&self, disk: usize, phase: Phase, total: u64) {
        if let Ok(mut s) = self.state.lock() {
            *s = State {
                phase,
                total,
                base: phase_counter(&self.counters, phase),
                since: Instant::now(),
                disk,
            };
        }
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_message(phase_name(phase));
    }

    /// Starts a phase of `total` bytes on the same disk.
    pub fn phase(&self, phase: Phase, total: u64) {
        let disk = self.state.lock().map(|s| s.disk).unwrap_or(0);
        self.phase_of(disk, phase, total);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Reading => "reading",
        Phase::Writing => "writing",
        Phase::Verifying => "verifying",
        Phase::Uploading => "uploading",
    }
}

fn phase_counter(c: &Counters, p: Phase) -> u64 {
    match p {
        Phase::Reading => c.scanned_bytes.load(Ordering::Relaxed),
        Phase::Writing => {
            c.written_bytes.load(Ordering::Relaxed) + c.zeroed_bytes.load(Ordering::Relaxed)
        }
        Phase::Verifying => c.verified_bytes.load(Ordering::Relaxed),
        Phase::Uploading => c.sent_bytes.load(Ordering::Relaxed),
    }
}
