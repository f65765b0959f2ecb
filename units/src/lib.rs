//! The units of measure of the project: byte sizes as operators write them ([`parse_bytes`])
//! and points in monotonic time ([`Timestamp`]).
//!
//! No dependencies, so every crate may use it, the I/O-free log core included.

mod bytes;
mod time;

pub use bytes::{ByteCount, ParseBytesError, SIZE_HELP, parse_bytes, parse_bytes_as};
pub use time::Timestamp;
