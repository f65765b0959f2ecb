//! The `loadgen` binary against the loopback test peer (`support/mod.rs`): exit codes and
//! the JSON summary for passing and failing runs.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use client::summary::Summary;
use support::TestPeer;
use wire::ErrorCode;

fn json_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("loadgen-{name}-{}.json", std::process::id()))
}

/// Runs loadgen with these flags plus `--brokers` and `--json`; returns the process output
/// and the summary it wrote.
fn loadgen(name: &str, peers: &[TestPeer], flags: &str) -> (Output, Summary) {
    let brokers: Vec<String> = peers.iter().map(|p| p.addr.to_string()).collect();
    let json = json_path(name);
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--brokers",
            &brokers.join(","),
            "--progress",
            "none",
            "--json",
        ])
        .arg(&json)
        .args(flags.split_whitespace())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_else(|error| {
        panic!(
            "no JSON summary ({error}); stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let _ = std::fs::remove_file(&json);
    (output, serde_json::from_str(&text).unwrap())
}

#[test]
fn end_to_end_run_passes_and_honours_connections_and_publishers() {
    let peers = TestPeer::cluster(2, |_| {});
    let (output, summary) = loadgen(
        "e2e",
        &peers,
        "--test end-to-end --order 2 --connections-per-broker 2 --publishers 2 --message-bytes 100 --total-bytes 200KB --drain-timeout-s 3",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        (
            summary.publishers,
            summary.connections,
            summary.connections_per_broker
        ),
        (2, 8, 2)
    );
    assert_eq!(summary.messages_sent, 2000);
    assert_eq!(summary.messages_acked, 2000);
    assert_eq!(summary.bytes_acked, 200_000);
    assert_eq!(summary.messages_received, 2000);
    assert_eq!(
        (
            summary.lost,
            summary.duplicates,
            summary.order_violations,
            summary.corrupt
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(summary.order_check, "per_connection");
    assert_eq!(summary.backend, "kernel");
    assert!(summary.passed && summary.errors.is_empty());
    assert!(summary.mb_per_s > 0.0 && summary.ack_latency_us.count > 0);
    // 2 publishers x 2 brokers x 2 connections, plus CreateTopic on the head broker.
    assert_eq!(peers[0].state(|s| s.hellos), 4 + 4 + 1);
    assert!(peers[0].state(|s| s.topics.contains_key("loadgen")));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("connections (total)") && stdout.contains("passed"),
        "{stdout}"
    );
}

#[test]
fn end_to_end_run_fails_on_a_lost_batch() {
    // The peer acknowledges batch 3 but never stores it: lost messages and a position gap.
    let peers = TestPeer::cluster(1, |b| b.drop_batch = Some(3));
    let (output, summary) = loadgen(
        "lost",
        &peers,
        "--test end-to-end --message-bytes 64 --total-bytes 64000 --batch-bytes 4KiB --drain-timeout-s 1",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(summary.lost > 0, "{summary:?}");
    assert_eq!(summary.position_gaps, 1);
    assert!(!summary.passed);
}

#[test]
fn paced_publish_run_keeps_its_rate() {
    let peers = TestPeer::cluster(1, |_| {});
    let (output, summary) = loadgen(
        "paced",
        &peers,
        "--test latency --duration-s 0.5 --rate-msgs-per-s 2000 --message-bytes 64",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(summary.linger_us, 0);
    // Paced, the run sends exactly the messages due within it (0.5 s at 2000/s), however
    // late a loaded machine sends them; how late is a benchmark's question, not a test's.
    assert_eq!(summary.messages_sent, 1_000);
    assert_eq!(summary.messages_acked, summary.messages_sent);
    // One message per batch, every acknowledged message measured from its due time, and
    // every message delivered to the run's own subscriber measured too.
    assert_eq!(summary.messages_per_batch, 1);
    assert_eq!(summary.batches_acked, summary.messages_acked);
    assert_eq!(
        summary.ack_latency_from_intended_us.count,
        summary.messages_acked
    );
    assert_eq!(summary.messages_received, summary.messages_acked);
    assert_eq!(
        summary.e2e_latency_from_intended_us.count,
        summary.messages_received
    );
    assert_eq!(summary.lost, 0);
    let e2e = &summary.latency_distributions_us.e2e_from_intended;
    assert_eq!(
        e2e.last().map(|p| (p.percentile, p.count)),
        Some((100.0, summary.messages_received))
    );
    assert!(
        summary.loadgen_cpu_cores > 0.0,
        "{}",
        summary.loadgen_cpu_cores
    );
}

#[test]
fn refused_publishers_fail_the_run() {
    let peers = TestPeer::cluster(1, |b| b.refuse_hello = Some(ErrorCode::OrderMismatch));
    let (output, summary) = loadgen(
        "refused",
        &peers,
        "--create-topic false --total-bytes 10KB --publishers 3",
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(summary.errors.len(), 3, "{:?}", summary.errors);
    assert!(
        summary.errors[0].contains("order mismatch"),
        "{:?}",
        summary.errors
    );
}

#[test]
fn subscribe_run_reads_what_was_published() {
    let peers = TestPeer::cluster(1, |_| {});
    let (output, _) = loadgen("fill", &peers, "--message-bytes 100 --total-bytes 50KB");
    assert!(output.status.success());
    let (output, summary) = loadgen(
        "read",
        &peers,
        "--test subscribe --message-bytes 100 --total-bytes 50KB",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        (summary.messages_received, summary.bytes_received),
        (500, 50_000)
    );
    assert_eq!((summary.publishers, summary.connections), (0, 0));
    assert!(summary.passed);
}
