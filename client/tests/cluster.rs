//! End to end against real brokers: four brokers (in this process, real loopback TCP, one
//! shared pool in non-coherent mode) driven by the real `loadgen` binary in end-to-end mode,
//! for every order (0, 1, 2, 5) and ack level (0, 1), and with a broker killed mid-run. A
//! subscriber verifies every message; the assertions read the loadgen's JSON summary, never
//! its log text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use broker::server::in_process::InProcessCluster;
use broker::server::sequencing::SequencerPlacement;
use client::summary::Summary;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;

fn start(geometry: Geometry) -> InProcessCluster {
    start_placed(geometry, SequencerPlacement::Thread)
}

/// Brokers whose head runs its sequencer as `placement` says.
fn start_placed(geometry: Geometry, placement: SequencerPlacement) -> InProcessCluster {
    // An order-5 hold far above any delay a loaded machine causes: a batch that is merely
    // late must not be skipped by the gap rule; a lost one still fails the run (undelivered).
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.sequencer_placement = placement;
    })
    .expect("start 4 brokers")
}

fn addresses(cluster: &InProcessCluster) -> String {
    let addrs: Vec<String> = cluster
        .addresses()
        .iter()
        .map(ToString::to_string)
        .collect();
    addrs.join(",")
}

fn geometry(ring_slots: u32, blog_bytes: u64) -> Geometry {
    Geometry {
        brokers_max: 4,
        topics_max: 8,
        ring_slots,
        goi_entries: 1 << 16,
        blog_bytes,
    }
}

/// The loadgen command for these flags, and the summary file it writes.
fn loadgen_command(brokers: &str, extra: &[&str]) -> (Command, PathBuf) {
    let dir = std::env::temp_dir().join(format!("embarcadero-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join(format!(
        "summary-{}.json",
        extra.join("_").replace(['-', ' '], "")
    ));
    let mut command = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    command
        .args(["--brokers", brokers, "--progress", "none", "--json"])
        .arg(&json)
        .args(extra);
    (command, json)
}

/// Reads the summary a finished loadgen wrote.
fn summary(json: &Path, output: &Output) -> Summary {
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}); loadgen said:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(&text).expect("summary JSON")
}

/// Runs the loadgen binary and returns its summary.
fn loadgen(brokers: &str, extra: &[&str]) -> (Summary, std::process::ExitStatus) {
    let (mut command, json) = loadgen_command(brokers, extra);
    let output = command.output().expect("run loadgen");
    (summary(&json, &output), output.status)
}

/// Nothing lost, duplicated, misordered, corrupt, or at a wrong position.
fn assert_delivered_cleanly(summary: &Summary) {
    assert_eq!(
        (summary.lost, summary.duplicates, summary.order_violations),
        (0, 0, 0)
    );
    assert_eq!(
        (
            summary.corrupt,
            summary.position_gaps,
            summary.position_duplicates
        ),
        (0, 0, 0)
    );
}

/// Each test runs four brokers and a loadgen: one at a time on a 2-core machine.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn end_to_end(order: u8, ack: u8) {
    end_to_end_placed(order, ack, SequencerPlacement::Thread);
}

fn end_to_end_placed(order: u8, ack: u8, placement: SequencerPlacement) {
    let _serial = serial();
    let cluster = start_placed(geometry(256, 8 << 20), placement);
    let topic = format!("e2e-{order}-{ack}");
    let (order_text, ack_text) = (order.to_string(), ack.to_string());
    let (summary, status) = loadgen(
        &addresses(&cluster),
        &[
            "--test",
            "end-to-end",
            "--topic",
            &topic,
            "--order",
            &order_text,
            "--ack",
            &ack_text,
            "--message-bytes",
            "1024",
            "--total-bytes",
            "8MiB",
            "--connections-per-broker",
            "2",
            "--drain-timeout-s",
            "20",
        ],
    );
    assert!(status.success(), "loadgen failed: {:?}", summary.errors);
    assert!(summary.passed, "{:?}", summary.errors);
    assert_eq!(
        summary.connections, 8,
        "2 connections to each of 4 brokers, honoured exactly"
    );
    assert_eq!(summary.messages_sent, 8 * 1024 * 1024 / 1024);
    assert_eq!(
        summary.messages_received, summary.messages_sent,
        "every message delivered"
    );
    if ack == 1 {
        assert_eq!(
            summary.messages_acked, summary.messages_sent,
            "every message acknowledged"
        );
    }
    assert_delivered_cleanly(&summary);
    assert_eq!(
        cluster.batches_dropped(),
        0,
        "a broker lost track of an accepted batch"
    );
}

#[test]
fn order_0_ack_0() {
    end_to_end(0, 0);
}

#[test]
fn order_0_ack_1() {
    end_to_end(0, 1);
}

#[test]
fn order_1_ack_0() {
    end_to_end(1, 0);
}

#[test]
fn order_1_ack_1() {
    end_to_end(1, 1);
}

#[test]
fn order_2_ack_0() {
    end_to_end(2, 0);
}

#[test]
fn order_2_ack_1() {
    end_to_end(2, 1);
}

#[test]
fn order_5_ack_0() {
    end_to_end(5, 0);
}

#[test]
fn order_5_ack_1() {
    end_to_end(5, 1);
}

/// The head's sequencer in its network loop: every broker's batches (the head's own in
/// the same pass, the others' from their rings) acknowledged, delivered once, in order.
#[test]
fn order_5_ack_1_with_the_sequencer_inline() {
    end_to_end_placed(5, 1, SequencerPlacement::Inline);
}

#[test]
fn order_2_ack_1_with_the_sequencer_inline() {
    end_to_end_placed(2, 1, SequencerPlacement::Inline);
}

#[test]
fn a_pool_that_fills_during_the_run_pushes_back_and_delivers_everything() {
    let _serial = serial();
    // 8 ring slots and 256 KiB payload logs per broker against 16 MiB of traffic.
    let cluster = start(geometry(8, 256 * 1024));
    let (summary, status) = loadgen(
        &addresses(&cluster),
        &[
            "--test",
            "end-to-end",
            "--topic",
            "tight",
            "--order",
            "5",
            "--ack",
            "1",
            "--message-bytes",
            "1024",
            "--total-bytes",
            "16MiB",
            "--connections-per-broker",
            "1",
            "--drain-timeout-s",
            "30",
        ],
    );
    assert!(status.success() && summary.passed, "{:?}", summary.errors);
    assert_eq!(summary.messages_received, summary.messages_sent);
    assert_eq!(
        (summary.lost, summary.duplicates, summary.order_violations),
        (0, 0, 0)
    );
    let waits: u64 = cluster
        .brokers()
        .iter()
        .map(|b| {
            b.metrics()
                .ring_full_waits
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(
        waits > 0,
        "the pool never filled: this test would prove nothing"
    );
    assert_eq!(
        cluster.batches_dropped(),
        0,
        "a broker lost track of an accepted batch"
    );
    std::thread::sleep(Duration::from_millis(10));
}

/// A loadgen run at a paced rate (about 3 s) during which broker 2 is killed: the run
/// passes, every acknowledged message delivered exactly once and in order.
fn a_broker_killed_during_the_run(order: u8) {
    let _serial = serial();
    let mut cluster = start(geometry(256, 8 << 20));
    let topic = format!("killed-{order}");
    let order_text = order.to_string();
    let (mut command, json) = loadgen_command(
        &addresses(&cluster),
        &[
            "--test",
            "end-to-end",
            "--topic",
            &topic,
            "--order",
            &order_text,
            "--ack",
            "1",
            "--message-bytes",
            "1024",
            "--total-bytes",
            "24MiB",
            "--rate-msgs-per-s",
            "8000",
            "--connections-per-broker",
            "2",
            "--reconnect-timeout-ms",
            "5000",
            "--drain-timeout-s",
            "20",
        ],
    );
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loadgen");
    std::thread::sleep(Duration::from_secs(1));
    assert!(cluster.kill_broker(2));
    let output = child.wait_with_output().expect("loadgen ends");
    let summary = summary(&json, &output);
    assert!(
        output.status.success() && summary.passed,
        "{:?}\n{}",
        summary.errors,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(summary.messages_sent, 24 * 1024);
    assert_eq!(summary.messages_acked, summary.messages_sent);
    assert_eq!(summary.messages_received, summary.messages_sent);
    assert_delivered_cleanly(&summary);
    assert!(
        summary.reconnects >= 2,
        "both connections to broker 2 were replaced: {summary:?}"
    );
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn order_5_loadgen_run_survives_a_killed_broker() {
    a_broker_killed_during_the_run(5);
}

#[test]
fn order_2_loadgen_run_survives_a_killed_broker() {
    a_broker_killed_during_the_run(2);
}
