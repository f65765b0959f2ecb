//! History beyond the pool, across brokers (in-process, kernel TCP): a broker without a
//! replica of the topic redirects a subscriber asking for positions the pool no longer
//! holds to the broker that keeps them on disk, which serves them in order from position 0.

mod support;

use std::time::{Duration, Instant};

use broker::server::in_process::InProcessCluster;
use broker::server::replica::ReplicaConfig;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use support::{Client, Received, publisher};
use wire::{AckLevel, Frame, Order, Role};

/// Batches of 8 messages of 1 KiB: 128 of them are four times a payload log.
const BATCHES: u64 = 128;
const MESSAGES_PER_BATCH: u64 = 8;
const BLOG_BYTES: u64 = 256 << 10;

fn message(batch: u64, index: u64) -> Vec<u8> {
    let mut bytes = vec![(batch as u8) ^ (index as u8); 1024];
    bytes[..16].copy_from_slice(&[batch.to_le_bytes(), index.to_le_bytes()].concat());
    bytes
}

#[test]
fn a_broker_without_the_history_redirects_to_the_broker_that_keeps_it_on_disk() {
    let dir = std::env::temp_dir().join(format!("embarcadero-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let geometry = Geometry {
        brokers_max: 2,
        topics_max: 2,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: BLOG_BYTES,
    };
    let cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.settings.auto_create_topics = true;
        options.settings.replication_factor = 2;
        // Broker 1 alone keeps the topic on disk.
        if options.settings.broker_id == 1 {
            options.replica = Some(ReplicaConfig {
                dir: dir.clone(),
                sync_bytes: 64 << 10,
                sync_interval_us: 1_000,
            });
            options.settings.history_dir = Some(dir.clone());
        }
    })
    .unwrap();
    let addrs = cluster.addresses();

    let mut publisher = publisher(addrs[0], "history", Order::TotalSessionFifo, 7);
    for seq in 0..BATCHES {
        let messages: Vec<Vec<u8>> = (0..MESSAGES_PER_BATCH).map(|i| message(seq, i)).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        publisher.batch(seq, &refs);
        // Acks as they come keep the window small; the pool wraps meanwhile.
        if seq % 16 == 15 {
            publisher.acks_through(seq);
        }
    }

    // Broker 0 keeps no replica: it names broker 1, at the address broker 1 advertised.
    let subscribe = |addr| {
        let mut client = Client::connect(addr);
        let role = Role::Subscribe {
            from_position: 0,
            batch_bytes_max: 0,
        };
        let answer = client.hello(
            "history",
            role,
            Order::TotalSessionFifo,
            AckLevel::FireAndForget,
            9,
        );
        (client, answer)
    };
    let (mut refused, answer) = subscribe(addrs[0]);
    let Frame::Redirect(redirect) = answer else {
        panic!("expected a Redirect from broker 0, got {answer:?}");
    };
    assert_eq!(redirect.brokers().len(), 1);
    let (to, id) = redirect.brokers()[0];
    assert_eq!((std::net::SocketAddr::V4(to), id), (addrs[1], 1));
    refused.expect_closed();

    // Broker 1 serves every message from position 0, in order, bytes intact: from its file,
    // then from the pool.
    let (mut subscriber, answer) = subscribe(addrs[1]);
    let Frame::HelloOk(ok) = answer else {
        panic!("expected HelloOk from broker 1, got {answer:?}");
    };
    assert_eq!(ok.log_start, 0, "the file keeps the topic from its start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next_position = 0;
    while next_position < BATCHES * MESSAGES_PER_BATCH {
        assert!(
            Instant::now() < deadline,
            "stalled at position {next_position}"
        );
        match subscriber.receive() {
            Received::Delivery(header, payload) => {
                assert_eq!(header.global_start, Some(next_position));
                wire::verify_payload(&header, &payload).unwrap();
                let seq = header.batch_seq;
                for (index, got) in wire::payload::messages(&payload).enumerate() {
                    assert_eq!(got.unwrap(), message(seq, index as u64), "batch {seq}");
                }
                next_position += u64::from(header.message_count);
            }
            Received::TimedOut => {}
            Received::Frame(frame) => panic!("unexpected {frame:?}"),
            Received::Closed => panic!("broker 1 closed at position {next_position}"),
        }
    }
    let served_from_disk = cluster.brokers()[1]
        .metrics()
        .history_batches_delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(served_from_disk > 0, "nothing came from the file");
    let redirects = cluster.brokers()[0]
        .metrics()
        .redirects_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(redirects, 1);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
