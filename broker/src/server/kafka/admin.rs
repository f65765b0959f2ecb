//! CreateTopics, and topics created on first use by Metadata (`allow_auto_topic_creation`).
//!
//! A topic is one partition (its total order), created by the broker that holds the
//! sequencer lease, as our own CreateTopic is: order 5 (each producer's batches in its
//! order inside the total order), ack 1, the replication factor asked for (Kafka's count,
//! the pool copy included; -1: the broker's default).

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use kafka_protocol::protocol::StrBytes;

use super::{KafkaContext, KafkaTopic, error_code, topic_uuid};

/// A topic a Kafka client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicCreation {
    /// Its name.
    pub name: String,
    /// Copies of it, the pool's included; `None`: the broker's default.
    pub replication_factor: Option<u8>,
    /// Check only; create nothing (CreateTopics' `validate_only`).
    pub validate_only: bool,
    /// Created because a client named it (Metadata): only where the broker creates topics
    /// on first use (`--auto-create-topics`).
    pub on_first_use: bool,
}

/// Why a topic was not created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRefused {
    /// This broker does not create topics (it does not hold the sequencer lease, or does
    /// not create them on first use).
    NotCreator,
    /// A topic of that name exists.
    Exists,
    /// The name is not one a topic may have.
    InvalidName(String),
    /// The pool's topic table is full.
    TableFull(String),
    /// Anything else the pool said.
    Failed(String),
}

/// Answers CreateTopics.
pub(super) fn create_topics(
    request: &CreateTopicsRequest,
    context: &mut dyn KafkaContext,
) -> CreateTopicsResponse {
    let topics = request
        .topics
        .iter()
        .map(|topic| {
            let result = CreatableTopicResult::default()
                .with_name(topic.name.clone())
                .with_num_partitions(1)
                .with_replication_factor(topic.replication_factor)
                .with_configs(None);
            let refuse = |code: i16, message: String| {
                result
                    .clone()
                    .with_error_code(code)
                    .with_error_message(Some(StrBytes::from_string(message)))
            };
            if !matches!(topic.num_partitions, -1 | 1) {
                return refuse(
                    error_code::INVALID_PARTITIONS,
                    format!(
                        "{} partitions: a topic is one partition, its total order",
                        topic.num_partitions
                    ),
                );
            }
            if !topic.assignments.is_empty() {
                return refuse(
                    error_code::INVALID_REPLICA_ASSIGNMENT,
                    "replica assignments are not taken: the pool and the replicating brokers hold every topic".into(),
                );
            }
            if !topic.configs.is_empty() {
                let names: Vec<&str> = topic.configs.iter().map(|c| c.name.as_str()).collect();
                return refuse(
                    error_code::INVALID_CONFIG,
                    format!("topic configs are not taken ({})", names.join(", ")),
                );
            }
            let replication_factor = match topic.replication_factor {
                -1 => None,
                factor => match u8::try_from(factor) {
                    Ok(factor) if factor >= 1 => Some(factor),
                    _ => {
                        return refuse(
                            error_code::INVALID_REPLICATION_FACTOR,
                            format!("replication factor {factor} (1 to 255, or -1)"),
                        );
                    }
                },
            };
            let creation = TopicCreation {
                name: topic.name.0.to_string(),
                replication_factor,
                validate_only: request.validate_only,
                on_first_use: false,
            };
            match context.create_topic(&creation) {
                Ok(_) if request.validate_only => result,
                Ok(created) => result
                    .with_topic_id(topic_uuid(created.id))
                    .with_replication_factor(created.replicas as i16 + 1),
                Err(refused) => {
                    let (code, message) = refusal(&refused);
                    refuse(code, message)
                }
            }
        })
        .collect();
    CreateTopicsResponse::default().with_topics(topics)
}

/// The Kafka error code and message of a refusal.
pub(super) fn refusal(refused: &CreateRefused) -> (i16, String) {
    match refused {
        CreateRefused::NotCreator => (
            error_code::NOT_CONTROLLER,
            "topics are created by the broker that holds the sequencer lease (the head, or the \
             standby that took over): create it there"
                .into(),
        ),
        CreateRefused::Exists => (error_code::TOPIC_ALREADY_EXISTS, "the topic exists".into()),
        CreateRefused::InvalidName(reason) => (error_code::INVALID_TOPIC_EXCEPTION, reason.clone()),
        CreateRefused::TableFull(reason) => (error_code::POLICY_VIOLATION, reason.clone()),
        CreateRefused::Failed(reason) => (error_code::UNKNOWN_SERVER_ERROR, reason.clone()),
    }
}

/// The topic named, created when the request allows it and this broker creates topics on
/// first use; `None` when there is none.
pub(super) fn find_or_create(
    name: &str,
    allow_creation: bool,
    context: &mut dyn KafkaContext,
) -> Option<KafkaTopic> {
    if let Some(found) = context.find_topic(name) {
        return Some(found);
    }
    if !allow_creation {
        return None;
    }
    let creation = TopicCreation {
        name: name.to_owned(),
        replication_factor: None,
        validate_only: false,
        on_first_use: true,
    };
    context.create_topic(&creation).ok()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, TopicName};
    use kafka_protocol::protocol::Decodable;
    use units::Timestamp;

    use super::super::fake::FakeLog;
    use super::super::{KafkaSession, request_frame, response_body};
    use super::*;

    fn topic(name: &str, partitions: i32, replication_factor: i16) -> CreatableTopic {
        CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(name.to_owned())))
            .with_num_partitions(partitions)
            .with_replication_factor(replication_factor)
    }

    fn create(
        log: &mut FakeLog,
        request: &CreateTopicsRequest,
        version: i16,
    ) -> Vec<(String, i16)> {
        let frame = request_frame(ApiKey::CreateTopics, version, 1, request);
        let mut session = KafkaSession::new(1);
        session
            .on_request(Bytes::copy_from_slice(&frame[4..]), log, Timestamp::now())
            .unwrap();
        let mut out = Vec::new();
        session.take_ready(&mut out);
        let (_, mut body) = response_body(&out, ApiKey::CreateTopics, version).unwrap();
        CreateTopicsResponse::decode(&mut body, version)
            .unwrap()
            .topics
            .iter()
            .map(|t| (t.name.0.to_string(), t.error_code))
            .collect()
    }

    #[test]
    fn create_topics_makes_one_partition_topics_and_says_why_not() {
        for version in 0..=7 {
            let mut log = FakeLog::two_topics();
            let mut configured = topic("configured", 1, 1);
            configured.configs.push(
                CreatableTopicConfig::default()
                    .with_name(StrBytes::from_static_str("retention.ms"))
                    .with_value(Some(StrBytes::from_static_str("1000"))),
            );
            let request = CreateTopicsRequest::default().with_topics(vec![
                topic("clicks", -1, -1),
                topic("orders", 1, 1),
                topic("wide", 3, 1),
                topic("unreplicated", 1, 0),
                configured,
            ]);
            assert_eq!(
                create(&mut log, &request, version),
                vec![
                    ("clicks".into(), 0),
                    ("orders".into(), error_code::TOPIC_ALREADY_EXISTS),
                    ("wide".into(), error_code::INVALID_PARTITIONS),
                    (
                        "unreplicated".into(),
                        error_code::INVALID_REPLICATION_FACTOR
                    ),
                    ("configured".into(), error_code::INVALID_CONFIG),
                ],
                "version {version}"
            );
            assert!(log.find_topic("clicks").is_some());
            assert!(log.find_topic("wide").is_none());
        }
        // validate_only creates nothing.
        let mut log = FakeLog::two_topics();
        let request = CreateTopicsRequest::default()
            .with_topics(vec![topic("dry", 1, 1)])
            .with_validate_only(true);
        assert_eq!(create(&mut log, &request, 7), vec![("dry".into(), 0)]);
        assert!(log.find_topic("dry").is_none());
    }

    #[test]
    fn metadata_creates_a_named_topic_when_the_client_allows_it() {
        let mut log = FakeLog::two_topics();
        let named = |allow| {
            MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str("fresh")))),
                ]))
                .with_allow_auto_topic_creation(allow)
        };
        for (allow, created) in [(false, false), (true, true)] {
            let frame = request_frame(ApiKey::Metadata, 9, 1, &named(allow));
            let mut session = KafkaSession::new(1);
            session
                .on_request(
                    Bytes::copy_from_slice(&frame[4..]),
                    &mut log,
                    Timestamp::now(),
                )
                .unwrap();
            let mut out = Vec::new();
            session.take_ready(&mut out);
            let (_, mut body) = response_body(&out, ApiKey::Metadata, 9).unwrap();
            let metadata = MetadataResponse::decode(&mut body, 9).unwrap();
            assert_eq!(metadata.topics[0].error_code == 0, created);
            assert_eq!(log.find_topic("fresh").is_some(), created);
        }
    }
}
