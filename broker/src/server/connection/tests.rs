//! Unit tests of the connection state machine, over an in-memory byte stream, with time
//! as an input.

use std::sync::Arc;

use wire::{BatchHeaderRepr, HelloRepr, Role, Topic};

use super::*;
use crate::server::limits::ClientLimits;
use crate::server::state::BrokerSettings;
use shared_log::coherence::PoolMemory;
use shared_log::sequencer::{Sequencer, SequencerConfig};

/// Everything to read at once, then `WouldBlock` (end of stream once `closed`); takes
/// all output, or none while `stalled` (a peer that does not read), and calls `during` as it
/// copies the first bytes (a writer lapping the log while the kernel copies a delivery).
struct Pipe {
    input: Vec<u8>,
    output: Vec<u8>,
    closed: bool,
    stalled: bool,
    during: Option<Box<dyn FnOnce()>>,
}

impl Pipe {
    fn new(input: Vec<u8>) -> Pipe {
        Pipe {
            input,
            output: Vec::new(),
            closed: false,
            stalled: false,
            during: None,
        }
    }
}

impl ByteStream for Pipe {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.drain(..n);
        Ok(n)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stalled {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.output.extend_from_slice(buf);
        if let Some(during) = self.during.take() {
            during();
        }
        Ok(buf.len())
    }
}

fn publisher_stream(seq: u64, goodbye: bool) -> Vec<u8> {
    publisher_stream_with_ack(seq, goodbye, AckLevel::Ordered)
}

fn publisher_stream_with_ack(seq: u64, goodbye: bool, ack: AckLevel) -> Vec<u8> {
    let hello = HelloRepr {
        role: Role::Publish,
        order: Order::TotalSessionFifo,
        ack,
        client_id: 7,
        session_epoch: 1,
        topic: Topic::new("gaps").unwrap(),
    };
    let mut payload = Vec::new();
    wire::payload::push_message(&mut payload, b"message");
    let header = BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default()).unwrap();
    let mut bytes = Frame::Hello(hello).to_bytes();
    bytes.extend_from_slice(&header.frame_prefix());
    bytes.extend_from_slice(&payload);
    if goodbye {
        bytes.extend_from_slice(&Frame::Goodbye.to_bytes());
    }
    bytes
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut at = 0;
    let mut frames = Vec::new();
    while at < bytes.len() {
        let (used, decoded) = decoder.decode(&bytes[at..]).unwrap();
        at += used;
        if let Decoded::Frame(frame) = decoded {
            frames.push(frame);
        }
    }
    frames
}

/// A head broker on a fresh one-broker heap pool whose topics are created on first use
/// with `replication_factor`, and its sequencer (hold timeout 1 us).
fn head_broker(
    replication_factor: u8,
) -> (BrokerState<PoolMemory>, Sequencer<PoolMemory>, Arc<Metrics>) {
    head_broker_with(replication_factor, ClientLimits::default())
}

fn head_broker_with(
    replication_factor: u8,
    limits: ClientLimits,
) -> (BrokerState<PoolMemory>, Sequencer<PoolMemory>, Arc<Metrics>) {
    let pool = shared_log::heap::small_test_pool();
    let settings = BrokerSettings {
        broker_id: 0,
        head: true,
        auto_create_topics: true,
        batch_bytes_max: 16 * 1024,
        frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
        replication_factor,
        limits,
        history_dir: None,
    };
    let metrics = Arc::new(Metrics::default());
    let state = BrokerState::new(pool.clone(), settings, Arc::clone(&metrics));
    let config = SequencerConfig {
        hold_timeout_ns: 1_000,
        ..SequencerConfig::default()
    };
    let sequencer = Sequencer::new(pool, 0, 1, config).unwrap();
    (state, sequencer, metrics)
}

/// A publisher Hello (client `client_id`, order 2, ack 1, topic "gaps") and the frame
/// prefix of batch `seq` of one message of `message_bytes`, and that batch's payload.
fn hello_and_batch(client_id: u64, seq: u64, message_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let hello = HelloRepr {
        role: Role::Publish,
        order: Order::Total,
        ack: AckLevel::Ordered,
        client_id,
        session_epoch: 1,
        topic: Topic::new("gaps").unwrap(),
    };
    let mut payload = Vec::new();
    wire::payload::push_message(&mut payload, &vec![client_id as u8; message_bytes]);
    let header = BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default()).unwrap();
    let mut bytes = Frame::Hello(hello).to_bytes();
    bytes.extend_from_slice(&header.frame_prefix());
    (bytes, payload)
}

fn error_codes(bytes: &[u8]) -> Vec<(ErrorCode, Option<u64>)> {
    frames(bytes)
        .into_iter()
        .filter_map(|frame| match frame {
            Frame::Error(error) => Some((error.code, error.batch_seq)),
            _ => None,
        })
        .collect()
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn the_handshake_deadline_fires_at_its_time_and_not_before() {
    let (mut state, _sequencer, metrics) = head_broker(1);
    let start = Timestamp::ZERO;
    let mut connection = Connection::new(1, &state, start);
    let mut pipe = Pipe::new(Vec::new());
    let service = connection.service(&mut pipe, &mut state, start + 4_999 * MS, true, true);
    assert!(!service.ended && pipe.output.is_empty());
    let service = connection.service(&mut pipe, &mut state, start + 5_000 * MS, true, true);
    assert!(service.ended);
    assert_eq!(
        error_codes(&pipe.output),
        [(ErrorCode::DeadlineExpired, None)]
    );
    assert_eq!(metrics.hello_deadlines_expired.load(Ordering::Relaxed), 1);
}

#[test]
fn a_batch_slower_than_its_deadline_is_dropped_and_its_room_given_back() {
    let limits = ClientLimits {
        batch_grace_ms: 100,
        batch_min_bytes_per_s: 1 << 20,
        ..ClientLimits::default()
    };
    let (mut state, _sequencer, metrics) = head_broker_with(1, limits);
    let start = Timestamp::ZERO;
    let (mut bytes, payload) = hello_and_batch(7, 0, 8 * 1024);
    bytes.extend_from_slice(&payload[..100]);
    let mut connection = Connection::new(1, &state, start);
    let mut pipe = Pipe::new(bytes);
    connection.service(&mut pipe, &mut state, start, true, true);
    let writer = |state: &BrokerState<PoolMemory>| state.in_flight(0);
    assert_eq!(writer(&state), 1, "the batch has its room");
    // 100 ms of grace plus 8 KiB at 1 MiB/s: 107.8 ms.
    let service = connection.service(&mut pipe, &mut state, start + 107 * MS, true, true);
    assert!(!service.ended);
    let service = connection.service(&mut pipe, &mut state, start + 108 * MS, true, true);
    assert!(service.ended);
    assert_eq!(
        error_codes(&pipe.output),
        [(ErrorCode::DeadlineExpired, Some(0))]
    );
    assert_eq!(writer(&state), 0, "the room is given back");
    assert_eq!(metrics.batch_deadlines_expired.load(Ordering::Relaxed), 1);
}

#[test]
fn a_slow_batch_moves_to_staging_only_when_room_is_short_and_lands_whole() {
    let limits = ClientLimits {
        batch_grace_ms: 60_000,
        batch_hold_ms: 10,
        ..ClientLimits::default()
    };
    let (mut state, mut sequencer, metrics) = head_broker_with(1, limits);
    let start = Timestamp::ZERO;
    let (mut slow_bytes, slow_payload) = hello_and_batch(7, 0, 8 * 1024);
    slow_bytes.extend_from_slice(&slow_payload[..100]);
    let mut slow = Connection::new(1, &state, start);
    let mut slow_pipe = Pipe::new(slow_bytes);
    slow.service(&mut slow_pipe, &mut state, start, true, true);
    // Slow, but nobody is short of room: it stays where it is.
    slow.service(&mut slow_pipe, &mut state, start + 50 * MS, true, true);
    assert_eq!(metrics.batches_staged.load(Ordering::Relaxed), 0);
    // Another publisher fills the 64 KiB log until it must wait for room.
    let (mut fast_bytes, fast_payload) = hello_and_batch(8, 0, 8 * 1024);
    for seq in 0..8u64 {
        if seq > 0 {
            let header =
                BatchHeaderRepr::for_payload(seq, 1, &fast_payload, &Limits::default()).unwrap();
            fast_bytes.extend_from_slice(&header.frame_prefix());
        }
        fast_bytes.extend_from_slice(&fast_payload);
    }
    let mut fast = Connection::new(2, &state, start);
    let mut fast_pipe = Pipe::new(fast_bytes);
    fast.service(&mut fast_pipe, &mut state, start + 50 * MS, true, true);
    assert!(fast.waits_for_room(), "the log is full");
    // Now the slow batch gives its room back and goes on arriving in staging.
    slow.service(&mut slow_pipe, &mut state, start + 60 * MS, true, true);
    assert_eq!(metrics.batches_staged.load(Ordering::Relaxed), 1);
    assert_eq!(state.staging_bytes(), slow_payload.len() as u64);
    slow_pipe.input.extend_from_slice(&slow_payload[100..]);
    let mut outcomes = Vec::new();
    sequencer.refresh_topics().unwrap();
    for round in 0..20u64 {
        let now = start + (70 + round as u32) * MS;
        for (connection, pipe) in [(&mut fast, &mut fast_pipe), (&mut slow, &mut slow_pipe)] {
            connection.service(pipe, &mut state, now, true, true);
        }
        sequencer.poll(Timestamp::from_nanos(round));
        outcomes.clear();
        state.poll_outcomes(&mut outcomes);
        for outcome in &outcomes {
            let connection = if outcome.conn == 1 {
                &mut slow
            } else {
                &mut fast
            };
            connection.on_outcome(outcome, &metrics, now);
        }
    }
    let acks = |bytes: &[u8]| {
        frames(bytes)
            .into_iter()
            .filter_map(|frame| match frame {
                Frame::Ack(ack) => Some(ack.acked_through_seq()),
                _ => None,
            })
            .max()
    };
    assert_eq!(
        acks(&slow_pipe.output),
        Some(0),
        "the staged batch is in the log"
    );
    assert_eq!(acks(&fast_pipe.output), Some(7));
    assert_eq!(state.staging_bytes(), 0, "staging is given back");
    assert_eq!(metrics.staging_bytes.load(Ordering::Relaxed), 0);
    // The bytes in the log are the publisher's.
    let mut reader = LogReader::new(state.pool().clone(), 0, true).unwrap();
    reader.seek(reader.log_start()).unwrap();
    let mut found = false;
    reader
        .poll(64, |batch| {
            if batch.client_id == 7 {
                found = batch.payload == &slow_payload[..];
            }
        })
        .unwrap();
    assert!(found, "the staged batch landed whole");
}

#[test]
fn a_closing_connection_whose_peer_takes_nothing_is_dropped_at_the_close_deadline() {
    let (mut state, _sequencer, metrics) = head_broker(1);
    let start = Timestamp::ZERO;
    let mut connection = Connection::new(1, &state, start);
    let mut pipe = Pipe::new(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    pipe.stalled = true;
    let service = connection.service(&mut pipe, &mut state, start, true, true);
    assert!(!service.ended, "the Error is queued, not sent");
    let service = connection.service(&mut pipe, &mut state, start + 9_999 * MS, true, true);
    assert!(!service.ended);
    let service = connection.service(&mut pipe, &mut state, start + 10_000 * MS, true, true);
    assert!(service.ended, "dropped at the close deadline");
    assert_eq!(metrics.close_deadlines_expired.load(Ordering::Relaxed), 1);
}

#[test]
fn a_publisher_closing_after_goodbye_ends_a_connection_waiting_for_replicas() {
    // Found by fuzzing: after Goodbye the broker stopped reading, so a publisher whose
    // ack-2 Acks waited for replicas that never came could close its end and the broker
    // kept the connection forever.
    let (mut state, mut sequencer, metrics) = head_broker(2);
    let now = Timestamp::ZERO;
    let mut connection = Connection::new(1, &state, Timestamp::ZERO);
    let mut pipe = Pipe::new(publisher_stream_with_ack(0, true, AckLevel::Replicated));
    let service = connection.service(&mut pipe, &mut state, now, true, true);
    assert!(!service.ended);
    sequencer.refresh_topics().unwrap();
    sequencer.poll(Timestamp::ZERO);
    let mut outcomes = Vec::new();
    state.poll_outcomes(&mut outcomes);
    assert_eq!(outcomes.len(), 1, "the batch was ordered");
    connection.on_outcome(&outcomes[0], &metrics, now);
    let service = connection.service(&mut pipe, &mut state, now, true, true);
    assert!(
        !service.ended,
        "no replica holds the batch: the Ack still waits"
    );
    assert!(connection.awaits_durability());
    pipe.closed = true;
    let service = connection.service(&mut pipe, &mut state, now, true, true);
    assert!(service.ended, "the publisher closed its end");
    connection.on_closed(&mut state);
    let frames = frames(&pipe.output);
    assert!(matches!(frames[..], [Frame::HelloOk(_)]), "{frames:?}");
}

#[test]
fn a_batch_completed_after_the_claim_was_taken_over_is_neither_published_nor_acked() {
    use shared_log::claim::{test_claimant as claimant, try_claim};
    let (state, mut sequencer, _metrics) = head_broker(1);
    let pool = state.pool().clone();
    try_claim(&pool, 0, 0, &claimant(0x11)).unwrap();
    let mut state = state.with_claim_token(0x11);
    // This broker was paused past its lease; another process took broker id 0 over.
    try_claim(&pool, 0, 0x11, &claimant(0x22)).unwrap();
    let mut connection = Connection::new(1, &state, Timestamp::ZERO);
    let mut pipe = Pipe::new(publisher_stream(0, false));
    let service = connection.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    assert!(service.ended, "the connection ends");
    assert_eq!(
        state.claim_moved(),
        Some(ClaimMoved {
            broker: 0,
            owner: 0x22
        }),
        "the loop is told to end the broker"
    );
    sequencer.refresh_topics().unwrap();
    assert_eq!(sequencer.poll(Timestamp::ZERO), 0, "nothing was published");
    let frames = frames(&pipe.output);
    assert!(
        matches!(frames[..], [Frame::HelloOk(_)]),
        "no Ack: {frames:?}"
    );
}

#[test]
fn bytes_after_a_publishers_goodbye_are_refused() {
    let (mut state, _sequencer, _metrics) = head_broker(2);
    let mut input = publisher_stream_with_ack(0, true, AckLevel::Replicated);
    input.extend_from_slice(&Frame::Goodbye.to_bytes());
    let mut connection = Connection::new(1, &state, Timestamp::ZERO);
    let mut pipe = Pipe::new(input);
    connection.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    let frames = frames(&pipe.output);
    assert!(
        matches!(&frames[..], [Frame::HelloOk(_), Frame::Error(e)] if e.code == ErrorCode::UnexpectedFrame),
        "{frames:?}"
    );
}

#[test]
fn a_gap_error_for_the_last_batch_after_goodbye_precedes_the_goodbye() {
    // Found by fuzzing: the Goodbye owed after the last batch went out before the
    // SessionGapSkipped Error for that batch, so the Error followed the Goodbye.
    let (mut state, mut sequencer, metrics) = head_broker(1);
    let now = Timestamp::ZERO;
    // Batch 1 of the session arrives first and is ordered once the gap rule gives up on 0.
    let mut first = Connection::new(1, &state, Timestamp::ZERO);
    let mut first_pipe = Pipe::new(publisher_stream(1, false));
    first.service(&mut first_pipe, &mut state, now, true, true);
    sequencer.refresh_topics().unwrap();
    sequencer.poll(Timestamp::ZERO);
    sequencer.poll(Timestamp::from_nanos(10_000));
    // Batch 0 arrives late on another connection that then says goodbye.
    let mut late = Connection::new(2, &state, Timestamp::ZERO);
    let mut late_pipe = Pipe::new(publisher_stream(0, true));
    late.service(&mut late_pipe, &mut state, now, true, true);
    sequencer.poll(Timestamp::from_nanos(20_000));
    let mut outcomes = Vec::new();
    state.poll_outcomes(&mut outcomes);
    for outcome in &outcomes {
        let connection = if outcome.conn == 1 {
            &mut first
        } else {
            &mut late
        };
        connection.on_outcome(outcome, &metrics, now);
    }
    let service = late.service(&mut late_pipe, &mut state, now, false, true);
    assert!(service.ended);
    let frames = frames(&late_pipe.output);
    assert!(matches!(frames[0], Frame::HelloOk(_)), "{frames:?}");
    assert!(
        matches!(&frames[1], Frame::Error(e) if e.code == ErrorCode::SessionGapSkipped && e.batch_seq == Some(0)),
        "{frames:?}"
    );
    assert!(
        matches!(&frames[2], Frame::Ack(ack) if ack.acked_through_seq() == 0 && ack.entries().is_empty()),
        "{frames:?}"
    );
    assert_eq!(frames[3..], [Frame::Goodbye], "{frames:?}");
}

/// A subscriber Hello for topic "gaps" from `from_position`.
fn subscriber_hello(from_position: u64) -> Vec<u8> {
    Frame::Hello(HelloRepr {
        role: Role::Subscribe {
            from_position,
            batch_bytes_max: 0,
        },
        order: Order::TotalSessionFifo,
        ack: AckLevel::FireAndForget,
        client_id: 8,
        session_epoch: 1,
        topic: Topic::new("gaps").unwrap(),
    })
    .to_bytes()
}

/// Publishes and orders one batch on "gaps", then moves the writer's overwrite limit past
/// it (returned as a closure: the lap), as a writer that wrapped the log would.
fn one_batch_and_a_lap(
    state: &mut BrokerState<PoolMemory>,
    sequencer: &mut Sequencer<PoolMemory>,
) -> impl FnOnce() + 'static {
    let mut publisher = Connection::new(1, state, Timestamp::ZERO);
    let mut pipe = Pipe::new(publisher_stream(0, false));
    publisher.service(&mut pipe, state, Timestamp::ZERO, true, true);
    sequencer.refresh_topics().unwrap();
    assert_eq!(sequencer.poll(Timestamp::ZERO), 1, "the batch was ordered");
    let pool = state.pool().clone();
    move || {
        let offset = pool
            .geometry()
            .frontier_offset(0, 0, shared_log::layout::FRONTIER_WRITTEN);
        let (next, _) = pool.read_frontier(offset);
        pool.write_frontier(offset, next, u64::MAX);
    }
}

#[test]
fn a_delivery_overwritten_while_it_is_sent_resets_the_connection() {
    let (mut state, mut sequencer, metrics) = head_broker(1);
    let lap = one_batch_and_a_lap(&mut state, &mut sequencer);
    let mut subscriber = Connection::new(2, &state, Timestamp::ZERO);
    // The socket takes the HelloOk and the delivery, and the log is overwritten while it
    // copies them.
    let mut pipe = Pipe::new(subscriber_hello(0));
    pipe.during = Some(Box::new(lap));
    let service = subscriber.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    assert!(service.ended, "the connection ends at once");
    assert!(subscriber.must_reset(), "with a reset, so nothing follows");
    assert_eq!(metrics.deliveries_torn.load(Ordering::Relaxed), 1);
}

#[test]
fn a_queued_delivery_overwritten_before_it_is_sent_is_reported_and_never_sent() {
    let (mut state, mut sequencer, _metrics) = head_broker(1);
    let lap = one_batch_and_a_lap(&mut state, &mut sequencer);
    let mut subscriber = Connection::new(2, &state, Timestamp::ZERO);
    // The delivery is queued while the subscriber's socket takes nothing.
    let mut pipe = Pipe::new(subscriber_hello(0));
    pipe.stalled = true;
    subscriber.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    assert!(subscriber.has_output() && pipe.output.is_empty());
    lap();
    pipe.stalled = false;
    let service = subscriber.service(&mut pipe, &mut state, Timestamp::ZERO, false, true);
    assert!(service.ended && !subscriber.must_reset());
    let frames = frames(&pipe.output);
    assert!(
        matches!(&frames[..], [Frame::HelloOk(_), Frame::Error(e)] if e.code == ErrorCode::PositionTruncated),
        "{frames:?}"
    );
}

#[test]
fn a_subscriber_from_a_position_inside_a_batch_gets_the_batch_from_that_position_on() {
    let (mut state, mut sequencer, _metrics) = head_broker(1);
    // One batch of five messages, positions 0..5.
    let hello = HelloRepr {
        role: Role::Publish,
        order: Order::TotalSessionFifo,
        ack: AckLevel::Ordered,
        client_id: 7,
        session_epoch: 1,
        topic: Topic::new("gaps").unwrap(),
    };
    let mut payload = Vec::new();
    for i in 0..5u8 {
        wire::payload::push_message(&mut payload, &[i; 10]);
    }
    let header = BatchHeaderRepr::for_payload(0, 5, &payload, &Limits::default()).unwrap();
    let mut bytes = Frame::Hello(hello).to_bytes();
    bytes.extend_from_slice(&header.frame_prefix());
    bytes.extend_from_slice(&payload);
    let mut publisher = Connection::new(1, &state, Timestamp::ZERO);
    publisher.service(
        &mut Pipe::new(bytes),
        &mut state,
        Timestamp::ZERO,
        true,
        true,
    );
    sequencer.refresh_topics().unwrap();
    assert_eq!(sequencer.poll(Timestamp::ZERO), 1);

    let mut subscriber = Connection::new(2, &state, Timestamp::ZERO);
    let mut pipe = Pipe::new(subscriber_hello(3));
    subscriber.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    let mut decoder = FrameDecoder::new(Limits::default());
    let (mut at, mut deliveries, mut received) = (0, Vec::new(), Vec::new());
    while at < pipe.output.len() {
        let (used, decoded) = decoder.decode(&pipe.output[at..]).unwrap();
        at += used;
        match decoded {
            Decoded::Delivery(header) => deliveries.push(header),
            Decoded::Payload { bytes, .. } => received.extend_from_slice(bytes),
            _ => {}
        }
    }
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].global_start, Some(3));
    assert_eq!(deliveries[0].message_count, 2);
    wire::verify_payload(&deliveries[0], &received).unwrap();
    let messages: Vec<&[u8]> = wire::payload::messages(&received)
        .map(Result::unwrap)
        .collect();
    assert_eq!(messages, [&[3u8; 10][..], &[4u8; 10][..]]);
}

/// Writes `bytes` where the connection's payload target says, as the bypass transport's
/// receive does, and books them.
fn place(
    connection: &mut Connection<PoolMemory>,
    state: &mut BrokerState<PoolMemory>,
    bytes: &[u8],
    now: Timestamp,
) {
    let target = connection
        .payload_target(state)
        .expect("a payload is being received");
    // SAFETY: the slice is gone before the connection is serviced again (end of this block).
    let slice = unsafe { target.into_slice() };
    slice[..bytes.len()].copy_from_slice(bytes);
    connection.payload_placed(bytes.len(), state, now);
}

/// A head broker and a publisher connection that has its batch's room and awaits the
/// payload (of one 8 KiB message).
struct AwaitingPayload {
    state: BrokerState<PoolMemory>,
    _sequencer: Sequencer<PoolMemory>,
    metrics: Arc<Metrics>,
    connection: Connection<PoolMemory>,
    pipe: Pipe,
    payload: Vec<u8>,
}

fn publisher_awaiting_payload() -> AwaitingPayload {
    let (mut state, _sequencer, metrics) = head_broker(1);
    let (bytes, payload) = hello_and_batch(7, 0, 8 * 1024);
    let mut connection = Connection::new(1, &state, Timestamp::ZERO);
    let mut pipe = Pipe::new(bytes);
    connection.service(&mut pipe, &mut state, Timestamp::ZERO, true, true);
    AwaitingPayload {
        state,
        _sequencer,
        metrics,
        connection,
        pipe,
        payload,
    }
}

#[test]
fn the_checksum_taken_chunk_by_chunk_catches_a_corrupted_chunk_whichever_path_it_took() {
    for corrupted in [None, Some(1), Some(2)] {
        let mut t = publisher_awaiting_payload();
        let start = Timestamp::ZERO;
        // Chunks alternate between the stream (copied) and the target (placed).
        let chunks = [0..1000, 1000..3000, 3000..5000, 5000..t.payload.len()];
        for (index, range) in chunks.iter().enumerate() {
            let mut chunk = t.payload[range.clone()].to_vec();
            if corrupted == Some(index) {
                chunk[17] ^= 0x40;
            }
            if index % 2 == 1 {
                place(&mut t.connection, &mut t.state, &chunk, start);
            } else {
                t.pipe.input.extend_from_slice(&chunk);
            }
            t.connection
                .service(&mut t.pipe, &mut t.state, start, true, true);
        }
        let errors = error_codes(&t.pipe.output);
        match corrupted {
            None => {
                assert_eq!(errors, []);
                assert_eq!(t.metrics.batches_received.load(Ordering::Relaxed), 1);
            }
            Some(chunk) => {
                assert_eq!(
                    errors,
                    [(ErrorCode::ChecksumMismatch, None)],
                    "chunk {chunk} corrupted"
                );
                assert_eq!(t.metrics.batches_received.load(Ordering::Relaxed), 0);
                assert_eq!(t.state.in_flight(0), 0, "the room is given back");
            }
        }
    }
}

#[test]
fn payload_placed_by_the_transport_is_counted_once_and_the_stream_goes_on_after_it() {
    let mut t = publisher_awaiting_payload();
    let start = Timestamp::ZERO;
    let target = t.connection.payload_target(&t.state).expect("receiving");
    assert_eq!(
        // SAFETY: the slice is dropped at once, unused.
        unsafe { target.into_slice() }.len(),
        t.payload.len()
    );
    place(&mut t.connection, &mut t.state, &t.payload[..3000], start);
    assert_eq!(
        t.metrics.bytes_received_direct.load(Ordering::Relaxed),
        3000
    );
    let target = t
        .connection
        .payload_target(&t.state)
        .expect("still receiving");
    // SAFETY: the slice is dropped at once, unused.
    let rest = unsafe { target.into_slice() }.len();
    assert_eq!(
        rest,
        t.payload.len() - 3000,
        "the placed bytes are booked once"
    );
    // The rest placed too: the batch completes without a read from the stream.
    place(&mut t.connection, &mut t.state, &t.payload[3000..], start);
    assert_eq!(t.metrics.batches_received.load(Ordering::Relaxed), 1);
    assert!(
        t.connection.payload_target(&t.state).is_none(),
        "no batch now"
    );
    // The next batch's header and payload come from the stream, in step.
    let header = BatchHeaderRepr::for_payload(1, 1, &t.payload, &Limits::default()).unwrap();
    t.pipe.input.extend_from_slice(&header.frame_prefix());
    t.pipe.input.extend_from_slice(&t.payload);
    t.connection
        .service(&mut t.pipe, &mut t.state, start, true, true);
    assert_eq!(error_codes(&t.pipe.output), []);
    assert_eq!(t.metrics.batches_received.load(Ordering::Relaxed), 2);
    assert_eq!(
        t.metrics.bytes_received.load(Ordering::Relaxed),
        2 * t.payload.len() as u64
    );
    assert_eq!(
        t.metrics.bytes_received_direct.load(Ordering::Relaxed),
        t.payload.len() as u64
    );
}
