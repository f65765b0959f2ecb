//! Prints one JSON line describing a topic's log in a pool: batches, messages, and a digest
//! of every batch's (position, client, session epoch, sequence, payload CRC) in order. Two
//! logs with the same digest hold the same batches in the same order.
//!
//! ```text
//! log_digest POOL_PATH TOPIC
//! ```
//!
//! `scripts/faults.sh` compares the digest before a pool is lost with the digest of the
//! pool rebuilt from replicas.

use std::process::ExitCode;
use std::time::Duration;

use broker::server::{PoolSpec, open_pool};
use shared_log::coherence::CoherenceMode;
use shared_log::reader::LogReader;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, topic_name] = args.as_slice() else {
        eprintln!("usage: log_digest POOL_PATH TOPIC");
        return ExitCode::from(2);
    };
    let spec = PoolSpec {
        path: path.into(),
        format: None,
        allow_fallback: true,
        mode: CoherenceMode::default(),
        attach_timeout: Duration::from_secs(1),
    };
    let result = open_pool(&spec)
        .map_err(|e| e.to_string())
        .and_then(|pool| {
            let (topic, _) = pool
                .find_topic(topic_name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no topic {topic_name:?} in {path}"))?;
            let mut reader = LogReader::new(pool, topic, true).map_err(|e| e.to_string())?;
            let (mut batches, mut messages, mut digest) = (0u64, 0u64, 0u32);
            loop {
                let read = reader
                    .poll(4096, |batch| {
                        batches += 1;
                        messages += u64::from(batch.message_count);
                        let mut record = Vec::with_capacity(32);
                        record.extend_from_slice(&batch.global_start.to_le_bytes());
                        record.extend_from_slice(&batch.client_id.to_le_bytes());
                        record.extend_from_slice(&batch.session_epoch.to_le_bytes());
                        record.extend_from_slice(&batch.batch_seq.to_le_bytes());
                        record.extend_from_slice(&batch.checksum.to_le_bytes());
                        digest = wire::payload::checksum_append(digest, &record);
                    })
                    .map_err(|e| e.to_string())?;
                if read == 0 {
                    break;
                }
            }
            Ok((batches, messages, digest))
        });
    match result {
        Ok((batches, messages, digest)) => {
            println!(
                "{{\"topic\":\"{topic_name}\",\"batches\":{batches},\"messages\":{messages},\"digest\":\"{digest:08x}\"}}"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("log_digest: {e}");
            ExitCode::FAILURE
        }
    }
}
