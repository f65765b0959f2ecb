//! Brokers on kernel TCP (in-process, sharing one pool, real loopback sockets), driven by a
//! minimal client written with the `wire` crate: the happy path, and every bad input the
//! protocol names. Each bad input gets a specific Error frame; other connections and the log
//! are unaffected.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use broker::metrics::SequencerRole;
use broker::server::in_process::InProcessCluster;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use support::{Client, Received, http_get, publisher, subscriber};
use wire::{AckLevel, BatchHeaderRepr, ErrorCode, Frame, HelloRepr, Limits, Order, Role, Topic};

fn cluster(brokers: u16, ring_slots: u32, blog_bytes: u64) -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: u32::from(brokers),
        topics_max: 4,
        ring_slots,
        goi_entries: 1 << 14,
        blog_bytes,
    };
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        // Far above any delay a loaded machine causes: these tests do not test the gap rule.
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        // These tests publish to topics their Hellos name (topic creation has its own test).
        options.settings.auto_create_topics = true;
    })
    .unwrap()
}

#[test]
fn publishers_on_every_broker_are_acknowledged_and_a_subscriber_reads_one_order() {
    let cluster = cluster(4, 64, 1 << 20);
    let addrs = cluster.addresses();
    // One session (client 7) spread over all four brokers, seq 0..40 round-robin.
    let mut publishers_of_7: Vec<_> = addrs
        .iter()
        .map(|&a| publisher(a, "events", Order::TotalSessionFifo, 7))
        .collect();
    for seq in 0..40u64 {
        let text = format!("message {seq}");
        publishers_of_7[(seq % 4) as usize].batch(seq, &[text.as_bytes(), b"second"]);
    }
    let mut positions = Vec::new();
    for (i, client) in publishers_of_7.iter_mut().enumerate() {
        let last = 36 + i as u64;
        for entry in client.acks_through(last) {
            assert_eq!(entry.status, wire::AckStatus::Ordered);
            positions.push((entry.global_start.unwrap(), entry.batch_seq));
        }
    }
    positions.sort();
    let seqs: Vec<u64> = positions.iter().map(|p| p.1).collect();
    assert_eq!(
        seqs,
        (0..40).collect::<Vec<_>>(),
        "order 5: the session's batches in send order"
    );
    assert!(
        positions.windows(2).all(|w| w[1].0 == w[0].0 + 2),
        "contiguous positions"
    );

    let mut sub = subscriber(addrs[2], "events", Order::TotalSessionFifo, 0);
    for seq in 0..40u64 {
        match sub.receive() {
            Received::Delivery(header, payload) => {
                assert_eq!(header.batch_seq, seq);
                assert_eq!(header.global_start, Some(seq * 2));
                wire::verify_payload(&header, &payload).unwrap();
                let first = wire::payload::messages(&payload).next().unwrap().unwrap();
                assert_eq!(first, format!("message {seq}").as_bytes());
            }
            _ => panic!("expected a delivery"),
        }
    }
    for client in &mut publishers_of_7 {
        client.send(&Frame::Goodbye.to_bytes());
        assert!(matches!(client.frame(), Frame::Goodbye));
        client.expect_closed();
    }
    assert_eq!(cluster.batches_dropped(), 0);
    let head_metrics = http_get(cluster.brokers()[0].metrics_addr().unwrap(), "/metrics");
    assert!(
        head_metrics.contains("embarcadero_batches_dropped_total{broker=\"0\"} 0"),
        "{head_metrics}"
    );
    assert!(
        head_metrics.contains("embarcadero_sequencer_batches_ordered_total"),
        "{head_metrics}"
    );
}

#[test]
fn each_bad_input_gets_a_specific_error_and_harms_nobody_else() {
    let cluster = cluster(2, 64, 1 << 20);
    let addr = cluster.brokers()[1].local_addr();
    let head = cluster.brokers()[0].local_addr();
    let mut good = publisher(head, "safe", Order::Total, 1);
    good.batch(0, &[b"before"]);
    good.acks_through(0);

    // Garbage bytes.
    let mut client = Client::connect(addr);
    client.send(b"GET / HTTP/1.1\r\n\r\n");
    client.expect_error(ErrorCode::Malformed);
    client.expect_closed();

    // A frame of an unknown protocol version.
    let mut client = Client::connect(addr);
    let mut hello = Frame::Hello(HelloRepr {
        role: Role::Publish,
        order: Order::Total,
        ack: AckLevel::Ordered,
        client_id: 5,
        session_epoch: 1,
        topic: Topic::new("safe").unwrap(),
    })
    .to_bytes();
    hello[wire::FRAME_HEADER_BYTES + 4] = 9;
    client.send(&hello);
    let reason = client.expect_error(ErrorCode::UnsupportedVersion);
    assert!(
        reason.contains(&wire::PROTOCOL_VERSION.to_string()),
        "the reason names the supported version: {reason}"
    );

    // A truncated frame, then the peer goes away: nothing is left behind.
    let mut client = publisher(addr, "safe", Order::Total, 2);
    let mut payload = Vec::new();
    wire::payload::push_message(&mut payload, &[7u8; 1000]);
    let header = BatchHeaderRepr::for_payload(0, 1, &payload, &Limits::default()).unwrap();
    client.send(&header.frame_prefix());
    client.send(&payload[..300]);
    drop(client);

    // A frame larger than the limit.
    let mut client = publisher(addr, "safe", Order::Total, 3);
    let mut prefix = BatchHeaderRepr::for_payload(0, 1, &payload, &Limits::default()).unwrap();
    prefix.payload_bytes = 32 << 20;
    client.send(&prefix.frame_prefix());
    client.expect_error(ErrorCode::BatchTooLarge);
    client.expect_closed();

    // A wrong checksum.
    let mut client = publisher(addr, "safe", Order::Total, 4);
    let mut header = BatchHeaderRepr::for_payload(0, 1, &payload, &Limits::default()).unwrap();
    header.checksum ^= 1;
    client.send(&header.frame_prefix());
    client.send(&payload);
    client.expect_error(ErrorCode::ChecksumMismatch);
    client.expect_closed();

    // Unknown topic on a broker that does not create topics, and an order mismatch.
    let mut client = Client::connect(addr);
    assert!(matches!(
        client.hello("nope", Role::Publish, Order::Total, AckLevel::Ordered, 6),
        Frame::Error(e) if e.code == ErrorCode::UnknownTopic
    ));
    let mut client = Client::connect(addr);
    assert!(matches!(
        client.hello("safe", Role::Publish, Order::Unordered, AckLevel::Ordered, 6),
        Frame::Error(e) if e.code == ErrorCode::OrderMismatch
    ));

    // A subscriber asking beyond the log end.
    let mut client = Client::connect(addr);
    let role = Role::Subscribe {
        from_position: 1_000,
        batch_bytes_max: 0,
    };
    assert!(matches!(
        client.hello("safe", role, Order::Total, AckLevel::FireAndForget, 8),
        Frame::Error(e) if e.code == ErrorCode::PositionBeyondEnd
    ));

    // The good publisher never noticed, and the log holds exactly its batches.
    good.batch(1, &[b"after"]);
    good.acks_through(1);
    let mut sub = subscriber(addr, "safe", Order::Total, 0);
    for expected in [&b"before"[..], b"after"] {
        match sub.receive() {
            Received::Delivery(_, payload) => {
                assert_eq!(
                    wire::payload::messages(&payload).next().unwrap().unwrap(),
                    expected
                );
            }
            _ => panic!("expected a delivery"),
        }
    }
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn a_full_pool_pushes_back_without_closing_and_loses_nothing() {
    // 4 ring slots and a 64 KiB payload log per broker: publishing 2 MiB must wait often.
    let cluster = cluster(1, 4, 64 * 1024);
    let addr = cluster.brokers()[0].local_addr();
    let mut client = publisher(addr, "tight", Order::Total, 1);
    let message = vec![0xabu8; 8 * 1024];
    let batches = 256u64;
    let writer_stream = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut stream = writer_stream;
        for seq in 0..batches {
            let mut payload = Vec::new();
            wire::payload::push_message(&mut payload, &message);
            let header =
                BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default()).unwrap();
            stream.write_all(&header.frame_prefix()).unwrap();
            stream.write_all(&payload).unwrap();
        }
    });
    let entries = client.acks_through(batches - 1);
    sender.join().unwrap();
    assert_eq!(entries.len() as u64, batches);
    let metrics = cluster.brokers()[0].metrics();
    assert!(
        metrics.ring_full_waits.load(Ordering::Relaxed) > 0,
        "the pool never filled: the test proves nothing"
    );
    assert_eq!(metrics.batches_dropped.load(Ordering::Relaxed), 0);
    client.send(&Frame::Goodbye.to_bytes());
    assert!(
        matches!(client.frame(), Frame::Goodbye),
        "the connection stayed open to the end"
    );
}

#[test]
fn a_killed_broker_drops_every_connection_and_a_resend_elsewhere_is_deduplicated() {
    let mut cluster = cluster(3, 64, 1 << 20);
    let addrs = cluster.addresses();
    // The head creates the topic on first use.
    let mut creator = publisher(addrs[0], "crash", Order::TotalSessionFifo, 10);
    creator.send(&Frame::Goodbye.to_bytes());
    assert!(matches!(creator.frame(), Frame::Goodbye));
    let mut doomed = publisher(addrs[1], "crash", Order::TotalSessionFifo, 11);
    doomed.batch(0, &[b"zero"]);
    let original = doomed.acks_through(0);
    assert_eq!(original.len(), 1);
    let position = original[0].global_start.expect("order 5 has positions");
    // Batch 1 is in flight when the broker dies: committed or not, it is not acknowledged.
    doomed.batch(1, &[b"one"]);

    let killed_at = std::time::Instant::now();
    assert!(cluster.kill_broker(1));
    assert!(!cluster.kill_broker(7), "no broker 7");
    assert!(!cluster.brokers()[1].is_running());
    // The connection ends without Goodbye (end of stream or reset), at once.
    loop {
        match doomed.receive() {
            Received::Closed => break,
            Received::Frame(Frame::Ack(_)) => {}
            Received::Frame(other) => panic!("a crash says nothing, got {other:?}"),
            Received::Delivery(..) => panic!("a publisher gets no deliveries"),
            Received::TimedOut => panic!("the connection was not ended"),
        }
    }
    assert!(killed_at.elapsed() < Duration::from_secs(2));
    assert!(
        TcpStream::connect(addrs[1]).is_err(),
        "the listener is closed"
    );

    // The same session resumes on another broker and resends both batches.
    let mut survivor = publisher(addrs[2], "crash", Order::TotalSessionFifo, 11);
    survivor.batch(0, &[b"zero"]);
    survivor.batch(1, &[b"one"]);
    survivor.batch(2, &[b"two"]);
    let entries = survivor.acks_through(2);
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].status, wire::AckStatus::Duplicate);
    assert_eq!(
        entries[0].global_start,
        Some(position),
        "a duplicate carries the original position"
    );
    assert_eq!(entries[2].status, wire::AckStatus::Ordered);

    // Each batch is in the log once, in session order.
    let mut sub = subscriber(addrs[0], "crash", Order::TotalSessionFifo, 0);
    for seq in 0..3u64 {
        match sub.receive() {
            Received::Delivery(header, _) => assert_eq!(header.batch_seq, seq),
            _ => panic!("expected a delivery"),
        }
    }
    sub.send(&Frame::Goodbye.to_bytes());
    assert!(matches!(sub.frame(), Frame::Goodbye));
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn a_standby_takes_over_when_the_head_dies_and_creates_topics_from_then_on() {
    let geometry = Geometry {
        brokers_max: 3,
        topics_max: 4,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: 1 << 20,
    };
    let mut cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.sequencer.lease_ns = 300_000_000;
        options.standby = true;
        options.settings.auto_create_topics = true;
    })
    .unwrap();
    let addrs = cluster.addresses();
    // Only the lease holder creates topics: the head does, broker 1 (standing by) does not.
    let mut creator = publisher(addrs[0], "before", Order::Total, 1);
    creator.send(&Frame::Goodbye.to_bytes());
    assert!(matches!(creator.frame(), Frame::Goodbye));
    let mut early = Client::connect(addrs[1]);
    match early.hello("early", Role::Publish, Order::Total, AckLevel::Ordered, 2) {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::UnknownTopic),
        other => panic!("expected UnknownTopic, got {other:?}"),
    }
    let mut before = publisher(addrs[1], "before", Order::Total, 1);
    before.batch(0, &[b"a"]);
    assert_eq!(before.acks_through(0).len(), 1);

    assert!(cluster.kill_broker(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let holder = loop {
        let holder = (1..3)
            .find(|&b| cluster.brokers()[b].metrics().sequencer_role() == SequencerRole::Holding);
        if let Some(holder) = holder {
            break holder;
        }
        assert!(std::time::Instant::now() < deadline, "no standby took over");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The order goes on under the new holder, and it creates topics now.
    before.batch(1, &[b"b"]);
    let entries = before.acks_through(1);
    assert_eq!(entries.last().unwrap().global_start, Some(1));
    let mut after = publisher(addrs[holder], "after", Order::Total, 3);
    after.batch(0, &[b"c"]);
    assert_eq!(after.acks_through(0).len(), 1);
}

#[test]
fn a_broker_id_is_held_while_it_runs_kept_after_a_kill_and_given_back_by_a_stop() {
    use broker::server::StartError;
    use shared_log::claim::ClaimError;
    let geometry = Geometry {
        brokers_max: 2,
        topics_max: 1,
        ring_slots: 16,
        goi_entries: 1 << 10,
        blog_bytes: 1 << 16,
    };
    let lease = Duration::from_millis(300);
    let mut cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.claim_lease_ms = lease.as_millis() as u64;
    })
    .unwrap();
    // While broker 1 runs, a second broker 1 is refused (its heartbeat moves within a
    // quarter of the lease), and the first goes on.
    let started = std::time::Instant::now();
    match cluster.restart_broker(1) {
        Err(StartError::Claim(ClaimError::BrokerIdTaken { holder })) => {
            assert_eq!(holder.broker, 1);
            assert_eq!(holder.details.map(|d| d.pid), Some(std::process::id()));
        }
        other => panic!("expected BrokerIdTaken, got {other:?}"),
    }
    assert!(started.elapsed() < lease, "refused without waiting a lease");
    assert!(cluster.brokers()[1].is_running());
    // A killed broker keeps its claim: the next one takes it over after a silent lease.
    assert!(cluster.kill_broker(1));
    let started = std::time::Instant::now();
    cluster.restart_broker(1).unwrap();
    assert!(
        started.elapsed() >= lease,
        "took over after {:?}",
        started.elapsed()
    );
    assert!(cluster.brokers()[1].is_running());
    // A stopped broker gives its claim back: the next one starts at once.
    assert!(cluster.stop_broker(1));
    let started = std::time::Instant::now();
    cluster.restart_broker(1).unwrap();
    assert!(
        started.elapsed() < lease,
        "restarted after {:?}",
        started.elapsed()
    );
    assert!(cluster.brokers()[1].failure().is_none());
}
