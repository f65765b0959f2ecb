//! Durability without a network: replica files written by the replicator, and a lost pool
//! rebuilt from them with every batch at its old position.

use std::sync::Arc;
use std::time::Duration;

use broker::server::replica::{ReplicaConfig, Replicator, restore};
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

#[test]
fn a_lost_pool_is_rebuilt_from_replicas_in_the_same_order() {
    let dir = std::env::temp_dir().join(format!("embarcadero-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_region, pool) = new_pool();
    let config = TopicConfig {
        order: Order::TotalSessionFifo,
        ack: 2,
        replication_factor: 2,
        retention: shared_log::Retention::StallLimited,
    };
    let topic = pool.create_topic("kept", config).unwrap();
    let mut sequencer = Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let mut replicator = Replicator::new(
        pool.clone(),
        1,
        ReplicaConfig {
            dir: dir.clone(),
            sync_bytes: 1,
            sync_interval_us: 0,
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

    let (_region2, rebuilt) = new_pool();
    let restored = restore(&rebuilt, 0, std::slice::from_ref(&dir)).unwrap();
    assert_eq!(restored.topics.len(), 1);
    assert_eq!(restored.topics[0].1, 23);
    let (id, config_after) = rebuilt.find_topic("kept").unwrap().unwrap();
    assert_eq!(config_after, config);
    assert_eq!(
        read_all(&rebuilt, id),
        before,
        "same batches, positions, sessions and bytes"
    );
    // The head then takes a fresh lease, as on a new pool.
    Sequencer::new(rebuilt.clone(), 0, 1, SequencerConfig::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
