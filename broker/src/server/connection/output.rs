//! A connection's queued output: owned frames (ACKs, errors, Goodbye) and deliveries, whose
//! payloads stay in the pool until the socket takes them. A send gathers the queue's front
//! into one vectored write: the delivery headers and the payloads straight from the mapped
//! pool, so the kernel's copy into its socket buffer (or smoltcp's into its transmit buffer)
//! is the only one.
//!
//! The log wraps, so a payload may be overwritten while it waits or while it is copied.
//! After every send, each payload it took bytes of is checked against its writer's
//! overwrite limit (which moves before the bytes are rewritten): still held means the bytes
//! that left were intact. A payload found overwritten before any of its frame left is
//! reported so that the connection can say so in an Error frame; one found overwritten after
//! part of its frame left is torn, and the connection must be reset.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use shared_log::coherence::SharedMemory;
use shared_log::reader::LogReader;
use wire::{DELIVERY_PREFIX_BYTES, Frame};

use super::ByteStream;

/// Deliveries stop being queued, and the connection's input is not read, while this much
/// output is queued (a peer that does not read its Acks is pushed back like a full pool).
pub(super) const OUTPUT_HIGH_WATER_BYTES: usize = 4 << 20;
/// ... or while this many pieces are (small deliveries would otherwise queue without bound
/// in pieces under the byte limit).
pub(super) const OUTPUT_PIECES_MAX: usize = 8192;
/// Owned frames are appended to the last piece up to this size, so that a peer that always
/// leaves a remainder unread does not keep one buffer growing.
const FRAMES_PIECE_BYTES: usize = 64 * 1024;
/// Pieces gathered into one vectored write (two slices each, well under `IOV_MAX`).
const PIECES_PER_SEND: usize = 64;

/// A delivery's payload, left in the pool until the socket takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PoolPayload {
    /// The batch's ordinal (the subscriber holds the log from the oldest one queued).
    pub(super) ordinal: u64,
    /// The batch's first global position (named in the error when it is overwritten).
    pub(super) global_start: u64,
    /// Broker whose payload log holds it.
    pub(super) broker: u16,
    /// The batch's place in that payload log (the overwrite check is on it).
    pub(super) blog_offset: u64,
    /// Where the bytes to send lie in the pool.
    pub(super) pool_offset: u64,
    /// How many bytes to send.
    pub(super) len: u64,
}

#[derive(Debug)]
enum Piece {
    Frames(Vec<u8>),
    Delivery {
        header: [u8; DELIVERY_PREFIX_BYTES],
        payload: PoolPayload,
    },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Frames(bytes) => bytes.len(),
            Piece::Delivery { payload, .. } => DELIVERY_PREFIX_BYTES + payload.len as usize,
        }
    }
}

/// Why a send stopped short of the stream.
#[derive(Debug)]
pub(super) enum SendFailure {
    /// The stream failed or ended.
    Stream(io::Error),
    /// The front delivery's payload was overwritten before any of its frame left: it and
    /// every delivery after it were dropped from the queue.
    Overwritten(PoolPayload),
    /// A delivery's payload was overwritten after part of its frame left: the bytes sent may
    /// be torn, and the connection must be reset.
    Torn(PoolPayload),
}

/// The queued output of one connection. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Output {
    pieces: VecDeque<Piece>,
    /// Bytes of the front piece already sent.
    front_sent: usize,
    /// Bytes queued and not yet sent.
    queued_bytes: usize,
}

impl Output {
    /// Bytes queued and not yet sent.
    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// True when nothing is queued.
    pub(super) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// True at the high-water mark (in bytes or in pieces): nothing more should be queued.
    pub(super) fn is_full(&self) -> bool {
        self.queued_bytes > OUTPUT_HIGH_WATER_BYTES || self.pieces.len() >= OUTPUT_PIECES_MAX
    }

    /// Room left under the high-water mark, in bytes.
    pub(super) fn room_bytes(&self) -> usize {
        OUTPUT_HIGH_WATER_BYTES.saturating_sub(self.queued_bytes)
    }

    /// Pieces queued: a mark to [`Self::truncate`] back to.
    pub(super) fn mark(&self) -> usize {
        self.pieces.len()
    }

    /// Drops the pieces queued after `mark` (never the partly sent front).
    pub(super) fn truncate(&mut self, mark: usize) {
        let keep = mark.max(usize::from(self.front_sent > 0));
        for piece in self.pieces.drain(keep.min(self.pieces.len())..) {
            self.queued_bytes -= piece.len();
        }
    }

    /// Ordinal of the oldest batch with a delivery queued.
    pub(super) fn first_ordinal(&self) -> Option<u64> {
        self.pieces.iter().find_map(|piece| match piece {
            Piece::Delivery { payload, .. } => Some(payload.ordinal),
            Piece::Frames(_) => None,
        })
    }

    /// Queues an encoded frame.
    pub(super) fn push_frame(&mut self, frame: &Frame) {
        let appendable = match self.pieces.back() {
            Some(Piece::Frames(bytes)) => bytes.len() < FRAMES_PIECE_BYTES,
            _ => false,
        };
        if !appendable {
            self.pieces.push_back(Piece::Frames(Vec::new()));
        }
        if let Some(Piece::Frames(bytes)) = self.pieces.back_mut() {
            let before = bytes.len();
            frame.encode(bytes);
            self.queued_bytes += bytes.len() - before;
        }
    }

    /// Queues a delivery: its frame prefix, then its payload from the pool.
    pub(super) fn push_delivery(
        &mut self,
        header: [u8; DELIVERY_PREFIX_BYTES],
        payload: PoolPayload,
    ) {
        let piece = Piece::Delivery { header, payload };
        self.queued_bytes += piece.len();
        self.pieces.push_back(piece);
    }

    /// Queues a delivery whose payload is not in the pool (read from disk): its frame
    /// prefix and a copy of `payload`.
    pub(super) fn push_owned_delivery(
        &mut self,
        header: [u8; DELIVERY_PREFIX_BYTES],
        payload: &[u8],
    ) {
        let mut bytes = Vec::with_capacity(header.len() + payload.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
        self.queued_bytes += bytes.len();
        self.pieces.push_back(Piece::Frames(bytes));
    }

    /// Sends from the front of the queue in one vectored write, the payloads straight from
    /// `reader`'s pool; returns how many bytes the stream took (`WouldBlock` and
    /// `Interrupted` come back as stream failures for the caller to sort). Without a
    /// reader (not a subscriber) only owned frames are sent.
    pub(super) fn send<S: ByteStream, M: SharedMemory>(
        &mut self,
        stream: &mut S,
        reader: Option<&LogReader<M>>,
    ) -> Result<usize, SendFailure> {
        let mut ranges = Vec::new();
        let mut pieces = 0;
        // Before the bytes are read: a payload overwritten before any of its frame left can
        // be reported to the subscriber; the window stops before it unless it is the front.
        let mut before = reader.map(HeldCheck::new);
        for (index, piece) in self.pieces.iter().take(PIECES_PER_SEND).enumerate() {
            let started = if index == 0 { self.front_sent } else { 0 };
            if let Piece::Delivery { payload, .. } = piece {
                let Some(check) = &mut before else { break };
                if !check.held(payload) {
                    if index > 0 {
                        break;
                    }
                    // A started front is owned once the log may overwrite it (see
                    // `detach_started_front`): this one was overwritten while it was held.
                    let payload = *payload;
                    if started > 0 {
                        return Err(SendFailure::Torn(payload));
                    }
                    self.drop_deliveries();
                    return Err(SendFailure::Overwritten(payload));
                }
                let skipped = started.saturating_sub(DELIVERY_PREFIX_BYTES) as u64;
                ranges.push((payload.pool_offset + skipped, payload.len - skipped));
            }
            pieces += 1;
        }
        let sent = match reader {
            Some(reader) => reader
                .pool()
                .mem()
                .with_byte_ranges(&ranges, |payloads| self.write(stream, pieces, payloads)),
            None => self.write(stream, pieces, &[]),
        }
        .map_err(SendFailure::Stream)?;
        // Every payload the send took bytes of, checked again now that they were copied.
        if let Some(reader) = reader {
            let mut after = HeldCheck::new(reader);
            if let Some(payload) = self
                .touched_payloads(sent)
                .find(|payload| !after.held(payload))
            {
                return Err(SendFailure::Torn(payload));
            }
        }
        self.consume(sent);
        Ok(sent)
    }

    /// A delivery whose frame has started to leave must be finished with its own bytes, even
    /// if the log is overwritten before the stream takes the rest. While the subscriber holds
    /// the log its queue is safe; when it stops holding, the remainder of a partly sent front
    /// (at most one delivery) is copied out of the pool and checked after the copy like a
    /// send. Err: it was overwritten already, and the connection must be reset.
    pub(super) fn detach_started_front<M: SharedMemory>(
        &mut self,
        reader: &LogReader<M>,
    ) -> Result<(), PoolPayload> {
        let started = self.front_sent;
        let Some(Piece::Delivery { header, payload }) = self.pieces.front() else {
            return Ok(());
        };
        if started == 0 {
            return Ok(());
        }
        let mut rest = Vec::with_capacity(DELIVERY_PREFIX_BYTES + payload.len as usize - started);
        if started < DELIVERY_PREFIX_BYTES {
            rest.extend_from_slice(&header[started..]);
        }
        let skipped = started.saturating_sub(DELIVERY_PREFIX_BYTES) as u64;
        reader.pool().mem().with_bytes(
            payload.pool_offset + skipped,
            payload.len - skipped,
            |bytes| rest.extend_from_slice(bytes),
        );
        if !HeldCheck::new(reader).held(payload) {
            return Err(*payload);
        }
        self.pieces[0] = Piece::Frames(rest);
        self.front_sent = 0;
        Ok(())
    }

    /// One vectored write of the first `pieces` pieces, the remainder of the front first;
    /// `payloads` are the delivery payloads among them, in order.
    fn write<S: ByteStream>(
        &self,
        stream: &mut S,
        pieces: usize,
        payloads: &[&[u8]],
    ) -> io::Result<usize> {
        let mut slices = Vec::with_capacity(2 * pieces);
        let mut payloads = payloads.iter();
        for (index, piece) in self.pieces.iter().take(pieces).enumerate() {
            let started = if index == 0 { self.front_sent } else { 0 };
            match piece {
                Piece::Frames(bytes) => slices.push(IoSlice::new(&bytes[started..])),
                Piece::Delivery { header, .. } => {
                    if started < DELIVERY_PREFIX_BYTES {
                        slices.push(IoSlice::new(&header[started..]));
                    }
                    if let Some(payload) = payloads.next() {
                        slices.push(IoSlice::new(payload));
                    }
                }
            }
        }
        stream.send_vectored(&slices)
    }

    /// The payloads of which the next `sent` bytes of the queue take any.
    fn touched_payloads(&self, sent: usize) -> impl Iterator<Item = PoolPayload> + '_ {
        let mut at = 0usize;
        self.pieces
            .iter()
            .enumerate()
            .map_while(move |(index, piece)| {
                let started = if index == 0 { self.front_sent } else { 0 };
                let begin = at;
                at += piece.len() - started;
                // Lazily: `sent - begin` only exists for pieces the send reached.
                (begin < sent).then(|| (piece, started, sent - begin))
            })
            .filter_map(|(piece, started, taken)| match piece {
                Piece::Delivery { payload, .. } if started + taken > DELIVERY_PREFIX_BYTES => {
                    Some(*payload)
                }
                _ => None,
            })
    }

    /// Removes `sent` bytes from the front of the queue.
    fn consume(&mut self, mut sent: usize) {
        self.queued_bytes -= sent;
        while sent > 0 {
            let Some(front) = self.pieces.front() else {
                break;
            };
            let left = front.len() - self.front_sent;
            if sent < left {
                self.front_sent += sent;
                break;
            }
            sent -= left;
            self.front_sent = 0;
            self.pieces.pop_front();
        }
    }

    /// Drops every queued delivery (the connection is ending with an Error about them); none
    /// has started to leave.
    fn drop_deliveries(&mut self) {
        self.pieces
            .retain(|piece| matches!(piece, Piece::Frames(_)));
        self.queued_bytes = self.pieces.iter().map(Piece::len).sum::<usize>() - self.front_sent;
    }
}

/// The overwrite check of one moment: each broker's overwrite limit read once.
struct HeldCheck<'a, M> {
    reader: &'a LogReader<M>,
    limits: Vec<(u16, u64)>,
}

impl<'a, M: SharedMemory> HeldCheck<'a, M> {
    fn new(reader: &'a LogReader<M>) -> HeldCheck<'a, M> {
        HeldCheck {
            reader,
            limits: Vec::new(),
        }
    }

    /// Whether `payload` is still held (see [`LogReader::overwrite_limit`]).
    fn held(&mut self, payload: &PoolPayload) -> bool {
        let limit = match self.limits.iter().find(|(b, _)| *b == payload.broker) {
            Some(&(_, limit)) => limit,
            None => {
                let limit = self.reader.overwrite_limit(payload.broker);
                self.limits.push((payload.broker, limit));
                limit
            }
        };
        payload.blog_offset >= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(len: u64) -> ([u8; DELIVERY_PREFIX_BYTES], PoolPayload) {
        let payload = PoolPayload {
            ordinal: 0,
            global_start: 0,
            broker: 0,
            blog_offset: 0,
            pool_offset: 0,
            len,
        };
        ([1; DELIVERY_PREFIX_BYTES], payload)
    }

    #[test]
    fn a_send_takes_the_payloads_touched_by_its_bytes_and_no_others() {
        let mut output = Output::default();
        output.push_frame(&Frame::Goodbye);
        let goodbye = output.queued_bytes();
        let (header, payload) = delivery(100);
        output.push_delivery(header, payload);
        output.push_delivery(
            header,
            PoolPayload {
                ordinal: 1,
                ..payload
            },
        );
        // The frame and the first header: no payload byte left yet.
        let sent = goodbye + DELIVERY_PREFIX_BYTES;
        assert_eq!(output.touched_payloads(sent).count(), 0);
        // One payload byte more: the first payload is touched, the second is not.
        let touched: Vec<u64> = output
            .touched_payloads(sent + 1)
            .map(|p| p.ordinal)
            .collect();
        assert_eq!(touched, [0]);
        output.consume(sent + 1);
        assert_eq!(output.front_sent, DELIVERY_PREFIX_BYTES + 1);
        // From a partly sent front: its payload is touched by the next byte.
        let touched: Vec<u64> = output.touched_payloads(1).map(|p| p.ordinal).collect();
        assert_eq!(touched, [0]);
        let rest = output.queued_bytes();
        let touched: Vec<u64> = output.touched_payloads(rest).map(|p| p.ordinal).collect();
        assert_eq!(touched, [0, 1]);
        output.consume(rest);
        assert!(output.is_empty() && output.queued_bytes() == 0 && output.front_sent == 0);
    }

    #[test]
    fn truncating_and_dropping_deliveries_keep_the_partly_sent_front_and_the_byte_count() {
        let mut output = Output::default();
        let (header, payload) = delivery(100);
        output.push_delivery(header, payload);
        output.consume(10);
        let mark = output.mark();
        output.push_delivery(
            header,
            PoolPayload {
                ordinal: 1,
                ..payload
            },
        );
        output.push_frame(&Frame::Goodbye);
        let goodbye = Frame::Goodbye.to_bytes().len();
        output.truncate(0);
        assert_eq!(output.mark(), mark);
        assert_eq!(output.queued_bytes(), DELIVERY_PREFIX_BYTES + 100 - 10);
        output.consume(DELIVERY_PREFIX_BYTES + 100 - 10);
        output.push_delivery(
            header,
            PoolPayload {
                ordinal: 2,
                ..payload
            },
        );
        output.push_frame(&Frame::Goodbye);
        output.drop_deliveries();
        assert_eq!(output.first_ordinal(), None);
        assert_eq!(output.queued_bytes(), goodbye);
    }
}
