//! `pingpong`: the latency floors of a path, for `scripts/bench-latency.sh`. `pingpong
//! serve` echoes every byte it reads; `pingpong run` sends fixed-size messages to it on a
//! schedule and measures each echo, or, with `--protocol redis-xadd`, sends each message to
//! a Redis server as an XADD and measures each reply. See `pingpong --help`.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

mod noise;
mod redis;

use units::Timestamp;

use clap::{Parser, Subcommand, ValueEnum};
use client::pacing::{
    CpuMeter, Schedule, SleepPlanner, record_since, set_timer_slack_min, sleep_until,
};
use client::{LatencySummary, PercentilePoint, latency_histogram, percentile_distribution};
use hdrhistogram::Histogram;
use serde::Serialize;

const ABOUT: &str = "TCP ping-pong over kernel sockets: the floor under a broker's ack \
latency on the same path. `serve` echoes; `run` sends --message-bytes messages at \
--rate-msgs-per-s, one at a time, and reports the round trip of each (an echo, or with \
--protocol redis-xadd the reply of a Redis server to an XADD of the message).";

const AFTER_HELP: &str = "\
METHOD
  Closed loop with one message outstanding, sent on an open-loop schedule: message i is
  due at start + i / rate; the client sleeps until shortly before (timer slack 1 ns,
  spinning at most the last 50 us), writes it, and reads the echo before the next one.
  Latency is measured from the due time to the last byte of the echo, so a round trip
  longer than the interval delays the messages after it and they count the wait
  (coordinated omission corrected); the run is the messages due within --duration-s, so
  it sends rate x duration of them however late. At --rate-msgs-per-s 0 the next message
  goes as soon as the echo is in (no schedule: latency from the write) until --duration-s
  is over. Both ends set TCP_NODELAY.

NOISE (`pingpong noise`)
  One thread reads the clock in a loop for --duration-s; every interval between two
  readings above --gap-threshold-us is time its CPU did something else (interrupts, other
  threads, the hypervisor: on a virtual machine its exits are invisible to the guest's
  steal accounting). Reports the share of the run lost, the gaps above 100 us and 1 ms, the
  longest ten, and wait_p99_us / wait_p999_us: for an event at a random instant, the 99th
  and 99.9th percentile of the wait until this CPU runs the thread again, a lower bound on
  any latency percentile measured through this CPU. JSON: backend (cpu-noise), seconds,
  gap_threshold_us, gaps, gaps_not_kept, gaps_over_100us, gaps_over_1ms, lost_pct,
  gap_max_us, wait_p99_us, wait_p999_us, largest_gaps_us.

REDIS (--protocol redis-xadd)
  Against a Redis server (--connect its address), open loop as the brokers' publishers
  are measured: message i, `XADD bench-stream MAXLEN ~ 100000 * m <message>`, is written
  at its due time whatever is still outstanding, a second thread reads the replies (Redis
  answers in order) and reply i is measured from the due time of message i. So Redis is
  measured as the brokers are, where `redis-benchmark` sends back to back and never lets
  either end go idle. Needs --rate-msgs-per-s above 0. An error reply ends the run (exit
  code 1) with Redis's message.

JSON (stdout, and --json FILE)
  backend (tcp-pingpong, or redis-xadd), target, message_bytes, rate_msgs_per_s, method,
  messages (round trips completed), seconds, msgs_per_s, cpu_cores (this process's user +
  system CPU per second of the run: what the simplest client of the path costs, to read a
  load generator's against), latency_us {count, p50, p90, p99, p999, max, mean},
  latency_distribution_us (list of {percentile, value_us, count}).

EXIT CODE
  0 when every round trip completed; 1 on a connection error or an echo that did not come
  within --timeout-ms; 2 for bad flags.";

#[derive(Debug, Parser)]
#[command(name = "pingpong", version, about = ABOUT, after_long_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Echo every byte read, on every connection, until no connection was open for
    /// --idle-exit-s.
    Serve {
        /// Address to listen on (IP:PORT).
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this many seconds without an open connection (every wait has an end).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        idle_exit_s: u64,
    },
    /// Spin on one thread for --duration-s reading the clock, and report the gaps: how
    /// much of its CPU a thread that never sleeps gets (pin it with taskset).
    Noise {
        /// How long to spin, in seconds.
        #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
        duration_s: f64,
        /// An interval between two clock readings longer than this is a gap.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        gap_threshold_us: u64,
        /// Write the JSON report to this file too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Send messages to a `pingpong serve` and measure each echo.
    Run {
        /// The server (IP:PORT).
        #[arg(long)]
        connect: SocketAddr,
        /// Size of each message.
        #[arg(long, value_name = "SIZE", default_value_t = 1024, value_parser = parse_message_bytes)]
        message_bytes: usize,
        /// Messages per second on the schedule; 0 = back to back (closed loop).
        #[arg(long, default_value_t = 10_000)]
        rate_msgs_per_s: u64,
        /// How long to send, in seconds.
        #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
        duration_s: f64,
        /// How long an echo or a reply (and the connect) may take, in milliseconds.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_ms: u64,
        /// What the server at --connect speaks: `echo` (a `pingpong serve`) or
        /// `redis-xadd` (a Redis server; each message is the field of an XADD).
        #[arg(long, value_enum, default_value_t = Protocol::Echo)]
        protocol: Protocol,
        /// Write the JSON report to this file too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn parse_message_bytes(value: &str) -> Result<usize, String> {
    match units::parse_bytes_as::<usize>(value) {
        Ok(bytes) if (1..=1 << 20).contains(&bytes) => Ok(bytes),
        Ok(bytes) => Err(format!("{bytes} bytes is outside 1 byte to 1 MiB")),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0 => Ok(seconds),
        _ => Err(format!(
            "{value:?} is not a number of seconds in (0, 86400]"
        )),
    }
}

/// What `pingpong run` talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// A `pingpong serve`: the message comes back.
    Echo,
    /// A Redis server: the message goes into a stream with XADD; the reply is its ID.
    RedisXadd,
}

/// Why a ping-pong run failed.
#[derive(Debug, thiserror::Error)]
enum PingPongError {
    #[error(
        "{doing} {addr}: {source}; is the server (`pingpong serve --listen {addr}`, or redis-server with --protocol redis-xadd) running and reachable?"
    )]
    Io {
        addr: SocketAddr,
        doing: &'static str,
        source: io::Error,
    },
    #[error(
        "the answer to message {seq} from {addr} did not come within {timeout_ms} ms; the server or the path is stuck"
    )]
    AnswerTimeout {
        addr: SocketAddr,
        seq: u64,
        timeout_ms: u64,
    },
    #[error("the Redis server at {addr} answered message {seq} with an error: {reply}")]
    RedisError {
        addr: SocketAddr,
        seq: u64,
        reply: String,
    },
    #[error("the Redis server at {addr} sent a reply to message {seq} that is not RESP: {problem}")]
    RedisReply {
        addr: SocketAddr,
        seq: u64,
        problem: &'static str,
    },
    #[error(
        "--protocol redis-xadd sends open loop and needs a schedule: give --rate-msgs-per-s above 0 (redis-benchmark measures back to back)"
    )]
    RedisUnpaced,
    #[error("the thread reading Redis's replies panicked")]
    ReaderPanicked,
    #[error("writing the JSON report to {path}: {source}; check that its directory exists")]
    Report { path: PathBuf, source: io::Error },
}

/// What `pingpong run` reports.
#[derive(Debug, Serialize)]
struct Report {
    backend: &'static str,
    target: String,
    message_bytes: usize,
    rate_msgs_per_s: u64,
    method: &'static str,
    messages: u64,
    seconds: f64,
    msgs_per_s: f64,
    /// This process's user + system CPU over the run per second of it (null if unmeasured).
    cpu_cores: Option<f64>,
    latency_us: LatencySummary,
    latency_distribution_us: Vec<PercentilePoint>,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve {
            listen,
            idle_exit_s,
        } => serve(listen, Duration::from_secs(idle_exit_s)),
        Command::Noise {
            duration_s,
            gap_threshold_us,
            json,
        } => {
            let gaps = noise::spin(
                Duration::from_secs_f64(duration_s),
                Duration::from_micros(gap_threshold_us),
            );
            print_report(&gaps.summary(), json)
        }
        Command::Run {
            connect,
            message_bytes,
            rate_msgs_per_s,
            duration_s,
            timeout_ms,
            protocol,
            json,
        } => {
            let plan = RunPlan {
                addr: connect,
                protocol,
                message_bytes,
                rate_msgs_per_s,
                duration: Duration::from_secs_f64(duration_s),
                timeout: Duration::from_millis(timeout_ms),
            };
            run(&plan).and_then(|report| print_report(&report, json))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pingpong: {error}");
            ExitCode::from(1)
        }
    }
}

/// Accepts connections (non-blocking, polled every 10 ms so the idle deadline holds) and
/// echoes each on a thread of its own.
fn serve(listen: SocketAddr, idle_exit: Duration) -> Result<(), PingPongError> {
    let io_error = |doing| {
        move |source| PingPongError::Io {
            addr: listen,
            doing,
            source,
        }
    };
    let listener = TcpListener::bind(listen).map_err(io_error("listening on"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_error("setting up"))?;
    eprintln!("pingpong: echoing on {listen}");
    let mut echoes: Vec<thread::JoinHandle<()>> = Vec::new();
    let mut idle_since = Timestamp::now();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                echoes.push(thread::spawn(move || echo(stream, peer, idle_exit)));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => eprintln!("pingpong: accepting on {listen}: {error}"),
        }
        echoes.retain(|echo| !echo.is_finished());
        if !echoes.is_empty() {
            idle_since = Timestamp::now();
        } else if Timestamp::now().saturating_duration_since(idle_since) >= idle_exit {
            eprintln!(
                "pingpong: no connection for {} s; exiting",
                idle_exit.as_secs()
            );
            return Ok(());
        }
    }
}

/// Writes back what it reads until the peer closes or is silent for `idle_exit`.
fn echo(mut stream: TcpStream, peer: SocketAddr, idle_exit: Duration) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(idle_exit)));
    if let Err(error) = setup {
        eprintln!("pingpong: setting up the connection from {peer}: {error}");
        return;
    }
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => read,
            Err(error) => {
                eprintln!("pingpong: reading from {peer}: {error}");
                return;
            }
        };
        if let Err(error) = stream.write_all(&buffer[..read]) {
            eprintln!("pingpong: writing to {peer}: {error}");
            return;
        }
    }
}

/// A `pingpong run`, resolved.
#[derive(Debug, Clone)]
struct RunPlan {
    addr: SocketAddr,
    protocol: Protocol,
    message_bytes: usize,
    rate_msgs_per_s: u64,
    duration: Duration,
    timeout: Duration,
}

/// Sends messages on the schedule until the duration is over: to a `pingpong serve` one
/// outstanding at a time, to Redis open loop.
fn run(plan: &RunPlan) -> Result<Report, PingPongError> {
    let addr = plan.addr;
    let mut stream = TcpStream::connect_timeout(&addr, plan.timeout)
        .map_err(|source| plan.io_error("connecting to", source))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(plan.timeout)))
        .map_err(|source| plan.io_error("setting up the connection to", source))?;
    if plan.rate_msgs_per_s > 0
        && let Err(error) = set_timer_slack_min()
    {
        eprintln!("pingpong: timer slack stays at the default (sleeps may end late): {error}");
    }
    let cpu = CpuMeter::start();
    let start = Timestamp::now();
    let (histogram, messages) = match plan.protocol {
        Protocol::Echo => echo_closed_loop(&mut stream, plan, start)?,
        Protocol::RedisXadd => redis_open_loop(stream, plan, start)?,
    };
    let seconds = Timestamp::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    let cpu_cores = cpu.cores().ok();
    let (backend, method) = match plan.protocol {
        Protocol::Echo => (
            "tcp-pingpong",
            "closed loop, one message outstanding, open-loop schedule, latency from the due time",
        ),
        Protocol::RedisXadd => (
            "redis-xadd",
            "open loop, XADD sent on the schedule whatever is outstanding, latency from the due time to the reply",
        ),
    };
    Ok(Report {
        backend,
        target: addr.to_string(),
        message_bytes: plan.message_bytes,
        rate_msgs_per_s: plan.rate_msgs_per_s,
        method,
        messages,
        seconds,
        msgs_per_s: messages as f64 / seconds.max(1e-9),
        cpu_cores,
        latency_us: LatencySummary::of(&histogram),
        latency_distribution_us: percentile_distribution(&histogram),
    })
}

/// The echo method: one message outstanding, each sent at its due time or as soon as the
/// echo of the one before is in. Returns the round trips and how many completed.
fn echo_closed_loop(
    stream: &mut TcpStream,
    plan: &RunPlan,
    start: Timestamp,
) -> Result<(Histogram<u64>, u64), PingPongError> {
    let message = vec![0x5a; plan.message_bytes];
    let mut echoed = vec![0; plan.message_bytes];
    let mut histogram = latency_histogram();
    let schedule = Schedule::new(start, plan.rate_msgs_per_s, 1);
    let mut planner = schedule.map_or_else(SleepPlanner::default, |s| {
        SleepPlanner::for_interval(s.interval())
    });
    let mut seq = 0;
    let end = start + plan.duration;
    loop {
        // Measured from the due time; unpaced, from the write. Paced, the run is the
        // messages due before its end, however late they go.
        let from = match schedule {
            Some(schedule) => {
                let due = schedule.due(0, seq);
                if due >= end {
                    break;
                }
                let Ok(()) = sleep_until::<Infallible>(&mut planner, due, || Ok(()));
                due
            }
            None if Timestamp::now() >= end => break,
            None => Timestamp::now(),
        };
        stream
            .write_all(&message)
            .map_err(|source| plan.io_error("writing to", source))?;
        stream
            .read_exact(&mut echoed)
            .map_err(|source| plan.read_error(seq, source))?;
        let latency = Timestamp::now().saturating_duration_since(from);
        histogram.saturating_record((latency.as_micros() as u64).max(1));
        seq += 1;
    }
    Ok((histogram, seq))
}

/// The Redis method: open loop. This thread writes each XADD at its due time whatever is
/// outstanding (as the brokers' publishers do); a reader thread takes the replies, which
/// Redis sends in order, and measures reply `i` from the due time of message `i`.
fn redis_open_loop(
    stream: TcpStream,
    plan: &RunPlan,
    start: Timestamp,
) -> Result<(Histogram<u64>, u64), PingPongError> {
    let Some(schedule) = Schedule::new(start, plan.rate_msgs_per_s, 1) else {
        return Err(PingPongError::RedisUnpaced);
    };
    let end = start + plan.duration;
    let messages = (0..).take_while(|&seq| schedule.due(0, seq) < end).count() as u64;
    let request = redis::xadd_request(&vec![0x5a; plan.message_bytes]);
    let reader_stream = stream
        .try_clone()
        .map_err(|source| plan.io_error("setting up the connection to", source))?;
    let reader_plan = plan.clone();
    let reader = thread::Builder::new()
        .name("redis-replies".into())
        .spawn(move || read_redis_replies(reader_stream, &reader_plan, schedule, messages))
        .map_err(|source| plan.io_error("starting the reply reader for", source))?;
    let mut planner = SleepPlanner::for_interval(schedule.interval());
    let mut writer = &stream;
    for seq in 0..messages {
        let Ok(()) = sleep_until::<Infallible>(&mut planner, schedule.due(0, seq), || Ok(()));
        writer
            .write_all(&request)
            .map_err(|source| plan.io_error("writing to", source))?;
    }
    let histogram = reader.join().map_err(|_| PingPongError::ReaderPanicked)??;
    Ok((histogram, messages))
}

/// Reads `messages` replies in order, each measured from its message's due time.
fn read_redis_replies(
    mut stream: TcpStream,
    plan: &RunPlan,
    schedule: Schedule,
    messages: u64,
) -> Result<Histogram<u64>, PingPongError> {
    let addr = plan.addr;
    let mut histogram = latency_histogram();
    let mut pending = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    let mut seq = 0;
    while seq < messages {
        let read = stream
            .read(&mut chunk)
            .map_err(|source| plan.read_error(seq, source))?;
        if read == 0 {
            return Err(plan.read_error(
                seq,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ),
            ));
        }
        let at = Timestamp::now();
        pending.extend_from_slice(&chunk[..read]);
        let mut taken = 0;
        loop {
            let reply = redis::reply(&pending[taken..])
                .map_err(|problem| PingPongError::RedisReply { addr, seq, problem })?;
            let Some(redis::Reply { len, error }) = reply else {
                break;
            };
            if let Some(reply) = error {
                return Err(PingPongError::RedisError { addr, seq, reply });
            }
            if seq == messages {
                return Err(PingPongError::RedisReply {
                    addr,
                    seq,
                    problem: "a reply to a message never sent",
                });
            }
            record_since(&mut histogram, &schedule, 0, seq..seq + 1, at);
            seq += 1;
            taken += len;
        }
        pending.drain(..taken);
    }
    Ok(histogram)
}

impl RunPlan {
    fn io_error(&self, doing: &'static str, source: io::Error) -> PingPongError {
        PingPongError::Io {
            addr: self.addr,
            doing,
            source,
        }
    }

    /// A failed read of the answer to message `seq`: a timeout, or the connection's end.
    fn read_error(&self, seq: u64, source: io::Error) -> PingPongError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            PingPongError::AnswerTimeout {
                addr: self.addr,
                seq,
                timeout_ms: self.timeout.as_millis() as u64,
            }
        } else {
            self.io_error("reading the answer from", source)
        }
    }
}

fn print_report(report: &impl Serialize, json: Option<PathBuf>) -> Result<(), PingPongError> {
    let text = serde_json::to_string_pretty(report).unwrap_or_default() + "\n";
    print!("{text}");
    match json {
        Some(path) => {
            std::fs::write(&path, text).map_err(|source| PingPongError::Report { path, source })
        }
        None => Ok(()),
    }
}
