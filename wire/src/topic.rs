//! Topic administration: [`CreateTopic`] (first frame of an admin connection) and its answer
//! [`TopicOk`].
//!
//! CreateTopic body (28 bytes + topic):
//!
//! ```text
//! offset size field
//!      0    4 magic               b"EMBR"
//!      4    2 protocol_version    1
//!      6    1 order               0, 1, 2 or 5
//!      7    1 ack                 highest ack level the topic offers: 0, 1 or 2
//!      8    1 replication_factor  replicas besides the receiving broker; >= 1 if ack = 2
//!      9    1 topic_len           1..=64
//!     10    1 retention           0 stall-limited, 1 hold for subscribers (see `Retention`)
//!     11    1 reserved            0
//!     12    8 retention_bytes     disk history kept per replica; 0 = no limit
//!     20    8 retention_ms        age of disk history kept; 0 = no limit
//!     28    n topic
//! ```
//!
//! TopicOk body (24 bytes + topic):
//!
//! ```text
//! offset size field
//!      0    2 broker_id
//!      2    1 order
//!      3    1 ack
//!      4    1 replication_factor
//!      5    1 created             1 = created now, 0 = already existed with these settings
//!      6    1 topic_len
//!      7    1 retention           the topic's
//!      8    8 retention_bytes     the topic's
//!     16    8 retention_ms        the topic's
//!     24    n topic
//! ```

use crate::bytes::{magic_at, put, set_u16, set_u64, u16_at, u64_at};
use crate::error::Error;
use crate::hello::{MAGIC, PROTOCOL_VERSION, check_exact, check_prelude};
use crate::limits::Limits;
use crate::types::{AckLevel, HistoryRetention, Order, Retention, Topic};

/// Size of the fixed part of a CreateTopic body.
pub const CREATE_TOPIC_FIXED_BYTES: usize = 28;
/// Size of the fixed part of a TopicOk body.
pub const TOPIC_OK_FIXED_BYTES: usize = 24;

mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const ORDER: usize = 6;
    pub const ACK: usize = 7;
    pub const REPLICATION_FACTOR: usize = 8;
    pub const TOPIC_LEN: usize = 9;
    pub const RETENTION: usize = 10;
    pub const RESERVED: usize = 11;
    pub const RETENTION_BYTES: usize = 12;
    pub const RETENTION_MS: usize = 20;
    pub const TOPIC: usize = 28;
}

mod ok_field {
    pub const BROKER_ID: usize = 0;
    pub const ORDER: usize = 2;
    pub const ACK: usize = 3;
    pub const REPLICATION_FACTOR: usize = 4;
    pub const CREATED: usize = 5;
    pub const TOPIC_LEN: usize = 6;
    pub const RETENTION: usize = 7;
    pub const RETENTION_BYTES: usize = 8;
    pub const RETENTION_MS: usize = 16;
    pub const TOPIC: usize = 24;
}

fn check_settings(ack: AckLevel, replication_factor: u8) -> Result<(), Error> {
    if ack == AckLevel::Replicated && replication_factor == 0 {
        return Err(Error::ReplicationFactorZero);
    }
    Ok(())
}

/// A view over a CreateTopic body.
#[derive(Debug, Clone, Copy)]
pub struct CreateTopic<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> CreateTopic<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        CreateTopic { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let create = Self::new_unchecked(buffer);
        create.check_len()?;
        Ok(create)
    }

    /// Checks magic and version first, then that the body is exactly the fixed part plus
    /// `topic_len` bytes.
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        check_prelude(body, "create-topic body")?;
        check_exact(
            body.len(),
            CREATE_TOPIC_FIXED_BYTES,
            "create-topic body",
            || usize::from(body[field::TOPIC_LEN]),
        )
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        magic_at(self.buffer.as_ref(), field::MAGIC)
    }

    /// The protocol version.
    pub fn protocol_version(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::VERSION)
    }

    /// The raw order byte.
    pub fn order(&self) -> u8 {
        self.buffer.as_ref()[field::ORDER]
    }

    /// The raw ack level byte.
    pub fn ack(&self) -> u8 {
        self.buffer.as_ref()[field::ACK]
    }

    /// The replication factor.
    pub fn replication_factor(&self) -> u8 {
        self.buffer.as_ref()[field::REPLICATION_FACTOR]
    }

    /// Length of the topic name.
    pub fn topic_len(&self) -> u8 {
        self.buffer.as_ref()[field::TOPIC_LEN]
    }

    /// The raw retention byte.
    pub fn retention(&self) -> u8 {
        self.buffer.as_ref()[field::RETENTION]
    }

    /// The reserved byte.
    pub fn reserved(&self) -> u8 {
        self.buffer.as_ref()[field::RESERVED]
    }

    /// Disk history bytes kept per replica (0: no limit).
    pub fn retention_bytes(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::RETENTION_BYTES)
    }

    /// Age of disk history kept, in milliseconds (0: no limit).
    pub fn retention_ms(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::RETENTION_MS)
    }

    /// The raw topic bytes.
    pub fn topic(&self) -> &[u8] {
        let len = usize::from(self.topic_len());
        &self.buffer.as_ref()[field::TOPIC..field::TOPIC + len]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> CreateTopic<T> {
    /// Sets the magic bytes.
    pub fn set_magic(&mut self, magic: [u8; 4]) {
        put(self.buffer.as_mut(), field::MAGIC, &magic);
    }

    /// Sets the protocol version.
    pub fn set_protocol_version(&mut self, version: u16) {
        set_u16(self.buffer.as_mut(), field::VERSION, version);
    }

    /// Sets the order byte.
    pub fn set_order(&mut self, order: u8) {
        self.buffer.as_mut()[field::ORDER] = order;
    }

    /// Sets the ack level byte.
    pub fn set_ack(&mut self, ack: u8) {
        self.buffer.as_mut()[field::ACK] = ack;
    }

    /// Sets the replication factor.
    pub fn set_replication_factor(&mut self, factor: u8) {
        self.buffer.as_mut()[field::REPLICATION_FACTOR] = factor;
    }

    /// Sets the retention byte.
    pub fn set_retention(&mut self, retention: u8) {
        self.buffer.as_mut()[field::RETENTION] = retention;
    }

    /// Sets the reserved byte.
    pub fn set_reserved(&mut self, reserved: u8) {
        self.buffer.as_mut()[field::RESERVED] = reserved;
    }

    /// Sets the disk history bytes kept.
    pub fn set_retention_bytes(&mut self, bytes: u64) {
        set_u64(self.buffer.as_mut(), field::RETENTION_BYTES, bytes);
    }

    /// Sets the age of disk history kept.
    pub fn set_retention_ms(&mut self, ms: u64) {
        set_u64(self.buffer.as_mut(), field::RETENTION_MS, ms);
    }

    /// Sets `topic_len` and the topic bytes.
    pub fn set_topic(&mut self, topic: &Topic) {
        let buffer = self.buffer.as_mut();
        buffer[field::TOPIC_LEN] = topic.wire_len();
        put(buffer, field::TOPIC, topic.as_bytes());
    }
}

/// A parsed CreateTopic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CreateTopicRepr {
    /// Name of the topic.
    pub topic: Topic,
    /// Its ordering guarantee.
    pub order: Order,
    /// Highest ack level its publishers may ask for.
    pub ack: AckLevel,
    /// Replicas besides the receiving broker (at least 1 when `ack` is 2).
    pub replication_factor: u8,
    /// How its subscribers hold the log.
    pub retention: Retention,
    /// How much history each replica keeps on disk.
    pub history: HistoryRetention,
}

impl CreateTopicRepr {
    /// Parses a checked CreateTopic view.
    pub fn parse<T: AsRef<[u8]>>(create: &CreateTopic<T>, limits: &Limits) -> Result<Self, Error> {
        let order = Order::try_from(create.order())?;
        let ack = AckLevel::try_from(create.ack())?;
        check_settings(ack, create.replication_factor())?;
        let retention = Retention::try_from(create.retention())?;
        if create.reserved() != 0 {
            return Err(Error::NonZeroReserved {
                field: "create-topic reserved",
                value: create.reserved().into(),
            });
        }
        Ok(CreateTopicRepr {
            topic: Topic::from_bytes(create.topic(), limits.topic_bytes_max())?,
            order,
            ack,
            replication_factor: create.replication_factor(),
            retention,
            history: HistoryRetention {
                bytes: create.retention_bytes(),
                ms: create.retention_ms(),
            },
        })
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        CREATE_TOPIC_FIXED_BYTES + self.topic.as_bytes().len()
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, create: &mut CreateTopic<T>) {
        create.set_magic(MAGIC);
        create.set_protocol_version(PROTOCOL_VERSION);
        create.set_order(self.order as u8);
        create.set_ack(self.ack as u8);
        create.set_replication_factor(self.replication_factor);
        create.set_retention(self.retention as u8);
        create.set_reserved(0);
        create.set_retention_bytes(self.history.bytes);
        create.set_retention_ms(self.history.ms);
        create.set_topic(&self.topic);
    }
}

/// A view over a TopicOk body.
#[derive(Debug, Clone, Copy)]
pub struct TopicOk<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TopicOk<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        TopicOk { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let ok = Self::new_unchecked(buffer);
        ok.check_len()?;
        Ok(ok)
    }

    /// Checks that the body is exactly the fixed part plus `topic_len` bytes.
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        check_exact(body.len(), TOPIC_OK_FIXED_BYTES, "topic-ok body", || {
            usize::from(body[ok_field::TOPIC_LEN])
        })
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The broker's id.
    pub fn broker_id(&self) -> u16 {
        u16_at(self.buffer.as_ref(), ok_field::BROKER_ID)
    }

    /// The raw order byte.
    pub fn order(&self) -> u8 {
        self.buffer.as_ref()[ok_field::ORDER]
    }

    /// The raw ack level byte.
    pub fn ack(&self) -> u8 {
        self.buffer.as_ref()[ok_field::ACK]
    }

    /// The replication factor.
    pub fn replication_factor(&self) -> u8 {
        self.buffer.as_ref()[ok_field::REPLICATION_FACTOR]
    }

    /// The raw created flag.
    pub fn created(&self) -> u8 {
        self.buffer.as_ref()[ok_field::CREATED]
    }

    /// Length of the topic name.
    pub fn topic_len(&self) -> u8 {
        self.buffer.as_ref()[ok_field::TOPIC_LEN]
    }

    /// The raw retention byte.
    pub fn retention(&self) -> u8 {
        self.buffer.as_ref()[ok_field::RETENTION]
    }

    /// The topic's disk history bytes kept per replica.
    pub fn retention_bytes(&self) -> u64 {
        u64_at(self.buffer.as_ref(), ok_field::RETENTION_BYTES)
    }

    /// The topic's age of disk history kept.
    pub fn retention_ms(&self) -> u64 {
        u64_at(self.buffer.as_ref(), ok_field::RETENTION_MS)
    }

    /// The raw topic bytes.
    pub fn topic(&self) -> &[u8] {
        let len = usize::from(self.topic_len());
        &self.buffer.as_ref()[ok_field::TOPIC..ok_field::TOPIC + len]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TopicOk<T> {
    /// Sets the broker id.
    pub fn set_broker_id(&mut self, broker_id: u16) {
        set_u16(self.buffer.as_mut(), ok_field::BROKER_ID, broker_id);
    }

    /// Sets the order byte.
    pub fn set_order(&mut self, order: u8) {
        self.buffer.as_mut()[ok_field::ORDER] = order;
    }

    /// Sets the ack level byte.
    pub fn set_ack(&mut self, ack: u8) {
        self.buffer.as_mut()[ok_field::ACK] = ack;
    }

    /// Sets the replication factor.
    pub fn set_replication_factor(&mut self, factor: u8) {
        self.buffer.as_mut()[ok_field::REPLICATION_FACTOR] = factor;
    }

    /// Sets the created flag.
    pub fn set_created(&mut self, created: u8) {
        self.buffer.as_mut()[ok_field::CREATED] = created;
    }

    /// Sets the retention byte.
    pub fn set_retention(&mut self, retention: u8) {
        self.buffer.as_mut()[ok_field::RETENTION] = retention;
    }

    /// Sets the disk history bytes kept.
    pub fn set_retention_bytes(&mut self, bytes: u64) {
        set_u64(self.buffer.as_mut(), ok_field::RETENTION_BYTES, bytes);
    }

    /// Sets the age of disk history kept.
    pub fn set_retention_ms(&mut self, ms: u64) {
        set_u64(self.buffer.as_mut(), ok_field::RETENTION_MS, ms);
    }

    /// Sets `topic_len` and the topic bytes.
    pub fn set_topic(&mut self, topic: &Topic) {
        let buffer = self.buffer.as_mut();
        buffer[ok_field::TOPIC_LEN] = topic.wire_len();
        put(buffer, ok_field::TOPIC, topic.as_bytes());
    }
}

/// A parsed TopicOk: the topic exists with these settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicOkRepr {
    /// The answering broker.
    pub broker_id: u16,
    /// Name of the topic.
    pub topic: Topic,
    /// Its ordering guarantee.
    pub order: Order,
    /// Highest ack level its publishers may ask for.
    pub ack: AckLevel,
    /// Its replication factor.
    pub replication_factor: u8,
    /// Whether this request created it (false: it existed with identical settings).
    pub created: bool,
    /// How its subscribers hold the log.
    pub retention: Retention,
    /// How much history each replica keeps on disk.
    pub history: HistoryRetention,
}

impl TopicOkRepr {
    /// Parses a checked TopicOk view.
    pub fn parse<T: AsRef<[u8]>>(ok: &TopicOk<T>, limits: &Limits) -> Result<Self, Error> {
        let order = Order::try_from(ok.order())?;
        let ack = AckLevel::try_from(ok.ack())?;
        check_settings(ack, ok.replication_factor())?;
        let created = match ok.created() {
            0 => false,
            1 => true,
            value => {
                return Err(Error::InvalidBool {
                    field: "topic-ok created",
                    value,
                });
            }
        };
        let retention = Retention::try_from(ok.retention())?;
        Ok(TopicOkRepr {
            broker_id: ok.broker_id(),
            topic: Topic::from_bytes(ok.topic(), limits.topic_bytes_max())?,
            order,
            ack,
            replication_factor: ok.replication_factor(),
            created,
            retention,
            history: HistoryRetention {
                bytes: ok.retention_bytes(),
                ms: ok.retention_ms(),
            },
        })
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        TOPIC_OK_FIXED_BYTES + self.topic.as_bytes().len()
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, ok: &mut TopicOk<T>) {
        ok.set_broker_id(self.broker_id);
        ok.set_order(self.order as u8);
        ok.set_ack(self.ack as u8);
        ok.set_replication_factor(self.replication_factor);
        ok.set_created(self.created.into());
        ok.set_retention(self.retention as u8);
        ok.set_retention_bytes(self.history.bytes);
        ok.set_retention_ms(self.history.ms);
        ok.set_topic(&self.topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_topic_round_trip_and_rules() {
        let limits = Limits::default();
        let repr = CreateTopicRepr {
            topic: Topic::new("t-1").unwrap(),
            order: Order::TotalSessionFifo,
            ack: AckLevel::Replicated,
            replication_factor: 2,
            retention: Retention::HoldForSubscribers,
            history: HistoryRetention {
                bytes: 1 << 30,
                ms: 7 * 24 * 3600 * 1000,
            },
        };
        let mut bytes = vec![0u8; repr.buffer_len()];
        repr.emit(&mut CreateTopic::new_unchecked(&mut bytes[..]));
        let parse =
            |bytes: &[u8]| CreateTopicRepr::parse(&CreateTopic::new_checked(bytes)?, &limits);
        assert_eq!(parse(&bytes), Ok(repr));

        let mut no_replicas = bytes.clone();
        no_replicas[8] = 0;
        assert_eq!(parse(&no_replicas), Err(Error::ReplicationFactorZero));
        let mut bad_magic = bytes.clone();
        bad_magic[3] = b'X';
        assert_eq!(parse(&bad_magic), Err(Error::BadMagic { got: *b"EMBX" }));
        let mut bad_retention = bytes.clone();
        bad_retention[10] = 2;
        assert_eq!(parse(&bad_retention), Err(Error::InvalidRetention(2)));
        let mut reserved = bytes.clone();
        reserved[11] = 1;
        assert!(matches!(
            parse(&reserved),
            Err(Error::NonZeroReserved { .. })
        ));
        let mut empty_topic = bytes[..CREATE_TOPIC_FIXED_BYTES].to_vec();
        empty_topic[9] = 0;
        assert_eq!(parse(&empty_topic), Err(Error::EmptyTopic));
    }

    #[test]
    fn topic_ok_round_trip_and_rules() {
        let limits = Limits::default();
        let repr = TopicOkRepr {
            broker_id: 7,
            topic: Topic::new("t_2").unwrap(),
            order: Order::Unordered,
            ack: AckLevel::Ordered,
            replication_factor: 0,
            created: true,
            retention: Retention::StallLimited,
            history: HistoryRetention::UNLIMITED,
        };
        let mut bytes = vec![0u8; repr.buffer_len()];
        repr.emit(&mut TopicOk::new_unchecked(&mut bytes[..]));
        let parse = |bytes: &[u8]| TopicOkRepr::parse(&TopicOk::new_checked(bytes)?, &limits);
        assert_eq!(parse(&bytes), Ok(repr));

        let mut bad_bool = bytes.clone();
        bad_bool[5] = 2;
        assert_eq!(
            parse(&bad_bool),
            Err(Error::InvalidBool {
                field: "topic-ok created",
                value: 2
            })
        );
        let mut bad_retention = bytes.clone();
        bad_retention[7] = 9;
        assert_eq!(parse(&bad_retention), Err(Error::InvalidRetention(9)));
    }
}
