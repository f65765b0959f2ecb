//! Hostile clients against brokers on kernel TCP (in-process, real loopback sockets): no
//! client may hold another back, every wait has a deadline, every table a limit
//! (docs/protocol.md, "Deadlines and limits"). Each test reproduces an attack that stalled or
//! locked out good clients before the defence it checks.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker::server::in_process::InProcessCluster;
use broker::server::limits::ClientLimits;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use support::{Client, Received, create_topic, publisher, subscriber};
use wire::{
    AckLevel, AckStatus, BatchHeaderRepr, CreateTopicRepr, Decoded, ErrorCode, FROM_END, Frame,
    FrameDecoder, Limits, Order, Retention, Role, Topic,
};

/// One broker whose payload logs hold 256 KiB: a few MiB of publishing wraps them many times.
const BLOG_BYTES: u64 = 256 * 1024;

fn broker(topics_max: u32, configure: impl Fn(&mut ClientLimits, &mut bool)) -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: 1,
        topics_max,
        ring_slots: 64,
        goi_entries: 1 << 14,
        blog_bytes: BLOG_BYTES,
    };
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        options.socket_buffer_bytes = 64 * 1024;
        configure(
            &mut options.settings.limits,
            &mut options.settings.auto_create_topics,
        );
    })
    .unwrap()
}

/// A payload of one message of `bytes` bytes.
fn payload(bytes: usize, fill: u8) -> Vec<u8> {
    let mut payload = Vec::new();
    wire::payload::push_message(&mut payload, &vec![fill; bytes]);
    payload
}

/// The payload of batch `seq` of [`publish_in_background`]: one 8 KiB message filled with
/// the sequence's low byte, so that a batch delivered with another's bytes shows.
fn batch_payload(seq: u64) -> Vec<u8> {
    payload(8 * 1024, seq as u8)
}

/// Sends `batches` batches (see [`batch_payload`]) from another thread; returns the thread.
fn publish_in_background(client: &Client, batches: u64) -> std::thread::JoinHandle<()> {
    let mut stream = client.stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for seq in 0..batches {
            let payload = batch_payload(seq);
            let header = BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default())
                .expect("a valid header");
            // The broker may close on us after an assertion failed elsewhere: just stop.
            if stream.write_all(&header.frame_prefix()).is_err()
                || stream.write_all(&payload).is_err()
            {
                return;
            }
        }
    })
}

/// Opens a connection and reads what the broker says first: a refusal, or nothing yet.
fn connect_and_poll(addr: SocketAddr) -> (TcpStream, Option<Frame>) {
    let mut client = Client::connect(addr);
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let stream = client.stream.try_clone().unwrap();
    let mut buffer = [0u8; 512];
    let frame = match std::io::Read::read(&mut client.stream, &mut buffer) {
        Ok(n) if n > 0 => match FrameDecoder::new(Limits::default()).decode(&buffer[..n]) {
            Ok((_, Decoded::Frame(frame))) => Some(frame),
            other => panic!("expected one whole frame, got {other:?}"),
        },
        _ => None,
    };
    (stream, frame)
}

#[test]
fn a_batch_trickling_in_does_not_stall_the_other_publishers_of_its_topic() {
    // Slowloris: a Batch header, a few bytes, then silence. Its room in the payload log used
    // to stay reserved, and reclaiming stopped there: once the log wrapped, every publisher
    // of the topic on that broker waited for ever.
    let cluster = broker(4, |limits, auto_create| {
        limits.batch_grace_ms = 60_000;
        limits.batch_hold_ms = 20;
        *auto_create = false;
    });
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "shared", Order::Total, Retention::StallLimited);
    let mut slow = publisher(addr, "shared", Order::Total, 1);
    let slow_payload = payload(32 * 1024, 0x11);
    let header = BatchHeaderRepr::for_payload(0, 1, &slow_payload, &Limits::default()).unwrap();
    slow.send(&header.frame_prefix());
    slow.send(&slow_payload[..100]);

    // 4 MiB through a 256 KiB log: 16 laps past the slow batch's room.
    let mut good = publisher(addr, "shared", Order::Total, 2);
    let batches = 512;
    let sender = publish_in_background(&good, batches);
    let started = Instant::now();
    let entries = good.acks_through(batches - 1);
    sender.join().unwrap();
    assert_eq!(entries.len() as u64, batches);
    assert!(entries.iter().all(|e| e.status == AckStatus::Ordered));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the good publisher took {:?}",
        started.elapsed()
    );

    // The slow batch was moved out of the pool, and still lands whole once it arrives.
    let metrics = cluster.brokers()[0].metrics();
    assert!(metrics.batches_staged.load(Ordering::Relaxed) >= 1);
    slow.send(&slow_payload[100..]);
    let slow_entries = slow.acks_through(0);
    assert_eq!(slow_entries.len(), 1);
    assert_eq!(slow_entries[0].status, AckStatus::Ordered);
    assert_eq!(metrics.staging_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn a_batch_slower_than_the_minimum_rate_is_refused_and_never_written() {
    let cluster = broker(4, |limits, _| {
        limits.batch_grace_ms = 200;
        limits.batch_min_bytes_per_s = 1 << 20;
    });
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "paced", Order::Total, Retention::StallLimited);
    let mut slow = publisher(addr, "paced", Order::Total, 1);
    let slow_payload = payload(32 * 1024, 0x22);
    let header = BatchHeaderRepr::for_payload(0, 1, &slow_payload, &Limits::default()).unwrap();
    slow.send(&header.frame_prefix());
    slow.send(&slow_payload[..1000]);
    let started = Instant::now();
    match slow.frame() {
        Frame::Error(error) => {
            assert_eq!(error.code, ErrorCode::DeadlineExpired, "{}", error.reason());
            assert_eq!(error.batch_seq, Some(0));
        }
        other => panic!("expected DeadlineExpired, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    slow.expect_closed();
    let metrics = cluster.brokers()[0].metrics();
    assert_eq!(metrics.batch_deadlines_expired.load(Ordering::Relaxed), 1);

    // Nothing of it is in the log: the next batch on the topic is the first one.
    let mut good = publisher(addr, "paced", Order::Total, 2);
    good.batch(0, &[b"first"]);
    assert_eq!(good.acks_through(0)[0].global_start, Some(0));
}

#[test]
fn a_connection_that_sends_no_hello_is_closed_at_its_deadline() {
    let cluster = broker(4, |limits, _| limits.hello_timeout_ms = 300);
    let addr = cluster.brokers()[0].local_addr();
    let started = Instant::now();
    let mut silent = Client::connect(addr);
    silent.expect_error(ErrorCode::DeadlineExpired);
    silent.expect_closed();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // An admin connection may not idle either between its frames.
    let mut admin = Client::connect(addr);
    admin.send(
        &Frame::CreateTopic(CreateTopicRepr {
            topic: Topic::new("admin").unwrap(),
            order: Order::Total,
            ack: AckLevel::Ordered,
            replication_factor: 0,
            retention: Retention::StallLimited,
            history: wire::HistoryRetention::UNLIMITED,
        })
        .to_bytes(),
    );
    assert!(matches!(admin.frame(), Frame::TopicOk(_)));
    admin.expect_error(ErrorCode::DeadlineExpired);
    admin.expect_closed();
    let metrics = cluster.brokers()[0].metrics();
    assert_eq!(metrics.hello_deadlines_expired.load(Ordering::Relaxed), 2);
}

#[test]
fn connections_are_limited_per_address_and_per_broker() {
    let cluster = broker(4, |limits, _| {
        limits.connections_per_address_max = 3;
        limits.connections_max = 1024;
    });
    let addr = cluster.brokers()[0].local_addr();
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let (stream, frame) = connect_and_poll(addr);
            assert!(frame.is_none(), "admitted: {frame:?}");
            stream
        })
        .collect();
    let (_, refused) = connect_and_poll(addr);
    match refused {
        Some(Frame::Error(error)) => assert_eq!(error.code, ErrorCode::ConnectionLimit),
        other => panic!("expected ConnectionLimit, got {other:?}"),
    }
    // A closed connection makes room again.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (stream, frame) = connect_and_poll(addr);
        if frame.is_none() {
            held.push(stream);
            break;
        }
        assert!(Instant::now() < deadline, "no room after a close");
    }
    let metrics = cluster.brokers()[0].metrics();
    assert!(metrics.connections_refused.load(Ordering::Relaxed) >= 1);

    let cluster = broker(4, |limits, _| {
        limits.connections_per_address_max = 100;
        limits.connections_max = 2;
    });
    let addr = cluster.brokers()[0].local_addr();
    let _first = connect_and_poll(addr);
    let _second = connect_and_poll(addr);
    match connect_and_poll(addr).1 {
        Some(Frame::Error(error)) => assert_eq!(error.code, ErrorCode::ConnectionLimit),
        other => panic!("expected ConnectionLimit, got {other:?}"),
    }
}

/// Publishes 64 MiB through a 256 KiB log next to a subscriber (from position 0) that never
/// reads; returns how many of the batches were acknowledged within `wait`, and the
/// subscriber.
fn publish_past_a_stalled_subscriber(
    cluster: &InProcessCluster,
    topic: &str,
    wait: Duration,
) -> (u64, Client) {
    let addr = cluster.brokers()[0].local_addr();
    let stalled = subscriber(addr, topic, Order::Total, 0);
    let mut good = publisher(addr, topic, Order::Total, 2);
    good.stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let batches = 8192;
    let _sender = publish_in_background(&good, batches);
    let deadline = Instant::now() + wait;
    let mut acked = 0;
    while acked < batches && Instant::now() < deadline {
        match good.receive() {
            Received::Frame(Frame::Ack(ack)) => acked = ack.acked_through_seq() + 1,
            Received::Frame(other) => panic!("expected an Ack, got {other:?}"),
            Received::TimedOut => {}
            Received::Delivery(..) | Received::Closed => panic!("the publisher's connection broke"),
        }
    }
    (acked, stalled)
}

#[test]
fn a_subscriber_that_stops_reading_stops_holding_the_publishers() {
    let cluster = broker(4, |limits, _| limits.subscriber_stall_ms = 500);
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "watched", Order::Total, Retention::StallLimited);
    let (acked, mut stalled) =
        publish_past_a_stalled_subscriber(&cluster, "watched", Duration::from_secs(20));
    assert_eq!(
        acked, 8192,
        "the publisher waited on a subscriber that never reads"
    );
    let metrics = cluster.brokers()[0].metrics();
    assert!(metrics.subscribers_released.load(Ordering::Relaxed) >= 1);
    // When it reads at last, it finds what it had not read overwritten: told so, not given
    // wrong bytes.
    loop {
        match stalled.receive() {
            Received::Delivery(header, payload) => wire::verify_payload(&header, &payload).unwrap(),
            Received::Frame(Frame::Error(error)) => {
                assert_eq!(error.code, ErrorCode::PositionTruncated);
                break;
            }
            Received::Frame(other) => panic!("unexpected {other:?}"),
            Received::Closed | Received::TimedOut => {
                panic!("no Error about the overwritten batches")
            }
        }
    }
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn a_subscriber_lapped_while_its_deliveries_wait_gets_its_own_bytes_or_an_error() {
    // Deliveries wait in the broker's queue as references into the pool, and this log wraps
    // hundreds of times under them: what arrives is intact, then an Error (or a reset).
    let cluster = broker(4, |limits, _| limits.subscriber_stall_ms = 300);
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "lapped", Order::Total, Retention::StallLimited);
    let (acked, mut stalled) =
        publish_past_a_stalled_subscriber(&cluster, "lapped", Duration::from_secs(20));
    assert_eq!(acked, 8192, "the publisher waited on the subscriber");
    let mut delivered = 0;
    let end = loop {
        match stalled.receive() {
            Received::Delivery(header, payload) => {
                assert!(
                    payload == batch_payload(header.batch_seq),
                    "batch {} was delivered with other bytes",
                    header.batch_seq
                );
                delivered += 1;
            }
            Received::Frame(Frame::Error(error)) => break Some(error.code),
            Received::Closed => break None,
            Received::Frame(other) => panic!("unexpected {other:?}"),
            Received::TimedOut => panic!("neither an Error nor the end of the connection"),
        }
    };
    assert!(
        matches!(end, Some(ErrorCode::PositionTruncated) | None),
        "{end:?}"
    );
    assert!(delivered > 0, "the bytes taken before the lap arrive");
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn a_topic_that_holds_for_its_subscribers_makes_publishers_wait_for_them() {
    let cluster = broker(4, |limits, _| limits.subscriber_stall_ms = 200);
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "held", Order::Total, Retention::HoldForSubscribers);
    let (acked, stalled) =
        publish_past_a_stalled_subscriber(&cluster, "held", Duration::from_secs(3));
    assert!(
        acked < 8192,
        "the publisher did not wait for the subscriber"
    );
    let metrics = cluster.brokers()[0].metrics();
    assert_eq!(metrics.subscribers_released.load(Ordering::Relaxed), 0);
    drop(stalled);
}

#[test]
fn log_start_is_the_first_readable_position_after_the_log_wraps() {
    let cluster = broker(4, |_, _| {});
    let addr = cluster.brokers()[0].local_addr();
    create_topic(addr, "wrapped", Order::Total, Retention::StallLimited);
    // 2 MiB through a 256 KiB log, while the GOI (16,384 entries) still lists every batch.
    let mut good = publisher(addr, "wrapped", Order::Total, 1);
    let batches = 256;
    let sender = publish_in_background(&good, batches);
    good.acks_through(batches - 1);
    sender.join().unwrap();

    let mut tail = Client::connect(addr);
    let role = Role::Subscribe {
        from_position: FROM_END,
        batch_bytes_max: 0,
    };
    let log_start = match tail.hello("wrapped", role, Order::Total, AckLevel::FireAndForget, 9) {
        Frame::HelloOk(ok) => {
            assert_eq!(ok.log_end, batches);
            ok.log_start
        }
        other => panic!("expected HelloOk, got {other:?}"),
    };
    assert!(
        log_start > 0 && log_start < batches,
        "log_start {log_start}: the oldest batches were overwritten"
    );
    let mut early = Client::connect(addr);
    let role = Role::Subscribe {
        from_position: 0,
        batch_bytes_max: 0,
    };
    match early.hello("wrapped", role, Order::Total, AckLevel::FireAndForget, 10) {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::PositionTruncated),
        other => panic!("expected PositionTruncated, got {other:?}"),
    }
    // From log_start on, everything is there.
    let mut reader = subscriber(addr, "wrapped", Order::Total, log_start);
    for position in log_start..batches {
        match reader.receive() {
            Received::Delivery(header, payload) => {
                assert_eq!(header.global_start, Some(position));
                wire::verify_payload(&header, &payload).unwrap();
            }
            _ => panic!("expected the delivery of position {position}"),
        }
    }
}

#[test]
fn topics_are_made_by_create_topic_and_the_table_is_never_filled_by_hellos() {
    let cluster = broker(4, |_, _| {});
    let addr = cluster.brokers()[0].local_addr();
    for (i, name) in ["made-up-1", "made-up-2", "made-up-3", "made-up-4"]
        .into_iter()
        .enumerate()
    {
        let mut client = Client::connect(addr);
        match client.hello(
            name,
            Role::Publish,
            Order::Total,
            AckLevel::Ordered,
            i as u64,
        ) {
            Frame::Error(error) => assert_eq!(error.code, ErrorCode::UnknownTopic),
            other => panic!("expected UnknownTopic, got {other:?}"),
        }
    }
    create_topic(addr, "real", Order::Total, Retention::StallLimited);
    publisher(addr, "real", Order::Total, 7);

    // With creation on first use, the table's limit holds and is named.
    let cluster = broker(2, |_, auto_create| *auto_create = true);
    let addr = cluster.brokers()[0].local_addr();
    publisher(addr, "first", Order::Total, 1);
    publisher(addr, "second", Order::Total, 2);
    let mut third = Client::connect(addr);
    match third.hello("third", Role::Publish, Order::Total, AckLevel::Ordered, 3) {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::TopicLimit),
        other => panic!("expected TopicLimit, got {other:?}"),
    }
    let metrics = cluster.brokers()[0].metrics();
    assert_eq!(metrics.topics_refused.load(Ordering::Relaxed), 1);
}
