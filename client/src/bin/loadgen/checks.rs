//! The end-to-end checks of a run: which messages each publisher had acknowledged, and a
//! subscriber that verifies every delivery (content, exactly once, order, positions)
//! against them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use client::summary::Summary;
use client::verify::{DeliveryContext, Expectation, Verifier, VerifyCounts};
use client::{ClientError, DeliveredBatch, PublisherEvent, Subscriber};
use crossbeam_channel::{Receiver, Sender};
use units::Timestamp;

use crate::plan::Plan;
use crate::progress::Progress;

/// Collects acknowledged message ranges from publisher events.
#[derive(Default)]
pub(crate) struct AckedRanges {
    ranges: Vec<(u64, u32)>,
}

impl AckedRanges {
    pub(crate) fn absorb(&mut self, events: Vec<PublisherEvent>) {
        for event in events {
            match event {
                PublisherEvent::Acked {
                    first_message_index,
                    message_count,
                    ..
                } => self.ranges.push((first_message_index, message_count)),
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
        for (start, count) in self.ranges {
            if start > covered {
                excluded.push(covered..start);
            }
            covered = covered.max(start + u64::from(count));
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
    /// Starts the subscriber and waits until it is connected. On failure returns its error
    /// (`None` when the thread ended without one).
    pub(crate) fn start(
        plan: &Plan,
        client_ids: &[u64],
        progress: &Arc<Progress>,
    ) -> Result<Checker, Option<String>> {
        let (expectations, expectations_rx) = crossbeam_channel::bounded(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (plan, ids, progress) = (plan.clone(), client_ids.to_vec(), progress.clone());
        let thread = thread::spawn(move || {
            check_deliveries(&plan, &ids, &expectations_rx, &ready_tx, &progress)
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
    error: Option<String>,
}

fn apply_check(summary: &mut Summary, outcome: CheckOutcome) {
    summary.lost = outcome.lost;
    summary.duplicates = outcome.counts.duplicates;
    summary.order_violations = outcome.counts.order_violations;
    summary.corrupt = outcome.counts.corrupt + outcome.stats.corrupt_batches;
    summary.foreign = outcome.counts.foreign;
    summary.messages_received = outcome.stats.messages;
    summary.bytes_received = outcome.stats.message_bytes;
    summary.position_gaps = outcome.stats.positions.gaps;
    summary.position_duplicates = outcome.stats.positions.duplicates;
    summary.errors.extend(outcome.error);
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
    plan: &Plan,
    client_ids: &[u64],
    expectations: &Receiver<Vec<Expectation>>,
    ready: &Sender<bool>,
    progress: &Progress,
) -> CheckOutcome {
    let mut outcome = CheckOutcome {
        counts: VerifyCounts::default(),
        lost: 0,
        stats: client::SubscriberStats::default(),
        error: None,
    };
    let mut subscriber = match Subscriber::connect(plan.subscriber_config(0)) {
        Ok(subscriber) => subscriber,
        Err(error) => {
            outcome.error = Some(format!("subscriber: {error}"));
            let _ = ready.send(false);
            return outcome;
        }
    };
    let _ = ready.send(true);
    let mut verifier = Verifier::new(plan.order_check(), client_ids);
    let (expected, error) = receive(plan, &mut subscriber, &mut verifier, expectations, progress);
    outcome.error = error;
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

/// Verifies deliveries until the publishers' expectations are met or their drain time is
/// over; returns the expectations (if they came) and the error that stopped the subscriber.
fn receive(
    plan: &Plan,
    subscriber: &mut Subscriber,
    verifier: &mut Verifier,
    expectations: &Receiver<Vec<Expectation>>,
    progress: &Progress,
) -> (Option<Expected>, Option<String>) {
    let mut expected: Option<Expected> = None;
    loop {
        if expected.is_none()
            && let Ok(list) = expectations.try_recv()
        {
            expected = Some(Expected::new(list, plan.drain_timeout));
        }
        match subscriber.next_batch(Duration::from_millis(100)) {
            Ok(Some(batch)) => verify(verifier, &batch, progress),
            Ok(None) | Err(ClientError::CorruptDelivery { .. }) => {}
            Err(error) => return (expected, Some(format!("subscriber: {error}"))),
        }
        if expected.as_ref().is_some_and(|e| e.done(verifier)) {
            return (expected, None);
        }
    }
}

fn verify(verifier: &mut Verifier, batch: &DeliveredBatch, progress: &Progress) {
    let context = DeliveryContext {
        client_id: batch.client_id,
        batch_seq: batch.batch_seq,
    };
    for message in batch.messages() {
        verifier.on_message(&context, message);
    }
    progress
        .received
        .fetch_add(u64::from(batch.message_count), Ordering::Relaxed);
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
            },
            PublisherEvent::Acked {
                batch_seq: 0,
                first_message_index: 0,
                message_count: 4,
                global_start: Some(4),
                duplicate: false,
                latency_us: 1,
            },
            PublisherEvent::Acked {
                batch_seq: 3,
                first_message_index: 12,
                message_count: 2,
                global_start: Some(8),
                duplicate: false,
                latency_us: 1,
            },
        ]);
        let expectation = acked.expectation(20);
        assert_eq!(expectation.messages, 20);
        assert_eq!(expectation.excluded, [8..12, 14..20]);
    }
}
