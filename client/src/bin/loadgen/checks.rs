//! The end-to-end checks of a run: which messages each publisher had acknowledged, and a
//! subscriber that verifies every delivery (content, exactly once, order, positions)
//! against them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use client::pacing::record_since;
use client::summary::Summary;
use client::verify::{
    DeliveryContext, Expectation, Verdict, Verifier, VerifyCounts, decode_message,
};
use client::{
    ClientError, DeliveredBatch, LatencySummary, PublisherEvent, Subscriber, latency_histogram,
    percentile_distribution,
};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use units::Timestamp;

use crate::plan::Plan;
use crate::progress::Progress;

/// Collects acknowledged message ranges (start, end) from publisher events.
#[derive(Default)]
pub(crate) struct AckedRanges {
    ranges: Vec<(u64, u64)>,
}

impl AckedRanges {
    pub(crate) fn absorb(&mut self, events: Vec<PublisherEvent>) {
        for event in events {
            match event {
                PublisherEvent::Acked {
                    first_message_index: start,
                    message_count,
                    ..
                } => {
                    let end = start + u64::from(message_count);
                    // Acks mostly come in order: extending the last range keeps the list as
                    // short as the gaps, not as long as the run.
                    match self.ranges.last_mut() {
                        Some(last) if last.1 == start => last.1 = end,
                        _ => self.ranges.push((start, end)),
                    }
                }
                PublisherEvent::Rejected {
                    batch_seq,
                    broker,
                    reason,
                    ..
                } => {
                    log::warn!("{broker} did not order batch {batch_seq}: {reason}");
                }
                PublisherEvent::PoolFull { .. } => {}
            }
        }
    }

    /// Messages `0..published` minus the ranges never acknowledged.
    pub(crate) fn expectation(mut self, published: u64) -> Expectation {
        self.ranges.sort_unstable();
        let mut excluded = Vec::new();
        let mut covered = 0;
        for (start, end) in self.ranges {
            if start > covered {
                excluded.push(covered..start);
            }
            covered = covered.max(end);
        }
        if covered < published {
            excluded.push(covered..published);
        }
        Expectation {
            messages: published,
            excluded,
        }
    }
}

/// The end-to-end subscriber, on a thread of its own, connected before any publisher
/// sends.
pub(crate) struct Checker {
    thread: JoinHandle<CheckOutcome>,
    expectations: Sender<Vec<Expectation>>,
}

impl Checker {
    /// Starts the subscriber and waits until it is connected. `start` is the publishers'
    /// start (set before any message is due), for the latency from each message's due time.
    /// On failure returns its error (`None` when the thread ended without one).
    pub(crate) fn start(
        plan: &Plan,
        client_ids: &[u64],
        progress: &Arc<Progress>,
        start: &Arc<OnceLock<Timestamp>>,
    ) -> Result<Checker, Option<String>> {
        let (expectations, expectations_rx) = crossbeam_channel::bounded(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (plan, ids, progress) = (plan.clone(), client_ids.to_vec(), progress.clone());
        let start = start.clone();
        let thread = thread::spawn(move || {
            let shared = Shared {
                plan: &plan,
                progress: &progress,
                start: &start,
            };
            check_deliveries(&shared, &ids, &expectations_rx, &ready_tx)
        });
        if !ready_rx.recv().unwrap_or(false) {
            return Err(thread.join().ok().and_then(|o| o.error));
        }
        Ok(Checker {
            thread,
            expectations,
        })
    }

    /// Hands the subscriber what the publishers expect (publishers that never ran expect
    /// nothing), waits for its findings and adds them to `summary`, with the verdict.
    pub(crate) fn finish(
        self,
        plan: &Plan,
        mut expectations: Vec<Expectation>,
        summary: &mut Summary,
    ) {
        expectations.resize(plan.publishers, Expectation::default());
        let _ = self.expectations.send(expectations);
        match self.thread.join() {
            Ok(outcome) => apply_check(summary, outcome),
            Err(_) => summary.errors.push("the subscriber thread panicked".into()),
        }
        summary.passed = summary.errors.is_empty()
            && summary.lost == 0
            && summary.duplicates == 0
            && summary.order_violations == 0
            && summary.corrupt == 0
            && summary.position_gaps == 0
            && summary.position_duplicates == 0;
    }
}

/// What the end-to-end subscriber found.
struct CheckOutcome {
    counts: VerifyCounts,
    lost: u64,
    stats: client::SubscriberStats,
    /// Deliveries of other publishers (an earlier run's, a Kafka client's) whose payload
    /// does not match their CRC-32C.
    foreign_corrupt_batches: u64,
    /// Each first delivery's latency from its due time (paced runs).
    e2e_from_intended_us: Histogram<u64>,
    error: Option<String>,
}

fn apply_check(summary: &mut Summary, outcome: CheckOutcome) {
    summary.lost = outcome.lost;
    summary.duplicates = outcome.counts.duplicates;
    summary.order_violations = outcome.counts.order_violations;
    summary.corrupt =
        outcome.counts.corrupt + outcome.stats.corrupt_batches + outcome.foreign_corrupt_batches;
    summary.foreign = outcome.counts.foreign;
    summary.messages_received = outcome.stats.messages;
    summary.bytes_received = outcome.stats.message_bytes;
    summary.position_gaps = outcome.stats.positions.gaps;
    summary.position_duplicates = outcome.stats.positions.duplicates;
    summary.subscriber_redirects = outcome.stats.redirects;
    summary.e2e_latency_from_intended_us = LatencySummary::of(&outcome.e2e_from_intended_us);
    summary.latency_distributions_us.e2e_from_intended =
        percentile_distribution(&outcome.e2e_from_intended_us);
    summary.errors.extend(outcome.error);
}

/// What the subscriber thread shares with the rest of the run.
struct Shared<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    start: &'a OnceLock<Timestamp>,
}

/// The verifier and the end-to-end latency it feeds.
struct Receipts {
    verifier: Verifier,
    e2e_from_intended_us: Histogram<u64>,
    foreign_corrupt_batches: u64,
}

/// The publishers' expectations, once they are done, and how long the subscriber may take
/// to receive them.
struct Expected {
    list: Vec<Expectation>,
    /// Messages expected over all publishers.
    total: u64,
    deadline: Timestamp,
}

impl Expected {
    fn new(list: Vec<Expectation>, drain_timeout: Duration) -> Self {
        let total = list
            .iter()
            .map(|e| e.messages - e.excluded.iter().map(|r| r.end - r.start).sum::<u64>())
            .sum();
        Expected {
            list,
            total,
            deadline: Timestamp::now() + drain_timeout,
        }
    }

    /// Every expected message arrived, or the drain time is over.
    fn done(&self, verifier: &Verifier) -> bool {
        Timestamp::now() >= self.deadline
            || (verifier.counts().delivered >= self.total && verifier.lost(&self.list) == 0)
    }
}

fn check_deliveries(
    shared: &Shared,
    client_ids: &[u64],
    expectations: &Receiver<Vec<Expectation>>,
    ready: &Sender<bool>,
) -> CheckOutcome {
    let plan = shared.plan;
    let mut outcome = CheckOutcome {
        counts: VerifyCounts::default(),
        lost: 0,
        stats: client::SubscriberStats::default(),
        foreign_corrupt_batches: 0,
        e2e_from_intended_us: latency_histogram(),
        error: None,
    };
    // Subscribing after the publish: the publishers start at once, and what they expect is
    // known before the subscriber connects.
    let known = if plan.subscribe_after_publish {
        let _ = ready.send(true);
        expectations.recv().ok()
    } else {
        None
    };
    let mut config = plan.subscriber_config(0);
    // The verifier checks every message's own CRC-32C, which with the framing covers every
    // byte of this run's deliveries: their CRC would read each byte a second time. Others'
    // deliveries are checked against their CRC in `Receipts::verify`.
    config.verify_checksums = false;
    let connected = Subscriber::connect(config);
    if !plan.subscribe_after_publish {
        let _ = ready.send(connected.is_ok());
    }
    let mut subscriber = match connected {
        Ok(subscriber) => subscriber,
        Err(error) => {
            outcome.error = Some(format!("subscriber: {error}"));
            return outcome;
        }
    };
    let mut receipts = Receipts {
        verifier: Verifier::new(plan.order_check(), client_ids),
        e2e_from_intended_us: latency_histogram(),
        foreign_corrupt_batches: 0,
    };
    let (expected, error) = receive(shared, &mut subscriber, &mut receipts, expectations, known);
    outcome.error = error;
    let Receipts {
        verifier,
        e2e_from_intended_us,
        foreign_corrupt_batches,
    } = receipts;
    outcome.e2e_from_intended_us = e2e_from_intended_us;
    outcome.foreign_corrupt_batches = foreign_corrupt_batches;
    // The publishers may still be running when the subscriber fails early; wait for their
    // expectations so lost can be computed against them.
    let list = match expected {
        Some(expected) => Some(expected.list),
        None => expectations.recv().ok(),
    };
    if let Some(list) = list {
        outcome.lost = verifier.lost(&list);
    }
    outcome.counts = verifier.counts();
    outcome.stats = subscriber.stats();
    let _ = subscriber.close();
    outcome
}

/// Verifies deliveries until the publishers' expectations (`known` already, or as they come)
/// are met or their drain time is over; returns the expectations (if they came) and the
/// error that stopped the subscriber.
fn receive(
    shared: &Shared,
    subscriber: &mut Subscriber,
    receipts: &mut Receipts,
    expectations: &Receiver<Vec<Expectation>>,
    known: Option<Vec<Expectation>>,
) -> (Option<Expected>, Option<String>) {
    let mut expected = known.map(|list| Expected::new(list, shared.plan.drain_timeout));
    loop {
        if expected.is_none()
            && let Ok(list) = expectations.try_recv()
        {
            expected = Some(Expected::new(list, shared.plan.drain_timeout));
        }
        match subscriber.next_batch(Duration::from_millis(100)) {
            Ok(Some(batch)) => receipts.verify(shared, &batch, Timestamp::now()),
            Ok(None) | Err(ClientError::CorruptDelivery { .. }) => {}
            Err(error) => return (expected, Some(format!("subscriber: {error}"))),
        }
        if expected
            .as_ref()
            .is_some_and(|e| e.done(&receipts.verifier))
        {
            return (expected, None);
        }
    }
}

impl Receipts {
    /// Verifies a batch received at `received_at`, and records the latency from the due time
    /// of each message delivered for the first time (when the run is paced).
    fn verify(&mut self, shared: &Shared, batch: &DeliveredBatch, received_at: Timestamp) {
        // Messages of other publishers carry no checksum the verifier checks: the
        // delivery's own is checked here (the subscriber leaves it to this check).
        if !self.verifier.knows(batch.client_id) && !batch.checksum_matches() {
            self.foreign_corrupt_batches += 1;
        }
        let context = DeliveryContext {
            client_id: batch.client_id,
            batch_seq: batch.batch_seq,
        };
        let schedule = shared.start.get().and_then(|&s| shared.plan.schedule(s));
        for message in batch.messages() {
            let verdict = self.verifier.on_message(&context, message);
            let first = matches!(verdict, Verdict::Ok | Verdict::OutOfOrder);
            if let (true, Some(schedule), Ok(id)) = (first, &schedule, decode_message(message)) {
                let seqs = id.seq..id.seq + 1;
                let stream = u64::from(id.publisher);
                record_since(
                    &mut self.e2e_from_intended_us,
                    schedule,
                    stream,
                    seqs,
                    received_at,
                );
            }
        }
        shared
            .progress
            .received
            .fetch_add(u64::from(batch.message_count), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_exclude_what_was_never_acknowledged() {
        let mut acked = AckedRanges::default();
        acked.absorb(vec![
            PublisherEvent::Acked {
                batch_seq: 1,
                first_message_index: 4,
                message_count: 4,
                global_start: Some(0),
                duplicate: false,
                latency_us: 1,
                acked_at: Timestamp::now(),
            },
            PublisherEvent::Acked {
                batch_seq: 0,
                first_message_index: 0,
                message_count: 4,
                global_start: Some(4),
                duplicate: false,
                latency_us: 1,
                acked_at: Timestamp::now(),
            },
            PublisherEvent::Acked {
                batch_seq: 3,
                first_message_index: 12,
                message_count: 2,
                global_start: Some(8),
                duplicate: false,
                latency_us: 1,
                acked_at: Timestamp::now(),
            },
        ]);
        let expectation = acked.expectation(20);
        assert_eq!(expectation.messages, 20);
        assert_eq!(expectation.excluded, [8..12, 14..20]);
    }

    #[test]
    fn in_order_acks_keep_one_range() {
        let mut acked = AckedRanges::default();
        let ack = |batch_seq: u64| PublisherEvent::Acked {
            batch_seq,
            first_message_index: batch_seq * 2,
            message_count: 2,
            global_start: Some(batch_seq * 2),
            duplicate: false,
            latency_us: 1,
            acked_at: Timestamp::now(),
        };
        acked.absorb((0..10_000).map(ack).collect());
        assert_eq!(acked.ranges.len(), 1, "in-order acks left separate ranges");
        assert_eq!(acked.ranges[0], (0, 20_000));
        // One missing batch leaves two ranges and one gap.
        acked.absorb(vec![ack(10_001)]);
        assert_eq!(acked.ranges.len(), 2);
        let excluded = acked.expectation(20_004).excluded;
        assert_eq!((excluded.len(), excluded[0].clone()), (1, 20_000..20_002));
    }
}
