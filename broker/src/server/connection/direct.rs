//! Payload placed by the transport straight into a batch's reservation, without a copy
//! through the transport's buffers (the bypass path: docs/xdp.md, "Receive path").

use std::ptr::NonNull;

use shared_log::coherence::PoolMemory;

use super::*;

/// The unfilled rest of the payload a connection is receiving, in its reservation in the
/// mapped pool: lent to the transport for one receive (see [`Transport::receive`]).
///
/// [`Transport::receive`]: crate::server::serve::Transport::receive
#[derive(Debug)]
pub struct PayloadTarget {
    start: NonNull<u8>,
    bytes: usize,
}

impl PayloadTarget {
    /// The target as a slice for the transport's receive, which it was lent for.
    ///
    /// # Safety
    ///
    /// The slice must be gone (taken back from wherever the transport posted it) before the
    /// receive that the target was lent for returns: then the connection, which is not
    /// serviced during a receive, has not finished, aborted or staged the batch meanwhile.
    pub unsafe fn into_slice(self) -> &'static mut [u8] {
        // SAFETY: `start..start + bytes` is the unfilled rest of a reservation that was live
        // when `Connection::payload_target` made this target, inside the pool's mapping
        // (which the loop's state holds for as long as the loop runs, so past every
        // receive). Only its connection writes there, and it is not serviced while the
        // caller holds the slice (the caller's contract), so nothing else touches the range.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.bytes) }
    }
}

impl Connection<PoolMemory> {
    /// Where the stream's next bytes go when they all belong to the payload being received
    /// into the pool (the connection is reading, and has nothing read ahead): the unfilled
    /// rest of its reservation. `None` otherwise.
    pub fn payload_target(&self, state: &BrokerState<PoolMemory>) -> Option<PayloadTarget> {
        if self.closing || self.input_start != self.input_end || self.output.is_full() {
            return None;
        }
        let Peer::Publisher(publisher) = &self.role else {
            return None;
        };
        let Receiving::Payload {
            header,
            reservation,
            received,
            ..
        } = &publisher.receiving
        else {
            return None;
        };
        let (at, end) = (*received as usize, header.payload_bytes as usize);
        if at == end {
            return None;
        }
        Some(state.fill_batch(publisher.topic, reservation, |payload| {
            let rest = &mut payload[at..end];
            PayloadTarget {
                bytes: rest.len(),
                start: NonNull::from(rest).cast(),
            }
        }))
    }

    /// `bytes` of the payload landed at the start of the target [`Self::payload_target`]
    /// gave: booked as received (checksummed, and the batch finished once complete) as if
    /// read from the stream, without a copy.
    pub fn payload_placed(
        &mut self,
        bytes: usize,
        state: &mut BrokerState<PoolMemory>,
        now: Timestamp,
    ) {
        state
            .metrics()
            .bytes_received_direct
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let read = PayloadRead {
            bytes,
            buffered: false,
        };
        self.payload_arrived(Ok(read), state, now);
    }
}
