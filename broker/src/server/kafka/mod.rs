//! The Kafka protocol listener (`--kafka-listen`): existing Kafka clients talk to the
//! broker in their own protocol, in the same network loop as our own clients.
//!
//! It answers ApiVersions (which APIs and versions this broker speaks), Metadata (the
//! brokers, and each topic as one partition whose leader is the broker asked: every broker
//! takes every write into the one total order), Produce, Fetch and ListOffsets (`data`).
//! A client is told which APIs exist through ApiVersions and does not call the others.
//!
//! [`KafkaSession`] is the protocol without I/O: request frames in, the sequencer's
//! decisions in, response frames out, in request order. [`KafkaConnection`] is the adapter
//! to a byte stream: it splits the input into frames (each a 4-byte big-endian size and the
//! request), bounds them, and queues the responses.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, CreateTopicsRequest,
    DescribeGroupsRequest, FetchRequest, FindCoordinatorRequest, HeartbeatRequest,
    InitProducerIdRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest,
    ListOffsetsRequest, MetadataRequest, MetadataResponse, OffsetCommitRequest, OffsetFetchRequest,
    ProduceRequest, RequestHeader, ResponseHeader, SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, StrBytes};
use shared_log::pool::TopicId;
use units::Timestamp;

use crate::metrics::Metrics;
use crate::server::connection::{ByteStream, InputState, Service};
use crate::server::state::{ConnId, RoutedOutcome};

pub mod admin;
pub mod compression;
pub mod data;
#[cfg(test)]
mod fake;
pub mod groups;
pub mod log_io;
pub mod offsets;
pub mod peers;
pub mod records;

pub use data::{FetchRefused, KafkaTopic, ProducerSession, PublishRefused};

/// Kafka's error codes that this broker answers with.
mod error_code {
    /// A record batch whose CRC or framing is broken.
    pub const CORRUPT_MESSAGE: i16 = 2;
    /// A Fetch or ListOffsets position outside the log.
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    /// The request's own deadline passed (Produce's `timeout_ms`).
    pub const REQUEST_TIMED_OUT: i16 = 7;
    /// A batch larger than the topic takes.
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    /// acks other than 0, 1 and -1.
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    /// Record batches of another magic than 2.
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    /// A compression codec this broker does not take.
    pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
    /// A record the log cannot hold as sent (see `records::RecordError`).
    pub const INVALID_RECORD: i16 = 87;
    /// A broker-side failure with no better code.
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    /// No coordinator (transactions), or the offsets topic is not there yet.
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    /// A group member's generation is not its group's.
    pub const ILLEGAL_GENERATION: i16 = 22;
    /// Group requests to a broker that does not coordinate groups now.
    pub const NOT_COORDINATOR: i16 = 16;
    /// A member whose protocols do not match its group's.
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    /// A member not in its group (any more).
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    /// A session timeout outside the range taken.
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    /// The group is rebalancing: join again.
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    /// A request field over its limit.
    pub const INVALID_REQUEST: i16 = 42;
    /// A new member must join again with the member id given.
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    /// The group (or the coordinator) has all the members it takes.
    pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
    /// An idempotent producer's batch whose earlier sequences were given up.
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    /// An idempotent producer's batch older than what is remembered of it: not written,
    /// and the producer must start a new epoch.
    pub const UNKNOWN_PRODUCER_ID: i16 = 59;
    /// An OffsetCommit's metadata longer than [`offsets::METADATA_BYTES_MAX`].
    pub const OFFSET_METADATA_TOO_LARGE: i16 = 12;
    /// A group id longer than [`offsets::GROUP_BYTES_MAX`].
    pub const INVALID_GROUP_ID: i16 = 24;
    /// Transactions (a transactional id) are not served.
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    /// A topic name a topic may not have.
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    /// CreateTopics: the topic exists.
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    /// CreateTopics: other than one partition.
    pub const INVALID_PARTITIONS: i16 = 37;
    /// CreateTopics: a replication factor below 1 or above 255.
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    /// CreateTopics: replica assignments.
    pub const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
    /// CreateTopics: topic configs.
    pub const INVALID_CONFIG: i16 = 40;
    /// CreateTopics on a broker that does not create topics.
    pub const NOT_CONTROLLER: i16 = 41;
    /// CreateTopics: the pool's topic table is full.
    pub const POLICY_VIOLATION: i16 = 44;
    /// The topic does not exist.
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    /// The request's API version is not one this broker speaks.
    pub const UNSUPPORTED_VERSION: i16 = 35;
    /// No topic has the id asked for.
    pub const UNKNOWN_TOPIC_ID: i16 = 100;
}

/// The APIs this broker speaks, with the versions of each (those that current clients use:
/// librdkafka 2.x, kafka-python, the Java client 3.x and 4.x).
/// Record batches (magic 2) come with Produce 3 and Fetch 4; Fetch goes to 12 (the last
/// that names topics; 13 names them by id), ListOffsets from 1 (one offset per partition).
/// Produce 0 to 2 are offered too, and their requests answered
/// UNSUPPORTED_FOR_MESSAGE_FORMAT per partition: librdkafka compresses with gzip, snappy or
/// lz4 only for a broker whose Produce versions include 0, and it picks the highest
/// version both sides speak.
const SUPPORTED: [(ApiKey, i16, i16); 16] = [
    (ApiKey::Produce, 0, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::CreateTopics, 0, 7),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
];

/// Bytes one service of a connection reads at most before the loop goes on (a fast
/// producer's input waits in its socket for the next pass).
const READ_BYTES_PER_SERVICE: usize = 1 << 20;

/// The largest request frame taken: a Produce of librdkafka's default `message.max.bytes`
/// (1,000,000) or the Java client's `max.request.size` (1 MiB) with room to spare.
pub const REQUEST_BYTES_MAX: usize = 2 << 20;

/// Why a Kafka connection is closed (Kafka has no error frame outside a response: a request
/// that cannot be parsed ends its connection, and only that one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaError {
    /// The size prefix is negative or above the limit.
    #[error("request frame of {size} bytes (at most {limit} taken)")]
    FrameSize {
        /// The size the prefix gave.
        size: i64,
        /// The limit.
        limit: usize,
    },
    /// The request header or body does not parse.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// An API this broker does not speak (and did not offer in ApiVersions).
    #[error("API key {0} is not served here (see ApiVersions)")]
    UnsupportedApi(i16),
}

/// What the broker knows and does that a Kafka answer needs (the log, behind the same
/// methods for the network loop and for tests).
pub trait KafkaContext {
    /// This broker's node id and where Kafka clients reach it.
    fn node(&self) -> KafkaNode;
    /// The live brokers with a Kafka listener, this one included, by id.
    fn brokers(&mut self) -> Vec<KafkaNode>;
    /// The consumer groups this broker coordinates.
    fn groups(&mut self) -> &mut groups::Groups;
    /// Every topic, by id and name.
    fn topics(&self) -> Vec<(TopicId, String)>;
    /// The broker's metrics.
    fn metrics(&self) -> &Metrics;
    /// The topic named `name`.
    fn find_topic(&self, name: &str) -> Option<KafkaTopic>;
    /// The topic of committed offsets ([`offsets::OFFSETS_TOPIC`]), created if it is not
    /// there and this broker creates topics.
    fn offsets_topic(&mut self) -> Option<KafkaTopic>;
    /// The latest commit of `group` for `topic`'s `partition`.
    fn committed(&mut self, group: &str, topic: &str, partition: i32)
    -> Option<offsets::Committed>;
    /// Creates a topic (see [`admin`]).
    fn create_topic(
        &mut self,
        creation: &admin::TopicCreation,
    ) -> Result<KafkaTopic, admin::CreateRefused>;
    /// Writes `produced` (its record batches, as they came) as `session`'s next batch of
    /// `topic` for connection `conn`; the sequencer's decision comes back to it by the
    /// returned ring slot.
    fn publish(
        &mut self,
        topic: TopicId,
        session: ProducerSession,
        produced: &records::Produced<'_>,
        conn: ConnId,
    ) -> Result<u64, PublishRefused>;
    /// The position below which `topic` is held by `replicas` replica files.
    fn replicated_position(&mut self, topic: TopicId, replicas: usize) -> u64;
    /// The first position of `topic` not yet ordered (cheap: one frontier read).
    fn log_end(&self, topic: TopicId) -> Option<u64>;
    /// (first readable position, first position not yet ordered) of `topic`.
    fn log_bounds(&self, topic: TopicId) -> Result<(u64, u64), String>;
    /// Appends `topic`'s batches from the one holding `position` on to `out` as record
    /// batches, until about `max_bytes` (the first batch whole, however large).
    fn fetch(
        &self,
        topic: TopicId,
        position: u64,
        max_bytes: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FetchRefused>;
}

/// A broker as Kafka clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaNode {
    /// The node id (the broker id).
    pub id: i32,
    /// Host name or address clients connect to.
    pub host: String,
    /// Port of the Kafka listener.
    pub port: u16,
}

/// The Kafka protocol of one connection, without I/O.
#[derive(Debug)]
pub struct KafkaSession {
    /// The connection (the sequencer's decisions on its batches are routed by it).
    conn: ConnId,
    /// One per request taken, in request order; at most [`data::ANSWERS_MAX`].
    answers: VecDeque<data::Answer>,
    /// The session this connection's batches of each topic are numbered in (at most one
    /// per topic of the pool).
    producers: HashMap<TopicId, ProducerSession>,
    /// The client's address, as text (empty when unknown).
    peer: String,
}

impl KafkaSession {
    /// The protocol of connection `conn`.
    pub fn new(conn: ConnId) -> KafkaSession {
        KafkaSession {
            conn,
            answers: VecDeque::new(),
            producers: HashMap::new(),
            peer: String::new(),
        }
    }

    /// Takes one request frame (without its size prefix); its answer is queued, ready or
    /// waiting (see [`Self::take_ready`]). The frame is shared, not copied: a Produce's
    /// records are slices of it.
    pub fn on_request(
        &mut self,
        frame: Bytes,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) -> Result<(), KafkaError> {
        let answer = self.answer(frame, context, now)?;
        if let Some(frame) = answer {
            self.answers.push_back(data::Answer::Ready(frame));
        }
        Ok(())
    }

    /// Answers a request at once, or queues its waiting answer and returns `None`.
    fn answer(
        &mut self,
        frame: Bytes,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) -> Result<Option<Vec<u8>>, KafkaError> {
        let mut body = frame.clone();
        if body.len() < 4 {
            return Err(malformed(
                "request header",
                "shorter than its key and version",
            ));
        }
        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
        let api_version = i16::from_be_bytes([frame[2], frame[3]]);
        let key = ApiKey::try_from(api_key).map_err(|()| KafkaError::UnsupportedApi(api_key))?;
        if key == ApiKey::ApiVersions {
            // A version this broker does not know is still answered (in version 0's
            // layout, with UNSUPPORTED_VERSION and the versions it does know), so that the
            // client can pick one: Kafka's own rule.
            let versions = ApiVersionsRequest::VERSIONS;
            let known = (versions.min..=versions.max).contains(&api_version);
            let header_version = if known {
                key.request_header_version(api_version)
            } else {
                1
            };
            let header = decode_header(&mut body, header_version)?;
            return if known {
                ApiVersionsRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("ApiVersions request", e))?;
                Ok(Some(respond(&header, key, api_version, &api_versions(0))))
            } else {
                Ok(Some(respond(
                    &header,
                    key,
                    0,
                    &api_versions(error_code::UNSUPPORTED_VERSION),
                )))
            };
        }
        let Some(&(_, min, max)) = SUPPORTED.iter().find(|(k, _, _)| *k == key) else {
            return Err(KafkaError::UnsupportedApi(api_key));
        };
        if !(min..=max).contains(&api_version) {
            // Clients pick from what ApiVersions offered; one that does not is broken.
            return Err(malformed(
                "request",
                format!("{key:?} version {api_version} (this broker speaks {min} to {max})"),
            ));
        }
        let header = decode_header(&mut body, key.request_header_version(api_version))?;
        match key {
            ApiKey::Metadata => {
                let request = MetadataRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("Metadata request", e))?;
                let response = metadata(&request, api_version, context);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::Produce => {
                let request = ProduceRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("Produce request", e))?;
                self.on_produce(header, api_version, request, context, now);
                Ok(None)
            }
            ApiKey::Fetch => {
                let request = FetchRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("Fetch request", e))?;
                data::check_fetch(&request).map_err(|e| malformed("Fetch request", e))?;
                self.on_fetch(header, api_version, request, context, now);
                Ok(None)
            }
            ApiKey::FindCoordinator => {
                let request = FindCoordinatorRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("FindCoordinator request", e))?;
                let response = offsets::find_coordinator(&request, api_version, context);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::OffsetCommit => {
                let request = OffsetCommitRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("OffsetCommit request", e))?;
                self.on_offset_commit(header, api_version, request, context, now);
                Ok(None)
            }
            ApiKey::OffsetFetch => {
                let request = OffsetFetchRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("OffsetFetch request", e))?;
                let response = offsets::offset_fetch(&request, context);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::CreateTopics => {
                let request = CreateTopicsRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("CreateTopics request", e))?;
                let response = admin::create_topics(&request, context);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::InitProducerId => {
                let request = InitProducerIdRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("InitProducerId request", e))?;
                let response = data::init_producer_id(&request);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::ListOffsets => {
                let request = ListOffsetsRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("ListOffsets request", e))?;
                let response = data::list_offsets(&request, context);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::JoinGroup => {
                let request = JoinGroupRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("JoinGroup request", e))?;
                self.on_join_group(header, api_version, request, context, now);
                Ok(None)
            }
            ApiKey::SyncGroup => {
                let request = SyncGroupRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("SyncGroup request", e))?;
                self.on_sync_group(header, api_version, request, context, now);
                Ok(None)
            }
            ApiKey::Heartbeat => {
                let request = HeartbeatRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("Heartbeat request", e))?;
                let response = groups::heartbeat(&request, context, now);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::ListGroups => {
                let request = ListGroupsRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("ListGroups request", e))?;
                let response = groups::list_groups(&request, context, now);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::DescribeGroups => {
                let request = DescribeGroupsRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("DescribeGroups request", e))?;
                let response = groups::describe_groups(&request, context, now);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            ApiKey::LeaveGroup => {
                let request = LeaveGroupRequest::decode(&mut body, api_version)
                    .map_err(|e| malformed("LeaveGroup request", e))?;
                let response = groups::leave_group(&request, api_version, context, now);
                Ok(Some(respond(&header, key, api_version, &response)))
            }
            _ => Err(KafkaError::UnsupportedApi(api_key)),
        }
    }
}

/// The broker that coordinates consumer groups: the live one with the lowest id (every
/// broker picks the same once they see the same live brokers).
fn coordinator(context: &mut dyn KafkaContext) -> KafkaNode {
    context
        .brokers()
        .into_iter()
        .min_by_key(|node| node.id)
        .unwrap_or_else(|| context.node())
}

fn malformed(what: &'static str, detail: impl std::fmt::Display) -> KafkaError {
    KafkaError::Malformed {
        what,
        detail: detail.to_string(),
    }
}

fn decode_header(body: &mut Bytes, header_version: i16) -> Result<RequestHeader, KafkaError> {
    RequestHeader::decode(body, header_version).map_err(|e| malformed("request header", e))
}

/// A frame as Kafka sends both ways: a 4-byte big-endian size, then what `encode` writes.
fn framed(encode: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_i32(0);
    encode(&mut out);
    let size = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    out.to_vec()
}

/// The response frame: size prefix, response header, body.
fn respond<M: Encodable>(header: &RequestHeader, key: ApiKey, version: i16, body: &M) -> Vec<u8> {
    framed(|out| {
        let response_header = ResponseHeader::default().with_correlation_id(header.correlation_id);
        // Encoding what this module built cannot fail: every field is within its type's range.
        response_header
            .encode(out, key.response_header_version(version))
            .expect("a response header encodes");
        body.encode(out, version).expect("a response encodes");
    })
}

fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|&(key, min, max)| {
                    ApiVersion::default()
                        .with_api_key(key as i16)
                        .with_min_version(min)
                        .with_max_version(max)
                })
                .collect(),
        )
}

/// A topic's Kafka id: stable for the pool's topic id (Kafka wants one per topic from
/// Metadata version 10 on).
fn topic_uuid(topic: TopicId) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(u64::from_be_bytes(*b"embarcad"), u64::from(topic))
}

fn metadata(
    request: &MetadataRequest,
    version: i16,
    context: &mut dyn KafkaContext,
) -> MetadataResponse {
    // From version 4 a client says whether a topic it names may be created on first use
    // (a producer's Metadata does); where this broker creates topics so, it is.
    if version >= 4 && request.allow_auto_topic_creation {
        for wanted in request.topics.iter().flatten() {
            if let Some(name) = &wanted.name {
                admin::find_or_create(name.0.as_str(), true, context);
            }
        }
    }
    let node = context.node();
    let topics = context.topics();
    let describe = |id: TopicId, name: &str| {
        MetadataResponseTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(name.to_owned()))))
            .with_topic_id(topic_uuid(id))
            .with_is_internal(name == offsets::OFFSETS_TOPIC)
            .with_partitions(vec![
                MetadataResponsePartition::default()
                    .with_partition_index(0)
                    .with_leader_id(BrokerId(node.id))
                    .with_replica_nodes(vec![BrokerId(node.id)])
                    .with_isr_nodes(vec![BrokerId(node.id)]),
            ])
    };
    // Version 0 asks for every topic with an empty list; later versions with a null one.
    let wanted = match &request.topics {
        Some(list) if !list.is_empty() || version >= 1 => Some(list),
        _ => None,
    };
    let described = match wanted {
        None => topics
            .iter()
            .map(|(id, name)| describe(*id, name))
            .collect(),
        Some(list) => list
            .iter()
            .map(|wanted| {
                // From version 10 a topic may be asked for by its id instead of its name.
                let found = match &wanted.name {
                    Some(name) => topics.iter().find(|(_, known)| known == name.0.as_str()),
                    None => topics
                        .iter()
                        .find(|(id, _)| topic_uuid(*id) == wanted.topic_id),
                };
                match (found, &wanted.name) {
                    (Some((id, known)), _) => describe(*id, known),
                    (None, Some(name)) => MetadataResponseTopic::default()
                        .with_error_code(error_code::UNKNOWN_TOPIC_OR_PARTITION)
                        .with_name(Some(name.clone())),
                    // The name is nullable in answers from version 12 only.
                    (None, None) => MetadataResponseTopic::default()
                        .with_error_code(error_code::UNKNOWN_TOPIC_ID)
                        .with_topic_id(wanted.topic_id)
                        .with_name((version < 12).then(|| TopicName(StrBytes::default()))),
                }
            })
            .collect(),
    };
    let brokers = context
        .brokers()
        .into_iter()
        .map(|broker| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(broker.id))
                .with_host(StrBytes::from_string(broker.host))
                .with_port(i32::from(broker.port))
        })
        .collect();
    MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(Some(StrBytes::from_static_str("embarcadero")))
        .with_controller_id(BrokerId(node.id))
        .with_topics(described)
}

/// A request frame with its size prefix, as a Kafka client sends it (for tests and tools).
pub fn request_frame<R: Encodable + HeaderVersion>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Vec<u8> {
    framed(|out| {
        // Encoding fails only for values outside a field's range, which a caller's request
        // built from the typed structs does not have.
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("embarcadero")))
            .encode(out, R::header_version(version))
            .expect("a request header encodes");
        body.encode(out, version).expect("a request encodes");
    })
}

/// Splits a response frame (with its size prefix) to a `key` request of `version`: the
/// correlation id and the body; `None` when it is not one whole response.
pub fn response_body(frame: &[u8], key: ApiKey, version: i16) -> Option<(i32, Bytes)> {
    let size = i32::from_be_bytes(frame.get(..4)?.try_into().ok()?);
    if usize::try_from(size).ok()? != frame.len() - 4 {
        return None;
    }
    let mut body = Bytes::copy_from_slice(&frame[4..]);
    let header = ResponseHeader::decode(&mut body, key.response_header_version(version)).ok()?;
    Some((header.correlation_id, body))
}

/// Unanswered output above which a connection stops reading requests: a client that does
/// not read its responses holds only this much of the broker's memory.
const OUTPUT_HIGH_WATER_BYTES: usize = 4 << 20;

/// One Kafka client connection: frames in, responses out.
#[derive(Debug)]
pub struct KafkaConnection {
    id: ConnId,
    session: KafkaSession,
    /// Bytes read and not yet taken as whole requests (frames are split off it, not copied).
    input: BytesMut,
    output: Vec<u8>,
    sent: usize,
    /// When the request now in the input began to arrive.
    request_started: Option<Timestamp>,
    ended: bool,
}

/// Bytes a read asks the stream for at most.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// How long one request may take to arrive once its first byte did.
pub const REQUEST_DEADLINE_MS: u64 = 30_000;

impl KafkaConnection {
    /// A new connection with id `id`.
    /// The same, for a client at `peer` (named in DescribeGroups, and its share of the
    /// group members counted by it).
    pub fn with_peer(mut self, peer: std::net::IpAddr) -> KafkaConnection {
        self.session.peer = peer.to_string();
        self
    }

    pub fn new(id: ConnId) -> KafkaConnection {
        KafkaConnection {
            id,
            session: KafkaSession::new(id),
            input: BytesMut::new(),
            output: Vec::new(),
            sent: 0,
            request_started: None,
            ended: false,
        }
    }

    /// Whether responses wait to be written.
    pub fn has_output(&self) -> bool {
        self.sent < self.output.len()
    }

    /// Whether an answer waits on something that no input announces (a decision, the
    /// replicas, room in the pool, records for a Fetch, a deadline).
    pub fn pending(&self) -> bool {
        self.session.pending()
    }

    /// The sequencer's decision on one of this connection's batches.
    pub fn on_outcome(&mut self, outcome: &RoutedOutcome) {
        self.session.on_outcome(outcome);
    }

    /// One turn of the network loop: write what is queued, answer what is buffered and
    /// what arrives (while the unanswered output is below the high-water mark), write again.
    pub fn service<S: ByteStream>(
        &mut self,
        stream: &mut S,
        context: &mut dyn KafkaContext,
        now: Timestamp,
        readable: bool,
        writable: bool,
    ) -> Service {
        let mut service = Service::default();
        if self.has_output() && writable {
            service.wrote = true;
            if !self.on_writable(stream) {
                service.ended = true;
                return service;
            }
        }
        // Waiting answers move on; requests left whole in the input while the output was
        // full raise no new edge.
        self.session.poll(context, now, !self.output_full());
        self.session.take_ready(&mut self.output);
        if let Err(error) = self.answer_complete(context, now) {
            self.fail(&error, context);
        }
        if readable && !self.ended {
            let (input, read_any) = self.on_readable(stream, context, now);
            service.ended |= input == InputState::Ended;
            // A read paused before it took anything did nothing: it must not count as work,
            // or the loop would spin on a client that does not read its responses.
            if read_any || input != InputState::Paused {
                service.input = Some(input);
            }
        }
        if self.reading_paused() {
            // The broker stopped reading, not the client: the request's clock stands still.
            self.request_started = self.request_started.map(|_| now);
        } else if self.request_started.is_some_and(|t| {
            now.saturating_duration_since(t).as_millis() > u128::from(REQUEST_DEADLINE_MS)
        }) {
            log::info!(
                "kafka connection {}: a request did not arrive within {REQUEST_DEADLINE_MS} ms",
                self.id
            );
            context
                .metrics()
                .kafka_connections_failed
                .fetch_add(1, Ordering::Relaxed);
            self.ended = true;
        }
        if self.has_output() && writable && !service.ended {
            service.wrote = true;
            service.ended |= !self.on_writable(stream);
        }
        service.ended |= self.ended;
        service
    }

    /// Whether the unanswered output reached the high-water mark.
    fn output_full(&self) -> bool {
        self.output.len() - self.sent >= OUTPUT_HIGH_WATER_BYTES
    }

    /// Whether no request is taken now: the output is full, or as many answers wait as a
    /// connection may have.
    fn reading_paused(&self) -> bool {
        self.output_full() || !self.session.has_room()
    }

    fn fail(&mut self, error: &KafkaError, context: &mut dyn KafkaContext) {
        log::info!("kafka connection {}: {error}; closing it", self.id);
        context
            .metrics()
            .kafka_connections_failed
            .fetch_add(1, Ordering::Relaxed);
        self.ended = true;
    }

    /// Reads and answers until the stream would block or the output is full; also says
    /// whether it took any bytes.
    fn on_readable<S: ByteStream>(
        &mut self,
        stream: &mut S,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) -> (InputState, bool) {
        let mut read_any = false;
        let mut read_bytes = 0;
        let state = loop {
            if self.reading_paused() {
                break InputState::Paused;
            }
            // The loop's other connections (and the sequencer, when it runs in the loop)
            // come first once a pass read this much: a fast producer does not hold the loop.
            if read_bytes >= READ_BYTES_PER_SERVICE {
                break InputState::Paused;
            }
            // Read straight into the input's free room (no copy through a stack buffer).
            let filled = self.input.len();
            self.input.resize(filled + READ_CHUNK_BYTES, 0);
            let received = stream.recv(&mut self.input[filled..]);
            let n = *received.as_ref().unwrap_or(&0);
            self.input.truncate(filled + n);
            match received {
                Ok(0) => break InputState::Ended,
                Ok(_) => {
                    read_any = true;
                    read_bytes += n;
                    if filled == 0 {
                        self.request_started = Some(now);
                    }
                    if let Err(error) = self.answer_complete(context, now) {
                        self.fail(&error, context);
                        break InputState::Ended;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break InputState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("kafka connection {}: receive failed: {e}", self.id);
                    break InputState::Ended;
                }
            }
        };
        (state, read_any)
    }

    /// Answers the complete requests in the input, in order, until the output reaches the
    /// high-water mark (the rest wait in the input).
    fn answer_complete(
        &mut self,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) -> Result<(), KafkaError> {
        let mut taken = false;
        while !self.reading_paused() {
            let rest = &self.input[..];
            if rest.len() < 4 {
                break;
            }
            let size = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            if size < 0 || size as usize > REQUEST_BYTES_MAX {
                return Err(KafkaError::FrameSize {
                    size: i64::from(size),
                    limit: REQUEST_BYTES_MAX,
                });
            }
            let size = size as usize;
            if rest.len() < 4 + size {
                break;
            }
            let frame = self.input.split_to(4 + size).freeze().slice(4..);
            self.session.on_request(frame, context, now)?;
            self.session.take_ready(&mut self.output);
            context
                .metrics()
                .kafka_requests
                .fetch_add(1, Ordering::Relaxed);
            taken = true;
        }
        if taken {
            self.request_started = (!self.input.is_empty()).then_some(now);
        }
        Ok(())
    }

    /// Writes queued responses; false when the stream failed.
    fn on_writable<S: ByteStream>(&mut self, stream: &mut S) -> bool {
        while self.has_output() {
            match stream.send(&self.output[self.sent..]) {
                Ok(0) => return false,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("kafka connection {}: send failed: {e}", self.id);
                    return false;
                }
            }
        }
        // What was sent is let go of (once it is half the buffer: each byte is moved at
        // most once on average), so that the buffer holds about what is owed.
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        } else if self.sent >= self.output.len() / 2 {
            self.output.drain(..self.sent);
            self.sent = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;

    use super::fake::FakeLog;
    use super::*;

    /// The broker's topics "orders" and "payments", nothing in them.
    fn topics() -> FakeLog {
        FakeLog::two_topics()
    }

    fn request<R: Encodable + HeaderVersion>(
        key: ApiKey,
        version: i16,
        correlation_id: i32,
        body: &R,
    ) -> Vec<u8> {
        request_frame(key, version, correlation_id, body)
    }

    fn response(frame: &[u8], key: ApiKey, version: i16) -> (i32, Bytes) {
        response_body(frame, key, version).expect("one whole response")
    }

    fn answer(frame: &[u8]) -> Result<Vec<u8>, KafkaError> {
        let mut session = KafkaSession::new(1);
        session.on_request(
            Bytes::copy_from_slice(&frame[4..]),
            &mut topics(),
            Timestamp::now(),
        )?;
        let mut out = Vec::new();
        session.take_ready(&mut out);
        Ok(out)
    }

    #[test]
    fn api_versions_lists_what_this_broker_speaks_in_every_version() {
        for version in 0..=4 {
            let frame = request(
                ApiKey::ApiVersions,
                version,
                17,
                &ApiVersionsRequest::default(),
            );
            let out = answer(&frame).unwrap();
            let (correlation, mut body) = response(&out, ApiKey::ApiVersions, version);
            assert_eq!(correlation, 17);
            let versions = ApiVersionsResponse::decode(&mut body, version).unwrap();
            assert_eq!(versions.error_code, 0);
            let offered: Vec<(i16, i16, i16)> = versions
                .api_keys
                .iter()
                .map(|k| (k.api_key, k.min_version, k.max_version))
                .collect();
            assert_eq!(
                offered,
                vec![
                    (ApiKey::Produce as i16, 0, 9),
                    (ApiKey::Fetch as i16, 4, 12),
                    (ApiKey::ListOffsets as i16, 1, 7),
                    (ApiKey::Metadata as i16, 0, 12),
                    (ApiKey::ApiVersions as i16, 0, 4),
                    (ApiKey::InitProducerId as i16, 0, 4),
                    (ApiKey::CreateTopics as i16, 0, 7),
                    (ApiKey::FindCoordinator as i16, 0, 4),
                    (ApiKey::OffsetCommit as i16, 2, 8),
                    (ApiKey::OffsetFetch as i16, 1, 7),
                    (ApiKey::JoinGroup as i16, 0, 9),
                    (ApiKey::SyncGroup as i16, 0, 5),
                    (ApiKey::Heartbeat as i16, 0, 4),
                    (ApiKey::LeaveGroup as i16, 0, 5),
                    (ApiKey::ListGroups as i16, 0, 5),
                    (ApiKey::DescribeGroups as i16, 0, 5),
                ]
            );
        }
    }

    #[test]
    fn an_unknown_api_versions_version_is_answered_in_version_0_with_the_known_ones() {
        let frame = request(ApiKey::ApiVersions, 4, 5, &ApiVersionsRequest::default());
        let mut future = frame.clone();
        future[6..8].copy_from_slice(&99i16.to_be_bytes());
        let out = answer(&future).unwrap();
        let (correlation, mut body) = response(&out, ApiKey::ApiVersions, 0);
        assert_eq!(correlation, 5);
        let versions = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert_eq!(versions.error_code, error_code::UNSUPPORTED_VERSION);
        assert_eq!(versions.api_keys.len(), SUPPORTED.len());
    }

    #[test]
    fn metadata_names_every_topic_as_one_partition_led_by_this_broker() {
        for version in [0, 1, 4, 9, 12] {
            // Every topic: an empty list in version 0, a null one later.
            let all = MetadataRequest::default().with_topics((version == 0).then(Vec::new));
            let out = answer(&request(ApiKey::Metadata, version, 9, &all)).unwrap();
            let (correlation, mut body) = response(&out, ApiKey::Metadata, version);
            assert_eq!(correlation, 9);
            let metadata = MetadataResponse::decode(&mut body, version).unwrap();
            assert_eq!(metadata.brokers.len(), 1);
            assert_eq!(metadata.brokers[0].node_id, BrokerId(3));
            assert_eq!(metadata.brokers[0].host.as_str(), "10.0.0.7");
            assert_eq!(metadata.brokers[0].port, 9092);
            let names: Vec<&str> = metadata
                .topics
                .iter()
                .map(|t| t.name.as_ref().unwrap().0.as_str())
                .collect();
            assert_eq!(names, ["orders", "payments"], "version {version}");
            for topic in &metadata.topics {
                assert_eq!(topic.error_code, 0);
                assert_eq!(topic.partitions.len(), 1);
                assert_eq!(topic.partitions[0].partition_index, 0);
                assert_eq!(topic.partitions[0].leader_id, BrokerId(3));
            }
        }
    }

    #[test]
    fn metadata_for_named_topics_says_which_do_not_exist() {
        let wanted = |name: &'static str| {
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str(name))))
        };
        // A consumer's Metadata: nothing is created for it.
        let asked = MetadataRequest::default()
            .with_topics(Some(vec![wanted("payments"), wanted("nosuch")]))
            .with_allow_auto_topic_creation(false);
        let out = answer(&request(ApiKey::Metadata, 12, 1, &asked)).unwrap();
        let (_, mut body) = response(&out, ApiKey::Metadata, 12);
        let metadata = MetadataResponse::decode(&mut body, 12).unwrap();
        assert_eq!(metadata.topics.len(), 2);
        assert_eq!(metadata.topics[0].error_code, 0);
        assert_eq!(metadata.topics[0].topic_id, topic_uuid(2));
        assert_eq!(
            metadata.topics[1].error_code,
            error_code::UNKNOWN_TOPIC_OR_PARTITION
        );
        assert_eq!(
            metadata.topics[1].name.as_ref().unwrap().0.as_str(),
            "nosuch"
        );
    }

    #[test]
    fn a_topic_count_larger_than_the_request_is_refused_before_anything_is_reserved() {
        // Version 1: an int32 count (the published decoder would reserve room for 2^31
        // topics first: vendor/kafka-protocol.patch).
        let mut huge = request(ApiKey::Metadata, 1, 1, &MetadataRequest::default());
        let count_at = huge.len() - 4;
        huge[count_at..].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(answer(&huge), Err(KafkaError::Malformed { .. })));
        // Version 12: a compact array, its count a varint (here 2^32 - 2).
        let mut compact = request(ApiKey::Metadata, 12, 1, &MetadataRequest::default());
        let body_at = compact.len() - 4; // count (1 byte), two bools, tagged fields (1 byte)
        compact.truncate(body_at);
        compact.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]);
        let size = (compact.len() - 4) as i32;
        compact[..4].copy_from_slice(&size.to_be_bytes());
        assert!(matches!(
            answer(&compact),
            Err(KafkaError::Malformed { .. })
        ));
        // A count that fits is fine.
        let one = MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("orders")))),
        ]));
        assert!(answer(&request(ApiKey::Metadata, 1, 1, &one)).is_ok());
        assert!(answer(&request(ApiKey::Metadata, 12, 1, &one)).is_ok());
    }

    #[test]
    fn metadata_finds_a_topic_by_its_id() {
        let by_id = |id| {
            MetadataRequestTopic::default()
                .with_name(None)
                .with_topic_id(id)
        };
        let asked = MetadataRequest::default().with_topics(Some(vec![
            by_id(topic_uuid(2)),
            by_id(uuid::Uuid::from_u64_pair(1, 2)),
        ]));
        let out = answer(&request(ApiKey::Metadata, 12, 1, &asked)).unwrap();
        let (_, mut body) = response(&out, ApiKey::Metadata, 12);
        let metadata = MetadataResponse::decode(&mut body, 12).unwrap();
        assert_eq!(
            metadata.topics[0].name.as_ref().unwrap().0.as_str(),
            "payments"
        );
        assert_eq!(metadata.topics[1].error_code, error_code::UNKNOWN_TOPIC_ID);
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let frame = request(ApiKey::Metadata, 12, 1, &MetadataRequest::default());
        // Cut inside the body.
        assert!(matches!(
            KafkaSession::new(1).on_request(
                Bytes::copy_from_slice(&frame[4..frame.len() - 3]),
                &mut topics(),
                Timestamp::now()
            ),
            Err(KafkaError::Malformed { .. })
        ));
        // An API this broker does not offer.
        let mut delete = frame.clone();
        delete[4..6].copy_from_slice(&(ApiKey::DeleteTopics as i16).to_be_bytes());
        assert_eq!(
            answer(&delete),
            Err(KafkaError::UnsupportedApi(ApiKey::DeleteTopics as i16))
        );
        // A version outside what ApiVersions offered.
        let mut future = frame.clone();
        future[6..8].copy_from_slice(&13i16.to_be_bytes());
        assert!(matches!(answer(&future), Err(KafkaError::Malformed { .. })));
        // No header at all.
        assert!(matches!(
            KafkaSession::new(1).on_request(
                Bytes::from_static(&[0, 3]),
                &mut topics(),
                Timestamp::now()
            ),
            Err(KafkaError::Malformed { .. })
        ));
    }

    /// A stream fed in chunks; what the connection writes is kept.
    struct Chunks {
        input: Vec<Vec<u8>>,
        written: Vec<u8>,
        writable_bytes: usize,
    }

    impl ByteStream for Chunks {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let chunk = &mut self.input[0];
            let n = buf.len().min(chunk.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.input.remove(0);
            }
            Ok(n)
        }

        fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.writable_bytes);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.writable_bytes -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    #[test]
    fn requests_split_across_reads_and_several_in_one_read_are_all_answered_in_order() {
        let mut bytes = Vec::new();
        for correlation in 0..3 {
            bytes.extend(request(
                ApiKey::ApiVersions,
                3,
                correlation,
                &ApiVersionsRequest::default(),
            ));
        }
        // Chunks of 1, 2, 3, ... bytes: frames and size prefixes cut everywhere.
        let mut input = Vec::new();
        let mut rest = &bytes[..];
        for n in 1.. {
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            input.push(chunk.to_vec());
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        let mut stream = Chunks {
            input,
            written: Vec::new(),
            writable_bytes: usize::MAX,
        };
        let mut connection = KafkaConnection::new(1);
        let now = Timestamp::now();
        let service = connection.service(&mut stream, &mut topics(), now, true, true);
        assert!(!service.ended);
        let mut written = Bytes::from(stream.written);
        for correlation in 0..3 {
            let size = i32::from_be_bytes(written[..4].try_into().unwrap()) as usize;
            let frame = written.split_to(4 + size);
            assert_eq!(response(&frame, ApiKey::ApiVersions, 3).0, correlation);
        }
        assert!(written.is_empty());
    }

    #[test]
    fn a_bad_frame_ends_only_its_connection_and_a_slow_request_meets_its_deadline() {
        let now = Timestamp::now();
        for prefix in [
            (-1i32).to_be_bytes(),
            ((REQUEST_BYTES_MAX + 1) as i32).to_be_bytes(),
        ] {
            let mut stream = Chunks {
                input: vec![prefix.to_vec()],
                written: Vec::new(),
                writable_bytes: usize::MAX,
            };
            let service =
                KafkaConnection::new(1).service(&mut stream, &mut topics(), now, true, true);
            assert!(service.ended);
            assert!(stream.written.is_empty());
        }
        // Half a request, then nothing for longer than the deadline.
        let frame = request(ApiKey::ApiVersions, 3, 1, &ApiVersionsRequest::default());
        let mut stream = Chunks {
            input: vec![frame[..10].to_vec()],
            written: Vec::new(),
            writable_bytes: usize::MAX,
        };
        let mut connection = KafkaConnection::new(2);
        assert!(
            !connection
                .service(&mut stream, &mut topics(), now, true, true)
                .ended
        );
        let later = now + std::time::Duration::from_millis(REQUEST_DEADLINE_MS + 1);
        assert!(
            connection
                .service(&mut stream, &mut topics(), later, false, true)
                .ended
        );
    }

    #[test]
    fn a_fast_client_is_read_a_bounded_amount_per_pass() {
        // Heartbeats of a long member id: answers far smaller than the requests, so that
        // only the read budget stops a pass.
        let heartbeat = HeartbeatRequest::default()
            .with_member_id(StrBytes::from_string("m".repeat(200)))
            .with_generation_id(1);
        let frame = request(ApiKey::Heartbeat, 4, 1, &heartbeat);
        let requests = 3 * READ_BYTES_PER_SERVICE / frame.len();
        let mut stream = Chunks {
            input: vec![frame.repeat(requests)],
            written: Vec::new(),
            writable_bytes: usize::MAX,
        };
        let total = requests * frame.len();
        let mut connection = KafkaConnection::new(1);
        let service = connection.service(&mut stream, &mut topics(), Timestamp::now(), true, true);
        assert_eq!(service.input, Some(InputState::Paused));
        let left = stream.input.first().map_or(0, Vec::len);
        let read = total - left;
        assert!(
            (READ_BYTES_PER_SERVICE..READ_BYTES_PER_SERVICE + READ_CHUNK_BYTES).contains(&read),
            "read {read} bytes in one pass"
        );
    }

    #[test]
    fn a_client_that_does_not_read_its_responses_stops_being_read() {
        let frame = request(ApiKey::Metadata, 12, 1, &MetadataRequest::default());
        let out_bytes = answer(&frame).unwrap().len();
        let requests = OUTPUT_HIGH_WATER_BYTES / out_bytes + 10;
        let mut stream = Chunks {
            input: (0..requests).map(|_| frame.clone()).collect(),
            written: Vec::new(),
            writable_bytes: 0,
        };
        let mut connection = KafkaConnection::new(1);
        let service = connection.service(&mut stream, &mut topics(), Timestamp::now(), true, true);
        assert_eq!(service.input, Some(InputState::Paused));
        // Each pass reads at most READ_BYTES_PER_SERVICE; the passes go on until the output
        // reaches its mark. (The socket said it would block, so the loop does not offer it
        // as writable.)
        let mut passes = 0;
        while connection
            .service(&mut stream, &mut topics(), Timestamp::now(), true, false)
            .worked()
        {
            passes += 1;
            assert!(
                passes < 1_000,
                "reading stops once the output is at its mark"
            );
        }
        assert!(!stream.input.is_empty(), "requests are left in the socket");
        // What it holds for the client stays near the mark (one response over at most),
        // and a pass that could not read is not work (the loop would spin on it).
        assert!(connection.output.len() < OUTPUT_HIGH_WATER_BYTES + out_bytes);
        // Once the client reads, the rest is answered, in order, with no new input edge
        // for the requests already buffered.
        stream.writable_bytes = usize::MAX;
        let mut passes = 0;
        while !stream.input.is_empty() || connection.has_output() || !connection.input.is_empty() {
            connection.service(
                &mut stream,
                &mut topics(),
                Timestamp::now(),
                passes == 0,
                true,
            );
            passes += 1;
            assert!(passes < 10_000);
        }
        assert_eq!(stream.written.len(), requests * out_bytes);
        assert!(connection.output.capacity() < 2 * OUTPUT_HIGH_WATER_BYTES + 2 * out_bytes);
    }
}

/// Every served API's requests, valid and then mutated (bytes flipped, cut, repeated), go
/// through one session: each is answered or refused with a [`KafkaError`], never a panic,
/// and every answer is whole frames. Deterministic: a seed reproduces any failure.
#[cfg(test)]
mod mutation_tests {
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::leave_group_request::MemberIdentity;
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{
        CreateTopicsRequest, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
        ListOffsetsRequest, OffsetCommitRequest, OffsetFetchRequest, SyncGroupRequest,
    };

    use super::fake::FakeLog;
    use super::*;

    fn name(text: &str) -> TopicName {
        TopicName(StrBytes::from_string(text.to_owned()))
    }

    fn group() -> GroupId {
        GroupId(StrBytes::from_static_str("billing"))
    }

    /// One valid request frame (with its size prefix) of each served API.
    fn valid_frames() -> Vec<Vec<u8>> {
        let mut batch = Vec::new();
        wire::record_batch::encode(&mut batch, 0, [&b"one"[..], b"two"].into_iter());
        let produce = ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(1000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(name("orders"))
                    .with_partition_data(vec![
                        PartitionProduceData::default().with_records(Some(Bytes::from(batch))),
                    ]),
            ]);
        let fetch = FetchRequest::default()
            .with_max_wait_ms(0)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(name("orders"))
                    .with_partitions(vec![
                        FetchPartition::default().with_partition_max_bytes(1 << 20),
                    ]),
            ]);
        let list_offsets = ListOffsetsRequest::default().with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(name("orders"))
                .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(-2)]),
        ]);
        let commit = OffsetCommitRequest::default()
            .with_group_id(group())
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![
                OffsetCommitRequestTopic::default()
                    .with_name(name("orders"))
                    .with_partitions(vec![
                        OffsetCommitRequestPartition::default().with_committed_offset(1),
                    ]),
            ]);
        let offset_fetch = OffsetFetchRequest::default()
            .with_group_id(group())
            .with_topics(Some(vec![
                OffsetFetchRequestTopic::default()
                    .with_name(name("orders"))
                    .with_partition_indexes(vec![0]),
            ]));
        let join = JoinGroupRequest::default()
            .with_group_id(group())
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(StrBytes::from_static_str("member-1"))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(Bytes::from_static(b"meta")),
            ]);
        let sync = SyncGroupRequest::default()
            .with_group_id(group())
            .with_generation_id(1)
            .with_member_id(StrBytes::from_static_str("member-1"))
            .with_assignments(vec![
                SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_static_str("member-1"))
                    .with_assignment(Bytes::from_static(b"orders")),
            ]);
        let heartbeat = HeartbeatRequest::default()
            .with_group_id(group())
            .with_generation_id(1)
            .with_member_id(StrBytes::from_static_str("member-1"));
        let leave = LeaveGroupRequest::default()
            .with_group_id(group())
            .with_members(vec![
                MemberIdentity::default().with_member_id(StrBytes::from_static_str("member-1")),
            ]);
        let create = CreateTopicsRequest::default().with_topics(vec![
            CreatableTopic::default()
                .with_name(name("fresh"))
                .with_num_partitions(1)
                .with_replication_factor(1),
        ]);
        vec![
            request_frame(ApiKey::ApiVersions, 3, 1, &ApiVersionsRequest::default()),
            request_frame(
                ApiKey::Metadata,
                12,
                2,
                &MetadataRequest::default().with_topics(None),
            ),
            request_frame(ApiKey::Produce, 9, 3, &produce),
            request_frame(ApiKey::Fetch, 12, 4, &fetch),
            request_frame(ApiKey::ListOffsets, 7, 5, &list_offsets),
            request_frame(
                ApiKey::InitProducerId,
                4,
                6,
                &InitProducerIdRequest::default(),
            ),
            request_frame(ApiKey::CreateTopics, 7, 7, &create),
            request_frame(
                ApiKey::FindCoordinator,
                4,
                8,
                &FindCoordinatorRequest::default()
                    .with_coordinator_keys(vec![StrBytes::from_static_str("billing")]),
            ),
            request_frame(ApiKey::OffsetCommit, 8, 9, &commit),
            request_frame(ApiKey::OffsetFetch, 7, 10, &offset_fetch),
            request_frame(ApiKey::JoinGroup, 9, 11, &join),
            request_frame(ApiKey::SyncGroup, 5, 12, &sync),
            request_frame(ApiKey::Heartbeat, 4, 13, &heartbeat),
            request_frame(ApiKey::LeaveGroup, 5, 14, &leave),
            request_frame(
                ApiKey::ListGroups,
                5,
                15,
                &kafka_protocol::messages::ListGroupsRequest::default(),
            ),
            request_frame(
                ApiKey::DescribeGroups,
                5,
                16,
                &kafka_protocol::messages::DescribeGroupsRequest::default()
                    .with_groups(vec![group()]),
            ),
        ]
    }

    /// splitmix64: the mutations of a seed.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn mutate(frame: &[u8], seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut body = frame[4..].to_vec();
        for _ in 0..=next(&mut state) % 4 {
            let at = (next(&mut state) as usize) % body.len().max(1);
            match next(&mut state) % 4 {
                0 if !body.is_empty() => body[at] ^= 1 << (next(&mut state) % 8),
                1 if !body.is_empty() => body[at] = next(&mut state) as u8,
                2 => body.truncate(at),
                _ => {
                    let piece: Vec<u8> = body[at..].iter().take(16).copied().collect();
                    body.splice(at..at, piece);
                }
            }
        }
        body
    }

    /// Splits `out` into frames; panics unless it is whole frames.
    fn check_frames(mut out: &[u8], seed: u64) {
        while !out.is_empty() {
            assert!(out.len() >= 8, "seed {seed}: a frame cut short");
            let size = i32::from_be_bytes(out[..4].try_into().unwrap());
            let size = usize::try_from(size).expect("a positive size");
            assert!(out.len() >= 4 + size, "seed {seed}: a frame cut short");
            out = &out[4 + size..];
        }
    }

    #[test]
    fn mutated_requests_of_every_api_are_answered_or_refused_never_a_panic() {
        let frames = valid_frames();
        let mut log = FakeLog::two_topics();
        let mut session = KafkaSession::new(7);
        let mut now = Timestamp::from_nanos(1_000_000_000);
        // The valid ones first: each is answered.
        for frame in &frames {
            session
                .on_request(Bytes::copy_from_slice(&frame[4..]), &mut log, now)
                .expect("a valid request");
        }
        let (mut answered, mut refused) = (0, 0);
        for seed in 0..20_000u64 {
            let frame = &frames[(seed as usize) % frames.len()];
            let body = mutate(frame, seed);
            // A session is closed after an error, as its connection would be.
            match session.on_request(Bytes::from(body), &mut log, now) {
                Ok(()) => answered += 1,
                Err(_) => {
                    refused += 1;
                    session = KafkaSession::new(7);
                }
            }
            for outcome in log.order_all() {
                session.on_outcome(&outcome);
            }
            now += std::time::Duration::from_millis(50);
            session.poll(&mut log, now, true);
            let mut out = Vec::new();
            session.take_ready(&mut out);
            check_frames(&out, seed);
            // Bounded: answers do not pile up past the connection's limit.
            if !session.has_room() {
                session = KafkaSession::new(7);
            }
        }
        assert!(
            answered > 1_000 && refused > 1_000,
            "{answered} answered, {refused} refused"
        );
    }
}
