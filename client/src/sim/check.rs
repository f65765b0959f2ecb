//! The contracts a finished run must keep (see the module docs of [`super`]).

use std::collections::HashMap;

use shared_log::reader::LogReader;
use wire::Order;

use super::{World, message_bytes, message_identity};

/// Checks a run whose publishers and subscribers are done.
pub(super) fn check(world: &World) -> Result<(), String> {
    // The whole log, read back from the pool (it is sized never to wrap in a run).
    let mut reader = LogReader::new(world.pool.clone(), world.topic, true)
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
    if let Some(failure) = failure {
        return Err(failure);
    }
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
