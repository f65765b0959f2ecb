//! Driving the sequencer: on a thread of its own, or inline in the head broker's network
//! loop, where a batch is received, committed, ordered and acknowledged in one pass.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::metrics::{Metrics, SequencerRole};
use shared_log::coherence::PoolMemory;
use shared_log::sequencer::Sequencer;

/// Polls between looks at the topic table for new topics.
const POLLS_PER_TOPIC_REFRESH: u64 = 4096;

/// Where the head broker runs its sequencer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SequencerPlacement {
    /// Inline when the broker may run on one CPU only (its affinity), else on a thread.
    #[default]
    Auto,
    /// In the network loop: no hand-off between two threads that would take turns on one
    /// core.
    Inline,
    /// On a thread of its own, beside the network loop.
    Thread,
}

impl SequencerPlacement {
    /// Whether the sequencer runs in the network loop, for a process whose affinity allows
    /// `cpus` CPUs.
    pub fn inline(self, cpus: usize) -> bool {
        match self {
            SequencerPlacement::Auto => cpus == 1,
            SequencerPlacement::Inline => true,
            SequencerPlacement::Thread => false,
        }
    }
}

/// The CPUs this process may run on (its affinity), or `None` when the kernel does not say.
pub fn allowed_cpus() -> Option<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed; pid 0 is this thread.
    let result =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: `set` was filled by the kernel.
    (result == 0).then(|| unsafe { libc::CPU_COUNT(&set) } as usize)
}

/// A held sequencer, polled round after round: new topics looked up now and then, its
/// counts copied into the metrics, and its end noticed once another holder fenced it.
pub struct SequencerDriver {
    sequencer: Sequencer<PoolMemory>,
    metrics: Arc<Metrics>,
    started: Instant,
    polls: u64,
}

impl std::fmt::Debug for SequencerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequencerDriver")
            .field("polls", &self.polls)
            .finish()
    }
}

impl SequencerDriver {
    /// Drives `sequencer`, which holds the lease: the broker's role says so from now on.
    pub fn new(mut sequencer: Sequencer<PoolMemory>, metrics: Arc<Metrics>) -> SequencerDriver {
        let started = Instant::now();
        sequencer.set_pause_guard(Box::new(move || started.elapsed().as_nanos() as u64));
        metrics.set_sequencer_role(SequencerRole::Holding);
        SequencerDriver {
            sequencer,
            metrics,
            started,
            polls: 0,
        }
    }

    /// One round at `now`. Returns the batches decided, or `None` once another holder has
    /// fenced this one: then it must not poll again (dropping it puts the role back to
    /// standing by).
    pub fn step(&mut self, now: Instant) -> Option<u64> {
        if self.polls % POLLS_PER_TOPIC_REFRESH == 0 {
            self.refresh();
        }
        self.polls += 1;
        let now_ns = now.saturating_duration_since(self.started).as_nanos() as u64;
        let decided = self.sequencer.poll(now_ns);
        if self.sequencer.is_fenced() {
            return None;
        }
        Some(decided)
    }

    fn refresh(&mut self) {
        if let Err(e) = self.sequencer.refresh_topics() {
            log::error!("sequencer: cannot read the topic table: {e}");
        }
        let stats = self.sequencer.stats();
        let metrics = &self.metrics;
        metrics
            .sequencer_batches_ordered
            .store(stats.batches_ordered, Ordering::Relaxed);
        metrics
            .sequencer_gaps_resolved
            .store(stats.gaps_resolved, Ordering::Relaxed);
        metrics.sequencer_held.store(stats.held, Ordering::Relaxed);
    }
}

impl Drop for SequencerDriver {
    fn drop(&mut self) {
        self.metrics.set_sequencer_role(SequencerRole::StandingBy);
    }
}

/// Sets this thread's timer slack to its minimum (1 ns): a polling thread's short sleeps
/// and epoll timeouts then end when asked, not up to 50 us later (the default slack).
pub fn minimal_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    let result = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if result != 0 {
        log::warn!(
            "cannot lower the timer slack of this thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_runs_inline_only_on_one_cpu() {
        assert!(SequencerPlacement::Auto.inline(1));
        assert!(!SequencerPlacement::Auto.inline(2));
        assert!(SequencerPlacement::Inline.inline(8));
        assert!(!SequencerPlacement::Thread.inline(1));
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(allowed_cpus().is_some_and(|cpus| cpus >= 1));
    }
}
