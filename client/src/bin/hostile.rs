//! `hostile`: the attacks of a hostile client, for testing brokers (scripts/hostile.sh).
//! Each subcommand runs one attack for a while against brokers the tester runs, and prints
//! (or writes with --json) what the attacker got: per connection, the Error code the broker
//! sent, a close, or nothing. It sends only to the addresses it is given.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use socket2::{Domain, Socket, Type};
use wire::{
    AckLevel, BatchHeaderRepr, Decoded, FROM_END, Frame, FrameDecoder, HelloRepr, Limits, Order,
    Role, Topic,
};

/// Attacks a broker the way a hostile client would, and reports what it got.
#[derive(Debug, Parser)]
#[command(name = "hostile", version, about)]
struct Cli {
    /// Write the result as JSON to this file (else it is printed).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Source address of the attack's connections (e.g. 127.0.0.2, so that on loopback
    /// they count against another address than the tester's own clients).
    #[arg(long, global = true)]
    source_ip: Option<IpAddr>,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Debug, Subcommand)]
enum Attack {
    /// Publishers that send a Batch header and then trickle its payload, one byte per
    /// --byte-interval-ms (slowloris).
    #[command(after_help = units::SIZE_HELP)]
    Slowloris {
        #[command(flatten)]
        on: TopicArgs,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Announced payload size of each batch.
        #[arg(long, value_name = "SIZE", default_value_t = 64 * 1024, value_parser = units::parse_bytes_as::<u32>)]
        payload_bytes: u32,
        #[arg(long, default_value_t = 1000)]
        byte_interval_ms: u64,
        #[arg(long, default_value_t = 5.0)]
        duration_s: f64,
    },
    /// Connections that never send a byte.
    Silent {
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 8.0)]
        duration_s: f64,
    },
    /// A subscriber from position 0 that reads nothing for --duration-s (its socket buffers
    /// fill, then the broker's output queue), then reads what it is given.
    StalledSubscriber {
        #[command(flatten)]
        on: TopicArgs,
        #[arg(long, default_value_t = 5.0)]
        duration_s: f64,
    },
    /// Publisher Hellos naming made-up topics.
    TopicSpam {
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long, default_value_t = 16)]
        count: usize,
    },
    /// Silent connections to the metrics endpoint while scraping it every 200 ms.
    MetricsSilent {
        #[arg(long)]
        metrics: SocketAddr,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 5.0)]
        duration_s: f64,
    },
    /// A subscriber from position 0 of a topic whose log has wrapped, then one from the
    /// `log_start` the broker reports: the first must be told where the log starts, the
    /// second must get that position first.
    LateSubscriber {
        #[command(flatten)]
        on: TopicArgs,
    },
    /// Kafka clients gone wrong on a broker's Kafka listener (`--kafka-listen`): requests
    /// with sizes below 0 and over the limit, for an API it does not serve, with a header
    /// cut short, claiming 2^31 topics (each must be closed), and one that sends Metadata requests without ever
    /// reading the responses (it must be left open and stop being read); then a fresh
    /// connection's ApiVersions must be answered.
    KafkaGarbage {
        #[arg(long)]
        kafka: SocketAddr,
        #[arg(long, default_value_t = 4.0)]
        duration_s: f64,
    },
    /// Kafka clients that hoard answers: `--connections` connections each send 32 Fetch
    /// requests that wait (30 s, at the end of the offsets topic) and never read, while
    /// another commits offsets for a new group each time, reading its answers, for the
    /// attack's duration (each commit moves the end the fetches wait on). The hoarders must
    /// stay open, every commit be acknowledged, and a fresh connection's ApiVersions answered.
    KafkaHoard {
        #[arg(long)]
        kafka: SocketAddr,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 4.0)]
        duration_s: f64,
    },
}

/// The broker and topic of an attack.
#[derive(Debug, clap::Args)]
struct TopicArgs {
    /// The broker attacked (HOST:PORT).
    #[arg(long)]
    broker: SocketAddr,
    /// Topic (created first with order --order, ack 1, if missing).
    #[arg(long)]
    topic: String,
    /// Brokers to send the CreateTopic to, in order, until one creates it: the one that
    /// holds the sequencer lease, which a standby may have taken over (default: --broker).
    #[arg(long, value_delimiter = ',')]
    create_on: Vec<SocketAddr>,
    /// The topic's order: 0, 1, 2 or 5.
    #[arg(long, default_value_t = 5)]
    order: u8,
}

/// What one connection of an attack got.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// An Error frame with this code name.
    Error(String),
    /// The broker closed the connection without an Error.
    Closed,
    /// Still open when the attack ended.
    Open,
    /// The attack could not even connect.
    ConnectFailed,
}

impl Outcome {
    fn key(&self) -> String {
        match self {
            Outcome::Error(name) => name.clone(),
            Outcome::Closed => "closed".into(),
            Outcome::Open => "open".into(),
            Outcome::ConnectFailed => "connect_failed".into(),
        }
    }
}

/// Counts of outcomes, as JSON.
fn tally(outcomes: &[Outcome]) -> serde_json::Value {
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        *counts.entry(outcome.key()).or_insert(0u64) += 1;
    }
    serde_json::json!(counts)
}

fn code_name(frame: &Frame) -> Option<String> {
    match frame {
        Frame::Error(error) => Some(format!("{:?}", error.code)),
        _ => None,
    }
}

/// Reads frames from a blocking stream with a read timeout.
struct Peer {
    stream: TcpStream,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
}

enum Read1 {
    Frame(Frame),
    Delivery(wire::DeliveryHeaderRepr),
    Closed,
    Nothing,
}

impl Peer {
    fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<Peer> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if let Some(ip) = source {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Peer {
            stream,
            decoder: FrameDecoder::new(Limits::default()),
            buffer: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Reads stop waiting: for loops that poll many peers in turn.
    fn poll_mode(self) -> Peer {
        let _ = self.stream.set_nonblocking(true);
        self
    }

    /// The next frame or delivery header, `Closed`, or `Nothing` within the read timeout.
    fn next(&mut self) -> Read1 {
        loop {
            while !self.buffer.is_empty() {
                let Ok((used, decoded)) = self.decoder.decode(&self.buffer) else {
                    return Read1::Closed;
                };
                let read = match decoded {
                    Decoded::Frame(frame) => Some(Read1::Frame(frame)),
                    Decoded::Delivery(header) => Some(Read1::Delivery(header)),
                    Decoded::NeedMore(_) | Decoded::Payload { .. } | Decoded::Batch(_) => None,
                };
                self.buffer.drain(..used);
                if let Some(read) = read {
                    return read;
                }
                if used == 0 {
                    break;
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Read1::Closed,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Read1::Nothing;
                }
                Err(_) => return Read1::Closed,
            }
        }
    }

    /// What the broker has said so far: an Error, a close, or nothing (`Open`).
    fn outcome(&mut self) -> Option<Outcome> {
        match self.next() {
            Read1::Frame(frame) => code_name(&frame).map(Outcome::Error),
            Read1::Closed => Some(Outcome::Closed),
            Read1::Delivery(_) | Read1::Nothing => None,
        }
    }
}

/// Where the attack goes, and from which address.
#[derive(Debug, Clone, Copy)]
struct Target {
    broker: SocketAddr,
    source: Option<IpAddr>,
}

impl Target {
    fn connect(&self) -> std::io::Result<Peer> {
        Peer::connect(self.broker, self.source)
    }
}

fn topic(name: &str) -> Result<Topic, String> {
    Topic::new(name).map_err(|e| format!("topic {name:?}: {e}"))
}

fn order(value: u8) -> Result<Order, String> {
    Order::try_from(value).map_err(|e| e.to_string())
}

/// CreateTopic with ack 1, no replicas, default retention (idempotent for those settings).
/// Creates `name` (ack 1, no replicas) on whichever of `on` creates topics, or on the
/// attacked broker when `on` is empty.
fn create_topic(target: Target, on: &[SocketAddr], name: &str, order: Order) -> Result<(), String> {
    let spec = client::TopicSpec {
        topic: name.to_owned(),
        order: order as u8,
        ack: 1,
        replication_factor: 0,
        hold_for_subscribers: false,
        retention_bytes: 0,
        retention_ms: 0,
    };
    let brokers = if on.is_empty() {
        &[target.broker][..]
    } else {
        on
    };
    client::create_topic_on_cluster(brokers, &spec, Duration::from_secs(5))
        .map(|_| ())
        .map_err(|e| format!("CreateTopic {name:?}: {e}"))
}

fn hello(topic: Topic, role: Role, order: Order, client_id: u64) -> Vec<u8> {
    let ack = match role {
        Role::Publish => AckLevel::Ordered,
        Role::Subscribe { .. } => AckLevel::FireAndForget,
    };
    Frame::Hello(HelloRepr {
        role,
        order,
        ack,
        client_id,
        session_epoch: 1,
        topic,
    })
    .to_bytes()
}

/// One connection of a many-connection attack.
struct Attacker {
    peer: Peer,
    /// Payload bytes sent so far (slowloris).
    sent: usize,
    last_sent: Instant,
    outcome: Option<Outcome>,
    /// Seconds from the attack's start to the broker's answer.
    answered_after_s: Option<f64>,
}

impl Attacker {
    fn new(peer: Peer) -> Attacker {
        Attacker {
            peer: peer.poll_mode(),
            sent: 0,
            last_sent: Instant::now(),
            outcome: None,
            answered_after_s: None,
        }
    }
}

/// Polls every attacker until `until` or until each has an outcome; `tick` runs before each
/// poll of an attacker still waiting.
fn watch(
    attackers: &mut [Attacker],
    started: Instant,
    until: Instant,
    mut tick: impl FnMut(&mut Attacker),
) {
    while Instant::now() < until && attackers.iter().any(|a| a.outcome.is_none()) {
        for attacker in attackers.iter_mut().filter(|a| a.outcome.is_none()) {
            tick(attacker);
            attacker.outcome = attacker.peer.outcome();
            if attacker.outcome.is_some() {
                attacker.answered_after_s = Some(started.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The report of a many-connection attack.
fn report(
    attackers: Vec<Attacker>,
    mut outcomes: Vec<Outcome>,
    started: Instant,
) -> serde_json::Value {
    let last_answer_s = attackers
        .iter()
        .filter_map(|a| a.answered_after_s)
        .fold(0.0, f64::max);
    outcomes.extend(
        attackers
            .into_iter()
            .map(|a| a.outcome.unwrap_or(Outcome::Open)),
    );
    serde_json::json!({
        "outcomes": tally(&outcomes),
        "last_answer_s": last_answer_s,
        "seconds": started.elapsed().as_secs_f64(),
    })
}

fn slowloris(
    target: Target,
    on: &TopicArgs,
    connections: usize,
    payload_bytes: u32,
    byte_interval: Duration,
    duration: Duration,
) -> Result<serde_json::Value, String> {
    let name = on.topic.as_str();
    let order = order(on.order)?;
    create_topic(target, &on.create_on, name, order)?;
    let mut payload = vec![0u8; payload_bytes as usize];
    payload[..4].copy_from_slice(&(payload_bytes - 4).to_le_bytes());
    let header = BatchHeaderRepr::for_payload(0, 1, &payload, &Limits::default())
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut attackers = Vec::new();
    let mut outcomes = Vec::new();
    for index in 0..connections {
        match target.connect() {
            Ok(mut peer) => {
                peer.send(&hello(
                    topic(name)?,
                    Role::Publish,
                    order,
                    900 + index as u64,
                ));
                peer.send(&header.frame_prefix());
                attackers.push(Attacker::new(peer));
            }
            Err(_) => outcomes.push(Outcome::ConnectFailed),
        }
    }
    watch(&mut attackers, started, started + duration, |attacker| {
        if attacker.last_sent.elapsed() >= byte_interval && attacker.sent < payload.len() {
            let byte = &payload[attacker.sent..=attacker.sent];
            if attacker.peer.stream.write(byte).is_ok_and(|n| n == 1) {
                attacker.sent += 1;
            }
            attacker.last_sent = Instant::now();
        }
    });
    Ok(report(attackers, outcomes, started))
}

fn silent(
    target: Target,
    connections: usize,
    duration: Duration,
) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    let mut attackers = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..connections {
        match target.connect() {
            Ok(peer) => attackers.push(Attacker::new(peer)),
            Err(_) => outcomes.push(Outcome::ConnectFailed),
        }
    }
    watch(&mut attackers, started, started + duration, |_| {});
    Ok(report(attackers, outcomes, started))
}

fn stalled_subscriber(
    target: Target,
    on: &TopicArgs,
    duration: Duration,
) -> Result<serde_json::Value, String> {
    let name = on.topic.as_str();
    let order = order(on.order)?;
    create_topic(target, &on.create_on, name, order)?;
    let mut peer = target
        .connect()
        .map_err(|e| format!("connect {}: {e}", target.broker))?;
    let role = Role::Subscribe {
        from_position: 0,
        batch_bytes_max: 0,
    };
    peer.send(&hello(topic(name)?, role, order, 950));
    std::thread::sleep(duration);
    // Now it reads: what was queued for it, then whatever the broker says next (until 3 s
    // pass without a byte).
    let mut deliveries = 0u64;
    let mut quiet_since = Instant::now();
    let outcome = loop {
        match peer.next() {
            Read1::Delivery(_) => {
                deliveries += 1;
                quiet_since = Instant::now();
            }
            Read1::Frame(frame) => {
                if let Some(code) = code_name(&frame) {
                    break Outcome::Error(code);
                }
            }
            Read1::Closed => break Outcome::Closed,
            Read1::Nothing if quiet_since.elapsed() > Duration::from_secs(3) => {
                break Outcome::Open;
            }
            Read1::Nothing => {}
        }
    };
    Ok(serde_json::json!({
        "outcomes": tally(&[outcome]),
        "deliveries_read": deliveries,
    }))
}

fn topic_spam(target: Target, count: usize) -> Result<serde_json::Value, String> {
    let mut outcomes = Vec::new();
    for index in 0..count {
        let name = format!("made-up-{}-{index}", std::process::id());
        let Ok(mut peer) = target.connect() else {
            outcomes.push(Outcome::ConnectFailed);
            continue;
        };
        peer.send(&hello(
            topic(&name)?,
            Role::Publish,
            Order::Total,
            800 + index as u64,
        ));
        let deadline = Instant::now() + Duration::from_secs(2);
        let outcome = loop {
            match peer.next() {
                Read1::Frame(Frame::HelloOk(_)) => break Outcome::Open,
                Read1::Frame(frame) => {
                    break code_name(&frame).map_or(Outcome::Open, Outcome::Error);
                }
                Read1::Closed => break Outcome::Closed,
                Read1::Delivery(_) | Read1::Nothing if Instant::now() >= deadline => {
                    break Outcome::Open;
                }
                Read1::Delivery(_) | Read1::Nothing => {}
            }
        };
        outcomes.push(outcome);
    }
    // "open" here means the made-up topic was accepted (created).
    Ok(serde_json::json!({ "outcomes": tally(&outcomes) }))
}

/// One scrape with a 1 s deadline: whether it got a 200 with a body.
fn scrape(metrics: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&metrics, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response.starts_with(b"HTTP/1.1 200") && response.len() > 100
}

fn metrics_silent(
    metrics: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<serde_json::Value, String> {
    let held: Vec<TcpStream> = (0..connections)
        .filter_map(|_| TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).ok())
        .collect();
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    while started.elapsed() < duration {
        if scrape(metrics) {
            ok += 1;
        } else {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // How many of the silent connections the endpoint has closed by now.
    let closed = held
        .iter()
        .filter(|stream| {
            let _ = stream.set_nonblocking(true);
            let mut byte = [0u8; 1];
            !matches!((&**stream).read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
        })
        .count();
    Ok(serde_json::json!({
        "silent_connections": held.len(),
        "silent_closed_by_endpoint": closed,
        "scrapes_ok": ok,
        "scrapes_failed": failed,
    }))
}

/// A Kafka request frame in version 0's layout (header v1, a null client id): size, API
/// key, version, correlation id, then `body`.
fn kafka_frame(api_key: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    kafka_frame_of(api_key, 0, correlation_id, body)
}

/// A Kafka request frame of `version` (a version whose header is v1, not flexible).
fn kafka_frame_of(api_key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + body.len());
    frame.extend_from_slice(&((10 + body.len()) as i32).to_be_bytes());
    frame.extend_from_slice(&api_key.to_be_bytes());
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(&correlation_id.to_be_bytes());
    frame.extend_from_slice(&(-1i16).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Kafka API keys the attacks use.
const KAFKA_API_VERSIONS: i16 = 18;
const KAFKA_METADATA: i16 = 3;
const KAFKA_FETCH: i16 = 1;
const KAFKA_OFFSET_COMMIT: i16 = 8;

/// The Kafka listener's internal topic of committed offsets.
const KAFKA_OFFSETS_TOPIC: &str = "__embarcadero_offsets";

/// A Kafka string (an i16 length, then the bytes).
fn kafka_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as i16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A Fetch (version 4) of `topic`'s partition 0 from `offset`, waiting up to `wait_ms`.
fn kafka_fetch_v4(topic: &str, offset: i64, wait_ms: i32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i32).to_be_bytes()); // replica id
    body.extend_from_slice(&wait_ms.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes()); // min bytes
    body.extend_from_slice(&(4i32 << 20).to_be_bytes()); // max bytes
    body.push(0); // isolation level
    body.extend_from_slice(&1i32.to_be_bytes()); // one topic
    kafka_string(&mut body, topic);
    body.extend_from_slice(&1i32.to_be_bytes()); // one partition
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&(4i32 << 20).to_be_bytes()); // partition max bytes
    body
}

/// An OffsetCommit (version 2) of `group`: `topic`'s partition 0 at `offset`.
fn kafka_offset_commit_v2(group: &str, topic: &str, offset: i64) -> Vec<u8> {
    let mut body = Vec::new();
    kafka_string(&mut body, group);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // generation: not a group member
    kafka_string(&mut body, ""); // member id
    body.extend_from_slice(&(-1i64).to_be_bytes()); // retention
    body.extend_from_slice(&1i32.to_be_bytes()); // one topic
    kafka_string(&mut body, topic);
    body.extend_from_slice(&1i32.to_be_bytes()); // one partition
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&(-1i16).to_be_bytes()); // metadata: null
    body
}

/// Reads one Kafka response frame from `stream` (its bytes after the size prefix).
fn kafka_response(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .map_err(|e| format!("response size: {e}"))?;
    let size =
        usize::try_from(i32::from_be_bytes(size)).map_err(|_| "negative size".to_string())?;
    let mut frame = vec![0u8; size];
    stream
        .read_exact(&mut frame)
        .map_err(|e| format!("response: {e}"))?;
    Ok(frame)
}

/// Whether a well-behaved client's ApiVersions on `fresh` is answered within 2 s.
fn fresh_client_answered(mut fresh: TcpStream) -> Result<bool, String> {
    fresh
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| format!("timeout: {e}"))?;
    fresh
        .write_all(&kafka_frame(KAFKA_API_VERSIONS, 77, &[]))
        .map_err(|e| format!("ApiVersions: send: {e}"))?;
    Ok(kafka_response(&mut fresh).is_ok_and(|frame| {
        frame.len() >= 6
            && i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) == 77
            && i16::from_be_bytes([frame[4], frame[5]]) == 0
    }))
}

fn kafka_hoard(
    kafka: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<serde_json::Value, String> {
    let connect = || {
        TcpStream::connect_timeout(&kafka, Duration::from_secs(2))
            .map_err(|e| format!("connect {kafka}: {e}"))
    };
    // The hoarders: 32 waiting Fetches each, never read.
    let fetch = kafka_frame_of(
        KAFKA_FETCH,
        4,
        1,
        &kafka_fetch_v4(KAFKA_OFFSETS_TOPIC, 0, 30_000),
    );
    let mut hoarders = Vec::new();
    for _ in 0..connections {
        let mut stream = connect()?;
        for _ in 0..32 {
            stream
                .write_all(&fetch)
                .map_err(|e| format!("hoarder: send: {e}"))?;
        }
        hoarders.push(stream);
    }
    // The committer: a new group each time, reading each answer.
    let mut committer = connect()?;
    committer
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| format!("timeout: {e}"))?;
    let started = Instant::now();
    let (mut acked, mut refused) = (0u64, 0u64);
    let mut slowest = Duration::ZERO;
    while started.elapsed() < duration {
        let group = format!("hoard-{acked}-{refused}");
        let commit = kafka_frame_of(
            KAFKA_OFFSET_COMMIT,
            2,
            7,
            &kafka_offset_commit_v2(&group, KAFKA_OFFSETS_TOPIC, 0),
        );
        let sent = Instant::now();
        committer
            .write_all(&commit)
            .map_err(|e| format!("commit: send: {e}"))?;
        let answer = kafka_response(&mut committer)?;
        slowest = slowest.max(sent.elapsed());
        // correlation id, topics (1), name, partitions (1), partition, error code.
        let code_at = 4 + 4 + 2 + KAFKA_OFFSETS_TOPIC.len() + 4 + 4;
        match answer.get(code_at..code_at + 2) {
            Some([0, 0]) => acked += 1,
            _ => refused += 1,
        }
    }
    // Still open: a write is taken, or would block.
    let mut hoarders_open = 0;
    for stream in &mut hoarders {
        let _ = stream.set_nonblocking(true);
        match stream.write(&fetch) {
            Ok(_) => hoarders_open += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => hoarders_open += 1,
            Err(_) => {}
        }
    }
    let answered = fresh_client_answered(connect()?)?;
    Ok(serde_json::json!({
        "hoarders": connections,
        "hoarders_open": hoarders_open,
        "fetches_waiting_sent": connections * 32,
        "commits_acked": acked,
        "commits_refused": refused,
        "slowest_commit_ms": slowest.as_millis() as u64,
        "fresh_answered": answered,
    }))
}

/// Whether the peer closed `stream` within `within` (end of stream or a reset), reading
/// and dropping whatever it sent first.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn kafka_garbage(kafka: SocketAddr, duration: Duration) -> Result<serde_json::Value, String> {
    let connect = || {
        TcpStream::connect_timeout(&kafka, Duration::from_secs(2))
            .map_err(|e| format!("connect {kafka}: {e}"))
    };
    let mut cut_header = kafka_frame(KAFKA_METADATA, 1, &[]);
    cut_header.truncate(4 + 5);
    cut_header[..4].copy_from_slice(&5i32.to_be_bytes());
    let malformed: [(&str, Vec<u8>); 5] = [
        ("negative_size", (-5i32).to_be_bytes().to_vec()),
        ("oversize", i32::MAX.to_be_bytes().to_vec()),
        ("unknown_api", kafka_frame(999, 1, &[])),
        ("cut_header", cut_header),
        // Metadata naming 2^31 - 1 topics in 4 bytes.
        (
            "huge_topic_count",
            kafka_frame(KAFKA_METADATA, 1, &i32::MAX.to_be_bytes()),
        ),
    ];
    let mut closed = serde_json::Map::new();
    for (name, bytes) in &malformed {
        let mut stream = connect()?;
        stream
            .write_all(bytes)
            .map_err(|e| format!("{name}: send: {e}"))?;
        closed.insert(
            (*name).into(),
            closed_within(&mut stream, Duration::from_secs(5)).into(),
        );
    }
    // A client that never reads: Metadata requests (every topic) until its socket takes no
    // more, for the attack's duration.
    let mut unread = connect()?;
    unread
        .set_nonblocking(true)
        .map_err(|e| format!("non-blocking: {e}"))?;
    let request = kafka_frame(KAFKA_METADATA, 2, &0i32.to_be_bytes());
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        match unread.write(&request) {
            Ok(n) if n == request.len() => sent += 1,
            // A cut request is finished blocking, so that the stream stays in frame.
            Ok(n) => {
                let _ = unread.set_nonblocking(false);
                let _ = unread.set_write_timeout(Some(Duration::from_millis(100)));
                if unread.write_all(&request[n..]).is_err() {
                    break;
                }
                sent += 1;
                let _ = unread.set_nonblocking(true);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => break,
        }
    }
    // Paused, its socket takes no more; closed (with its requests unread, so with a
    // reset), a write fails.
    let _ = unread.set_nonblocking(true);
    let unread_open = match unread.write(&request) {
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    };
    // A well-behaved client now.
    let answered = fresh_client_answered(connect()?)?;
    Ok(serde_json::json!({
        "closed": closed,
        "malformed_closed": closed.values().filter(|v| **v == serde_json::Value::Bool(true)).count(),
        "unread_requests_sent": sent,
        "unread_left_open": unread_open,
        "fresh_answered": answered,
    }))
}

fn late_subscriber(
    target: Target,
    name: &str,
    order_value: u8,
) -> Result<serde_json::Value, String> {
    let order = order(order_value)?;
    let subscribe = |from_position| -> Result<Peer, String> {
        let mut peer = target
            .connect()
            .map_err(|e| format!("connect {}: {e}", target.broker))?;
        let role = Role::Subscribe {
            from_position,
            batch_bytes_max: 0,
        };
        peer.send(&hello(topic(name)?, role, order, 960));
        Ok(peer)
    };
    let first_frame = |peer: &mut Peer| -> Option<Frame> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match peer.next() {
                Read1::Frame(frame) => return Some(frame),
                Read1::Closed => return None,
                Read1::Delivery(_) | Read1::Nothing => {}
            }
        }
        None
    };
    let log_start = match first_frame(&mut subscribe(FROM_END)?) {
        Some(Frame::HelloOk(ok)) => ok.log_start,
        other => return Err(format!("a subscriber from the end got {other:?}")),
    };
    let from_zero = match first_frame(&mut subscribe(0)?) {
        Some(Frame::HelloOk(_)) => "HelloOk".to_owned(),
        Some(Frame::Error(error)) => format!("{:?}", error.code),
        other => format!("{other:?}"),
    };
    let mut from_start = subscribe(log_start)?;
    let mut first_delivery = None;
    if let Some(Frame::HelloOk(_)) = first_frame(&mut from_start) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && first_delivery.is_none() {
            match from_start.next() {
                Read1::Delivery(header) => first_delivery = header.global_start,
                Read1::Closed | Read1::Frame(_) => break,
                Read1::Nothing => {}
            }
        }
    }
    Ok(serde_json::json!({
        "log_start": log_start,
        "from_zero": from_zero,
        "first_delivery_from_log_start": first_delivery,
    }))
}

fn run(cli: &Cli) -> Result<serde_json::Value, String> {
    let seconds = Duration::from_secs_f64;
    let target = |broker: &SocketAddr| Target {
        broker: *broker,
        source: cli.source_ip,
    };
    match &cli.attack {
        Attack::Slowloris {
            on,
            connections,
            payload_bytes,
            byte_interval_ms,
            duration_s,
        } => slowloris(
            target(&on.broker),
            on,
            *connections,
            *payload_bytes,
            Duration::from_millis(*byte_interval_ms),
            seconds(*duration_s),
        ),
        Attack::Silent {
            broker,
            connections,
            duration_s,
        } => silent(target(broker), *connections, seconds(*duration_s)),
        Attack::StalledSubscriber { on, duration_s } => {
            stalled_subscriber(target(&on.broker), on, seconds(*duration_s))
        }
        Attack::TopicSpam { broker, count } => topic_spam(target(broker), *count),
        Attack::MetricsSilent {
            metrics,
            connections,
            duration_s,
        } => metrics_silent(*metrics, *connections, seconds(*duration_s)),
        Attack::LateSubscriber { on } => late_subscriber(target(&on.broker), &on.topic, on.order),
        Attack::KafkaGarbage { kafka, duration_s } => kafka_garbage(*kafka, seconds(*duration_s)),
        Attack::KafkaHoard {
            kafka,
            connections,
            duration_s,
        } => kafka_hoard(*kafka, *connections, seconds(*duration_s)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(result) => {
            let text = result.to_string();
            match &cli.json {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, &text) {
                        eprintln!("error: cannot write {}: {e}", path.display());
                        return ExitCode::from(1);
                    }
                }
                None => println!("{text}"),
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}
