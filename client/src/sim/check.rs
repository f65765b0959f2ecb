//! The contracts a finished run must keep (see the module docs of [`super`]).

use std::collections::HashMap;
use std::sync::Arc;

use broker::server::replica::{
    RECORD_HEADER_BYTES, read_records, restore, segment_list, segment_path,
};
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::heap::HeapRegion;
use shared_log::pool::{Pool, TopicId};
use shared_log::reader::LogReader;
use wire::Order;

use super::{SimFault, World, message_bytes, message_identity};

/// The messages of `topic` in `pool`, from position 0 on; the log must start there.
fn read_log(pool: &Pool<PoolMemory>, topic: TopicId) -> Result<Vec<Vec<u8>>, String> {
    let mut reader = LogReader::new(pool.clone(), topic, true)
        .map_err(|e| format!("the topic is unreadable: {e}"))?;
    if reader.log_start() != 0 {
        return Err(format!(
            "the log starts at {}: the simulation's pool wrapped",
            reader.log_start()
        ));
    }
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut failure = None;
    reader
        .poll(usize::MAX, |batch| {
            if batch.global_start != log.len() as u64 && failure.is_none() {
                failure = Some(format!(
                    "batch {} starts at {} after {} messages",
                    batch.ordinal,
                    batch.global_start,
                    log.len()
                ));
            }
            for message in wire::payload::messages(batch.payload) {
                match message {
                    Ok(bytes) => log.push(bytes.to_vec()),
                    Err(e) => {
                        failure.get_or_insert(format!("batch {}: {e}", batch.ordinal));
                    }
                }
            }
        })
        .map_err(|e| format!("the log does not read back: {e}"))?;
    match failure {
        Some(failure) => Err(failure),
        None => Ok(log),
    }
}

/// The pool is lost at the end of a replicated run: every replica stops without a sync
/// (what it had not synced is lost), the log is rebuilt from the replica files into a fresh
/// pool, and every message acknowledged (at level 2) must be there, at its place, intact.
pub(super) fn pool_loss(world: &mut World) -> Result<(), String> {
    for broker in &mut world.brokers {
        if let Some(running) = broker.running.as_mut() {
            running.replicator = None;
        }
    }
    if world.fault == Some(SimFault::LoseSynced) {
        for dir in &world.replica_dirs {
            lose_last_record(dir, world.topic);
        }
    }
    let geometry = *world.pool.geometry();
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    let pool = Pool::format(region.memory(CoherenceMode::Coherent), geometry, 1)
        .map_err(|e| format!("a fresh pool: {e}"))?;
    restore(&pool, 0, &world.replica_dirs).map_err(|e| format!("restore failed: {e}"))?;
    let (topic, _) = pool
        .find_topic("sim")
        .map_err(|e| format!("the rebuilt topic table: {e}"))?
        .ok_or("restore did not rebuild the topic")?;
    let log = read_log(&pool, topic)?;
    for publisher in &world.publishers {
        for &(first, count, global_start) in &publisher.acked {
            let Some(start) = global_start else { continue };
            for i in 0..u64::from(count) {
                let position = (start + i) as usize;
                let intact = log.get(position).is_some_and(|bytes| {
                    message_identity(bytes).is_some_and(|(p, index, len)| {
                        (p, index) == (publisher.id, first + i)
                            && *bytes == message_bytes(p, index, len)
                    })
                });
                if !intact {
                    return Err(format!(
                        "after the pool was lost, message {} of publisher {} (acknowledged at \
                         ack 2, position {position}) is not in the log rebuilt from the replicas \
                         ({} messages)",
                        first + i,
                        publisher.id,
                        log.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Cuts the last record of a replica's log (the `lose-synced` fault).
fn lose_last_record(dir: &std::path::Path, topic: TopicId) {
    let (Ok(records), Ok(segments)) = (read_records(dir, topic), segment_list(dir, topic)) else {
        return;
    };
    let (Some(last), Some(&first)) = (records.last(), segments.last()) else {
        return;
    };
    // The segment's records end where the last one does (block padding may follow).
    let valid: usize = records
        .iter()
        .filter(|r| r.header.ordinal >= first)
        .map(|r| RECORD_HEADER_BYTES + r.payload.len())
        .sum();
    let cut = valid - (RECORD_HEADER_BYTES + last.payload.len());
    let path = segment_path(dir, topic, first);
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) {
        let _ = file.set_len(cut as u64);
    }
}

/// Checks a run whose publishers and subscribers are done.
pub(super) fn check(world: &World) -> Result<(), String> {
    // The whole log, read back from the pool (it is sized never to wrap in a run).
    let log = read_log(&world.pool, world.topic)?;
    // Every message in the log is one a publisher sent, intact, and there once.
    let mut place: HashMap<(u32, u64), u64> = HashMap::new();
    for (position, bytes) in log.iter().enumerate() {
        let Some((publisher, index, len)) = message_identity(bytes) else {
            return Err(format!(
                "position {position}: a message too short to be ours"
            ));
        };
        if *bytes != message_bytes(publisher, index, len) {
            return Err(format!(
                "position {position}: message {index} of publisher {publisher} is damaged"
            ));
        }
        if let Some(first) = place.insert((publisher, index), position as u64) {
            return Err(format!(
                "message {index} of publisher {publisher} is in the log twice, at {first} and \
                 {position}"
            ));
        }
    }
    for publisher in &world.publishers {
        let id = publisher.id;
        // Every acknowledged message is where its ack said.
        let mut settled = vec![false; publisher.total as usize];
        for &(first, count, global_start) in &publisher.acked {
            for i in 0..u64::from(count) {
                let index = first + i;
                let Some(&at) = place.get(&(id, index)) else {
                    return Err(format!(
                        "message {index} of publisher {id} was acknowledged and is not in the log"
                    ));
                };
                if let Some(start) = global_start
                    && at != start + i
                {
                    return Err(format!(
                        "message {index} of publisher {id} is at {at}; its ack said {}",
                        start + i
                    ));
                }
                settled[index as usize] = true;
            }
        }
        for &(first, count) in &publisher.rejected {
            for index in first..first + u64::from(count) {
                if let Some(slot) = settled.get_mut(index as usize) {
                    *slot = true;
                }
            }
        }
        // Liveness: every message was acknowledged or rejected with a reason.
        if let Some(index) = settled.iter().position(|done| !done) {
            return Err(format!(
                "message {index} of publisher {id} was neither acknowledged nor rejected"
            ));
        }
        // Order 5: a publisher's messages are in the log in its own order.
        if world.order == Order::TotalSessionFifo {
            let mut last: Option<(u64, u64)> = None;
            for index in 0..publisher.total {
                if let Some(&at) = place.get(&(id, index)) {
                    if let Some((before, before_at)) = last
                        && before_at > at
                    {
                        return Err(format!(
                            "publisher {id}: message {index} at {at} is before message {before} \
                             at {before_at}"
                        ));
                    }
                    last = Some((index, at));
                }
            }
        }
    }
    // Subscribers saw the log itself, from their start on.
    for (index, subscriber) in world.subscribers.iter().enumerate() {
        for (position, bytes) in &subscriber.received {
            if log.get(*position as usize) != Some(bytes) {
                return Err(format!(
                    "subscriber {index} got other bytes at {position} than the log holds"
                ));
            }
        }
    }
    Ok(())
}
