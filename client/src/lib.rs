//! Publisher and subscriber library for Embarcadero-rs, speaking the wire protocol of
//! `docs/protocol.md` (through the `wire` crate) over kernel TCP.
//!
//! - [`Publisher`]: batches messages, numbers batches per session (`batch_seq` 0, 1, 2,
//!   ...), spreads them round-robin over `connections_per_broker` connections to every
//!   broker, bounds the batches in flight per connection, and tracks cumulative Acks with
//!   their global positions and latency.
//! - [`Subscriber`]: reads Deliveries in global order, verifies each payload (length,
//!   CRC-32C, message framing) and checks that positions have no gaps or repeats.
//! - [`create_topic`]: the admin exchange (CreateTopic, TopicOk or Error).
//! - [`verify`]: self-checking messages and the exactly-once / order verifier used by the
//!   bundled load generator (`loadgen`), and [`summary`]: its JSON summary.
//!
//! The protocol logic is sans-IO (the publisher's state machine is fed frames, write
//! completions and the time); sockets live in thin adapters. Every connection is closed
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

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod batcher;
mod config;
mod error;
mod net;
mod publisher;
mod session;
mod stats;
mod subscriber;
pub mod summary;
pub mod verify;

pub use admin::{TopicCreated, TopicSpec, create_topic};
pub use config::{
    BATCH_BYTES_MAX_DEFAULT, CONNECT_TIMEOUT_MS_DEFAULT, FLUSH_TIMEOUT_MS_DEFAULT,
    GOODBYE_TIMEOUT_MS_DEFAULT, IN_FLIGHT_BATCHES_MAX_DEFAULT, LINGER_US_DEFAULT,
    PUBLISH_TIMEOUT_MS_DEFAULT, PublisherConfig, SOCKET_BUFFER_BYTES_DEFAULT, SubscriberConfig,
    default_client_id, default_session_epoch,
};
pub use error::ClientError;
pub use publisher::Publisher;
pub use session::PublisherEvent;
pub use stats::{LATENCY_US_MAX, LatencySummary, PublisherStats, latency_histogram};
pub use subscriber::{
    DeliveredBatch, PositionCheck, PositionChecker, PositionReport, Subscriber, SubscriberStats,
};
