//! Publishers against real brokers that fail: brokers in this process on loopback (one
//! shared pool, non-coherent mode), one of them killed mid-run the way a crash looks to
//! clients. A subscriber on the head broker checks every acknowledged message: delivered
//! exactly once, in the order the topic promises, bytes intact (the verifier of
//! `client::verify`), with no gap or repeat in global positions.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use broker::server::in_process::InProcessCluster;
use client::verify::{DeliveryContext, MessageFactory, OrderCheck, Verifier, VerifyCounts};
use client::{
    ClientError, DeliveredBatch, Publisher, PublisherConfig, PublisherEvent, PublisherStats,
    Subscriber, SubscriberConfig,
};
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;

fn cluster(brokers: u32) -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: brokers,
        topics_max: 8,
        ring_slots: 256,
        goi_entries: 1 << 16,
        blog_bytes: 8 << 20,
    };
    // An order-5 hold far above any delay a loaded machine (or a failover) causes: a batch
    // that is merely late must not be skipped by the gap rule.
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.sequencer.hold_timeout_ns = 10_000_000_000;
        // The publishers name their topics (creation is tested with the loadgen runs).
        options.settings.auto_create_topics = true;
    })
    .expect("start the brokers")
}

/// Each test runs several brokers: one at a time on a 2-core machine.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn publisher_config(brokers: Vec<SocketAddr>, topic: &str, order: u8) -> PublisherConfig {
    let mut config = PublisherConfig::new(brokers, topic);
    config.order = order;
    config.ack = 1;
    config.report_acks = true;
    config.connect_timeout_ms = 2_000;
    config
}

/// Reads from position 0 on `addr` until `expected` messages of `client_id` were delivered
/// (or 20 s passed), then a little longer to catch a late second copy.
fn read_back(
    addr: SocketAddr,
    topic: &str,
    order: u8,
    client_id: u64,
    check: OrderCheck,
    expected: u64,
) -> (VerifyCounts, Vec<DeliveredBatch>, Subscriber) {
    let mut config = SubscriberConfig::new(addr, topic);
    config.order = order;
    let mut subscriber = Subscriber::connect(config).expect("subscribe");
    let mut verifier = Verifier::new(check, &[client_id]);
    let mut batches = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut settle = None;
    loop {
        let now = Instant::now();
        if now >= deadline || settle.is_some_and(|until| now >= until) {
            break;
        }
        if settle.is_none() && verifier.counts().delivered >= expected {
            settle = Some(now + Duration::from_millis(300));
        }
        let Some(batch) = subscriber
            .next_batch(Duration::from_millis(50))
            .expect("the subscriber reads on")
        else {
            continue;
        };
        let context = DeliveryContext {
            client_id: batch.client_id,
            batch_seq: batch.batch_seq,
        };
        for message in batch.messages() {
            verifier.on_message(&context, message);
        }
        batches.push(batch);
    }
    (verifier.counts(), batches, subscriber)
}

fn assert_exactly_once(counts: VerifyCounts, expected: u64, subscriber: &Subscriber) {
    assert_eq!(
        counts,
        VerifyCounts {
            delivered: expected,
            ..VerifyCounts::default()
        },
        "every acknowledged message once, in order, intact"
    );
    let positions = subscriber.stats().positions;
    assert!(positions.is_clean(), "{positions:?}");
}

/// Publishes `messages` self-checking messages; once slot 2 (broker 2) has batches
/// unacknowledged, kills broker 2. Returns the publisher's stats after a clean close.
fn publish_through_a_crash(
    cluster: &mut InProcessCluster,
    config: PublisherConfig,
    messages: u64,
) -> PublisherStats {
    let mut publisher = Publisher::connect(config).expect("connect");
    let mut factory = MessageFactory::new(0, 1000).unwrap();
    let mut killed_at = None;
    for seq in 0..messages {
        publisher.publish(factory.message(seq)).expect("publish");
        if killed_at.is_none() && seq >= messages / 3 && publisher.in_flight(2) >= 4 {
            assert!(cluster.kill_broker(2));
            killed_at = Some(seq);
        }
    }
    assert!(killed_at.is_some(), "the broker was never killed");
    publisher
        .flush()
        .expect("every batch acknowledged despite the crash");
    let events = publisher.take_events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PublisherEvent::Rejected { .. })),
        "nothing was rejected: {events:?}"
    );
    publisher.close().expect("close");
    publisher.stats()
}

fn a_broker_dies_mid_run(order: u8) {
    let _serial = serial();
    let mut cluster = cluster(4);
    let topic = format!("crash-{order}");
    let mut config = publisher_config(cluster.addresses(), &topic, order);
    config.connections_per_broker = 2;
    config.batch_bytes_max = 16 << 10;
    config.in_flight_batches_max = 16;
    let client_id = config.client_id;
    let messages = 6_000;
    let stats = publish_through_a_crash(&mut cluster, config, messages);
    eprintln!("order {order}: {stats:?}");
    assert_eq!(stats.messages_acked, messages);
    assert!(
        stats.connections_lost >= 2 && stats.reconnects >= 2,
        "both connections to broker 2 were replaced: {stats:?}"
    );
    assert_eq!(
        stats.messages_sent, messages,
        "resends are not counted as sent"
    );
    // Orders 1 and 2 keep what one connection slot carried in order, across the failover.
    let check = OrderCheck::for_order(order, 8);
    let (counts, _, subscriber) = read_back(
        cluster.addresses()[0],
        &topic,
        order,
        client_id,
        check,
        messages,
    );
    assert_exactly_once(counts, messages, &subscriber);
    assert_eq!(cluster.batches_dropped(), 0);
}

#[test]
fn order_5_survives_a_broker_killed_mid_run() {
    a_broker_dies_mid_run(5);
}

#[test]
fn order_2_survives_a_broker_killed_mid_run() {
    a_broker_dies_mid_run(2);
}

/// A loopback proxy to one broker that passes the client's bytes on, but of the broker's
/// bytes only HelloOk: every Ack is swallowed, as if it were lost in the crash.
struct AckSwallower {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// Frame header and HelloOk body.
const HELLO_OK_BYTES: usize = 8 + 40;

impl AckSwallower {
    fn start(broker: SocketAddr) -> AckSwallower {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, streams) = (stop.clone(), streams.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    client.set_nonblocking(false).unwrap();
                    let upstream = TcpStream::connect(broker).unwrap();
                    let mut all = streams.lock().unwrap();
                    all.push(client.try_clone().unwrap());
                    all.push(upstream.try_clone().unwrap());
                    let (mut from_client, mut to_broker) = (client.try_clone().unwrap(), upstream);
                    let (mut from_broker, mut to_client) = (to_broker.try_clone().unwrap(), client);
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from_client, &mut to_broker);
                    });
                    thread::spawn(move || {
                        let mut hello_ok = [0u8; HELLO_OK_BYTES];
                        if from_broker.read_exact(&mut hello_ok).is_ok()
                            && to_client.write_all(&hello_ok).is_ok()
                        {
                            let _ = std::io::copy(&mut from_broker, &mut std::io::sink());
                        }
                    });
                }
            })
        };
        AckSwallower {
            addr,
            stop,
            streams,
            acceptor: Some(acceptor),
        }
    }

    /// Closes the listener and every connection at once.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().unwrap();
        }
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_resent_batch_that_was_ordered_is_acknowledged_as_a_duplicate_at_its_position() {
    let _serial = serial();
    let cluster = cluster(2);
    let addrs = cluster.addresses();
    let mut proxy = AckSwallower::start(addrs[1]);
    let mut config = publisher_config(vec![addrs[0], proxy.addr], "dedup", 5);
    config.linger_us = 0;
    let client_id = config.client_id;
    let mut publisher = Publisher::connect(config).expect("connect");
    let mut factory = MessageFactory::new(0, 64).unwrap();
    // One message per batch: even batches to broker 0, odd ones through the proxy.
    for seq in 0..10 {
        publisher.publish(factory.message(seq)).unwrap();
    }
    let (counts, batches, mut subscriber) = read_back(
        addrs[0],
        "dedup",
        5,
        client_id,
        OrderCheck::PerPublisher,
        10,
    );
    assert_eq!(counts.delivered, 10, "every batch reached the log");
    publisher.poll().unwrap();
    assert_eq!(
        publisher.stats().batches_acked,
        5,
        "the odd batches' acks were swallowed"
    );

    // The connection through the proxy dies; its five batches are resent to broker 0.
    proxy.kill();
    publisher.flush().expect("resends acknowledged");
    let stats = publisher.stats();
    assert_eq!(
        (
            stats.connections_lost,
            stats.reconnects,
            stats.batches_resent,
            stats.batches_duplicate
        ),
        (1, 1, 5, 5),
        "{stats:?}"
    );
    let mut duplicates = 0;
    for event in publisher.take_events() {
        if let PublisherEvent::Acked {
            batch_seq,
            global_start,
            duplicate: true,
            ..
        } = event
        {
            let original = batches
                .iter()
                .find(|b| b.batch_seq == batch_seq)
                .expect("delivered once");
            assert_eq!(batch_seq % 2, 1);
            assert_eq!(
                original.broker_id, 1,
                "the first copy came through broker 1"
            );
            assert_eq!(global_start, original.global_start, "the original position");
            duplicates += 1;
        }
    }
    assert_eq!(duplicates, 5);
    publisher.close().unwrap();
    // No second copy reached the log.
    assert!(
        subscriber
            .next_batch(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    assert!(subscriber.stats().positions.is_clean());
}

#[test]
fn a_full_session_rolls_over_to_the_next_epoch_in_order_and_exactly_once() {
    let _serial = serial();
    let cluster = cluster(3);
    let mut config = publisher_config(cluster.addresses(), "rollover", 5);
    // Four 60-byte messages per batch, seven batches per session.
    config.batch_bytes_max = 4 * 64;
    config.session_batches_max = 7;
    config.linger_us = 200;
    let (client_id, first_epoch) = (config.client_id, config.session_epoch);
    let mut publisher = Publisher::connect(config).expect("connect");
    let mut factory = MessageFactory::new(0, 60).unwrap();
    let messages = 400;
    for seq in 0..messages {
        publisher.publish(factory.message(seq)).unwrap();
    }
    publisher
        .close()
        .expect("every session drained and acknowledged");
    let stats = publisher.stats();
    assert_eq!(stats.messages_acked, messages);
    let batches = stats.batches_sealed;
    assert_eq!(stats.session_rollovers, (batches - 1) / 7, "{stats:?}");
    assert!(stats.session_rollovers >= 10, "{stats:?}");
    assert_eq!(
        publisher.session_epoch(),
        first_epoch + stats.session_rollovers as u32
    );
    assert_eq!(stats.reconnects, 0, "new sessions are not reconnects");

    let (counts, delivered, subscriber) = read_back(
        cluster.addresses()[0],
        "rollover",
        5,
        client_id,
        OrderCheck::PerPublisher,
        messages,
    );
    assert_exactly_once(counts, messages, &subscriber);
    // Sessions follow each other, each numbered 0..7.
    let sessions: Vec<(u32, u64)> = delivered
        .iter()
        .map(|b| (b.session_epoch, b.batch_seq))
        .collect();
    assert!(sessions.windows(2).all(|w| w[0] < w[1]), "{sessions:?}");
    assert!(sessions.iter().all(|&(_, seq)| seq < 7), "{sessions:?}");
    assert_eq!(sessions.first(), Some(&(first_epoch, 0)));
    assert_eq!(sessions.len() as u64, batches);
}

#[test]
fn with_every_broker_gone_the_publisher_gives_up_within_the_reconnect_timeout() {
    let _serial = serial();
    let mut cluster = cluster(2);
    let mut config = publisher_config(cluster.addresses(), "gone", 2);
    config.reconnect_timeout_ms = 500;
    config.connect_timeout_ms = 200;
    let mut publisher = Publisher::connect(config).expect("connect");
    publisher.publish(b"before").unwrap();
    publisher.flush().unwrap();
    assert!(cluster.kill_broker(1));
    assert!(cluster.kill_broker(0));
    let started = Instant::now();
    let error = loop {
        match publisher.publish(b"after") {
            Ok(()) => match publisher.flush() {
                Ok(()) => {}
                Err(error) => break error,
            },
            Err(error) => break error,
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    };
    let waited = started.elapsed();
    assert!(
        matches!(
            error,
            ClientError::Unreachable {
                brokers: 2,
                timeout_ms: 500,
                ..
            }
        ),
        "{error}"
    );
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // The failure sticks, and closing does not hang.
    assert!(matches!(
        publisher.publish(b"later"),
        Err(ClientError::Unreachable { .. })
    ));
    let closing = Instant::now();
    assert!(publisher.close().is_err());
    assert!(closing.elapsed() < Duration::from_secs(2));
}
