//! Embarcadero-rs broker core: the shared pool layout, the coherence discipline, the
//! broker-side ring writer, the sequencer and the ordered reader.
//!
//! The core does no I/O and reads no clock: time comes in as an argument, memory through
//! [`coherence::SharedMemory`]. That is what lets [`sim`] drive it deterministically.

pub mod coherence;
pub mod heap;
pub mod layout;
pub mod pool;
pub mod reader;
pub mod region;
pub mod sequencer;
pub mod sim;
pub mod writer;

/// Ordering levels (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Order {
    /// No global order promised; per-broker arrival order.
    Unordered = 0,
    /// Per-broker FIFO per publisher.
    BrokerFifo = 1,
    /// One total order over all brokers.
    Total = 2,
    /// Total order, and each publisher session's batches in the order it sent them.
    TotalSessionFifo = 5,
}

impl TryFrom<u8> for Order {
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Order::Unordered),
            1 => Ok(Order::BrokerFifo),
            2 => Ok(Order::Total),
            5 => Ok(Order::TotalSessionFifo),
            other => Err(other),
        }
    }
}

impl std::fmt::Display for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", *self as u8)
    }
}
