//! Broker metrics: lock-free counters updated on the hot path, rendered as Prometheus text
//! by a small HTTP endpoint (`GET /metrics`, served by hyper on a single-threaded tokio
//! runtime of its own).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use units::Timestamp;

/// Upper bounds (microseconds) of the ACK latency histogram buckets.
pub const ACK_LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// Counters of one broker. All are monotonic unless named a gauge.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Batches received and written to the pool.
    pub batches_received: AtomicU64,
    /// Payload bytes received and written to the pool.
    pub bytes_received: AtomicU64,
    /// Payload bytes the transport placed straight into the pool as they arrived (the
    /// bypass path's receive target), without a copy through a socket buffer.
    pub bytes_received_direct: AtomicU64,
    /// Batches acknowledged to publishers (ordered or duplicate).
    pub batches_acked: AtomicU64,
    /// Times a connection had to wait because its ring or payload log was full.
    pub ring_full_waits: AtomicU64,
    /// Waits for pool room that lasted over 50 ms.
    pub receive_stalls_over_50ms: AtomicU64,
    /// Batches accepted into a ring whose outcome was lost (must stay 0).
    pub batches_dropped: AtomicU64,
    /// Batches the sequencer rejected (gap rule, dedup window), reported to publishers.
    pub batches_rejected: AtomicU64,
    /// Error frames sent.
    pub errors_sent: AtomicU64,
    /// Subscribers sent to other brokers for positions only their replicas keep.
    pub redirects_sent: AtomicU64,
    /// Gauge: connections open.
    pub connections_open: AtomicU64,
    /// Gauge: batches in the rings not yet decided by the sequencer.
    pub sequencer_lag_batches: AtomicU64,
    /// Batches delivered to subscribers.
    pub batches_delivered: AtomicU64,
    /// Of those, batches read from this broker's replica files (older than the pool held).
    pub history_batches_delivered: AtomicU64,
    /// ACK latency histogram: count per bucket of [`ACK_LATENCY_BUCKETS_US`], then +Inf.
    pub ack_latency_buckets: [AtomicU64; ACK_LATENCY_BUCKETS_US.len() + 1],
    /// Sum of ACK latencies in microseconds.
    pub ack_latency_sum_us: AtomicU64,
    /// Sequencer (head only): batches ordered.
    pub sequencer_batches_ordered: AtomicU64,
    /// Sequencer (head only): gaps resolved by the gap rule.
    pub sequencer_gaps_resolved: AtomicU64,
    /// Sequencer (head only), gauge: batches held for gaps.
    pub sequencer_held: AtomicU64,
    /// Batches copied to this broker's replica files.
    pub replica_batches: AtomicU64,
    /// Replication errors (each stops replication for a second; see the log).
    pub replica_errors: AtomicU64,
    /// Sequencer: times this broker took the sequencer lease over from an expired holder.
    pub sequencer_takeovers: AtomicU64,
    /// Gauge, a [`SequencerRole`] code: whether this broker holds the sequencer lease.
    pub sequencer_role: AtomicU64,
    /// Sequencer agents of this broker that hold the lease now (the network loop's and the
    /// standby thread's may overlap for a moment when one takes over from the other).
    pub sequencer_holders: AtomicU64,
    /// XDP backend: frames the kernel dropped before they reached the AF_XDP socket's rx
    /// ring (rx ring full, no fill-ring frame, or larger than a UMEM frame).
    pub xdp_rx_dropped: AtomicU64,
    /// Connections refused by the connection limits (in all, or per address).
    pub connections_refused: AtomicU64,
    /// Connections closed for sending no Hello (or CreateTopic) in time.
    pub hello_deadlines_expired: AtomicU64,
    /// Connections closed because a batch's payload arrived slower than the minimum rate.
    pub batch_deadlines_expired: AtomicU64,
    /// Slow batches moved out of the pool into staging, so their room could be reclaimed.
    pub batches_staged: AtomicU64,
    /// Slow batches left in the pool because staging was full.
    pub staging_full: AtomicU64,
    /// Gauge: bytes of slow batches held in staging.
    pub staging_bytes: AtomicU64,
    /// Subscribers that stopped holding the log because they took nothing for the stall limit.
    pub subscribers_released: AtomicU64,
    /// Topics not created: table full, or creation on first use not enabled.
    pub topics_refused: AtomicU64,
    /// Times a connection's input was paused because its peer did not read its output.
    pub output_full_waits: AtomicU64,
    /// Closing connections dropped because their peer did not take the last bytes in time.
    pub close_deadlines_expired: AtomicU64,
    /// Subscriber connections reset because a delivery's payload was overwritten in the log
    /// while its frame was being sent (the bytes that left may be torn).
    pub deliveries_torn: AtomicU64,
    /// Metrics endpoint: connections closed to make room for a newer one (the limit of
    /// [`EndpointLimits::connections_max`] was reached).
    pub metrics_connections_evicted: AtomicU64,
    /// Metrics endpoint: connections closed because they had not been served by
    /// [`EndpointLimits::connection_deadline`] (silent, trickling or not reading).
    pub metrics_connections_timed_out: AtomicU64,
    /// XDP backend: SYN-cookie connections adopted into the userspace stack.
    pub xdp_cookie_adopted: AtomicU64,
    /// XDP backend: SYN-cookie connections refused with a RST (every socket in use).
    pub xdp_cookie_refused: AtomicU64,
    /// XDP backend: segments dropped while their connection was being adopted or after it
    /// was refused, and adoptions given up.
    pub xdp_cookie_dropped: AtomicU64,
    /// XDP backend: ARP replies from the kernel's neighbour table handed to the userspace
    /// stack.
    pub xdp_neighbour_replies: AtomicU64,
    /// XDP backend: neighbours not tracked because the table was full.
    pub xdp_neighbour_table_full: AtomicU64,
    /// Kafka listener: requests answered.
    pub kafka_requests: AtomicU64,
    /// Kafka listener: connections closed for a malformed request (or one for an API or
    /// version ApiVersions did not offer), or a request not whole within its deadline.
    pub kafka_connections_failed: AtomicU64,
}

/// What a broker is to the sequencer lease (the `sequencer_role` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequencerRole {
    /// No sequencer agent runs here (a state built without a server, as in tests): the
    /// `head` setting alone decides who creates topics.
    Unmanaged = 0,
    /// Holds the lease: sequences, and creates topics.
    Holding = 1,
    /// Stands by (or was fenced): creates no topics.
    StandingBy = 2,
}

impl Metrics {
    /// This broker's role, as last set by its sequencer agent.
    pub fn sequencer_role(&self) -> SequencerRole {
        match self.sequencer_role.load(Ordering::Relaxed) {
            1 => SequencerRole::Holding,
            2 => SequencerRole::StandingBy,
            _ => SequencerRole::Unmanaged,
        }
    }

    /// Records this broker's role (sequentially consistent with `sequencer_holders`: see
    /// `SequencerDriver`'s drop).
    pub fn set_sequencer_role(&self, role: SequencerRole) {
        self.sequencer_role.store(role as u64, Ordering::SeqCst);
    }
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one to a counter of an event that an attack may fire a million times; returns
    /// the count when this event should be logged (the first, then every 1000th), so the
    /// log says that it happens without being flooded.
    pub fn inc_logged(counter: &AtomicU64) -> Option<u64> {
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        (count % 1000 == 1).then_some(count)
    }

    /// Records one ACK latency.
    pub fn observe_ack_latency(&self, latency: Duration) {
        let us = latency.as_micros() as u64;
        let bucket = ACK_LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(ACK_LATENCY_BUCKETS_US.len());
        self.ack_latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.ack_latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, broker: u16) -> String {
        let mut out = String::new();
        for series in SERIES {
            let Series {
                name,
                kind,
                help,
                value,
            } = series;
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{broker=\"{broker}\"}} {}\n",
                value(self).load(Ordering::Relaxed)
            ));
        }
        self.render_ack_latency(broker, &mut out);
        out
    }

    /// The ACK latency histogram, cumulative as Prometheus wants it.
    fn render_ack_latency(&self, broker: u16, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let name = "embarcadero_ack_latency_us";
        out.push_str(&format!(
            "# HELP {name} Time from a batch fully received to its ACK sent (Kafka: a Produce request received to its answer queued).\n# TYPE {name} histogram\n"
        ));
        let mut cumulative = 0;
        for (i, bound) in ACK_LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += get(&self.ack_latency_buckets[i]);
            out.push_str(&format!(
                "{name}_bucket{{broker=\"{broker}\",le=\"{bound}\"}} {cumulative}\n"
            ));
        }
        cumulative += get(&self.ack_latency_buckets[ACK_LATENCY_BUCKETS_US.len()]);
        out.push_str(&format!(
            "{name}_bucket{{broker=\"{broker}\",le=\"+Inf\"}} {cumulative}\n"
        ));
        out.push_str(&format!(
            "{name}_sum{{broker=\"{broker}\"}} {}\n",
            get(&self.ack_latency_sum_us)
        ));
        out.push_str(&format!(
            "{name}_count{{broker=\"{broker}\"}} {cumulative}\n"
        ));
    }
}

/// One exported series: its name, Prometheus type, help text, and where its value is.
struct Series {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&Metrics) -> &AtomicU64,
}

/// Every plain series the endpoint exports, in this order (the ACK latency histogram
/// follows them).
const SERIES: &[Series] = &[
    Series {
        name: "embarcadero_batches_received_total",
        kind: "counter",
        help: "Batches received and written to the pool.",
        value: |m| &m.batches_received,
    },
    Series {
        name: "embarcadero_bytes_received_total",
        kind: "counter",
        help: "Payload bytes received and written to the pool.",
        value: |m| &m.bytes_received,
    },
    Series {
        name: "embarcadero_bytes_received_direct_total",
        kind: "counter",
        help: "Payload bytes placed straight into the pool as they arrived (XDP backend).",
        value: |m| &m.bytes_received_direct,
    },
    Series {
        name: "embarcadero_batches_acked_total",
        kind: "counter",
        help: "Batches acknowledged to publishers.",
        value: |m| &m.batches_acked,
    },
    Series {
        name: "embarcadero_ring_full_waits_total",
        kind: "counter",
        help: "Waits for ring or payload log room.",
        value: |m| &m.ring_full_waits,
    },
    Series {
        name: "embarcadero_receive_stalls_over_50ms_total",
        kind: "counter",
        help: "Waits for pool room longer than 50 ms.",
        value: |m| &m.receive_stalls_over_50ms,
    },
    Series {
        name: "embarcadero_batches_dropped_total",
        kind: "counter",
        help: "Accepted batches whose outcome was lost (must be 0).",
        value: |m| &m.batches_dropped,
    },
    Series {
        name: "embarcadero_batches_rejected_total",
        kind: "counter",
        help: "Batches rejected by the sequencer and reported to publishers.",
        value: |m| &m.batches_rejected,
    },
    Series {
        name: "embarcadero_errors_sent_total",
        kind: "counter",
        help: "Error frames sent.",
        value: |m| &m.errors_sent,
    },
    Series {
        name: "embarcadero_redirects_sent_total",
        kind: "counter",
        help: "Subscribers redirected to brokers that keep on disk the positions they asked for.",
        value: |m| &m.redirects_sent,
    },
    Series {
        name: "embarcadero_connections_open",
        kind: "gauge",
        help: "Connections open.",
        value: |m| &m.connections_open,
    },
    Series {
        name: "embarcadero_sequencer_lag_batches",
        kind: "gauge",
        help: "Batches in this broker's rings not yet decided by the sequencer.",
        value: |m| &m.sequencer_lag_batches,
    },
    Series {
        name: "embarcadero_replica_batches_total",
        kind: "counter",
        help: "Batches copied to this broker's replica files.",
        value: |m| &m.replica_batches,
    },
    Series {
        name: "embarcadero_replica_errors_total",
        kind: "counter",
        help: "Replication errors (replication pauses for a second after each).",
        value: |m| &m.replica_errors,
    },
    Series {
        name: "embarcadero_sequencer_takeovers_total",
        kind: "counter",
        help: "Times this broker took over the sequencer lease from an expired holder.",
        value: |m| &m.sequencer_takeovers,
    },
    Series {
        name: "embarcadero_sequencer_role",
        kind: "gauge",
        help: "1 while this broker holds the sequencer lease, 2 while it stands by.",
        value: |m| &m.sequencer_role,
    },
    Series {
        name: "embarcadero_batches_delivered_total",
        kind: "counter",
        help: "Batches delivered to subscribers.",
        value: |m| &m.batches_delivered,
    },
    Series {
        name: "embarcadero_history_batches_delivered_total",
        kind: "counter",
        help: "Batches delivered to subscribers from this broker's replica files (older than the pool held).",
        value: |m| &m.history_batches_delivered,
    },
    Series {
        name: "embarcadero_sequencer_batches_ordered_total",
        kind: "counter",
        help: "Batches ordered by this broker's sequencer (head only).",
        value: |m| &m.sequencer_batches_ordered,
    },
    Series {
        name: "embarcadero_sequencer_gaps_resolved_total",
        kind: "counter",
        help: "Order-5 gaps resolved by the gap rule (head only).",
        value: |m| &m.sequencer_gaps_resolved,
    },
    Series {
        name: "embarcadero_sequencer_held_batches",
        kind: "gauge",
        help: "Batches held for order-5 gaps (head only).",
        value: |m| &m.sequencer_held,
    },
    Series {
        name: "embarcadero_xdp_rx_dropped_total",
        kind: "counter",
        help: "Frames the kernel dropped before the AF_XDP socket (XDP backend; see the log).",
        value: |m| &m.xdp_rx_dropped,
    },
    Series {
        name: "embarcadero_kafka_requests_total",
        kind: "counter",
        help: "Kafka listener: requests answered.",
        value: |m| &m.kafka_requests,
    },
    Series {
        name: "embarcadero_kafka_connections_failed_total",
        kind: "counter",
        help: "Kafka listener: connections closed for a malformed or unoffered request, or one not whole within 30 s (see the log).",
        value: |m| &m.kafka_connections_failed,
    },
    Series {
        name: "embarcadero_connections_refused_total",
        kind: "counter",
        help: "Connections refused by --connections-max or --connections-per-address-max.",
        value: |m| &m.connections_refused,
    },
    Series {
        name: "embarcadero_hello_deadlines_expired_total",
        kind: "counter",
        help: "Connections closed for sending no Hello within --hello-timeout-ms.",
        value: |m| &m.hello_deadlines_expired,
    },
    Series {
        name: "embarcadero_batch_deadlines_expired_total",
        kind: "counter",
        help: "Connections closed for sending a batch slower than --batch-min-bytes-per-s.",
        value: |m| &m.batch_deadlines_expired,
    },
    Series {
        name: "embarcadero_batches_staged_total",
        kind: "counter",
        help: "Slow batches moved out of the pool after --batch-hold-ms.",
        value: |m| &m.batches_staged,
    },
    Series {
        name: "embarcadero_staging_full_total",
        kind: "counter",
        help: "Slow batches left in the pool because --staging-bytes-max was reached.",
        value: |m| &m.staging_full,
    },
    Series {
        name: "embarcadero_staging_bytes",
        kind: "gauge",
        help: "Bytes of slow batches held in staging.",
        value: |m| &m.staging_bytes,
    },
    Series {
        name: "embarcadero_subscribers_released_total",
        kind: "counter",
        help: "Subscribers that stopped holding the log after --subscriber-stall-ms without reading.",
        value: |m| &m.subscribers_released,
    },
    Series {
        name: "embarcadero_topics_refused_total",
        kind: "counter",
        help: "Topics not created: the topic table is full, or creation on first use is off.",
        value: |m| &m.topics_refused,
    },
    Series {
        name: "embarcadero_output_full_waits_total",
        kind: "counter",
        help: "Times a connection's input was paused because its peer left over 4 MiB of output unread.",
        value: |m| &m.output_full_waits,
    },
    Series {
        name: "embarcadero_close_deadlines_expired_total",
        kind: "counter",
        help: "Closing connections dropped after --close-timeout-ms with output their peer did not take.",
        value: |m| &m.close_deadlines_expired,
    },
    Series {
        name: "embarcadero_deliveries_torn_total",
        kind: "counter",
        help: "Subscriber connections reset: a delivery's payload was overwritten in the log while it was being sent.",
        value: |m| &m.deliveries_torn,
    },
    Series {
        name: "embarcadero_metrics_connections_evicted_total",
        kind: "counter",
        help: "Metrics endpoint connections closed to make room (over the connection limit).",
        value: |m| &m.metrics_connections_evicted,
    },
    Series {
        name: "embarcadero_metrics_connections_timed_out_total",
        kind: "counter",
        help: "Metrics endpoint connections closed unserved at the connection deadline.",
        value: |m| &m.metrics_connections_timed_out,
    },
    Series {
        name: "embarcadero_xdp_cookie_adopted_total",
        kind: "counter",
        help: "SYN-cookie connections adopted into the userspace stack (XDP backend).",
        value: |m| &m.xdp_cookie_adopted,
    },
    Series {
        name: "embarcadero_xdp_cookie_refused_total",
        kind: "counter",
        help: "SYN-cookie connections refused with a RST: every socket in use (XDP backend).",
        value: |m| &m.xdp_cookie_refused,
    },
    Series {
        name: "embarcadero_xdp_cookie_dropped_total",
        kind: "counter",
        help: "Segments dropped during or after a refused adoption, adoptions given up, and first segments of a connection with a wrong IPv4 header checksum (XDP backend).",
        value: |m| &m.xdp_cookie_dropped,
    },
    Series {
        name: "embarcadero_xdp_neighbour_replies_total",
        kind: "counter",
        help: "Neighbours from the kernel's table handed to the userspace stack (XDP backend).",
        value: |m| &m.xdp_neighbour_replies,
    },
    Series {
        name: "embarcadero_xdp_neighbour_table_full_total",
        kind: "counter",
        help: "Neighbours not tracked because the table was full (XDP backend).",
        value: |m| &m.xdp_neighbour_table_full,
    },
];

/// How often the endpoint looks at the broker's stop flag.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// At most one log line per this long about connections evicted over the limit.
const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Request head buffer per connection (hyper's smallest): a scrape's request is a few
/// hundred bytes; a larger one is answered 431.
const REQUEST_BUFFER_BYTES: usize = 8192;

/// Limits of the metrics endpoint, so that clients that connect and send nothing cannot
/// keep scrapes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Connections open at a time. A connection beyond it closes the oldest open one,
    /// so the newest (likely a scrape that has just sent its request) is served.
    pub connections_max: usize,
    /// A connection not served by then (its request fully read and the response written)
    /// is closed.
    pub connection_deadline: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            connections_max: 64,
            connection_deadline: Duration::from_secs(2),
        }
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The listening socket could not be bound.
    #[error("cannot listen for metrics on {addr}: {source} (choose a free address with --metrics)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The endpoint's event loop could not be created.
    #[error(
        "cannot create the metrics endpoint's event loop: {0} (raise the open files limit, ulimit -n)"
    )]
    Runtime(std::io::Error),
    /// A limit that would refuse every scrape.
    #[error("--metrics-connections-max must be at least 1 (it is {0})")]
    NoConnections(usize),
    /// A deadline that would close every connection unserved.
    #[error("--metrics-deadline-ms must be at least 1")]
    NoDeadline,
}

/// A bound metrics endpoint, not yet serving: [`Endpoint::serve`] runs it.
#[derive(Debug)]
pub struct Endpoint {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    limits: EndpointLimits,
}

impl Endpoint {
    /// Binds the endpoint on `addr` (its event loop too, so that every error shows at start).
    pub fn bind(addr: SocketAddr, limits: EndpointLimits) -> Result<Endpoint, EndpointError> {
        if limits.connections_max == 0 {
            return Err(EndpointError::NoConnections(limits.connections_max));
        }
        if limits.connection_deadline.is_zero() {
            return Err(EndpointError::NoDeadline);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(EndpointError::Runtime)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| EndpointError::Listen { addr, source })?;
        Ok(Endpoint {
            runtime,
            listener,
            limits,
        })
    }

    /// The bound address (the port chosen when `addr` had port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `GET /metrics` until `stop` is set (checked every 50 ms), on the calling
    /// thread. Open connections are closed when it returns.
    pub fn serve(self, metrics: Arc<Metrics>, broker: u16, stop: Arc<AtomicBool>) {
        let Endpoint {
            runtime,
            listener,
            limits,
        } = self;
        runtime.block_on(accept_until_stopped(
            listener, limits, metrics, broker, stop,
        ));
        // Dropping the runtime drops every connection task, closing its socket.
    }
}

async fn accept_until_stopped(
    listener: tokio::net::TcpListener,
    limits: EndpointLimits,
    metrics: Arc<Metrics>,
    broker: u16,
    stop: Arc<AtomicBool>,
) {
    // Connection tasks in the order they were accepted: the front is the oldest.
    let mut open: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    let mut eviction_log = LogThrottle::new(EVICTION_LOG_INTERVAL);
    while !stop.load(Ordering::Relaxed) {
        let stream = match tokio::time::timeout(STOP_POLL_INTERVAL, listener.accept()).await {
            Err(_) => continue,
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => {
                // E.g. out of file descriptors: pause rather than spin on the error.
                log::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(STOP_POLL_INTERVAL).await;
                continue;
            }
        };
        open.retain(|task| !task.is_finished());
        if open.len() >= limits.connections_max {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
            Metrics::inc(&metrics.metrics_connections_evicted);
            if let Some(evicted) = eviction_log.note(Timestamp::now()) {
                log::warn!(
                    "metrics endpoint: closed {evicted} connection(s) to make room, {} were open \
                     (--metrics-connections-max); some client holds connections without asking",
                    limits.connections_max
                );
            }
        }
        let task = tokio::spawn(serve_connection(
            stream,
            Arc::clone(&metrics),
            broker,
            limits.connection_deadline,
        ));
        open.push_back(task.abort_handle());
    }
}

/// Serves one request on `stream`, then closes it; closes it unserved at `deadline`.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    metrics: Arc<Metrics>,
    broker: u16,
    deadline: Duration,
) {
    let counters = Arc::clone(&metrics);
    let service = hyper::service::service_fn(move |request| {
        let response = respond(request.method(), request.uri().path(), &metrics, broker);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    // One request per connection (as a scrape needs), so that the deadline bounds the whole
    // connection: silent, trickling and non-reading clients alike.
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(REQUEST_BUFFER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match tokio::time::timeout(deadline, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("metrics endpoint: connection ended: {e}"),
        Err(_) => {
            Metrics::inc(&counters.metrics_connections_timed_out);
            log::debug!("metrics endpoint: closed a connection unserved after {deadline:?}");
        }
    }
}

/// The response to `method path`: the Prometheus text for `GET /metrics` (and HEAD).
fn respond(method: &Method, path: &str, metrics: &Metrics, broker: u16) -> Response<String> {
    let not_served = |status| {
        let mut response = Response::new("only GET /metrics is served\n".to_owned());
        *response.status_mut() = status;
        response
    };
    if path != "/metrics" {
        return not_served(StatusCode::NOT_FOUND);
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = not_served(StatusCode::METHOD_NOT_ALLOWED);
        let allowed = HeaderValue::from_static("GET, HEAD");
        response.headers_mut().insert(ALLOW, allowed);
        return response;
    }
    let mut response = Response::new(metrics.render(broker));
    let text = HeaderValue::from_static("text/plain; version=0.0.4");
    response.headers_mut().insert(CONTENT_TYPE, text);
    response
}

/// Rate limit for a log line about repeated events: the first event is logged at once, later
/// ones at most once per interval, with the number of events since the last line.
#[derive(Debug)]
struct LogThrottle {
    interval: Duration,
    last_logged: Option<Timestamp>,
    unlogged: u64,
}

impl LogThrottle {
    fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Notes one event at `now`; the number of events to log now, if a line is due.
    fn note(&mut self, now: Timestamp) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    #[test]
    fn log_throttle_logs_the_first_event_then_one_line_per_interval_with_the_count() {
        let start = Timestamp::ZERO;
        let mut throttle = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(throttle.note(start), Some(1));
        assert_eq!(throttle.note(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.note(start + Duration::from_secs(9)), None);
        assert_eq!(throttle.note(start + Duration::from_secs(10)), Some(3));
        assert_eq!(throttle.note(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.note(start + Duration::from_secs(25)), Some(2));
    }

    #[test]
    fn only_get_and_head_of_metrics_are_served() {
        let metrics = Metrics::default();
        metrics.batches_received.store(7, Ordering::Relaxed);
        let response = respond(&Method::GET, "/metrics", &metrics, 3);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), &metrics.render(3));
        assert!(
            response
                .body()
                .contains("embarcadero_batches_received_total{broker=\"3\"} 7\n")
        );
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
        let head = respond(&Method::HEAD, "/metrics", &metrics, 3);
        assert_eq!(head.status(), StatusCode::OK);
        for path in ["/", "/metricsx", "/metrics/", ""] {
            let response = respond(&Method::GET, path, &metrics, 3);
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        }
        let post = respond(&Method::POST, "/metrics", &metrics, 3);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }

    #[test]
    fn limits_that_would_refuse_every_scrape_are_refused() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let no_connections = EndpointLimits {
            connections_max: 0,
            ..EndpointLimits::default()
        };
        assert!(matches!(
            Endpoint::bind(addr, no_connections),
            Err(EndpointError::NoConnections(0))
        ));
        let no_deadline = EndpointLimits {
            connection_deadline: Duration::ZERO,
            ..EndpointLimits::default()
        };
        assert!(matches!(
            Endpoint::bind(addr, no_deadline),
            Err(EndpointError::NoDeadline)
        ));
    }

    #[test]
    fn stops_within_100_ms_and_closes_open_connections() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let endpoint = Endpoint::bind(addr, EndpointLimits::default()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let serving = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || endpoint.serve(Arc::default(), 0, stop))
        };
        let mut silent: Vec<TcpStream> =
            (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Let the endpoint take them before it stops.
        std::thread::sleep(Duration::from_millis(200));
        let stopping = Timestamp::now();
        stop.store(true, Ordering::Relaxed);
        serving.join().unwrap();
        let stopped = Timestamp::now().saturating_duration_since(stopping);
        // 50 ms between looks at the flag, and room for a loaded machine.
        assert!(
            stopped < Duration::from_millis(150),
            "stopped after {stopped:?}"
        );
        for connection in &mut silent {
            connection
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let mut buffer = [0u8; 16];
            assert_eq!(connection.read(&mut buffer).unwrap(), 0);
        }
    }
}
