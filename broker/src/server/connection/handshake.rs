//! The Hello: the topic, the role (publisher or subscriber) and its settings, checked
//! against the topic's; HelloOk or a specific Error.

use super::*;

impl<M: SharedMemory + Clone> Connection<M> {
    pub(super) fn on_hello(&mut self, hello: HelloRepr, state: &mut BrokerState<M>, now: Instant) {
        let metrics = std::sync::Arc::clone(&state.metrics);
        let name = hello.topic.as_str().to_owned();
        let resolved = match hello.role {
            wire::Role::Publish => state.resolve_topic(&name, hello.order, hello.ack as u8),
            wire::Role::Subscribe { .. } => state.pool.find_topic(&name),
        };
        let (topic, config) = match resolved {
            Ok(Some(found)) => found,
            Ok(None) => {
                let reason = format!(
                    "topic {name:?} does not exist: create it with CreateTopic (loadgen does, \
                     unless --create-topic false); brokers create topics on first use only \
                     with --auto-create-topics"
                );
                return self.send_error(&metrics, ErrorCode::UnknownTopic, None, &reason);
            }
            Err(e @ PoolError::TopicTableFull { .. }) => {
                Metrics::inc(&metrics.topics_refused);
                return self.send_error(&metrics, ErrorCode::TopicLimit, None, &e.to_string());
            }
            Err(e) => return self.send_error(&metrics, ErrorCode::Internal, None, &e.to_string()),
        };
        if config.order != hello.order {
            let reason = format!(
                "topic {name:?} has order {}, not {}",
                config.order as u8, hello.order as u8
            );
            return self.send_error(&metrics, ErrorCode::OrderMismatch, None, &reason);
        }
        let mut reader = match LogReader::new(state.pool.clone(), topic, false) {
            Ok(reader) => reader,
            Err(e) => return self.send_error(&metrics, ErrorCode::Internal, None, &e.to_string()),
        };
        let (_, log_end) = reader.log_end();
        let log_start = reader.log_start();
        let batch_bytes_max = state.settings.batch_bytes_max;
        match hello.role {
            wire::Role::Publish => {
                if hello.ack as u8 > config.ack
                    || (hello.ack == AckLevel::Replicated && config.replication_factor < 2)
                {
                    let reason = format!(
                        "topic {name:?} offers ack levels up to {} with replication factor \
                         {}, not {} (ack 2 needs a replication factor of 2 or more: \
                         CreateTopic, or the head's --replication-factor for topics created on \
                         first use)",
                        config.ack, config.replication_factor, hello.ack as u8
                    );
                    return self.send_error(
                        &metrics,
                        ErrorCode::AckLevelUnsupported,
                        None,
                        &reason,
                    );
                }
                if let Err(seen) = state.enter_session(hello.client_id, hello.session_epoch) {
                    let reason = format!(
                        "client {} already used session epoch {seen}; epoch {} is stale",
                        hello.client_id, hello.session_epoch
                    );
                    return self.send_error(&metrics, ErrorCode::StaleSession, None, &reason);
                }
                let batch_bytes_max = match state.topic(topic) {
                    Ok(topic_state) => {
                        batch_bytes_max.min(topic_state.writer.batch_bytes_max() as u32)
                    }
                    Err(e) => {
                        return self.send_error(
                            &metrics,
                            ErrorCode::Internal,
                            None,
                            &e.to_string(),
                        );
                    }
                };
                let next_batch_seq = state
                    .next_batch_seq
                    .get(&(hello.client_id, hello.session_epoch))
                    .copied()
                    .unwrap_or(0);
                self.send_frame(&Frame::HelloOk(HelloOkRepr {
                    broker_id: state.settings.broker_id,
                    batch_bytes_max,
                    order: config.order,
                    ack: hello.ack,
                    next_batch_seq,
                    log_start,
                    log_end,
                }));
                self.role = Peer::Publisher(Box::new(Publisher {
                    topic,
                    order: config.order,
                    ack: hello.ack,
                    client_id: hello.client_id,
                    session_epoch: hello.session_epoch,
                    receiving: Receiving::Idle,
                    in_flight: VecDeque::new(),
                    last_seq: None,
                    acked_through: None,
                    ack_entries: Vec::new(),
                    ack_dirty: false,
                    goodbye: false,
                    replicas: usize::from(config.replication_factor.saturating_sub(1)),
                    durable_wait: VecDeque::new(),
                }));
            }
            wire::Role::Subscribe {
                from_position,
                batch_bytes_max: wanted,
            } => {
                let start = if from_position == wire::FROM_END {
                    log_end
                } else {
                    from_position
                };
                if start > log_end {
                    let reason =
                        format!("position {start} is beyond the end of the log ({log_end})");
                    return self.send_error(&metrics, ErrorCode::PositionBeyondEnd, None, &reason);
                }
                if start < log_start {
                    let reason = format!(
                        "position {start} is no longer retained; the log starts at {log_start}"
                    );
                    return self.send_error(&metrics, ErrorCode::PositionTruncated, None, &reason);
                }
                if let Err(e) = reader.seek(start) {
                    let code = match e {
                        ReadError::BeyondEnd { .. } => ErrorCode::PositionBeyondEnd,
                        ReadError::Truncated { .. } => ErrorCode::PositionTruncated,
                        _ => ErrorCode::Internal,
                    };
                    return self.send_error(&metrics, code, None, &e.to_string());
                }
                self.send_frame(&Frame::HelloOk(HelloOkRepr {
                    broker_id: state.settings.broker_id,
                    batch_bytes_max,
                    order: config.order,
                    ack: AckLevel::FireAndForget,
                    next_batch_seq: 0,
                    log_start,
                    log_end,
                }));
                let limit = if wanted == 0 {
                    batch_bytes_max
                } else {
                    wanted.min(batch_bytes_max)
                };
                self.role = Peer::Subscriber(Box::new(Subscriber {
                    reader,
                    batch_bytes_max: limit,
                    positions: config.order != Order::Unordered,
                    retention: config.retention,
                    progress_at: now,
                    holding: true,
                }));
            }
        }
    }
}
