//! The subscribe test: one subscriber reads for the plan's duration or bytes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use client::summary::Summary;
use client::{ClientError, Subscriber};
use units::Timestamp;

use crate::plan::{Plan, Stop};
use crate::progress::Progress;

pub(crate) fn run_subscribe(plan: &Plan, progress: &Progress) -> Summary {
    let mut summary = plan.summary();
    let mut subscriber = match Subscriber::connect(plan.subscriber_config(plan.from_position)) {
        Ok(subscriber) => subscriber,
        Err(error) => {
            summary.errors.push(format!("subscriber: {error}"));
            return summary;
        }
    };
    let started = Timestamp::now();
    loop {
        let stats = subscriber.stats();
        let done = match plan.stop {
            Stop::TotalBytes(bytes) => stats.message_bytes >= bytes,
            Stop::Duration(duration) => {
                Timestamp::now().saturating_duration_since(started) >= duration
            }
        };
        if done {
            break;
        }
        match subscriber.next_batch(Duration::from_millis(100)) {
            Ok(Some(batch)) => {
                progress
                    .received
                    .fetch_add(u64::from(batch.message_count), Ordering::Relaxed);
            }
            Ok(None) | Err(ClientError::CorruptDelivery { .. }) => {}
            Err(error) => {
                summary.errors.push(format!("subscriber: {error}"));
                break;
            }
        }
    }
    let seconds = Timestamp::now()
        .saturating_duration_since(started)
        .as_secs_f64();
    let stats = subscriber.stats();
    let _ = subscriber.close();
    summary.seconds = seconds;
    summary.messages_received = stats.messages;
    summary.bytes_received = stats.message_bytes;
    summary.corrupt = stats.corrupt_batches;
    summary.position_gaps = stats.positions.gaps;
    summary.position_duplicates = stats.positions.duplicates;
    summary.subscriber_redirects = stats.redirects;
    summary.mb_per_s = stats.message_bytes as f64 / 1e6 / seconds.max(1e-9);
    summary.msgs_per_s = stats.messages as f64 / seconds.max(1e-9);
    summary.passed = summary.errors.is_empty()
        && summary.corrupt == 0
        && summary.position_gaps == 0
        && summary.position_duplicates == 0;
    summary
}
