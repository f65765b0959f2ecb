//! The Embarcadero-rs wire protocol (version 4), described in `docs/protocol.md`.
//!
//! Every frame is an 8-byte [`FrameHeader`] and a body. Each body type has a checked view
//! over bytes (`Xxx::new_checked`, field accessors and setters) and a typed `XxxRepr` with
//! `parse`, `buffer_len` and `emit`, in the style of smoltcp. All integers are little endian.
//! Parsers check every length against [`Limits`] and never panic on any input.
//!
//! Batch and Delivery frames carry a payload ([`payload`]: length-prefixed messages, the
//! format the broker stores verbatim). Their fixed headers ([`BatchHeader`], 32 bytes;
//! [`DeliveryHeader`], 48 bytes) let a receiver read the payload straight into its
//! destination and check it afterwards with [`verify_payload`]. [`FrameDecoder`] drives this
//! over a byte stream without doing any I/O.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ack;
mod batch;
mod bytes;
mod decoder;
mod delivery;
mod error;
mod error_frame;
mod frame;
mod hello;
mod limits;
pub mod payload;
pub mod record_batch;
mod redirect;
mod topic;
mod types;

#[cfg(test)]
mod proptests;

pub use ack::{
    ACK_BODY_BYTES_MAX, ACK_ENTRIES_MAX, ACK_ENTRY_BYTES, ACK_FIXED_BYTES, Ack, AckEntry, AckRepr,
    AckStatus,
};
pub use batch::{
    BATCH_HEADER_BYTES, BATCH_PREFIX_BYTES, BatchHeader, BatchHeaderRepr, PayloadHeader,
    verify_checksummed_payload, verify_payload,
};
pub use decoder::{Decoded, FrameDecoder};
pub use delivery::{
    DELIVERY_HEADER_BYTES, DELIVERY_PREFIX_BYTES, DeliveryHeader, DeliveryHeaderRepr,
};
pub use error::{Error, ErrorCode};
pub use error_frame::{ERROR_FIXED_BYTES, ErrorFrame, ErrorFrameRepr};
pub use frame::{FRAME_HEADER_BYTES, Frame, FrameHeader, FrameHeaderRepr, FrameKind};
pub use hello::{
    FROM_END, HELLO_FIXED_BYTES, HELLO_OK_BYTES, Hello, HelloOk, HelloOkRepr, HelloRepr, MAGIC,
    PRELUDE_BYTES, PROTOCOL_VERSION, Role, unique_client_id,
};
pub use limits::{
    BATCH_BYTES_DEFAULT, BATCH_BYTES_HARD_MAX, BATCH_BYTES_MIN, FRAME_BYTES_DEFAULT,
    FRAME_BYTES_HARD_MAX, FRAME_BYTES_MIN, Limits, LimitsError, REASON_BYTES_MAX, TOPIC_BYTES_MAX,
};
pub use redirect::{
    REDIRECT_BROKER_BYTES, REDIRECT_BROKERS_MAX, REDIRECT_FIXED_BYTES, Redirect, RedirectRepr,
};
pub use topic::{
    CREATE_TOPIC_FIXED_BYTES, CreateTopic, CreateTopicRepr, TOPIC_OK_FIXED_BYTES, TopicOk,
    TopicOkRepr,
};
pub use types::{AckLevel, HistoryRetention, Order, Retention, Topic};
