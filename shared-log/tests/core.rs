//! The log core on real memory with the real non-coherent instructions: ordering, ACK
//! outcomes, backpressure, and every bad input named in the design (each gives a specific
//! error and corrupts nothing).

use std::sync::Arc;
use std::time::Duration;

use shared_log::Order;
use shared_log::coherence::{CoherenceMode, PoolMemory, SharedMemory};
use shared_log::heap::HeapRegion;
use shared_log::layout::CompletionStatus;
use shared_log::layout::{
    BatchHeader, FRONTIER_WRITTEN, Geometry, LAYOUT_VERSION, PoolHeader, Record,
};
use shared_log::pool::{Pool, PoolError, TopicConfig, publish};
use shared_log::reader::{LogReader, ReadError};
use shared_log::sequencer::{Sequencer, SequencerConfig};
use shared_log::writer::{AppendError, BatchMeta, SlotOutcome, TopicWriter, WriterError};
use units::Timestamp;
const MODE: CoherenceMode = CoherenceMode::NonCoherent;

fn geometry() -> Geometry {
    Geometry {
        brokers_max: 4,
        topics_max: 2,
        ring_slots: 8,
        goi_entries: 256,
        blog_bytes: 64 * 1024,
    }
}

fn new_pool(geometry: Geometry) -> (Arc<HeapRegion>, Pool<PoolMemory>) {
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    let pool = Pool::format(region.memory(MODE), geometry, 7).unwrap();
    (region, pool)
}

fn config(order: Order) -> TopicConfig {
    TopicConfig {
        order,
        ack: 1,
        replication_factor: 1,
        retention: shared_log::Retention::StallLimited,
        history: shared_log::HistoryRetention::UNLIMITED,
    }
}

fn payload(tag: u8, messages: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    for i in 0..messages {
        wire::payload::push_message(&mut payload, &vec![tag.wrapping_add(i as u8); 10 + i]);
    }
    payload
}

fn meta(client_id: u64, batch_seq: u64, payload: &[u8], messages: u32) -> BatchMeta {
    BatchMeta {
        client_id,
        session_epoch: 1,
        batch_seq,
        message_count: messages,
        checksum: wire::payload::checksum(payload),
        flags: 0,
    }
}

fn outcomes<M: SharedMemory>(writer: &mut TopicWriter<M>) -> Vec<SlotOutcome> {
    let mut out = Vec::new();
    writer.poll_completions(usize::MAX, |o| out.push(o));
    out
}

fn read_all(pool: &Pool<PoolMemory>, topic: u32) -> Vec<(u64, u64, u64, Vec<u8>)> {
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    let mut batches = Vec::new();
    reader
        .poll(usize::MAX, |b| {
            batches.push((b.global_start, b.client_id, b.batch_seq, b.payload.to_vec()))
        })
        .unwrap();
    batches
}

#[test]
fn four_brokers_one_total_order_with_intact_bytes() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("orders", config(Order::Total)).unwrap();
    let mut writers: Vec<_> = (0..4)
        .map(|b| TopicWriter::new(pool.clone(), topic, b).unwrap())
        .collect();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut sent = Vec::new();
    for seq in 0..6u64 {
        for (b, writer) in writers.iter_mut().enumerate() {
            let client = b as u64;
            let data = payload(seq as u8 * 16 + b as u8, 1 + b);
            writer
                .append(meta(client, seq, &data, 1 + b as u32), &data)
                .unwrap();
            sent.push((client, seq, data));
        }
    }
    assert_eq!(sequencer.poll(Timestamp::from_nanos(1)), 24);
    let log = read_all(&pool, topic);
    assert_eq!(log.len(), 24);
    let mut position = 0;
    for (start, client, seq, bytes) in &log {
        assert_eq!(*start, position, "no gaps in global positions");
        let (_, _, data) = sent
            .iter()
            .find(|(c, s, _)| c == client && s == seq)
            .expect("every batch in the log was sent");
        assert_eq!(bytes, data, "bytes intact");
        position += *client + 1;
    }
    // Every broker learns the position of each of its batches, in its ring's order.
    for writer in &mut writers {
        let done = outcomes(writer);
        assert_eq!(done.len(), 6);
        assert!(done.iter().all(|o| o.status == CompletionStatus::Ordered));
        assert!(
            done.windows(2)
                .all(|w| w[0].global_start < w[1].global_start)
        );
    }
    // A second reader (another agent) sees the same order.
    assert_eq!(read_all(&pool, topic), log);
}

#[test]
fn duplicate_is_acknowledged_with_the_original_position_and_not_ordered_twice() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("dups", config(Order::TotalSessionFifo))
        .unwrap();
    let mut first = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let mut second = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let data = payload(1, 2);
    first.append(meta(9, 0, &data, 2), &data).unwrap();
    sequencer.poll(Timestamp::ZERO);
    second.append(meta(9, 0, &data, 2), &data).unwrap();
    sequencer.poll(Timestamp::ZERO);
    assert_eq!(
        outcomes(&mut first),
        vec![SlotOutcome {
            slot: 0,
            status: CompletionStatus::Ordered,
            global_start: Some(0)
        }]
    );
    assert_eq!(
        outcomes(&mut second),
        vec![SlotOutcome {
            slot: 0,
            status: CompletionStatus::Duplicate,
            global_start: Some(0)
        }]
    );
    assert_eq!(read_all(&pool, topic).len(), 1);
}

#[test]
fn order5_holds_a_gap_then_applies_the_gap_rule_and_rejects_the_late_batch() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("fifo", config(Order::TotalSessionFifo))
        .unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let config = SequencerConfig {
        hold_timeout_ns: 1_000,
        ..SequencerConfig::default()
    };
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    let (one, two) = (payload(1, 1), payload(2, 1));
    writer.append(meta(5, 1, &one, 1), &one).unwrap();
    writer.append(meta(5, 2, &two, 1), &two).unwrap();
    sequencer.poll(Timestamp::ZERO);
    assert_eq!(sequencer.stats().held, 2, "seq 1 and 2 wait for seq 0");
    assert!(outcomes(&mut writer).is_empty());
    sequencer.poll(Timestamp::from_nanos(999));
    assert_eq!(sequencer.stats().held, 2, "not yet timed out");
    sequencer.poll(Timestamp::from_nanos(1_000));
    assert_eq!(sequencer.stats().gaps_resolved, 1);
    assert_eq!(sequencer.stats().sequences_skipped, 1);
    let log = read_all(&pool, topic);
    assert_eq!(
        log.iter().map(|b| b.2).collect::<Vec<_>>(),
        vec![1, 2],
        "held batches ordered in session order"
    );
    let zero = payload(0, 1);
    writer.append(meta(5, 0, &zero, 1), &zero).unwrap();
    sequencer.poll(Timestamp::from_nanos(2_000));
    let statuses: Vec<_> = outcomes(&mut writer).iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![
            CompletionStatus::Ordered,
            CompletionStatus::Ordered,
            CompletionStatus::RejectedGap
        ]
    );
    assert_eq!(
        read_all(&pool, topic).len(),
        2,
        "the skipped batch is never ordered"
    );
}

#[test]
fn full_ring_and_full_log_push_back_and_recover_after_completions() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("pressure", config(Order::Total)).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let data = payload(3, 1);
    for seq in 0..8 {
        writer.append(meta(1, seq, &data, 1), &data).unwrap();
    }
    assert!(matches!(
        writer.append(meta(1, 8, &data, 1), &data),
        Err(AppendError::RingFull {
            in_flight: 8,
            ring_slots: 8
        })
    ));
    sequencer.poll(Timestamp::ZERO);
    assert_eq!(outcomes(&mut writer).len(), 8);
    writer.append(meta(1, 8, &data, 1), &data).unwrap();
    // A 64 KiB payload log holds two 30 KiB batches; a third waits for completions.
    let big = {
        let mut p = Vec::new();
        wire::payload::push_message(&mut p, &vec![7; 30 * 1024]);
        p
    };
    writer.append(meta(1, 9, &big, 1), &big).unwrap();
    writer.append(meta(1, 10, &big, 1), &big).unwrap();
    assert!(matches!(
        writer.append(meta(1, 11, &big, 1), &big),
        Err(AppendError::LogFull { .. })
    ));
    sequencer.poll(Timestamp::ZERO);
    outcomes(&mut writer);
    writer.append(meta(1, 11, &big, 1), &big).unwrap();
    sequencer.poll(Timestamp::ZERO);
    outcomes(&mut writer);
    // The log wrapped: the oldest batches are gone, and a reader from 0 is told so.
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    assert!(matches!(
        reader.poll(usize::MAX, |_| {}),
        Err(ReadError::Truncated { ordinal: 0, .. })
    ));
    assert_eq!(reader.log_end(), (12, 12));
    reader.seek(11).unwrap();
    let mut last = Vec::new();
    reader
        .poll(usize::MAX, |b| last.push(b.payload.to_vec()))
        .unwrap();
    assert_eq!(last, vec![big], "the batch that waited for room is intact");
    assert!(matches!(
        writer.reserve(40 * 1024),
        Err(AppendError::TooLarge {
            payload_bytes: 40960,
            batch_bytes_max: 32768
        })
    ));
}

#[test]
fn impossible_batch_header_is_rejected_and_corrupts_nothing() {
    let g = geometry();
    let (_region, pool) = new_pool(g);
    let topic = pool.create_topic("bad", config(Order::Total)).unwrap();
    let mut good = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    // A buggy or malicious writer on broker 0 publishes impossible headers.
    let mem = pool.mem();
    let impossible = [
        (u32::MAX, 1, 0, Order::Total), // payload larger than the log
        (64, 100, 0, Order::Total),     // 100 messages in 64 bytes
        (64, 1, g.blog_bytes - 32, Order::Total), // crosses the log end
        (64, 1, 3, Order::Total),       // unaligned
        (64, 1, 0, Order::TotalSessionFifo), // order of another topic
        (0, 0, 0, Order::Total),        // empty
    ];
    for (slot, &(payload_bytes, message_count, blog_offset, order)) in impossible.iter().enumerate()
    {
        let header = BatchHeader {
            blog_offset,
            client_id: 66,
            batch_seq: slot as u64,
            payload_bytes,
            message_count,
            session_epoch: 1,
            checksum: 0,
            order: order as u8,
            flags: 0,
            reserved: [0; 14],
            ready: slot as u64 + 1,
        };
        publish(mem, g.ring_slot_offset(topic, 0, slot as u64), &header);
    }
    pool.write_frontier(
        g.frontier_offset(topic, 0, FRONTIER_WRITTEN),
        impossible.len() as u64,
        0,
    );
    let data = payload(4, 3);
    good.append(meta(2, 0, &data, 3), &data).unwrap();
    sequencer.poll(Timestamp::ZERO);
    assert_eq!(sequencer.stats().rejected_invalid, impossible.len() as u64);
    assert_eq!(sequencer.stats().batches_ordered, 1);
    let mut completions = Vec::new();
    for slot in 0..impossible.len() as u64 {
        let offset = g.completion_offset(topic, 0, slot);
        mem.invalidate(offset, 32);
        mem.fence();
        completions.push(mem.load_u64(offset + 8) as u32);
    }
    assert!(
        completions
            .iter()
            .all(|&c| c == CompletionStatus::RejectedInvalid.code())
    );
    let log = read_all(&pool, topic);
    assert_eq!(
        log,
        vec![(0, 2, 0, data)],
        "only the good batch is in the log"
    );
    assert_eq!(outcomes(&mut good)[0].status, CompletionStatus::Ordered);
}

#[test]
fn a_batch_numbered_u64_max_in_a_ring_is_rejected_not_ordered() {
    // Order 5 would hold it, then (after the gap rule) expect sequence u64::MAX + 1 next.
    let g = geometry();
    let (_region, pool) = new_pool(g);
    let topic = pool
        .create_topic("max", config(Order::TotalSessionFifo))
        .unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let config = SequencerConfig {
        hold_timeout_ns: 10,
        ..SequencerConfig::default()
    };
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    let data = payload(1, 1);
    writer.append(meta(4, u64::MAX, &data, 1), &data).unwrap();
    writer.append(meta(4, 0, &data, 1), &data).unwrap();
    sequencer.poll(Timestamp::ZERO);
    sequencer.poll(Timestamp::from_nanos(100));
    let statuses: Vec<_> = outcomes(&mut writer).iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![CompletionStatus::RejectedInvalid, CompletionStatus::Ordered]
    );
    assert_eq!(sequencer.stats().rejected_invalid, 1);
    assert_eq!(read_all(&pool, topic).len(), 1);
}

#[test]
fn skipped_sequence_counts_saturate() {
    // Found by fuzzing: publishers choose their sequences, so the gaps the gap rule skips
    // can add up past u64::MAX.
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("skips", config(Order::TotalSessionFifo))
        .unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let config = SequencerConfig {
        hold_timeout_ns: 10,
        ..SequencerConfig::default()
    };
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    let data = payload(1, 1);
    writer
        .append(meta(1, u64::MAX - 1, &data, 1), &data)
        .unwrap();
    writer.append(meta(2, 5, &data, 1), &data).unwrap();
    sequencer.poll(Timestamp::ZERO);
    sequencer.poll(Timestamp::from_nanos(100));
    assert_eq!(sequencer.stats().gaps_resolved, 2);
    assert_eq!(sequencer.stats().sequences_skipped, u64::MAX);
    assert_eq!(read_all(&pool, topic).len(), 2);
}

#[test]
fn attaching_checks_magic_version_readiness_and_size() {
    let g = geometry();
    let region = Arc::new(HeapRegion::new(g.layout_bytes()));
    let mem = region.memory(MODE);
    assert!(matches!(
        Pool::attach(mem.clone()),
        Err(PoolError::BadMagic { found: 0 })
    ));
    Pool::format(mem.clone(), g, 1).unwrap();
    Pool::attach(mem.clone()).unwrap();

    // Another layout version.
    let version_offset = std::mem::offset_of!(PoolHeader, layout_version) as u64;
    mem.write(version_offset, &(LAYOUT_VERSION + 1).to_le_bytes());
    assert_eq!(
        Pool::attach(mem.clone()).unwrap_err(),
        PoolError::LayoutVersion {
            found: LAYOUT_VERSION + 1,
            expected: LAYOUT_VERSION
        }
    );
    let message = Pool::attach(mem.clone()).unwrap_err().to_string();
    assert!(message.contains("re-format"), "{message}");
    mem.write(version_offset, &LAYOUT_VERSION.to_le_bytes());

    // Formatting that never completed.
    mem.store_u64(PoolHeader::READY_OFFSET, 0);
    assert_eq!(
        Pool::attach(mem.clone()).unwrap_err(),
        PoolError::NotFormatted
    );
    Pool::format(mem.clone(), g, 1).unwrap();

    // A mapping smaller than the pool in it.
    let short = region.memory(MODE);
    // SAFETY: a prefix of a live region, kept alive by `region` for the rest of the test.
    let short = unsafe { PoolMemory::new(region_base(&short), g.layout_bytes() / 2, MODE) };
    assert!(matches!(
        Pool::attach(short),
        Err(PoolError::Truncated { .. })
    ));

    // A pool too small for the geometry asked for.
    let tiny = Arc::new(HeapRegion::new(64 * 1024));
    let err = Pool::format(tiny.memory(MODE), g, 1).unwrap_err();
    assert!(matches!(err, PoolError::Geometry(_)), "{err}");
    assert!(err.to_string().contains("too small"), "{err}");
}

fn region_base(mem: &PoolMemory) -> *mut u8 {
    let mut base = std::ptr::null_mut();
    mem.with_bytes(0, 1, |bytes| base = bytes.as_ptr().cast_mut());
    base
}

#[test]
fn topics_are_validated_and_unique() {
    let (_region, pool) = new_pool(geometry());
    let a = pool.create_topic("a", config(Order::Total)).unwrap();
    assert_eq!(pool.create_topic("a", config(Order::Total)).unwrap(), a);
    assert!(matches!(
        pool.create_topic("a", config(Order::Unordered)),
        Err(PoolError::TopicConflict { order: 2, .. })
    ));
    assert!(matches!(
        pool.create_topic("no spaces", config(Order::Total)),
        Err(PoolError::TopicNameInvalid { .. })
    ));
    assert!(matches!(
        pool.create_topic(&"x".repeat(65), config(Order::Total)),
        Err(PoolError::TopicNameInvalid { .. })
    ));
    pool.create_topic("b", config(Order::PerBrokerFifo))
        .unwrap();
    assert_eq!(
        pool.create_topic("c", config(Order::Total)),
        Err(PoolError::TopicTableFull { topics_max: 2 })
    );
    assert_eq!(
        pool.find_topic("b").unwrap().unwrap().1.order,
        Order::PerBrokerFifo
    );
    assert_eq!(pool.find_topic("zzz").unwrap(), None);
    assert!(matches!(
        TopicWriter::new(pool.clone(), a, 9),
        Err(WriterError::Pool(PoolError::NoSuchBroker {
            broker: 9,
            brokers_max: 4
        }))
    ));
}

#[test]
fn a_restarted_writer_picks_up_its_ring_and_loses_nothing() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("t", config(Order::Total)).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let mut sent = Vec::new();
    for seq in 0..3u64 {
        let data = payload(seq as u8, 2);
        writer.append(meta(1, seq, &data, 2), &data).unwrap();
        sent.push(data);
    }
    assert_eq!(sequencer.poll(Timestamp::from_nanos(1)), 3);
    // Two more batches are committed but not decided when the broker dies.
    for seq in 3..5u64 {
        let data = payload(seq as u8, 2);
        writer.append(meta(1, seq, &data, 2), &data).unwrap();
        sent.push(data);
    }
    drop(writer);
    let mut restarted = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    assert_eq!(restarted.committed_slots(), 5);
    assert_eq!(restarted.completed_slots(), 3);
    assert_eq!(restarted.recovered_in_flight(), 2);
    for seq in 5..7u64 {
        let data = payload(seq as u8, 2);
        assert_eq!(
            restarted.append(meta(1, seq, &data, 2), &data).unwrap(),
            seq
        );
        sent.push(data);
    }
    assert_eq!(sequencer.poll(Timestamp::from_nanos(2)), 4);
    let decided: Vec<u64> = outcomes(&mut restarted).iter().map(|o| o.slot).collect();
    assert_eq!(decided, vec![3, 4, 5, 6]);
    let log = read_all(&pool, topic);
    let bytes: Vec<Vec<u8>> = log.into_iter().map(|(.., data)| data).collect();
    assert_eq!(bytes, sent, "every batch once, in order, bytes intact");
}

#[test]
fn a_standby_takes_the_lease_over_fences_the_old_sequencer_and_continues_the_order() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("t", config(Order::TotalSessionFifo))
        .unwrap();
    let mut old = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let mut sent = Vec::new();
    for seq in 0..3u64 {
        let data = payload(seq as u8, 2);
        writer.append(meta(1, seq, &data, 2), &data).unwrap();
        sent.push(data);
    }
    assert_eq!(old.poll(Timestamp::from_nanos(1)), 3);
    for seq in 3..5u64 {
        let data = payload(seq as u8, 2);
        writer.append(meta(1, seq, &data, 2), &data).unwrap();
        sent.push(data);
    }
    // A second standby that saw epoch 1 loses the race to the first.
    let mut new = Sequencer::new(pool.clone(), 2, 2, SequencerConfig::default()).unwrap();
    assert!(matches!(
        Sequencer::new(pool.clone(), 3, 2, SequencerConfig::default()),
        Err(PoolError::LeaseTaken {
            expected: 1,
            found: 2
        })
    ));
    // The old holder wakes up (a paused process): it must not write anything.
    assert_eq!(old.poll(Timestamp::from_nanos(2)), 0);
    assert!(old.is_fenced());
    assert_eq!(
        pool.read_frontier(pool.geometry().seq_state_offset(topic))
            .0,
        3
    );
    // The new holder continues the session (order 5: seq 3 is next) and deduplicates a
    // resend of seq 1 on another broker with its original position.
    let mut other = TopicWriter::new(pool.clone(), topic, 3).unwrap();
    other.append(meta(1, 1, &sent[1], 2), &sent[1]).unwrap();
    assert_eq!(new.poll(Timestamp::from_nanos(3)), 3);
    let resend = outcomes(&mut other);
    assert_eq!(resend[0].status, CompletionStatus::Duplicate);
    assert_eq!(resend[0].global_start, Some(2));
    let statuses: Vec<_> = outcomes(&mut writer).iter().map(|o| o.status).collect();
    assert_eq!(statuses, vec![CompletionStatus::Ordered; 5]);
    let log = read_all(&pool, topic);
    let bytes: Vec<Vec<u8>> = log.iter().map(|(.., data)| data.clone()).collect();
    assert_eq!(bytes, sent, "every batch once, in order, bytes intact");
    let positions: Vec<u64> = log.iter().map(|(start, ..)| *start).collect();
    assert_eq!(positions, vec![0, 2, 4, 6, 8]);
}

#[test]
fn a_holder_paused_in_the_middle_of_a_round_stops_before_its_next_store() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("t", config(Order::Total)).unwrap();
    let config = SequencerConfig::default();
    let mut old = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    for seq in 0..4u64 {
        let data = payload(seq as u8, 1);
        writer.append(meta(1, seq, &data, 1), &data).unwrap();
    }
    // The clock stands for the process being stopped right after the round's first store:
    // while it is stopped, a standby takes the lease over; when it resumes, its clock has
    // jumped by two leases.
    let standby_pool = pool.clone();
    let taken = std::sync::Arc::new(std::sync::Mutex::new(None));
    let taken_by_clock = std::sync::Arc::clone(&taken);
    let mut reads = 0u64;
    old.set_pause_guard(Box::new(move || {
        reads += 1;
        if reads == 4 {
            let standby = Sequencer::new(standby_pool.clone(), 2, 2, config).unwrap();
            *taken_by_clock.lock().unwrap() = Some(standby);
        }
        Timestamp::from_nanos(if reads >= 4 { 2 * config.lease_ns } else { 0 })
    }));
    old.poll(Timestamp::from_nanos(1));
    assert!(old.is_fenced(), "the holder noticed the new epoch");
    assert!(
        taken.lock().unwrap().is_some(),
        "the standby took over mid-round"
    );
    // It wrote at most the stores before the pause and published nothing.
    let (committed, _) = pool.read_frontier(pool.geometry().seq_state_offset(topic));
    assert_eq!(committed, 0, "no commit after the takeover");
    assert_eq!(outcomes(&mut writer).len(), 0, "no completion published");
    let mut body = [0u8; 56];
    let second = pool.geometry().goi_offset(topic, 1);
    pool.mem().invalidate(second, 64);
    pool.mem().fence();
    pool.mem().read(second, &mut body);
    assert_eq!(body, [0; 56], "no GOI entry written after the pause");
    // The new holder orders all four, once each.
    let mut new = taken.lock().unwrap().take().unwrap();
    assert_eq!(new.poll(Timestamp::from_nanos(2)), 4);
    assert_eq!(read_all(&pool, topic).len(), 4);
    assert_eq!(outcomes(&mut writer).len(), 4);
}

#[test]
fn a_resend_of_a_held_batch_is_answered_only_once_the_batch_has_its_position() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("held", config(Order::TotalSessionFifo))
        .unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut first = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let mut second = TopicWriter::new(pool.clone(), topic, 2).unwrap();
    let zero = payload(0, 1);
    let one = payload(1, 2);
    // Seq 1 arrives before seq 0 and is held; its resend arrives on another broker.
    first.append(meta(5, 1, &one, 2), &one).unwrap();
    second.append(meta(5, 1, &one, 2), &one).unwrap();
    sequencer.poll(Timestamp::from_nanos(1));
    assert!(outcomes(&mut first).is_empty(), "held");
    assert!(
        outcomes(&mut second).is_empty(),
        "no answer before the order has it"
    );
    second.append(meta(5, 0, &zero, 1), &zero).unwrap();
    sequencer.poll(Timestamp::from_nanos(2));
    let original = outcomes(&mut first);
    let answers = outcomes(&mut second);
    assert_eq!(original[0].status, CompletionStatus::Ordered);
    assert_eq!(original[0].global_start, Some(1));
    assert_eq!(answers[0].status, CompletionStatus::Duplicate);
    assert_eq!(answers[0].global_start, Some(1), "the original's position");
    assert_eq!(answers[1].global_start, Some(0));
    assert_eq!(read_all(&pool, topic).len(), 2, "seq 1 once");
}

#[test]
fn a_standby_remembers_sessions_older_than_the_goi_it_keeps() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("long", config(Order::TotalSessionFifo))
        .unwrap();
    let mut old = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let data = payload(7, 1);
    // Session 9 orders 10 batches, then session 10 orders 300: more than the 256 GOI
    // entries kept, so nothing of session 9 is left in the GOI.
    for (client, seqs) in [(9, 0..10u64), (10, 0..300)] {
        for seq in seqs {
            writer.append(meta(client, seq, &data, 1), &data).unwrap();
            old.poll(Timestamp::from_nanos(seq));
            writer.poll_completions(usize::MAX, |_| {});
        }
    }
    let mut new = Sequencer::new(pool.clone(), 2, 2, SequencerConfig::default()).unwrap();
    // A very late copy of seq 5 is rejected, never ordered again; seq 10 goes on at once
    // (no gap from 0 is held open for a session the new holder never saw).
    let mut other = TopicWriter::new(pool.clone(), topic, 2).unwrap();
    other.append(meta(9, 5, &data, 1), &data).unwrap();
    other.append(meta(9, 10, &data, 1), &data).unwrap();
    new.poll(Timestamp::from_nanos(1));
    let answers = outcomes(&mut other);
    assert_eq!(answers.len(), 2, "both decided in one round, nothing held");
    assert_eq!(answers[0].status, CompletionStatus::RejectedOutsideWindow);
    assert_eq!(answers[1].status, CompletionStatus::Ordered);
    assert_eq!(answers[1].global_start, Some(310));
}

#[test]
fn a_silent_brokers_subscribers_stop_holding_the_log_after_the_stale_window() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("silent", config(Order::Total)).unwrap();
    let config = SequencerConfig::default();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    // Broker 3 has a subscriber at ordinal 0, then stops publishing its line (it crashed,
    // or the scheduler left it aside).
    pool.publish_subscribed(topic, 3, Some(0));
    assert_eq!(pool.retention_floor(topic), 0);
    // The sequencer's heartbeat goes on (an eighth of a lease each). The line holds for
    // the stale window's beats, however short the lease: a live broker that misses a lease
    // must not lose its subscribers' hold.
    let beat = config.lease_ns / 8;
    let stale = pool.stale_heartbeats();
    assert!(
        stale * beat >= shared_log::pool::STALE_WINDOW_MS * 1_000_000 && stale >= 8,
        "{stale} beats of {beat} ns"
    );
    let replica_stale = pool.replica_stale_heartbeats();
    assert!(
        replica_stale * beat >= shared_log::pool::REPLICA_STALE_WINDOW_MS * 1_000_000
            && replica_stale > stale,
        "a replica's line, written between syncs, holds longer: {replica_stale} beats"
    );
    for n in 1..=stale {
        sequencer.poll(Timestamp::from_nanos(n * beat));
    }
    assert_eq!(pool.retention_floor(topic), 0, "within the window");
    sequencer.poll(Timestamp::from_nanos((stale + 1) * beat));
    assert_eq!(
        pool.retention_floor(topic),
        u64::MAX,
        "silent for longer than the window"
    );
    // A live broker republishes with the heartbeat it sees and holds again.
    pool.publish_subscribed(topic, 3, Some(0));
    assert_eq!(pool.retention_floor(topic), 0);
}

#[test]
fn the_lines_of_a_taken_over_head_stop_holding_the_log_at_once() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("takeover", config(Order::Total)).unwrap();
    let config = SequencerConfig::default();
    let mut head = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    head.poll(Timestamp::ZERO);
    // The head (broker 0) and broker 3 each hold the log for a subscriber; broker 0's
    // replica holds it too.
    pool.publish_subscribed(topic, 0, Some(0));
    pool.publish_replicated(topic, 0, 1, 0, pool.lease_heartbeat());
    pool.publish_subscribed(topic, 3, Some(5));
    assert_eq!(pool.retention_floor(topic), 0);
    // Broker 0 dies; broker 2 takes the lease over. Broker 0's lines hold nothing from the
    // takeover on, long before they would go stale; broker 3's still hold.
    drop(head);
    let mut standby = Sequencer::new(pool.clone(), 2, 2, config).unwrap();
    assert_eq!(pool.retention_floor(topic), 5);
    standby.poll(Timestamp::from_nanos(config.lease_ns));
    assert_eq!(pool.retention_floor(topic), 5);
    // Broker 0 was only paused: it writes its lines again, with the heartbeat it sees
    // now, and holds again.
    pool.publish_subscribed(topic, 0, Some(1));
    assert_eq!(pool.retention_floor(topic), 1);
}

#[test]
fn reader_seeks_by_position_and_refuses_beyond_the_end() {
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("seek", config(Order::Total)).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 2).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    for seq in 0..5 {
        let data = payload(seq as u8, 3);
        writer.append(meta(1, seq, &data, 3), &data).unwrap();
    }
    sequencer.poll(Timestamp::ZERO);
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    assert_eq!(reader.log_end(), (5, 15));
    reader.seek(7).unwrap();
    let mut starts = Vec::new();
    reader.poll(10, |b| starts.push(b.global_start)).unwrap();
    assert_eq!(
        starts,
        vec![6, 9, 12],
        "from the batch that holds position 7"
    );
    reader.seek(15).unwrap();
    assert_eq!(reader.poll(10, |_| {}).unwrap(), 0);
    assert_eq!(
        reader.seek(16),
        Err(ReadError::BeyondEnd {
            position: 16,
            end: 15
        })
    );
    let mut messages = Vec::new();
    reader.seek(0).unwrap();
    reader
        .poll(1, |b| messages.extend(b.messages().map(<[u8]>::len)))
        .unwrap();
    assert_eq!(messages, vec![10, 11, 12]);
}

/// A 64 KiB payload log filled by two 30 KiB batches (ordinals 0 and 1 once ordered),
/// committed and not yet ordered; nobody subscribes.
struct FullLog {
    _region: Arc<HeapRegion>,
    pool: Pool<PoolMemory>,
    topic: shared_log::pool::TopicId,
    writer: TopicWriter<PoolMemory>,
    sequencer: Sequencer<PoolMemory>,
    big: Vec<u8>,
}

fn full_log(name: &str) -> FullLog {
    let (region, pool) = new_pool(geometry());
    let topic = pool.create_topic(name, config(Order::Total)).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut big = Vec::new();
    wire::payload::push_message(&mut big, &vec![5; 30 * 1024]);
    writer.append(meta(1, 0, &big, 1), &big).unwrap();
    writer.append(meta(1, 1, &big, 1), &big).unwrap();
    FullLog {
        _region: region,
        pool,
        topic,
        writer,
        sequencer,
        big,
    }
}

/// [`full_log`] with both batches ordered, and a subscriber on broker 3 that still needs
/// them from ordinal 0 on.
fn held_log(name: &str) -> FullLog {
    let mut log = full_log(name);
    log.pool.publish_subscribed(log.topic, 3, Some(0));
    log.sequencer.poll(Timestamp::ZERO);
    assert_eq!(
        outcomes(&mut log.writer).len(),
        2,
        "both ordered and completed"
    );
    log
}

#[test]
fn a_connected_subscriber_holds_its_batches_until_it_has_read_them() {
    let FullLog {
        _region,
        pool,
        topic,
        mut writer,
        mut sequencer,
        big,
    } = held_log("held");
    assert!(
        matches!(
            writer.append(meta(1, 2, &big, 1), &big),
            Err(AppendError::LogFull { .. })
        ),
        "completed batches the subscriber has not read are not overwritten"
    );
    // It read ordinal 0: that batch's room is reused, ordinal 1 is still kept.
    pool.publish_subscribed(topic, 3, Some(1));
    writer.append(meta(1, 2, &big, 1), &big).unwrap();
    sequencer.poll(Timestamp::ZERO);
    outcomes(&mut writer);
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    reader.seek(1).unwrap();
    assert_eq!(
        reader.poll(usize::MAX, |_| {}).unwrap(),
        2,
        "ordinals 1 and 2 intact"
    );
    // The subscriber leaves: nothing is held any more.
    pool.publish_subscribed(topic, 3, None);
    writer.append(meta(1, 3, &big, 1), &big).unwrap();
}

#[test]
fn a_full_log_reads_the_floor_again_only_after_the_retry_interval() {
    let FullLog {
        _region,
        pool,
        topic,
        mut writer,
        big,
        ..
    } = held_log("retry");
    let len = big.len() as u64;
    // A writer without a clock looks every time it is short of room.
    for _ in 0..2 {
        assert!(matches!(
            writer.reserve(len),
            Err(AppendError::LogFull { .. })
        ));
    }
    assert_eq!(writer.reclaims(), 2);
    let start = Timestamp::from_nanos(1_000_000);
    assert!(matches!(
        writer.reserve_at(len, start),
        Err(AppendError::LogFull { .. })
    ));
    assert_eq!(writer.reclaims(), 3, "a full log is looked at when needed");
    // The subscriber reads on at once, but retries within the interval do not reclaim:
    // still refused, and the floor not read again.
    pool.publish_subscribed(topic, 3, Some(1));
    let interval = shared_log::writer::RECLAIM_RETRY_INTERVAL;
    for step in [
        Duration::ZERO,
        interval / 2,
        interval - Duration::from_nanos(1),
    ] {
        assert!(matches!(
            writer.reserve_at(len, start + step),
            Err(AppendError::LogFull { .. })
        ));
    }
    assert_eq!(writer.reclaims(), 3);
    // Once the interval is over, the next retry finds the room the subscriber freed.
    writer.reserve_at(len, start + interval).unwrap();
    assert_eq!(writer.reclaims(), 4);
}

#[test]
fn a_subscriber_that_appears_between_two_reclaims_is_protected_by_the_next() {
    let FullLog {
        _region,
        pool,
        topic,
        mut writer,
        mut sequencer,
        big,
    } = full_log("falling");
    let start = Timestamp::from_nanos(1_000_000);
    let len = big.len() as u64;
    // Nobody holds anything, but both batches wait to be ordered: no room yet.
    assert!(matches!(
        writer.reserve_at(len, start),
        Err(AppendError::LogFull { .. })
    ));
    assert_eq!(writer.reclaims(), 1);
    // Both are ordered, and a subscriber appears that needs them from ordinal 0 on: the
    // floor falls. A retry within the interval frees nothing (the floor read before it
    // appeared would have let it free both), and the next reclaim reads the new floor.
    sequencer.poll(Timestamp::ZERO);
    assert_eq!(outcomes(&mut writer).len(), 2);
    pool.publish_subscribed(topic, 3, Some(0));
    let interval = shared_log::writer::RECLAIM_RETRY_INTERVAL;
    for at in [start + interval / 2, start + interval] {
        assert!(matches!(
            writer.reserve_at(len, at),
            Err(AppendError::LogFull { .. })
        ));
    }
    assert_eq!(writer.reclaims(), 2);
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    let mut read = Vec::new();
    reader.poll(usize::MAX, |b| read.push(b.ordinal)).unwrap();
    assert_eq!(read, vec![0, 1], "both batches intact for the subscriber");
}

#[test]
fn a_session_numbering_messages_keeps_its_order_and_a_standby_goes_on_from_its_messages() {
    // A Kafka idempotent producer: batches of 2 messages at sequences 0, 2, 4, ...
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("kafka", config(Order::TotalSessionFifo))
        .unwrap();
    let counted = |seq: u64, data: &[u8]| BatchMeta {
        flags: shared_log::layout::BATCH_SEQ_COUNTS_MESSAGES,
        ..meta(9, seq, data, 2)
    };
    let mut old = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 1).unwrap();
    let sent: Vec<Vec<u8>> = (0..4u8).map(|i| payload(i, 2)).collect();
    // Sequence 2 arrives before 0: held, then ordered right after it.
    writer.append(counted(2, &sent[1]), &sent[1]).unwrap();
    assert_eq!(old.poll(Timestamp::from_nanos(1)), 0);
    assert_eq!(old.stats().held, 1);
    writer.append(counted(0, &sent[0]), &sent[0]).unwrap();
    assert_eq!(old.poll(Timestamp::from_nanos(2)), 2);
    // A standby takes over and rebuilds the session (its record, the GOI): 4 is next (not
    // 3), so it is ordered at once, and a resend of 2 is a duplicate at its position.
    let mut new = Sequencer::new(pool.clone(), 2, 2, SequencerConfig::default()).unwrap();
    writer.append(counted(4, &sent[2]), &sent[2]).unwrap();
    let mut other = TopicWriter::new(pool.clone(), topic, 3).unwrap();
    other.append(counted(2, &sent[1]), &sent[1]).unwrap();
    assert_eq!(new.poll(Timestamp::from_nanos(3)), 2);
    assert_eq!(new.stats().held, 0, "no gap between 2 (+2) and 4");
    let resend = outcomes(&mut other);
    assert_eq!(resend[0].status, CompletionStatus::Duplicate);
    assert_eq!(resend[0].global_start, Some(2));
    writer.append(counted(6, &sent[3]), &sent[3]).unwrap();
    assert_eq!(new.poll(Timestamp::from_nanos(4)), 1);
    let statuses: Vec<_> = outcomes(&mut writer).iter().map(|o| o.status).collect();
    assert_eq!(statuses, vec![CompletionStatus::Ordered; 4]);
    let log = read_all(&pool, topic);
    let seqs: Vec<u64> = log.iter().map(|b| b.2).collect();
    assert_eq!(seqs, vec![0, 2, 4, 6], "the producer's order");
    let bytes: Vec<Vec<u8>> = log.iter().map(|(.., data)| data.clone()).collect();
    assert_eq!(bytes, sent, "every batch once, bytes intact");
}

#[test]
fn a_held_batch_overlapped_by_an_ordered_one_is_rejected_and_the_gap_rule_stays_put() {
    // A client numbering messages sends sequence 1 (held: 0 is missing), then sequence 0
    // of three messages, which covers 1: 1 can never be placed.
    let (_region, pool) = new_pool(geometry());
    let topic = pool
        .create_topic("overlap", config(Order::TotalSessionFifo))
        .unwrap();
    let counted = |seq: u64, data: &[u8], messages: u32| BatchMeta {
        flags: shared_log::layout::BATCH_SEQ_COUNTS_MESSAGES,
        ..meta(4, seq, data, messages)
    };
    let config = SequencerConfig {
        hold_timeout_ns: 1_000,
        ..SequencerConfig::default()
    };
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let (one, zero) = (payload(1, 1), payload(0, 3));
    writer.append(counted(1, &one, 1), &one).unwrap();
    assert_eq!(sequencer.poll(Timestamp::from_nanos(1)), 0);
    writer.append(counted(0, &zero, 3), &zero).unwrap();
    assert_eq!(sequencer.poll(Timestamp::from_nanos(2)), 2);
    let statuses: Vec<_> = outcomes(&mut writer).iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![CompletionStatus::RejectedGap, CompletionStatus::Ordered]
    );
    assert_eq!(sequencer.stats().held, 0);
    // Past the hold timeout nothing is given up (no gap pulled backwards), and 3 follows.
    assert_eq!(sequencer.poll(Timestamp::from_nanos(5_000)), 0);
    assert_eq!(sequencer.stats().gaps_resolved, 0);
    let three = payload(3, 1);
    writer.append(counted(3, &three, 1), &three).unwrap();
    assert_eq!(sequencer.poll(Timestamp::from_nanos(6_000)), 1);
    let log = read_all(&pool, topic);
    assert_eq!(log.iter().map(|b| b.2).collect::<Vec<_>>(), vec![0, 3]);
}

#[test]
fn a_batch_of_kafka_record_batches_is_stored_as_it_came_and_read_as_its_values() {
    use shared_log::layout::BATCH_RECORD_BATCHES;
    use shared_log::reader::ReadError;
    let (_region, pool) = new_pool(geometry());
    let topic = pool.create_topic("kafka", config(Order::Total)).unwrap();
    let mut writer = TopicWriter::new(pool.clone(), topic, 0).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut records = Vec::new();
    wire::record_batch::encode(&mut records, 0, [&b"one"[..], b"two"].into_iter());
    wire::record_batch::encode(&mut records, 0, [&b"three"[..]].into_iter());
    let kafka = |count| BatchMeta {
        flags: BATCH_RECORD_BATCHES,
        ..meta(1, 0, &records, count)
    };
    writer.append(kafka(3), &records).unwrap();
    assert_eq!(sequencer.poll(Timestamp::from_nanos(1)), 1);
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    let mut seen = Vec::new();
    reader
        .poll(usize::MAX, |batch| {
            assert!(batch.is_record_batches());
            assert_eq!(batch.payload, &records[..], "stored as it came");
            seen.extend(batch.messages().map(<[u8]>::to_vec));
        })
        .unwrap();
    assert_eq!(
        seen,
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    // An entry whose count the batches do not hold is corrupt, not served.
    let second = BatchMeta {
        batch_seq: 1,
        ..kafka(4)
    };
    writer.append(second, &records).unwrap();
    assert_eq!(sequencer.poll(Timestamp::from_nanos(2)), 1);
    assert!(matches!(
        reader.poll(usize::MAX, |_| panic!("not served")),
        Err(ReadError::Corrupt { .. })
    ));
}
