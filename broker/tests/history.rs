//! History beyond the pool, across brokers (in-process, kernel TCP): a broker without a
//! replica of the topic redirects a subscriber asking for positions the pool no longer
//! holds to the broker that keeps them on disk, which serves them in order from position 0,
//! across segment files; a topic's retention keeps the newest history, and older positions
//! are refused with where the log really starts.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker::server::in_process::InProcessCluster;
use broker::server::replica::{ReplicaConfig, read_records, segment_list};
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use support::{Client, Received, publisher};
use wire::{
    AckLevel, CreateTopicRepr, ErrorCode, Frame, HistoryRetention, Order, Retention, Role, Topic,
};

/// Batches of 8 messages of 1 KiB: 128 of them are four times a payload log.
const BATCHES: u64 = 128;
const MESSAGES_PER_BATCH: u64 = 8;
const BLOG_BYTES: u64 = 256 << 10;
/// Replica segments of 64 KiB: the history spans 16 of them.
const SEGMENT_BYTES: u64 = 64 << 10;

fn message(batch: u64, index: u64) -> Vec<u8> {
    let mut bytes = vec![(batch as u8) ^ (index as u8); 1024];
    bytes[..16].copy_from_slice(&[batch.to_le_bytes(), index.to_le_bytes()].concat());
    bytes
}

/// A fresh directory for broker 1's replica.
fn replica_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("embarcadero-history-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two brokers whose payload logs hold a quarter of what the test publishes; broker 1 alone
/// keeps replicated topics on disk, in `dir`.
fn cluster(dir: &Path) -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: 2,
        topics_max: 2,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: BLOG_BYTES,
    };
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.settings.auto_create_topics = true;
        options.settings.replication_factor = 2;
        if options.settings.broker_id == 1 {
            options.replica = Some(ReplicaConfig {
                dir: dir.to_owned(),
                sync_bytes: 64 << 10,
                sync_interval_us: 1_000,
                segment_bytes: SEGMENT_BYTES,
            });
            options.settings.history_dir = Some(dir.to_owned());
        }
    })
    .unwrap()
}

/// Publishes [`BATCHES`] batches to `topic` on broker 0. Once the first is acknowledged it
/// waits for broker 1's replica to copy it: from then on the replica holds the pool's
/// retention, so nothing is overwritten before it is on disk (a replica that starts after
/// the log wrapped cannot start, by design, and a starved test thread could see that).
fn publish(cluster: &InProcessCluster, topic: &str) {
    let mut publisher = publisher(cluster.addresses()[0], topic, Order::TotalSessionFifo, 7);
    let replica = &cluster.brokers()[1].metrics();
    for seq in 0..BATCHES {
        if seq == 1 {
            publisher.acks_through(0);
            let deadline = Instant::now() + Duration::from_secs(10);
            while replica.replica_batches.load(Ordering::Relaxed) == 0 {
                assert!(Instant::now() < deadline, "broker 1 does not replicate");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let messages: Vec<Vec<u8>> = (0..MESSAGES_PER_BATCH).map(|i| message(seq, i)).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        publisher.batch(seq, &refs);
        // Acks as they come keep the window small; the pool wraps meanwhile.
        if seq % 16 == 15 {
            publisher.acks_through(seq);
        }
    }
}

/// A subscriber of `topic` from `from_position`, and the broker's answer to its Hello.
fn subscribe(addr: std::net::SocketAddr, topic: &str, from_position: u64) -> (Client, Frame) {
    let mut client = Client::connect(addr);
    let role = Role::Subscribe {
        from_position,
        batch_bytes_max: 0,
    };
    let answer = client.hello(
        topic,
        role,
        Order::TotalSessionFifo,
        AckLevel::FireAndForget,
        9,
    );
    (client, answer)
}

/// Reads every message from `position` to the end of what was published, checking each
/// delivery's place and bytes.
fn read_to_end(subscriber: &mut Client, mut position: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while position < BATCHES * MESSAGES_PER_BATCH {
        assert!(Instant::now() < deadline, "stalled at position {position}");
        match subscriber.receive() {
            Received::Delivery(header, payload) => {
                assert_eq!(header.global_start, Some(position));
                wire::verify_payload(&header, &payload).unwrap();
                let seq = header.batch_seq;
                for (index, got) in wire::payload::messages(&payload).enumerate() {
                    assert_eq!(got.unwrap(), message(seq, index as u64), "batch {seq}");
                }
                position += u64::from(header.message_count);
            }
            Received::TimedOut => {}
            Received::Frame(frame) => panic!("unexpected {frame:?}"),
            Received::Closed => panic!("the broker closed at position {position}"),
        }
    }
}

#[test]
fn a_broker_without_the_history_redirects_to_the_broker_that_keeps_it_on_disk() {
    let dir = replica_dir("redirect");
    let cluster = cluster(&dir);
    let addrs = cluster.addresses();
    publish(&cluster, "history");

    // Broker 0 keeps no replica: it names broker 1, at the address broker 1 advertised.
    let (mut refused, answer) = subscribe(addrs[0], "history", 0);
    let Frame::Redirect(redirect) = answer else {
        panic!("expected a Redirect from broker 0, got {answer:?}");
    };
    assert_eq!(redirect.brokers().len(), 1);
    let (to, id) = redirect.brokers()[0];
    assert_eq!((std::net::SocketAddr::V4(to), id), (addrs[1], 1));
    refused.expect_closed();

    // Broker 1 serves every message from position 0, in order, bytes intact: from its
    // segments, then from the pool.
    let (mut subscriber, answer) = subscribe(addrs[1], "history", 0);
    let Frame::HelloOk(ok) = answer else {
        panic!("expected HelloOk from broker 1, got {answer:?}");
    };
    assert_eq!(
        ok.log_start, 0,
        "the replica keeps the topic from its start"
    );
    read_to_end(&mut subscriber, 0);
    assert!(
        segment_list(&dir, 0).unwrap().len() > 4,
        "history spans segments"
    );
    let served_from_disk = cluster.brokers()[1]
        .metrics()
        .history_batches_delivered
        .load(Ordering::Relaxed);
    assert!(served_from_disk > 0, "nothing came from the file");
    let redirects = cluster.brokers()[0]
        .metrics()
        .redirects_sent
        .load(Ordering::Relaxed);
    assert_eq!(redirects, 1);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_keeps_the_newest_history_and_older_positions_get_the_real_start() {
    let dir = replica_dir("retention");
    let cluster = cluster(&dir);
    let addrs = cluster.addresses();
    // Half of what is published stays on disk, in whole segments.
    let retention_bytes = BATCHES * MESSAGES_PER_BATCH * 1024 / 2;
    let mut admin = Client::connect(addrs[0]);
    let create = CreateTopicRepr {
        topic: Topic::new("retained").unwrap(),
        order: Order::TotalSessionFifo,
        ack: AckLevel::Replicated,
        replication_factor: 1,
        retention: Retention::StallLimited,
        history: HistoryRetention {
            bytes: retention_bytes,
            ms: 0,
        },
    };
    admin.send(&Frame::CreateTopic(create).to_bytes());
    match admin.frame() {
        Frame::TopicOk(ok) => assert_eq!(ok.history, create.history),
        other => panic!("expected TopicOk, got {other:?}"),
    }
    publish(&cluster, "retained");

    // Everything reaches the disk; retention runs right after each sync.
    let end = BATCHES * MESSAGES_PER_BATCH;
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = read_records(&dir, 0).unwrap();
        let last_end = records
            .last()
            .map(|r| r.header.global_start + u64::from(r.header.message_count));
        if last_end == Some(end) {
            std::thread::sleep(Duration::from_millis(100));
            break read_records(&dir, 0).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the replica stalled at {last_end:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let start = records[0].header.global_start;
    let kept: u64 = records
        .iter()
        .map(|r| 64 + u64::from(r.header.payload_bytes))
        .sum();
    assert!(start > 0, "retention deleted the oldest segments");
    assert!(
        kept >= retention_bytes && kept < retention_bytes + 2 * SEGMENT_BYTES,
        "{kept} bytes kept for a retention of {retention_bytes}"
    );

    // Older positions: refused with where the log starts.
    let (mut refused, answer) = subscribe(addrs[1], "retained", 0);
    let Frame::Error(error) = answer else {
        panic!("expected PositionTruncated, got {answer:?}");
    };
    assert_eq!(error.code, ErrorCode::PositionTruncated);
    let reason = error.reason();
    assert!(
        reason.contains(&format!("the log starts at {start}")),
        "{reason}"
    );
    refused.expect_closed();
    // From the start it names: everything, in order, from disk and then the pool.
    let (mut subscriber, answer) = subscribe(addrs[1], "retained", start);
    let Frame::HelloOk(ok) = answer else {
        panic!("expected HelloOk, got {answer:?}");
    };
    assert_eq!(ok.log_start, start);
    read_to_end(&mut subscriber, start);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
