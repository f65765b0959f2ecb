//! The handshake: [`Hello`] (client to broker, first frame) and [`HelloOk`] (the answer).
//!
//! Hello body (36 bytes + topic):
//!
//! ```text
//! offset size field
//!      0    4 magic            b"EMBR"
//!      4    2 protocol_version 4
//!      6    1 role             1 publish, 2 subscribe
//!      7    1 order            0, 1, 2 or 5
//!      8    1 ack              0, 1 or 2
//!      9    1 topic_len        1..=64
//!     10    2 reserved         0
//!     12    4 session_epoch
//!     16    8 client_id
//!     24    8 from_position    subscribe: first global position wanted; publish: 0
//!     32    4 batch_bytes_max  subscribe: largest delivery payload (0 = broker's); publish: 0
//!     36    n topic            [A-Za-z0-9._-]
//! ```
//!
//! HelloOk body (40 bytes):
//!
//! ```text
//! offset size field
//!      0    2 protocol_version 4
//!      2    2 broker_id
//!      4    4 batch_bytes_max  the broker's batch payload limit
//!      8    1 order            the topic's order
//!      9    1 ack              the session's ack level
//!     10    6 reserved         0
//!     16    8 next_batch_seq   resumed session: first seq not yet seen; new session: 0
//!     24    8 log_start        first retained global position
//!     32    8 log_end          one past the last ordered global position
//! ```

use crate::bytes::{
    first_non_zero, magic_at, put, set_u16, set_u32, set_u64, u16_at, u32_at, u64_at,
};
use crate::error::Error;
use crate::limits::{BATCH_BYTES_HARD_MAX, BATCH_BYTES_MIN, Limits};
use crate::types::{AckLevel, Order, Topic};

/// The four bytes that open a Hello and a CreateTopic.
pub const MAGIC: [u8; 4] = *b"EMBR";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// Bytes at the start of every first frame that every version keeps: magic and version.
pub const PRELUDE_BYTES: usize = 6;
/// Size of the fixed part of a Hello body (the topic follows).
pub const HELLO_FIXED_BYTES: usize = 36;
/// Size of a HelloOk body.
pub const HELLO_OK_BYTES: usize = 40;
/// `from_position` value asking to start at the end of the log (new messages only).
pub const FROM_END: u64 = u64::MAX;

mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const ROLE: usize = 6;
    pub const ORDER: usize = 7;
    pub const ACK: usize = 8;
    pub const TOPIC_LEN: usize = 9;
    pub const RESERVED: usize = 10;
    pub const SESSION_EPOCH: usize = 12;
    pub const CLIENT_ID: usize = 16;
    pub const FROM_POSITION: usize = 24;
    pub const BATCH_BYTES_MAX: usize = 32;
    pub const TOPIC: usize = 36;
}

mod ok_field {
    pub const VERSION: usize = 0;
    pub const BROKER_ID: usize = 2;
    pub const BATCH_BYTES_MAX: usize = 4;
    pub const ORDER: usize = 8;
    pub const ACK: usize = 9;
    pub const RESERVED: core::ops::Range<usize> = 10..16;
    pub const NEXT_BATCH_SEQ: usize = 16;
    pub const LOG_START: usize = 24;
    pub const LOG_END: usize = 32;
}

/// Checks the magic and version that open a Hello or CreateTopic body, before anything
/// else, so that a peer of another version gets `UnsupportedVersion` and not a length error.
pub(crate) fn check_prelude(body: &[u8], what: &'static str) -> Result<(), Error> {
    if body.len() < PRELUDE_BYTES {
        return Err(Error::Truncated {
            what,
            needed: PRELUDE_BYTES,
            got: body.len(),
        });
    }
    let magic = magic_at(body, 0);
    if magic != MAGIC {
        return Err(Error::BadMagic { got: magic });
    }
    check_version(u16_at(body, 4))
}

fn check_version(got: u16) -> Result<(), Error> {
    if got != PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion {
            got,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Checks that a body of `got` bytes holds a fixed part of `fixed` bytes and then exactly the
/// variable part whose length `variable` reads (called only once the fixed part is present).
pub(crate) fn check_exact(
    got: usize,
    fixed: usize,
    what: &'static str,
    variable: impl FnOnce() -> usize,
) -> Result<(), Error> {
    if got < fixed {
        return Err(Error::Truncated {
            what,
            needed: fixed,
            got,
        });
    }
    let expected = fixed + variable();
    if got != expected {
        return Err(Error::LengthMismatch {
            what,
            expected,
            actual: got,
        });
    }
    Ok(())
}

/// A view over a Hello body.
#[derive(Debug, Clone, Copy)]
pub struct Hello<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Hello<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        Hello { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let hello = Self::new_unchecked(buffer);
        hello.check_len()?;
        Ok(hello)
    }

    /// Checks magic and version first, then that the body is exactly the fixed part plus
    /// `topic_len` bytes.
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        check_prelude(body, "hello body")?;
        check_exact(body.len(), HELLO_FIXED_BYTES, "hello body", || {
            usize::from(body[field::TOPIC_LEN])
        })
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

    /// The raw role byte.
    pub fn role(&self) -> u8 {
        self.buffer.as_ref()[field::ROLE]
    }

    /// The raw order byte.
    pub fn order(&self) -> u8 {
        self.buffer.as_ref()[field::ORDER]
    }

    /// The raw ack level byte.
    pub fn ack(&self) -> u8 {
        self.buffer.as_ref()[field::ACK]
    }

    /// Length of the topic name.
    pub fn topic_len(&self) -> u8 {
        self.buffer.as_ref()[field::TOPIC_LEN]
    }

    /// The reserved field.
    pub fn reserved(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::RESERVED)
    }

    /// The session epoch.
    pub fn session_epoch(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::SESSION_EPOCH)
    }

    /// The client id.
    pub fn client_id(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::CLIENT_ID)
    }

    /// The subscriber's first wanted position.
    pub fn from_position(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::FROM_POSITION)
    }

    /// The subscriber's largest delivery payload.
    pub fn batch_bytes_max(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::BATCH_BYTES_MAX)
    }

    /// The raw topic bytes.
    pub fn topic(&self) -> &[u8] {
        let len = usize::from(self.topic_len());
        &self.buffer.as_ref()[field::TOPIC..field::TOPIC + len]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Hello<T> {
    /// Sets the magic bytes.
    pub fn set_magic(&mut self, magic: [u8; 4]) {
        put(self.buffer.as_mut(), field::MAGIC, &magic);
    }

    /// Sets the protocol version.
    pub fn set_protocol_version(&mut self, version: u16) {
        set_u16(self.buffer.as_mut(), field::VERSION, version);
    }

    /// Sets the role byte.
    pub fn set_role(&mut self, role: u8) {
        self.buffer.as_mut()[field::ROLE] = role;
    }

    /// Sets the order byte.
    pub fn set_order(&mut self, order: u8) {
        self.buffer.as_mut()[field::ORDER] = order;
    }

    /// Sets the ack level byte.
    pub fn set_ack(&mut self, ack: u8) {
        self.buffer.as_mut()[field::ACK] = ack;
    }

    /// Sets the reserved field.
    pub fn set_reserved(&mut self, reserved: u16) {
        set_u16(self.buffer.as_mut(), field::RESERVED, reserved);
    }

    /// Sets the session epoch.
    pub fn set_session_epoch(&mut self, epoch: u32) {
        set_u32(self.buffer.as_mut(), field::SESSION_EPOCH, epoch);
    }

    /// Sets the client id.
    pub fn set_client_id(&mut self, client_id: u64) {
        set_u64(self.buffer.as_mut(), field::CLIENT_ID, client_id);
    }

    /// Sets the subscriber's first wanted position.
    pub fn set_from_position(&mut self, position: u64) {
        set_u64(self.buffer.as_mut(), field::FROM_POSITION, position);
    }

    /// Sets the subscriber's largest delivery payload.
    pub fn set_batch_bytes_max(&mut self, bytes: u32) {
        set_u32(self.buffer.as_mut(), field::BATCH_BYTES_MAX, bytes);
    }

    /// Sets `topic_len` and the topic bytes.
    pub fn set_topic(&mut self, topic: &Topic) {
        let buffer = self.buffer.as_mut();
        buffer[field::TOPIC_LEN] = topic.wire_len();
        put(buffer, field::TOPIC, topic.as_bytes());
    }
}

/// What the client does on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Role 1: sends Batch frames, receives Acks. Subscriber fields are 0 on the wire.
    Publish,
    /// Role 2: receives Delivery frames.
    Subscribe {
        /// First global position wanted; [`FROM_END`] for new messages only.
        from_position: u64,
        /// Largest delivery payload wanted; 0 for the broker's own limit.
        batch_bytes_max: u32,
    },
}

impl Role {
    /// The role byte on the wire.
    pub fn code(&self) -> u8 {
        match self {
            Role::Publish => 1,
            Role::Subscribe { .. } => 2,
        }
    }
}

/// A parsed Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloRepr {
    /// Publisher or subscriber, with the subscriber's fields.
    pub role: Role,
    /// Order the client expects the topic to have.
    pub order: Order,
    /// Ack level asked for (publishers; subscribers send 0).
    pub ack: AckLevel,
    /// Client identity, stable across reconnects.
    pub client_id: u64,
    /// Session epoch; with `client_id` and the batch sequence it deduplicates retries.
    pub session_epoch: u32,
    /// Topic to publish to or subscribe to.
    pub topic: Topic,
}

impl HelloRepr {
    /// Parses a checked Hello view.
    pub fn parse<T: AsRef<[u8]>>(hello: &Hello<T>, limits: &Limits) -> Result<Self, Error> {
        let role = match hello.role() {
            1 => {
                for (field, value) in [
                    ("from_position", hello.from_position()),
                    ("batch_bytes_max", hello.batch_bytes_max().into()),
                ] {
                    if value != 0 {
                        return Err(Error::SubscriberFieldOnPublisher { field, value });
                    }
                }
                Role::Publish
            }
            2 => {
                let batch_bytes_max = hello.batch_bytes_max();
                if batch_bytes_max != 0
                    && !(BATCH_BYTES_MIN..=BATCH_BYTES_HARD_MAX).contains(&batch_bytes_max)
                {
                    return Err(Error::OutOfRange {
                        field: "subscriber batch_bytes_max",
                        value: batch_bytes_max.into(),
                        min: BATCH_BYTES_MIN.into(),
                        max: BATCH_BYTES_HARD_MAX.into(),
                    });
                }
                Role::Subscribe {
                    from_position: hello.from_position(),
                    batch_bytes_max,
                }
            }
            other => return Err(Error::InvalidRole(other)),
        };
        let order = Order::try_from(hello.order())?;
        let ack = AckLevel::try_from(hello.ack())?;
        if hello.reserved() != 0 {
            return Err(Error::NonZeroReserved {
                field: "hello reserved",
                value: hello.reserved().into(),
            });
        }
        let topic = Topic::from_bytes(hello.topic(), limits.topic_bytes_max())?;
        Ok(HelloRepr {
            role,
            order,
            ack,
            client_id: hello.client_id(),
            session_epoch: hello.session_epoch(),
            topic,
        })
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        HELLO_FIXED_BYTES + self.topic.as_bytes().len()
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, hello: &mut Hello<T>) {
        let (from_position, batch_bytes_max) = match self.role {
            Role::Publish => (0, 0),
            Role::Subscribe {
                from_position,
                batch_bytes_max,
            } => (from_position, batch_bytes_max),
        };
        hello.set_magic(MAGIC);
        hello.set_protocol_version(PROTOCOL_VERSION);
        hello.set_role(self.role.code());
        hello.set_order(self.order as u8);
        hello.set_ack(self.ack as u8);
        hello.set_reserved(0);
        hello.set_session_epoch(self.session_epoch);
        hello.set_client_id(self.client_id);
        hello.set_from_position(from_position);
        hello.set_batch_bytes_max(batch_bytes_max);
        hello.set_topic(&self.topic);
    }
}

/// A view over a HelloOk body.
#[derive(Debug, Clone, Copy)]
pub struct HelloOk<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> HelloOk<T> {
    /// Wraps a buffer without checks; accessors panic if it is shorter than [`HELLO_OK_BYTES`].
    pub fn new_unchecked(buffer: T) -> Self {
        HelloOk { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let ok = Self::new_unchecked(buffer);
        ok.check_len()?;
        Ok(ok)
    }

    /// Checks the version first, then that the body is exactly [`HELLO_OK_BYTES`].
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        if body.len() >= 2 {
            check_version(u16_at(body, ok_field::VERSION))?;
        }
        check_exact(body.len(), HELLO_OK_BYTES, "hello-ok body", || 0)
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The protocol version the broker speaks on this connection.
    pub fn protocol_version(&self) -> u16 {
        u16_at(self.buffer.as_ref(), ok_field::VERSION)
    }

    /// The broker's id.
    pub fn broker_id(&self) -> u16 {
        u16_at(self.buffer.as_ref(), ok_field::BROKER_ID)
    }

    /// The broker's batch payload limit.
    pub fn batch_bytes_max(&self) -> u32 {
        u32_at(self.buffer.as_ref(), ok_field::BATCH_BYTES_MAX)
    }

    /// The raw order byte.
    pub fn order(&self) -> u8 {
        self.buffer.as_ref()[ok_field::ORDER]
    }

    /// The raw ack level byte.
    pub fn ack(&self) -> u8 {
        self.buffer.as_ref()[ok_field::ACK]
    }

    /// The reserved bytes.
    pub fn reserved(&self) -> &[u8] {
        &self.buffer.as_ref()[ok_field::RESERVED]
    }

    /// First batch sequence the broker has not seen for this session.
    pub fn next_batch_seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), ok_field::NEXT_BATCH_SEQ)
    }

    /// First retained global position.
    pub fn log_start(&self) -> u64 {
        u64_at(self.buffer.as_ref(), ok_field::LOG_START)
    }

    /// One past the last ordered global position.
    pub fn log_end(&self) -> u64 {
        u64_at(self.buffer.as_ref(), ok_field::LOG_END)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> HelloOk<T> {
    /// Sets the protocol version.
    pub fn set_protocol_version(&mut self, version: u16) {
        set_u16(self.buffer.as_mut(), ok_field::VERSION, version);
    }

    /// Sets the broker id.
    pub fn set_broker_id(&mut self, broker_id: u16) {
        set_u16(self.buffer.as_mut(), ok_field::BROKER_ID, broker_id);
    }

    /// Sets the broker's batch payload limit.
    pub fn set_batch_bytes_max(&mut self, bytes: u32) {
        set_u32(self.buffer.as_mut(), ok_field::BATCH_BYTES_MAX, bytes);
    }

    /// Sets the order byte.
    pub fn set_order(&mut self, order: u8) {
        self.buffer.as_mut()[ok_field::ORDER] = order;
    }

    /// Sets the ack level byte.
    pub fn set_ack(&mut self, ack: u8) {
        self.buffer.as_mut()[ok_field::ACK] = ack;
    }

    /// Zeroes the reserved bytes.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[ok_field::RESERVED].fill(0);
    }

    /// Sets the next batch sequence.
    pub fn set_next_batch_seq(&mut self, seq: u64) {
        set_u64(self.buffer.as_mut(), ok_field::NEXT_BATCH_SEQ, seq);
    }

    /// Sets the log start.
    pub fn set_log_start(&mut self, position: u64) {
        set_u64(self.buffer.as_mut(), ok_field::LOG_START, position);
    }

    /// Sets the log end.
    pub fn set_log_end(&mut self, position: u64) {
        set_u64(self.buffer.as_mut(), ok_field::LOG_END, position);
    }
}

/// A parsed HelloOk. The protocol version is always [`PROTOCOL_VERSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloOkRepr {
    /// The broker's id.
    pub broker_id: u16,
    /// The broker's batch payload limit; publishers must not exceed it.
    pub batch_bytes_max: u32,
    /// The topic's order.
    pub order: Order,
    /// The session's ack level.
    pub ack: AckLevel,
    /// Resumed session: first batch sequence the broker has not seen; new session: 0.
    pub next_batch_seq: u64,
    /// First retained global position.
    pub log_start: u64,
    /// One past the last ordered global position.
    pub log_end: u64,
}

impl HelloOkRepr {
    /// Parses a checked HelloOk view.
    pub fn parse<T: AsRef<[u8]>>(ok: &HelloOk<T>) -> Result<Self, Error> {
        let batch_bytes_max = ok.batch_bytes_max();
        if !(BATCH_BYTES_MIN..=BATCH_BYTES_HARD_MAX).contains(&batch_bytes_max) {
            return Err(Error::OutOfRange {
                field: "broker batch_bytes_max",
                value: batch_bytes_max.into(),
                min: BATCH_BYTES_MIN.into(),
                max: BATCH_BYTES_HARD_MAX.into(),
            });
        }
        let order = Order::try_from(ok.order())?;
        let ack = AckLevel::try_from(ok.ack())?;
        if let Some((_, value)) = first_non_zero(ok.buffer.as_ref(), ok_field::RESERVED) {
            return Err(Error::NonZeroReserved {
                field: "hello-ok reserved byte",
                value: value.into(),
            });
        }
        let (log_start, log_end) = (ok.log_start(), ok.log_end());
        if log_start > log_end {
            return Err(Error::LogRangeInverted { log_start, log_end });
        }
        Ok(HelloOkRepr {
            broker_id: ok.broker_id(),
            batch_bytes_max,
            order,
            ack,
            next_batch_seq: ok.next_batch_seq(),
            log_start,
            log_end,
        })
    }

    /// Length of the body.
    pub const fn buffer_len(&self) -> usize {
        HELLO_OK_BYTES
    }

    /// Writes the body; the view must span [`HELLO_OK_BYTES`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, ok: &mut HelloOk<T>) {
        ok.set_protocol_version(PROTOCOL_VERSION);
        ok.set_broker_id(self.broker_id);
        ok.set_batch_bytes_max(self.batch_bytes_max);
        ok.set_order(self.order as u8);
        ok.set_ack(self.ack as u8);
        ok.clear_reserved();
        ok.set_next_batch_seq(self.next_batch_seq);
        ok.set_log_start(self.log_start);
        ok.set_log_end(self.log_end);
    }
}

/// A publisher id unlikely to be any other publisher's, for a new session: the clock's
/// nanoseconds mixed with the process id and a per-process counter (so two calls in one
/// process always differ), through the splitmix64 finaliser so that nearby inputs give
/// unrelated ids. Our own clients draw theirs so, and so does a broker for a Kafka
/// producer's session.
pub fn unique_client_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut z = nanos ^ (u64::from(std::process::id()) << 40) ^ call.rotate_right(8);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> Topic {
        Topic::new("orders").unwrap()
    }

    fn encode(repr: &HelloRepr) -> Vec<u8> {
        let mut bytes = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Hello::new_unchecked(&mut bytes[..]));
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<HelloRepr, Error> {
        HelloRepr::parse(&Hello::new_checked(bytes)?, &Limits::default())
    }

    fn publisher() -> HelloRepr {
        HelloRepr {
            role: Role::Publish,
            order: Order::TotalSessionFifo,
            ack: AckLevel::Replicated,
            client_id: 0xfeed,
            session_epoch: 3,
            topic: topic(),
        }
    }

    #[test]
    fn round_trip_both_roles() {
        let publisher = publisher();
        let bytes = encode(&publisher);
        assert_eq!(bytes.len(), 36 + 6);
        assert_eq!(&bytes[..4], b"EMBR");
        assert_eq!(parse(&bytes), Ok(publisher));
        let subscriber = HelloRepr {
            role: Role::Subscribe {
                from_position: FROM_END,
                batch_bytes_max: 1 << 20,
            },
            ack: AckLevel::FireAndForget,
            ..publisher
        };
        assert_eq!(parse(&encode(&subscriber)), Ok(subscriber));
    }

    #[test]
    fn magic_and_version_come_first() {
        let mut bytes = encode(&publisher());
        bytes[4] = 5;
        // A version-5 client's Hello is refused for its version even when its layout differs.
        assert_eq!(
            parse(&bytes[..10]),
            Err(Error::UnsupportedVersion {
                got: 5,
                supported: 4
            })
        );
        bytes[0] = b'X';
        assert_eq!(parse(&bytes), Err(Error::BadMagic { got: *b"XMBR" }));
        assert!(matches!(
            parse(&bytes[..5]),
            Err(Error::Truncated {
                needed: 6,
                got: 5,
                ..
            })
        ));
    }

    #[test]
    fn field_rules() {
        let good = encode(&publisher());
        let with = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            parse(&bytes)
        };
        assert_eq!(with(6, 3), Err(Error::InvalidRole(3)));
        assert_eq!(with(7, 3), Err(Error::InvalidOrder(3)));
        assert_eq!(with(8, 3), Err(Error::InvalidAckLevel(3)));
        assert!(matches!(with(10, 1), Err(Error::NonZeroReserved { .. })));
        assert_eq!(
            with(24, 1),
            Err(Error::SubscriberFieldOnPublisher {
                field: "from_position",
                value: 1
            })
        );
        assert_eq!(
            with(36, b' '),
            Err(Error::InvalidTopicByte {
                byte: b' ',
                index: 0
            })
        );
        assert_eq!(
            with(9, 7),
            Err(Error::LengthMismatch {
                what: "hello body",
                expected: 43,
                actual: 42
            })
        );
        let mut subscriber = good.clone();
        subscriber[6] = 2;
        subscriber[32..36].copy_from_slice(&(65u32 << 20).to_le_bytes());
        assert_eq!(
            parse(&subscriber).unwrap_err().to_string(),
            "subscriber batch_bytes_max of 68157440 is outside 4..=67108864"
        );
        let short = Limits::default().with_topic_bytes_max(4).unwrap();
        assert_eq!(
            HelloRepr::parse(&Hello::new_checked(&good[..]).unwrap(), &short),
            Err(Error::TopicTooLong { len: 6, max: 4 })
        );
    }

    #[test]
    fn hello_ok_round_trip_and_rules() {
        let repr = HelloOkRepr {
            broker_id: 2,
            batch_bytes_max: 16 << 20,
            order: Order::Total,
            ack: AckLevel::Ordered,
            next_batch_seq: 41,
            log_start: 10,
            log_end: 99,
        };
        let mut bytes = [0u8; HELLO_OK_BYTES];
        repr.emit(&mut HelloOk::new_unchecked(&mut bytes[..]));
        let parse = |bytes: &[u8]| HelloOkRepr::parse(&HelloOk::new_checked(bytes)?);
        assert_eq!(parse(&bytes), Ok(repr));

        let mut inverted = bytes;
        inverted[24..32].copy_from_slice(&100u64.to_le_bytes());
        assert_eq!(
            parse(&inverted),
            Err(Error::LogRangeInverted {
                log_start: 100,
                log_end: 99
            })
        );
        let mut zero_limit = bytes;
        zero_limit[4..8].fill(0);
        assert!(matches!(
            parse(&zero_limit),
            Err(Error::OutOfRange { value: 0, .. })
        ));
        let mut version = bytes;
        version[0] = 9;
        assert_eq!(
            parse(&version[..3]),
            Err(Error::UnsupportedVersion {
                got: 9,
                supported: 4
            })
        );
        assert!(matches!(parse(&bytes[..39]), Err(Error::Truncated { .. })));
        assert!(matches!(
            parse(&[bytes.as_slice(), &[0]].concat()),
            Err(Error::LengthMismatch { .. })
        ));
    }
}
