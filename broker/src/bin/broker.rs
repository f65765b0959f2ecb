//! The Embarcadero-rs broker. See `broker --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use broker::metrics::EndpointLimits;
use broker::server::bypass::XdpOptions;
use broker::server::limits::ClientLimits;
use broker::server::ownership::{HeldClaim, LivenessError};
use broker::server::replica::ReplicaConfig;
use broker::server::sequencing::SequencerPlacement;
use broker::server::state::BrokerSettings;
use broker::server::{
    BrokerOptions, CLAIM_LEASE_MS_DEFAULT, IdleStrategy, NetBackend, PoolSpec, StartError,
    open_pool, start_claimed,
};
use clap::Parser;
use shared_log::claim::{ClaimError, ClaimHolder, advertisable, check_lease_ms};
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;
use shared_log::sequencer::SequencerConfig;
use xdp_prog::AttachMode;
use xdp_transport::faults::FaultConfig;
use xdp_transport::xsk::XskGeometry;

/// An Embarcadero-rs broker: receives publishers' batches over TCP straight into the shared
/// pool, acknowledges them once the sequencer has placed them in the total order, and serves
/// subscribers in that order. All brokers of a cluster map the same pool file; exactly one,
/// started with --head, runs the sequencer and creates topics.
///
/// Every flag can also be set in a TOML file given with --config (keys are the flag names
/// with '_' for '-', e.g. `pool_bytes = "1G"`); flags on the command line win.
#[derive(Debug, Parser, serde::Deserialize, Default)]
#[command(
    name = "broker",
    version,
    about,
    long_about,
    after_help = format!("{}\n\n{EXIT_CODES_HELP}", units::SIZE_HELP)
)]
#[serde(deny_unknown_fields, default)]
struct Args {
    /// TOML file with settings (command-line flags override it).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// When the broker ends with an error, also print it on stdout as one JSON line,
    /// {"error": {"kind": ..., "exit_code": ..., "message": ..., ...}}, for programs that
    /// start brokers (see the exit codes below). Not in the config file.
    #[arg(long)]
    #[serde(skip)]
    error_json: bool,
    /// This broker's id: 0 .. brokers-max - 1, unique in the cluster (its rings in the pool).
    /// A broker claims its id in the pool and refuses to start while a live broker holds it.
    #[arg(long)]
    id: Option<u16>,
    /// How long this broker's claim on its id may go without a heartbeat before another
    /// broker may take the id over, in milliseconds (default 1000). A broker restarted after
    /// a crash waits this long for the old claim; after an orderly stop it starts at once.
    #[arg(long)]
    claim_lease_ms: Option<u64>,
    /// Pool file: on hugetlbfs (e.g. /dev/hugepages/embarcadero), a /dev/daxX.Y device, or a
    /// /dev/shm file together with --allow-shm-fallback.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Create and format the pool (replacing the file). Usually given to the head only;
    /// the other brokers wait for it and attach. Refused while live brokers use the pool.
    #[arg(long)]
    #[serde(default)]
    format: bool,
    /// Size of a pool created with --format (default 1G).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    pool_bytes: Option<String>,
    /// Brokers the pool has rings for (with --format).
    #[arg(long)]
    brokers_max: Option<u32>,
    /// Topics the pool has room for (with --format).
    #[arg(long)]
    topics_max: Option<u32>,
    /// Batch-header ring slots per broker per topic, a power of two (with --format).
    #[arg(long)]
    ring_slots: Option<u32>,
    /// Global order index entries per topic, a power of two (with --format).
    #[arg(long)]
    goi_entries: Option<u64>,
    /// Address to accept clients on, e.g. 127.0.0.1:9000.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Also accept Kafka clients (plaintext) on this address, e.g. 127.0.0.1:9092: produce,
    /// fetch, topics, consumer groups and committed offsets (each topic one partition, its
    /// total order; see docs/kafka.md). With --net xdp: --listen's address, another port.
    #[arg(long)]
    kafka_listen: Option<SocketAddr>,
    /// The IPv4 address and port clients reach this broker at, which the other brokers name
    /// when they redirect a subscriber here (for positions only this broker's replica keeps).
    /// Default: --listen, unless that names no address (0.0.0.0) or an IPv6 one: then no
    /// broker redirects here.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Run the sequencer and create topics (exactly one broker of a cluster).
    #[arg(long)]
    #[serde(default)]
    head: bool,
    /// Create a topic on the head when a publisher's Hello names one that does not exist
    /// (with order and ack from the Hello, --replication-factor), within the pool's topic
    /// table. Off by default: topics are created with CreateTopic (loadgen does), so that
    /// clients cannot fill the table with made-up names.
    #[arg(long)]
    #[serde(default)]
    auto_create_topics: bool,
    /// A new connection must send Hello (or CreateTopic) within this time, in milliseconds;
    /// else it gets DeadlineExpired and is closed. Also the longest pause between an admin
    /// connection's frames.
    #[arg(long)]
    hello_timeout_ms: Option<u64>,
    /// A started batch must arrive within this time plus its size at
    /// --batch-min-bytes-per-s, in milliseconds; else the connection gets DeadlineExpired
    /// and is closed (the partial batch is dropped, never written).
    #[arg(long)]
    batch_grace_ms: Option<u64>,
    /// Slowest accepted arrival of a batch's payload, in bytes per second (default 1M).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    batch_min_bytes_per_s: Option<String>,
    /// A batch still arriving this long after it got its room in the pool moves to staging
    /// outside the pool (one more copy), so that the topic's payload log can be reclaimed
    /// past it: a slow client never holds other publishers back. In milliseconds.
    #[arg(long)]
    batch_hold_ms: Option<u64>,
    /// Bytes all slow batches together may hold in staging (default 64M).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    staging_bytes_max: Option<String>,
    /// Connections the broker serves at once; more are refused with ConnectionLimit.
    #[arg(long)]
    connections_max: Option<u32>,
    /// Connections the broker serves at once from one IP address.
    #[arg(long)]
    connections_per_address_max: Option<u32>,
    /// A subscriber that takes nothing for this long (ms) stops holding the log, so that
    /// publishers never wait on it longer (it may then get PositionTruncated). Topics
    /// created with retention "hold for subscribers" keep waiting for their subscribers.
    #[arg(long)]
    subscriber_stall_ms: Option<u64>,
    /// A closing connection (after an Error or Goodbye) whose peer does not take the last
    /// bytes within this time (ms) is dropped.
    #[arg(long)]
    close_timeout_ms: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Metrics connections open at a time (default 64); one more closes the oldest.
    #[arg(long)]
    metrics_connections_max: Option<usize>,
    /// A metrics connection not served within this many milliseconds is closed (default
    /// 2000): clients that connect and send nothing cannot keep scrapes out.
    #[arg(long)]
    metrics_deadline_ms: Option<u64>,
    /// coherent (one host, CXL 3) or noncoherent (CXL 2.0: clwb/clflushopt/mfence).
    #[arg(long)]
    coherence: Option<String>,
    /// Use /dev/shm when hugepages are missing (for development; announced with a warning).
    #[arg(long)]
    #[serde(default)]
    allow_shm_fallback: bool,
    /// SO_RCVBUF/SO_SNDBUF for accepted sockets (default 4M).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    socket_buffer_bytes: Option<String>,
    /// Largest batch payload accepted (default 16M; also bounded by half a payload log).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    batch_bytes_max: Option<String>,
    /// What polling threads do when idle: spin, yield, or sleep (backoff, for shared cores).
    /// Default: spin with --net xdp (the loop owns its pinned core; with no connection open
    /// it backs off; a head allowed more than one CPU runs its sequencer on a thread of its
    /// own, which then spins too), sleep with --net kernel. Brokers that share a core want
    /// sleep.
    #[arg(long, value_enum)]
    idle: Option<IdleStrategy>,
    /// Where the head runs its sequencer: inline (in the network loop: a batch is received,
    /// ordered and acknowledged in one pass, with no hand-off between threads), thread (its
    /// own thread), or auto (inline when the broker may run on one CPU only, e.g. under
    /// `taskset -c 1`; default).
    #[arg(long, value_enum)]
    sequencer_placement: Option<SequencerPlacement>,
    /// Order 5: how long a gap in a session may stay open before the sequencer gives up on
    /// it (the skipped batch is reported to its publisher), in milliseconds.
    #[arg(long)]
    hold_timeout_ms: Option<u64>,
    /// How long a broker without --format waits for the pool to appear and be formatted.
    #[arg(long)]
    attach_timeout_ms: Option<u64>,
    /// Network backend: kernel (TCP sockets, epoll) or xdp (XDP steering into an AF_XDP
    /// socket, smoltcp on a pinned core; needs root, --iface, and --listen on the
    /// interface's IPv4 address). xdp never falls back to kernel TCP.
    #[arg(long, value_enum)]
    net: Option<NetKind>,
    /// Interface whose rx queue the xdp backend takes (e.g. emb-b0).
    #[arg(long)]
    iface: Option<String>,
    /// Rx queues the xdp backend serves: one AF_XDP socket on each, all served by one
    /// poll loop. It must be the interface's number of rx queues (the default).
    #[arg(long)]
    queues: Option<u32>,
    /// Cores for the xdp poll threads, e.g. "1" or "0,1" or "0-1" (the first is used).
    #[arg(long)]
    cores: Option<String>,
    /// How the xdp backend attaches its XDP program: auto (driver, else generic), driver,
    /// or generic (the client's GSO/TSO must then be off).
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
    /// smoltcp TCP sockets of the xdp backend (the most connections at a time).
    #[arg(long)]
    xdp_sockets: Option<usize>,
    /// Receive and send buffer of each smoltcp socket (default 1M).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    xdp_socket_buffer_bytes: Option<String>,
    /// Preferred busy polling on the AF_XDP socket (Linux 5.11+): the xdp backend's loop
    /// runs the queue's NAPI itself for up to this many microseconds per call, instead of
    /// softirqs on other CPUs. For driver mode on a dedicated core; off by default.
    #[arg(long)]
    xdp_busy_poll_us: Option<u32>,
    /// Replicate topics whose replication factor is 2 or more to files in this directory
    /// (this broker's own disk); ack level 2 waits for replicas to sync.
    #[arg(long)]
    replica_dir: Option<PathBuf>,
    /// Replicas sync (fdatasync) once this many bytes are pending (default 1M).
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    replica_sync_bytes: Option<String>,
    /// Replicas sync once the oldest pending byte is this old, in microseconds.
    #[arg(long)]
    replica_sync_interval_us: Option<u64>,
    /// A replica segment file closes once a sync leaves it this long (default 256M); topic
    /// retention (retention_bytes, retention_ms) deletes whole closed segments.
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_text")]
    replica_segment_bytes: Option<String>,
    /// Replication factor (counting the pool copy) of topics the head creates on first use;
    /// ack level 2 needs 2 or more.
    #[arg(long)]
    replication_factor: Option<u8>,
    /// Do not stand by for the sequencer: by default every broker watches the sequencer
    /// lease and one of them takes it over when the holder's heartbeat stops.
    #[arg(long)]
    #[serde(default)]
    no_standby: bool,
    /// How long the sequencer's heartbeat may stay still before a standby takes over, in
    /// milliseconds (published by the holder; default 50, at least 10). A head that stalls
    /// longer (a paused process, a starved core) loses the lease and is fenced: safe, but it
    /// costs a takeover.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Rebuild a lost pool's log from these replica directories (comma separated; needs
    /// --head and --format): the longest replica of each topic is ordered again, every
    /// batch at the position it had. Used files are moved to DIR/restored-<ns>/.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    recover_from: Vec<PathBuf>,
    /// DEBUG ONLY, hidden: inject faults into the xdp backend's device, e.g.
    /// drop=1,duplicate=1,reorder=1,corrupt=1,seed=7 (percent). Not in the config file.
    #[arg(long, hide = true)]
    #[serde(skip)]
    debug_inject_faults: Option<String>,
}

/// Exit code of an error not listed below (start-up or run time).
const EXIT_FAILURE: u8 = 1;
/// Exit code of a bad flag or config file.
const EXIT_USAGE: u8 = 2;
/// Exit code when a live broker holds the id.
const EXIT_ID_TAKEN: u8 = 3;
/// Exit code when `--format` is refused because live brokers use the pool.
const EXIT_POOL_IN_USE: u8 = 4;

const EXIT_CODES_HELP: &str = "\
Exit codes: 0 stopped by SIGINT or SIGTERM; 1 any other error, at start-up or later (the pool
cannot be opened or is of another layout; the id was taken over while this broker was paused
past its claim lease; the pool file was removed, replaced or truncated); 2 bad flags or config
file; 3 the id is held by a live broker; 4 --format refused: live brokers use the pool. The
error is on stderr, and with --error-json also on stdout as one JSON line whose \"kind\" is
one of: usage, pool, pool_in_use, broker_id_taken, claim, listen, metrics, sequencer, bypass,
limits, kafka_address_on_bypass, kafka_host_unknown, restore, claim_lost, pool_file_gone, thread_ended.";

/// An error the broker ends with: the line on stderr, the exit code, and, with
/// `--error-json`, the same as one JSON object on stdout.
#[derive(Debug)]
struct Ending {
    exit_code: u8,
    /// What the error is, for programs (see [`EXIT_CODES_HELP`]).
    kind: &'static str,
    /// The line for people.
    message: String,
    /// What else a program needs to act on it.
    details: serde_json::Map<String, serde_json::Value>,
}

impl Ending {
    fn new(exit_code: u8, kind: &'static str, message: impl std::fmt::Display) -> Ending {
        Ending {
            exit_code,
            kind,
            message: message.to_string(),
            details: serde_json::Map::new(),
        }
    }

    fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Ending {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// The JSON line of `--error-json`.
    fn json(&self) -> String {
        let mut error = self.details.clone();
        error.insert("kind".into(), self.kind.into());
        error.insert("exit_code".into(), self.exit_code.into());
        error.insert("message".into(), self.message.clone().into());
        serde_json::json!({ "error": error }).to_string()
    }

    /// Says it (stderr as `{who}: {message}`; stdout as JSON when `json`), and the exit
    /// code.
    fn report(self, who: &str, json: bool) -> ExitCode {
        eprintln!("{who}: {}", self.message);
        if json {
            println!("{}", self.json());
        }
        ExitCode::from(self.exit_code)
    }

    fn start(error: &StartError) -> Ending {
        match error {
            StartError::Pool { path, failure, .. } => Ending::new(EXIT_FAILURE, "pool", error)
                .with("path", path.as_str())
                .with("failure", failure.name()),
            StartError::PoolInUse(in_use) => Ending::new(EXIT_POOL_IN_USE, "pool_in_use", in_use)
                .with("path", in_use.path.as_str())
                .with(
                    "brokers",
                    in_use.brokers.iter().map(holder_json).collect::<Vec<_>>(),
                )
                .with("holder_pids", in_use.holder_pids.clone()),
            StartError::Claim(claim) => Ending::claim(claim),
            StartError::Listen { addr, .. } => {
                Ending::new(EXIT_FAILURE, "listen", error).with("addr", addr.to_string())
            }
            StartError::Poll(_) => Ending::new(EXIT_FAILURE, "poll", error),
            StartError::Metrics(_) => Ending::new(EXIT_FAILURE, "metrics", error),
            StartError::Sequencer(_) => Ending::new(EXIT_FAILURE, "sequencer", error),
            StartError::Bypass(_) => Ending::new(EXIT_FAILURE, "bypass", error),
            StartError::Limits(limit) => Ending::new(EXIT_USAGE, "limits", error)
                .with("option", limit.option)
                .with("value", limit.value),
            StartError::KafkaAddressOnBypass { .. } => {
                Ending::new(EXIT_USAGE, "kafka_address_on_bypass", error)
            }
            StartError::KafkaHostUnknown { addr } => {
                Ending::new(EXIT_USAGE, "kafka_host_unknown", error).with("addr", addr.to_string())
            }
        }
    }

    fn claim(error: &ClaimError) -> Ending {
        match error {
            ClaimError::BrokerIdTaken { holder } => {
                Ending::new(EXIT_ID_TAKEN, "broker_id_taken", error)
                    .with("holder", holder_json(holder))
            }
            ClaimError::ClaimLost { holder, lease_ms } => {
                Ending::new(EXIT_FAILURE, "claim_lost", error)
                    .with("holder", holder_json(holder))
                    .with("lease_ms", *lease_ms)
            }
            ClaimError::LeaseOutOfRange { .. } | ClaimError::Pool(_) => {
                Ending::new(EXIT_FAILURE, "claim", error)
            }
        }
    }

    fn liveness(error: &LivenessError) -> Ending {
        match error {
            LivenessError::ClaimLost(claim) => Ending::claim(claim),
            LivenessError::PoolFileGone(gone) => {
                let (path, change) = match gone {
                    hugepages::Error::RegionRemoved { path } => (Some(path), "removed"),
                    hugepages::Error::RegionReplaced { path } => (Some(path), "replaced"),
                    hugepages::Error::RegionTruncated { path, .. } => (Some(path), "truncated"),
                    _ => (None, "other"),
                };
                let ending =
                    Ending::new(EXIT_FAILURE, "pool_file_gone", error).with("change", change);
                match path {
                    Some(path) => ending.with("path", path.display().to_string()),
                    None => ending,
                }
            }
        }
    }
}

/// A claim's holder for `--error-json`.
fn holder_json(holder: &ClaimHolder) -> serde_json::Value {
    serde_json::json!({
        "broker": holder.broker,
        "pid": holder.details.map(|d| d.pid),
        "host_id": holder.details.map(|d| format!("{:016x}", d.host_id)),
        "this_host": holder.this_host,
    })
}

/// The network backend, as the CLI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum NetKind {
    Kernel,
    Xdp,
}

/// XDP attach modes, as the CLI names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum XdpMode {
    Auto,
    Driver,
    Generic,
}

/// Parses "0,2" or "0-3" or "1".
fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("--cores {text:?}: expected core numbers like 1, 0,1 or 0-3");
    let mut cores = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (
                    first.parse().map_err(|_| bad())?,
                    last.parse().map_err(|_| bad())?,
                );
                if first > last {
                    return Err(bad());
                }
                cores.extend(first..=last);
            }
            None => cores.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(cores)
}

/// The bytes of the size flag `--{flag}` given as `text` (see `units`), else `default`.
fn size<T: units::ByteCount>(flag: &str, text: Option<&str>, default: T) -> Result<T, String> {
    match text {
        Some(text) => units::parse_bytes_as(text).map_err(|e| format!("--{flag}: {e}")),
        None => Ok(default),
    }
}

/// A size in the config file: a number of bytes (`pool_bytes = 1073741824`) or a string
/// with a unit (`pool_bytes = "1G"`), kept as text for [`size`].
fn size_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    struct SizeText;
    impl serde::de::Visitor<'_> for SizeText {
        type Value = Option<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a size: a number of bytes, or a string such as \"64M\" or \"1GB\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Some(text.to_owned()))
        }

        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<Self::Value, E> {
            Ok(Some(bytes.to_string()))
        }

        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<Self::Value, E> {
            u64::try_from(bytes)
                .map(|bytes| Some(bytes.to_string()))
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(bytes), &self))
        }
    }
    deserializer.deserialize_any(SizeText)
}

/// Command-line values win over the file's.
fn merge(cli: Args, file: Args) -> Args {
    Args {
        config: cli.config,
        error_json: cli.error_json,
        id: cli.id.or(file.id),
        claim_lease_ms: cli.claim_lease_ms.or(file.claim_lease_ms),
        pool: cli.pool.or(file.pool),
        format: cli.format || file.format,
        pool_bytes: cli.pool_bytes.or(file.pool_bytes),
        brokers_max: cli.brokers_max.or(file.brokers_max),
        topics_max: cli.topics_max.or(file.topics_max),
        ring_slots: cli.ring_slots.or(file.ring_slots),
        goi_entries: cli.goi_entries.or(file.goi_entries),
        listen: cli.listen.or(file.listen),
        advertise: cli.advertise.or(file.advertise),
        kafka_listen: cli.kafka_listen.or(file.kafka_listen),
        head: cli.head || file.head,
        auto_create_topics: cli.auto_create_topics || file.auto_create_topics,
        hello_timeout_ms: cli.hello_timeout_ms.or(file.hello_timeout_ms),
        batch_grace_ms: cli.batch_grace_ms.or(file.batch_grace_ms),
        batch_min_bytes_per_s: cli.batch_min_bytes_per_s.or(file.batch_min_bytes_per_s),
        batch_hold_ms: cli.batch_hold_ms.or(file.batch_hold_ms),
        staging_bytes_max: cli.staging_bytes_max.or(file.staging_bytes_max),
        connections_max: cli.connections_max.or(file.connections_max),
        connections_per_address_max: cli
            .connections_per_address_max
            .or(file.connections_per_address_max),
        subscriber_stall_ms: cli.subscriber_stall_ms.or(file.subscriber_stall_ms),
        close_timeout_ms: cli.close_timeout_ms.or(file.close_timeout_ms),
        metrics: cli.metrics.or(file.metrics),
        metrics_connections_max: cli.metrics_connections_max.or(file.metrics_connections_max),
        metrics_deadline_ms: cli.metrics_deadline_ms.or(file.metrics_deadline_ms),
        coherence: cli.coherence.or(file.coherence),
        allow_shm_fallback: cli.allow_shm_fallback || file.allow_shm_fallback,
        socket_buffer_bytes: cli.socket_buffer_bytes.or(file.socket_buffer_bytes),
        batch_bytes_max: cli.batch_bytes_max.or(file.batch_bytes_max),
        idle: cli.idle.or(file.idle),
        sequencer_placement: cli.sequencer_placement.or(file.sequencer_placement),
        hold_timeout_ms: cli.hold_timeout_ms.or(file.hold_timeout_ms),
        attach_timeout_ms: cli.attach_timeout_ms.or(file.attach_timeout_ms),
        net: cli.net.or(file.net),
        iface: cli.iface.or(file.iface),
        queues: cli.queues.or(file.queues),
        cores: cli.cores.or(file.cores),
        xdp_mode: cli.xdp_mode.or(file.xdp_mode),
        xdp_sockets: cli.xdp_sockets.or(file.xdp_sockets),
        xdp_socket_buffer_bytes: cli.xdp_socket_buffer_bytes.or(file.xdp_socket_buffer_bytes),
        xdp_busy_poll_us: cli.xdp_busy_poll_us.or(file.xdp_busy_poll_us),
        replica_dir: cli.replica_dir.or(file.replica_dir),
        replica_sync_bytes: cli.replica_sync_bytes.or(file.replica_sync_bytes),
        replica_sync_interval_us: cli
            .replica_sync_interval_us
            .or(file.replica_sync_interval_us),
        replica_segment_bytes: cli.replica_segment_bytes.or(file.replica_segment_bytes),
        replication_factor: cli.replication_factor.or(file.replication_factor),
        no_standby: cli.no_standby || file.no_standby,
        recover_from: if cli.recover_from.is_empty() {
            file.recover_from
        } else {
            cli.recover_from
        },
        lease_ms: cli.lease_ms.or(file.lease_ms),
        debug_inject_faults: cli.debug_inject_faults,
    }
}

fn configure(cli: Args) -> Result<(PoolSpec, BrokerOptions, Vec<PathBuf>), String> {
    let args = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
            let file: Args =
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
            merge(cli, file)
        }
        None => cli,
    };
    let id = args.id.ok_or("--id is required")?;
    let claim_lease_ms = args.claim_lease_ms.unwrap_or(CLAIM_LEASE_MS_DEFAULT);
    check_lease_ms(claim_lease_ms).map_err(|e| e.to_string())?;
    if !(args.recover_from.is_empty() || (args.head && args.format)) {
        return Err("--recover-from rebuilds a new pool: it needs --head and --format".into());
    }
    let spec = pool_spec(&args)?;
    let listen = args
        .listen
        .ok_or("--listen is required (e.g. 127.0.0.1:9000)")?;
    if let Some(addr) = args.advertise
        && let Err(why) = advertisable(addr)
    {
        return Err(format!(
            "--advertise {addr}: {why}; give the IPv4 address and port clients reach this \
             broker at (e.g. 10.0.0.5:9000); other brokers send subscribers there"
        ));
    }
    let net = net_backend(&args)?;
    let defaults = SequencerConfig::default();
    let limits = client_limits(&args)?;
    let metrics_defaults = EndpointLimits::default();
    let replica = replica_config(&args)?;
    let options = BrokerOptions {
        settings: BrokerSettings {
            broker_id: id,
            head: args.head,
            auto_create_topics: args.auto_create_topics,
            batch_bytes_max: size(
                "batch-bytes-max",
                args.batch_bytes_max.as_deref(),
                wire::BATCH_BYTES_DEFAULT,
            )?,
            frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
            replication_factor: args.replication_factor.unwrap_or(1).max(1),
            limits,
            history_dir: replica.as_ref().map(|config| config.dir.clone()),
        },
        listen,
        kafka_listen: args.kafka_listen,
        advertise: args.advertise,
        socket_buffer_bytes: size(
            "socket-buffer-bytes",
            args.socket_buffer_bytes.as_deref(),
            4 << 20,
        )?,
        idle: args
            .idle
            .unwrap_or(IdleStrategy::default_for(matches!(net, NetBackend::Xdp(_)))),
        sequencer_placement: args.sequencer_placement.unwrap_or_default(),
        sequencer: SequencerConfig {
            hold_timeout_ns: args
                .hold_timeout_ms
                .map_or(defaults.hold_timeout_ns, |ms| ms * 1_000_000),
            lease_ns: args
                .lease_ms
                .map_or(defaults.lease_ns, |ms| ms.max(10) * 1_000_000),
            ..defaults
        },
        metrics_listen: args.metrics,
        metrics_limits: EndpointLimits {
            connections_max: args
                .metrics_connections_max
                .unwrap_or(metrics_defaults.connections_max),
            connection_deadline: args
                .metrics_deadline_ms
                .map_or(metrics_defaults.connection_deadline, Duration::from_millis),
        },
        net,
        replica,
        standby: !args.no_standby,
        claim_lease_ms,
    };
    Ok((spec, options, args.recover_from))
}

/// Where the pool is, and its geometry when `--format` makes it.
fn pool_spec(args: &Args) -> Result<PoolSpec, String> {
    let pool = args
        .pool
        .clone()
        .ok_or("--pool is required (e.g. /dev/hugepages/embarcadero)")?;
    let mode = match args.coherence.as_deref() {
        None => CoherenceMode::default(),
        Some(text) => text.parse()?,
    };
    let format = if args.format {
        let pool_bytes = size("pool-bytes", args.pool_bytes.as_deref(), 1u64 << 30)?;
        let geometry = Geometry::fit(
            pool_bytes,
            args.brokers_max.unwrap_or(4),
            args.topics_max.unwrap_or(4),
            args.ring_slots.unwrap_or(1024),
            args.goi_entries.unwrap_or(1 << 18),
        )
        .map_err(|e| format!("pool geometry: {e}"))?;
        Some((geometry, pool_bytes))
    } else {
        None
    };
    Ok(PoolSpec {
        path: pool,
        format,
        allow_fallback: args.allow_shm_fallback,
        mode,
        attach_timeout: Duration::from_millis(args.attach_timeout_ms.unwrap_or(10_000)),
    })
}

/// The network backend and, for XDP, its options.
fn net_backend(args: &Args) -> Result<NetBackend, String> {
    Ok(match args.net.unwrap_or(NetKind::Kernel) {
        NetKind::Kernel => {
            if args.iface.is_some() || args.debug_inject_faults.is_some() {
                return Err("--iface and --debug-inject-faults need --net xdp".into());
            }
            NetBackend::Kernel
        }
        NetKind::Xdp => NetBackend::Xdp(XdpOptions {
            iface: args
                .iface
                .clone()
                .ok_or("--net xdp needs --iface (the interface to take, e.g. emb-b0)")?,
            queues: args.queues,
            cores: args
                .cores
                .as_deref()
                .map(parse_cores)
                .transpose()?
                .unwrap_or_default(),
            mode: match args.xdp_mode.unwrap_or(XdpMode::Auto) {
                XdpMode::Auto => AttachMode::Auto,
                XdpMode::Driver => AttachMode::Driver,
                XdpMode::Generic => AttachMode::Generic,
            },
            sockets: args.xdp_sockets.unwrap_or(32),
            socket_buffer_bytes: size(
                "xdp-socket-buffer-bytes",
                args.xdp_socket_buffer_bytes.as_deref(),
                1 << 20,
            )?,
            busy_poll_us: args.xdp_busy_poll_us,
            geometry: XskGeometry::default(),
            allow_small_pages: args.allow_shm_fallback,
            faults: args
                .debug_inject_faults
                .as_deref()
                .map(str::parse::<FaultConfig>)
                .transpose()
                .map_err(|e| e.to_string())?,
        }),
    })
}

/// The limits on clients, validated.
fn client_limits(args: &Args) -> Result<ClientLimits, String> {
    let limit_defaults = ClientLimits::default();
    let limits = ClientLimits {
        hello_timeout_ms: args
            .hello_timeout_ms
            .unwrap_or(limit_defaults.hello_timeout_ms),
        batch_grace_ms: args.batch_grace_ms.unwrap_or(limit_defaults.batch_grace_ms),
        batch_min_bytes_per_s: size(
            "batch-min-bytes-per-s",
            args.batch_min_bytes_per_s.as_deref(),
            limit_defaults.batch_min_bytes_per_s,
        )?,
        batch_hold_ms: args.batch_hold_ms.unwrap_or(limit_defaults.batch_hold_ms),
        staging_bytes_max: size(
            "staging-bytes-max",
            args.staging_bytes_max.as_deref(),
            limit_defaults.staging_bytes_max,
        )?,
        connections_max: args
            .connections_max
            .unwrap_or(limit_defaults.connections_max),
        connections_per_address_max: args
            .connections_per_address_max
            .unwrap_or(limit_defaults.connections_per_address_max),
        subscriber_stall_ms: args
            .subscriber_stall_ms
            .unwrap_or(limit_defaults.subscriber_stall_ms),
        close_timeout_ms: args
            .close_timeout_ms
            .unwrap_or(limit_defaults.close_timeout_ms),
    };
    limits.validate().map_err(|e| e.to_string())?;
    Ok(limits)
}

/// Where replica files go (ack level 2), if anywhere.
fn replica_config(args: &Args) -> Result<Option<ReplicaConfig>, String> {
    Ok(match &args.replica_dir {
        Some(dir) => Some(ReplicaConfig {
            dir: dir.clone(),
            sync_bytes: size(
                "replica-sync-bytes",
                args.replica_sync_bytes.as_deref(),
                1 << 20,
            )?,
            sync_interval_us: args.replica_sync_interval_us.unwrap_or(2_000),
            segment_bytes: size(
                "replica-segment-bytes",
                args.replica_segment_bytes.as_deref(),
                broker::server::replica::SEGMENT_BYTES_DEFAULT,
            )?,
        }),
        None => None,
    })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM stop the broker cleanly. (SIGPIPE is already ignored by the Rust
/// runtime, so a vanished peer gives EPIPE on its connection instead of killing the broker.)
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(signal, handler) };
        if previous == libc::SIG_ERR {
            log::warn!("cannot install the handler for signal {signal}");
        }
    }
}

/// Text leaked for the life of the process, for a signal handler to write.
struct SignalText {
    bytes: AtomicPtr<u8>,
    len: AtomicUsize,
}

impl SignalText {
    const fn new() -> SignalText {
        SignalText {
            bytes: AtomicPtr::new(std::ptr::null_mut()),
            len: AtomicUsize::new(0),
        }
    }

    fn set(&self, text: String) {
        let text = text.into_bytes().leak();
        self.len.store(text.len(), Ordering::Relaxed);
        self.bytes.store(text.as_mut_ptr(), Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        !self.bytes.load(Ordering::Relaxed).is_null()
    }

    /// Writes the text to `fd`, if it is set (only async-signal-safe calls).
    fn write_to(&self, fd: libc::c_int) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        if bytes.is_null() {
            return;
        }
        let len = self.len.load(Ordering::Relaxed);
        // SAFETY: write() is async-signal-safe; `bytes` points to `len` leaked bytes.
        let _ = unsafe { libc::write(fd, bytes.cast(), len) };
    }
}

/// The pool's addresses and what to say about a SIGBUS inside them, for [`on_sigbus`]
/// (which may only read atomics): the line for stderr, and with `--error-json` the JSON line
/// for stdout.
static POOL_START: AtomicUsize = AtomicUsize::new(0);
static POOL_END: AtomicUsize = AtomicUsize::new(0);
static SIGBUS_MESSAGE: SignalText = SignalText::new();
static SIGBUS_JSON: SignalText = SignalText::new();

/// A SIGBUS at a pool address means the pages behind the mapping are gone (the pool file
/// was truncated under this broker; the liveness check would say so at its next beat, but
/// a subscriber's read or the sequencer faults first): say so and exit 1. Any other SIGBUS
/// gets the default action. (This replaces std's SIGBUS handler, which only reports stack
/// overflows, and those raise SIGSEGV on Linux.)
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // Only a SIGBUS the kernel raised for a fault (si_code > 0) has an address; one sent by
    // a process (kill, sigqueue: si_code <= 0) has its pid and uid or a value there.
    let address = (info.si_code > 0).then(|| {
        // SAFETY: for a fault (si_code > 0) the kernel filled si_addr, the faulting address.
        unsafe { info.si_addr() as usize }
    });
    let pool = POOL_START.load(Ordering::Relaxed)..POOL_END.load(Ordering::Relaxed);
    let in_pool = address.is_some_and(|address| pool.contains(&address));
    if !in_pool || !SIGBUS_MESSAGE.is_set() {
        // SAFETY: signal() is async-signal-safe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        // A fault re-runs the faulting access on return, which then takes the default
        // action; a SIGBUS sent by a process (si_code <= 0) is raised again instead.
        if info.si_code <= 0 {
            // SAFETY: raise() is async-signal-safe.
            unsafe { libc::raise(signal) };
        }
        return;
    }
    SIGBUS_MESSAGE.write_to(libc::STDERR_FILENO);
    SIGBUS_JSON.write_to(libc::STDOUT_FILENO);
    // SAFETY: _exit() is async-signal-safe and does not return.
    unsafe { libc::_exit(i32::from(EXIT_FAILURE)) };
}

/// Installs [`on_sigbus`] for the pool mapped at `range` (`json`: also say it as
/// `--error-json` does).
fn install_sigbus_handler(
    broker: u16,
    path: &std::path::Path,
    range: std::ops::Range<usize>,
    json: bool,
) {
    let ending = Ending::new(
        EXIT_FAILURE,
        "pool_file_gone",
        format!(
            "pool {}: its pages are gone under this broker (SIGBUS): the pool file was \
             truncated or its memory failed while the broker ran; exiting (never resize a \
             pool file that brokers use)",
            path.display()
        ),
    )
    .with("change", "pages_gone")
    .with("path", path.display().to_string());
    if json {
        SIGBUS_JSON.set(format!("{}\n", ending.json()));
    }
    SIGBUS_MESSAGE.set(format!("broker {broker}: {}\n", ending.message));
    POOL_START.store(range.start, Ordering::Relaxed);
    POOL_END.store(range.end, Ordering::Relaxed);
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus
        as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a sigset_t owned here.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is initialised; the handler only uses async-signal-safe calls.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        log::warn!(
            "cannot install the SIGBUS handler: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    let json = args.error_json;
    let (spec, options, recover_from) = match configure(args) {
        Ok(configured) => configured,
        Err(message) => return Ending::new(EXIT_USAGE, "usage", message).report("broker", json),
    };
    install_signal_handlers();
    let id = options.settings.broker_id;
    let who = format!("broker {id}");
    let pool = match open_pool(&spec) {
        Ok(pool) => pool,
        Err(e) => return Ending::start(&e).report(&who, json),
    };
    install_sigbus_handler(id, &spec.path, pool.mem().address_range(), json);
    // Claimed (and beaten) before anything is written to the pool, a restore included.
    let claim = match HeldClaim::take(&pool, id, options.claim_lease_ms) {
        Ok(claim) => claim,
        Err(e) => return Ending::claim(&e).report(&who, json),
    };
    if !recover_from.is_empty() {
        match broker::server::replica::restore(&pool, id, &recover_from) {
            Ok(restored) => {
                for topic in restored.topics {
                    log::info!(
                        "restored topic {:?}: batches {}..{}, positions {}..{}, from {}",
                        topic.name,
                        topic.origin.ordinal,
                        topic.end_ordinal,
                        topic.origin.position,
                        topic.end_position,
                        topic.dir.display()
                    );
                }
            }
            Err(e) => {
                claim.release();
                let message = format!("restoring from replicas: {e}");
                return Ending::new(EXIT_FAILURE, "restore", message).report("broker", json);
            }
        }
    }
    let running = match start_claimed(pool, options, claim) {
        Ok(running) => running,
        Err(e) => return Ending::start(&e).report("broker", json),
    };
    println!("listening on {}", running.local_addr());
    while !STOP.load(Ordering::Relaxed) && running.is_running() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let crashed = !running.is_running();
    let failure = running.failure().map(Ending::liveness);
    running.stop();
    if let Some(failure) = failure {
        return failure.report(&who, json);
    }
    if crashed {
        let message = "a broker thread ended unexpectedly";
        return Ending::new(EXIT_FAILURE, "thread_ended", message).report("broker", json);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_flags_take_units_and_name_themselves_in_errors() {
        let with = configure_with;
        let (spec, options, _) = with(&[
            "--format",
            "--pool-bytes",
            "1G",
            "--staging-bytes-max",
            "64MB",
            "--batch-min-bytes-per-s",
            "64 KiB",
            "--socket-buffer-bytes",
            "2M",
            "--batch-bytes-max",
            "4096",
        ])
        .unwrap();
        assert_eq!(spec.format.map(|(_, bytes)| bytes), Some(1 << 30));
        let limits = options.settings.limits;
        assert_eq!(limits.staging_bytes_max, 64_000_000);
        assert_eq!(limits.batch_min_bytes_per_s, 64 << 10);
        assert_eq!(options.socket_buffer_bytes, 2 << 20);
        assert_eq!(options.settings.batch_bytes_max, 4096);
        let (_, defaults, _) = with(&[]).unwrap();
        assert_eq!(defaults.socket_buffer_bytes, 4 << 20);
        assert_eq!(defaults.settings.batch_bytes_max, wire::BATCH_BYTES_DEFAULT);
        let error = with(&["--format", "--pool-bytes", "12X"]).unwrap_err();
        assert!(error.starts_with("--pool-bytes: "), "{error}");
        let error = with(&["--batch-bytes-max", "4G"]).unwrap_err();
        assert!(error.starts_with("--batch-bytes-max: "), "{error}");
    }

    #[test]
    fn config_sizes_are_numbers_or_text() {
        let file: Args =
            toml::from_str("pool_bytes = \"512M\"\nsocket_buffer_bytes = 65536").unwrap();
        assert_eq!(file.pool_bytes.as_deref(), Some("512M"));
        assert_eq!(file.socket_buffer_bytes.as_deref(), Some("65536"));
        assert!(toml::from_str::<Args>("staging_bytes_max = -1").is_err());
        assert!(toml::from_str::<Args>("staging_bytes_max = [1]").is_err());
    }

    #[test]
    fn every_size_flag_says_its_units() {
        let mut command = <Args as clap::CommandFactory>::command();
        let help = command.render_long_help().to_string();
        assert!(
            help.contains(units::SIZE_HELP),
            "the SIZE paragraph is missing"
        );
        let sizes: Vec<String> = command
            .get_arguments()
            .filter(|arg| arg.get_id().as_str().contains("bytes"))
            .map(|arg| {
                let names = arg.get_value_names().unwrap_or_default();
                format!("{} {names:?}", arg.get_id())
            })
            .collect();
        assert_eq!(sizes.len(), 8, "{sizes:?}");
        assert!(sizes.iter().all(|s| s.ends_with("[\"SIZE\"]")), "{sizes:?}");
    }

    #[test]
    fn core_lists_parse() {
        assert_eq!(parse_cores("1"), Ok(vec![1]));
        assert_eq!(parse_cores("0,2"), Ok(vec![0, 2]));
        assert_eq!(parse_cores("0-3"), Ok(vec![0, 1, 2, 3]));
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("x").is_err());
    }

    /// `configure` of the required flags followed by `extra`.
    fn configure_with(extra: &[&str]) -> Result<(PoolSpec, BrokerOptions, Vec<PathBuf>), String> {
        let base = [
            "broker",
            "--id",
            "0",
            "--pool",
            "/p",
            "--listen",
            "10.0.0.2:1",
        ];
        configure(Args::parse_from(base.iter().chain(extra)))
    }

    #[test]
    fn xdp_flags_are_checked() {
        let with = configure_with;
        let error = with(&["--net", "xdp"]).unwrap_err();
        assert!(error.contains("needs --iface"), "{error}");
        let error = with(&["--iface", "eth0"]).unwrap_err();
        assert!(error.contains("need --net xdp"), "{error}");
        let error = with(&[
            "--net",
            "xdp",
            "--iface",
            "x",
            "--debug-inject-faults",
            "melt=1",
        ])
        .unwrap_err();
        assert!(error.contains("unknown fault"), "{error}");
        let (_, options, _) = with(&["--net", "xdp", "--iface", "x", "--cores", "1"]).unwrap();
        match options.net {
            NetBackend::Xdp(xdp) => {
                assert_eq!(
                    (xdp.iface.as_str(), xdp.cores, xdp.queues),
                    ("x", vec![1], None)
                );
                assert_eq!(xdp.faults, None);
            }
            NetBackend::Kernel => panic!("--net xdp gave the kernel backend"),
        }
    }

    #[test]
    fn the_claim_lease_is_read_and_checked() {
        let with = configure_with;
        let (_, options, _) = with(&[]).unwrap();
        assert_eq!(options.claim_lease_ms, CLAIM_LEASE_MS_DEFAULT);
        let (_, options, _) = with(&["--claim-lease-ms", "300"]).unwrap();
        assert_eq!(options.claim_lease_ms, 300);
        let error = with(&["--claim-lease-ms", "20"]).unwrap_err();
        assert!(
            error.contains("a claim lease of 20 ms is out of range"),
            "{error}"
        );
        let file: Args = toml::from_str("claim_lease_ms = 2500").unwrap();
        assert_eq!(file.claim_lease_ms, Some(2500));
    }

    #[test]
    fn flags_win_over_the_file_and_missing_ones_are_named() {
        let file: Args =
            toml::from_str("id = 3\npool = \"/p\"\nlisten = \"127.0.0.1:1\"\nidle = \"spin\"")
                .unwrap();
        let cli = Args::parse_from(["broker", "--id", "1"]);
        let merged = merge(cli, file);
        assert_eq!(merged.id, Some(1));
        assert_eq!(merged.idle, Some(IdleStrategy::Spin));
        let error = configure(Args::parse_from(["broker", "--id", "1"])).unwrap_err();
        assert!(error.contains("--pool is required"), "{error}");
        assert!(
            toml::from_str::<Args>("nonsense = 1").is_err(),
            "unknown keys are refused"
        );
    }
}
