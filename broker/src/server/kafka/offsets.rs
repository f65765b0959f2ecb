//! Committed offsets: FindCoordinator, OffsetCommit and OffsetFetch, for consumers that
//! assign partitions themselves and commit their progress under a group id.
//!
//! A commit is written to the log like any message: one record per partition, in the
//! internal topic [`OFFSETS_TOPIC`], in the total order, on its replicas where it has any.
//! So it survives the broker that took it, and every broker can answer OffsetFetch for
//! every group: it reads the commits back from the shared log ([`OffsetsCache`] follows
//! the topic). The latest commit of a (group, topic, partition) wins. The topic is not
//! compacted: once its log wraps, older commits are gone (a group that has not committed
//! for that long starts again from `auto.offset.reset`).
//!
//! FindCoordinator names the broker that coordinates group membership (`groups`); a
//! member's commit (a generation from JoinGroup) is taken there only, and only from a
//! member of the group's current generation. A commit without a generation (a consumer
//! that assigns its partitions itself) is taken by any broker.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FindCoordinatorRequest, FindCoordinatorResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, RequestHeader, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use units::Timestamp;

use super::data::Reply;
use super::{KafkaContext, KafkaSession, error_code, respond};

/// The internal topic that holds committed offsets.
pub const OFFSETS_TOPIC: &str = "__embarcadero_offsets";

/// Format of a commit record (its first byte).
const COMMIT_RECORD_VERSION: u8 = 1;

/// Committed (group, topic, partition)s a broker keeps in memory at most; past it, the
/// oldest commits are forgotten (and read again as none).
pub const COMMITS_MAX: usize = 100_000;

/// The longest group id taken (bytes).
pub const GROUP_BYTES_MAX: usize = 1024;

/// The longest commit metadata taken (bytes; Kafka's default `offset.metadata.max.bytes`).
pub const METADATA_BYTES_MAX: usize = 4096;

/// An OffsetCommit's partitions by topic, each with its own error (`None`: committed with
/// the others, by the one batch of commit records).
pub type CommitAnswers = Vec<(TopicName, Vec<(i32, Option<i16>)>)>;

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The next offset the group will read.
    pub offset: i64,
    /// The leader epoch the client gave (-1 when none).
    pub leader_epoch: i32,
    /// The client's metadata string.
    pub metadata: Option<String>,
}

/// A commit record: a (group, topic, partition) and what was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    /// The group id.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// What was committed.
    pub committed: Committed,
}

impl CommitRecord {
    /// `version:u8 | group_len:u16 | group | topic_len:u16 | topic | partition:i32 |
    /// offset:i64 | leader_epoch:i32 | metadata_len:i32 (-1: null) | metadata`, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMMIT_RECORD_VERSION];
        for text in [&self.group, &self.topic] {
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.committed.offset.to_be_bytes());
        out.extend_from_slice(&self.committed.leader_epoch.to_be_bytes());
        match &self.committed.metadata {
            Some(metadata) => {
                out.extend_from_slice(&(metadata.len() as i32).to_be_bytes());
                out.extend_from_slice(metadata.as_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        out
    }

    /// The record `bytes` holds; `None` when it is not one.
    pub fn decode(bytes: &[u8]) -> Option<CommitRecord> {
        let mut at = 0;
        let mut take = |n: usize| {
            let taken = bytes.get(at..at + n)?;
            at += n;
            Some(taken)
        };
        if take(1)? != [COMMIT_RECORD_VERSION] {
            return None;
        }
        let mut text = || {
            let len = u16::from_be_bytes(take(2)?.try_into().ok()?);
            String::from_utf8(take(usize::from(len))?.to_vec()).ok()
        };
        let (group, topic) = (text()?, text()?);
        let partition = i32::from_be_bytes(take(4)?.try_into().ok()?);
        let offset = i64::from_be_bytes(take(8)?.try_into().ok()?);
        let leader_epoch = i32::from_be_bytes(take(4)?.try_into().ok()?);
        let metadata_len = i32::from_be_bytes(take(4)?.try_into().ok()?);
        let metadata = match usize::try_from(metadata_len) {
            Ok(len) => Some(String::from_utf8(take(len)?.to_vec()).ok()?),
            Err(_) => None,
        };
        (at == bytes.len()).then_some(CommitRecord {
            group,
            topic,
            partition,
            committed: Committed {
                offset,
                leader_epoch,
                metadata,
            },
        })
    }
}

/// The latest commits, as read from [`OFFSETS_TOPIC`] so far.
#[derive(Debug, Default)]
pub struct OffsetsCache {
    /// The latest commit of each key, with its age.
    commits: HashMap<(String, String, i32), (Committed, u64)>,
    /// The keys by age, oldest first (eviction past [`COMMITS_MAX`] in O(log n)).
    by_age: BTreeMap<u64, (String, String, i32)>,
    /// Commits taken, in order (their age).
    applied: u64,
}

impl OffsetsCache {
    /// Takes one message of the offsets topic (others than commit records are skipped).
    pub fn apply(&mut self, message: &[u8]) {
        let Some(record) = CommitRecord::decode(message) else {
            return;
        };
        self.applied += 1;
        let key = (record.group, record.topic, record.partition);
        if !self.commits.contains_key(&key)
            && self.commits.len() >= COMMITS_MAX
            && let Some((_, oldest)) = self.by_age.pop_first()
        {
            self.commits.remove(&oldest);
        }
        if let Some((_, age)) = self.commits.get(&key) {
            self.by_age.remove(age);
        }
        self.by_age.insert(self.applied, key.clone());
        self.commits.insert(key, (record.committed, self.applied));
    }

    /// The latest commit of `group` for `topic`'s `partition`.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<&Committed> {
        self.commits
            .get(&(group.to_owned(), topic.to_owned(), partition))
            .map(|(committed, _)| committed)
    }
}

/// FindCoordinator: the broker that coordinates groups (see `groups`); transactions have
/// no coordinator.
pub(super) fn find_coordinator(
    request: &FindCoordinatorRequest,
    version: i16,
    context: &mut dyn KafkaContext,
) -> FindCoordinatorResponse {
    let node = super::coordinator(context);
    let answer = |key: &StrBytes| {
        let coordinator = Coordinator::default()
            .with_key(key.clone())
            .with_node_id(BrokerId(node.id))
            .with_host(StrBytes::from_string(node.host.clone()))
            .with_port(i32::from(node.port));
        if request.key_type == 0 {
            coordinator
        } else {
            coordinator
                .with_node_id(BrokerId(-1))
                .with_host(StrBytes::default())
                .with_port(-1)
                .with_error_code(error_code::COORDINATOR_NOT_AVAILABLE)
                .with_error_message(Some(StrBytes::from_static_str(
                    "transactions are not served",
                )))
        }
    };
    if version >= 4 {
        let coordinators = request.coordinator_keys.iter().map(answer).collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let one = answer(&request.key);
    FindCoordinatorResponse::default()
        .with_error_code(one.error_code)
        .with_error_message(one.error_message)
        .with_node_id(one.node_id)
        .with_host(one.host)
        .with_port(one.port)
}

/// The OffsetCommit response: each partition's own error, or `written` (what became of the
/// commit records).
pub(super) fn commit_response(
    header: &RequestHeader,
    version: i16,
    topics: &CommitAnswers,
    written: i16,
) -> Vec<u8> {
    let topics = topics
        .iter()
        .map(|(name, partitions)| {
            OffsetCommitResponseTopic::default()
                .with_name(name.clone())
                .with_partitions(
                    partitions
                        .iter()
                        .map(|&(partition, error)| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(partition)
                                .with_error_code(error.unwrap_or(written))
                        })
                        .collect(),
                )
        })
        .collect();
    respond(
        header,
        ApiKey::OffsetCommit,
        version,
        &OffsetCommitResponse::default().with_topics(topics),
    )
}

impl KafkaSession {
    /// OffsetCommit: the commits of a group's partitions, written to the offsets topic as
    /// one batch; answered once it is ordered (and on the topic's replicas).
    pub(super) fn on_offset_commit(
        &mut self,
        header: RequestHeader,
        version: i16,
        request: OffsetCommitRequest,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) {
        // A group member's commit (its generation from JoinGroup) is checked against the
        // group's membership, by its coordinator.
        let member = if request.generation_id_or_member_epoch < 0 {
            None
        } else if !super::groups::coordinates(context) {
            Some(error_code::NOT_COORDINATOR)
        } else {
            context
                .groups()
                .heartbeat(
                    request.group_id.0.as_str(),
                    request.generation_id_or_member_epoch,
                    request.member_id.as_str(),
                    now,
                )
                .err()
                .map(|refused| refused.code())
        };
        let group_too_long = request.group_id.0.len() > GROUP_BYTES_MAX;
        let mut commits = Vec::new();
        let topics: CommitAnswers = request
            .topics
            .iter()
            .map(|topic| {
                let known = context.find_topic(topic.name.0.as_str()).is_some();
                let partitions = topic
                    .partitions
                    .iter()
                    .map(|p| {
                        let metadata_bytes = p.committed_metadata.as_ref().map_or(0, |m| m.len());
                        let error = if group_too_long {
                            Some(error_code::INVALID_GROUP_ID)
                        } else if member.is_some() {
                            member
                        } else if metadata_bytes > METADATA_BYTES_MAX {
                            Some(error_code::OFFSET_METADATA_TOO_LARGE)
                        } else if !known || p.partition_index != 0 {
                            Some(error_code::UNKNOWN_TOPIC_OR_PARTITION)
                        } else {
                            commits.push(CommitRecord {
                                group: request.group_id.0.to_string(),
                                topic: topic.name.0.to_string(),
                                partition: p.partition_index,
                                committed: Committed {
                                    offset: p.committed_offset,
                                    leader_epoch: p.committed_leader_epoch,
                                    metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                                },
                            });
                            None
                        };
                        (p.partition_index, error)
                    })
                    .collect();
                (topic.name.clone(), partitions)
            })
            .collect();
        let offsets_topic = if commits.is_empty() {
            None
        } else {
            context.offsets_topic()
        };
        let Some(offsets_topic) = offsets_topic else {
            // Nothing to write, or nowhere to write it yet (the offsets topic is created by
            // the broker that holds the sequencer lease).
            let written = if commits.is_empty() {
                0
            } else {
                error_code::COORDINATOR_NOT_AVAILABLE
            };
            let frame = commit_response(&header, version, &topics, written);
            self.answers.push_back(super::data::Answer::Ready(frame));
            return;
        };
        let encoded: Vec<Vec<u8>> = commits.iter().map(CommitRecord::encode).collect();
        let mut batch = Vec::new();
        wire::record_batch::encode(&mut batch, 0, encoded.iter().map(Vec::as_slice));
        let name = TopicName(StrBytes::from_static_str(OFFSETS_TOPIC));
        self.write_records(
            (header, version),
            (name, offsets_topic),
            Bytes::from(batch),
            Reply::OffsetCommit(topics),
            context,
            now,
        );
    }
}

/// OffsetFetch: the latest commit of each partition asked for (offset -1: none).
pub(super) fn offset_fetch(
    request: &OffsetFetchRequest,
    context: &mut dyn KafkaContext,
) -> OffsetFetchResponse {
    let group = request.group_id.0.as_str();
    let answer = |context: &mut dyn KafkaContext, topic: &str, partition: i32| {
        let response = OffsetFetchResponsePartition::default()
            .with_partition_index(partition)
            .with_committed_offset(-1)
            .with_committed_leader_epoch(-1)
            .with_metadata(Some(StrBytes::default()));
        match context.committed(group, topic, partition) {
            Some(committed) => response
                .with_committed_offset(committed.offset)
                .with_committed_leader_epoch(committed.leader_epoch)
                .with_metadata(Some(StrBytes::from_string(
                    committed.metadata.unwrap_or_default(),
                ))),
            None => response,
        }
    };
    let topics = match &request.topics {
        Some(topics) => topics
            .iter()
            .map(|topic| {
                let partitions = topic
                    .partition_indexes
                    .iter()
                    .map(|&p| answer(context, topic.name.0.as_str(), p))
                    .collect();
                OffsetFetchResponseTopic::default()
                    .with_name(topic.name.clone())
                    .with_partitions(partitions)
            })
            .collect(),
        // Every topic the group committed: partition 0 of each topic there is.
        None => context
            .topics()
            .into_iter()
            .filter(|(_, name)| name != OFFSETS_TOPIC)
            .filter_map(|(_, name)| {
                let partition = answer(context, &name, 0);
                (partition.committed_offset >= 0).then(|| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(StrBytes::from_string(name)))
                        .with_partitions(vec![partition])
                })
            })
            .collect(),
    };
    OffsetFetchResponse::default().with_topics(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_record_reads_back_as_written_and_garbage_is_none() {
        let record = CommitRecord {
            group: "billing".into(),
            topic: "orders".into(),
            partition: 0,
            committed: Committed {
                offset: 1234,
                leader_epoch: -1,
                metadata: Some("worker 3".into()),
            },
        };
        let bytes = record.encode();
        assert_eq!(CommitRecord::decode(&bytes), Some(record.clone()));
        let mut no_metadata = record;
        no_metadata.committed.metadata = None;
        assert_eq!(
            CommitRecord::decode(&no_metadata.encode()),
            Some(no_metadata)
        );
        for cut in 0..bytes.len() {
            assert_eq!(CommitRecord::decode(&bytes[..cut]), None);
        }
        assert_eq!(CommitRecord::decode(b"not a commit"), None);
    }

    #[test]
    fn the_latest_commit_wins_and_the_cache_is_bounded() {
        let mut cache = OffsetsCache::default();
        let commit = |group: &str, offset| {
            CommitRecord {
                group: group.into(),
                topic: "t".into(),
                partition: 0,
                committed: Committed {
                    offset,
                    leader_epoch: -1,
                    metadata: None,
                },
            }
            .encode()
        };
        cache.apply(&commit("g", 5));
        cache.apply(&commit("g", 9));
        cache.apply(b"garbage");
        assert_eq!(cache.committed("g", "t", 0).map(|c| c.offset), Some(9));
        assert!(cache.committed("h", "t", 0).is_none());
        for i in 0..COMMITS_MAX as i64 {
            cache.apply(&commit(&format!("group-{i}"), i));
        }
        assert_eq!(cache.commits.len(), COMMITS_MAX);
        assert_eq!(cache.by_age.len(), COMMITS_MAX);
        assert!(cache.committed("g", "t", 0).is_none(), "the oldest went");
        // A key committed again is young again.
        cache.apply(&commit("group-0", 100));
        cache.apply(&commit("newcomer", 1));
        assert!(cache.committed("group-0", "t", 0).is_some());
        assert!(cache.committed("group-1", "t", 0).is_none());
    }
}

#[cfg(test)]
mod session_tests {
    use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest as Find;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
    use kafka_protocol::messages::{GroupId, OffsetCommitResponse};
    use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

    use super::super::fake::FakeLog;
    use super::super::{KafkaNode, request_frame, response_body};
    use super::*;

    fn call<R: Encodable + HeaderVersion>(
        session: &mut KafkaSession,
        log: &mut FakeLog,
        key: ApiKey,
        version: i16,
        body: &R,
    ) -> Vec<u8> {
        let frame = request_frame(key, version, 1, body);
        let now = Timestamp::now();
        session
            .on_request(Bytes::copy_from_slice(&frame[4..]), log, now)
            .unwrap();
        for outcome in log.order_all() {
            session.on_outcome(&outcome);
        }
        session.poll(log, now, true);
        let mut out = Vec::new();
        session.take_ready(&mut out);
        response_body(&out, key, version).unwrap().1.to_vec()
    }

    fn commit(topic: &str, partition: i32, offset: i64, generation: i32) -> OffsetCommitRequest {
        OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("billing")))
            .with_generation_id_or_member_epoch(generation)
            .with_topics(vec![
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.into())))
                    .with_partitions(vec![
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(partition)
                            .with_committed_offset(offset)
                            .with_committed_metadata(Some(StrBytes::from_static_str("m"))),
                    ]),
            ])
    }

    fn fetch(topic: &str) -> OffsetFetchRequest {
        OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("billing")))
            .with_topics(Some(vec![
                OffsetFetchRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.into())))
                    .with_partition_indexes(vec![0]),
            ]))
    }

    #[test]
    fn a_commit_is_in_the_log_and_read_back_in_every_version() {
        for version in 2..=8 {
            let mut log = FakeLog::two_topics();
            let mut session = KafkaSession::new(1);
            let body = call(
                &mut session,
                &mut log,
                ApiKey::OffsetCommit,
                version,
                &commit("orders", 0, 42, -1),
            );
            let response = OffsetCommitResponse::decode(&mut Bytes::from(body), version).unwrap();
            assert_eq!(
                response.topics[0].partitions[0].error_code, 0,
                "version {version}"
            );
            for fetch_version in 1..=7 {
                let body = call(
                    &mut session,
                    &mut log,
                    ApiKey::OffsetFetch,
                    fetch_version,
                    &fetch("orders"),
                );
                let response =
                    OffsetFetchResponse::decode(&mut Bytes::from(body), fetch_version).unwrap();
                let partition = &response.topics[0].partitions[0];
                assert_eq!(
                    partition.committed_offset, 42,
                    "fetch version {fetch_version}"
                );
            }
            // Not committed: -1.
            let body = call(
                &mut session,
                &mut log,
                ApiKey::OffsetFetch,
                7,
                &fetch("payments"),
            );
            let response = OffsetFetchResponse::decode(&mut Bytes::from(body), 7).unwrap();
            assert_eq!(response.topics[0].partitions[0].committed_offset, -1);
        }
    }

    #[test]
    fn commits_that_cannot_be_taken_say_why() {
        let mut log = FakeLog::two_topics();
        let mut session = KafkaSession::new(1);
        for (request, code) in [
            (commit("orders", 0, 1, 3), error_code::UNKNOWN_MEMBER_ID),
            (
                commit("nosuch", 0, 1, -1),
                error_code::UNKNOWN_TOPIC_OR_PARTITION,
            ),
            (
                commit("orders", 2, 1, -1),
                error_code::UNKNOWN_TOPIC_OR_PARTITION,
            ),
            (
                commit("orders", 0, 1, -1).with_group_id(GroupId(StrBytes::from_string(
                    "g".repeat(GROUP_BYTES_MAX + 1),
                ))),
                error_code::INVALID_GROUP_ID,
            ),
            (
                {
                    let mut long = commit("orders", 0, 1, -1);
                    long.topics[0].partitions[0].committed_metadata =
                        Some(StrBytes::from_string("m".repeat(METADATA_BYTES_MAX + 1)));
                    long
                },
                error_code::OFFSET_METADATA_TOO_LARGE,
            ),
        ] {
            let body = call(&mut session, &mut log, ApiKey::OffsetCommit, 8, &request);
            let response = OffsetCommitResponse::decode(&mut Bytes::from(body), 8).unwrap();
            assert_eq!(response.topics[0].partitions[0].error_code, code);
        }
        // A member's commit goes to the coordinator: broker 1 is, when it is alive.
        log.peers.push(KafkaNode {
            id: 1,
            host: "10.0.0.5".into(),
            port: 9092,
        });
        let body = call(
            &mut session,
            &mut log,
            ApiKey::OffsetCommit,
            8,
            &commit("orders", 0, 1, 3),
        );
        let response = OffsetCommitResponse::decode(&mut Bytes::from(body), 8).unwrap();
        assert_eq!(
            response.topics[0].partitions[0].error_code,
            error_code::NOT_COORDINATOR
        );
        assert!(
            log.find_topic(OFFSETS_TOPIC).is_none(),
            "nothing was written"
        );
    }

    #[test]
    fn the_lowest_live_broker_coordinates_groups_and_none_transactions() {
        let mut log = FakeLog::two_topics();
        let mut session = KafkaSession::new(1);
        for version in 0..=4 {
            // Version 4 asks for a list of keys, the ones before for one.
            let group = if version >= 4 {
                Find::default().with_coordinator_keys(vec![StrBytes::from_static_str("billing")])
            } else {
                Find::default().with_key(StrBytes::from_static_str("billing"))
            };
            let body = call(
                &mut session,
                &mut log,
                ApiKey::FindCoordinator,
                version,
                &group,
            );
            let response =
                FindCoordinatorResponse::decode(&mut Bytes::from(body), version).unwrap();
            let (node, error) = if version >= 4 {
                (
                    response.coordinators[0].node_id,
                    response.coordinators[0].error_code,
                )
            } else {
                (response.node_id, response.error_code)
            };
            assert_eq!((node, error), (BrokerId(3), 0), "version {version}");
            if version == 0 {
                continue; // key types come with version 1
            }
            let transaction = group.with_key_type(1);
            let body = call(
                &mut session,
                &mut log,
                ApiKey::FindCoordinator,
                version,
                &transaction,
            );
            let response =
                FindCoordinatorResponse::decode(&mut Bytes::from(body), version).unwrap();
            let error = if version >= 4 {
                response.coordinators[0].error_code
            } else {
                response.error_code
            };
            assert_eq!(error, error_code::COORDINATOR_NOT_AVAILABLE);
        }
        // Broker 1 is alive and has a Kafka listener: it coordinates.
        log.peers.push(KafkaNode {
            id: 1,
            host: "10.0.0.5".into(),
            port: 9093,
        });
        let body = call(
            &mut session,
            &mut log,
            ApiKey::FindCoordinator,
            3,
            &Find::default().with_key(StrBytes::from_static_str("billing")),
        );
        let response = FindCoordinatorResponse::decode(&mut Bytes::from(body), 3).unwrap();
        assert_eq!(
            (response.node_id, response.host.as_str(), response.port),
            (BrokerId(1), "10.0.0.5", 9093)
        );
    }
}
