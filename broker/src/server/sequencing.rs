//! Driving the sequencer: on a thread of its own, or inline in the head broker's network
//! loop, where a batch is received, committed, ordered and acknowledged in one pass.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use units::Timestamp;

use crate::metrics::{Metrics, SequencerRole};
use shared_log::coherence::PoolMemory;
use shared_log::sequencer::Sequencer;

/// How often the sequencer looks at the topic table for new topics (and copies its counts
/// into the metrics): a new topic's first batches wait at most this long for their order.
const TOPIC_REFRESH_INTERVAL: Duration = Duration::from_millis(5);

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
    core_affinity::get_core_ids().map(|cores| cores.len())
}

/// A held sequencer, polled round after round: new topics looked up now and then, its
/// counts copied into the metrics, and its end noticed once another holder fenced it.
pub struct SequencerDriver {
    sequencer: Sequencer<PoolMemory>,
    metrics: Arc<Metrics>,
    /// When the topic table was last read (`None`: not yet).
    refreshed_at: Option<Timestamp>,
}

impl std::fmt::Debug for SequencerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequencerDriver")
            .field("refreshed_at", &self.refreshed_at)
            .finish()
    }
}

impl SequencerDriver {
    /// Drives `sequencer`, which holds the lease: the broker's role says so from now on.
    pub fn new(mut sequencer: Sequencer<PoolMemory>, metrics: Arc<Metrics>) -> SequencerDriver {
        sequencer.set_pause_guard(Box::new(Timestamp::now));
        metrics.sequencer_holders.fetch_add(1, Ordering::SeqCst);
        metrics.set_sequencer_role(SequencerRole::Holding);
        SequencerDriver {
            sequencer,
            metrics,
            refreshed_at: None,
        }
    }

    /// One round at `now`. Returns the batches decided, or `None` once another holder has
    /// fenced this one: then it must not poll again (dropping it puts the role back to
    /// standing by).
    pub fn step(&mut self, now: Timestamp) -> Option<u64> {
        if self
            .refreshed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= TOPIC_REFRESH_INTERVAL)
        {
            self.refreshed_at = Some(now);
            self.refresh();
        }
        let decided = self.sequencer.poll(now);
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
        // The broker stands by once its last holder is gone. A holder created meanwhile
        // (this broker's standby taking over from its fenced network-loop sequencer) sets
        // Holding after it counts itself, so the check after the store sees it.
        if self
            .metrics
            .sequencer_holders
            .fetch_sub(1, Ordering::SeqCst)
            == 1
        {
            self.metrics.set_sequencer_role(SequencerRole::StandingBy);
            if self.metrics.sequencer_holders.load(Ordering::SeqCst) > 0 {
                self.metrics.set_sequencer_role(SequencerRole::Holding);
            }
        }
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

    /// A topic created after the sequencer started is found within the refresh interval of
    /// the clock, however few polls happen meanwhile (a thread that sleeps between polls
    /// polls rarely).
    #[test]
    fn a_new_topic_is_ordered_within_the_refresh_interval_of_the_clock() {
        use shared_log::pool::TopicConfig;
        use shared_log::sequencer::SequencerConfig;
        use shared_log::writer::{BatchMeta, TopicWriter};
        use shared_log::{Order, Retention};

        let pool = shared_log::heap::small_test_pool();
        let sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default())
            .expect("the lease of a fresh pool");
        let mut driver = SequencerDriver::new(sequencer, Arc::new(Metrics::default()));
        let start = Timestamp::from_nanos(1_000_000_000);
        assert_eq!(driver.step(start), Some(0), "nothing to order yet");

        let config = TopicConfig {
            order: Order::Total,
            ack: 1,
            replication_factor: 1,
            retention: Retention::StallLimited,
            history: shared_log::HistoryRetention::UNLIMITED,
        };
        let topic = pool.create_topic("late", config).expect("a topic");
        let mut writer = TopicWriter::new(pool.clone(), topic, 0).expect("a writer");
        let mut payload = Vec::new();
        wire::payload::push_message(&mut payload, b"first");
        let meta = BatchMeta {
            client_id: 7,
            session_epoch: 1,
            batch_seq: 0,
            message_count: 1,
            checksum: wire::payload::checksum(&payload),
            flags: 0,
        };
        writer.append(meta, &payload).expect("room for one batch");

        let soon = start + TOPIC_REFRESH_INTERVAL / 2;
        assert_eq!(
            driver.step(soon),
            Some(0),
            "the topic table is not read yet"
        );
        let later = start + TOPIC_REFRESH_INTERVAL;
        assert_eq!(
            driver.step(later),
            Some(1),
            "read by the clock, then ordered"
        );
    }

    /// The network loop's sequencer fenced by the broker's own standby, which took the lease
    /// over: the broker still holds it (and creates topics) after the fenced one is dropped.
    #[test]
    fn a_broker_holds_the_lease_while_any_of_its_sequencers_does() {
        use shared_log::sequencer::SequencerConfig;
        // Two pools: what is counted is the broker's holders, not one pool's lease.
        let metrics = Arc::new(Metrics::default());
        let (one, two) = (
            shared_log::heap::small_test_pool(),
            shared_log::heap::small_test_pool(),
        );
        let first = Sequencer::new(one, 0, 1, SequencerConfig::default()).unwrap();
        let inline = SequencerDriver::new(first, Arc::clone(&metrics));
        let second = Sequencer::new(two, 0, 1, SequencerConfig::default()).unwrap();
        let standby = SequencerDriver::new(second, Arc::clone(&metrics));
        drop(inline);
        assert_eq!(metrics.sequencer_role(), SequencerRole::Holding);
        drop(standby);
        assert_eq!(metrics.sequencer_role(), SequencerRole::StandingBy);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(allowed_cpus().is_some_and(|cpus| cpus >= 1));
    }
}
