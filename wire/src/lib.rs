//! The Embarcadero-rs wire protocol.
//!
//! [`payload`] is the format of a batch's messages, shared by the network frames and the
//! payload log in the pool (the broker stores the wire payload verbatim).

pub mod payload;
