//! Benchmark of the log core on one pinned core: `cargo bench -p shared-log --bench core`.
//!
//! 1. Sequencing rate: 4 broker rings pre-filled with small batches; the time of the
//!    sequencer alone to order them all (batches per second).
//! 2. Payload path: write (copy into the payload log + flush) + sequence + read (invalidate,
//!    optionally check the CRC-32C, walk every message) of 64 KiB batches of 1 KiB messages,
//!    against plain memcpy of the same bytes measured in the same run. Without the broker-side
//!    CRC check is the subscriber path: the checksum travels to the subscriber, who checks it.
//!
//! Both in `noncoherent` mode (real clwb/clflushopt/mfence) and, for reference, `coherent`.
//! Prints a table and writes `target/bench/core.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_log::Order;
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, TopicConfig};
use shared_log::reader::LogReader;
use shared_log::sequencer::{Sequencer, SequencerConfig};
use shared_log::writer::{BatchMeta, TopicWriter};
use units::Timestamp;
const BROKERS: u16 = 4;
const RING_SLOTS: u32 = 4096;
const SMALL_PAYLOAD_BYTES: usize = 64;
const BIG_MESSAGE_BYTES: usize = 1024;
const BIG_MESSAGES: usize = 64;
const MEASURE: Duration = Duration::from_secs(2);

struct Setup {
    _region: Arc<HeapRegion>,
    pool: Pool<PoolMemory>,
    writers: Vec<TopicWriter<PoolMemory>>,
    sequencer: Sequencer<PoolMemory>,
    topic: u32,
}

fn setup(mode: CoherenceMode, blog_bytes: u64) -> Setup {
    let geometry = Geometry {
        brokers_max: u32::from(BROKERS),
        topics_max: 1,
        ring_slots: RING_SLOTS,
        goi_entries: 1 << 16,
        blog_bytes,
    };
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    let pool = Pool::format(region.memory(mode), geometry, 1).expect("format");
    let topic = pool
        .create_topic(
            "bench",
            TopicConfig {
                order: Order::TotalSessionFifo,
                ack: 1,
                replication_factor: 1,
                retention: shared_log::Retention::StallLimited,
                history: shared_log::HistoryRetention::UNLIMITED,
            },
        )
        .expect("topic");
    let writers = (0..BROKERS)
        .map(|b| {
            TopicWriter::new(Pool::attach(region.memory(mode)).expect("attach"), topic, b)
                .expect("writer")
        })
        .collect();
    let config = SequencerConfig {
        scan_slots_max: RING_SLOTS,
        ..SequencerConfig::default()
    };
    let sequencer = Sequencer::new(
        Pool::attach(region.memory(mode)).expect("attach"),
        0,
        1,
        config,
    )
    .expect("sequencer");
    Setup {
        _region: region,
        pool,
        writers,
        sequencer,
        topic,
    }
}

fn payload(message_bytes: usize, messages: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    for i in 0..messages {
        let message: Vec<u8> = (0..message_bytes).map(|j| (i * 31 + j) as u8).collect();
        wire::payload::push_message(&mut payload, &message);
    }
    payload
}

/// Batches sequenced per second by the sequencer alone.
fn sequencing_rate(mode: CoherenceMode) -> f64 {
    let mut s = setup(mode, 16 << 20);
    let data = payload(SMALL_PAYLOAD_BYTES - 4, 1);
    let checksum = wire::payload::checksum(&data);
    let mut seqs = vec![0u64; BROKERS as usize];
    let (mut sequenced, mut spent) = (0u64, Duration::ZERO);
    while spent < MEASURE {
        for (b, writer) in s.writers.iter_mut().enumerate() {
            for _ in 0..RING_SLOTS {
                let meta = BatchMeta {
                    client_id: b as u64,
                    session_epoch: 1,
                    batch_seq: seqs[b],
                    message_count: 1,
                    checksum,
                    flags: 0,
                };
                writer.append(meta, &data).expect("room after completions");
                seqs[b] += 1;
            }
        }
        let started = Instant::now();
        let mut decided = 0;
        while decided < u64::from(RING_SLOTS) * u64::from(BROKERS) {
            decided += s.sequencer.poll(Timestamp::ZERO);
        }
        spent += started.elapsed();
        sequenced += decided;
        for writer in &mut s.writers {
            while writer.poll_completions(usize::MAX, |_| {}) > 0 {}
        }
    }
    sequenced as f64 / spent.as_secs_f64()
}

/// Payload bytes per second through write + sequence + read.
fn payload_path(mode: CoherenceMode, verify_checksums: bool) -> f64 {
    let mut s = setup(mode, 64 << 20);
    let data = payload(BIG_MESSAGE_BYTES, BIG_MESSAGES);
    let checksum = wire::payload::checksum(&data);
    let mut reader = LogReader::new(s.pool.clone(), s.topic, verify_checksums).expect("reader");
    let mut seqs = vec![0u64; BROKERS as usize];
    let (mut bytes, mut message_bytes_seen) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < MEASURE {
        for (b, writer) in s.writers.iter_mut().enumerate() {
            for _ in 0..32 {
                let meta = BatchMeta {
                    client_id: b as u64,
                    session_epoch: 1,
                    batch_seq: seqs[b],
                    message_count: BIG_MESSAGES as u32,
                    checksum,
                    flags: 0,
                };
                let mut reservation = writer.reserve(data.len() as u64).expect("room");
                writer.write_payload(&mut reservation, &data);
                writer.commit(reservation, meta).expect("no claim to lose");
                seqs[b] += 1;
            }
        }
        while s.sequencer.poll(Timestamp::ZERO) > 0 {}
        reader
            .poll(usize::MAX, |batch| {
                message_bytes_seen += batch.messages().map(|m| m.len() as u64).sum::<u64>();
            })
            .expect("read");
        for writer in &mut s.writers {
            while writer.poll_completions(usize::MAX, |_| {}) > 0 {}
        }
        bytes += 32 * u64::from(BROKERS) * data.len() as u64;
    }
    assert_eq!(
        message_bytes_seen,
        bytes / data.len() as u64 * (BIG_MESSAGES * BIG_MESSAGE_BYTES) as u64
    );
    bytes as f64 / started.elapsed().as_secs_f64()
}

/// memcpy of the same batches into a 4 x 64 MiB destination, the baseline.
fn memcpy_rate() -> f64 {
    let data = payload(BIG_MESSAGE_BYTES, BIG_MESSAGES);
    let mut destination = vec![0u8; 4 * (64 << 20)];
    let slots = destination.len() / data.len();
    let (mut bytes, mut next) = (0u64, 0usize);
    let started = Instant::now();
    while started.elapsed() < MEASURE {
        for _ in 0..128 {
            let at = (next % slots) * data.len();
            destination[at..at + data.len()].copy_from_slice(&data);
            next += 1;
        }
        bytes += 128 * data.len() as u64;
    }
    std::hint::black_box(&destination);
    bytes as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let core = core_affinity::get_core_ids().and_then(|ids| ids.last().copied());
    let pinned = core.is_some_and(core_affinity::set_for_current);
    let core_label = match (core, pinned) {
        (Some(id), true) => format!("pinned to core {}", id.id),
        _ => "not pinned".to_owned(),
    };
    println!("log core benchmark, one thread {core_label}, {BROKERS} broker rings, order 5");
    let memcpy = memcpy_rate();
    let mut rows = Vec::new();
    for mode in [CoherenceMode::NonCoherent, CoherenceMode::Coherent] {
        let rate = sequencing_rate(mode);
        let plain = payload_path(mode, false);
        let checked = payload_path(mode, true);
        rows.push((mode, rate, plain, checked));
    }
    println!(
        "{:<12} {:>20} {:>24} {:>9} {:>24} {:>9}",
        "mode",
        "batches sequenced/s",
        "write+seq+read GB/s",
        "x memcpy",
        "same + read CRC GB/s",
        "x memcpy"
    );
    for (mode, rate, plain, checked) in &rows {
        println!(
            "{:<12} {:>20.0} {:>24.2} {:>9.2} {:>24.2} {:>9.2}",
            mode.to_string(),
            rate,
            plain / 1e9,
            plain / memcpy,
            checked / 1e9,
            checked / memcpy
        );
    }
    println!(
        "{:<12} {:>20} {:>24.2} {:>9.2}",
        "memcpy",
        "-",
        memcpy / 1e9,
        1.0
    );
    let json_rows: Vec<String> = rows
        .iter()
        .map(|(mode, rate, plain, checked)| {
            format!(
                "{{\"mode\":\"{mode}\",\"batches_sequenced_per_s\":{rate:.0},\"payload_bytes_per_s\":{plain:.0},\"ratio_to_memcpy\":{:.3},\"payload_bytes_per_s_read_crc\":{checked:.0},\"ratio_to_memcpy_read_crc\":{:.3}}}",
                plain / memcpy,
                checked / memcpy
            )
        })
        .collect();
    let json = format!(
        "{{\"pinning\":\"{core_label}\",\"brokers\":{BROKERS},\"small_payload_bytes\":{SMALL_PAYLOAD_BYTES},\"big_batch_bytes\":{},\"memcpy_bytes_per_s\":{memcpy:.0},\"modes\":[{}]}}\n",
        BIG_MESSAGES * (BIG_MESSAGE_BYTES + 4),
        json_rows.join(",")
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(dir.join("core.json"), json).is_ok()
    {
        println!("wrote target/bench/core.json");
    }
}
