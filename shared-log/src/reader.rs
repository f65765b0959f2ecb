//! Reading a topic in global order: GOI entries, then each batch's payload from its broker's
//! payload log, with the reader half of the coherence discipline on both.
//!
//! The GOI and the payload logs are rings: old entries and bytes are overwritten as new ones
//! arrive. A reader that falls a whole ring behind gets [`ReadError::Truncated`]; a payload
//! overwritten while it was being handed out is reported as [`ReadError::Overwritten`] after
//! the fact (a seqlock-style re-check of the writer's overwrite limit), so no torn batch is
//! ever passed off as good.

use crate::coherence::SharedMemory;
use crate::layout::{BATCH_RECORD_BATCHES, FRONTIER_WRITTEN, GoiEntry};
use crate::pool::{Pool, PoolError, TopicId, invalidate_and_fence, read_if_ready};

/// Why the log cannot be read at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The topic does not exist.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The position was overwritten: the reader fell behind by more than the log holds.
    #[error(
        "batch {ordinal} (from position {global_start}) was overwritten; the log is readable from position {log_start}"
    )]
    Truncated {
        /// Ordinal asked for.
        ordinal: u64,
        /// Its first global position (`u64::MAX` when its entry is gone too).
        global_start: u64,
        /// First position still readable (see [`LogReader::log_start`]): resume there.
        log_start: u64,
    },
    /// The payload was overwritten while it was being read: discard the last batch handed out.
    #[error("batch {ordinal} was overwritten while it was read: discard it")]
    Overwritten {
        /// Ordinal of the torn batch.
        ordinal: u64,
    },
    /// The position is past the end of the log.
    #[error("position {position} is beyond the end of the log ({end})")]
    BeyondEnd {
        /// Position asked for.
        position: u64,
        /// First position not yet written.
        end: u64,
    },
    /// The payload does not match its entry (checksum or message framing).
    #[error("batch {ordinal} is corrupt: {what}")]
    Corrupt {
        /// Ordinal of the batch.
        ordinal: u64,
        /// What did not match.
        what: String,
    },
}

/// One batch in global order, with its payload borrowed from the pool.
#[derive(Debug, Clone, Copy)]
pub struct OrderedBatch<'a> {
    /// Place of the batch in the topic's order (0, 1, 2, ...).
    pub ordinal: u64,
    /// Global position of the first message.
    pub global_start: u64,
    /// Messages in the batch.
    pub message_count: u32,
    /// Broker that received it.
    pub broker: u16,
    /// Publisher id.
    pub client_id: u64,
    /// Publisher session epoch.
    pub session_epoch: u32,
    /// Publisher batch sequence.
    pub batch_seq: u64,
    /// The batch's flags (see [`crate::layout::BATCH_SEQ_COUNTS_MESSAGES`] and
    /// [`BATCH_RECORD_BATCHES`]).
    pub flags: u8,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// Where the payload lies in the pool (a send straight from the pool names it so).
    pub pool_offset: u64,
    /// Its place in its broker's payload log (compared with [`LogReader::overwrite_limit`]).
    pub blog_offset: u64,
    /// The payload: length-prefixed messages (see `wire::payload`), or Kafka record
    /// batches when the flags have [`BATCH_RECORD_BATCHES`].
    pub payload: &'a [u8],
}

impl<'a> OrderedBatch<'a> {
    /// Whether the payload is Kafka record batches ([`BATCH_RECORD_BATCHES`]).
    pub fn is_record_batches(&self) -> bool {
        self.flags & BATCH_RECORD_BATCHES != 0
    }

    /// The batch's messages: each message, or each record's value (a null value reads as
    /// an empty message; keys, headers and timestamps are Kafka's to read). The payload's
    /// framing was validated before it was handed out; a record that does not read ends
    /// the messages (only an uncompressed batch's records read).
    pub fn messages(&self) -> Messages<'a> {
        if self.is_record_batches() {
            let records = wire::record_batch::batches(self.payload)
                .map_while(Result::ok)
                .flat_map(|batch| batch.records().map_while(Result::ok))
                .map(|record| record.value.unwrap_or_default());
            Messages::Records(Box::new(records))
        } else {
            Messages::Native(wire::payload::messages(self.payload))
        }
    }
}

/// The messages of an [`OrderedBatch`], in either payload format.
pub enum Messages<'a> {
    /// Length-prefixed messages.
    Native(wire::payload::Messages<'a>),
    /// Record values of Kafka record batches.
    Records(Box<dyn Iterator<Item = &'a [u8]> + 'a>),
}

impl<'a> Iterator for Messages<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Messages::Native(messages) => messages.next()?.ok(),
            Messages::Records(records) => records.next(),
        }
    }
}

impl std::fmt::Debug for Messages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Messages::Native(_) => "Messages::Native",
            Messages::Records(_) => "Messages::Records",
        })
    }
}

/// A cursor over one topic in global order.
#[derive(Debug)]
pub struct LogReader<M> {
    pool: Pool<M>,
    topic: TopicId,
    next_ordinal: u64,
    /// The topic's first ordinal (past 0 for a topic restored from a replica whose oldest
    /// segments were deleted): no batch before it ever existed in this pool.
    origin_ordinal: u64,
    verify_checksums: bool,
}

/// Batches after a found boundary that [`LogReader::log_start`] checks for readability.
const READABLE_CHECK_BATCHES: u64 = 256;

impl<M: SharedMemory> LogReader<M> {
    /// A reader of `topic` from its first batch (its origin). With `verify_checksums`, every payload's
    /// CRC-32C is checked against its GOI entry before it is handed out.
    pub fn new(
        pool: Pool<M>,
        topic: TopicId,
        verify_checksums: bool,
    ) -> Result<LogReader<M>, ReadError> {
        pool.topic_config(topic)?;
        let origin = pool.topic_origin(topic)?;
        Ok(LogReader {
            pool,
            topic,
            next_ordinal: origin.ordinal,
            origin_ordinal: origin.ordinal,
            verify_checksums,
        })
    }

    /// (batches committed, next global position): the current end of the log.
    pub fn log_end(&self) -> (u64, u64) {
        self.pool
            .read_frontier(self.pool.geometry().seq_state_offset(self.topic))
    }

    /// First global position still readable: the start of the oldest batch from which on
    /// every batch's GOI entry and payload are still held (the end of the log when none is).
    /// A subscriber may start there.
    pub fn log_start(&self) -> u64 {
        let (committed, end) = self.log_end();
        let first = self.first_readable_ordinal(committed);
        if first == committed {
            return end;
        }
        self.read_entry(first)
            .map_or(end, |entry| entry.global_start)
    }

    /// Whether batch `ordinal`'s entry and payload are both still held.
    fn readable(&self, ordinal: u64) -> bool {
        self.read_entry(ordinal).is_some_and(|entry| {
            self.pool.check_broker(entry.broker).is_ok()
                && entry.blog_offset >= self.overwrite_limit(entry.broker)
        })
    }

    /// The oldest ordinal from which on every batch is readable ([`Self::readable`]).
    ///
    /// Payload logs are overwritten oldest first, so readability grows with the ordinal, but
    /// not strictly: each broker's log wraps at its own pace, and a batch reserved early may
    /// be ordered late. So a binary search finds the boundary, and the batches after it are
    /// checked (up to [`READABLE_CHECK_BATCHES`], so that a Hello costs little); an unreadable
    /// one moves the search past it.
    fn first_readable_ordinal(&self, committed: u64) -> u64 {
        let mut low = self.earliest_ordinal(committed);
        loop {
            let mut high = committed;
            while low < high {
                let mid = low + (high - low) / 2;
                if self.readable(mid) {
                    high = mid;
                } else {
                    low = mid + 1;
                }
            }
            let checked_end = committed.min(low.saturating_add(READABLE_CHECK_BATCHES));
            match (low..checked_end)
                .rev()
                .find(|&ordinal| !self.readable(ordinal))
            {
                Some(unreadable) => low = unreadable + 1,
                None => return low,
            }
        }
    }

    /// A [`ReadError::Truncated`] for `ordinal`, naming where the log is readable from now.
    fn truncated(&self, ordinal: u64, global_start: u64) -> ReadError {
        ReadError::Truncated {
            ordinal,
            global_start,
            log_start: self.log_start(),
        }
    }

    /// This reader's view of the pool.
    pub fn pool(&self) -> &Pool<M> {
        &self.pool
    }

    /// The topic read.
    pub fn topic(&self) -> TopicId {
        self.topic
    }

    /// Ordinal of the next batch this reader hands out.
    pub fn next_ordinal(&self) -> u64 {
        self.next_ordinal
    }

    /// Moves the cursor to batch `ordinal` (a replica resuming after its last record).
    pub fn set_next_ordinal(&mut self, ordinal: u64) {
        self.next_ordinal = ordinal;
    }

    fn earliest_ordinal(&self, committed: u64) -> u64 {
        committed
            .saturating_sub(self.pool.geometry().goi_entries)
            .max(self.origin_ordinal)
    }

    fn read_entry(&self, ordinal: u64) -> Option<GoiEntry> {
        let offset = self.pool.geometry().goi_offset(self.topic, ordinal);
        invalidate_and_fence(
            self.pool.mem(),
            offset,
            std::mem::size_of::<GoiEntry>() as u64,
        );
        read_if_ready::<M, GoiEntry>(self.pool.mem(), offset, ordinal + 1)
    }

    /// Moves the cursor to the batch that holds global position `position`.
    pub fn seek(&mut self, position: u64) -> Result<(), ReadError> {
        let (committed, end) = self.log_end();
        if position > end {
            return Err(ReadError::BeyondEnd { position, end });
        }
        if position == end {
            self.next_ordinal = committed;
            return Ok(());
        }
        let earliest = self.earliest_ordinal(committed);
        let truncated = |ordinal| self.truncated(ordinal, position);
        // Binary search for the last entry whose start is <= position.
        let (mut low, mut high) = (earliest, committed);
        let first = self.read_entry(low).ok_or_else(|| truncated(low))?;
        if first.global_start > position {
            return Err(truncated(low));
        }
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            let entry = self.read_entry(mid).ok_or_else(|| truncated(mid))?;
            if entry.global_start <= position {
                low = mid;
            } else {
                high = mid;
            }
        }
        self.next_ordinal = low;
        Ok(())
    }

    /// The overwrite limit of `broker`'s payload log: payloads from this offset on are still
    /// held. Writers move it before they overwrite, so bytes copied out before a read of it
    /// that still covers them were intact (a seqlock's re-check).
    pub fn overwrite_limit(&self, broker: u16) -> u64 {
        let geometry = self.pool.geometry();
        self.pool
            .read_frontier(geometry.frontier_offset(self.topic, broker, FRONTIER_WRITTEN))
            .1
    }

    /// Hands the next batches in order to `f`, at most `max_batches`; returns how many.
    ///
    /// On [`ReadError::Overwritten`] the last batch handed to `f` must be discarded; the
    /// cursor stays on it.
    pub fn poll(
        &mut self,
        max_batches: usize,
        f: impl FnMut(&OrderedBatch<'_>),
    ) -> Result<usize, ReadError> {
        self.poll_within(max_batches, u64::MAX, f)
    }

    /// Like [`Self::poll`], and stops once the payloads handed out reach `max_bytes` (the
    /// batch that crosses it is handed out whole; no batch is when `max_bytes` is 0).
    pub fn poll_within(
        &mut self,
        max_batches: usize,
        max_bytes: u64,
        mut f: impl FnMut(&OrderedBatch<'_>),
    ) -> Result<usize, ReadError> {
        let (committed, _) = self.log_end();
        let mut delivered = 0;
        let mut bytes = 0u64;
        while delivered < max_batches && bytes < max_bytes && self.next_ordinal < committed {
            let ordinal = self.next_ordinal;
            let earliest = self.earliest_ordinal(committed);
            let truncated = |global_start| self.truncated(ordinal, global_start);
            if ordinal < earliest {
                return Err(truncated(u64::MAX));
            }
            let entry = self
                .read_entry(ordinal)
                .ok_or_else(|| truncated(u64::MAX))?;
            let broker = entry.broker;
            if self.pool.check_broker(broker).is_err() {
                return Err(ReadError::Corrupt {
                    ordinal,
                    what: format!("GOI entry names broker {broker}"),
                });
            }
            if entry.blog_offset < self.overwrite_limit(broker) {
                return Err(truncated(entry.global_start));
            }
            let geometry = *self.pool.geometry();
            let offset = geometry.blog_offset(self.topic, broker, entry.blog_offset);
            let len = u64::from(entry.payload_bytes);
            if entry.blog_offset % geometry.blog_bytes + len > geometry.blog_bytes {
                return Err(ReadError::Corrupt {
                    ordinal,
                    what: format!(
                        "payload at {} (+{len}) crosses the log end",
                        entry.blog_offset
                    ),
                });
            }
            invalidate_and_fence(self.pool.mem(), offset, len);
            let verify = self.verify_checksums;
            self.pool
                .mem()
                .with_bytes(offset, len, |payload| {
                    if verify {
                        let computed = wire::payload::checksum(payload);
                        if computed != entry.checksum {
                            return Err(format!(
                                "checksum {computed:#010x}, entry says {:#010x}",
                                entry.checksum
                            ));
                        }
                    }
                    if entry.flags as u8 & BATCH_RECORD_BATCHES != 0 {
                        wire::record_batch::validate(payload, entry.message_count)
                            .map_err(|e| e.to_string())?;
                    } else {
                        wire::payload::validate(payload, entry.message_count)
                            .map_err(|e| e.to_string())?;
                    }
                    f(&OrderedBatch {
                        ordinal,
                        global_start: entry.global_start,
                        message_count: entry.message_count,
                        broker,
                        client_id: entry.client_id,
                        session_epoch: entry.session_epoch,
                        batch_seq: entry.batch_seq,
                        flags: entry.flags as u8,
                        checksum: entry.checksum,
                        pool_offset: offset,
                        blog_offset: entry.blog_offset,
                        payload,
                    });
                    Ok(())
                })
                .map_err(|what| {
                    // A mismatch on bytes that were overwritten meanwhile is a truncation.
                    if entry.blog_offset < self.overwrite_limit(broker) {
                        truncated(entry.global_start)
                    } else {
                        ReadError::Corrupt { ordinal, what }
                    }
                })?;
            if entry.blog_offset < self.overwrite_limit(broker) {
                return Err(ReadError::Overwritten { ordinal });
            }
            self.next_ordinal += 1;
            delivered += 1;
            bytes += len;
        }
        Ok(delivered)
    }
}
