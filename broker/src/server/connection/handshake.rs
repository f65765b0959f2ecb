//! The Hello: the topic, the role (publisher or subscriber) and its settings, checked
//! against the topic's; HelloOk or a specific Error.

use shared_log::claim;
use wire::RedirectRepr;

use crate::server::ownership::host_id;

use super::*;

/// A refused Hello: the Error to send, or a Redirect to brokers that can serve it.
struct Refusal {
    code: ErrorCode,
    reason: String,
    redirect: Option<RedirectRepr>,
}

impl Refusal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
            redirect: None,
        }
    }
}

/// The topic a Hello names, as found, with the reader every role starts from.
struct Found<M> {
    topic: TopicId,
    config: TopicConfig,
    reader: LogReader<M>,
    log_start: u64,
    log_end: u64,
}

impl<M: SharedMemory + Clone> Connection<M> {
    pub(super) fn on_hello(
        &mut self,
        hello: HelloRepr,
        state: &mut BrokerState<M>,
        now: Timestamp,
    ) {
        let outcome = self.find(&hello, state).and_then(|found| match hello.role {
            wire::Role::Publish => self.hello_publisher(&hello, found, state),
            wire::Role::Subscribe {
                from_position,
                batch_bytes_max,
            } => self.hello_subscriber(from_position, batch_bytes_max, found, state, now),
        });
        match outcome {
            Ok(()) => {}
            Err(Refusal {
                redirect: Some(redirect),
                reason,
                ..
            }) => {
                if let Some(sent) = Metrics::inc_logged(&state.metrics().redirects_sent) {
                    log::info!(
                        "connection {}: redirected to {:?}: {reason} ({sent} redirects sent by \
                         this broker)",
                        self.id,
                        redirect.brokers()
                    );
                }
                self.send_frame(&Frame::Redirect(redirect));
                self.closing = true;
            }
            Err(refusal) => self.send_error(state.metrics(), refusal.code, None, &refusal.reason),
        }
    }

    /// The topic the Hello names (created on first use for a publisher, where the broker
    /// does that), with its order checked.
    fn find(&self, hello: &HelloRepr, state: &mut BrokerState<M>) -> Result<Found<M>, Refusal> {
        let name = hello.topic.as_str();
        let resolved = match hello.role {
            wire::Role::Publish => state.resolve_topic(name, hello.order, hello.ack as u8),
            wire::Role::Subscribe { .. } => state.find_topic(name),
        };
        let (topic, config) = match resolved {
            Ok(Some(found)) => found,
            Ok(None) => {
                let reason = format!(
                    "topic {name:?} does not exist: create it with CreateTopic (loadgen does, \
                     unless --create-topic false); brokers create topics on first use only \
                     with --auto-create-topics"
                );
                return Err(Refusal::new(ErrorCode::UnknownTopic, reason));
            }
            Err(e @ PoolError::TopicTableFull { .. }) => {
                Metrics::inc(&state.metrics().topics_refused);
                return Err(Refusal::new(ErrorCode::TopicLimit, e.to_string()));
            }
            Err(e) => return Err(Refusal::new(ErrorCode::Internal, e.to_string())),
        };
        if config.order != hello.order {
            let reason = format!(
                "topic {name:?} has order {}, not {}",
                config.order as u8, hello.order as u8
            );
            return Err(Refusal::new(ErrorCode::OrderMismatch, reason));
        }
        let reader = state
            .open_reader(topic)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        let (_, log_end) = reader.log_end();
        let log_start = reader.log_start();
        Ok(Found {
            topic,
            config,
            reader,
            log_start,
            log_end,
        })
    }

    fn hello_publisher(
        &mut self,
        hello: &HelloRepr,
        found: Found<M>,
        state: &mut BrokerState<M>,
    ) -> Result<(), Refusal> {
        let config = found.config;
        if hello.ack as u8 > config.ack
            || (hello.ack == AckLevel::Replicated && config.replication_factor < 2)
        {
            let reason = format!(
                "topic {:?} offers ack levels up to {} with replication factor {}, not {} (ack \
                 2 needs a replication factor of 2 or more: CreateTopic, or the head's \
                 --replication-factor for topics created on first use)",
                hello.topic.as_str(),
                config.ack,
                config.replication_factor,
                hello.ack as u8
            );
            return Err(Refusal::new(ErrorCode::AckLevelUnsupported, reason));
        }
        if let Err(seen) = state.enter_session(hello.client_id, hello.session_epoch) {
            let reason = format!(
                "client {} already used session epoch {seen}; epoch {} is stale",
                hello.client_id, hello.session_epoch
            );
            return Err(Refusal::new(ErrorCode::StaleSession, reason));
        }
        let ring_bytes_max = state
            .open_writer(found.topic)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        self.send_frame(&Frame::HelloOk(HelloOkRepr {
            broker_id: state.settings().broker_id,
            batch_bytes_max: state.settings().batch_bytes_max.min(ring_bytes_max as u32),
            order: config.order,
            ack: hello.ack,
            next_batch_seq: state.next_batch_seq(hello.client_id, hello.session_epoch),
            log_start: found.log_start,
            log_end: found.log_end,
        }));
        self.role = Peer::Publisher(Box::new(Publisher {
            topic: found.topic,
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
        Ok(())
    }

    fn hello_subscriber(
        &mut self,
        from_position: u64,
        wanted_bytes_max: u32,
        found: Found<M>,
        state: &BrokerState<M>,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        let Found {
            topic,
            config,
            mut reader,
            log_start,
            log_end,
        } = found;
        let start = if from_position == wire::FROM_END {
            log_end
        } else {
            from_position
        };
        if start > log_end {
            let reason = format!("position {start} is beyond the end of the log ({log_end})");
            return Err(Refusal::new(ErrorCode::PositionBeyondEnd, reason));
        }
        // Older than the pool holds: from this broker's replica file, then on from the pool.
        let history = if start < log_start {
            Some(open_history(topic, start, log_start, &reader, state)?)
        } else {
            reader.seek(start).map_err(|e| {
                let code = match e {
                    ReadError::BeyondEnd { .. } => ErrorCode::PositionBeyondEnd,
                    ReadError::Truncated { .. } => ErrorCode::PositionTruncated,
                    _ => ErrorCode::Internal,
                };
                Refusal::new(code, e.to_string())
            })?;
            None
        };
        let log_start = history
            .as_ref()
            .map_or(log_start, HistoryReader::start_position);
        let batch_bytes_max = state.settings().batch_bytes_max;
        self.send_frame(&Frame::HelloOk(HelloOkRepr {
            broker_id: state.settings().broker_id,
            batch_bytes_max,
            order: config.order,
            ack: AckLevel::FireAndForget,
            next_batch_seq: 0,
            log_start,
            log_end,
        }));
        self.role = Peer::Subscriber(Box::new(Subscriber {
            reader,
            batch_bytes_max: match wanted_bytes_max {
                0 => batch_bytes_max,
                wanted => wanted.min(batch_bytes_max),
            },
            positions: config.order != Order::Unordered,
            retention: config.retention,
            progress_at: now,
            holding: true,
            history,
            next_position: start,
        }));
        Ok(())
    }
}

/// A reader of `topic` from `start` in this broker's replica file. A broker that keeps no
/// replica of the topic redirects to the live brokers that do and advertise an address;
/// one whose replica starts later, or that has nobody to name, refuses with where the log
/// really starts (and which brokers keep it on disk).
fn open_history<M: SharedMemory + Clone>(
    topic: TopicId,
    start: u64,
    log_start: u64,
    reader: &LogReader<M>,
    state: &BrokerState<M>,
) -> Result<HistoryReader, Refusal> {
    let truncated = |first: u64, redirect: bool| {
        let me = state.settings().broker_id;
        let pool = reader.pool();
        let brokers = u16::try_from(pool.geometry().brokers_max).unwrap_or(u16::MAX);
        let elsewhere: Vec<u16> = (0..brokers)
            .filter(|&broker| broker != me && pool.replicated_by(topic, broker).0 > 0)
            .collect();
        let mut reason =
            format!("position {start} is no longer retained here; the log starts at {first}");
        if !elsewhere.is_empty() {
            let names: Vec<String> = elsewhere.iter().map(u16::to_string).collect();
            reason += &format!(
                " (brokers {} keep the topic on disk: subscribe there for older positions)",
                names.join(", ")
            );
        }
        // Another replica may start later still, and redirect back: only a broker without
        // one redirects, and only to live replicas.
        let reachable: Vec<_> = elsewhere
            .iter()
            .filter(|_| redirect)
            .filter(|&&broker| pool.replica_live(topic, broker))
            .filter_map(|&broker| {
                claim::advertised(pool, broker, host_id()).map(|addr| (addr, broker))
            })
            .collect();
        Refusal {
            redirect: RedirectRepr::new(&reachable).ok(),
            ..Refusal::new(ErrorCode::PositionTruncated, reason)
        }
    };
    let Some(dir) = &state.settings().history_dir else {
        return Err(truncated(log_start, true));
    };
    HistoryReader::open(dir, topic, start).map_err(|e| match e {
        HistoryError::NotReplicated { .. } => truncated(log_start, true),
        HistoryError::BeforeStart { start: first, .. } => truncated(first.min(log_start), false),
        other => Refusal::new(ErrorCode::Internal, other.to_string()),
    })
}
