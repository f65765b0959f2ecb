//! `loadgen`: the Embarcadero-rs load generator. See `loadgen --help`.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser, ValueEnum};
use client::summary::Summary;
use client::verify::{
    DeliveryContext, Expectation, MessageFactory, OrderCheck, Verifier, VerifyCounts,
};
use client::{
    ClientError, LatencySummary, Publisher, PublisherConfig, PublisherEvent, Subscriber,
    SubscriberConfig, TopicSpec, create_topic_on_cluster, latency_histogram,
};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;

const ABOUT: &str = "Load generator for Embarcadero-rs: publishes self-checking messages to \
one or more brokers, optionally reads them back, and reports throughput, ack latency and \
delivery checks as a table and as JSON.";

const AFTER_HELP: &str = "\
TESTS
  publish     publishers send for --duration-s or --total-bytes, then flush and close;
              throughput counts acknowledged bytes (written bytes at --ack 0).
  end-to-end  a subscriber on the first broker reads from position 0 (started before the
              publishers) and checks every message: its CRC-32C, exactly once per
              (publisher, sequence), the order the topic promises, and no gaps in global
              positions. After the publishers finish it drains for --drain-timeout-s.
  latency     like publish with the defaults --publishers 1, --linger-us 0 (one message per
              batch) and --rate-msgs-per-s 10000; reports ack latency percentiles.
  subscribe   one subscriber on the first broker reads from --from-position for
              --duration-s or --total-bytes and reports its throughput.

MESSAGES
  Every message starts with a 16-byte header: CRC-32C (u32) of all bytes after it,
  publisher index (u32), message sequence within that publisher (u64); a deterministic
  pattern fills it to --message-bytes. Publisher i uses client id base + i, so messages of
  earlier runs on the same topic are recognised as foreign and ignored.

ORDER CHECK (end-to-end)
  order 0     none: only content and exactly-once are checked.
  order 1, 2  per connection: the messages one publisher sent over one connection
              (batch_seq % connections) are delivered in send order. With one connection
              per broker this is per-broker FIFO per publisher. A connection that replaces
              a failed one carries on its stream, so the check holds across a failover.
  order 5     per publisher: each publisher session's messages in send order, across all
              brokers (gaps left by rejected batches are not violations).

JSON (--json FILE)
  test, backend (--backend-label), brokers, topic, connections_per_broker, connections
  (all publishers' TCP connections), publishers, order, ack, message_bytes, batch_bytes,
  linger_us, rate_msgs_per_s, messages_sent / bytes_sent (written to sockets),
  messages_acked / bytes_acked (acknowledged, ack >= 1), messages_received /
  bytes_received (subscriber), seconds (measured phase), mb_per_s (10^6 bytes of message
  content per second) and msgs_per_s (acknowledged; written at ack 0; received in the
  subscribe test), ack_latency_us {count, p50, p99, p999, max, mean} (from sealing a batch
  to its ack), rejected (messages of batches the broker did not order:
  SessionGapSkipped), lost (acknowledged, or written at ack 0, but never delivered within
  the drain timeout), duplicates, order_violations, order_check, corrupt (messages or
  deliveries failing their checksum), position_gaps, position_duplicates, foreign,
  reconnects (connections the publishers opened again after one failed), batches_resent
  (batches sent again because their connection failed before the ack), duplicate_acks
  (acknowledged batches a broker found already in the log: resends whose first copy had
  arrived, acknowledged with the original position and not written twice), ack_gap_max_ms
  (the longest a publisher waited for a new ack while sending, looked at every 1,024
  messages: after a failover, the time to its first ack), connect_ms (how long the
  publishers took to open their connections, Hello/HelloOk included), errors, passed.

BROKER FAILURES
  A publisher survives a broker that dies mid-run: the batches that were unacknowledged on
  its connections are resent, with the same sequence numbers and bytes, on new connections
  to the other brokers, and the dead broker is retried in the background. Resends of
  batches that had reached the log are acknowledged as duplicates, so the end-to-end check
  still finds every acknowledged message exactly once and in order. A publisher gives up
  only when no broker can be reached for --reconnect-timeout-ms. The subscriber uses the
  broker of --subscriber-broker, which must stay up; CreateTopic goes to the first broker
  that creates topics (the holder of the sequencer lease).

EXIT CODE
  0 when the run passed; 1 when a publisher or the subscriber failed (a publisher fails
  when no broker answers for --reconnect-timeout-ms, not because one broker died), or
  (end-to-end) when
  lost, duplicates, order_violations, corrupt or position gaps/duplicates are non-zero;
  2 for bad flags.";

/// Test mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TestMode {
    /// Publish only.
    Publish,
    /// Read only.
    Subscribe,
    /// Publish and verify every delivered message.
    EndToEnd,
    /// Paced publishing with small batches; ack latency.
    Latency,
}

impl TestMode {
    fn name(self) -> &'static str {
        match self {
            TestMode::Publish => "publish",
            TestMode::Subscribe => "subscribe",
            TestMode::EndToEnd => "end-to-end",
            TestMode::Latency => "latency",
        }
    }
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProgressMode {
    /// A bar when stderr is a terminal, else lines.
    Auto,
    /// An indicatif progress bar.
    Bar,
    /// One plain line per second.
    Lines,
    /// Nothing.
    None,
}

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = ABOUT,
    after_help = "Run with --help for the test modes, message format, order checks, JSON fields and exit codes.",
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// Broker addresses, comma separated (HOST:PORT,...). CreateTopic goes to the first that
    /// creates topics (the head, or the standby that took the sequencer lease over).
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    brokers: Vec<SocketAddr>,
    /// Topic name (1 to 64 bytes of [A-Za-z0-9._-]).
    #[arg(long, default_value = "loadgen")]
    topic: String,
    /// Send CreateTopic (with --order, --ack, --replication-factor) to the lease holder
    /// before publishing (not in the subscribe test); a topic that exists with the same settings is fine, with other settings the
    /// run stops. `--create-topic false` skips it.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    create_topic: bool,
    /// Replication factor for CreateTopic (default: 1 at --ack 2, else 0).
    #[arg(long)]
    replication_factor: Option<u8>,
    /// CreateTopic with retention "hold for subscribers": publishers wait for every
    /// connected subscriber however long it takes. By default a subscriber that stops
    /// reading stops holding the log after the broker's --subscriber-stall-ms.
    #[arg(long)]
    hold_for_subscribers: bool,
    /// Which broker of --brokers (0-based index) serves the subscriber (fault runs put it on
    /// a broker they leave alone).
    #[arg(long, default_value_t = 0)]
    subscriber_broker: usize,
    /// Size of each message in bytes, header included (at least 16).
    #[arg(long, default_value_t = 1024, value_parser = parse_message_bytes)]
    message_bytes: usize,
    /// Stop after this many message bytes in total (all publishers together; for
    /// subscribe, bytes read). Accepts K, M, G (10^3...) and KiB, MiB, GiB suffixes.
    #[arg(long, value_parser = parse_bytes, conflicts_with = "duration_s")]
    total_bytes: Option<u64>,
    /// Stop after this many seconds (default 10 when --total-bytes is not given).
    #[arg(long, value_parser = parse_seconds)]
    duration_s: Option<f64>,
    /// TCP connections each publisher opens to each broker (honoured exactly).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections_per_broker: u32,
    /// Topic order: 0, 1, 2 or 5.
    #[arg(long, default_value_t = 2, value_parser = parse_order)]
    order: u8,
    /// Ack level: 0 (none), 1 (ordered), 2 (replicated).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    ack: u8,
    /// Target publish rate in messages per second over all publishers, paced evenly;
    /// 0 = unlimited (default; 10000 for --test latency).
    #[arg(long)]
    rate_msgs_per_s: Option<u64>,
    /// What to run (see TESTS below).
    #[arg(long, value_enum, default_value_t = TestMode::Publish)]
    test: TestMode,
    /// Largest batch payload in bytes (default 64 KiB; the brokers' limit caps it).
    #[arg(long, value_parser = parse_bytes)]
    batch_bytes: Option<u64>,
    /// How long an open batch waits for more messages, in microseconds (default 500; 0 for
    /// --test latency).
    #[arg(long)]
    linger_us: Option<u64>,
    /// Publisher threads, each its own Publisher with its own client id (honoured
    /// exactly; default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    publishers: Option<u32>,
    /// Unacknowledged batches allowed per connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight_batches: u32,
    /// How long a publisher may be without any broker connection before it gives up, in
    /// milliseconds. While some broker answers, a failed connection is replaced at once and
    /// its unacknowledged batches are resent (see BROKER FAILURES below).
    #[arg(long, default_value_t = client::RECONNECT_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    reconnect_timeout_ms: u64,
    /// First global position read by --test subscribe.
    #[arg(long, default_value_t = 0)]
    from_position: u64,
    /// End-to-end: how long the subscriber may take, after the publishers finish, to
    /// receive every acknowledged message.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    drain_timeout_s: f64,
    /// Write the JSON summary to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Progress display on stderr: auto (bar on a terminal, else lines), bar, lines, none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Label written to the JSON `backend` field (e.g. kernel, xdp).
    #[arg(long, default_value = "kernel")]
    backend_label: String,
}

fn parse_order(value: &str) -> Result<u8, String> {
    match value.parse::<u8>() {
        Ok(order @ (0 | 1 | 2 | 5)) => Ok(order),
        _ => Err(format!("order {value:?} is not one of 0, 1, 2 or 5")),
    }
}

fn parse_message_bytes(value: &str) -> Result<usize, String> {
    let bytes = parse_bytes(value)?;
    if bytes < client::verify::MESSAGE_HEADER_BYTES as u64 {
        return Err(format!(
            "{bytes} bytes is below the 16-byte self-checking header; use at least 16"
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes does not fit in memory"))
}

fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 1e6 => Ok(seconds),
        _ => Err(format!(
            "{value:?} is not a number of seconds in (0, 1000000]"
        )),
    }
}

/// Parses a byte count with an optional decimal (K, M, G, T) or binary (KiB, MiB, GiB,
/// TiB) suffix; a trailing `B` is optional.
fn parse_bytes(value: &str) -> Result<u64, String> {
    let trimmed = value.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {value:?} (use K, M, G, KiB, MiB, GiB)"
            ));
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a byte count such as 1048576, 64KiB or 1G"))?;
    let bytes = number * multiplier as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("{value:?} is not a positive byte count"));
    }
    Ok(bytes as u64)
}

/// When the measured phase stops.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    TotalBytes(u64),
    Duration(Duration),
}

/// The run, with every default resolved.
#[derive(Debug, Clone)]
struct Plan {
    test: TestMode,
    brokers: Vec<SocketAddr>,
    subscriber_broker: SocketAddr,
    topic: String,
    create_topic: bool,
    replication_factor: u8,
    hold_for_subscribers: bool,
    message_bytes: usize,
    stop: Stop,
    connections_per_broker: usize,
    order: u8,
    ack: u8,
    rate_msgs_per_s: u64,
    batch_bytes: usize,
    linger_us: u64,
    publishers: usize,
    in_flight_batches: usize,
    reconnect_timeout_ms: u64,
    from_position: u64,
    drain_timeout: Duration,
    json: Option<PathBuf>,
    progress: ProgressMode,
    backend_label: String,
}

impl Plan {
    fn from_cli(cli: Cli) -> Result<Plan, String> {
        let latency = cli.test == TestMode::Latency;
        let batch_bytes = cli
            .batch_bytes
            .unwrap_or(client::BATCH_BYTES_MAX_DEFAULT as u64);
        if !(4..=64 << 20).contains(&batch_bytes) {
            return Err(format!(
                "--batch-bytes {batch_bytes} is outside 4..=67108864 (64 MiB)"
            ));
        }
        if cli.message_bytes as u64 + 4 > batch_bytes {
            return Err(format!(
                "--message-bytes {} plus its 4-byte length prefix does not fit in --batch-bytes {batch_bytes}",
                cli.message_bytes
            ));
        }
        let subscriber_broker = *cli.brokers.get(cli.subscriber_broker).ok_or_else(|| {
            format!(
                "--subscriber-broker {} is not an index into the {} brokers of --brokers",
                cli.subscriber_broker,
                cli.brokers.len()
            )
        })?;
        let replication_factor = cli.replication_factor.unwrap_or(u8::from(cli.ack == 2));
        if cli.ack == 2 && replication_factor == 0 {
            return Err("--ack 2 needs --replication-factor of at least 1".into());
        }
        let stop = match (cli.total_bytes, cli.duration_s) {
            (Some(bytes), _) => Stop::TotalBytes(bytes),
            (None, Some(seconds)) => Stop::Duration(Duration::from_secs_f64(seconds)),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        };
        Ok(Plan {
            test: cli.test,
            brokers: cli.brokers,
            topic: cli.topic,
            create_topic: cli.create_topic,
            replication_factor,
            hold_for_subscribers: cli.hold_for_subscribers,
            subscriber_broker,
            message_bytes: cli.message_bytes,
            stop,
            connections_per_broker: cli.connections_per_broker as usize,
            order: cli.order,
            ack: cli.ack,
            rate_msgs_per_s: cli
                .rate_msgs_per_s
                .unwrap_or(if latency { 10_000 } else { 0 }),
            batch_bytes: batch_bytes as usize,
            linger_us: cli.linger_us.unwrap_or(if latency {
                0
            } else {
                client::LINGER_US_DEFAULT
            }),
            publishers: cli.publishers.unwrap_or(1) as usize,
            in_flight_batches: cli.in_flight_batches as usize,
            reconnect_timeout_ms: cli.reconnect_timeout_ms,
            from_position: cli.from_position,
            drain_timeout: Duration::from_secs_f64(cli.drain_timeout_s),
            json: cli.json,
            progress: cli.progress,
            backend_label: cli.backend_label,
        })
    }

    /// Connections of one publisher.
    fn connections_per_publisher(&self) -> usize {
        self.brokers.len() * self.connections_per_broker
    }

    fn publishes(&self) -> bool {
        self.test != TestMode::Subscribe
    }

    /// Messages publisher `index` sends when the run is bounded by bytes.
    fn messages_for(&self, index: usize) -> Option<u64> {
        let Stop::TotalBytes(bytes) = self.stop else {
            return None;
        };
        let total = bytes.div_ceil(self.message_bytes as u64);
        let share = total / self.publishers as u64;
        let extra = u64::from((index as u64) < total % self.publishers as u64);
        Some(share + extra)
    }

    fn summary(&self) -> Summary {
        let publishers = if self.publishes() { self.publishers } else { 0 };
        Summary {
            test: self.test.name().into(),
            backend: self.backend_label.clone(),
            brokers: self.brokers.iter().map(ToString::to_string).collect(),
            topic: self.topic.clone(),
            connections_per_broker: self.connections_per_broker,
            connections: publishers * self.connections_per_publisher(),
            publishers,
            order: self.order,
            ack: self.ack,
            message_bytes: self.message_bytes,
            batch_bytes: self.batch_bytes,
            linger_us: self.linger_us,
            rate_msgs_per_s: self.rate_msgs_per_s,
            order_check: order_check_name(OrderCheck::for_order(
                self.order,
                self.connections_per_publisher() as u64,
            ))
            .into(),
            ..Summary::default()
        }
    }
}

fn order_check_name(check: OrderCheck) -> &'static str {
    match check {
        OrderCheck::None => "none",
        OrderCheck::PerConnection { .. } => "per_connection",
        OrderCheck::PerPublisher => "per_publisher",
    }
}

/// Counters the progress display reads.
#[derive(Debug, Default)]
struct Progress {
    published: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    done: AtomicBool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let plan = match Plan::from_cli(Cli::parse()) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    eprintln!("{}", describe(&plan));
    if plan.create_topic && plan.publishes() {
        let spec = TopicSpec {
            topic: plan.topic.clone(),
            order: plan.order,
            ack: plan.ack,
            replication_factor: plan.replication_factor,
            hold_for_subscribers: plan.hold_for_subscribers,
        };
        match create_topic_on_cluster(&plan.brokers, &spec, Duration::from_secs(10)) {
            Ok(created) => eprintln!(
                "topic {}: {} on broker {}",
                plan.topic,
                if created.created {
                    "created"
                } else {
                    "exists with these settings"
                },
                created.broker_id
            ),
            Err(error) => {
                eprintln!("error: creating topic {}: {error}", plan.topic);
                if error.broker_code() == Some(wire::ErrorCode::TopicExists) {
                    eprintln!(
                        "hint: pick another --topic or match its --order/--ack/--replication-factor"
                    );
                }
                return ExitCode::from(1);
            }
        }
    }
    let summary = run(&plan);
    print!("{}", table(&summary));
    if let Some(path) = &plan.json {
        let written = serde_json::to_string_pretty(&summary)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json + "\n").map_err(|e| e.to_string()));
        if let Err(error) = written {
            eprintln!("error: writing {}: {error}", path.display());
            return ExitCode::from(1);
        }
    }
    if summary.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn describe(plan: &Plan) -> String {
    let mut text = format!(
        "loadgen: test {}, topic {}, order {}, ack {}, {}-byte messages",
        plan.test.name(),
        plan.topic,
        plan.order,
        plan.ack,
        plan.message_bytes
    );
    if plan.publishes() {
        let _ = write!(
            text,
            "\n  {} publisher(s) x {} broker(s) x {} connection(s) per broker = {} connections; batches up to {} bytes, linger {} us, {} in flight per connection, rate {}",
            plan.publishers,
            plan.brokers.len(),
            plan.connections_per_broker,
            plan.publishers * plan.connections_per_publisher(),
            plan.batch_bytes,
            plan.linger_us,
            plan.in_flight_batches,
            if plan.rate_msgs_per_s == 0 {
                "unlimited".to_string()
            } else {
                format!("{} msgs/s", plan.rate_msgs_per_s)
            }
        );
    }
    match plan.stop {
        Stop::TotalBytes(bytes) => {
            let _ = write!(text, "\n  until {bytes} bytes");
        }
        Stop::Duration(duration) => {
            let _ = write!(text, "\n  for {:.1} s", duration.as_secs_f64());
        }
    }
    text
}

fn run(plan: &Plan) -> Summary {
    let progress = Arc::new(Progress::default());
    let display = start_progress(plan, &progress);
    let summary = match plan.test {
        TestMode::Subscribe => run_subscribe(plan, &progress),
        TestMode::Publish | TestMode::Latency | TestMode::EndToEnd => run_publish(plan, &progress),
    };
    progress.done.store(true, Ordering::Relaxed);
    if let Some(display) = display {
        let _ = display.join();
    }
    summary
}

/// What one publisher thread did.
struct PublisherOutcome {
    stats: client::PublisherStats,
    latency_us: Histogram<u64>,
    expectation: Expectation,
    connections: usize,
    /// When every batch was acknowledged (before Goodbye and closing the sockets).
    flushed_at: Instant,
    /// Longest time without a new ack while publishing (see `Summary::ack_gap_max_ms`).
    ack_gap_max: Duration,
    error: Option<String>,
}

fn run_publish(plan: &Plan, progress: &Arc<Progress>) -> Summary {
    let mut summary = plan.summary();
    let base_id = client::default_client_id();
    let client_ids: Vec<u64> = (0..plan.publishers as u64)
        .map(|i| base_id.wrapping_add(i))
        .collect();
    // End-to-end: the subscriber connects before any publisher sends.
    let (expectations_tx, expectations_rx) = crossbeam_channel::bounded(1);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let checker = (plan.test == TestMode::EndToEnd).then(|| {
        let (plan, ids, progress) = (plan.clone(), client_ids.clone(), progress.clone());
        thread::spawn(move || check_deliveries(&plan, &ids, &expectations_rx, &ready_tx, &progress))
    });
    if checker.is_some() && !ready_rx.recv().unwrap_or(false) {
        let outcome = checker.and_then(|c| c.join().ok());
        summary.errors = outcome.and_then(|o| o.error).into_iter().collect();
        return summary;
    }
    // Publishers connect first, report it, and start together when the gate closes, so
    // connection set-up is not measured.
    let (connected_tx, connected_rx) = crossbeam_channel::unbounded::<()>();
    let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let connecting = Instant::now();
    let threads: Vec<_> = client_ids
        .iter()
        .enumerate()
        .map(|(index, &client_id)| {
            let (plan, progress) = (plan.clone(), progress.clone());
            let (connected, gate) = (connected_tx.clone(), gate_rx.clone());
            thread::Builder::new()
                .name(format!("publisher-{index}"))
                .spawn(move || publish(&plan, index, client_id, &connected, &gate, &progress))
        })
        .collect();
    drop(connected_tx);
    let spawned = threads.iter().filter(|t| t.is_ok()).count();
    if spawned < plan.publishers {
        summary.errors.push(format!(
            "only {spawned} of {} publisher threads started",
            plan.publishers
        ));
    }
    for _ in 0..spawned {
        let _ = connected_rx.recv();
    }
    summary.connect_ms = connecting.elapsed().as_millis() as u64;
    let started = Instant::now();
    drop(gate_tx);
    let mut outcomes = Vec::new();
    for thread in threads.into_iter().flatten() {
        match thread.join() {
            Ok(outcome) => outcomes.push(outcome),
            Err(_) => summary.errors.push("a publisher thread panicked".into()),
        }
    }
    let seconds = outcomes
        .iter()
        .map(|o| o.flushed_at.saturating_duration_since(started))
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    let mut histogram = latency_histogram();
    for outcome in &outcomes {
        let stats = &outcome.stats;
        summary.messages_sent += stats.messages_sent;
        summary.bytes_sent += stats.bytes_sent;
        summary.messages_acked += stats.messages_acked;
        summary.bytes_acked += stats.bytes_acked;
        summary.rejected += stats.messages_rejected;
        summary.reconnects += stats.reconnects;
        summary.batches_resent += stats.batches_resent;
        summary.duplicate_acks += stats.batches_duplicate;
        summary.ack_gap_max_ms = summary
            .ack_gap_max_ms
            .max(outcome.ack_gap_max.as_millis() as u64);
        if let Err(error) = histogram.add(&outcome.latency_us) {
            log::warn!("merging latency histograms: {error}");
        }
        if outcome.connections != plan.connections_per_publisher() && outcome.error.is_none() {
            summary.errors.push(format!(
                "a publisher opened {} connections instead of {}",
                outcome.connections,
                plan.connections_per_publisher()
            ));
        }
        summary.errors.extend(outcome.error.clone());
    }
    summary.ack_latency_us = LatencySummary::of(&histogram);
    summary.seconds = seconds;
    let (bytes, messages) = if plan.ack == 0 {
        (summary.bytes_sent, summary.messages_sent)
    } else {
        (summary.bytes_acked, summary.messages_acked)
    };
    summary.mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9);
    summary.msgs_per_s = messages as f64 / seconds.max(1e-9);
    summary.passed = summary.errors.is_empty();
    if let Some(checker) = checker {
        // Publishers that never ran expect nothing.
        let mut expectations: Vec<Expectation> =
            outcomes.into_iter().map(|o| o.expectation).collect();
        expectations.resize(plan.publishers, Expectation::default());
        let _ = expectations_tx.send(expectations);
        match checker.join() {
            Ok(outcome) => apply_check(&mut summary, outcome),
            Err(_) => summary.errors.push("the subscriber thread panicked".into()),
        }
        summary.passed = summary.errors.is_empty()
            && summary.lost == 0
            && summary.duplicates == 0
            && summary.order_violations == 0
            && summary.corrupt == 0
            && summary.position_gaps == 0
            && summary.position_duplicates == 0;
    }
    summary
}

fn publisher_config(plan: &Plan, client_id: u64) -> PublisherConfig {
    let mut config = PublisherConfig::new(plan.brokers.clone(), plan.topic.clone());
    config.order = plan.order;
    config.ack = plan.ack;
    config.client_id = client_id;
    config.connections_per_broker = plan.connections_per_broker;
    config.batch_bytes_max = plan.batch_bytes;
    config.linger_us = plan.linger_us;
    config.in_flight_batches_max = plan.in_flight_batches;
    config.reconnect_timeout_ms = plan.reconnect_timeout_ms;
    config.blocking = true;
    // Every acked range is needed to tell lost messages from rejected ones.
    config.report_acks = plan.test == TestMode::EndToEnd;
    config
}

/// Collects acknowledged message ranges from publisher events.
#[derive(Default)]
struct AckedRanges {
    ranges: Vec<(u64, u32)>,
}

impl AckedRanges {
    fn absorb(&mut self, events: Vec<PublisherEvent>) {
        for event in events {
            match event {
                PublisherEvent::Acked {
                    first_message_index,
                    message_count,
                    ..
                } => self.ranges.push((first_message_index, message_count)),
                PublisherEvent::Rejected {
                    batch_seq,
                    broker,
                    reason,
                    ..
                } => {
                    log::warn!("{broker} did not order batch {batch_seq}: {reason}");
                }
                PublisherEvent::PoolFull { .. } => {}
            }
        }
    }

    /// Messages `0..published` minus the ranges never acknowledged.
    fn expectation(mut self, published: u64) -> Expectation {
        self.ranges.sort_unstable();
        let mut excluded = Vec::new();
        let mut covered = 0;
        for (start, count) in self.ranges {
            if start > covered {
                excluded.push(covered..start);
            }
            covered = covered.max(start + u64::from(count));
        }
        if covered < published {
            excluded.push(covered..published);
        }
        Expectation {
            messages: published,
            excluded,
        }
    }
}

fn publish(
    plan: &Plan,
    index: usize,
    client_id: u64,
    connected: &Sender<()>,
    gate: &Receiver<()>,
    progress: &Progress,
) -> PublisherOutcome {
    let connection = Publisher::connect(publisher_config(plan, client_id));
    // Report in, connected or not, then wait for the gate (its sender is dropped to open).
    let _ = connected.send(());
    let _ = gate.recv();
    let failed = |error: String| PublisherOutcome {
        stats: client::PublisherStats::default(),
        latency_us: latency_histogram(),
        expectation: Expectation::default(),
        connections: 0,
        flushed_at: Instant::now(),
        ack_gap_max: Duration::ZERO,
        error: Some(format!("publisher {index}: {error}")),
    };
    let mut publisher = match connection {
        Ok(publisher) => publisher,
        Err(error) => return failed(error.to_string()),
    };
    let connections = publisher.connection_count();
    let Some(mut factory) = MessageFactory::new(index as u32, plan.message_bytes) else {
        return failed(format!(
            "{}-byte messages cannot hold the 16-byte header",
            plan.message_bytes
        ));
    };
    let limit = plan.messages_for(index).unwrap_or(u64::MAX);
    let start = Instant::now();
    let deadline = match plan.stop {
        Stop::Duration(duration) => Some(start + duration),
        Stop::TotalBytes(_) => None,
    };
    let interval = (plan.rate_msgs_per_s > 0)
        .then(|| Duration::from_secs_f64(plan.publishers as f64 / plan.rate_msgs_per_s as f64));
    let mut acked = AckedRanges::default();
    let mut reported_acked = 0;
    let mut acked_changed_at = start;
    let mut ack_gap_max = Duration::ZERO;
    let mut error = None;
    let mut seq = 0u64;
    while seq < limit {
        // Reading the clock for every message costs more than the message; every 256th will do.
        if seq % 256 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(interval) = interval {
            let due = start + interval.mul_f64(seq as f64);
            if let Err(e) = pace(&mut publisher, due) {
                error = Some(e);
                break;
            }
        }
        if let Err(e) = publisher.publish(factory.message(seq)) {
            error = Some(e);
            break;
        }
        seq += 1;
        progress.published.fetch_add(1, Ordering::Relaxed);
        if seq % 1024 == 0 {
            let messages_acked = publisher.messages_acked();
            if messages_acked != reported_acked {
                let now = Instant::now();
                ack_gap_max = ack_gap_max.max(now.saturating_duration_since(acked_changed_at));
                acked_changed_at = now;
            }
            progress
                .acked
                .fetch_add(messages_acked - reported_acked, Ordering::Relaxed);
            reported_acked = messages_acked;
            acked.absorb(publisher.take_events());
        }
    }
    // The measured phase ends at the flush; the Goodbye exchange is not throughput.
    let flushed = publisher.flush();
    let flushed_at = Instant::now();
    if let Err(e) = flushed.and_then(|()| publisher.close())
        && error.is_none()
    {
        error = Some(e);
    }
    acked.absorb(publisher.take_events());
    let stats = publisher.stats();
    progress
        .acked
        .fetch_add(stats.messages_acked - reported_acked, Ordering::Relaxed);
    let expectation = if plan.ack == 0 {
        // Nothing is acknowledged at ack 0: a written message counts as sent.
        Expectation {
            messages: stats.messages_sent,
            excluded: Vec::new(),
        }
    } else {
        acked.expectation(seq)
    };
    PublisherOutcome {
        latency_us: publisher.ack_latency_histogram().clone(),
        stats,
        expectation,
        connections,
        flushed_at,
        ack_gap_max,
        error: error.map(|e| format!("publisher {index}: {e}")),
    }
}

/// Waits until `due`, letting the publisher seal lingering batches meanwhile. Sleeps for
/// most of the wait and spins briefly at the end, since a sleep overshoots by tens of us.
fn pace(publisher: &mut Publisher, due: Instant) -> Result<(), ClientError> {
    loop {
        let now = Instant::now();
        if now >= due {
            return Ok(());
        }
        let wake = publisher.linger_deadline().map_or(due, |d| d.min(due));
        let wait = wake.saturating_duration_since(now);
        if wait > Duration::from_micros(200) {
            thread::sleep(wait - Duration::from_micros(100));
        } else {
            std::hint::spin_loop();
        }
        publisher.poll()?;
    }
}

/// What the end-to-end subscriber found.
struct CheckOutcome {
    counts: VerifyCounts,
    lost: u64,
    stats: client::SubscriberStats,
    error: Option<String>,
}

fn apply_check(summary: &mut Summary, outcome: CheckOutcome) {
    summary.lost = outcome.lost;
    summary.duplicates = outcome.counts.duplicates;
    summary.order_violations = outcome.counts.order_violations;
    summary.corrupt = outcome.counts.corrupt + outcome.stats.corrupt_batches;
    summary.foreign = outcome.counts.foreign;
    summary.messages_received = outcome.stats.messages;
    summary.bytes_received = outcome.stats.message_bytes;
    summary.position_gaps = outcome.stats.positions.gaps;
    summary.position_duplicates = outcome.stats.positions.duplicates;
    summary.errors.extend(outcome.error);
}

fn check_deliveries(
    plan: &Plan,
    client_ids: &[u64],
    expectations: &Receiver<Vec<Expectation>>,
    ready: &Sender<bool>,
    progress: &Progress,
) -> CheckOutcome {
    let mut outcome = CheckOutcome {
        counts: VerifyCounts::default(),
        lost: 0,
        stats: client::SubscriberStats::default(),
        error: None,
    };
    let mut config = SubscriberConfig::new(plan.subscriber_broker, plan.topic.clone());
    config.order = plan.order;
    config.from_position = 0;
    let mut subscriber = match Subscriber::connect(config) {
        Ok(subscriber) => subscriber,
        Err(error) => {
            outcome.error = Some(format!("subscriber: {error}"));
            let _ = ready.send(false);
            return outcome;
        }
    };
    let _ = ready.send(true);
    let check = OrderCheck::for_order(plan.order, plan.connections_per_publisher() as u64);
    let mut verifier = Verifier::new(check, client_ids);
    let mut expected: Option<(Vec<Expectation>, u64, Instant)> = None;
    loop {
        if expected.is_none()
            && let Ok(list) = expectations.try_recv()
        {
            let total = list
                .iter()
                .map(|e| e.messages - e.excluded.iter().map(|r| r.end - r.start).sum::<u64>())
                .sum();
            expected = Some((list, total, Instant::now() + plan.drain_timeout));
        }
        match subscriber.next_batch(Duration::from_millis(100)) {
            Ok(Some(batch)) => {
                let context = DeliveryContext {
                    client_id: batch.client_id,
                    batch_seq: batch.batch_seq,
                };
                for message in batch.messages() {
                    verifier.on_message(&context, message);
                }
                progress
                    .received
                    .fetch_add(u64::from(batch.message_count), Ordering::Relaxed);
            }
            Ok(None) | Err(ClientError::CorruptDelivery { .. }) => {}
            Err(error) => {
                outcome.error = Some(format!("subscriber: {error}"));
                break;
            }
        }
        if let Some((list, total, deadline)) = &expected
            && (Instant::now() >= *deadline
                || (verifier.counts().delivered >= *total && verifier.lost(list) == 0))
        {
            break;
        }
    }
    // The publishers may still be running when the subscriber fails early; wait for their
    // expectations so lost can be computed against them.
    let list = match expected {
        Some((list, _, _)) => Some(list),
        None => expectations.recv().ok(),
    };
    if let Some(list) = list {
        outcome.lost = verifier.lost(&list);
    }
    outcome.counts = verifier.counts();
    outcome.stats = subscriber.stats();
    let _ = subscriber.close();
    outcome
}

fn run_subscribe(plan: &Plan, progress: &Progress) -> Summary {
    let mut summary = plan.summary();
    let mut config = SubscriberConfig::new(plan.subscriber_broker, plan.topic.clone());
    config.order = plan.order;
    config.from_position = plan.from_position;
    let mut subscriber = match Subscriber::connect(config) {
        Ok(subscriber) => subscriber,
        Err(error) => {
            summary.errors.push(format!("subscriber: {error}"));
            return summary;
        }
    };
    let started = Instant::now();
    loop {
        let stats = subscriber.stats();
        let done = match plan.stop {
            Stop::TotalBytes(bytes) => stats.message_bytes >= bytes,
            Stop::Duration(duration) => started.elapsed() >= duration,
        };
        if done {
            break;
        }
        match subscriber.next_batch(Duration::from_millis(100)) {
            Ok(Some(batch)) => {
                progress
                    .received
                    .fetch_add(u64::from(batch.message_count), Ordering::Relaxed);
            }
            Ok(None) | Err(ClientError::CorruptDelivery { .. }) => {}
            Err(error) => {
                summary.errors.push(format!("subscriber: {error}"));
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = subscriber.stats();
    let _ = subscriber.close();
    summary.seconds = seconds;
    summary.messages_received = stats.messages;
    summary.bytes_received = stats.message_bytes;
    summary.corrupt = stats.corrupt_batches;
    summary.position_gaps = stats.positions.gaps;
    summary.position_duplicates = stats.positions.duplicates;
    summary.mb_per_s = stats.message_bytes as f64 / 1e6 / seconds.max(1e-9);
    summary.msgs_per_s = stats.messages as f64 / seconds.max(1e-9);
    summary.passed = summary.errors.is_empty()
        && summary.corrupt == 0
        && summary.position_gaps == 0
        && summary.position_duplicates == 0;
    summary
}

fn start_progress(plan: &Plan, progress: &Arc<Progress>) -> Option<thread::JoinHandle<()>> {
    let mode = match plan.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Lines,
        other => other,
    };
    if mode == ProgressMode::None {
        return None;
    }
    let (progress, plan) = (progress.clone(), plan.clone());
    thread::Builder::new()
        .name("progress".into())
        .spawn(move || show_progress(&plan, &progress, mode))
        .ok()
}

fn progress_line(plan: &Plan, progress: &Progress, elapsed: Duration) -> String {
    let published = progress.published.load(Ordering::Relaxed);
    let acked = progress.acked.load(Ordering::Relaxed);
    let received = progress.received.load(Ordering::Relaxed);
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let counted = if plan.publishes() {
        published
    } else {
        received
    };
    let mb_per_s = counted as f64 * plan.message_bytes as f64 / 1e6 / seconds;
    let mut line = format!("{:>6.1} s", elapsed.as_secs_f64());
    if plan.publishes() {
        let _ = write!(line, "  published {published}  acked {acked}");
    }
    if plan.test == TestMode::EndToEnd || plan.test == TestMode::Subscribe {
        let _ = write!(line, "  received {received}");
    }
    let _ = write!(line, "  {mb_per_s:.1} MB/s");
    line
}

fn show_progress(plan: &Plan, progress: &Progress, mode: ProgressMode) {
    let started = Instant::now();
    let bar = (mode == ProgressMode::Bar).then(|| {
        let (length, unit) = match plan.stop {
            Stop::TotalBytes(bytes) => (bytes.div_ceil(plan.message_bytes as u64), "msgs"),
            Stop::Duration(duration) => (duration.as_secs().max(1), "s"),
        };
        let bar = indicatif::ProgressBar::new(length);
        if let Ok(style) = indicatif::ProgressStyle::default_bar()
            .template(&format!("{{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}"))
        {
            bar.set_style(style);
        }
        bar
    });
    let mut last_line = Instant::now();
    while !progress.done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed();
        match &bar {
            Some(bar) => {
                let position = match plan.stop {
                    Stop::TotalBytes(_) if plan.publishes() => {
                        progress.published.load(Ordering::Relaxed)
                    }
                    Stop::TotalBytes(_) => progress.received.load(Ordering::Relaxed),
                    Stop::Duration(_) => elapsed.as_secs(),
                };
                bar.set_position(position);
                bar.set_message(progress_line(plan, progress, elapsed));
            }
            None if last_line.elapsed() >= Duration::from_secs(1) => {
                last_line = Instant::now();
                eprintln!("{}", progress_line(plan, progress, elapsed));
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

fn table(summary: &Summary) -> String {
    let latency = &summary.ack_latency_us;
    let mut rows: Vec<(&str, String)> = vec![
        ("test", summary.test.clone()),
        ("backend", summary.backend.clone()),
        ("brokers", summary.brokers.join(",")),
        ("topic", summary.topic.clone()),
        (
            "order / ack",
            format!("{} / {}", summary.order, summary.ack),
        ),
        ("publishers", summary.publishers.to_string()),
        (
            "connections per broker",
            summary.connections_per_broker.to_string(),
        ),
        ("connections (total)", summary.connections.to_string()),
        ("message bytes", summary.message_bytes.to_string()),
        ("seconds", format!("{:.3}", summary.seconds)),
    ];
    if summary.publishers > 0 {
        rows.extend([
            ("messages sent", summary.messages_sent.to_string()),
            ("messages acked", summary.messages_acked.to_string()),
            ("bytes acked", summary.bytes_acked.to_string()),
            ("rejected (not ordered)", summary.rejected.to_string()),
            (
                "reconnects / resent / duplicate acks",
                format!(
                    "{} / {} / {}",
                    summary.reconnects, summary.batches_resent, summary.duplicate_acks
                ),
            ),
            (
                "ack latency us p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {}",
                    latency.p50, latency.p99, latency.p999, latency.max
                ),
            ),
        ]);
    }
    rows.extend([
        ("throughput MB/s", format!("{:.1}", summary.mb_per_s)),
        ("throughput msgs/s", format!("{:.0}", summary.msgs_per_s)),
    ]);
    if summary.test == "end-to-end" || summary.test == "subscribe" {
        rows.extend([
            ("messages received", summary.messages_received.to_string()),
            (
                "position gaps / duplicates",
                format!(
                    "{} / {}",
                    summary.position_gaps, summary.position_duplicates
                ),
            ),
            ("corrupt", summary.corrupt.to_string()),
        ]);
    }
    if summary.test == "end-to-end" {
        rows.extend([
            ("lost", summary.lost.to_string()),
            ("duplicates", summary.duplicates.to_string()),
            (
                "order violations",
                format!(
                    "{} (check: {})",
                    summary.order_violations, summary.order_check
                ),
            ),
            ("foreign (other runs)", summary.foreign.to_string()),
        ]);
    }
    rows.push(("passed", summary.passed.to_string()));
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in rows {
        let _ = writeln!(text, "{name:<width$}  {value}");
    }
    for error in &summary.errors {
        let _ = writeln!(text, "error: {error}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Plan, String> {
        let args = std::iter::once("loadgen").chain(args.split_whitespace());
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        Plan::from_cli(cli)
    }

    #[test]
    fn connections_and_publishers_are_honoured_exactly() {
        let plan = parse(
            "--brokers 127.0.0.1:9000,127.0.0.1:9001,127.0.0.1:9002 --connections-per-broker 3 --publishers 5",
        )
        .unwrap();
        assert_eq!(plan.connections_per_broker, 3);
        assert_eq!(plan.publishers, 5);
        assert_eq!(plan.connections_per_publisher(), 9);
        let summary = plan.summary();
        assert_eq!(summary.connections, 45);
        assert_eq!(summary.publishers, 5);
        assert!(describe(&plan).contains(
            "5 publisher(s) x 3 broker(s) x 3 connection(s) per broker = 45 connections"
        ));
        assert_eq!(publisher_config(&plan, 1).connections_per_broker, 3);
    }

    #[test]
    fn defaults_per_test() {
        let plan = parse("--brokers 127.0.0.1:9000").unwrap();
        assert_eq!(plan.test, TestMode::Publish);
        assert_eq!(
            (plan.publishers, plan.linger_us, plan.rate_msgs_per_s),
            (1, 500, 0)
        );
        assert_eq!(plan.stop, Stop::Duration(Duration::from_secs(10)));
        assert!(plan.create_topic);
        assert_eq!(plan.topic, "loadgen");
        assert_eq!(plan.message_bytes, 1024);
        assert_eq!(plan.backend_label, "kernel");
        assert_eq!(
            plan.reconnect_timeout_ms,
            client::RECONNECT_TIMEOUT_MS_DEFAULT
        );
        assert_eq!(
            publisher_config(
                &parse("--brokers 127.0.0.1:9000 --reconnect-timeout-ms 250").unwrap(),
                1
            )
            .reconnect_timeout_ms,
            250
        );
        let latency = parse("--brokers 127.0.0.1:9000 --test latency").unwrap();
        assert_eq!(
            (
                latency.publishers,
                latency.linger_us,
                latency.rate_msgs_per_s
            ),
            (1, 0, 10_000)
        );
        let explicit = parse("--brokers 127.0.0.1:9000 --test latency --publishers 2 --linger-us 7 --rate-msgs-per-s 500").unwrap();
        assert_eq!(
            (
                explicit.publishers,
                explicit.linger_us,
                explicit.rate_msgs_per_s
            ),
            (2, 7, 500)
        );
        let off = parse("--brokers 127.0.0.1:9000 --create-topic false --ack 2").unwrap();
        assert!(!off.create_topic);
        assert_eq!(off.replication_factor, 1);
    }

    #[test]
    fn sizes_and_budgets() {
        let plan = parse("--brokers 127.0.0.1:9000 --total-bytes 10KiB --message-bytes 1000 --publishers 3 --batch-bytes 1MiB").unwrap();
        assert_eq!(plan.stop, Stop::TotalBytes(10_240));
        assert_eq!(plan.batch_bytes, 1 << 20);
        // 11 messages over 3 publishers.
        let shares: Vec<u64> = (0..3).filter_map(|i| plan.messages_for(i)).collect();
        assert_eq!(shares, [4, 4, 3]);
        assert_eq!(parse_bytes("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("64kb"), Ok(64_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
    }

    #[test]
    fn bad_flags_give_clear_errors() {
        let cases = [
            (
                "--brokers 127.0.0.1:9000 --order 3",
                "order \"3\" is not one of 0, 1, 2 or 5",
            ),
            (
                "--brokers 127.0.0.1:9000 --connections-per-broker 0",
                "0 is not in 1..=1024",
            ),
            ("--brokers 127.0.0.1:9000 --ack 3", "3 is not in 0..=2"),
            (
                "--brokers 127.0.0.1:9000 --message-bytes 8",
                "below the 16-byte self-checking header",
            ),
            (
                "--brokers 127.0.0.1:9000 --total-bytes 1G --duration-s 5",
                "cannot be used with",
            ),
            (
                "--brokers 127.0.0.1:9000 --total-bytes 3XB",
                "unknown size unit",
            ),
            (
                "--brokers nowhere",
                "invalid value 'nowhere' for '--brokers",
            ),
            (
                "--brokers 127.0.0.1:9000 --duration-s -1",
                "unexpected argument",
            ),
            (
                "--brokers 127.0.0.1:9000 --duration-s 0",
                "not a number of seconds",
            ),
            (
                "--brokers 127.0.0.1:9000 --test fast",
                "invalid value 'fast' for '--test",
            ),
            (
                "--brokers 127.0.0.1:9000 --threads 4",
                "unexpected argument '--threads'",
            ),
            ("--topic x", "--brokers"),
            (
                "--brokers 127.0.0.1:9000 --publishers 0",
                "0 is not in 1..=4096",
            ),
            (
                "--brokers 127.0.0.1:9000 --message-bytes 70000",
                "does not fit in --batch-bytes 65536",
            ),
            (
                "--brokers 127.0.0.1:9000 --ack 2 --replication-factor 0",
                "--replication-factor of at least 1",
            ),
            (
                "--brokers 127.0.0.1:9000 --reconnect-timeout-ms 0",
                "0 is not in 1..",
            ),
        ];
        for (args, expected) in cases {
            let error = parse(args).expect_err(args);
            assert!(error.contains(expected), "{args}: {error}");
        }
    }

    #[test]
    fn help_explains_flags_and_json_fields() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--brokers",
            "--topic",
            "--create-topic",
            "--message-bytes",
            "--total-bytes",
            "--duration-s",
            "--connections-per-broker",
            "--order",
            "--ack",
            "--rate-msgs-per-s",
            "--test",
            "--batch-bytes",
            "--linger-us",
            "--publishers",
            "--json",
            "--progress",
            "--backend-label",
            "--reconnect-timeout-ms",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        for field in [
            "mb_per_s",
            "ack_latency_us",
            "order_violations",
            "lost",
            "duplicates",
            "rejected",
            "reconnects",
            "batches_resent",
            "duplicate_acks",
        ] {
            assert!(help.contains(field), "{field} missing from --help");
        }
    }

    #[test]
    fn expectations_exclude_what_was_never_acknowledged() {
        let mut acked = AckedRanges::default();
        acked.absorb(vec![
            PublisherEvent::Acked {
                batch_seq: 1,
                first_message_index: 4,
                message_count: 4,
                global_start: Some(0),
                duplicate: false,
                latency_us: 1,
            },
            PublisherEvent::Acked {
                batch_seq: 0,
                first_message_index: 0,
                message_count: 4,
                global_start: Some(4),
                duplicate: false,
                latency_us: 1,
            },
            PublisherEvent::Acked {
                batch_seq: 3,
                first_message_index: 12,
                message_count: 2,
                global_start: Some(8),
                duplicate: false,
                latency_us: 1,
            },
        ]);
        let expectation = acked.expectation(20);
        assert_eq!(expectation.messages, 20);
        assert_eq!(expectation.excluded, [8..12, 14..20]);
    }

    #[test]
    fn table_lists_the_checks() {
        let mut summary = parse("--brokers 127.0.0.1:9000 --test end-to-end")
            .unwrap()
            .summary();
        summary.lost = 3;
        summary.errors.push("publisher 0: broken".into());
        let text = table(&summary);
        assert!(text.contains("lost"));
        assert!(text.contains("order violations"));
        assert!(text.contains("error: publisher 0: broken"));
    }
}
