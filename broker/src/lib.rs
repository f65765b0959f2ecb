//! Embarcadero-rs broker core: the shared pool layout, the coherence discipline, the
//! broker-side ring writer, the sequencer and the ordered reader.
//!
//! The core does no I/O and reads no clock: time comes in as an argument, memory through
//! [`coherence::SharedMemory`]. That is what lets [`sim`] drive it deterministically.

pub mod claim;
pub mod coherence;
pub mod heap;
pub mod layout;
pub mod metrics;
pub mod pool;
pub mod reader;
pub mod region;
pub mod sequencer;
pub mod server;
pub mod sim;
pub mod writer;

/// Ordering levels (docs/protocol.md), shared with the wire protocol.
pub use wire::Order;
/// How subscribers hold a topic's log (docs/protocol.md), shared with the wire protocol.
pub use wire::Retention;
