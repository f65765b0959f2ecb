//! Publisher and subscriber library for Embarcadero-rs, speaking the wire protocol of
//! `docs/protocol.md` (through the `wire` crate) over kernel TCP.
//!
//! - [`Publisher`]: batches messages, numbers batches per session (`batch_seq` 0, 1, 2,
//!   ...), spreads them round-robin over `connections_per_broker` connections to every
//!   broker, bounds the batches in flight per connection, tracks cumulative Acks with
//!   their global positions and latency, and survives brokers that die (see
//!   [below](#broker-failures-resends-and-sessions)).
//! - [`Subscriber`]: reads Deliveries in global order, verifies each payload (length,
//!   CRC-32C, message framing) and checks that positions have no gaps or repeats.
//! - [`create_topic`]: the admin exchange (CreateTopic, TopicOk or Error).
//! - [`verify`]: self-checking messages and the exactly-once / order verifier used by the
//!   bundled load generator (`loadgen`), and [`summary`]: its JSON summary.
//!
//! The protocol logic is sans-IO (the publisher's state machine is fed frames, write
//! completions, connection results and the time); sockets live in thin adapters. Every connection is closed
//! with a Goodbye exchange on `close` and on drop, and errors never panic.
//!
//! ```no_run
//! use std::time::Duration;
//! use client::{Publisher, PublisherConfig, Subscriber, SubscriberConfig};
//!
//! # fn main() -> Result<(), client::ClientError> {
//! let brokers = vec!["127.0.0.1:9000".parse().unwrap(), "127.0.0.1:9001".parse().unwrap()];
//! let mut config = PublisherConfig::new(brokers.clone(), "orders");
//! config.order = 5;
//! config.connections_per_broker = 2;
//! let mut publisher = Publisher::connect(config)?;
//! assert_eq!(publisher.connection_count(), 4);
//! for i in 0..1000u32 {
//!     publisher.publish(&i.to_le_bytes())?;
//! }
//! publisher.close()?; // flush, Goodbye, close
//! println!("p99 ack latency: {} us", publisher.stats().ack_latency_us.p99);
//!
//! let mut subscriber_config = SubscriberConfig::new(brokers[0], "orders");
//! subscriber_config.order = 5;
//! let mut subscriber = Subscriber::connect(subscriber_config)?;
//! while let Some(batch) = subscriber.next_batch(Duration::from_millis(500))? {
//!     for message in batch.messages() {
//!         println!("{:?} from client {}: {message:?}", batch.global_start, batch.client_id);
//!     }
//! }
//! assert!(subscriber.stats().positions.is_clean());
//! # Ok(())
//! # }
//! ```
//!
//! # Broker failures, resends and sessions
//!
//! A publisher has `connections_per_broker x brokers` connection *slots*; batch `seq` of a
//! session goes to slot `seq % slots`, and slot `i` normally holds a connection to broker
//! `i % brokers`. When a slot's connection fails (end of stream, reset, write error, a
//! Goodbye the publisher did not ask for, or a broker that stopped answering: keep-alive and
//! `TCP_USER_TIMEOUT` end such a connection after
//! [`reconnect_timeout_ms`](PublisherConfig::reconnect_timeout_ms)), the publisher does not
//! fail:
//!
//! - It opens a new connection for the slot at once, in the background, to another broker
//!   that is up (the slots of one lost broker spread over the others; the lost broker is
//!   tried last), with the same client id and session epoch.
//! - On it, it resends every batch the failed connection had not acknowledged, with the
//!   same `batch_seq` and the same bytes, in `batch_seq` order, before the slot's newer
//!   batches. Brokers refuse a `batch_seq` that does not increase on a connection, so a
//!   resend always goes on a fresh connection, never on one that already carried a later
//!   batch. The in-flight limit still holds: batches waiting for a resend count in their
//!   slot's window, and publishing waits (or returns [`ClientError::WouldBlock`]) when it is
//!   full.
//! - It probes the lost broker in the background (backoff from 20 ms doubling to 1 s, for
//!   as long as the publisher runs); once that broker accepts a Hello again (a restarted
//!   broker accepts the same client id and epoch), the slot moves back to it as soon as what
//!   it sent elsewhere is acknowledged.
//! - A resent batch keeps the time it was first sealed, so its ack latency includes the
//!   recovery. [`PublisherStats`] counts `connections_lost`, `reconnects` and
//!   `batches_resent`; `batches_duplicate` counts resends the broker found in the log.
//!
//! It gives up, with a typed error, only when no slot has a connection for
//! `reconnect_timeout_ms` ([`ClientError::Unreachable`]; default 10 s) or when one batch
//! needed more than [`resends_max`](PublisherConfig::resends_max) resends
//! ([`ClientError::ResendLimit`]). Closing Error frames and protocol violations from a
//! broker still fail the publisher at once; what the broker reports about one batch
//! (`SessionGapSkipped`) is still a [`PublisherEvent::Rejected`] and the publisher goes on.
//!
//! `batch_seq` never wraps. A session that has used
//! [`session_batches_max`](PublisherConfig::session_batches_max) sequences (default
//! `u64::MAX`) waits until every one of its batches is acknowledged, then says Goodbye on
//! every connection and starts session epoch + 1 at `batch_seq` 0 on new connections
//! ([`Publisher::session_epoch`]). Brokers treat the new epoch as a new session; since the
//! old one drained first, order and deduplication hold across the roll-over.
//!
//! ## What the client guarantees
//!
//! - **Acknowledged means in the log exactly once.** A resend carries the same (client id,
//!   session epoch, batch seq), and the sequencer deduplicates within the session's window
//!   of 1,024 batches: a resend whose first copy reached the log is acknowledged with status
//!   `Duplicate` and the original global position ([`PublisherEvent::Acked`] with
//!   `duplicate: true`), and is not written again. (When the first copy is still held for
//!   an order-5 gap, the broker acknowledges the resend without a position.)
//! - **A resend that comes too late is an error, never a second copy.** A batch resent
//!   after the session's window moved past it (more than 1,024 later batches of the session
//!   ordered in between) is refused by the broker and reported as
//!   [`PublisherEvent::Rejected`]; its first copy is then in the log once or not at all.
//!   Keeping `in_flight_batches_max x connections` below 1,024 keeps every resend within the
//!   window.
//! - **Order.** Order 5: resends go out in `batch_seq` order and the sequencer holds later
//!   batches until a gap is filled, so each session's batches stay in send order across a
//!   failover, provided it completes within the brokers' hold timeout (a longer one lets the
//!   gap rule skip the missing batches, reported as `Rejected`). Orders 1 and 2: what one
//!   slot carries stays in send order across its connections.
//! - **Ack 0** promises nothing: a batch written to a connection that then fails may be
//!   lost; only batches not yet written are sent again.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod batcher;
mod config;
mod error;
mod net;
pub mod pacing;
mod publisher;
mod publisher_core;
mod publisher_io;
#[cfg(feature = "sim")]
pub mod sim;
mod stats;
mod subscriber;
pub mod summary;
pub mod verify;

pub use admin::{TopicCreated, TopicSpec, create_topic, create_topic_on_cluster};
pub use config::{
    BATCH_BYTES_MAX_DEFAULT, CONNECT_TIMEOUT_MS_DEFAULT, FLUSH_TIMEOUT_MS_DEFAULT,
    GOODBYE_TIMEOUT_MS_DEFAULT, IN_FLIGHT_BATCHES_MAX_DEFAULT, InFlightWindow, LINGER_US_DEFAULT,
    PUBLISH_TIMEOUT_MS_DEFAULT, PublisherConfig, RECONNECT_TIMEOUT_MS_DEFAULT, RESENDS_MAX_DEFAULT,
    SESSION_BATCHES_MAX_DEFAULT, SOCKET_BUFFER_BYTES_DEFAULT, SubscriberConfig, default_client_id,
    default_session_epoch,
};
pub use error::ClientError;
pub use publisher::Publisher;
pub use publisher_core::PublisherEvent;
pub use stats::{
    LATENCY_US_MAX, LatencySummary, PercentilePoint, PublisherStats, latency_histogram,
    percentile_distribution,
};
pub use subscriber::{
    DeliveredBatch, PositionCheck, PositionChecker, PositionReport, Subscriber, SubscriberStats,
};
