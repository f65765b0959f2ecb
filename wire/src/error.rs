//! Protocol errors ([`Error`]) and the stable codes carried by Error frames ([`ErrorCode`]).

use core::fmt;

use crate::batch::BATCH_HEADER_BYTES;
use crate::frame::FrameKind;
use crate::payload::{MESSAGE_PREFIX_BYTES, PayloadError};

/// Everything that can be wrong with bytes received from a peer.
///
/// Parsers return the first problem they find. [`Error::code`] maps each variant to the
/// [`ErrorCode`] a broker sends back in an Error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A buffer is shorter than the fixed part it must hold.
    #[error("{what} needs {needed} bytes but only {got} are present")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes required.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A frame body's length differs from the length its own fields describe.
    #[error("{what} is {actual} bytes but its fields describe {expected}")]
    LengthMismatch {
        /// What was being read.
        what: &'static str,
        /// Length implied by the fields.
        expected: usize,
        /// Length received.
        actual: usize,
    },
    /// A reserved field or unassigned flag is not zero.
    #[error("{field} is {value:#x}; it must be 0 (reserved in this protocol version)")]
    NonZeroReserved {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// The frame header names a kind this version does not define.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control frame's body is larger than [`Limits::frame_bytes_max`](crate::Limits::frame_bytes_max).
    #[error("{kind} frame body of {body_bytes} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Kind from the frame header.
        kind: FrameKind,
        /// Body length from the frame header.
        body_bytes: u32,
        /// Limit in force.
        max: u32,
    },
    /// A batch or delivery frame was handed to a parser of control frames.
    #[error("{0} frames carry a payload; parse their fixed header instead")]
    PayloadFrameKind(FrameKind),
    /// The first bytes of a Hello or CreateTopic are not `EMBR`.
    #[error("bad magic {got:02x?}; expected {:02x?} (\"EMBR\")", crate::MAGIC)]
    BadMagic {
        /// The four bytes found.
        got: [u8; 4],
    },
    /// The peer speaks a protocol version this side does not.
    #[error("protocol version {got} is not supported (this side speaks version {supported})")]
    UnsupportedVersion {
        /// Version received.
        got: u16,
        /// Version this side speaks.
        supported: u16,
    },
    /// A Hello names a role other than publish (1) or subscribe (2).
    #[error("role {0} is not valid (1 = publish, 2 = subscribe)")]
    InvalidRole(u8),
    /// An order value other than 0, 1, 2 or 5.
    #[error("order {0} is not valid (0, 1, 2 or 5)")]
    InvalidOrder(u8),
    /// An ack level other than 0, 1 or 2.
    #[error("ack level {0} is not valid (0, 1 or 2)")]
    InvalidAckLevel(u8),
    /// A retention value other than 0 or 1.
    #[error("retention {0} is not valid (0 = stall-limited, 1 = hold for subscribers)")]
    InvalidRetention(u8),
    /// A topic name of zero bytes.
    #[error("topic name is empty")]
    EmptyTopic,
    /// A topic name longer than the limit.
    #[error("topic name of {len} bytes exceeds the limit of {max}")]
    TopicTooLong {
        /// Length received.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// A topic name byte outside `[A-Za-z0-9._-]`.
    #[error("topic name byte {byte:#04x} at index {index} is not one of [A-Za-z0-9._-]")]
    InvalidTopicByte {
        /// The offending byte.
        byte: u8,
        /// Its index in the name.
        index: usize,
    },
    /// A publisher's Hello carries a non-zero subscriber field.
    #[error("publisher hello carries subscriber field {field} = {value}; it must be 0")]
    SubscriberFieldOnPublisher {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// A numeric field lies outside its allowed range.
    #[error("{field} of {value} is outside {min}..={max}")]
    OutOfRange {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A HelloOk whose log start lies after its log end.
    #[error("log start {log_start} is after log end {log_end}")]
    LogRangeInverted {
        /// First retained global position.
        log_start: u64,
        /// One past the last ordered global position.
        log_end: u64,
    },
    /// Ack level 2 asked for a topic without replicas.
    #[error("ack level 2 (replicated) needs a replication factor of at least 1, got 0")]
    ReplicationFactorZero,
    /// A boolean field that is neither 0 nor 1.
    #[error("{field} is {value}; a boolean must be 0 or 1")]
    InvalidBool {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u8,
    },
    /// A Batch frame body too short to hold the batch header.
    #[error(
        "batch frame body of {body_bytes} bytes is shorter than the {BATCH_HEADER_BYTES}-byte batch header"
    )]
    BatchFrameTooShort {
        /// Body length from the frame header.
        body_bytes: u32,
    },
    /// A batch (or delivery) payload larger than [`Limits::batch_bytes_max`](crate::Limits::batch_bytes_max).
    #[error("batch {batch_seq}: batch payload of {payload_bytes} bytes exceeds the limit of {max}")]
    BatchTooLarge {
        /// Sequence of the batch.
        batch_seq: u64,
        /// Payload length announced.
        payload_bytes: u32,
        /// Limit in force.
        max: u32,
    },
    /// The frame body length is not the fixed header plus the announced payload.
    #[error(
        "batch {batch_seq}: frame body of {body_bytes} bytes, but the header announces {header_bytes} + {payload_bytes}"
    )]
    BatchLengthMismatch {
        /// Sequence of the batch.
        batch_seq: u64,
        /// Body length from the frame header.
        body_bytes: u32,
        /// Size of the fixed header (batch or delivery).
        header_bytes: usize,
        /// Payload length announced.
        payload_bytes: u32,
    },
    /// A batch announcing no messages.
    #[error("batch {batch_seq}: announces 0 messages; a batch holds at least 1")]
    EmptyBatch {
        /// Sequence of the batch.
        batch_seq: u64,
    },
    /// More messages announced than the payload can hold (each takes at least 4 bytes).
    #[error("batch {batch_seq}: {message_count} messages cannot fit in {payload_bytes} payload bytes (at most {})", payload_bytes / MESSAGE_PREFIX_BYTES as u32)]
    TooManyMessages {
        /// Sequence of the batch.
        batch_seq: u64,
        /// Messages announced.
        message_count: u32,
        /// Payload length announced.
        payload_bytes: u32,
    },
    /// A batch header's sequence is `u64::MAX`, which means "none" on the wire.
    #[error(
        "batch_seq {} is reserved: it means \"no batch\" on the wire",
        u64::MAX
    )]
    BatchSeqReserved,
    /// A reserved byte of a batch or delivery header is not zero.
    #[error("batch {batch_seq}: reserved header byte {offset} is {value:#04x}; it must be 0")]
    BatchReservedNonZero {
        /// Sequence of the batch.
        batch_seq: u64,
        /// Offset of the byte in the fixed header.
        offset: usize,
        /// Value found.
        value: u8,
    },
    /// The payload handed to [`verify_payload`](crate::verify_payload) has the wrong length.
    #[error("payload is {actual} bytes but its header announces {announced}")]
    PayloadLengthMismatch {
        /// Length from the header.
        announced: u32,
        /// Length of the bytes given.
        actual: usize,
    },
    /// The payload's CRC-32C differs from the header's.
    #[error(
        "payload checksum mismatch: header says {expected:#010x}, payload hashes to {computed:#010x}"
    )]
    ChecksumMismatch {
        /// Checksum from the header.
        expected: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// The payload's messages do not tile it as announced.
    #[error("malformed payload: {0}")]
    Payload(#[from] PayloadError),
    /// A global position range that would run past `u64::MAX`.
    #[error("{message_count} messages starting at global position {global_start} overflow u64")]
    PositionOverflow {
        /// First position of the range.
        global_start: u64,
        /// Messages in the range.
        message_count: u32,
    },
    /// An Ack with more entries than allowed.
    #[error("ack of {count} entries exceeds the limit of {max}")]
    TooManyAckEntries {
        /// Entries announced or given.
        count: usize,
        /// Limit ([`ACK_ENTRIES_MAX`](crate::ACK_ENTRIES_MAX)).
        max: usize,
    },
    /// An ack entry status other than 0 (ordered) or 1 (duplicate).
    #[error("ack status {0} is not valid (0 = ordered, 1 = duplicate)")]
    InvalidAckStatus(u8),
    /// Ack entries not in strictly increasing batch sequence order.
    #[error("ack entry {index}: batch {batch_seq} does not follow batch {previous}")]
    AckEntriesUnordered {
        /// Index of the entry.
        index: usize,
        /// Its batch sequence.
        batch_seq: u64,
        /// The previous entry's batch sequence.
        previous: u64,
    },
    /// An ack entry for a batch beyond the cumulative acknowledgement.
    #[error("ack entry for batch {batch_seq} lies beyond acked_through_seq {acked_through_seq}")]
    AckEntryBeyondCumulative {
        /// The entry's batch sequence.
        batch_seq: u64,
        /// The frame's cumulative sequence.
        acked_through_seq: u64,
    },
    /// An Error frame code this version does not define.
    #[error("error code {0} is unknown")]
    UnknownErrorCode(u16),
    /// An Error frame reason longer than the limit.
    #[error("error reason of {len} bytes exceeds the limit of {max}")]
    ReasonTooLong {
        /// Length received.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// An Error frame reason that is not valid UTF-8.
    #[error("error reason is not UTF-8 (valid up to byte {valid_up_to})")]
    ReasonNotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The caller of [`FrameDecoder::payload_received`](crate::FrameDecoder::payload_received)
    /// reported more payload bytes than the current frame has left.
    #[error("caller reported {received} payload bytes but only {remaining} remain")]
    PayloadOverrun {
        /// Bytes reported.
        received: usize,
        /// Bytes the frame had left.
        remaining: u32,
    },
}

impl Error {
    /// The code a broker sends in an Error frame for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Error::BadMagic { .. } => ErrorCode::BadMagic,
            Error::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Error::InvalidRole(_) => ErrorCode::BadRole,
            Error::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            Error::BatchFrameTooShort { .. }
            | Error::BatchLengthMismatch { .. }
            | Error::EmptyBatch { .. }
            | Error::TooManyMessages { .. }
            | Error::BatchSeqReserved
            | Error::BatchReservedNonZero { .. } => ErrorCode::InvalidBatchHeader,
            Error::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
            Error::PayloadLengthMismatch { .. } | Error::Payload(_) => ErrorCode::PayloadMalformed,
            Error::PayloadOverrun { .. } => ErrorCode::Internal,
            Error::Truncated { .. }
            | Error::LengthMismatch { .. }
            | Error::NonZeroReserved { .. }
            | Error::UnknownKind(_)
            | Error::PayloadFrameKind(_)
            | Error::InvalidOrder(_)
            | Error::InvalidAckLevel(_)
            | Error::InvalidRetention(_)
            | Error::EmptyTopic
            | Error::TopicTooLong { .. }
            | Error::InvalidTopicByte { .. }
            | Error::SubscriberFieldOnPublisher { .. }
            | Error::OutOfRange { .. }
            | Error::LogRangeInverted { .. }
            | Error::ReplicationFactorZero
            | Error::InvalidBool { .. }
            | Error::PositionOverflow { .. }
            | Error::TooManyAckEntries { .. }
            | Error::InvalidAckStatus(_)
            | Error::AckEntriesUnordered { .. }
            | Error::AckEntryBeyondCumulative { .. }
            | Error::UnknownErrorCode(_)
            | Error::ReasonTooLong { .. }
            | Error::ReasonNotUtf8 { .. } => ErrorCode::Malformed,
        }
    }

    /// The batch the error is about, when it was found in a batch or delivery header.
    pub fn batch_seq(&self) -> Option<u64> {
        match self {
            Error::BatchTooLarge { batch_seq, .. }
            | Error::BatchLengthMismatch { batch_seq, .. }
            | Error::EmptyBatch { batch_seq }
            | Error::TooManyMessages { batch_seq, .. }
            | Error::BatchReservedNonZero { batch_seq, .. } => Some(*batch_seq),
            _ => None,
        }
    }
}

/// Stable numeric codes carried by the Error frame. Values never change meaning; new codes
/// are only added together with a new protocol version.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame violates the layout or a field rule not covered by a more specific code.
    Malformed = 1,
    /// The client's protocol version is not spoken by the broker.
    UnsupportedVersion = 2,
    /// The first frame does not start with `EMBR`.
    BadMagic = 3,
    /// A control frame is larger than the receiver's limit.
    FrameTooLarge = 4,
    /// A batch payload is larger than the broker's `batch_bytes_max`.
    BatchTooLarge = 5,
    /// A batch header is inconsistent (length, message count, reserved bytes).
    InvalidBatchHeader = 6,
    /// A batch payload does not match its CRC-32C.
    ChecksumMismatch = 7,
    /// A batch payload's messages do not tile it as announced.
    PayloadMalformed = 8,
    /// The topic named in Hello does not exist.
    UnknownTopic = 9,
    /// CreateTopic names an existing topic with different settings.
    TopicExists = 10,
    /// The order requested in Hello differs from the topic's.
    OrderMismatch = 11,
    /// The ack level requested is above what the topic supports.
    AckLevelUnsupported = 12,
    /// The role is not valid, or a frame is not allowed for the connection's role.
    BadRole = 13,
    /// A frame arrived that is not valid in the connection's state (e.g. Batch before Hello).
    UnexpectedFrame = 14,
    /// A Hello carries a session epoch older than one the broker has seen for this client.
    StaleSession = 15,
    /// A subscriber asked to start after the end of the log.
    PositionBeyondEnd = 16,
    /// A subscriber asked to start before the first retained position.
    PositionTruncated = 17,
    /// Order 5: the sequencer gave up waiting for a gap; the named batch was not ordered.
    SessionGapSkipped = 18,
    /// Informational: the pool is full and the broker is applying backpressure.
    PoolFull = 19,
    /// The broker failed internally.
    Internal = 20,
    /// A deadline passed: no Hello in time after connecting, or a batch's payload arrived
    /// slower than the broker's minimum rate. Added in version 2.
    DeadlineExpired = 21,
    /// The broker serves no more connections, in all or from this address. Added in
    /// version 2.
    ConnectionLimit = 22,
    /// The pool's topic table is full, or this broker does not create topics on first use.
    /// Added in version 2.
    TopicLimit = 23,
}

impl ErrorCode {
    /// Every defined code, in numeric order.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadMagic,
        ErrorCode::FrameTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::InvalidBatchHeader,
        ErrorCode::ChecksumMismatch,
        ErrorCode::PayloadMalformed,
        ErrorCode::UnknownTopic,
        ErrorCode::TopicExists,
        ErrorCode::OrderMismatch,
        ErrorCode::AckLevelUnsupported,
        ErrorCode::BadRole,
        ErrorCode::UnexpectedFrame,
        ErrorCode::StaleSession,
        ErrorCode::PositionBeyondEnd,
        ErrorCode::PositionTruncated,
        ErrorCode::SessionGapSkipped,
        ErrorCode::PoolFull,
        ErrorCode::Internal,
        ErrorCode::DeadlineExpired,
        ErrorCode::ConnectionLimit,
        ErrorCode::TopicLimit,
    ];

    /// The numeric value on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Whether the sender closes the connection after sending this code. Only
    /// [`SessionGapSkipped`](ErrorCode::SessionGapSkipped) and
    /// [`PoolFull`](ErrorCode::PoolFull) leave it open.
    pub fn closes_connection(self) -> bool {
        !matches!(self, ErrorCode::SessionGapSkipped | ErrorCode::PoolFull)
    }

    /// A short human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed frame",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::BadMagic => "bad magic",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::BatchTooLarge => "batch too large",
            ErrorCode::InvalidBatchHeader => "invalid batch header",
            ErrorCode::ChecksumMismatch => "checksum mismatch",
            ErrorCode::PayloadMalformed => "malformed payload",
            ErrorCode::UnknownTopic => "unknown topic",
            ErrorCode::TopicExists => "topic exists with other settings",
            ErrorCode::OrderMismatch => "order mismatch",
            ErrorCode::AckLevelUnsupported => "ack level unsupported",
            ErrorCode::BadRole => "bad role",
            ErrorCode::UnexpectedFrame => "unexpected frame",
            ErrorCode::StaleSession => "stale session",
            ErrorCode::PositionBeyondEnd => "position beyond end of log",
            ErrorCode::PositionTruncated => "position truncated",
            ErrorCode::SessionGapSkipped => "session gap skipped",
            ErrorCode::PoolFull => "pool full",
            ErrorCode::Internal => "internal error",
            ErrorCode::DeadlineExpired => "deadline expired",
            ErrorCode::ConnectionLimit => "connection limit reached",
            ErrorCode::TopicLimit => "topic limit reached",
        }
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = Error;

    fn try_from(value: u16) -> Result<Self, Error> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_u16() == value)
            .ok_or(Error::UnknownErrorCode(value))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}
