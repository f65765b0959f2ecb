//! The Kafka listener end to end: a broker with `kafka_listen`, a Kafka client's requests
//! over TCP, and (when it is installed, as `./scripts/test.sh` makes sure) `kcat`, a Kafka
//! client no one here wrote.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use broker::server::BrokerOptions;
use broker::server::in_process::InProcessCluster;
use broker::server::kafka::{request_frame, response_body};
use bytes::{Buf, Bytes};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use wire::{Order, Retention};

fn cluster() -> InProcessCluster {
    cluster_of(2)
}

fn cluster_of(brokers: u32) -> InProcessCluster {
    cluster_with(brokers, |_| {})
}

/// `brokers` brokers with Kafka listeners, each broker's options then adjusted by
/// `configure`.
fn cluster_with(brokers: u32, configure: impl Fn(&mut BrokerOptions)) -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: brokers,
        topics_max: 4,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: 1 << 20,
    };
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.kafka_listen = Some("127.0.0.1:0".parse().unwrap());
        configure(options);
    })
    .unwrap()
}

/// Runs scripts/kafka-clients.py with `args` (within `timeout_s` seconds); once it prints
/// `cue`, runs `at_cue` (which kills a broker). Asserts that the script exited 0, and
/// returns what `at_cue` returned and the JSON summary the script printed last.
fn clients_with_cue<T>(
    python: &str,
    timeout_s: &str,
    args: &[&str],
    cue: &str,
    at_cue: impl FnOnce() -> T,
) -> (T, serde_json::Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-clients.py");
    let mut child = Command::new("timeout")
        .args([timeout_s, python, script])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), cue);
    let at = at_cue();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    println!("{rest}");
    assert!(
        status.success(),
        "kafka-clients.py {args:?}: {rest} {stderr}"
    );
    (at, serde_json::from_str(rest.trim()).unwrap())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Sends one request and reads its response body (after checking the correlation id).
fn call<R: Encodable + HeaderVersion>(
    stream: &mut TcpStream,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Bytes {
    stream
        .write_all(&request_frame(key, version, correlation_id, body))
        .unwrap();
    let mut frame = vec![0u8; 4];
    stream.read_exact(&mut frame).unwrap();
    let size = i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    frame.resize(4 + size, 0);
    stream.read_exact(&mut frame[4..]).unwrap();
    let (correlation, body) = response_body(&frame, key, version).expect("a whole response");
    assert_eq!(correlation, correlation_id);
    body
}

#[test]
fn a_kafka_client_learns_the_apis_the_brokers_and_the_topics() {
    let cluster = cluster();
    let head = &cluster.brokers()[0];
    support::create_topic(
        head.local_addr(),
        "orders",
        Order::Total,
        Retention::StallLimited,
    );
    let listeners: Vec<(i32, i32)> = (0..)
        .zip(cluster.brokers())
        .map(|(id, b)| (id, i32::from(b.kafka_addr().unwrap().port())))
        .collect();
    for (id, broker) in (0..).zip(cluster.brokers()) {
        let addr = broker.kafka_addr().expect("a Kafka listener");
        let mut stream = connect(addr);
        let mut body = call(
            &mut stream,
            ApiKey::ApiVersions,
            3,
            1,
            &ApiVersionsRequest::default(),
        );
        let versions = ApiVersionsResponse::decode(&mut body, 3).unwrap();
        assert_eq!(versions.error_code, 0);
        assert!(
            versions
                .api_keys
                .iter()
                .any(|k| k.api_key == ApiKey::Metadata as i16 && k.max_version == 12)
        );
        // A null topic list asks for every topic (an empty one for none).
        let mut body = call(
            &mut stream,
            ApiKey::Metadata,
            12,
            2,
            &MetadataRequest::default().with_topics(None),
        );
        let metadata = MetadataResponse::decode(&mut body, 12).unwrap();
        // Every live broker, with its Kafka listener (from the claims in the pool).
        let named: Vec<(i32, i32)> = metadata
            .brokers
            .iter()
            .map(|b| (b.node_id.0, b.port))
            .collect();
        assert_eq!(named, listeners);
        // The topic created, and the internal one of committed offsets.
        let names: Vec<(&str, bool)> = metadata
            .topics
            .iter()
            .map(|t| (t.name.as_ref().unwrap().0.as_str(), t.is_internal))
            .collect();
        assert_eq!(
            names,
            vec![("__embarcadero_offsets", true), ("orders", false)]
        );
        let orders = &metadata.topics[1];
        // Every broker leads the partition in the metadata it serves.
        assert_eq!(orders.partitions[0].leader_id.0, id);
        assert!(!body.has_remaining());
    }
}

#[test]
fn a_malformed_request_closes_its_own_connection_only() {
    let cluster = cluster();
    let addr = cluster.brokers()[0].kafka_addr().unwrap();
    let mut good = connect(addr);
    let mut bad = connect(addr);
    // A size prefix far beyond any request.
    bad.write_all(&0x7fff_ffffi32.to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        bad.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed, nothing sent"
    );
    let mut body = call(
        &mut good,
        ApiKey::ApiVersions,
        0,
        7,
        &ApiVersionsRequest::default(),
    );
    assert_eq!(
        ApiVersionsResponse::decode(&mut body, 0)
            .unwrap()
            .error_code,
        0
    );
    let metrics = cluster.brokers()[0].metrics();
    assert_eq!(metrics.kafka_connections_failed.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.kafka_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn kcat_lists_the_brokers_and_topics() {
    if Command::new("kcat").arg("-V").output().is_err() {
        eprintln!("SKIPPED: kcat is not installed (./scripts/test.sh installs it)");
        return;
    }
    let cluster = cluster();
    let head = &cluster.brokers()[0];
    support::create_topic(
        head.local_addr(),
        "payments",
        Order::Total,
        Retention::StallLimited,
    );
    let addr = head.kafka_addr().unwrap();
    let output = Command::new("timeout")
        .args(["20", "kcat", "-L", "-J", "-b", &addr.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kcat: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listing["brokers"][0]["name"], addr.to_string());
    let topics = listing["topics"].as_array().unwrap();
    let payments = topics
        .iter()
        .find(|t| t["topic"] == "payments")
        .unwrap_or_else(|| panic!("payments listed: {stdout}"));
    assert_eq!(payments["partitions"][0]["partition"], 0);
    assert_eq!(payments["partitions"][0]["leader"], 0);
}

fn kcat_missing() -> bool {
    if Command::new("kcat").arg("-V").output().is_err() {
        eprintln!("SKIPPED: kcat is not installed (./scripts/test.sh installs it)");
        return true;
    }
    false
}

/// With kcat installed, a cluster (`cluster()`) with the order-5 topic `topic` made on its
/// head; `None` without kcat (after a SKIPPED line).
fn kcat_cluster(topic: &str) -> Option<InProcessCluster> {
    if kcat_missing() {
        return None;
    }
    let cluster = cluster();
    support::create_topic(
        cluster.brokers()[0].local_addr(),
        topic,
        Order::TotalSessionFifo,
        Retention::StallLimited,
    );
    Some(cluster)
}

/// Runs kcat with `args` (20 s at most), feeding it `input`; returns its standard output.
fn kcat(args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new("timeout")
        .arg("20")
        .arg("kcat")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kcat {args:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// kcat reads `topic` from its start to its end through `broker`: "offset value" lines.
fn read_all(broker: &str, topic: &str) -> String {
    let args = ["-C", "-b", broker, "-t", topic, "-o", "beginning", "-e"];
    kcat(&[&args[..], &["-f", "%o %s\n"]].concat(), b"")
}

/// What our own subscriber of `topic` on `broker` reads from position 0: `count`
/// messages as text, each delivery at the position after the ones before it.
fn subscribe_values(broker: SocketAddr, topic: &str, order: Order, count: usize) -> Vec<String> {
    let mut subscriber = support::subscriber(broker, topic, order, 0);
    let mut seen = Vec::new();
    while seen.len() < count {
        match subscriber.receive() {
            support::Received::Delivery(header, payload) => {
                assert_eq!(header.global_start, Some(seen.len() as u64));
                for message in wire::payload::messages(&payload) {
                    seen.push(String::from_utf8(message.unwrap().to_vec()).unwrap());
                }
            }
            support::Received::Frame(_) => {}
            other => panic!("subscriber: {}", matches!(other, support::Received::Closed)),
        }
    }
    seen
}

#[test]
fn kcat_produces_and_consumes_beside_our_own_clients() {
    let Some(cluster) = kcat_cluster("events") else {
        return;
    };
    let head = &cluster.brokers()[0];
    let other = &cluster.brokers()[1];
    let order = Order::TotalSessionFifo;
    // Our own publisher first: 3 messages at positions 0..3.
    let mut native = support::publisher(other.local_addr(), "events", order, 41);
    native.batch(0, &[b"native-0", b"native-1"]);
    native.batch(1, &[b"native-2"]);
    native.acks_through(1);
    // kcat produces 100 records through each broker's Kafka listener (acks=all by default:
    // on a topic without replicas, once ordered).
    let lines = |prefix: &str| -> String { (0..100).map(|i| format!("{prefix}-{i}\n")).collect() };
    for (broker, prefix) in [(head, "kafka-a"), (other, "kafka-b")] {
        let addr = broker.kafka_addr().unwrap().to_string();
        kcat(
            &["-P", "-b", &addr, "-t", "events"],
            lines(prefix).as_bytes(),
        );
    }
    // kcat reads the whole topic back: every record once, offsets 0..203 without a gap,
    // each producer's records in the order sent.
    let addr = other.kafka_addr().unwrap().to_string();
    let read = read_all(&addr, "events");
    let records: Vec<(u64, String)> = read
        .lines()
        .map(|line| {
            let (offset, value) = line.split_once(' ').unwrap();
            (offset.parse().unwrap(), value.to_owned())
        })
        .collect();
    assert_eq!(records.len(), 203, "{read}");
    for (index, (offset, _)) in records.iter().enumerate() {
        assert_eq!(*offset, index as u64);
    }
    let values: Vec<&str> = records.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(values[..3], ["native-0", "native-1", "native-2"]);
    for prefix in ["kafka-a", "kafka-b"] {
        let mine: Vec<&str> = values
            .iter()
            .copied()
            .filter(|v| v.starts_with(prefix))
            .collect();
        let expected: Vec<String> = (0..100).map(|i| format!("{prefix}-{i}")).collect();
        assert_eq!(mine, expected, "{prefix}: each record once, in order");
    }
    // Our own subscriber reads the Kafka records as messages, bytes identical.
    assert_eq!(
        subscribe_values(head.local_addr(), "events", order, 203),
        values
    );
}

#[test]
fn librdkafka_plain_and_idempotent_and_kafka_python_produce_and_read_back_every_record() {
    let Ok(python) = std::env::var("KAFKA_PYTHON") else {
        eprintln!(
            "SKIPPED: KAFKA_PYTHON is not set (./scripts/test.sh installs confluent-kafka and \
             kafka-python and sets it)"
        );
        return;
    };
    let cluster = cluster();
    let head = &cluster.brokers()[0];
    support::create_topic(
        head.local_addr(),
        "libraries",
        Order::TotalSessionFifo,
        Retention::StallLimited,
    );
    let bootstrap: Vec<String> = cluster
        .brokers()
        .iter()
        .map(|b| b.kafka_addr().unwrap().to_string())
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-clients.py");
    let output = Command::new("timeout")
        .args([
            "120",
            &python,
            script,
            "--topic",
            "libraries",
            "--records",
            "500",
        ])
        .args(["--bootstrap", &bootstrap.join(",")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "kafka-clients.py: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["acknowledged"], 3000);
    assert_eq!(summary["confluent-kafka"]["read"], 3000);
    assert_eq!(summary["kafka-python"]["read"], 3000);
}

#[test]
fn an_idempotent_producer_goes_on_through_another_broker_when_its_broker_dies() {
    let Ok(python) = std::env::var("KAFKA_PYTHON") else {
        eprintln!(
            "SKIPPED: KAFKA_PYTHON is not set (./scripts/test.sh installs confluent-kafka and \
             sets it)"
        );
        return;
    };
    // Brokers 1 and 2 are the producer's bootstrap; broker 0, the head, keeps the sequencer
    // (and is named in Metadata like every live broker).
    let mut cluster = cluster_of(3);
    let head = cluster.brokers()[0].local_addr();
    support::create_topic(
        head,
        "failover",
        Order::TotalSessionFifo,
        Retention::StallLimited,
    );
    let bootstrap = [1, 2]
        .map(|i| cluster.brokers()[i].kafka_addr().unwrap().to_string())
        .join(",");
    let written = |cluster: &InProcessCluster, id: usize| {
        cluster.brokers()[id]
            .metrics()
            .batches_received
            .load(Ordering::Relaxed)
    };
    let args = ["--failover", "--topic", "failover", "--records", "2000"];
    let args = [&args[..], &["--bootstrap", &bootstrap]].concat();
    let ((dying, written_before, others_before), summary) =
        clients_with_cue(&python, "120", &args, "producing", || {
            // Once the producer has been at it for a while (about a third of its two
            // seconds), kill the broker it writes through (the one its first metadata
            // named), so that batches are in flight there.
            std::thread::sleep(Duration::from_millis(700));
            let dying = if written(&cluster, 1) > 0 { 1 } else { 2 };
            // The others' batches so far (the offsets topic's, the head's own) are not
            // the producer's going on.
            let others_before: Vec<u64> = (0..3).map(|id| written(&cluster, id)).collect();
            let written_before = written(&cluster, dying);
            assert!(cluster.kill_broker(dying as u16));
            (dying, written_before, others_before)
        });
    assert!(
        written_before > 0,
        "the producer wrote through broker {dying} before it died"
    );
    assert_eq!(summary["acknowledged"], 2000);
    assert_eq!(summary["confluent-kafka"]["read"], 2000);
    // Metadata names every live broker, so the producer goes on through either survivor.
    let went_on: Vec<usize> = (0..3)
        .filter(|&id| id != dying && written(&cluster, id) > others_before[id])
        .collect();
    assert!(
        !went_on.is_empty(),
        "the producer went on through another broker than {dying}"
    );
}

#[test]
fn kcat_producing_to_a_new_topic_creates_it_on_the_head_only() {
    if kcat_missing() {
        return;
    }
    let cluster = cluster_with(2, |options| options.settings.auto_create_topics = true);
    let head = cluster.brokers()[0].kafka_addr().unwrap().to_string();
    let other = cluster.brokers()[1].kafka_addr().unwrap().to_string();
    kcat(&["-P", "-b", &head, "-t", "fresh"], b"one\ntwo\n");
    let read = read_all(&other, "fresh");
    assert_eq!(read, "0 one\n1 two\n");
    // A broker that does not hold the sequencer lease creates nothing: kcat gives up.
    let mut refused = Command::new("timeout")
        .args(["20", "kcat", "-P", "-b", &other, "-t", "elsewhere"])
        .args(["-X", "message.timeout.ms=2000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    refused.stdin.take().unwrap().write_all(b"lost\n").unwrap();
    let output = refused.wait_with_output().unwrap();
    assert!(!output.status.success(), "the record had nowhere to go");
    let listing = kcat(&["-L", "-J", "-b", &head], b"");
    assert!(listing.contains("\"fresh\""));
    assert!(!listing.contains("\"elsewhere\""), "{listing} {output:?}");
}

#[test]
fn acks_all_on_a_replicated_topic_is_answered_once_the_replica_holds_the_records() {
    if kcat_missing() {
        return;
    }
    let dir =
        std::env::temp_dir().join(format!("embarcadero-kafka-acks-all-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let replica_dir = dir.clone();
    let geometry = Geometry {
        brokers_max: 2,
        topics_max: 4,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: 1 << 20,
    };
    // Broker 1 keeps a replica of every topic.
    let mut cluster = InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.kafka_listen = Some("127.0.0.1:0".parse().unwrap());
        if options.settings.broker_id == 1 {
            options.replica = Some(broker::server::replica::ReplicaConfig {
                dir: replica_dir.clone(),
                sync_bytes: 1 << 20,
                sync_interval_us: 1_000,
                segment_bytes: broker::server::replica::SEGMENT_BYTES_DEFAULT,
            });
        }
    })
    .unwrap();
    let head = cluster.brokers()[0].local_addr();
    let kafka = cluster.brokers()[0].kafka_addr().unwrap().to_string();
    let mut admin = support::Client::connect(head);
    let create = wire::CreateTopicRepr {
        topic: wire::Topic::new("durable").unwrap(),
        order: Order::TotalSessionFifo,
        ack: wire::AckLevel::Replicated,
        replication_factor: 1,
        retention: Retention::StallLimited,
        history: wire::HistoryRetention::UNLIMITED,
    };
    admin.send(&wire::Frame::CreateTopic(create).to_bytes());
    assert!(matches!(admin.frame(), wire::Frame::TopicOk(_)));
    // acks=all (kcat's default): every record acknowledged is in the replica file.
    let lines: String = (0..200).map(|i| format!("durable-{i}\n")).collect();
    kcat(
        &["-P", "-b", &kafka, "-t", "durable", "-X", "acks=all"],
        lines.as_bytes(),
    );
    // The only topic: whichever id the pool gave it, its records are the replica's.
    let replicated: u64 = (0..geometry.topics_max)
        .filter_map(|topic| broker::server::replica::read_records(&dir, topic).ok())
        .flatten()
        .map(|r| u64::from(r.header.message_count))
        .sum();
    assert_eq!(replicated, 200, "acknowledged, so in the replica");
    // Without the replica no acks=all answer comes (REQUEST_TIMED_OUT after timeout_ms);
    // acks=1 still is answered.
    assert!(cluster.kill_broker(1));
    let mut waiting = Command::new("timeout")
        .args([
            "20", "kcat", "-P", "-b", &kafka, "-t", "durable", "-X", "acks=all",
        ])
        .args([
            "-X",
            "request.timeout.ms=1000",
            "-X",
            "message.timeout.ms=2500",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    waiting
        .stdin
        .take()
        .unwrap()
        .write_all(b"unreplicated\n")
        .unwrap();
    let output = waiting.wait_with_output().unwrap();
    assert!(
        !output.status.success(),
        "acks=all acknowledged with no replica: {output:?}"
    );
    kcat(
        &["-P", "-b", &kafka, "-t", "durable", "-X", "acks=1"],
        b"ordered\n",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_consumer_group_goes_on_with_the_next_coordinator_when_its_coordinator_dies() {
    let Ok(python) = std::env::var("KAFKA_PYTHON") else {
        eprintln!(
            "SKIPPED: KAFKA_PYTHON is not set (./scripts/test.sh installs confluent-kafka and \
             sets it)"
        );
        return;
    };
    // Broker 0, the head, holds the sequencer lease and coordinates groups (the lowest
    // id); brokers 1 and 2 stand by. Broker 0 dies while the group reads: broker 1 takes
    // the sequencer over and coordinates.
    let mut cluster = cluster_with(3, |options| {
        options.standby = true;
        options.claim_lease_ms = 300;
    });
    support::create_topic(
        cluster.brokers()[0].local_addr(),
        "grouped",
        Order::TotalSessionFifo,
        Retention::StallLimited,
    );
    let bootstrap = [1, 2]
        .map(|i| cluster.brokers()[i].kafka_addr().unwrap().to_string())
        .join(",");
    let args = [
        "--group-failover",
        "--topic",
        "grouped",
        "--records",
        "2000",
    ];
    let args = [&args[..], &["--bootstrap", &bootstrap]].concat();
    let ((), summary) = clients_with_cue(&python, "150", &args, "consuming", || {
        assert!(cluster.kill_broker(0));
    });
    assert_eq!(summary["distinct"], 2000);
    assert_eq!(summary["committed"], 2000);
    assert!(
        summary["assignments"].as_u64().unwrap() >= 2,
        "the group formed again under the next coordinator: {summary}"
    );
}

#[test]
fn kcat_records_keep_their_keys_headers_and_timestamps_as_produced() {
    let Some(cluster) = kcat_cluster("keyed") else {
        return;
    };
    let head = &cluster.brokers()[0];
    let order = Order::TotalSessionFifo;
    let addr = head.kafka_addr().unwrap().to_string();
    // Keys (-K:), one header on every record (-H), 50 records.
    let input: String = (0..50)
        .map(|i| format!("user-{}:event-{i}\n", i % 7))
        .collect();
    kcat(
        &["-P", "-b", &addr, "-t", "keyed", "-K:", "-H", "source=kcat"],
        input.as_bytes(),
    );
    let read = kcat(
        &[
            "-C",
            "-b",
            &addr,
            "-t",
            "keyed",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%o|%k|%s|%h|%T\n",
        ],
        b"",
    );
    let lines: Vec<&str> = read.lines().collect();
    assert_eq!(lines.len(), 50, "{read}");
    for (i, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields[..4],
            [
                i.to_string().as_str(),
                format!("user-{}", i % 7).as_str(),
                format!("event-{i}").as_str(),
                "source=kcat"
            ],
            "{line}"
        );
        let timestamp_ms: i64 = fields[4].parse().unwrap();
        assert!(
            timestamp_ms > 1_700_000_000_000,
            "the producer's timestamp: {line}"
        );
    }
    // Our own subscriber reads the values as messages.
    let seen = subscribe_values(head.local_addr(), "keyed", order, 50);
    let expected: Vec<String> = (0..50).map(|i| format!("event-{i}")).collect();
    assert_eq!(seen, expected);
}

#[test]
fn kcat_starts_at_a_time_the_first_record_produced_at_or_after_it() {
    let Some(cluster) = kcat_cluster("timed") else {
        return;
    };
    let head = &cluster.brokers()[0];
    let order = Order::TotalSessionFifo;
    let addr = head.kafka_addr().unwrap().to_string();
    // Three rounds of 20 records, 50 ms apart, with our own client's batches (no
    // timestamps) before and between them.
    let mut native = support::publisher(head.local_addr(), "timed", order, 43);
    for round in 0..3u64 {
        native.batch(round, &[b"native"]);
        native.acks_through(round);
        let lines: String = (0..20).map(|i| format!("round-{round}-{i}\n")).collect();
        kcat(&["-P", "-b", &addr, "-t", "timed"], lines.as_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
    // kcat -C from `offset` with `tail` after it.
    let consume = |offset: &str, tail: &[&str]| {
        let mut args = vec!["-C", "-b", addr.as_str(), "-t", "timed", "-o", offset];
        args.extend_from_slice(tail);
        kcat(&args, b"")
    };
    let read = consume("beginning", &["-e", "-f", "%o %T %s\n"]);
    let records: Vec<(u64, i64, String)> = read
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, ' ');
            let offset = fields.next().unwrap().parse().unwrap();
            let timestamp = fields.next().unwrap().parse().unwrap();
            (offset, timestamp, fields.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(records.len(), 63, "{read}");
    // Each round's first record: kcat -o s@T starts at it, whether T is its own timestamp
    // or one just after the round before.
    for round in 0..3 {
        let first = records
            .iter()
            .find(|(_, _, v)| v == &format!("round-{round}-0"))
            .unwrap();
        let before = records
            .iter()
            .filter(|(offset, t, v)| *offset < first.0 && v.starts_with("round") && *t < first.1)
            .map(|(_, t, _)| *t)
            .max()
            .unwrap_or(0);
        for at in [first.1, before + 1] {
            let started = consume(&format!("s@{at}"), &["-c", "1", "-f", "%o %s\n"]);
            assert_eq!(
                started.trim(),
                format!("{} round-{round}-0", first.0),
                "s@{at}: {read}"
            );
        }
    }
    // After every record: the end (kcat reads nothing before -e ends it).
    let last = records.iter().map(|(_, t, _)| *t).max().unwrap();
    let started = consume(&format!("s@{}", last + 1), &["-e", "-f", "%o\n"]);
    assert_eq!(started.trim(), "", "{read}");
}

#[test]
fn kcat_compressed_batches_are_stored_as_compressed_and_read_back_by_every_reader() {
    let Some(cluster) = kcat_cluster("squeezed") else {
        return;
    };
    let head = &cluster.brokers()[0];
    let order = Order::TotalSessionFifo;
    let addr = head.kafka_addr().unwrap().to_string();
    let value = |codec: &str, i: usize| format!("{codec}-{i}-{}", "x".repeat(2000));
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let mut expected = Vec::new();
    for codec in codecs {
        let lines: String = (0..50)
            .map(|i| {
                expected.push(value(codec, i));
                value(codec, i) + "\n"
            })
            .collect();
        kcat(
            &["-P", "-b", &addr, "-t", "squeezed", "-z", codec],
            lines.as_bytes(),
        );
    }
    // Stored as compressed: far fewer bytes than the values came to (librdkafka compresses
    // with gzip, snappy and lz4 only for a broker that offers Produce version 0).
    let stored = head.metrics().bytes_received.load(Ordering::Relaxed);
    let raw: usize = expected.iter().map(String::len).sum();
    assert!(
        (stored as usize) < raw / 20,
        "{stored} bytes stored for {raw} bytes of values"
    );
    let read = read_all(&addr, "squeezed");
    let values: Vec<&str> = read
        .lines()
        .map(|line| line.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(values, expected, "kcat reads every codec back");
    // Our own subscriber reads the values, decompressed.
    let seen = subscribe_values(head.local_addr(), "squeezed", order, expected.len());
    assert_eq!(seen, expected);
}
