//! The command line: flags, their parsers and the long help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser, ValueEnum};

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
  latency     end-to-end (a subscriber checks every message) with the defaults --publishers
              1, --messages-per-batch 1, --linger-us 0 and --rate-msgs-per-s 10000 (a rate
              is required). Pacing is open loop: message i is due at a fixed time on the
              schedule whatever happened before, the sender sleeps until shortly before it
              (timer slack 1 ns, spinning at most the last 50 us), and latency is measured
              from that due time, so a stall of the sender or of the brokers shows as the
              latency of every message due meanwhile (coordinated omission corrected).
              Reports ack latency and end-to-end latency (due time to the subscriber's
              receipt, in the same process) percentiles and distributions.
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
  subscribe test), batches_acked, messages_per_batch (asked for; 0: as many as fit),
  ack_latency_us {count, p50, p90, p99, p999, max, mean} (from sealing a batch to its ack),
  ack_latency_from_intended_us (same fields; paced runs: each acknowledged message, from
  when it was due to its ack's arrival), e2e_latency_from_intended_us (paced end-to-end and
  latency runs: each first delivery, from when it was due to the subscriber's receipt),
  latency_distributions_us {ack, ack_from_intended, e2e_from_intended} (percentile
  distributions: lists of {percentile, value_us, count}), loadgen_cpu_cores (user + system
  CPU time of the whole loadgen process over the measured phase, divided by its wall
  time), rejected (messages of batches the broker did not order:
  SessionGapSkipped), lost (acknowledged, or written at ack 0, but never delivered within
  the drain timeout), duplicates, order_violations, order_check, corrupt (messages failing
  their own checksum, which with the framing covers every byte of this run's deliveries;
  other publishers' deliveries, and in the subscribe test all, failing theirs), position_gaps, position_duplicates, foreign,
  reconnects (connections the publishers opened again after one failed), batches_resent
  (batches sent again because their connection failed before the ack), duplicate_acks
  (acknowledged batches a broker found already in the log: resends whose first copy had
  arrived, acknowledged with the original position and not written twice), burst_writes and
  burst_write_batches (a paced publisher sends what is due in one burst: the writes that
  took two or more batches at once, and those batches), ack_gap_max_ms
  (the longest a publisher waited for a new ack while sending, looked at every 1,024
  messages: after a failover, the time to its first ack), connect_ms (how long the
  publishers took to open their connections, Hello/HelloOk included), in_flight_window
  (where the publishers' windows ended, the largest), in_flight_window_changes, errors,
  passed.

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

/// The SIZES section of the long help: what `SIZE` flags accept.
fn sizes_help() -> String {
    format!("{AFTER_HELP}\n\nSIZES\n  {}", units::SIZE_HELP)
}

/// Test mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TestMode {
    /// Publish only.
    Publish,
    /// Read only.
    Subscribe,
    /// Publish and verify every delivered message.
    EndToEnd,
    /// Paced end-to-end run, one message per batch; latency from each message's due time.
    Latency,
}

impl TestMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TestMode::Publish => "publish",
            TestMode::Subscribe => "subscribe",
            TestMode::EndToEnd => "end-to-end",
            TestMode::Latency => "latency",
        }
    }
}

/// How a publisher chooses its in-flight window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum WindowArg {
    /// `adaptive` for an unpaced run (--rate-msgs-per-s 0), `fixed` for a paced one.
    Auto,
    /// From measured throughput, up to --in-flight-batches.
    Adaptive,
    /// Always --in-flight-batches.
    Fixed,
}

impl WindowArg {
    /// The window of a run paced at `rate_msgs_per_s` (0: unpaced).
    pub(crate) fn resolve(self, rate_msgs_per_s: u64) -> client::InFlightWindow {
        match self {
            WindowArg::Auto if rate_msgs_per_s == 0 => client::InFlightWindow::Adaptive,
            WindowArg::Auto | WindowArg::Fixed => client::InFlightWindow::Fixed,
            WindowArg::Adaptive => client::InFlightWindow::Adaptive,
        }
    }
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProgressMode {
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
    after_help = "Run with --help for the test modes, message format, order checks, JSON fields, exit codes and sizes.",
    after_long_help = sizes_help()
)]
pub(crate) struct Cli {
    /// Broker addresses, comma separated (HOST:PORT,...). CreateTopic goes to the first that
    /// creates topics (the head, or the standby that took the sequencer lease over).
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub(crate) brokers: Vec<SocketAddr>,
    /// Topic name (1 to 64 bytes of [A-Za-z0-9._-]).
    #[arg(long, default_value = "loadgen")]
    pub(crate) topic: String,
    /// Send CreateTopic (with --order, --ack, --replication-factor) to the lease holder
    /// before publishing (not in the subscribe test); a topic that exists with the same settings is fine, with other settings the
    /// run stops. `--create-topic false` skips it.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub(crate) create_topic: bool,
    /// Replication factor for CreateTopic (default: 1 at --ack 2, else 0).
    #[arg(long)]
    pub(crate) replication_factor: Option<u8>,
    /// CreateTopic with retention "hold for subscribers": publishers wait for every
    /// connected subscriber however long it takes. By default a subscriber that stops
    /// reading stops holding the log after the broker's --subscriber-stall-ms.
    #[arg(long)]
    pub(crate) hold_for_subscribers: bool,
    /// CreateTopic: disk history each replica keeps (rf >= 2 topics), e.g. 4GiB; the oldest
    /// whole segments are deleted while the rest holds at least this much. 0: no limit.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_retention_bytes)]
    pub(crate) retention_bytes: u64,
    /// CreateTopic: age of the disk history each replica keeps, in milliseconds (a segment
    /// goes once its last write is this old). 0: no limit.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub(crate) retention_ms: u64,
    /// Which broker of --brokers (0-based index) serves the subscriber (fault runs put it on
    /// a broker they leave alone).
    #[arg(long, default_value_t = 0)]
    pub(crate) subscriber_broker: usize,
    /// Size of each message, header included (at least 16 bytes).
    #[arg(long, value_name = "SIZE", default_value_t = 1024, value_parser = parse_message_bytes)]
    pub(crate) message_bytes: usize,
    /// Stop after this many message bytes in total (all publishers together; for
    /// subscribe, bytes read).
    #[arg(long, value_name = "SIZE", value_parser = parse_total_bytes, conflicts_with = "duration_s")]
    pub(crate) total_bytes: Option<u64>,
    /// Stop after this many seconds (default 10 when --total-bytes is not given).
    #[arg(long, value_parser = parse_seconds)]
    pub(crate) duration_s: Option<f64>,
    /// TCP connections each publisher opens to each broker (honoured exactly).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) connections_per_broker: u32,
    /// Topic order: 0, 1, 2 or 5.
    #[arg(long, default_value_t = 2, value_parser = parse_order)]
    pub(crate) order: u8,
    /// Ack level: 0 (none), 1 (ordered), 2 (replicated).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub(crate) ack: u8,
    /// Target publish rate in messages per second over all publishers, paced evenly;
    /// 0 = unlimited (default; 10000 for --test latency).
    #[arg(long)]
    pub(crate) rate_msgs_per_s: Option<u64>,
    /// What to run (see TESTS below).
    #[arg(long, value_enum, default_value_t = TestMode::Publish)]
    pub(crate) test: TestMode,
    /// Largest batch payload (default 64K; the brokers' limit caps it).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_bytes)]
    pub(crate) batch_bytes: Option<u64>,
    /// Messages per batch at most: sets --batch-bytes to this many messages with their
    /// 4-byte length prefixes (default 1 for --test latency, else as many as --batch-bytes
    /// holds).
    #[arg(long, conflicts_with = "batch_bytes", value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub(crate) messages_per_batch: Option<u32>,
    /// How long an open batch waits for more messages, in microseconds (default 500; 0 for
    /// --test latency).
    #[arg(long)]
    pub(crate) linger_us: Option<u64>,
    /// Publisher threads, each its own Publisher with its own client id (honoured
    /// exactly; default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) publishers: Option<u32>,
    /// Unacknowledged batches allowed per connection: the largest window.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) in_flight_batches: u32,
    /// How each publisher chooses its window up to --in-flight-batches: `adaptive` starts at
    /// 16 batches, halves while the acknowledged throughput holds (within 7%) and grows
    /// while growing pays (10%), settling near the smallest window that keeps the
    /// throughput, which keeps latency at saturation down to what the path needs; `fixed` always uses
    /// --in-flight-batches. `auto` is adaptive for an unpaced run and fixed for a paced one:
    /// a paced publisher near the path's capacity falls behind its schedule for good when
    /// the window costs it a few percent (docs/results.md).
    #[arg(long, value_enum, default_value_t = WindowArg::Auto)]
    pub(crate) in_flight_window: WindowArg,
    /// How long a publisher may be without any broker connection before it gives up, in
    /// milliseconds. While some broker answers, a failed connection is replaced at once and
    /// its unacknowledged batches are resent (see BROKER FAILURES below).
    #[arg(long, default_value_t = client::RECONNECT_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) reconnect_timeout_ms: u64,
    /// First global position read by --test subscribe.
    #[arg(long, default_value_t = 0)]
    pub(crate) from_position: u64,
    /// End-to-end: how long the subscriber may take, after the publishers finish, to
    /// receive every acknowledged message.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    pub(crate) drain_timeout_s: f64,
    /// End-to-end: the subscriber connects (from position 0) only once the publishers
    /// finished, so it reads the whole log back, from the brokers' replica files where the
    /// pool no longer holds it.
    #[arg(long)]
    pub(crate) subscribe_after_publish: bool,
    /// Write the JSON summary to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Progress display on stderr: auto (bar on a terminal, else lines), bar, lines, none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub(crate) progress: ProgressMode,
    /// Label written to the JSON `backend` field (e.g. kernel, xdp).
    #[arg(long, default_value = "kernel")]
    pub(crate) backend_label: String,
}

fn parse_order(value: &str) -> Result<u8, String> {
    match value.parse::<u8>() {
        Ok(order @ (0 | 1 | 2 | 5)) => Ok(order),
        _ => Err(format!("order {value:?} is not one of 0, 1, 2 or 5")),
    }
}

fn parse_message_bytes(value: &str) -> Result<usize, String> {
    let bytes = units::parse_bytes_as::<usize>(value).map_err(|e| e.to_string())?;
    if bytes < client::verify::MESSAGE_HEADER_BYTES {
        return Err(format!(
            "{bytes} bytes is below the 16-byte self-checking header; use at least 16"
        ));
    }
    Ok(bytes)
}

fn parse_total_bytes(value: &str) -> Result<u64, String> {
    match units::parse_bytes(value) {
        Ok(0) => Err("0 bytes would end the run before it starts; give at least 1".into()),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_retention_bytes(value: &str) -> Result<u64, String> {
    units::parse_bytes(value).map_err(|e| e.to_string())
}

fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 1e6 => Ok(seconds),
        _ => Err(format!(
            "{value:?} is not a number of seconds in (0, 1000000]"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "--messages-per-batch",
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
            "ack_latency_from_intended_us",
            "e2e_latency_from_intended_us",
            "latency_distributions_us",
            "loadgen_cpu_cores",
            "order_violations",
            "lost",
            "duplicates",
            "rejected",
            "reconnects",
            "batches_resent",
            "duplicate_acks",
            "burst_writes",
            "in_flight_window",
        ] {
            assert!(help.contains(field), "{field} missing from --help");
        }
        assert!(help.contains(units::SIZE_HELP), "SIZES missing from --help");
        for arg in <Cli as clap::CommandFactory>::command().get_arguments() {
            if arg.get_id().as_str().ends_with("bytes") {
                let names = arg.get_value_names().unwrap_or_default();
                assert_eq!(names, ["SIZE"], "{} does not take a SIZE", arg.get_id());
            }
        }
    }
}
