//! Drives the broker's sans-IO [`Connection`] state machine with up to four clients at once,
//! the way the kernel loop does (route the sequencer's decisions, service every connection,
//! publish subscriptions), on a fresh pool in a heap region with the sequencer polled every
//! round. Whatever the clients send:
//!
//! - nothing panics, and every connection ends within a bounded number of rounds;
//! - everything the broker sends is a well-formed frame stream, nothing follows a closing
//!   Error or the broker's Goodbye, and deliveries carry valid payloads at contiguous
//!   positions;
//! - acknowledgements never go backwards and name each batch once per connection;
//! - no decision is dropped, and the log read back afterwards is intact and gap-free.
//!
//! Config bits of a [`ConnectionInput`] (bit 0 is [`fuzz_input::REPAIR_BATCHES`]): bits 1-2
//! pick the pool geometry (some tiny, so rings and logs fill up), bit 3 turns topic
//! auto-creation off, bits 4-5 pick the broker's batch limit, bit 6 shrinks the sequencer's
//! hold buffer, bit 7 makes the broker a non-head broker.

use std::sync::Arc;

use broker::metrics::Metrics;
use broker::server::connection::{ByteStream, Connection};
use broker::server::limits::ClientLimits;
use broker::server::state::{BrokerSettings, BrokerState};
use fuzz_input::{ConnectionInput, REPAIR_BATCHES, Rng};
use shared_log::coherence::CoherenceMode;
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::Pool;
use shared_log::reader::{LogReader, ReadError};
use shared_log::sequencer::{Sequencer, SequencerConfig};
use units::Timestamp;
use wire::{Decoded, Frame, FrameDecoder, Limits};

/// Rounds after which a connection still open counts as a hang.
const ROUNDS_MAX: u32 = 20_000;
/// Rounds without undecided batches, once every client has sent everything, before the
/// clients close their ends.
const QUIET_ROUNDS: u32 = 8;
/// The sequencer's hold timeout; the clock advances up to 0.2 ms a round.
const HOLD_TIMEOUT_NS: u64 = 1_000_000;

fn geometry(config: u8) -> Geometry {
    let (ring_slots, goi_entries, blog_bytes) = match (config >> 1) & 3 {
        0 => (8, 64, 64 * 1024),
        1 => (2, 16, 4096),
        2 => (4, 4, 8192),
        _ => (1, 2, 4096),
    };
    Geometry {
        brokers_max: 1,
        topics_max: 2,
        ring_slots,
        goi_entries,
        blog_bytes,
    }
}

fn settings(config: u8) -> BrokerSettings {
    BrokerSettings {
        broker_id: 0,
        head: config & 0x80 == 0,
        auto_create_topics: config & 8 == 0,
        batch_bytes_max: match (config >> 4) & 3 {
            0 => 16 * 1024,
            1 => 64,
            2 => 1024,
            _ => wire::BATCH_BYTES_MIN,
        },
        frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
        replication_factor: 1 + (config & 1),
        // Tight enough that the harness's clock (up to 0.2 ms a round) reaches them: slow
        // batches move to a small staging area, silent clients and stalled subscribers hit
        // their deadlines.
        limits: ClientLimits {
            hello_timeout_ms: 500,
            batch_grace_ms: 100,
            batch_min_bytes_per_s: 1 << 20,
            batch_hold_ms: 1,
            staging_bytes_max: 32 * 1024,
            connections_max: 4,
            connections_per_address_max: 4,
            subscriber_stall_ms: 50,
            close_timeout_ms: 100,
        },
        history_dir: None,
    }
}

fn sequencer_config(config: u8) -> SequencerConfig {
    SequencerConfig {
        hold_batches_max: if config & 0x40 == 0 { 64 } else { 2 },
        hold_timeout_ns: HOLD_TIMEOUT_NS,
        dedup_window: 2,
        sessions_max: 2,
        ..SequencerConfig::default()
    }
}

/// One client's side of the stream: its bytes in random chunks with `WouldBlock` between
/// them, and end of stream once told to close; output taken in random pieces.
struct Script {
    input: Vec<u8>,
    at: usize,
    /// The last chunk was handed out: the next receive would block.
    blocked: bool,
    closed: bool,
    output: Vec<u8>,
    rng: Rng,
}

impl ByteStream for Script {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.input.len() {
            return if self.closed {
                Ok(0)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            };
        }
        if std::mem::take(&mut self.blocked) || buf.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self
            .rng
            .chunk_len(self.input.len() - self.at)
            .min(buf.len());
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        self.blocked = true;
        Ok(n)
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rng.below(8) == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.rng.chunk_len(buf.len());
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// What the client has read of the broker's output so far, and the rules it checks.
struct Reader {
    decoder: FrameDecoder,
    at: usize,
    frames: u32,
    /// The broker sent a closing Error or its Goodbye: nothing may follow.
    ended_by: Option<String>,
    acked_through: Option<u64>,
    last_acked_entry: Option<u64>,
    /// End of the last delivery's positions (order > 0).
    next_position: Option<u64>,
    /// A Delivery whose payload is being read.
    delivery: Option<(wire::DeliveryHeaderRepr, Vec<u8>)>,
    acks: bool,
    deliveries: bool,
}

impl Reader {
    fn new() -> Reader {
        let limits = Limits::default()
            .with_batch_bytes_max(wire::BATCH_BYTES_HARD_MAX)
            .expect("the hard maximum is a valid limit");
        Reader {
            decoder: FrameDecoder::new(limits),
            at: 0,
            frames: 0,
            ended_by: None,
            acked_through: None,
            last_acked_entry: None,
            next_position: None,
            delivery: None,
            acks: false,
            deliveries: false,
        }
    }

    /// Reads everything new in `output`.
    fn read(&mut self, output: &[u8]) {
        while self.at < output.len() {
            let (used, decoded) = self
                .decoder
                .decode(&output[self.at..])
                .unwrap_or_else(|e| panic!("the broker sent a malformed frame: {e}"));
            self.at += used;
            if let Decoded::NeedMore(_) = decoded {
                continue;
            }
            if let Some(why) = &self.ended_by {
                panic!("the broker sent {decoded:?} after {why}");
            }
            match decoded {
                Decoded::NeedMore(_) => {}
                Decoded::Frame(frame) => self.on_frame(frame),
                Decoded::Batch(header) => panic!("the broker sent a Batch: {header:?}"),
                Decoded::Delivery(header) => {
                    assert!(!self.acks, "Delivery on a publisher connection");
                    self.deliveries = true;
                    if let Some(start) = header.global_start {
                        if let Some(expected) = self.next_position {
                            assert_eq!(start, expected, "deliveries skip or repeat positions");
                        }
                        self.next_position = Some(start + u64::from(header.message_count));
                    }
                    self.delivery = Some((header, Vec::new()));
                    self.end_delivery();
                }
                Decoded::Payload { bytes, .. } => {
                    let (_, payload) = self.delivery.as_mut().expect("payload of a Delivery");
                    payload.extend_from_slice(bytes);
                    self.end_delivery();
                }
            }
        }
    }

    fn end_delivery(&mut self) {
        if self.decoder.payload_remaining().is_some() {
            return;
        }
        let (header, payload) = self.delivery.take().expect("a Delivery is open");
        if let Err(e) = wire::verify_payload(&header, &payload) {
            panic!("the broker delivered a bad payload ({e}): {header:?}");
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        self.frames += 1;
        match frame {
            Frame::HelloOk(_) => assert_eq!(self.frames, 1, "HelloOk after the first frame"),
            Frame::TopicOk(_) => {}
            Frame::Error(error) if error.code.closes_connection() => {
                self.ended_by = Some(format!("closing {error:?}"));
            }
            Frame::Error(_) => {}
            Frame::Goodbye => self.ended_by = Some("the broker's Goodbye".to_owned()),
            Frame::Redirect(_) => {
                assert_eq!(self.frames, 1, "Redirect after the first frame");
                self.ended_by = Some("a Redirect".to_owned());
            }
            Frame::Ack(ack) => {
                assert!(!self.deliveries, "Ack on a subscriber connection");
                self.acks = true;
                let through = ack.acked_through_seq();
                assert!(
                    self.acked_through.is_none_or(|last| last <= through),
                    "acked_through_seq went back from {:?} to {through}",
                    self.acked_through
                );
                self.acked_through = Some(through);
                for entry in ack.entries() {
                    assert!(
                        self.last_acked_entry
                            .is_none_or(|last| last < entry.batch_seq),
                        "batch {} acknowledged twice or out of order",
                        entry.batch_seq
                    );
                    self.last_acked_entry = Some(entry.batch_seq);
                }
            }
            other => panic!("the broker sent a client frame: {other:?}"),
        }
    }
}

struct Client {
    connection: Connection<shared_log::coherence::PoolMemory>,
    script: Script,
    reader: Reader,
    open: bool,
}

/// Runs one input; panics on any violation (see the module docs).
pub fn run(input: &ConnectionInput<'_>) {
    let config = input.config;
    let geometry = geometry(config);
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    let pool = Pool::format(region.memory(CoherenceMode::Coherent), geometry, 1)
        .expect("the harness geometry is valid");
    let metrics = Arc::new(Metrics::default());
    let mut state = BrokerState::new(pool.clone(), settings(config), Arc::clone(&metrics));
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, sequencer_config(config))
        .expect("a sequencer on a fresh pool");
    let mut rng = Rng::new(input.chunk_seed);
    let mut clients: Vec<Client> = input
        .streams
        .iter()
        .enumerate()
        .map(|(index, stream)| {
            let mut bytes = stream.to_vec();
            if config & REPAIR_BATCHES != 0 {
                fuzz_input::repair_batches(&mut bytes);
            }
            Client {
                connection: Connection::new(index as u64, &state, Timestamp::ZERO),
                script: Script {
                    input: bytes,
                    at: 0,
                    blocked: false,
                    closed: false,
                    output: Vec::new(),
                    rng: Rng::new(input.chunk_seed.wrapping_add(index as u8 + 1)),
                },
                reader: Reader::new(),
                open: true,
            }
        })
        .collect();
    let mut clock_ns = 0u64;
    let mut quiet = 0;
    let mut outcomes = Vec::new();
    for _ in 0..ROUNDS_MAX {
        let now = Timestamp::from_nanos(clock_ns);
        sequencer.refresh_topics().expect("topics readable");
        sequencer.poll(now);
        outcomes.clear();
        state.poll_outcomes(&mut outcomes);
        for outcome in &outcomes {
            // A closed connection's batches are in the log all the same; only the Ack is moot.
            if let Some(client) = clients.get_mut(outcome.conn as usize)
                && client.open
            {
                client.connection.on_outcome(outcome, &metrics, now);
            }
        }
        for client in clients.iter_mut().filter(|c| c.open) {
            let service =
                client
                    .connection
                    .service(&mut client.script, &mut state, now, true, true);
            client.reader.read(&client.script.output);
            if service.ended {
                client.connection.on_closed(&mut state);
                client.open = false;
                if !client.connection.has_output() {
                    assert!(
                        client.reader.decoder.at_frame_boundary(),
                        "the broker's output ends inside a frame"
                    );
                }
            }
        }
        let subscriptions = clients
            .iter()
            .filter(|c| c.open)
            .filter_map(|c| c.connection.subscription());
        state.publish_subscriptions(subscriptions, now);
        if clients.iter().all(|c| !c.open) {
            check_log(&pool);
            assert_eq!(
                metrics
                    .batches_dropped
                    .load(std::sync::atomic::Ordering::Relaxed),
                0,
                "a decision was dropped"
            );
            return;
        }
        let sent_all = clients
            .iter()
            .filter(|c| c.open)
            .all(|c| c.script.at == c.script.input.len());
        quiet = if sent_all && state.undecided() == 0 {
            quiet + 1
        } else {
            0
        };
        if quiet >= QUIET_ROUNDS {
            for client in &mut clients {
                client.script.closed = true;
            }
        }
        clock_ns += rng.below(200_000);
    }
    let stuck: Vec<String> = clients
        .iter()
        .enumerate()
        .filter(|(_, c)| c.open)
        .map(|(index, c)| {
            format!(
                "connection {index}: sent {} of {} bytes, waits for room {}, output queued {}, subscription {:?}",
                c.script.at,
                c.script.input.len(),
                c.connection.waits_for_room(),
                c.connection.has_output(),
                c.connection.subscription()
            )
        })
        .collect();
    panic!(
        "connections still open after {ROUNDS_MAX} rounds ({} batches undecided): the broker hangs\n{}",
        state.undecided(),
        stuck.join("\n")
    );
}

/// Every topic's retained log reads back intact, at contiguous positions.
fn check_log(pool: &Pool<shared_log::coherence::PoolMemory>) {
    for topic in pool.topics() {
        let mut reader = LogReader::new(pool.clone(), topic, true).expect("an existing topic");
        let start = reader.log_start();
        reader.seek(start).expect("the retained log starts here");
        let mut next = None;
        let result = reader.poll(usize::MAX, |batch| {
            if let Some(expected) = next {
                assert_eq!(batch.global_start, expected, "gap in the log");
            }
            next = Some(batch.global_start + u64::from(batch.message_count));
        });
        match result {
            Ok(_) | Err(ReadError::Truncated { .. }) => {}
            Err(e) => panic!("the log does not read back: {e}"),
        }
    }
}
