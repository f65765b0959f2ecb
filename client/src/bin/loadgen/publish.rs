//! The publish, latency and end-to-end tests: publisher threads that connect, start
//! together, send until the plan's stop, flush and report what they did.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use client::pacing::{CpuMeter, Schedule, record_since};
use client::summary::Summary;
use client::verify::{Expectation, MessageFactory};
use client::{
    ClientError, LatencySummary, Publisher, PublisherEvent, latency_histogram,
    percentile_distribution,
};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use units::Timestamp;

use crate::checks::{AckedRanges, Checker};
use crate::pacing::Pacing;
use crate::plan::{Plan, Stop};
use crate::progress::Progress;

/// Most messages a paced publisher writes in one burst (what fell due while it slept or
/// stalled), so that it still looks at its acks now and then when far behind.
const BURST_MESSAGES_MAX: u64 = 1024;

/// What one publisher thread did.
struct PublisherOutcome {
    stats: client::PublisherStats,
    latency_us: Histogram<u64>,
    /// Each acknowledged message's latency from its due time (paced runs).
    latency_from_intended_us: Histogram<u64>,
    expectation: Expectation,
    connections: usize,
    /// When every batch was acknowledged (before Goodbye and closing the sockets).
    flushed_at: Timestamp,
    /// Longest time without a new ack while publishing (see `Summary::ack_gap_max_ms`).
    ack_gap_max: Duration,
    error: Option<String>,
}

impl PublisherOutcome {
    /// The outcome of publisher `index` that could not send at all.
    fn failed(index: usize, error: String) -> Self {
        PublisherOutcome {
            stats: client::PublisherStats::default(),
            latency_us: latency_histogram(),
            latency_from_intended_us: latency_histogram(),
            expectation: Expectation::default(),
            connections: 0,
            flushed_at: Timestamp::now(),
            ack_gap_max: Duration::ZERO,
            error: Some(format!("publisher {index}: {error}")),
        }
    }
}

pub(crate) fn run_publish(plan: &Plan, progress: &Arc<Progress>) -> Summary {
    let mut summary = plan.summary();
    let base_id = client::default_client_id();
    let client_ids: Vec<u64> = (0..plan.publishers as u64)
        .map(|i| base_id.wrapping_add(i))
        .collect();
    // Set when the publishers start, before any message is due.
    let start = Arc::new(OnceLock::new());
    let checker = if plan.checks_deliveries() {
        match Checker::start(plan, &client_ids, progress, &start) {
            Ok(checker) => Some(checker),
            Err(error) => {
                summary.errors.extend(error);
                return summary;
            }
        }
    } else {
        None
    };
    let (outcomes, started) = run_publishers(plan, &client_ids, progress, &start, &mut summary);
    add_outcomes(plan, &outcomes, started, &mut summary);
    summary.passed = summary.errors.is_empty();
    if let Some(checker) = checker {
        let expectations = outcomes.into_iter().map(|o| o.expectation).collect();
        checker.finish(plan, expectations, &mut summary);
    }
    summary
}

/// How long after the gate opens the schedule starts, so that every publisher thread is
/// awake before its first message is due.
const START_LEAD: Duration = Duration::from_millis(1);

/// Runs a thread per publisher. Publishers connect first, report it, and start together
/// when the gate opens (`start` is set just before), so connection set-up is not measured.
/// Returns the outcomes and when the gate opened; sets the summary's `connect_ms` and
/// `loadgen_cpu_cores`.
fn run_publishers(
    plan: &Plan,
    client_ids: &[u64],
    progress: &Arc<Progress>,
    start: &Arc<OnceLock<Timestamp>>,
    summary: &mut Summary,
) -> (Vec<PublisherOutcome>, Timestamp) {
    let (connected_tx, connected_rx) = crossbeam_channel::unbounded::<()>();
    let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let connecting = Timestamp::now();
    let threads: Vec<_> = client_ids
        .iter()
        .enumerate()
        .map(|(index, &client_id)| {
            let (plan, progress, start) = (plan.clone(), progress.clone(), start.clone());
            let (connected, gate) = (connected_tx.clone(), gate_rx.clone());
            thread::Builder::new()
                .name(format!("publisher-{index}"))
                .spawn(move || {
                    let run = PublisherRun {
                        plan: &plan,
                        index,
                        progress: &progress,
                    };
                    run.run(client_id, &connected, &gate, &start)
                })
        })
        .collect();
    drop(connected_tx);
    let spawned = threads.iter().filter(|t| t.is_ok()).count();
    if spawned < plan.publishers {
        summary.errors.push(format!(
            "only {spawned} of {} publisher threads started",
            plan.publishers
        ));
    }
    for _ in 0..spawned {
        let _ = connected_rx.recv();
    }
    summary.connect_ms = Timestamp::now()
        .saturating_duration_since(connecting)
        .as_millis() as u64;
    let cpu = CpuMeter::start();
    let started = Timestamp::now();
    let _ = start.set(started + START_LEAD);
    drop(gate_tx);
    let mut outcomes = Vec::new();
    for thread in threads.into_iter().flatten() {
        match thread.join() {
            Ok(outcome) => outcomes.push(outcome),
            Err(_) => summary.errors.push("a publisher thread panicked".into()),
        }
    }
    match cpu.cores() {
        Ok(cores) => summary.loadgen_cpu_cores = cores,
        Err(error) => {
            log::warn!("loadgen_cpu_cores is not measured: getrusage failed: {error}");
        }
    }
    (outcomes, started)
}

/// Adds the publishers' counters, latencies and errors to `summary`, with the throughput
/// of the measured phase (from `started` to the last flush).
fn add_outcomes(
    plan: &Plan,
    outcomes: &[PublisherOutcome],
    started: Timestamp,
    summary: &mut Summary,
) {
    let mut histogram = latency_histogram();
    let mut from_intended = latency_histogram();
    for outcome in outcomes {
        add_outcome(plan, outcome, summary);
        for (into, from) in [
            (&mut histogram, &outcome.latency_us),
            (&mut from_intended, &outcome.latency_from_intended_us),
        ] {
            if let Err(error) = into.add(from) {
                log::warn!("merging latency histograms: {error}");
            }
        }
    }
    summary.ack_latency_us = LatencySummary::of(&histogram);
    summary.ack_latency_from_intended_us = LatencySummary::of(&from_intended);
    summary.latency_distributions_us.ack = percentile_distribution(&histogram);
    summary.latency_distributions_us.ack_from_intended = percentile_distribution(&from_intended);
    let seconds = outcomes
        .iter()
        .map(|o| o.flushed_at.saturating_duration_since(started))
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    summary.seconds = seconds;
    let (bytes, messages) = if plan.ack == 0 {
        (summary.bytes_sent, summary.messages_sent)
    } else {
        (summary.bytes_acked, summary.messages_acked)
    };
    summary.mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9);
    summary.msgs_per_s = messages as f64 / seconds.max(1e-9);
}

fn add_outcome(plan: &Plan, outcome: &PublisherOutcome, summary: &mut Summary) {
    let stats = &outcome.stats;
    summary.messages_sent += stats.messages_sent;
    summary.bytes_sent += stats.bytes_sent;
    summary.messages_acked += stats.messages_acked;
    summary.bytes_acked += stats.bytes_acked;
    summary.batches_acked += stats.batches_acked;
    summary.rejected += stats.messages_rejected;
    summary.reconnects += stats.reconnects;
    summary.batches_resent += stats.batches_resent;
    summary.duplicate_acks += stats.batches_duplicate;
    summary.burst_writes += stats.burst_writes;
    summary.burst_write_batches += stats.burst_write_batches;
    summary.in_flight_window = summary.in_flight_window.max(stats.in_flight_window as u64);
    summary.in_flight_window_changes += stats.in_flight_window_changes;
    summary.ack_gap_max_ms = summary
        .ack_gap_max_ms
        .max(outcome.ack_gap_max.as_millis() as u64);
    if outcome.connections != plan.connections_per_publisher() && outcome.error.is_none() {
        summary.errors.push(format!(
            "a publisher opened {} connections instead of {}",
            outcome.connections,
            plan.connections_per_publisher()
        ));
    }
    summary.errors.extend(outcome.error.clone());
}

/// What a publisher learns about its acks while sending, looked at every 1,024 messages.
struct AckWatch {
    acked: AckedRanges,
    /// Each acknowledged message's latency from its due time, when paced.
    from_intended: IntendedLatency,
    /// Messages acknowledged at the last look (and added to the progress counter).
    reported: u64,
    /// When the acknowledged count last changed.
    changed_at: Timestamp,
    gap_max: Duration,
}

impl AckWatch {
    fn new(start: Timestamp, from_intended: IntendedLatency) -> Self {
        AckWatch {
            acked: AckedRanges::default(),
            from_intended,
            reported: 0,
            changed_at: start,
            gap_max: Duration::ZERO,
        }
    }

    fn look(&mut self, publisher: &mut Publisher, progress: &Progress) {
        let messages_acked = publisher.messages_acked();
        if messages_acked != self.reported {
            let now = Timestamp::now();
            self.gap_max = self
                .gap_max
                .max(now.saturating_duration_since(self.changed_at));
            self.changed_at = now;
        }
        progress
            .acked
            .fetch_add(messages_acked - self.reported, Ordering::Relaxed);
        self.reported = messages_acked;
        self.absorb(publisher.take_events());
    }

    fn absorb(&mut self, events: Vec<PublisherEvent>) {
        self.from_intended.record_acks(&events);
        self.acked.absorb(events);
    }
}

/// Latency from each message's due time to its ack, for one paced publisher.
struct IntendedLatency {
    /// The schedule and the publisher's stream in it; `None` when unpaced.
    schedule: Option<(Schedule, u64)>,
    histogram: Histogram<u64>,
}

impl IntendedLatency {
    fn new(schedule: Option<Schedule>, stream: u64) -> Self {
        IntendedLatency {
            schedule: schedule.map(|s| (s, stream)),
            histogram: latency_histogram(),
        }
    }

    /// Records every message of every acknowledged batch in `events`.
    fn record_acks(&mut self, events: &[PublisherEvent]) {
        let Some((schedule, stream)) = &self.schedule else {
            return;
        };
        for event in events {
            if let PublisherEvent::Acked {
                first_message_index,
                message_count,
                acked_at,
                ..
            } = event
            {
                let seqs = *first_message_index..first_message_index + u64::from(*message_count);
                record_since(&mut self.histogram, schedule, *stream, seqs, *acked_at);
            }
        }
    }
}

/// One publisher thread.
struct PublisherRun<'a> {
    plan: &'a Plan,
    index: usize,
    progress: &'a Progress,
}

impl PublisherRun<'_> {
    fn run(
        &self,
        client_id: u64,
        connected: &Sender<()>,
        gate: &Receiver<()>,
        start: &OnceLock<Timestamp>,
    ) -> PublisherOutcome {
        let plan = self.plan;
        let connection = Publisher::connect(plan.publisher_config(client_id));
        // Report in, connected or not, then wait for the gate (its sender is dropped to open).
        let _ = connected.send(());
        let _ = gate.recv();
        let mut publisher = match connection {
            Ok(publisher) => publisher,
            Err(error) => return PublisherOutcome::failed(self.index, error.to_string()),
        };
        let Some(mut factory) = MessageFactory::new(self.index as u32, plan.message_bytes) else {
            return PublisherOutcome::failed(
                self.index,
                format!(
                    "{}-byte messages cannot hold the 16-byte header",
                    plan.message_bytes
                ),
            );
        };
        // Set before the gate opened; the fallback only guards against a broken gate.
        let start = *start.get_or_init(Timestamp::now);
        let schedule = plan.schedule(start);
        let stream = self.index as u64;
        let mut watch = AckWatch::new(start, IntendedLatency::new(schedule, stream));
        let mut pacing = Pacing::new(schedule, stream);
        let (published, error) =
            self.send(&mut publisher, &mut factory, &mut watch, &mut pacing, start);
        self.finish(publisher, watch, published, error)
    }

    /// Publishes from `start` until the plan's stop; returns how many messages were
    /// published and the error that ended it early.
    fn send(
        &self,
        publisher: &mut Publisher,
        factory: &mut MessageFactory,
        watch: &mut AckWatch,
        pacing: &mut Pacing,
        start: Timestamp,
    ) -> (u64, Option<ClientError>) {
        let plan = self.plan;
        let limit = plan.messages_for(self.index).unwrap_or(u64::MAX);
        let deadline = match plan.stop {
            Stop::Duration(duration) => Some(start + duration),
            Stop::TotalBytes(_) => None,
        };
        // Paced, the run ends with the last message due before the deadline (exactly rate x
        // duration messages).
        let due_in_run = |due: Timestamp| deadline.is_none_or(|d| due < d);
        let mut seq = 0u64;
        while seq < limit {
            // Unpaced, reading the clock for every message costs more than the message;
            // every 256th will do.
            let over = match pacing.due(seq) {
                Some(due) => !due_in_run(due),
                None => seq % 256 == 0 && deadline.is_some_and(|d| Timestamp::now() >= d),
            };
            if over {
                break;
            }
            if let Err(error) = pacing.wait_for(publisher, seq) {
                return (seq, Some(error));
            }
            let first = seq;
            let sent = if pacing.due(seq).is_none() {
                publisher.publish(factory.message(seq)).map(|()| seq += 1)
            } else {
                // Every message due by now goes out in one burst: a paced sender that woke
                // late (or a fast schedule) writes what fell due with one system call per
                // connection.
                let now = Timestamp::now();
                publisher.burst(|publisher| {
                    loop {
                        publisher.publish(factory.message(seq))?;
                        seq += 1;
                        let more = pacing
                            .due(seq)
                            .is_some_and(|due| due <= now && due_in_run(due));
                        if !more || seq >= limit || seq - first >= BURST_MESSAGES_MAX {
                            return Ok(());
                        }
                    }
                })
            };
            self.progress
                .published
                .fetch_add(seq - first, Ordering::Relaxed);
            if let Err(error) = sent {
                return (seq, Some(error));
            }
            if seq / 1024 != first / 1024 {
                watch.look(publisher, self.progress);
            }
        }
        (seq, None)
    }

    /// Flushes (the end of the measured phase) and closes the publisher, and reports what it
    /// did; `published` messages were handed to it.
    fn finish(
        &self,
        mut publisher: Publisher,
        mut watch: AckWatch,
        published: u64,
        mut error: Option<ClientError>,
    ) -> PublisherOutcome {
        // The measured phase ends at the flush; the Goodbye exchange is not throughput.
        let flushed = publisher.flush();
        let flushed_at = Timestamp::now();
        if let Err(e) = flushed.and_then(|()| publisher.close())
            && error.is_none()
        {
            error = Some(e);
        }
        watch.absorb(publisher.take_events());
        let stats = publisher.stats();
        self.progress
            .acked
            .fetch_add(stats.messages_acked - watch.reported, Ordering::Relaxed);
        let expectation = if self.plan.ack == 0 {
            // Nothing is acknowledged at ack 0: a written message counts as sent.
            Expectation {
                messages: stats.messages_sent,
                excluded: Vec::new(),
            }
        } else {
            watch.acked.expectation(published)
        };
        PublisherOutcome {
            latency_us: publisher.ack_latency_histogram().clone(),
            latency_from_intended_us: watch.from_intended.histogram,
            stats,
            expectation,
            connections: publisher.connection_count(),
            flushed_at,
            ack_gap_max: watch.gap_max,
            error: error.map(|e| format!("publisher {}: {e}", self.index)),
        }
    }
}
