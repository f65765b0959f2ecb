//! The admin role: CreateTopic and TopicOk.

use super::*;

impl<M: SharedMemory + Clone> Connection<M> {
    pub(super) fn on_create_topic(
        &mut self,
        create: wire::CreateTopicRepr,
        state: &mut BrokerState<M>,
    ) {
        if !state.creates_topics() {
            let reason = "topics are created by the broker that holds the sequencer lease (the \
                          head, or the standby that took over): send CreateTopic to it";
            self.send_error(state.metrics(), ErrorCode::UnknownTopic, None, reason);
            return;
        }
        // The wire counts replicas besides the pool copy; the pool counts the pool copy too.
        let Some(replication_factor) = create.replication_factor.checked_add(1) else {
            let reason = "replication factor 255 is more than a pool can hold";
            self.send_error(state.metrics(), ErrorCode::Malformed, None, reason);
            return;
        };
        let config = TopicConfig {
            order: create.order,
            ack: create.ack as u8,
            replication_factor,
            retention: create.retention,
            history: create.history,
        };
        let existed = matches!(state.find_topic(create.topic.as_str()), Ok(Some(_)));
        match state.create_topic(create.topic.as_str(), config) {
            Ok(_) => self.send_frame(&Frame::TopicOk(TopicOkRepr {
                broker_id: state.settings().broker_id,
                topic: create.topic,
                order: config.order,
                ack: create.ack,
                replication_factor: create.replication_factor,
                created: !existed,
                retention: create.retention,
                history: create.history,
            })),
            Err(PoolError::TopicConflict { .. }) => {
                let reason = format!(
                    "topic {:?} exists with other settings",
                    create.topic.as_str()
                );
                self.send_error(state.metrics(), ErrorCode::TopicExists, None, &reason);
            }
            Err(e @ PoolError::TopicTableFull { .. }) => {
                Metrics::inc(&state.metrics().topics_refused);
                self.send_error(state.metrics(), ErrorCode::TopicLimit, None, &e.to_string());
            }
            Err(other) => self.send_error(
                state.metrics(),
                ErrorCode::Internal,
                None,
                &other.to_string(),
            ),
        }
    }
}
