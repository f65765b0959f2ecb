//! The other brokers as Kafka clients see them: those whose claim in the pool is alive and
//! advertises a Kafka listener. Metadata names them (so a client that knows one broker
//! finds the rest, and goes on when that one dies), and the lowest id among them (and this
//! broker) coordinates consumer groups.
//!
//! A claim is alive while its heartbeat moves: [`KafkaPeers`] remembers when it last saw
//! each one change, and counts a broker dead once it stayed still for the lease the broker
//! published. Without I/O: the claim lines and the time come in as arguments.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use shared_log::claim::ClaimState;
use units::Timestamp;

use super::KafkaNode;

/// How often the claim lines are read again (at most; only when an answer needs them).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// A claim as last seen: its owner and heartbeat, and when they last changed.
#[derive(Debug, Clone, Copy)]
struct Seen {
    moving: (u64, u64),
    since: Timestamp,
    lease: Duration,
}

/// The live brokers with a Kafka listener, as far as their claims tell.
#[derive(Debug, Default)]
pub struct KafkaPeers {
    seen: HashMap<u16, Seen>,
    live: Vec<KafkaNode>,
    refreshed: Option<Timestamp>,
}

impl KafkaPeers {
    /// Whether the claims should be read again at `now`.
    pub fn due(&self, now: Timestamp) -> bool {
        self.refreshed
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH_INTERVAL)
    }

    /// Takes the claim lines of the other brokers, read at `now`: each broker id, its
    /// claim, and its advertised Kafka address.
    pub fn observe(
        &mut self,
        lines: impl IntoIterator<Item = (u16, ClaimState, Option<SocketAddrV4>)>,
        now: Timestamp,
    ) {
        self.refreshed = Some(now);
        let mut present = Vec::new();
        self.live.clear();
        for (broker, claim, kafka) in lines {
            if claim.owner == 0 {
                continue;
            }
            present.push(broker);
            let moving = (claim.owner, claim.heartbeat);
            let lease = Duration::from_millis(claim.details.map_or(
                shared_log::claim::CLAIM_LEASE_MS_MAX,
                |details| {
                    details.lease_ms.clamp(
                        shared_log::claim::CLAIM_LEASE_MS_MIN,
                        shared_log::claim::CLAIM_LEASE_MS_MAX,
                    )
                },
            ));
            let seen = self.seen.entry(broker).or_insert(Seen {
                moving,
                since: now,
                lease,
            });
            if seen.moving != moving {
                *seen = Seen {
                    moving,
                    since: now,
                    lease,
                };
            }
            let alive = now.saturating_duration_since(seen.since) < seen.lease;
            if let (true, Some(addr)) = (alive, kafka) {
                self.live.push(KafkaNode {
                    id: i32::from(broker),
                    host: addr.ip().to_string(),
                    port: addr.port(),
                });
            }
        }
        self.seen.retain(|broker, _| present.contains(broker));
    }

    /// The live brokers with a Kafka listener: `me` and the others seen alive, by id.
    pub fn live(&self, me: &KafkaNode) -> Vec<KafkaNode> {
        let mut nodes: Vec<KafkaNode> = self
            .live
            .iter()
            .filter(|node| node.id != me.id)
            .cloned()
            .collect();
        nodes.push(me.clone());
        nodes.sort_by_key(|node| node.id);
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_log::claim::ClaimDetails;
    use std::net::Ipv4Addr;

    fn claim(owner: u64, heartbeat: u64) -> ClaimState {
        ClaimState {
            owner,
            heartbeat,
            details: Some(ClaimDetails {
                pid: 1,
                host_id: 1,
                lease_ms: 500,
                claimed_unix_ms: 0,
            }),
        }
    }

    fn node(id: i32, port: u16) -> KafkaNode {
        KafkaNode {
            id,
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn a_broker_is_live_while_its_heartbeat_moves_and_named_with_its_kafka_address() {
        let me = node(2, 9092);
        let kafka = |port| Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let mut peers = KafkaPeers::default();
        let t0 = Timestamp::from_nanos(1_000_000_000);
        assert!(peers.due(t0));
        peers.observe(
            [
                (0, claim(7, 1), kafka(9090)),
                (1, claim(8, 1), None),
                (3, claim(0, 0), kafka(9093)),
            ],
            t0,
        );
        assert!(!peers.due(t0 + Duration::from_millis(50)));
        assert_eq!(
            peers.live(&me),
            vec![node(0, 9090), me.clone()],
            "broker 1 has no Kafka listener, 3 no claim"
        );
        // Broker 0's heartbeat stops: dead once its lease (500 ms) passed without a move.
        let t1 = t0 + Duration::from_millis(400);
        peers.observe([(0, claim(7, 1), kafka(9090))], t1);
        assert_eq!(peers.live(&me).len(), 2);
        let t2 = t0 + Duration::from_millis(600);
        peers.observe([(0, claim(7, 1), kafka(9090))], t2);
        assert_eq!(peers.live(&me), vec![me.clone()]);
        // A new process claims id 0: alive again.
        peers.observe([(0, claim(9, 0), kafka(9090))], t2);
        assert_eq!(peers.live(&me), vec![node(0, 9090), me.clone()]);
        // A moving heartbeat keeps it alive however long.
        for beat in 1..10 {
            peers.observe(
                [(0, claim(9, beat), kafka(9090))],
                t2 + Duration::from_millis(300 * beat),
            );
        }
        assert_eq!(peers.live(&me).len(), 2);
    }
}
