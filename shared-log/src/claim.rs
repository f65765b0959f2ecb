//! Broker id claims: at most one live process per broker id (its ring has a single writer).
//!
//! Each broker id has a [`BrokerClaim`] line in the pool. A starting broker reads it: a free
//! line (owner 0) it takes at once; a held one it watches for one lease, and takes it over
//! (compare-and-swap of the owner word from the token it saw) only when the heartbeat stayed
//! still all that time; a heartbeat that moves means a live broker holds the id, and the
//! newcomer is refused. A running broker beats its heartbeat every quarter of its lease and
//! checks each time that the owner word still holds its token; an orderly stop sets it back
//! to 0, a crash leaves it for the next claimant to take over after the lease.
//!
//! Everything here is sans-IO: time comes in as an argument, memory through
//! [`SharedMemory`]; the broker's liveness thread runs it with a real clock.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use crate::coherence::SharedMemory;
use crate::layout::{
    BrokerClaim, CLAIM_HEARTBEAT_OFFSET, CLAIM_LISTEN_OFFSET, CLAIM_OWNER_OFFSET, Record,
    claim_offset,
};
use crate::pool::{Pool, PoolError, invalidate_and_fence, set_ready};
use bytemuck::Zeroable;
use units::Timestamp;

/// Shortest claim lease accepted, in milliseconds (below it a busy machine's scheduling
/// delays alone would make a live claim look dead).
pub const CLAIM_LEASE_MS_MIN: u64 = 50;
/// Longest claim lease accepted, in milliseconds: no watcher waits longer for a silent claim,
/// whatever lease a (corrupt) line says.
pub const CLAIM_LEASE_MS_MAX: u64 = 60_000;
/// Heartbeats per lease: a claimant that misses three in a row still holds its claim.
pub const BEATS_PER_LEASE: u64 = 4;

/// What a claimant publishes about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimDetails {
    /// Process id (in the claimant's pid namespace).
    pub pid: u32,
    /// Which kernel it runs on (the broker derives it from the boot id).
    pub host_id: u64,
    /// How long its heartbeat may stay still before the claim counts as dead.
    pub lease_ms: u64,
    /// When it claimed, milliseconds since the Unix epoch.
    pub claimed_unix_ms: u64,
}

/// A claim line as read from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimState {
    /// The claimant's token; 0 when the id is free.
    pub owner: u64,
    /// The claimant's heartbeat counter.
    pub heartbeat: u64,
    /// What the claimant published; `None` while it is still claiming (or died doing so).
    pub details: Option<ClaimDetails>,
}

/// A process about to claim a broker id, or holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimant {
    /// Its token: random, nonzero, unique to this run of this process.
    pub token: u64,
    /// What it publishes.
    pub details: ClaimDetails,
}

/// Who holds a broker id, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimHolder {
    /// The broker id.
    pub broker: u16,
    /// What the holder published, if anything yet.
    pub details: Option<ClaimDetails>,
    /// Whether it runs on the kernel of the process that describes it.
    pub this_host: bool,
}

impl ClaimHolder {
    /// The holder of `broker` according to `state`, as seen from `host_id`.
    pub fn new(broker: u16, state: &ClaimState, host_id: u64) -> ClaimHolder {
        ClaimHolder {
            broker,
            details: state.details,
            this_host: state.details.is_some_and(|d| d.host_id == host_id),
        }
    }
}

impl std::fmt::Display for ClaimHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.details {
            None => write!(
                f,
                "broker {} (a process still claiming it; no pid published)",
                self.broker
            ),
            Some(details) if self.this_host => {
                write!(
                    f,
                    "broker {} (pid {} on this host)",
                    self.broker, details.pid
                )
            }
            Some(details) => write!(
                f,
                "broker {} (pid {} on host {:016x})",
                self.broker, details.pid, details.host_id
            ),
        }
    }
}

/// Why a broker id cannot be claimed, or was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// A live broker holds the id.
    #[error(
        "broker id {} is taken by a live broker: {holder}, whose heartbeat moved while this \
         one watched it; stop that broker first, or start this one with a free --id",
        .holder.broker
    )]
    BrokerIdTaken {
        /// Who holds it.
        holder: ClaimHolder,
    },
    /// The claim moved on while this broker ran.
    #[error(
        "the claim on broker id {} was taken over by {holder}: this broker was paused or \
         starved longer than its claim lease ({lease_ms} ms), so the other one took it for \
         dead; this one stops, as two brokers must never write one ring",
        .holder.broker
    )]
    ClaimLost {
        /// Who holds it now.
        holder: ClaimHolder,
        /// This broker's claim lease.
        lease_ms: u64,
    },
    /// The claim lease asked for is outside what a claim can be kept or judged with.
    #[error(
        "a claim lease of {lease_ms} ms is out of range: give {CLAIM_LEASE_MS_MIN}..=\
         {CLAIM_LEASE_MS_MAX} ms (--claim-lease-ms)"
    )]
    LeaseOutOfRange {
        /// The lease asked for.
        lease_ms: u64,
    },
    /// The id is outside the pool.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Checks a claim lease: below [`CLAIM_LEASE_MS_MIN`] its heartbeat would beat too often to
/// be kept on a busy machine (below 4 ms, never pause at all), above [`CLAIM_LEASE_MS_MAX`]
/// watchers would judge it dead between two of its beats.
pub fn check_lease_ms(lease_ms: u64) -> Result<(), ClaimError> {
    if (CLAIM_LEASE_MS_MIN..=CLAIM_LEASE_MS_MAX).contains(&lease_ms) {
        Ok(())
    } else {
        Err(ClaimError::LeaseOutOfRange { lease_ms })
    }
}

/// What a claimant does next, given what it saw (see [`ClaimWatch::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// The id is free, or its claim was silent for a whole lease: compare-and-swap the
    /// owner word from `expected_owner`.
    Take {
        /// The owner word seen (0: free).
        expected_owner: u64,
    },
    /// Held, and the heartbeat has not moved yet: look again later.
    Watch,
    /// The heartbeat (or the owner) moved while watched: a live process holds the id.
    Live,
}

/// Watches one claim line for a lease. Time is an input: any monotonic clock.
#[derive(Debug, Clone)]
pub struct ClaimWatch {
    lease_ms: u64,
    /// The line's moving parts when first seen held, and when.
    seen: Option<((u64, u64, bool), Timestamp)>,
}

impl ClaimWatch {
    /// A watch that waits at least `lease_ms` (or the holder's published lease when longer,
    /// up to [`CLAIM_LEASE_MS_MAX`]) before it judges a claim dead.
    pub fn new(lease_ms: u64) -> ClaimWatch {
        ClaimWatch {
            lease_ms: lease_ms.clamp(CLAIM_LEASE_MS_MIN, CLAIM_LEASE_MS_MAX),
            seen: None,
        }
    }

    /// Judges the line as read at `now`.
    pub fn observe(&mut self, state: &ClaimState, now: Timestamp) -> ClaimVerdict {
        if state.owner == 0 {
            self.seen = None;
            return ClaimVerdict::Take { expected_owner: 0 };
        }
        let moving = (state.owner, state.heartbeat, state.details.is_some());
        match self.seen {
            None => {
                self.seen = Some((moving, now));
                ClaimVerdict::Watch
            }
            Some((seen, _)) if seen != moving => ClaimVerdict::Live,
            Some((_, since)) => {
                let lease_ms = state
                    .details
                    .map_or(self.lease_ms, |d| d.lease_ms.max(self.lease_ms))
                    .min(CLAIM_LEASE_MS_MAX);
                if now.saturating_duration_since(since) >= Duration::from_millis(lease_ms) {
                    ClaimVerdict::Take {
                        expected_owner: state.owner,
                    }
                } else {
                    ClaimVerdict::Watch
                }
            }
        }
    }

    /// Forgets what was seen (after a lost compare-and-swap: the line is watched afresh).
    pub fn restart(&mut self) {
        self.seen = None;
    }
}

/// The claim line of `broker` read afresh (invalidated, fenced), and whether its holder
/// published it.
fn read_record<M: SharedMemory>(pool: &Pool<M>, broker: u16) -> (BrokerClaim, bool) {
    let offset = claim_offset(broker);
    let mut record = BrokerClaim::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut record);
    invalidate_and_fence(pool.mem(), offset, bytes.len() as u64);
    pool.mem().read(offset, bytes);
    let published = record.owner != 0 && record.ready == record.owner;
    (record, published)
}

/// Reads the claim line of `broker` (below `BROKERS_MAX`).
pub fn read_claim<M: SharedMemory>(pool: &Pool<M>, broker: u16) -> ClaimState {
    let (record, published) = read_record(pool, broker);
    ClaimState {
        owner: record.owner,
        heartbeat: record.heartbeat,
        details: published.then_some(ClaimDetails {
            pid: record.pid,
            host_id: record.host_id,
            lease_ms: record.lease_ms,
            claimed_unix_ms: record.claimed_unix_ms,
        }),
    }
}

/// Every claimed line of the pool's brokers, by id.
pub fn claimed<M: SharedMemory>(pool: &Pool<M>) -> Vec<(u16, ClaimState)> {
    (0..pool.geometry().brokers_max as u16)
        .map(|broker| (broker, read_claim(pool, broker)))
        .filter(|(_, state)| state.owner != 0)
        .collect()
}

/// Claims `broker` for `claimant` if its owner word still holds `expected_owner`, then
/// publishes the claimant's details (ready word last). `Err` holds the owner word found
/// when another process got there first, or took the id over before the details were out.
pub fn try_claim<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    expected_owner: u64,
    claimant: &Claimant,
) -> Result<(), u64> {
    let offset = claim_offset(broker);
    pool.mem()
        .compare_exchange_u64(offset + CLAIM_OWNER_OFFSET, expected_owner, claimant.token)?;
    publish_details(pool, broker, claimant)
}

/// Publishes the details of a claim whose owner word `claimant` has just swapped in. The
/// owner word itself is never stored again: a claimant that stalled after its swap for
/// longer than a lease may have been taken over, and a late store would hand the id back
/// to it. So the owner is checked before the details go out and again before the ready
/// word; `Err` holds the owner found (the details of the new holder then stay, unless this
/// claimant stalls once more between a check and its stores).
fn publish_details<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    claimant: &Claimant,
) -> Result<(), u64> {
    let offset = claim_offset(broker);
    let record = BrokerClaim {
        owner: claimant.token,
        heartbeat: 0,
        host_id: claimant.details.host_id,
        lease_ms: claimant.details.lease_ms,
        claimed_unix_ms: claimant.details.claimed_unix_ms,
        pid: claimant.details.pid,
        listen_ip: 0,
        listen_port: 0,
        kafka_port: 0,
        kafka_ip: 0,
        ready: claimant.token,
    };
    let details = &bytemuck::bytes_of(&record)
        [CLAIM_HEARTBEAT_OFFSET as usize..BrokerClaim::READY_OFFSET as usize];
    check_owner(pool, broker, claimant.token)?;
    pool.mem().write(offset + CLAIM_HEARTBEAT_OFFSET, details);
    pool.mem()
        .flush(offset + CLAIM_HEARTBEAT_OFFSET, details.len() as u64);
    pool.mem().fence();
    check_owner(pool, broker, claimant.token)?;
    set_ready::<M, BrokerClaim>(pool.mem(), offset, claimant.token);
    Ok(())
}

/// Whether the claim on `broker` is still `token`'s: its owner word read afresh (one line
/// invalidated, a fence, a load). `Err` holds the owner word found. Every writer of this
/// broker's lines calls it before it publishes, so that a process paused past its lease
/// and taken over publishes nothing when it resumes.
pub fn check_owner<M: SharedMemory>(pool: &Pool<M>, broker: u16, token: u64) -> Result<(), u64> {
    let offset = claim_offset(broker) + CLAIM_OWNER_OFFSET;
    invalidate_and_fence(pool.mem(), offset, 8);
    match pool.mem().load_u64(offset) {
        owner if owner == token => Ok(()),
        owner => Err(owner),
    }
}

/// The address other brokers can name for `addr`, or why there is none: an IPv4 address
/// and a port, both given (an IPv6 one does not fit the claim line).
pub fn advertisable(addr: SocketAddr) -> Result<SocketAddrV4, &'static str> {
    match addr {
        SocketAddr::V6(_) => Err("only IPv4 addresses are advertised"),
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => Err("it names no address"),
        SocketAddr::V4(v4) if v4.port() == 0 => Err("it names no port"),
        SocketAddr::V4(v4) => Ok(v4),
    }
}

/// Advertises where clients reach the holder of the claim `token` holds on `broker` (other
/// brokers name it in redirects), and where Kafka clients do, if it has a Kafka listener
/// (other brokers name it in Kafka metadata). `Err` holds the owner found when the claim
/// is not `token`'s any more.
pub fn advertise<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    token: u64,
    addr: SocketAddrV4,
    kafka: Option<SocketAddrV4>,
) -> Result<(), u64> {
    check_owner(pool, broker, token)?;
    let kafka = kafka.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&u32::from(*addr.ip()).to_le_bytes());
    bytes[4..6].copy_from_slice(&addr.port().to_le_bytes());
    bytes[6..8].copy_from_slice(&kafka.port().to_le_bytes());
    bytes[8..].copy_from_slice(&u32::from(*kafka.ip()).to_le_bytes());
    let offset = claim_offset(broker) + CLAIM_LISTEN_OFFSET;
    pool.mem().write(offset, &bytes);
    pool.mem().flush(offset, bytes.len() as u64);
    Ok(())
}

/// Where clients of a broker on host `host_id` reach the holder of `broker`'s claim, if it
/// is held, published and advertised: a loopback address only from the same host.
pub fn advertised<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    host_id: u64,
) -> Option<SocketAddrV4> {
    let (record, published) = read_record(pool, broker);
    reachable(
        &record,
        published,
        record.listen_ip,
        record.listen_port,
        host_id,
    )
}

/// Where Kafka clients of a broker on host `host_id` reach the holder of `broker`'s claim,
/// if it is held, published and advertises a Kafka listener (see [`advertised`]).
pub fn advertised_kafka<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    host_id: u64,
) -> Option<SocketAddrV4> {
    let (record, published) = read_record(pool, broker);
    reachable(
        &record,
        published,
        record.kafka_ip,
        record.kafka_port,
        host_id,
    )
}

/// `ip`:`port` of `record`, if the line is published, both are set, and the address is
/// reachable from `host_id` (a loopback address only from the claimant's own host).
fn reachable(
    record: &BrokerClaim,
    published: bool,
    ip: u32,
    port: u16,
    host_id: u64,
) -> Option<SocketAddrV4> {
    let ip = Ipv4Addr::from(ip);
    let reachable = !ip.is_loopback() || record.host_id == host_id;
    (published && !ip.is_unspecified() && port != 0 && reachable)
        .then(|| SocketAddrV4::new(ip, port))
}

/// One heartbeat (`heartbeat` is the new counter value) of the claim `token` holds on
/// `broker`. `Err` holds the line found when the claim is not `token`'s any more.
pub fn beat<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    token: u64,
    heartbeat: u64,
) -> Result<(), ClaimState> {
    let offset = claim_offset(broker);
    if check_owner(pool, broker, token).is_err() {
        return Err(read_claim(pool, broker));
    }
    pool.mem()
        .store_u64(offset + CLAIM_HEARTBEAT_OFFSET, heartbeat);
    pool.mem().flush(offset + CLAIM_HEARTBEAT_OFFSET, 8);
    Ok(())
}

/// Gives the claim `token` holds on `broker` back (an orderly stop). False when it was not
/// `token`'s any more.
pub fn release<M: SharedMemory>(pool: &Pool<M>, broker: u16, token: u64) -> bool {
    let offset = claim_offset(broker) + CLAIM_OWNER_OFFSET;
    pool.mem().compare_exchange_u64(offset, token, 0).is_ok()
}

/// Compare-and-swaps a claimant may lose before it gives up (each lost one means another
/// process claimed the id at the same moment, and it is watched afresh).
const LOST_RACES_MAX: u32 = 4;

/// Claims `broker` for `claimant`: at once when free, after one silent lease when held by a
/// dead claimant, never while the holder's heartbeat moves. `now` reads a monotonic clock;
/// `pause` waits between looks (it is given the time to wait). Every watch
/// ends within a lease (at most [`CLAIM_LEASE_MS_MAX`]); after [`LOST_RACES_MAX`] lost
/// compare-and-swaps the id counts as taken.
pub fn claim<M: SharedMemory>(
    pool: &Pool<M>,
    broker: u16,
    claimant: &Claimant,
    mut now: impl FnMut() -> Timestamp,
    mut pause: impl FnMut(Duration),
) -> Result<(), ClaimError> {
    pool.check_broker(broker)?;
    let mut watch = ClaimWatch::new(claimant.details.lease_ms);
    let look_every = (Duration::from_millis(watch.lease_ms) / 16)
        .clamp(Duration::from_millis(1), Duration::from_millis(50));
    let mut lost_races = 0;
    loop {
        let state = read_claim(pool, broker);
        let taken = || ClaimError::BrokerIdTaken {
            holder: ClaimHolder::new(broker, &state, claimant.details.host_id),
        };
        match watch.observe(&state, now()) {
            ClaimVerdict::Take { expected_owner } => {
                if try_claim(pool, broker, expected_owner, claimant).is_ok() {
                    return Ok(());
                }
                lost_races += 1;
                if lost_races >= LOST_RACES_MAX {
                    return Err(taken());
                }
                watch.restart();
            }
            ClaimVerdict::Live => return Err(taken()),
            ClaimVerdict::Watch => pause(look_every),
        }
    }
}

/// The claims of `pool` held by live brokers of other hosts than `host_id`, for a process
/// that holds the pool file's lock exclusively (so no broker of this host has it mapped,
/// and this host's claims are crashed brokers'). Each other claim is watched for up to its
/// published lease (a claim never published, for [`CLAIM_LEASE_MS_MIN`]); `now` and
/// `pause` as for [`claim`].
pub fn live_claims<M: SharedMemory>(
    pool: &Pool<M>,
    host_id: u64,
    mut now: impl FnMut() -> Timestamp,
    mut pause: impl FnMut(Duration),
) -> Vec<ClaimHolder> {
    let mut watches = Vec::new();
    for (broker, state) in claimed(pool) {
        let holder = ClaimHolder::new(broker, &state, host_id);
        if holder.this_host {
            log::info!(
                "{holder} held a claim but no process of this host maps the pool: it crashed"
            );
        } else {
            watches.push((broker, ClaimWatch::new(CLAIM_LEASE_MS_MIN)));
        }
    }
    let mut live = Vec::new();
    while !watches.is_empty() {
        let at = now();
        watches.retain_mut(|(broker, watch)| {
            let state = read_claim(pool, *broker);
            match watch.observe(&state, at) {
                ClaimVerdict::Watch => true,
                ClaimVerdict::Live => {
                    live.push(ClaimHolder::new(*broker, &state, host_id));
                    false
                }
                ClaimVerdict::Take { .. } => false,
            }
        });
        if !watches.is_empty() {
            pause(Duration::from_millis(CLAIM_LEASE_MS_MIN));
        }
    }
    live
}

/// A claimant with `token` (pid 1, host 1, a lease of 1 s), for unit tests (here, and in
/// crates that enable the `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
pub fn test_claimant(token: u64) -> Claimant {
    Claimant {
        token,
        details: ClaimDetails {
            pid: 1,
            host_id: 1,
            lease_ms: 1000,
            claimed_unix_ms: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::layout::{Geometry, claim_offset};
    use crate::sim::{SimAgent, SimMemory};

    const MS: u64 = 1_000_000;

    fn geometry() -> Geometry {
        Geometry {
            brokers_max: 4,
            topics_max: 1,
            ring_slots: 16,
            goi_entries: 64,
            blog_bytes: 64 * 1024,
        }
    }

    /// Two processes' views of one simulated pool, each with its own stale cache.
    fn two_agents() -> (Pool<SimAgent>, Pool<SimAgent>) {
        let memory = SimMemory::new(geometry().layout_bytes());
        Pool::format(SimAgent::new(&memory), geometry(), 1).unwrap();
        (
            Pool::attach(SimAgent::new(&memory)).unwrap(),
            Pool::attach(SimAgent::new(&memory)).unwrap(),
        )
    }

    fn claimant(token: u64, pid: u32, lease_ms: u64) -> Claimant {
        Claimant {
            token,
            details: ClaimDetails {
                pid,
                host_id: 0xabc,
                lease_ms,
                claimed_unix_ms: 5,
            },
        }
    }

    fn held(owner: u64, heartbeat: u64, lease_ms: u64) -> ClaimState {
        ClaimState {
            owner,
            heartbeat,
            details: Some(claimant(owner, 7, lease_ms).details),
        }
    }

    const FREE: ClaimState = ClaimState {
        owner: 0,
        heartbeat: 3,
        details: None,
    };

    /// Not published yet: owner 5 swapped in, details still to come.
    const CLAIMING: ClaimState = ClaimState {
        owner: 5,
        heartbeat: 0,
        details: None,
    };

    /// What a watch with `lease_ms` says to each look (state, time in ms).
    fn verdicts(lease_ms: u64, looks: &[(ClaimState, u64)]) -> Vec<ClaimVerdict> {
        let mut watch = ClaimWatch::new(lease_ms);
        looks
            .iter()
            .map(|(state, at_ms)| watch.observe(state, Timestamp::from_nanos(at_ms * MS)))
            .collect()
    }

    use ClaimVerdict::{Live, Take, Watch};

    #[test]
    fn a_free_line_is_taken_at_once_and_a_held_one_after_a_silent_lease() {
        assert_eq!(verdicts(1000, &[(FREE, 0)]), [Take { expected_owner: 0 }]);
        let still = held(5, 3, 1000);
        assert_eq!(
            verdicts(1000, &[(still, 0), (still, 999), (still, 1000)]),
            [Watch, Watch, Take { expected_owner: 5 }]
        );
        // Released during the watch: taken at once.
        assert_eq!(
            verdicts(1000, &[(still, 0), (FREE, 1)]),
            [Watch, Take { expected_owner: 0 }]
        );
    }

    #[test]
    fn a_moving_heartbeat_a_new_owner_or_a_publication_is_live() {
        let still = held(5, 3, 1000);
        assert_eq!(
            verdicts(1000, &[(still, 0), (held(5, 4, 1000), 1)])[1],
            Live
        );
        assert_eq!(
            verdicts(1000, &[(still, 0), (held(6, 3, 1000), 1)])[1],
            Live
        );
        assert_eq!(
            verdicts(1000, &[(CLAIMING, 0), (held(5, 0, 1000), 1)])[1],
            Live
        );
    }

    #[test]
    fn the_longer_of_both_leases_is_waited_and_never_more_than_the_maximum() {
        let long = held(5, 3, 5000);
        assert_eq!(
            verdicts(100, &[(long, 0), (long, 4999), (long, 5000)]),
            [Watch, Watch, Take { expected_owner: 5 }]
        );
        let endless = held(5, 3, u64::MAX / MS);
        assert_eq!(
            verdicts(100, &[(endless, 0), (endless, CLAIM_LEASE_MS_MAX)])[1],
            Take { expected_owner: 5 }
        );
        // A claim never published is waited for the watcher's own lease.
        assert_eq!(
            verdicts(100, &[(CLAIMING, 0), (CLAIMING, 100)])[1],
            Take { expected_owner: 5 }
        );
    }

    #[test]
    fn claims_publish_beat_and_release_through_the_coherence_discipline() {
        let (a, b) = two_agents();
        let first = claimant(0x11, 100, 1000);
        try_claim(&a, 1, 0, &first).unwrap();
        // The other agent sees the published claim (it invalidates before reading).
        let seen = read_claim(&b, 1);
        assert_eq!(seen.owner, 0x11);
        assert_eq!(seen.details, Some(first.details));
        assert_eq!(claimed(&b), vec![(1, seen)]);
        beat(&a, 1, 0x11, 1).unwrap();
        assert_eq!(read_claim(&b, 1).heartbeat, 1);
        // A second claimant loses the race for a line that is not free.
        assert_eq!(try_claim(&b, 1, 0, &claimant(0x22, 200, 1000)), Err(0x11));
        assert!(!release(&b, 1, 0x22), "only the owner releases");
        assert!(release(&a, 1, 0x11));
        assert_eq!(read_claim(&b, 1).owner, 0);
        assert!(claimed(&b).is_empty());
    }

    #[test]
    fn a_taken_over_claimant_finds_out_at_its_next_beat() {
        let (a, b) = two_agents();
        try_claim(&a, 2, 0, &claimant(0x11, 100, 1000)).unwrap();
        beat(&a, 2, 0x11, 1).unwrap();
        // `a` stops beating (paused); `b` takes the silent claim over.
        try_claim(&b, 2, 0x11, &claimant(0x22, 200, 1000)).unwrap();
        let found = beat(&a, 2, 0x11, 2).unwrap_err();
        assert_eq!(found.owner, 0x22);
        assert_eq!(found.details.map(|d| d.pid), Some(200));
        assert!(!release(&a, 2, 0x11), "a lost claim is not released");
        assert_eq!(read_claim(&b, 2).owner, 0x22);
    }

    #[test]
    fn a_claimant_that_stalls_after_its_swap_never_takes_the_id_back() {
        let (a, c) = two_agents();
        let stalled = claimant(0x11, 100, 1000);
        // `a` swaps its token in, then stalls before publishing its details...
        a.mem()
            .compare_exchange_u64(claim_offset(1) + CLAIM_OWNER_OFFSET, 0, stalled.token)
            .unwrap();
        // ...long enough for `c` to take the silent claim over and publish.
        let taker = claimant(0x22, 200, 1000);
        try_claim(&c, 1, stalled.token, &taker).unwrap();
        // When `a` goes on, it finds the id taken and leaves the line as `c` wrote it.
        assert_eq!(publish_details(&a, 1, &stalled), Err(0x22));
        let line = read_claim(&c, 1);
        assert_eq!(line.owner, 0x22);
        assert_eq!(line.details, Some(taker.details));
        assert_eq!(check_owner(&c, 1, 0x22), Ok(()));
        assert_eq!(check_owner(&a, 1, 0x11), Err(0x22));
    }

    #[test]
    fn leases_outside_the_range_are_refused() {
        assert_eq!(check_lease_ms(CLAIM_LEASE_MS_MIN), Ok(()));
        assert_eq!(check_lease_ms(CLAIM_LEASE_MS_MAX), Ok(()));
        for lease_ms in [0, 3, CLAIM_LEASE_MS_MIN - 1, CLAIM_LEASE_MS_MAX + 1] {
            assert_eq!(
                check_lease_ms(lease_ms),
                Err(ClaimError::LeaseOutOfRange { lease_ms })
            );
        }
    }

    #[test]
    fn claim_refuses_a_live_id_and_takes_a_dead_one_after_its_lease() {
        let (a, b) = two_agents();
        let lease_ms = 200;
        try_claim(&a, 3, 0, &claimant(0x11, 100, lease_ms)).unwrap();
        // The holder beats while `b` watches: refused, naming the holder.
        let clock = Cell::new(Timestamp::ZERO);
        let beats = Cell::new(1u64);
        let result = claim(
            &b,
            3,
            &claimant(0x22, 200, lease_ms),
            || clock.get(),
            |pause| {
                clock.set(clock.get() + pause);
                beat(&a, 3, 0x11, beats.get()).unwrap();
                beats.set(beats.get() + 1);
            },
        );
        match result {
            Err(ClaimError::BrokerIdTaken { holder }) => {
                assert_eq!(holder.broker, 3);
                assert_eq!(holder.details.map(|d| d.pid), Some(100));
                assert!(holder.this_host);
                assert!(holder.to_string().contains("pid 100 on this host"));
            }
            other => panic!("expected BrokerIdTaken, got {other:?}"),
        }
        assert!(
            clock.get().as_nanos() < lease_ms * MS,
            "refused before a lease passed"
        );
        // The holder is gone (no more beats): taken over after one lease, not before.
        clock.set(Timestamp::ZERO);
        claim(
            &b,
            3,
            &claimant(0x22, 200, lease_ms),
            || clock.get(),
            |pause| clock.set(clock.get() + pause),
        )
        .unwrap();
        assert!(clock.get().as_nanos() >= lease_ms * MS);
        assert_eq!(read_claim(&a, 3).owner, 0x22);
        // A released id is claimed without waiting.
        assert!(release(&b, 3, 0x22));
        clock.set(Timestamp::ZERO);
        claim(
            &a,
            3,
            &claimant(0x33, 300, lease_ms),
            || clock.get(),
            |_| panic!("no wait for a free id"),
        )
        .unwrap();
    }

    #[test]
    fn a_holder_advertises_its_address_to_the_other_processes() {
        let (a, b) = two_agents();
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 77, 1, 2), 9301);
        assert_eq!(advertisable(SocketAddr::V4(addr)), Ok(addr));
        for refused in ["0.0.0.0:9301", "10.77.1.2:0", "[::1]:9301"] {
            assert!(advertisable(refused.parse().unwrap()).is_err(), "{refused}");
        }
        let host = claimant(0, 0, 0).details.host_id;
        assert_eq!(advertised(&b, 1, host), None, "a free id");
        try_claim(&a, 1, 0, &claimant(0x11, 101, 300)).unwrap();
        assert_eq!(advertised(&b, 1, host), None, "held, not advertised yet");
        assert_eq!(
            advertise(&a, 1, 0x12, addr, None),
            Err(0x11),
            "only by its holder"
        );
        advertise(&a, 1, 0x11, addr, None).unwrap();
        assert_eq!(advertised(&b, 1, host), Some(addr));
        assert_eq!(advertised_kafka(&b, 1, host), None, "no Kafka listener");
        let kafka = SocketAddrV4::new(Ipv4Addr::new(10, 77, 1, 3), 9092);
        advertise(&a, 1, 0x11, addr, Some(kafka)).unwrap();
        assert_eq!(advertised(&b, 1, host), Some(addr));
        assert_eq!(advertised_kafka(&b, 1, host), Some(kafka));
        assert_eq!(
            advertised(&b, 1, host + 1),
            Some(addr),
            "from another host too"
        );
        assert_eq!(advertised(&b, 2, host), None);
        // A loopback address only from the same host.
        let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9301);
        let local_kafka = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9092);
        advertise(&a, 1, 0x11, local, Some(local_kafka)).unwrap();
        assert_eq!(advertised(&b, 1, host), Some(local));
        assert_eq!(advertised(&b, 1, host + 1), None);
        assert_eq!(advertised_kafka(&b, 1, host), Some(local_kafka));
        assert_eq!(advertised_kafka(&b, 1, host + 1), None);
        // A new holder starts unadvertised.
        try_claim(&b, 1, 0x11, &claimant(0x13, 102, 300)).unwrap();
        assert_eq!(advertised(&a, 1, host), None);
        assert_eq!(advertised_kafka(&a, 1, host), None);
    }

    #[test]
    fn live_claims_are_the_other_hosts_moving_ones() {
        let (a, b) = two_agents();
        let remote = |token, pid| Claimant {
            token,
            details: ClaimDetails {
                host_id: 0xdef,
                ..claimant(token, pid, 300).details
            },
        };
        // Broker 0: this host's (crashed: the caller holds the file lock). Broker 1: another
        // host's, beating. Broker 2: another host's, silent. Broker 3: claiming, never
        // published.
        try_claim(&a, 0, 0, &claimant(0x10, 100, 300)).unwrap();
        try_claim(&a, 1, 0, &remote(0x11, 101)).unwrap();
        try_claim(&a, 2, 0, &remote(0x12, 102)).unwrap();
        a.mem()
            .compare_exchange_u64(claim_offset(3), 0, 0x13)
            .unwrap();
        let clock = Cell::new(Timestamp::ZERO);
        let beats = Cell::new(0u64);
        let live = live_claims(
            &b,
            0xabc,
            || clock.get(),
            |pause| {
                clock.set(clock.get() + pause);
                beats.set(beats.get() + 1);
                beat(&a, 1, 0x11, beats.get()).unwrap();
            },
        );
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].broker, 1);
        assert!(!live[0].this_host);
        assert!(
            live[0]
                .to_string()
                .contains("pid 101 on host 0000000000000def")
        );
        // The silent one was watched for its whole lease.
        assert!(clock.get().as_nanos() >= 300 * MS);
    }

    #[test]
    fn ids_outside_the_pool_are_refused() {
        let (a, _) = two_agents();
        let error = claim(&a, 4, &claimant(1, 1, 100), || Timestamp::ZERO, |_| {}).unwrap_err();
        assert!(matches!(
            error,
            ClaimError::Pool(PoolError::NoSuchBroker { broker: 4, .. })
        ));
    }
}
