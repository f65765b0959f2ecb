//! Property tests: every parser over random and mutated bytes (no panic; whatever parses
//! re-emits to the same bytes), repr round trips, and the decoder over random chunkings.

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::select;

use crate::payload::{self, push_message};
use crate::*;

const TOPIC_CHARS: &[u8] = b"ABCXYZabcxyz0189._-";

fn topic() -> impl Strategy<Value = Topic> {
    vec(select(TOPIC_CHARS), 1..=TOPIC_BYTES_MAX).prop_map(|bytes| {
        Topic::from_bytes(&bytes, TOPIC_BYTES_MAX).expect("strategy yields valid topics")
    })
}

fn order() -> impl Strategy<Value = Order> {
    select(
        &[
            Order::Unordered,
            Order::PerBrokerFifo,
            Order::Total,
            Order::TotalSessionFifo,
        ][..],
    )
}

fn ack_level() -> impl Strategy<Value = AckLevel> {
    select(
        &[
            AckLevel::FireAndForget,
            AckLevel::Ordered,
            AckLevel::Replicated,
        ][..],
    )
}

fn batch_limit() -> impl Strategy<Value = u32> {
    BATCH_BYTES_MIN..=BATCH_BYTES_HARD_MAX
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Publish),
        (any::<u64>(), prop_oneof![Just(0u32), batch_limit()]).prop_map(
            |(from_position, batch_bytes_max)| Role::Subscribe {
                from_position,
                batch_bytes_max
            }
        ),
    ]
}

fn hello() -> impl Strategy<Value = HelloRepr> {
    (
        role(),
        order(),
        ack_level(),
        any::<u64>(),
        any::<u32>(),
        topic(),
    )
        .prop_map(
            |(role, order, ack, client_id, session_epoch, topic)| HelloRepr {
                role,
                order,
                ack,
                client_id,
                session_epoch,
                topic,
            },
        )
}

fn hello_ok() -> impl Strategy<Value = HelloOkRepr> {
    (
        any::<u16>(),
        batch_limit(),
        order(),
        ack_level(),
        any::<u64>(),
        any::<(u64, u64)>(),
    )
        .prop_map(
            |(broker_id, batch_bytes_max, order, ack, next_batch_seq, (a, b))| HelloOkRepr {
                broker_id,
                batch_bytes_max,
                order,
                ack,
                next_batch_seq,
                log_start: a.min(b),
                log_end: a.max(b),
            },
        )
}

fn global_start() -> impl Strategy<Value = Option<u64>> {
    proptest::option::of(0..u64::MAX / 2)
}

fn ack() -> impl Strategy<Value = AckRepr> {
    (
        btree_set(any::<u64>(), 0..40),
        any::<u64>(),
        vec((global_start(), 1..=u32::MAX, any::<bool>()), 40),
    )
        .prop_map(|(seqs, extra, details)| {
            let acked_through_seq = seqs
                .last()
                .map_or(extra, |last| last.saturating_add(extra % 4));
            let entries = seqs
                .into_iter()
                .zip(details)
                .map(
                    |(batch_seq, (global_start, message_count, duplicate))| AckEntry {
                        batch_seq,
                        global_start,
                        message_count,
                        status: if duplicate {
                            AckStatus::Duplicate
                        } else {
                            AckStatus::Ordered
                        },
                    },
                )
                .collect();
            AckRepr::new(acked_through_seq, entries).expect("strategy yields valid acks")
        })
}

fn error_frame() -> impl Strategy<Value = ErrorFrameRepr> {
    (
        select(&ErrorCode::ALL[..]),
        proptest::option::of(0..u64::MAX),
        ".{0,300}",
    )
        .prop_map(|(code, batch_seq, reason)| ErrorFrameRepr::new(code, batch_seq, &reason))
}

fn create_topic() -> impl Strategy<Value = CreateTopicRepr> {
    (
        topic(),
        order(),
        ack_level(),
        1..=u8::MAX,
        any::<bool>(),
        any::<bool>(),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(topic, order, ack, replicas, zero, hold, (bytes, ms))| CreateTopicRepr {
                topic,
                order,
                ack,
                // Zero replicas are allowed unless the ack level is 2.
                replication_factor: if zero && ack != AckLevel::Replicated {
                    0
                } else {
                    replicas
                },
                retention: if hold {
                    Retention::HoldForSubscribers
                } else {
                    Retention::StallLimited
                },
                history: HistoryRetention { bytes, ms },
            },
        )
}

fn topic_ok() -> impl Strategy<Value = TopicOkRepr> {
    (any::<u16>(), create_topic(), any::<bool>()).prop_map(|(broker_id, create, created)| {
        TopicOkRepr {
            broker_id,
            topic: create.topic,
            order: create.order,
            ack: create.ack,
            replication_factor: create.replication_factor,
            created,
            retention: create.retention,
            history: create.history,
        }
    })
}

fn redirect() -> impl Strategy<Value = RedirectRepr> {
    vec(
        (any::<[u8; 4]>(), 1..=u16::MAX, any::<u16>()).prop_map(|(ip, port, id)| {
            (
                core::net::SocketAddrV4::new(core::net::Ipv4Addr::from(ip), port),
                id,
            )
        }),
        1..=REDIRECT_BROKERS_MAX,
    )
    .prop_map(|brokers| RedirectRepr::new(&brokers).expect("1 to 16 brokers"))
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        hello_ok().prop_map(Frame::HelloOk),
        ack().prop_map(Frame::Ack),
        error_frame().prop_map(Frame::Error),
        create_topic().prop_map(Frame::CreateTopic),
        topic_ok().prop_map(Frame::TopicOk),
        Just(Frame::Goodbye),
        redirect().prop_map(Frame::Redirect),
    ]
}

fn messages() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), 0..200), 1..8)
}

fn build_payload(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut payload = Vec::new();
    for message in messages {
        push_message(&mut payload, message);
    }
    payload
}

/// One item of a stream: a control frame, or a header with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Control(Frame),
    Batch(BatchHeaderRepr, Vec<u8>),
    Delivery(DeliveryHeaderRepr, Vec<u8>),
}

fn batch() -> impl Strategy<Value = (BatchHeaderRepr, Vec<u8>)> {
    (any::<u64>(), messages()).prop_map(|(seq, messages)| {
        let payload = build_payload(&messages);
        let header =
            BatchHeaderRepr::for_payload(seq, messages.len() as u32, &payload, &Limits::default())
                .expect("small payload");
        (header, payload)
    })
}

fn delivery() -> impl Strategy<Value = (DeliveryHeaderRepr, Vec<u8>)> {
    (
        batch(),
        global_start(),
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |((batch, payload), global_start, broker_id, client_id, session_epoch)| {
                let header = DeliveryHeaderRepr {
                    global_start,
                    message_count: batch.message_count,
                    payload_bytes: batch.payload_bytes,
                    checksum: batch.checksum,
                    broker_id,
                    client_id,
                    session_epoch,
                    batch_seq: batch.batch_seq,
                };
                (header, payload)
            },
        )
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        frame().prop_map(Item::Control),
        batch().prop_map(|(header, payload)| Item::Batch(header, payload)),
        delivery().prop_map(|(header, payload)| Item::Delivery(header, payload)),
    ]
}

fn encode_item(item: &Item, out: &mut Vec<u8>) {
    match item {
        Item::Control(frame) => frame.encode(out),
        Item::Batch(header, payload) => {
            out.extend_from_slice(&header.frame_prefix());
            out.extend_from_slice(payload);
        }
        Item::Delivery(header, payload) => {
            out.extend_from_slice(&header.frame_prefix());
            out.extend_from_slice(payload);
        }
    }
}

/// Parses one whole control frame from bytes, as a reader with `read_exact` would.
fn parse_frame(bytes: &[u8], limits: &Limits) -> Result<Frame, Error> {
    let header = FrameHeaderRepr::parse(&FrameHeader::new_checked(bytes)?, limits)?;
    let body = &bytes[FRAME_HEADER_BYTES..];
    if body.len() != header.body_bytes as usize {
        return Err(Error::LengthMismatch {
            what: "frame",
            expected: header.body_bytes as usize,
            actual: body.len(),
        });
    }
    Frame::parse_body(header.kind, body, limits)
}

/// Calls every accessor of every view over `bytes` that checks out; none may panic.
fn touch_views(bytes: &[u8]) {
    if let Ok(view) = FrameHeader::new_checked(bytes) {
        let _ = (
            view.kind(),
            view.flags(),
            view.reserved(),
            view.body_bytes(),
        );
    }
    if let Ok(view) = Hello::new_checked(bytes) {
        let _ = (
            view.magic(),
            view.protocol_version(),
            view.role(),
            view.order(),
            view.ack(),
        );
        let _ = (
            view.reserved(),
            view.session_epoch(),
            view.client_id(),
            view.from_position(),
        );
        let _ = (view.batch_bytes_max(), view.topic());
    }
    if let Ok(view) = HelloOk::new_checked(bytes) {
        let _ = (
            view.protocol_version(),
            view.broker_id(),
            view.batch_bytes_max(),
            view.order(),
        );
        let _ = (
            view.ack(),
            view.reserved(),
            view.next_batch_seq(),
            view.log_start(),
            view.log_end(),
        );
    }
    if let Ok(view) = BatchHeader::new_checked(bytes) {
        let _ = (
            view.batch_seq(),
            view.message_count(),
            view.payload_bytes(),
            view.checksum(),
        );
        let _ = view.reserved();
    }
    if let Ok(view) = DeliveryHeader::new_checked(bytes) {
        let _ = (
            view.global_start(),
            view.message_count(),
            view.payload_bytes(),
            view.checksum(),
        );
        let _ = (
            view.broker_id(),
            view.client_id(),
            view.batch_seq(),
            view.session_epoch(),
        );
    }
    if let Ok(view) = Ack::new_checked(bytes) {
        let _ = (
            view.acked_through_seq(),
            view.entry_count(),
            view.reserved(),
        );
        assert!(view.entries().count() <= ACK_ENTRIES_MAX);
    }
    if let Ok(view) = ErrorFrame::new_checked(bytes) {
        let _ = (
            view.code(),
            view.reason_len(),
            view.reserved(),
            view.batch_seq(),
            view.reason(),
        );
    }
    if let Ok(view) = CreateTopic::new_checked(bytes) {
        let _ = (
            view.magic(),
            view.protocol_version(),
            view.order(),
            view.ack(),
        );
        let _ = (view.replication_factor(), view.retention(), view.reserved());
        let _ = view.topic();
    }
    if let Ok(view) = TopicOk::new_checked(bytes) {
        let _ = (
            view.broker_id(),
            view.order(),
            view.ack(),
            view.replication_factor(),
        );
        let _ = (view.created(), view.retention(), view.topic());
    }
}

/// Runs every body parser over `body`; whatever parses must re-emit to the same bytes.
fn check_body_parsers(body: &[u8], body_bytes: u32, limits: &Limits) {
    touch_views(body);
    for kind in FrameKind::ALL {
        if let Ok(frame) = Frame::parse_body(kind, body, limits) {
            let bytes = frame.to_bytes();
            assert_eq!(
                &bytes[FRAME_HEADER_BYTES..],
                body,
                "{kind} re-emits differently"
            );
        }
    }
    if let Ok(view) = BatchHeader::new_checked(body)
        && let Ok(repr) = BatchHeaderRepr::parse(&view, body_bytes, limits)
    {
        assert_eq!(
            &repr.frame_prefix()[FRAME_HEADER_BYTES..],
            &body[..BATCH_HEADER_BYTES]
        );
        let _ = verify_payload(&repr, &body[BATCH_HEADER_BYTES..]);
    }
    if let Ok(view) = DeliveryHeader::new_checked(body)
        && let Ok(repr) = DeliveryHeaderRepr::parse(&view, body_bytes, limits)
    {
        assert_eq!(
            &repr.frame_prefix()[FRAME_HEADER_BYTES..],
            &body[..DELIVERY_HEADER_BYTES]
        );
        let _ = verify_payload(&repr, &body[DELIVERY_HEADER_BYTES..]);
    }
    if let Ok(view) = Ack::new_checked(body) {
        let _ = view.entries().collect::<Vec<_>>();
    }
    let _ = payload::validate(body, body_bytes % 64);
}

fn small_limits() -> Limits {
    Limits::default()
        .with_batch_bytes_max(256)
        .and_then(|limits| limits.with_topic_bytes_max(8))
        .and_then(|limits| limits.with_reason_bytes_max(16))
        .expect("valid limits")
}

/// A payload-carrying header whose payload is being gathered.
enum Pending {
    Batch(BatchHeaderRepr),
    Delivery(DeliveryHeaderRepr),
}

/// Feeds `stream` to a decoder in chunks of the given sizes (cycled); a payload is received
/// by the "caller" itself (bypassing `decode`) when `direct` says so for that item. Verifies
/// each payload and returns the items.
fn decode_stream(stream: &[u8], chunks: &[usize], direct: &[bool]) -> Result<Vec<Item>, Error> {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut items = Vec::new();
    let mut pending: Option<(Pending, Vec<u8>)> = None;
    let mut at = 0;
    let mut round = 0;
    while at < stream.len() {
        let chunk = chunks[round % chunks.len()];
        round += 1;
        let end = (at + chunk).min(stream.len());
        if let Some((_, payload)) = &mut pending
            && direct[items.len() % direct.len()]
        {
            // The caller receives payload bytes straight into its own buffer.
            let remaining = decoder.payload_remaining().expect("inside a payload") as usize;
            let end = end.min(at + remaining);
            payload.extend_from_slice(&stream[at..end]);
            decoder.payload_received(end - at)?;
            at = end;
        } else {
            let (used, decoded) = decoder.decode(&stream[at..end])?;
            assert!(used <= end - at);
            at += used;
            match decoded {
                Decoded::NeedMore(n) => {
                    assert_eq!(at, end, "NeedMore consumes all input");
                    assert_eq!(n, decoder.wanted());
                }
                Decoded::Frame(frame) => items.push(Item::Control(frame)),
                Decoded::Batch(header) => pending = Some((Pending::Batch(header), Vec::new())),
                Decoded::Delivery(header) => {
                    pending = Some((Pending::Delivery(header), Vec::new()));
                }
                Decoded::Payload { bytes, remaining } => {
                    let (_, payload) = pending.as_mut().expect("payload after a header");
                    payload.extend_from_slice(bytes);
                    assert_eq!(decoder.payload_remaining().unwrap_or(0), remaining);
                }
            }
        }
        if decoder.payload_remaining().is_none()
            && let Some((header, payload)) = pending.take()
        {
            items.push(match header {
                Pending::Batch(header) => {
                    verify_payload(&header, &payload)?;
                    Item::Batch(header, payload)
                }
                Pending::Delivery(header) => {
                    verify_payload(&header, &payload)?;
                    Item::Delivery(header, payload)
                }
            });
        }
    }
    assert!(decoder.at_frame_boundary());
    Ok(items)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip(frame in frame()) {
        let bytes = frame.to_bytes();
        prop_assert_eq!(bytes.len(), frame.buffer_len());
        prop_assert_eq!(parse_frame(&bytes, &Limits::default()), Ok(frame));
    }

    #[test]
    fn batch_and_delivery_round_trip((batch, payload) in batch(), (delivery, delivery_payload) in delivery()) {
        let limits = Limits::default();
        let prefix = batch.frame_prefix();
        let header = FrameHeaderRepr::parse(&FrameHeader::new_checked(&prefix[..])?, &limits)?;
        prop_assert_eq!(header.kind, FrameKind::Batch);
        let parsed = BatchHeaderRepr::parse(
            &BatchHeader::new_checked(&prefix[FRAME_HEADER_BYTES..])?,
            header.body_bytes,
            &limits,
        )?;
        prop_assert_eq!(parsed, batch);
        prop_assert_eq!(verify_payload(&parsed, &payload), Ok(()));

        let prefix = delivery.frame_prefix();
        let header = FrameHeaderRepr::parse(&FrameHeader::new_checked(&prefix[..])?, &limits)?;
        prop_assert_eq!(header.kind, FrameKind::Delivery);
        let parsed = DeliveryHeaderRepr::parse(
            &DeliveryHeader::new_checked(&prefix[FRAME_HEADER_BYTES..])?,
            header.body_bytes,
            &limits,
        )?;
        prop_assert_eq!(parsed, delivery);
        prop_assert_eq!(verify_payload(&parsed, &delivery_payload), Ok(()));
    }

    #[test]
    fn parsers_survive_random_bytes(bytes in vec(any::<u8>(), 0..512), body_bytes in any::<u32>()) {
        for limits in [Limits::default(), small_limits()] {
            let _ = FrameHeader::new_checked(&bytes[..])
                .and_then(|view| FrameHeaderRepr::parse(&view, &limits));
            check_body_parsers(&bytes, body_bytes, &limits);
            check_body_parsers(&bytes, bytes.len() as u32, &limits);
            let _ = parse_frame(&bytes, &limits);
        }
    }

    #[test]
    fn parsers_survive_mutated_frames(
        frame in frame(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let limits = Limits::default();
        let mut bytes = frame.to_bytes();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        let _ = parse_frame(&bytes, &limits);
        let body = bytes[FRAME_HEADER_BYTES..].to_vec();
        check_body_parsers(&body, body.len() as u32, &limits);
        let cut = cut.index(body.len() + 1);
        check_body_parsers(&body[..cut], cut as u32, &limits);
    }

    #[test]
    fn every_batch_prefix_byte_but_the_sequence_is_protected(
        (batch, payload) in batch(),
        at in 0..BATCH_PREFIX_BYTES,
        value in any::<u8>(),
    ) {
        let mut stream = batch.frame_prefix().to_vec();
        stream.extend_from_slice(&payload);
        let changed = stream[at] != value;
        stream[at] = value;
        let mut decoder = FrameDecoder::new(Limits::default());
        let accepted = match decoder.decode(&stream) {
            Ok((used, Decoded::Batch(header))) => {
                let body = &stream[used..];
                let end = (header.payload_bytes as usize).min(body.len());
                verify_payload(&header, &body[..end]).is_ok()
            }
            _ => false,
        };
        // Unchanged streams are accepted; a change is caught unless it only renumbers the
        // batch (batch_seq, bytes 8..16 of the prefix, is not covered by the checksum).
        prop_assert_eq!(accepted, !changed || (8..16).contains(&at));
    }

    #[test]
    fn decoder_reassembles_any_chunking(
        items in vec(item(), 1..12),
        chunks in vec(1usize..96, 1..16),
        direct in vec(any::<bool>(), 1..8),
    ) {
        let mut stream = Vec::new();
        for item in &items {
            encode_item(item, &mut stream);
        }
        let decoded = decode_stream(&stream, &chunks, &direct)?;
        prop_assert_eq!(decoded, items);
    }

    #[test]
    fn decoder_survives_garbage(
        garbage in vec(any::<u8>(), 0..1024),
        prefix in proptest::option::of(item()),
        chunks in vec(1usize..64, 1..8),
    ) {
        let mut stream = Vec::new();
        if let Some(item) = &prefix {
            encode_item(item, &mut stream);
        }
        stream.extend_from_slice(&garbage);
        for limits in [Limits::default(), small_limits()] {
            let mut decoder = FrameDecoder::new(limits);
            let mut at = 0;
            let mut round = 0;
            while at < stream.len() {
                let end = (at + chunks[round % chunks.len()]).min(stream.len());
                round += 1;
                match decoder.decode(&stream[at..end]) {
                    Ok((used, decoded)) => {
                        prop_assert!(used <= end - at);
                        prop_assert!(used > 0 || end == at);
                        if let Decoded::NeedMore(n) = decoded {
                            prop_assert_eq!(used, end - at);
                            prop_assert!(n > 0);
                        }
                        at += used;
                    }
                    Err(error) => {
                        // Sticky: the stream is out of step from here on.
                        prop_assert_eq!(decoder.decode(&stream[at..]), Err(error));
                        let _ = (error.code(), error.to_string());
                        break;
                    }
                }
            }
        }
    }
}
