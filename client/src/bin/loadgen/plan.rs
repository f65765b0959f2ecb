//! [`Plan`]: the run as the flags ask for it, with every default resolved, and the client
//! configurations it implies.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use units::Timestamp;

use client::pacing::Schedule;
use client::summary::Summary;
use client::verify::OrderCheck;
use client::{PublisherConfig, SubscriberConfig};

use crate::cli::{Cli, ProgressMode, TestMode};

/// When the measured phase stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Stop {
    TotalBytes(u64),
    Duration(Duration),
}

/// The run, with every default resolved.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) test: TestMode,
    pub(crate) brokers: Vec<SocketAddr>,
    pub(crate) subscriber_broker: SocketAddr,
    pub(crate) topic: String,
    pub(crate) create_topic: bool,
    pub(crate) replication_factor: u8,
    pub(crate) hold_for_subscribers: bool,
    pub(crate) retention_bytes: u64,
    pub(crate) retention_ms: u64,
    pub(crate) message_bytes: usize,
    pub(crate) stop: Stop,
    pub(crate) connections_per_broker: usize,
    pub(crate) order: u8,
    pub(crate) ack: u8,
    pub(crate) rate_msgs_per_s: u64,
    pub(crate) batch_bytes: usize,
    /// Messages per batch asked for (0: as many as `batch_bytes` holds).
    pub(crate) messages_per_batch: usize,
    pub(crate) linger_us: u64,
    pub(crate) publishers: usize,
    pub(crate) in_flight_batches: usize,
    pub(crate) in_flight_window: client::InFlightWindow,
    pub(crate) reconnect_timeout_ms: u64,
    pub(crate) from_position: u64,
    pub(crate) drain_timeout: Duration,
    pub(crate) subscribe_after_publish: bool,
    pub(crate) json: Option<PathBuf>,
    pub(crate) progress: ProgressMode,
    pub(crate) backend_label: String,
}

impl Plan {
    pub(crate) fn from_cli(cli: Cli) -> Result<Plan, String> {
        let latency = cli.test == TestMode::Latency;
        // --batch-bytes given for a latency run replaces its default of one message per batch.
        let messages_per_batch = cli
            .messages_per_batch
            .or((latency && cli.batch_bytes.is_none()).then_some(1));
        let batch_bytes = batch_bytes(&cli, messages_per_batch)?;
        let rate_msgs_per_s = cli
            .rate_msgs_per_s
            .unwrap_or(if latency { 10_000 } else { 0 });
        if latency && rate_msgs_per_s == 0 {
            return Err(
                "--test latency measures from each message's due time and needs a \
                        --rate-msgs-per-s above 0 (for an unpaced run use --test publish)"
                    .into(),
            );
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
        Ok(Plan {
            test: cli.test,
            stop: stop(&cli),
            brokers: cli.brokers,
            topic: cli.topic,
            create_topic: cli.create_topic,
            replication_factor,
            hold_for_subscribers: cli.hold_for_subscribers,
            retention_bytes: cli.retention_bytes,
            retention_ms: cli.retention_ms,
            subscriber_broker,
            message_bytes: cli.message_bytes,
            connections_per_broker: cli.connections_per_broker as usize,
            order: cli.order,
            ack: cli.ack,
            rate_msgs_per_s,
            batch_bytes,
            messages_per_batch: messages_per_batch.unwrap_or(0) as usize,
            linger_us: cli.linger_us.unwrap_or(if latency {
                0
            } else {
                client::LINGER_US_DEFAULT
            }),
            publishers: cli.publishers.unwrap_or(1) as usize,
            in_flight_batches: cli.in_flight_batches as usize,
            in_flight_window: cli.in_flight_window.resolve(rate_msgs_per_s),
            reconnect_timeout_ms: cli.reconnect_timeout_ms,
            from_position: cli.from_position,
            drain_timeout: Duration::from_secs_f64(cli.drain_timeout_s),
            subscribe_after_publish: cli.subscribe_after_publish,
            json: cli.json,
            progress: cli.progress,
            backend_label: cli.backend_label,
        })
    }

    /// Connections of one publisher.
    pub(crate) fn connections_per_publisher(&self) -> usize {
        self.brokers.len() * self.connections_per_broker
    }

    pub(crate) fn publishes(&self) -> bool {
        self.test != TestMode::Subscribe
    }

    /// Whether a subscriber checks every delivery.
    pub(crate) fn checks_deliveries(&self) -> bool {
        matches!(self.test, TestMode::EndToEnd | TestMode::Latency)
    }

    /// The publishers' send schedule from `start` (`None` when unpaced).
    pub(crate) fn schedule(&self, start: Timestamp) -> Option<Schedule> {
        Schedule::new(start, self.rate_msgs_per_s, self.publishers as u64)
    }

    /// Messages publisher `index` sends when the run is bounded by bytes.
    pub(crate) fn messages_for(&self, index: usize) -> Option<u64> {
        let Stop::TotalBytes(bytes) = self.stop else {
            return None;
        };
        let total = bytes.div_ceil(self.message_bytes as u64);
        let share = total / self.publishers as u64;
        let extra = u64::from((index as u64) < total % self.publishers as u64);
        Some(share + extra)
    }

    /// The order check of the end-to-end test.
    pub(crate) fn order_check(&self) -> OrderCheck {
        OrderCheck::for_order(self.order, self.connections_per_publisher() as u64)
    }

    /// The summary's description of the run, before anything is measured.
    pub(crate) fn summary(&self) -> Summary {
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
            messages_per_batch: self.messages_per_batch,
            linger_us: self.linger_us,
            rate_msgs_per_s: self.rate_msgs_per_s,
            order_check: order_check_name(self.order_check()).into(),
            ..Summary::default()
        }
    }

    /// The lines printed on stderr before the run starts.
    pub(crate) fn describe(&self) -> String {
        let mut text = format!(
            "loadgen: test {}, topic {}, order {}, ack {}, {}-byte messages",
            self.test.name(),
            self.topic,
            self.order,
            self.ack,
            self.message_bytes
        );
        if self.publishes() {
            let _ = write!(
                text,
                "\n  {} publisher(s) x {} broker(s) x {} connection(s) per broker = {} connections; batches up to {} bytes, linger {} us, up to {} in flight per connection ({:?}), rate {}",
                self.publishers,
                self.brokers.len(),
                self.connections_per_broker,
                self.publishers * self.connections_per_publisher(),
                self.batch_bytes,
                self.linger_us,
                self.in_flight_batches,
                self.in_flight_window,
                if self.rate_msgs_per_s == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{} msgs/s", self.rate_msgs_per_s)
                }
            );
        }
        match self.stop {
            Stop::TotalBytes(bytes) => {
                let _ = write!(text, "\n  until {bytes} bytes");
            }
            Stop::Duration(duration) => {
                let _ = write!(text, "\n  for {:.1} s", duration.as_secs_f64());
            }
        }
        text
    }

    /// The configuration of the publisher with client id `client_id`.
    pub(crate) fn publisher_config(&self, client_id: u64) -> PublisherConfig {
        let mut config = PublisherConfig::new(self.brokers.clone(), self.topic.clone());
        config.order = self.order;
        config.ack = self.ack;
        config.client_id = client_id;
        config.connections_per_broker = self.connections_per_broker;
        config.batch_bytes_max = self.batch_bytes;
        config.linger_us = self.linger_us;
        config.in_flight_batches_max = self.in_flight_batches;
        config.in_flight_window = self.in_flight_window;
        config.reconnect_timeout_ms = self.reconnect_timeout_ms;
        config.blocking = true;
        // Every acked range is needed to tell lost messages from rejected ones, and each
        // ack's arrival for the latency from the due time.
        config.report_acks = self.checks_deliveries() || self.rate_msgs_per_s > 0;
        config
    }

    /// The configuration of a subscriber on `--subscriber-broker` reading from `from_position`.
    pub(crate) fn subscriber_config(&self, from_position: u64) -> SubscriberConfig {
        let mut config = SubscriberConfig::new(self.subscriber_broker, self.topic.clone());
        config.order = self.order;
        config.from_position = from_position;
        config
    }
}

/// `--batch-bytes` (or `messages_per_batch` messages with their length prefixes, or the
/// default), checked against the protocol's range and the message size.
fn batch_bytes(cli: &Cli, messages_per_batch: Option<u32>) -> Result<usize, String> {
    let framed_message_bytes = cli.message_bytes as u64 + 4;
    let batch_bytes = match (cli.batch_bytes, messages_per_batch) {
        (Some(bytes), _) => bytes,
        (None, Some(messages)) => u64::from(messages) * framed_message_bytes,
        (None, None) => client::BATCH_BYTES_MAX_DEFAULT as u64,
    };
    if !(4..=64 << 20).contains(&batch_bytes) {
        return Err(format!(
            "--batch-bytes {batch_bytes} is outside 4..=67108864 (64 MiB)"
        ));
    }
    if framed_message_bytes > batch_bytes {
        return Err(format!(
            "--message-bytes {} plus its 4-byte length prefix does not fit in --batch-bytes {batch_bytes}",
            cli.message_bytes
        ));
    }
    Ok(batch_bytes as usize)
}

/// `--total-bytes`, else `--duration-s`, else 10 seconds.
fn stop(cli: &Cli) -> Stop {
    match (cli.total_bytes, cli.duration_s) {
        (Some(bytes), _) => Stop::TotalBytes(bytes),
        (None, Some(seconds)) => Stop::Duration(Duration::from_secs_f64(seconds)),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    }
}

fn order_check_name(check: OrderCheck) -> &'static str {
    match check {
        OrderCheck::None => "none",
        OrderCheck::PerConnection { .. } => "per_connection",
        OrderCheck::PerPublisher => "per_publisher",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;

    use super::*;

    /// The plan for a command line (without the program name).
    pub(crate) fn parse(args: &str) -> Result<Plan, String> {
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
        assert!(plan.describe().contains(
            "5 publisher(s) x 3 broker(s) x 3 connection(s) per broker = 45 connections"
        ));
        assert_eq!(plan.publisher_config(1).connections_per_broker, 3);
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
            parse("--brokers 127.0.0.1:9000 --reconnect-timeout-ms 250")
                .unwrap()
                .publisher_config(1)
                .reconnect_timeout_ms,
            250
        );
        let latency = parse("--brokers 127.0.0.1:9000 --test latency").unwrap();
        assert_eq!(
            (
                latency.publishers,
                latency.linger_us,
                latency.rate_msgs_per_s,
                latency.messages_per_batch,
                latency.batch_bytes
            ),
            (1, 0, 10_000, 1, 1028)
        );
        assert!(latency.checks_deliveries() && latency.publisher_config(1).report_acks);
        let batched =
            parse("--brokers 127.0.0.1:9000 --messages-per-batch 8 --message-bytes 100").unwrap();
        assert_eq!((batched.messages_per_batch, batched.batch_bytes), (8, 832));
        assert!(!batched.checks_deliveries() && !batched.publisher_config(1).report_acks);
        assert_eq!(plan.messages_per_batch, 0);
        let bytes = parse("--brokers 127.0.0.1:9000 --test latency --batch-bytes 64KiB").unwrap();
        assert_eq!((bytes.messages_per_batch, bytes.batch_bytes), (0, 65_536));
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
    fn the_window_adapts_by_default_only_when_the_run_is_unpaced() {
        use client::InFlightWindow::{Adaptive, Fixed};
        let window = |args: &str| parse(args).unwrap().in_flight_window;
        assert_eq!(window("--brokers 127.0.0.1:9000"), Adaptive);
        assert_eq!(
            window("--brokers 127.0.0.1:9000 --rate-msgs-per-s 1000"),
            Fixed
        );
        assert_eq!(
            window("--brokers 127.0.0.1:9000 --rate-msgs-per-s 1000 --in-flight-window adaptive"),
            Adaptive
        );
        assert_eq!(
            window("--brokers 127.0.0.1:9000 --in-flight-window fixed"),
            Fixed
        );
        assert_eq!(
            PublisherConfig::new(Vec::new(), "t").in_flight_window,
            Fixed,
            "the library keeps a fixed window unless asked"
        );
    }

    #[test]
    fn sizes_and_budgets() {
        let plan = parse("--brokers 127.0.0.1:9000 --total-bytes 10KiB --message-bytes 1000 --publishers 3 --batch-bytes 1MiB").unwrap();
        assert_eq!(plan.stop, Stop::TotalBytes(10_240));
        assert_eq!(plan.batch_bytes, 1 << 20);
        // 11 messages over 3 publishers.
        let shares: Vec<u64> = (0..3).filter_map(|i| plan.messages_for(i)).collect();
        assert_eq!(shares, [4, 4, 3]);
        let total = |size: &str| {
            parse(&format!("--brokers 127.0.0.1:9000 --total-bytes {size}")).map(|plan| plan.stop)
        };
        // K, M, G, T are binary; KB, MB, GB, TB decimal; KiB .. TiB binary.
        assert_eq!(total("1G"), Ok(Stop::TotalBytes(1 << 30)));
        assert_eq!(total("1.5G"), Ok(Stop::TotalBytes(3 << 29)));
        assert_eq!(total("1GB"), Ok(Stop::TotalBytes(1_000_000_000)));
        assert_eq!(total("64kb"), Ok(Stop::TotalBytes(64_000)));
        assert_eq!(total("64MiB"), Ok(Stop::TotalBytes(1 << 26)));
        assert_eq!(total("4096"), Ok(Stop::TotalBytes(4096)));
        let message_bytes = parse("--brokers 127.0.0.1:9000 --message-bytes 2K").unwrap();
        assert_eq!(message_bytes.message_bytes, 2048);
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
                "has the unknown unit \"XB\"",
            ),
            (
                "--brokers 127.0.0.1:9000 --total-bytes 0",
                "give at least 1",
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
            (
                "--brokers 127.0.0.1:9000 --test latency --rate-msgs-per-s 0",
                "needs a --rate-msgs-per-s above 0",
            ),
            (
                "--brokers 127.0.0.1:9000 --messages-per-batch 2 --batch-bytes 4K",
                "cannot be used with",
            ),
            (
                "--brokers 127.0.0.1:9000 --messages-per-batch 0",
                "0 is not in 1..=65536",
            ),
        ];
        for (args, expected) in cases {
            let error = parse(args).expect_err(args);
            assert!(error.contains(expected), "{args}: {error}");
        }
    }
}
