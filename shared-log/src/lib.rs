//! The Embarcadero-rs log core: the shared pool layout, the coherence discipline, the
//! broker-side ring writer, the sequencer (with its session table), the ordered reader and
//! the claims on broker ids.
//!
//! The core does no I/O and reads no clock: time comes in as an argument, memory through
//! [`coherence::SharedMemory`]. That is what lets [`sim`] drive it deterministically. The
//! servers that put it on a network live in the `broker` crate (docs/architecture.md).

pub mod claim;
pub mod coherence;
pub mod heap;
pub mod layout;
pub mod pool;
pub mod reader;
pub mod sequencer;
pub mod sessions;
pub mod sim;
pub mod writer;

/// How much history a topic's replicas keep on disk, shared with the wire protocol.
pub use wire::HistoryRetention;
/// Ordering levels (docs/protocol.md), shared with the wire protocol.
pub use wire::Order;
/// How subscribers hold a topic's log (docs/protocol.md), shared with the wire protocol.
pub use wire::Retention;
