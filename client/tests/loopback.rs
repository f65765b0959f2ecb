//! The socket adapters against the loopback test peer (`support/mod.rs`): connections,
//! round-robin spread, acks, flush and close, Goodbye on close and on drop, refusals,
//! errors, gap skips, the subscriber, and topic creation.

mod support;

use std::time::{Duration, Instant};

use client::verify::{DeliveryContext, MessageFactory, OrderCheck, Verdict, Verifier};
use client::{
    ClientError, Publisher, PublisherConfig, PublisherEvent, Subscriber, SubscriberConfig,
    TopicSpec, create_topic,
};
use support::{Behaviour, TestPeer};
use wire::ErrorCode;

fn config(peers: &[TestPeer]) -> PublisherConfig {
    let mut config = PublisherConfig::new(peers.iter().map(|p| p.addr).collect(), "loopback");
    config.linger_us = 0;
    config.connect_timeout_ms = 2_000;
    config.flush_timeout_ms = 3_000;
    config.goodbye_timeout_ms = 500;
    config
}

/// Subscribes (order 2) through `peer` and reads until `messages` arrived or 10 s passed,
/// checking each: from `client_id`, whole, and in its connection's order (the publisher had
/// `connections`). Returns the subscriber, for the caller's checks of what arrived.
fn read_and_verify(peer: &TestPeer, client_id: u64, connections: u64, messages: u64) -> Subscriber {
    let mut sub_config = SubscriberConfig::new(peer.addr, "loopback");
    sub_config.order = 2;
    let mut subscriber = Subscriber::connect(sub_config).unwrap();
    let mut verifier = Verifier::new(OrderCheck::for_order(2, connections), &[client_id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscriber.stats().messages < messages && Instant::now() < deadline {
        let Some(batch) = subscriber.next_batch(Duration::from_millis(200)).unwrap() else {
            continue;
        };
        assert_eq!(batch.client_id, client_id);
        let context = DeliveryContext {
            client_id: batch.client_id,
            batch_seq: batch.batch_seq,
        };
        for message in batch.messages() {
            assert_eq!(verifier.on_message(&context, message), Verdict::Ok);
        }
    }
    subscriber
}

#[test]
fn batches_spread_over_every_connection_of_every_broker() {
    let peers = TestPeer::cluster(2, |_| {});
    let mut config = config(&peers);
    config.connections_per_broker = 2;
    let mut publisher = Publisher::connect(config).unwrap();
    assert_eq!(publisher.connection_count(), 4);
    for i in 0..40u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.close().unwrap();
    let stats = publisher.stats();
    assert_eq!((stats.messages_acked, stats.batches_acked), (40, 40));
    assert_eq!(stats.batches_per_connection, [10, 10, 10, 10]);
    assert!(stats.ack_latency_us.count == 40 && stats.ack_latency_us.max > 0);
    let peer = &peers[0];
    assert_eq!(peer.state(|s| s.hellos), 4);
    let spread = peer.state(|s| {
        let mut counts: Vec<_> = s
            .batches_per_connection
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        counts.sort();
        counts
    });
    assert_eq!(
        spread,
        [((0, 0), 10), ((0, 1), 10), ((1, 0), 10), ((1, 1), 10)]
    );
    // Every connection said Goodbye and was closed.
    assert!(
        peer.wait_for(Duration::from_secs(2), |s| s.goodbyes_received == 4
            && s.connections_closed == 4)
    );
    assert!(matches!(
        publisher.publish(b"late"),
        Err(ClientError::Closed { .. })
    ));
}

#[test]
fn subscriber_reads_every_message_in_global_order() {
    let peers = TestPeer::cluster(2, |_| {});
    let mut config = config(&peers);
    // The test peer is no sequencer: positions follow arrival, so across two brokers only
    // the per-connection order (orders 1 and 2) holds.
    config.order = 2;
    config.batch_bytes_max = 1_000;
    config.linger_us = 200;
    let client_id = config.client_id;
    let mut publisher = Publisher::connect(config).unwrap();
    let mut factory = MessageFactory::new(0, 100).unwrap();
    for seq in 0..500 {
        publisher.publish(factory.message(seq)).unwrap();
    }
    publisher.close().unwrap();

    let mut subscriber = read_and_verify(&peers[1], client_id, 2, 500);
    let stats = subscriber.stats();
    assert_eq!(stats.messages, 500);
    assert_eq!(stats.message_bytes, 50_000);
    assert!(stats.positions.is_clean(), "{stats:?}");
    assert_eq!(stats.positions.next_position, Some(500));
    // Nothing more arrives; the timeout is honoured.
    let started = Instant::now();
    assert!(
        subscriber
            .next_batch(Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    subscriber.close().unwrap();
    assert!(peers[1].wait_for(Duration::from_secs(2), |s| s.goodbyes_received == 3));
}

#[test]
fn subscriber_counts_position_gaps() {
    let peers = TestPeer::cluster(1, |b| b.drop_batch = Some(2));
    let mut publisher = Publisher::connect(config(&peers)).unwrap();
    for i in 0..5u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.close().unwrap();
    let mut subscriber =
        Subscriber::connect(SubscriberConfig::new(peers[0].addr, "loopback")).unwrap();
    while subscriber
        .next_batch(Duration::from_millis(200))
        .unwrap()
        .is_some()
    {}
    let positions = subscriber.stats().positions;
    assert_eq!((positions.gaps, positions.missing_positions), (1, 1));
}

#[test]
fn refused_hello_is_a_typed_error_and_closes_what_was_opened() {
    let peers = TestPeer::cluster(1, |b| b.refuse_hello = Some(ErrorCode::UnknownTopic));
    let error = Publisher::connect(config(&peers)).unwrap_err();
    assert_eq!(error.broker_code(), Some(ErrorCode::UnknownTopic));
    assert!(peers[0].wait_for(Duration::from_secs(2), |s| s.connections_closed == 1));
}

#[test]
fn nothing_listening_fails_fast() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = PublisherConfig::new(vec![addr], "loopback");
    config.connect_timeout_ms = 1_000;
    let started = Instant::now();
    assert!(matches!(
        Publisher::connect(config),
        Err(ClientError::Connect { .. } | ClientError::HandshakeTimeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn non_blocking_window_gives_would_block_and_close_still_closes() {
    let peers = TestPeer::cluster(1, |b| b.ack = false);
    let mut config = config(&peers);
    config.blocking = false;
    config.in_flight_batches_max = 3;
    config.batch_bytes_max = 8;
    config.flush_timeout_ms = 300;
    let mut publisher = Publisher::connect(config).unwrap();
    let mut published = 0;
    let error = loop {
        match publisher.publish(&[7; 4]) {
            Ok(()) => published += 1,
            Err(error) => break error,
        }
        assert!(published < 100, "the window never filled");
    };
    assert!(error.is_would_block(), "{error}");
    // Three batches in flight plus the message held in the open batch.
    assert_eq!(published, 4);
    assert_eq!(publisher.in_flight(0), 3);
    let started = Instant::now();
    let error = publisher.close().unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Timeout {
                what: "flush",
                outstanding_batches: 3,
                ..
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(peers[0].wait_for(Duration::from_secs(2), |s| s.connections_closed == 1));
}

#[test]
fn blocking_publish_times_out_when_acks_never_come() {
    let peers = TestPeer::cluster(1, |b| b.ack = false);
    let mut config = config(&peers);
    config.in_flight_batches_max = 1;
    config.batch_bytes_max = 8;
    config.publish_timeout_ms = 200;
    let mut publisher = Publisher::connect(config).unwrap();
    publisher.publish(&[1; 4]).unwrap();
    publisher.publish(&[2; 4]).unwrap();
    let error = publisher.publish(&[3; 4]).unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Timeout {
                what: "blocking publish waiting for window space",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn drop_without_close_closes_every_connection() {
    let peers = TestPeer::cluster(2, |_| {});
    let mut config = config(&peers);
    config.connections_per_broker = 3;
    let mut publisher = Publisher::connect(config).unwrap();
    publisher.publish(b"one").unwrap();
    publisher.poll().unwrap();
    let started = Instant::now();
    drop(publisher);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        peers[0].wait_for(Duration::from_secs(2), |s| s.goodbyes_received == 6
            && s.connections_closed == 6)
    );
}

#[test]
fn gap_skipped_batches_are_reported_not_lost_silently() {
    let peers = TestPeer::cluster(1, |b| b.gap_skip = Some(3));
    let mut config = config(&peers);
    config.order = 5;
    let mut publisher = Publisher::connect(config).unwrap();
    for i in 0..6u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.flush().unwrap();
    let stats = publisher.stats();
    assert_eq!(
        (
            stats.batches_acked,
            stats.batches_rejected,
            stats.messages_rejected
        ),
        (5, 1, 1)
    );
    let events = publisher.take_events();
    assert!(matches!(
        &events[..],
        [PublisherEvent::Rejected {
            batch_seq: 3,
            first_message_index: Some(3),
            message_count: Some(1),
            ..
        }]
    ));
    publisher.close().unwrap();
}

#[test]
fn closing_error_fails_the_publisher_with_its_code() {
    let peers = TestPeer::cluster(1, |b| b.fail_batch = Some((2, ErrorCode::PayloadMalformed)));
    let mut publisher = Publisher::connect(config(&peers)).unwrap();
    for i in 0..4u32 {
        // The failure may surface on a publish or only at the flush.
        if publisher.publish(&i.to_le_bytes()).is_err() {
            break;
        }
    }
    let error = publisher.flush().unwrap_err();
    assert_eq!(
        error.broker_code(),
        Some(ErrorCode::PayloadMalformed),
        "{error}"
    );
    assert!(error.to_string().contains("for batch 2"), "{error}");
    let again = publisher.publish(b"x").unwrap_err();
    assert_eq!(again.broker_code(), Some(ErrorCode::PayloadMalformed));
}

#[test]
fn ack_zero_is_done_once_written() {
    let peers = TestPeer::cluster(1, |_| {});
    let mut config = config(&peers);
    config.ack = 0;
    let mut publisher = Publisher::connect(config).unwrap();
    for i in 0..20u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.close().unwrap();
    let stats = publisher.stats();
    assert_eq!((stats.messages_sent, stats.messages_acked), (20, 0));
    assert!(peers[0].wait_for(Duration::from_secs(2), |s| s.log.len() == 20));
}

#[test]
fn batch_limit_is_capped_by_hello_ok() {
    let peers = TestPeer::cluster(2, |b| b.batch_bytes_max = 4096 + u32::from(b.broker_id));
    let mut config = config(&peers);
    config.batch_bytes_max = 1 << 20;
    let publisher = Publisher::connect(config).unwrap();
    assert_eq!(publisher.batch_bytes_max(), 4096);
}

#[test]
fn create_topic_is_idempotent_and_refuses_other_settings() {
    let peers = TestPeer::cluster(1, |_| {});
    let spec = TopicSpec {
        topic: "created".into(),
        order: 5,
        ack: 1,
        replication_factor: 0,
        hold_for_subscribers: false,
        retention_bytes: 0,
        retention_ms: 0,
    };
    let timeout = Duration::from_secs(2);
    assert!(create_topic(peers[0].addr, &spec, timeout).unwrap().created);
    assert!(!create_topic(peers[0].addr, &spec, timeout).unwrap().created);
    let other = TopicSpec { order: 2, ..spec };
    let error = create_topic(peers[0].addr, &other, timeout).unwrap_err();
    assert_eq!(error.broker_code(), Some(ErrorCode::TopicExists));
    assert!(
        peers[0].wait_for(Duration::from_secs(2), |s| s.connections_closed == 3
            && s.goodbyes_received == 2)
    );
}

#[test]
fn linger_zero_sends_one_message_per_batch() {
    let peers = TestPeer::cluster(1, |_| {});
    let mut publisher = Publisher::connect(config(&peers)).unwrap();
    for i in 0..50u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    publisher.close().unwrap();
    let stats = publisher.stats();
    assert_eq!(
        (stats.batches_acked, stats.ack_latency_us.count),
        (50, 50),
        "{stats:?}"
    );
}

#[test]
fn a_burst_writes_its_batches_together_and_each_arrives_whole_and_in_order() {
    let peers = TestPeer::cluster(2, |_| {});
    let mut config = config(&peers);
    // Per connection (the test peer is no sequencer), 4 connections.
    config.order = 2;
    config.connections_per_broker = 2;
    // One 1 KiB message per batch (its 4-byte length prefix included); a small send buffer,
    // so that sockets take part of a burst's write and the I/O thread writes the rest, from
    // inside a batch.
    config.batch_bytes_max = 1_028;
    config.socket_buffer_bytes = 8 << 10;
    let client_id = config.client_id;
    let mut publisher = Publisher::connect(config).unwrap();
    let mut factory = MessageFactory::new(0, 1_024).unwrap();
    // 2,000 batches are more than the windows hold (4 x 64): waiting for window space
    // writes what the burst holds first, or this would never end.
    publisher
        .burst(|publisher| {
            for seq in 0..2_000 {
                publisher.publish(factory.message(seq))?;
            }
            Ok(())
        })
        .unwrap();
    publisher.close().unwrap();
    let stats = publisher.stats();
    assert_eq!((stats.batches_acked, stats.messages_acked), (2_000, 2_000));
    assert!(
        stats.burst_writes > 0 && stats.burst_write_batches >= 2 * stats.burst_writes,
        "{stats:?}"
    );

    let mut subscriber = read_and_verify(&peers[0], client_id, 4, 2_000);
    assert_eq!(subscriber.stats().messages, 2_000);
    assert!(subscriber.stats().positions.is_clean());
    subscriber.close().unwrap();
}

/// A publisher of one 1 KiB message per batch, with a window of 4 batches.
fn small_window_publisher(
    peers: &[TestPeer],
    change: impl FnOnce(&mut PublisherConfig),
) -> Publisher {
    let mut config = config(peers);
    config.in_flight_batches_max = 4;
    config.batch_bytes_max = 1_028;
    config.publish_timeout_ms = 3_000;
    change(&mut config);
    Publisher::connect(config).unwrap()
}

/// Publishes `count` messages of 1 KiB in one burst, each through `publish` (which may
/// retry on WouldBlock).
fn publish_burst(
    publisher: &mut Publisher,
    count: u64,
    mut publish: impl FnMut(&mut Publisher, &[u8]) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut factory = MessageFactory::new(0, 1_024).unwrap();
    publisher
        .burst(|publisher| (0..count).try_for_each(|seq| publish(publisher, factory.message(seq))))
}

#[test]
fn a_burst_past_the_window_writes_what_it_holds_before_waiting() {
    let peers = TestPeer::cluster(1, |_| {});
    // At ack 0 a batch is done once written, and nothing (no ack, no I/O event) follows
    // a direct write: a wait for window space that did not look again after writing what
    // the burst held waited out its timeout.
    let mut publisher = small_window_publisher(&peers, |c| c.ack = 0);
    let publish = |p: &mut Publisher, m: &[u8]| p.publish(m);
    publish_burst(&mut publisher, 10, publish).unwrap();
    // A session rolled over inside a burst (at ack 0, by the write): its Goodbye and new
    // connection are carried out before anything waits.
    let mut publisher = small_window_publisher(&peers, |c| {
        c.ack = 0;
        c.session_batches_max = 4;
    });
    publish_burst(&mut publisher, 10, publish).unwrap();
    // A flush inside a burst.
    let mut publisher = small_window_publisher(&peers, |c| c.ack = 0);
    publisher
        .burst(|p| {
            p.publish(b"a")?;
            p.publish(b"b")?;
            p.flush()
        })
        .unwrap();
    // Non-blocking: WouldBlock comes after what the burst holds is on its way, so the
    // acks that make room come.
    let mut publisher = small_window_publisher(&peers, |c| c.blocking = false);
    let deadline = Instant::now() + Duration::from_secs(3);
    publish_burst(&mut publisher, 20, |p, m| {
        loop {
            match p.publish(m) {
                Err(e) if e.is_would_block() && Instant::now() < deadline => {
                    p.poll()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => return other,
            }
        }
    })
    .unwrap();
    publisher.close().unwrap();
    assert_eq!(publisher.stats().batches_acked, 20);
}

#[test]
fn publisher_and_subscriber_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Publisher>();
    assert_send::<Subscriber>();
    assert_send::<ClientError>();
}

#[test]
fn a_lost_broker_is_replaced_and_taken_back_once_it_restarts() {
    let mut peers = TestPeer::cluster(2, |_| {});
    let mut config = config(&peers);
    config.reconnect_timeout_ms = 5_000;
    let mut publisher = Publisher::connect(config).unwrap();
    let batches_on_broker_1 = |peer: &TestPeer| {
        peer.state(|s| {
            s.batches_per_connection
                .iter()
                .filter(|(k, _)| k.0 == 1)
                .map(|(_, v)| *v)
                .sum::<u64>()
        })
    };
    for i in 0..10u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.flush().unwrap();
    assert_eq!(batches_on_broker_1(&peers[0]), 5);

    // Broker 1 goes away: its slot moves to broker 0 and the publisher goes on.
    let gone = peers.pop().unwrap();
    let (addr, shared) = (gone.addr, gone.shared.clone());
    drop(gone);
    for i in 10..20u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.flush().unwrap();
    let stats = publisher.stats();
    assert_eq!(
        (stats.connections_lost, stats.reconnects),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.messages_acked, 20);
    assert_eq!(
        batches_on_broker_1(&peers[0]),
        5,
        "nothing reached broker 1"
    );
    assert_eq!(
        publisher.hello_oks().len(),
        2,
        "both slots have a connection"
    );

    // It restarts on the same address: the background probe finds it and the slot returns.
    let revived = TestPeer::start_at(addr, Behaviour::new(1), shared);
    let deadline = Instant::now() + Duration::from_secs(5);
    while publisher
        .hello_oks()
        .iter()
        .filter(|ok| ok.broker_id == 1)
        .count()
        == 0
    {
        assert!(Instant::now() < deadline, "the publisher never went back");
        publisher.poll().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 20..30u32 {
        publisher.publish(&i.to_le_bytes()).unwrap();
    }
    publisher.close().unwrap();
    let stats = publisher.stats();
    assert_eq!(
        (stats.reconnects, stats.messages_acked),
        (2, 30),
        "{stats:?}"
    );
    assert_eq!(
        batches_on_broker_1(&revived),
        10,
        "5 before the crash, 5 after the slot went home"
    );
    // The peers share their counters: Goodbye on the stand-in connection to broker 0 when
    // the slot went home, then on both connections at close.
    assert!(
        peers[0].wait_for(Duration::from_secs(2), |s| s.goodbyes_received == 3),
        "{}",
        peers[0].state(|s| s.goodbyes_received)
    );
}
