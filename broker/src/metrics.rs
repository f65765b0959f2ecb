//! Broker metrics: lock-free counters updated on the hot path, rendered as Prometheus text
//! by a small HTTP endpoint (`GET /metrics`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
    /// Gauge: connections open.
    pub connections_open: AtomicU64,
    /// Gauge: batches in the rings not yet decided by the sequencer.
    pub sequencer_lag_batches: AtomicU64,
    /// Batches delivered to subscribers.
    pub batches_delivered: AtomicU64,
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
    /// XDP backend: frames the kernel dropped before they reached the AF_XDP socket's rx
    /// ring (rx ring full, no fill-ring frame, or larger than a UMEM frame).
    pub xdp_rx_dropped: AtomicU64,
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

    /// Records this broker's role.
    pub fn set_sequencer_role(&self, role: SequencerRole) {
        self.sequencer_role.store(role as u64, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let series: [(&str, &str, &str, &AtomicU64); 24] = [
            (
                "embarcadero_batches_received_total",
                "counter",
                "Batches received and written to the pool.",
                &self.batches_received,
            ),
            (
                "embarcadero_bytes_received_total",
                "counter",
                "Payload bytes received and written to the pool.",
                &self.bytes_received,
            ),
            (
                "embarcadero_batches_acked_total",
                "counter",
                "Batches acknowledged to publishers.",
                &self.batches_acked,
            ),
            (
                "embarcadero_ring_full_waits_total",
                "counter",
                "Waits for ring or payload log room.",
                &self.ring_full_waits,
            ),
            (
                "embarcadero_receive_stalls_over_50ms_total",
                "counter",
                "Waits for pool room longer than 50 ms.",
                &self.receive_stalls_over_50ms,
            ),
            (
                "embarcadero_batches_dropped_total",
                "counter",
                "Accepted batches whose outcome was lost (must be 0).",
                &self.batches_dropped,
            ),
            (
                "embarcadero_batches_rejected_total",
                "counter",
                "Batches rejected by the sequencer and reported to publishers.",
                &self.batches_rejected,
            ),
            (
                "embarcadero_errors_sent_total",
                "counter",
                "Error frames sent.",
                &self.errors_sent,
            ),
            (
                "embarcadero_connections_open",
                "gauge",
                "Connections open.",
                &self.connections_open,
            ),
            (
                "embarcadero_sequencer_lag_batches",
                "gauge",
                "Batches in this broker's rings not yet decided by the sequencer.",
                &self.sequencer_lag_batches,
            ),
            (
                "embarcadero_replica_batches_total",
                "counter",
                "Batches copied to this broker's replica files.",
                &self.replica_batches,
            ),
            (
                "embarcadero_replica_errors_total",
                "counter",
                "Replication errors (replication pauses for a second after each).",
                &self.replica_errors,
            ),
            (
                "embarcadero_sequencer_takeovers_total",
                "counter",
                "Times this broker took over the sequencer lease from an expired holder.",
                &self.sequencer_takeovers,
            ),
            (
                "embarcadero_sequencer_role",
                "gauge",
                "1 while this broker holds the sequencer lease, 2 while it stands by.",
                &self.sequencer_role,
            ),
            (
                "embarcadero_batches_delivered_total",
                "counter",
                "Batches delivered to subscribers.",
                &self.batches_delivered,
            ),
            (
                "embarcadero_sequencer_batches_ordered_total",
                "counter",
                "Batches ordered by this broker's sequencer (head only).",
                &self.sequencer_batches_ordered,
            ),
            (
                "embarcadero_sequencer_gaps_resolved_total",
                "counter",
                "Order-5 gaps resolved by the gap rule (head only).",
                &self.sequencer_gaps_resolved,
            ),
            (
                "embarcadero_sequencer_held_batches",
                "gauge",
                "Batches held for order-5 gaps (head only).",
                &self.sequencer_held,
            ),
            (
                "embarcadero_xdp_rx_dropped_total",
                "counter",
                "Frames the kernel dropped before the AF_XDP socket (XDP backend; see the log).",
                &self.xdp_rx_dropped,
            ),
            (
                "embarcadero_xdp_cookie_adopted_total",
                "counter",
                "SYN-cookie connections adopted into the userspace stack (XDP backend).",
                &self.xdp_cookie_adopted,
            ),
            (
                "embarcadero_xdp_cookie_refused_total",
                "counter",
                "SYN-cookie connections refused with a RST: every socket in use (XDP backend).",
                &self.xdp_cookie_refused,
            ),
            (
                "embarcadero_xdp_cookie_dropped_total",
                "counter",
                "Segments dropped during or after a refused adoption, and adoptions given up (XDP backend).",
                &self.xdp_cookie_dropped,
            ),
            (
                "embarcadero_xdp_neighbour_replies_total",
                "counter",
                "Neighbours from the kernel's table handed to the userspace stack (XDP backend).",
                &self.xdp_neighbour_replies,
            ),
            (
                "embarcadero_xdp_neighbour_table_full_total",
                "counter",
                "Neighbours not tracked because the table was full (XDP backend).",
                &self.xdp_neighbour_table_full,
            ),
        ];
        for (name, kind, help, counter) in series {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{broker=\"{broker}\"}} {}\n",
                get(counter)
            ));
        }
        let name = "embarcadero_ack_latency_us";
        out.push_str(&format!(
            "# HELP {name} Time from a batch fully received to its ACK sent.\n# TYPE {name} histogram\n"
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
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is set (checked every 100 ms).
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>, broker: u16, stop: Arc<AtomicBool>) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("metrics endpoint: cannot poll the listener: {e}");
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 1024];
                let read = stream.read(&mut request).unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..read]);
                let response = if head.starts_with("GET /metrics") {
                    let body = metrics.render(broker);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    let body = "only GET /metrics is served\n";
                    format!(
                        "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = stream.write_all(response.as_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => log::warn!("metrics endpoint: accept failed: {e}"),
        }
    }
}

/// Binds the metrics endpoint; the error names the address.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}
