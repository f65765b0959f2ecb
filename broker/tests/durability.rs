//! Durability without a network: replica files written by the replicator, and a lost pool
//! rebuilt from them with every batch at its old position.

use std::sync::Arc;
use std::time::Duration;

use std::path::Path;

use broker::server::replica::{
    ReplicaConfig, Replicator, Restored, SEGMENT_BYTES_DEFAULT, read_records, restore,
};
use shared_log::HistoryRetention;
use shared_log::Order;
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, TopicConfig};
use shared_log::reader::LogReader;
use shared_log::sequencer::{Sequencer, SequencerConfig};
use shared_log::writer::{BatchMeta, TopicWriter};
use units::Timestamp;

fn geometry() -> Geometry {
    Geometry {
        brokers_max: 4,
        topics_max: 4,
        ring_slots: 64,
        goi_entries: 1 << 12,
        blog_bytes: 4 << 20,
    }
}

fn new_pool() -> (Arc<HeapRegion>, Pool<PoolMemory>) {
    let region = Arc::new(HeapRegion::new(geometry().layout_bytes()));
    let pool = Pool::format(region.memory(CoherenceMode::NonCoherent), geometry(), 1).unwrap();
    (region, pool)
}

fn batch(tag: u64, messages: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    for i in 0..messages {
        let body = format!("batch {tag} message {i}");
        payload.extend_from_slice(&(body.len() as u32).to_le_bytes());
        payload.extend_from_slice(body.as_bytes());
    }
    payload
}

type Logged = (u64, u64, u32, u64, Vec<u8>);

fn read_all(pool: &Pool<PoolMemory>, topic: u32) -> Vec<Logged> {
    let mut reader = LogReader::new(pool.clone(), topic, true).unwrap();
    reader.seek(reader.log_start()).unwrap();
    let mut out = Vec::new();
    reader
        .poll(usize::MAX, |b| {
            out.push((
                b.global_start,
                b.client_id,
                b.session_epoch,
                b.batch_seq,
                b.payload.to_vec(),
            ))
        })
        .unwrap();
    out
}

/// A log written, replicated to `dir` in segments of `segment_bytes` under `history`, then
/// lost and rebuilt: the log as it was, the rebuilt pool and the region it lives in (kept
/// alive with it), what restore said, the topic's settings.
struct Rebuilt {
    before: Vec<Logged>,
    _region: Arc<HeapRegion>,
    pool: Pool<PoolMemory>,
    restored: Restored,
    config: TopicConfig,
}

impl Rebuilt {
    /// The rebuilt topic's id, once its settings are checked to be the original's.
    fn topic(&self) -> u32 {
        let (id, config) = self.pool.find_topic("kept").unwrap().unwrap();
        assert_eq!(config, self.config);
        id
    }
}

fn lose_and_rebuild(dir: &Path, segment_bytes: u64, history: HistoryRetention) -> Rebuilt {
    let _ = std::fs::remove_dir_all(dir);
    let (_region, pool) = new_pool();
    let config = TopicConfig {
        order: Order::TotalSessionFifo,
        ack: 2,
        replication_factor: 2,
        retention: shared_log::Retention::StallLimited,
        history,
    };
    let topic = pool.create_topic("kept", config).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut replicator = Replicator::new(
        pool.clone(),
        1,
        ReplicaConfig {
            dir: dir.to_owned(),
            sync_bytes: 1,
            sync_interval_us: 0,
            segment_bytes,
        },
    )
    .unwrap();
    let mut writers: Vec<_> = (0..3)
        .map(|b| TopicWriter::new(pool.clone(), topic, b).unwrap())
        .collect();
    // Two sessions spread over three brokers; session 2 skips seq 3 (the gap rule makes it
    // give up), so the rebuilt order must reproduce a log with a hole in a session.
    let mut now = Timestamp::ZERO;
    for seq in 0..12u64 {
        for client in [1u64, 2] {
            if client == 2 && seq == 3 {
                continue;
            }
            let data = batch(client * 100 + seq, 1 + (seq % 3) as u32);
            let meta = BatchMeta {
                client_id: client,
                session_epoch: 7,
                batch_seq: seq,
                message_count: 1 + (seq % 3) as u32,
                checksum: wire::payload::checksum(&data),
                flags: 0,
            };
            writers[(seq as usize + client as usize) % 3]
                .append(meta, &data)
                .unwrap();
        }
        now += Duration::from_secs(2);
        sequencer.poll(now);
        for writer in &mut writers {
            writer.poll_completions(usize::MAX, |_| {});
        }
        replicator.poll(Timestamp::now()).unwrap();
    }
    replicator.stop().unwrap();
    let before = read_all(&pool, topic);
    assert_eq!(before.len(), 23);
    drop((sequencer, replicator, writers, pool));

    let (region, rebuilt) = new_pool();
    let restored = restore(&rebuilt, 0, &[dir.to_owned()]).unwrap();
    Rebuilt {
        before,
        _region: region,
        pool: rebuilt,
        restored,
        config,
    }
}

#[test]
fn a_lost_pool_is_rebuilt_from_replicas_in_the_same_order() {
    let dir = std::env::temp_dir().join(format!("embarcadero-restore-{}", std::process::id()));
    let rebuilt = lose_and_rebuild(&dir, SEGMENT_BYTES_DEFAULT, HistoryRetention::UNLIMITED);
    assert_eq!(rebuilt.restored.topics.len(), 1);
    assert_eq!(rebuilt.restored.topics[0].end_ordinal, 23);
    let id = rebuilt.topic();
    assert_eq!(
        read_all(&rebuilt.pool, id),
        rebuilt.before,
        "same batches, positions, sessions and bytes"
    );
    // The head then takes a fresh lease, as on a new pool.
    Sequencer::new(rebuilt.pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pool_lost_after_retention_deleted_history_is_rebuilt_from_where_the_replica_starts() {
    let dir = std::env::temp_dir().join(format!(
        "embarcadero-restore-retained-{}",
        std::process::id()
    ));
    // Segments close after every sync (each poll syncs what it copied); retention keeps
    // about the last 200 bytes.
    let history = HistoryRetention { bytes: 200, ms: 0 };
    let case = lose_and_rebuild(&dir, 1, history);
    let topic = &case.restored.topics[0];
    assert!(
        topic.origin.ordinal > 0,
        "retention deleted something: {topic:?}"
    );
    assert_eq!(topic.end_ordinal, 23);
    let id = case.topic();
    let rebuilt = &case.pool;
    assert_eq!(rebuilt.topic_origin(id).unwrap(), topic.origin);
    let kept: Vec<Logged> = case
        .before
        .iter()
        .filter(|b| b.0 >= topic.origin.position)
        .cloned()
        .collect();
    assert_eq!(kept[0].0, topic.origin.position, "it begins at a batch");
    assert_eq!(
        read_all(rebuilt, id),
        kept,
        "the batches kept, as they were"
    );

    // The log goes on from its end, and a fresh replica starts at the topic's origin.
    let fresh = dir.join("fresh");
    let mut replicator = Replicator::new(
        rebuilt.clone(),
        2,
        ReplicaConfig {
            dir: fresh.clone(),
            sync_bytes: 1,
            sync_interval_us: 0,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
        },
    )
    .unwrap();
    let mut sequencer = Sequencer::new(rebuilt.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut writer = TopicWriter::new(rebuilt.clone(), id, 0).unwrap();
    let data = batch(999, 2);
    let meta = BatchMeta {
        client_id: 50,
        session_epoch: 1,
        batch_seq: 0,
        message_count: 2,
        checksum: wire::payload::checksum(&data),
        flags: 0,
    };
    writer.append(meta, &data).unwrap();
    let mut placed = None;
    for _ in 0..100 {
        sequencer.poll(Timestamp::now());
        writer.poll_completions(usize::MAX, |outcome| {
            placed = placed.or(outcome.global_start)
        });
        replicator.poll(Timestamp::now()).unwrap();
    }
    assert_eq!(placed, Some(topic.end_position));
    replicator.stop().unwrap();
    let records = read_records(&fresh, id).unwrap();
    assert_eq!(records[0].header.ordinal, topic.origin.ordinal);
    assert_eq!(records.last().unwrap().header.ordinal, topic.end_ordinal);
    assert_eq!(records.last().unwrap().payload, data);
    let _ = std::fs::remove_dir_all(&dir);
}
