//! Ack level 2 against real brokers: four in-process brokers on loopback, each replicating
//! to files of its own, a topic with replication factor 2, driven by the real `loadgen`.
//! Every acknowledged message must be delivered once and in order, and every replica file
//! must hold the log's batches, in order, with the bytes the pool holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use broker::server::in_process::InProcessCluster;
use broker::server::replica::{ReplicaConfig, read_records};
use client::summary::Summary;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;

fn replica_dir(root: &Path, broker: u16) -> PathBuf {
    root.join(format!("broker-{broker}"))
}

fn loadgen(brokers: &str, json: &Path, extra: &[&str]) -> Summary {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--brokers", brokers, "--progress", "none", "--json"])
        .arg(json)
        .args(extra)
        .output()
        .expect("run loadgen");
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}); loadgen said:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary: Summary = serde_json::from_str(&text).expect("summary JSON");
    assert!(
        output.status.success(),
        "loadgen failed: {:?}",
        summary.errors
    );
    summary
}

#[test]
fn ack_2_waits_for_replica_files_that_hold_the_whole_log_in_order() {
    let root = std::env::temp_dir().join(format!("embarcadero-replication-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let geometry = Geometry {
        brokers_max: 4,
        topics_max: 4,
        ring_slots: 256,
        goi_entries: 1 << 16,
        blog_bytes: 8 << 20,
    };
    let dirs = root.clone();
    let cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.settings.replication_factor = 2;
        options.replica = Some(ReplicaConfig {
            dir: replica_dir(&dirs, options.settings.broker_id),
            sync_bytes: 256 << 10,
            sync_interval_us: 1_000,
            segment_bytes: broker::server::replica::SEGMENT_BYTES_DEFAULT,
        });
    })
    .expect("start 4 brokers");
    let brokers: Vec<String> = cluster
        .addresses()
        .iter()
        .map(ToString::to_string)
        .collect();
    let summary = loadgen(
        &brokers.join(","),
        &root.join("summary.json"),
        &[
            "--test",
            "end-to-end",
            "--topic",
            "durable",
            "--order",
            "5",
            "--ack",
            "2",
            "--message-bytes",
            "1024",
            "--total-bytes",
            "4MiB",
            "--connections-per-broker",
            "1",
            "--drain-timeout-s",
            "20",
        ],
    );
    assert!(summary.passed, "{:?}", summary.errors);
    assert_eq!(summary.messages_acked, summary.messages_sent);
    assert_eq!(summary.messages_received, summary.messages_sent);
    assert_eq!(
        (summary.lost, summary.duplicates, summary.order_violations),
        (0, 0, 0)
    );
    drop(cluster);
    // The brokers synced everything on their clean stop: each file is the whole log.
    for broker in 0..4 {
        let records = read_records(&replica_dir(&root, broker), 0).unwrap();
        let messages: u64 = records
            .iter()
            .map(|r| u64::from(r.header.message_count))
            .sum();
        assert_eq!(messages, summary.messages_sent, "broker {broker}'s replica");
        let mut position = 0;
        for (ordinal, record) in records.iter().enumerate() {
            assert_eq!(record.header.ordinal, ordinal as u64);
            assert_eq!(record.header.global_start, position);
            assert_eq!(
                wire::payload::checksum(&record.payload),
                record.header.checksum
            );
            position += u64::from(record.header.message_count);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ack_2_is_not_given_while_no_replica_holds_the_batch() {
    let geometry = Geometry {
        brokers_max: 2,
        topics_max: 4,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: 4 << 20,
    };
    // Replication factor 2, but no broker replicates: nothing may be acknowledged at ack 2,
    // while ack 1 on the same topic is.
    let cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |_| {})
        .expect("start 2 brokers");
    let spec = client::TopicSpec {
        topic: "unreplicated".into(),
        order: 2,
        ack: 2,
        replication_factor: 1,
        hold_for_subscribers: false,
        retention_bytes: 0,
        retention_ms: 0,
    };
    client::create_topic(cluster.addresses()[0], &spec, Duration::from_secs(5)).expect("create");
    let connect = |ack: u8| {
        let mut config = client::PublisherConfig::new(cluster.addresses(), "unreplicated");
        config.ack = ack;
        config.blocking = false;
        client::Publisher::connect(config).expect("connect")
    };
    let mut durable = connect(2);
    let mut ordered = connect(1);
    for publisher in [&mut durable, &mut ordered] {
        for i in 0..16u32 {
            publisher.publish(&i.to_le_bytes()).expect("publish");
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        durable.poll().expect("poll");
        ordered.poll().expect("poll");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(ordered.messages_acked(), 16, "ack 1 goes through");
    assert_eq!(durable.messages_acked(), 0, "ack 2 without a replica");
}
