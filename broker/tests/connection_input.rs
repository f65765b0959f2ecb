//! The broker's connection state machine against arbitrary input: random bytes, and valid
//! frame streams with random corruption, arriving in random chunk sizes. Whatever comes in,
//! the broker never panics, everything it sends is a well-formed frame, and a closing error
//! really ends the connection.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use broker::metrics::Metrics;
use broker::server::connection::{ByteStream, Connection, InputState};
use broker::server::limits::ClientLimits;
use broker::server::state::{BrokerSettings, BrokerState};
use proptest::prelude::*;
use shared_log::coherence::CoherenceMode;
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::Pool;
use shared_log::sequencer::{Sequencer, SequencerConfig};
use units::Timestamp;
use wire::{
    AckLevel, BatchHeaderRepr, Decoded, Frame, FrameDecoder, HelloRepr, Limits, Order, Role, Topic,
};

/// Input in chunks of given sizes, `WouldBlock` between chunks; output collected.
struct Script {
    chunks: VecDeque<Vec<u8>>,
    output: Vec<u8>,
}

impl ByteStream for Script {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(chunk) = self.chunks.front_mut() else {
            return Ok(0);
        };
        if chunk.is_empty() {
            self.chunks.pop_front();
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        chunk.drain(..n);
        Ok(n)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
}

fn valid_stream(batches: &[Vec<Vec<u8>>]) -> Vec<u8> {
    let hello = HelloRepr {
        role: Role::Publish,
        order: Order::TotalSessionFifo,
        ack: AckLevel::Ordered,
        client_id: 3,
        session_epoch: 1,
        topic: Topic::new("fuzz").unwrap(),
    };
    let mut bytes = Frame::Hello(hello).to_bytes();
    for (seq, messages) in batches.iter().enumerate() {
        let mut payload = Vec::new();
        for message in messages {
            wire::payload::push_message(&mut payload, message);
        }
        let header = BatchHeaderRepr::for_payload(
            seq as u64,
            messages.len() as u32,
            &payload,
            &Limits::default(),
        )
        .unwrap();
        bytes.extend_from_slice(&header.frame_prefix());
        bytes.extend_from_slice(&payload);
    }
    bytes.extend_from_slice(&Frame::Goodbye.to_bytes());
    bytes
}

/// Feeds `input` in chunks of `cuts` sizes to a fresh connection of a fresh broker, checks
/// what comes out, and returns the control frames the broker sent.
fn run(input: Vec<u8>, cuts: Vec<usize>) -> Vec<Frame> {
    let geometry = Geometry {
        brokers_max: 1,
        topics_max: 2,
        ring_slots: 8,
        goi_entries: 64,
        blog_bytes: 64 * 1024,
    };
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    let pool = Pool::format(region.memory(CoherenceMode::Coherent), geometry, 1).unwrap();
    let settings = BrokerSettings {
        broker_id: 0,
        head: true,
        auto_create_topics: true,
        batch_bytes_max: 16 * 1024,
        frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
        replication_factor: 1,
        limits: ClientLimits::default(),
        history_dir: None,
    };
    let metrics = Arc::new(Metrics::default());
    let mut state = BrokerState::new(pool.clone(), settings, Arc::clone(&metrics));
    let mut sequencer = Sequencer::new(pool, 0, 1, SequencerConfig::default()).unwrap();
    let now = Timestamp::ZERO;
    let mut connection = Connection::new(1, &state, now);
    let mut chunks = VecDeque::new();
    let mut rest = &input[..];
    for cut in cuts.into_iter().chain(std::iter::repeat(usize::MAX)) {
        if rest.is_empty() {
            break;
        }
        let n = cut.clamp(1, rest.len());
        chunks.push_back(rest[..n].to_vec());
        chunks.push_back(Vec::new());
        rest = &rest[n..];
    }
    let mut stream = Script {
        chunks,
        output: Vec::new(),
    };
    let mut outcomes = Vec::new();
    for _ in 0..10_000 {
        let input = connection.on_readable(&mut stream, &mut state, now);
        sequencer.refresh_topics().unwrap();
        sequencer.poll(now);
        outcomes.clear();
        state.poll_outcomes(&mut outcomes);
        for outcome in &outcomes {
            connection.on_outcome(outcome, &metrics, now);
        }
        connection.flush_acks();
        assert!(connection.on_writable(&mut stream, &metrics));
        if input == InputState::Ended || connection.is_finished() {
            break;
        }
    }
    // Everything the broker sent parses as frames, and nothing follows a closing error.
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut at = 0;
    let mut closed_by = None;
    let mut frames = Vec::new();
    while at < stream.output.len() {
        let (consumed, decoded) = decoder
            .decode(&stream.output[at..])
            .unwrap_or_else(|e| panic!("the broker sent a malformed frame: {e}"));
        at += consumed;
        match decoded {
            Decoded::Frame(frame) => {
                assert!(
                    closed_by.is_none(),
                    "frames after a closing error {closed_by:?}"
                );
                if let Frame::Error(error) = &frame {
                    if error.code.closes_connection() {
                        closed_by = Some(error.code);
                    }
                }
                frames.push(frame);
            }
            Decoded::NeedMore(_) => panic!("the broker sent a truncated frame"),
            other => panic!("the broker sent {other:?} to a publisher"),
        }
    }
    if closed_by.is_some() {
        assert!(
            connection.is_finished(),
            "a closing error must end the connection"
        );
    }
    assert_eq!(
        metrics
            .batches_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    frames
}

fn messages() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    prop::collection::vec(
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
        0..12,
    )
}

#[test]
fn a_batch_numbered_u64_max_is_refused() {
    // Found by the `connection` fuzz target: the broker's next-sequence bookkeeping for the
    // session overflowed on it.
    let mut input = valid_stream(&[vec![b"x".to_vec()]]);
    let hello_bytes = input.len() - wire::BATCH_PREFIX_BYTES - 5 - wire::FRAME_HEADER_BYTES;
    let seq = hello_bytes + wire::FRAME_HEADER_BYTES;
    input[seq..seq + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let frames = run(input, Vec::new());
    assert!(
        matches!(frames.first(), Some(Frame::HelloOk(_))),
        "{frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == wire::ErrorCode::InvalidBatchHeader),
        "{frames:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_break_the_broker(
        input in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(1usize..64, 0..64),
    ) {
        run(input, cuts);
    }

    #[test]
    fn corrupted_valid_streams_never_break_the_broker(
        batches in messages(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        truncate in any::<Option<prop::sample::Index>>(),
        cuts in prop::collection::vec(1usize..4096, 0..64),
    ) {
        let mut input = valid_stream(&batches);
        for (index, value) in flips {
            let at = index.index(input.len());
            input[at] ^= value.max(1);
        }
        if let Some(index) = truncate {
            input.truncate(index.index(input.len()));
        }
        run(input, cuts);
    }

    #[test]
    fn valid_streams_are_fully_acknowledged(batches in messages(), cuts in prop::collection::vec(1usize..4096, 0..64)) {
        let count = batches.len() as u64;
        prop_assume!(count > 0);
        let frames = run(valid_stream(&batches), cuts);
        prop_assert!(matches!(frames.first(), Some(Frame::HelloOk(_))), "{frames:?}");
        prop_assert!(matches!(frames.last(), Some(Frame::Goodbye)), "{frames:?}");
        prop_assert!(!frames.iter().any(|f| matches!(f, Frame::Error(_))), "{frames:?}");
        let mut acked = Vec::new();
        for frame in &frames {
            if let Frame::Ack(ack) = frame {
                acked.extend(ack.entries().iter().map(|e| e.batch_seq));
            }
        }
        prop_assert_eq!(acked, (0..count).collect::<Vec<_>>(), "every batch acknowledged once, in order");
    }
}
