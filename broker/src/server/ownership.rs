//! Who may use the pool, with a real clock: the claim on this broker's id (taken before it
//! serves, beaten by a heartbeat thread while it runs, given back on an orderly stop, left
//! for a successor to take over after a crash), the check that the pool file is still the
//! one mapped, and the refusal to format a pool that live brokers use. The claim logic
//! itself is [`shared_log::claim`].

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use shared_log::claim::{
    self, BEATS_PER_LEASE, ClaimDetails, ClaimError, ClaimHolder, ClaimState, Claimant,
};
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::pool::Pool;
use units::Timestamp;

/// Why a running broker stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// Another process took this broker's id over.
    #[error(transparent)]
    ClaimLost(#[from] ClaimError),
    /// The pool file was removed, replaced or truncated under the broker.
    #[error(
        "the pool file no longer backs this broker's mapping: {0}; this broker stops rather \
         than serve a pool no other broker sees (start the brokers again on the pool that is \
         there now, or restore the one that was)"
    )]
    PoolFileGone(hugepages::Error),
}

/// The pool is in use by live brokers, so `--format` does not replace it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pool {path} is in use by {}: --format would replace it under them; stop them first, or \
     format another --pool path",
    describe_users(.brokers, .holder_pids)
)]
pub struct PoolInUse {
    /// The pool path.
    pub path: String,
    /// The live brokers found in its claims.
    pub brokers: Vec<ClaimHolder>,
    /// Processes on this host holding the pool file's lock.
    pub holder_pids: Vec<u32>,
}

fn describe_users(brokers: &[ClaimHolder], holder_pids: &[u32]) -> String {
    let mut parts: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    let named = |pid: &&u32| {
        brokers
            .iter()
            .any(|b| b.this_host && b.details.is_some_and(|d| d.pid == **pid))
    };
    let others: Vec<String> = holder_pids
        .iter()
        .filter(|pid| !named(pid))
        .map(u32::to_string)
        .collect();
    if !others.is_empty() {
        parts.push(format!(
            "processes {} on this host (they hold the pool file's lock)",
            others.join(", ")
        ));
    }
    if parts.is_empty() {
        return "processes on this host (they hold the pool file's lock)".to_owned();
    }
    parts.join(", ")
}

/// This broker's claim on its id and the thread that beats its heartbeat. The thread also
/// checks, every beat, that the claim is still this process's and that the pool file still
/// is the one mapped; when either fails it records why ([`HeldClaim::failure`]) and sets
/// the broker's stop and crash flags, so the broker ends at once and writes nothing more.
/// The broker's other threads check the claim too, before they write (see [`ClaimGuard`]).
#[derive(Debug)]
pub struct HeldClaim {
    heartbeat: Heartbeat,
    thread: Option<JoinHandle<()>>,
}

/// The claim as every thread of a running broker checks it, and how each of them ends the
/// broker when the claim or the pool is lost: it records why, then sets the crash and stop
/// flags.
#[derive(Debug, Clone)]
pub struct ClaimGuard {
    pool: Pool<PoolMemory>,
    broker: u16,
    claimant: Claimant,
    /// The broker's flags.
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    failure: Arc<OnceLock<LivenessError>>,
}

impl ClaimGuard {
    /// The broker's stop flag: set when the broker must end.
    pub fn stop_flag(&self) -> &Arc<AtomicBool> {
        &self.stop
    }

    /// The broker's crash flag: set (with `stop`) when the broker must end at once, without
    /// a drain and without another write to the pool.
    pub fn crash_flag(&self) -> &Arc<AtomicBool> {
        &self.crash
    }

    /// The token the claim is held with (for checks by sans-IO code, see
    /// [`shared_log::writer::TopicWriter::with_claim_token`]).
    pub fn token(&self) -> u64 {
        self.claimant.token
    }

    /// Advertises `addr` in the claim, where other brokers find it to redirect subscribers
    /// here, and `kafka`, the Kafka listener's address, where they find it to name this
    /// broker in Kafka metadata (one [`claim::advertisable`] refuses is not advertised: say
    /// so, with the flag that fixes it). When the claim is not this broker's any more, the
    /// broker is ended.
    pub fn advertise(&self, addr: SocketAddr, kafka: Option<SocketAddr>) {
        let kafka = kafka.and_then(|kafka| match claim::advertisable(kafka) {
            Ok(v4) => Some(v4),
            Err(why) => {
                log::info!(
                    "broker {}: Kafka listener {kafka} is not advertised to other brokers \
                     ({why}): their Kafka metadata does not name this broker",
                    self.broker
                );
                None
            }
        });
        match claim::advertisable(addr) {
            Ok(v4) => {
                if claim::advertise(&self.pool, self.broker, self.claimant.token, v4, kafka)
                    .is_err()
                {
                    self.lost();
                }
            }
            Err(why) => log::info!(
                "broker {}: {addr} is not advertised to other brokers ({why}): they cannot \
                 redirect subscribers here, nor name its Kafka listener (--advertise names \
                 an address)",
                self.broker
            ),
        }
    }

    /// Whether the claim is still this broker's: the owner word read afresh (one line
    /// invalidated, a fence, a load). When it is not, the broker is ended (see
    /// [`ClaimGuard::lost`]).
    pub fn holds(&self) -> bool {
        if claim::check_owner(&self.pool, self.broker, self.claimant.token).is_ok() {
            return true;
        }
        self.lost();
        false
    }

    /// Ends the broker because another process took its id over (a thread found out by
    /// itself, e.g. a ring writer that refused to publish).
    pub fn lost(&self) {
        self.lost_to(&claim::read_claim(&self.pool, self.broker));
    }

    /// Ends the broker because the claim line holds `state`, another process's claim.
    fn lost_to(&self, state: &ClaimState) {
        let holder = ClaimHolder::new(self.broker, state, self.claimant.details.host_id);
        let lease_ms = self.claimant.details.lease_ms;
        self.fail(ClaimError::ClaimLost { holder, lease_ms }.into());
    }

    /// Records why the broker must end (the first reason stays), then sets its flags, so
    /// whoever sees them finds the reason.
    fn fail(&self, error: LivenessError) {
        let message = error.to_string();
        let first = self.failure.set(error).is_ok();
        self.crash.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        if first {
            log::error!("broker {}: {message}", self.broker);
        }
    }
}

/// Longest time between two checks of the claim by a network loop. Its ring writers check
/// before every slot anyway; the loop's own check guards what it writes besides (payload
/// bytes as they arrive, its `subscribed` lines) and ends the broker at once.
const LOOP_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// A network loop's check of the claim, timed by the loop's own clock reads: a pause of the
/// process shows as a jump of that clock and is checked at once; otherwise the owner word is
/// read at most every [`LOOP_CHECK_INTERVAL`], not on every iteration (a read costs a line
/// invalidation and a fence, as much as an idle iteration's own work).
#[derive(Debug)]
pub struct LoopClaimCheck {
    guard: ClaimGuard,
    checked_at: Option<Timestamp>,
}

impl LoopClaimCheck {
    /// Checks of `guard`'s claim.
    pub fn new(guard: ClaimGuard) -> LoopClaimCheck {
        LoopClaimCheck {
            guard,
            checked_at: None,
        }
    }

    /// The claim checked.
    pub fn guard(&self) -> &ClaimGuard {
        &self.guard
    }

    /// Whether the claim is still this broker's, as of `now` (the loop's latest clock read,
    /// taken after its wait); see [`ClaimGuard::holds`].
    pub fn holds(&mut self, now: Timestamp) -> bool {
        let recent = self
            .checked_at
            .is_some_and(|at| now.saturating_duration_since(at) < LOOP_CHECK_INTERVAL);
        if recent {
            return true;
        }
        self.checked_at = Some(now);
        self.guard.holds()
    }
}

/// What the claim and its heartbeat thread share.
#[derive(Debug, Clone)]
struct Heartbeat {
    guard: ClaimGuard,
    /// Ends the heartbeat thread (separate from `stop`: a stopping broker drains its
    /// connections first and keeps its claim meanwhile).
    beating: Arc<AtomicBool>,
}

impl HeldClaim {
    /// Claims `broker` in `pool` with a lease of `lease_ms` (see [`claim::claim`]: this
    /// blocks for up to a lease while a previous claimant's heartbeat is watched) and starts
    /// beating it. A lease outside [`claim::check_lease_ms`]'s range is refused.
    pub fn take(
        pool: &Pool<PoolMemory>,
        broker: u16,
        lease_ms: u64,
    ) -> Result<HeldClaim, ClaimError> {
        claim::check_lease_ms(lease_ms)?;
        pool.check_broker(broker)?;
        let claimant = Claimant {
            token: new_token(),
            details: ClaimDetails {
                pid: std::process::id(),
                host_id: host_id(),
                lease_ms,
                claimed_unix_ms: unix_ms(),
            },
        };
        let previous = claim::read_claim(pool, broker);
        let started = Timestamp::now();
        claim::claim(pool, broker, &claimant, Timestamp::now, std::thread::sleep)?;
        if previous.owner != 0 {
            log::warn!(
                "broker {broker}: took the id over from {}, whose heartbeat stayed still for \
                 {} ms",
                ClaimHolder::new(broker, &previous, claimant.details.host_id),
                Timestamp::now()
                    .saturating_duration_since(started)
                    .as_millis()
            );
        }
        let heartbeat = Heartbeat {
            guard: ClaimGuard {
                pool: pool.clone(),
                broker,
                claimant,
                stop: Arc::default(),
                crash: Arc::default(),
                failure: Arc::default(),
            },
            beating: Arc::new(AtomicBool::new(true)),
        };
        let beater = heartbeat.clone();
        Ok(HeldClaim {
            heartbeat,
            thread: Some(super::spawn("liveness", move || beater.run())),
        })
    }

    /// The claim as the broker's threads check it.
    pub fn guard(&self) -> &ClaimGuard {
        &self.heartbeat.guard
    }

    /// The broker's stop flag (set by the heartbeat thread when the broker must end).
    pub fn stop_flag(&self) -> &Arc<AtomicBool> {
        self.heartbeat.guard.stop_flag()
    }

    /// The broker's crash flag (set with `stop`: end at once, no drain).
    pub fn crash_flag(&self) -> &Arc<AtomicBool> {
        self.heartbeat.guard.crash_flag()
    }

    /// Why the broker had to stop, once it had to.
    pub fn failure(&self) -> Option<&LivenessError> {
        self.heartbeat.guard.failure.get()
    }

    /// True while the heartbeat thread runs.
    pub fn is_beating(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the heartbeat and gives the id back (an orderly stop, after every other thread
    /// of the broker has ended): the next broker with this id starts at once. A claim that
    /// was lost is left to its new holder.
    pub fn release(mut self) {
        self.end_heartbeat();
        let ClaimGuard {
            pool,
            broker,
            claimant,
            ..
        } = &self.heartbeat.guard;
        if self.failure().is_none() && !claim::release(pool, *broker, claimant.token) {
            log::warn!(
                "broker {broker}: the claim on the id had moved on when it was to be released"
            );
        }
    }

    /// Stops the heartbeat and leaves the claim as it is (a crash): the next broker with
    /// this id takes it over once it has stayed still for a lease.
    pub fn abandon(mut self) {
        self.end_heartbeat();
    }

    fn end_heartbeat(&mut self) {
        self.heartbeat.beating.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!(
                    "broker {}: the liveness thread panicked",
                    self.heartbeat.guard.broker
                );
            }
        }
    }
}

/// Longest sleep of the heartbeat thread between looks at its flag.
const HEARTBEAT_NAP: Duration = Duration::from_millis(20);

impl Heartbeat {
    fn run(self) {
        let guard = &self.guard;
        let interval = Duration::from_millis(guard.claimant.details.lease_ms / BEATS_PER_LEASE);
        let mut heartbeat = 0u64;
        let mut next_beat = Timestamp::now();
        let mut check_failed = false;
        while self.beating.load(Ordering::Relaxed) {
            let now = Timestamp::now();
            if now < next_beat {
                std::thread::sleep(next_beat.saturating_duration_since(now).min(HEARTBEAT_NAP));
                continue;
            }
            next_beat = now + interval;
            match crate::region::check_backing(guard.pool.mem()) {
                Ok(()) => check_failed = false,
                Err(
                    error @ (hugepages::Error::RegionRemoved { .. }
                    | hugepages::Error::RegionReplaced { .. }
                    | hugepages::Error::RegionTruncated { .. }),
                ) => return guard.fail(LivenessError::PoolFileGone(error)),
                // Not a verdict on the pool (e.g. a stat that failed): say so once, go on.
                Err(error) if !check_failed => {
                    check_failed = true;
                    log::warn!(
                        "broker {}: cannot check the pool file: {error}",
                        guard.broker
                    );
                }
                Err(_) => {}
            }
            heartbeat += 1;
            if let Err(state) =
                claim::beat(&guard.pool, guard.broker, guard.claimant.token, heartbeat)
            {
                return guard.lost_to(&state);
            }
        }
    }
}

/// Which kernel this process runs on: a hash of the boot id (one per running kernel, the
/// scope of `flock`), else of the machine id or the host name. Never 0.
pub fn host_id() -> u64 {
    static HOST_ID: OnceLock<u64> = OnceLock::new();
    *HOST_ID.get_or_init(|| {
        let sources = [
            "/proc/sys/kernel/random/boot_id",
            "/etc/machine-id",
            "/proc/sys/kernel/hostname",
        ];
        let text = sources.iter().find_map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .filter(|text| !text.trim().is_empty())
        });
        let Some(text) = text else {
            log::warn!(
                "no boot id, machine id or host name readable: brokers on other hosts may \
                 look like this host's in claims"
            );
            return 1;
        };
        fnv1a(text.trim().as_bytes()).max(1)
    })
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A random nonzero token, unique to this claim: std's hash keys (random per process, a
/// new one per call) over the pid and the time.
fn new_token() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(unix_ms());
    hasher.finish().max(1)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Refuses (before `--format` replaces it) a pool that live brokers use: one that a process
/// on this host maps (it holds the pool file's lock), or whose claims show a broker of
/// another host whose heartbeat moves (watched for up to its lease). Claims of this host
/// while nobody here holds the lock are crashed brokers': not in the way.
pub fn refuse_live_pool(
    path: &Path,
    options: &hugepages::RegionOptions,
    mode: CoherenceMode,
) -> Result<(), PoolInUse> {
    let lookup = hugepages::RegionOptions {
        prefault: false,
        ..*options
    };
    let region = match hugepages::SharedRegion::open_exclusive(path, &lookup) {
        Ok(region) => region,
        Err(hugepages::Error::RegionInUse { holder_pids, .. }) => {
            return Err(pool_in_use(path, options, mode, holder_pids));
        }
        // Nothing there to protect.
        Err(
            hugepages::Error::RegionMissing { .. }
            | hugepages::Error::EmptyRegion { .. }
            | hugepages::Error::DaxDeviceMissing { .. },
        ) => return Ok(()),
        Err(error) => {
            log::warn!(
                "--format: cannot look into the old pool {} ({error}); replacing it",
                path.display()
            );
            return Ok(());
        }
    };
    let Ok(pool) = Pool::attach(crate::region::pool_memory(region, mode)) else {
        // Not a pool of this layout: only the lock speaks for its users, and it is free.
        return Ok(());
    };
    let live = claim::live_claims(&pool, host_id(), Timestamp::now, std::thread::sleep);
    if live.is_empty() {
        return Ok(());
    }
    Err(PoolInUse {
        path: path.display().to_string(),
        brokers: live,
        holder_pids: Vec::new(),
    })
}

/// The error for a pool file that processes of this host hold locked, naming the brokers
/// among them that its claims show (read through a shared lock, which they allow).
pub fn pool_in_use(
    path: &Path,
    options: &hugepages::RegionOptions,
    mode: CoherenceMode,
    holder_pids: Vec<u32>,
) -> PoolInUse {
    let lookup = hugepages::RegionOptions {
        prefault: false,
        ..*options
    };
    let host = host_id();
    let brokers = hugepages::SharedRegion::open(path, &lookup)
        .ok()
        .and_then(|region| Pool::attach(crate::region::pool_memory(region, mode)).ok())
        .map(|pool| {
            claim::claimed(&pool)
                .iter()
                .map(|(broker, state)| ClaimHolder::new(*broker, state, host))
                // A claim of this host whose process holds no lock is a crashed broker's.
                .filter(|holder| {
                    !holder.this_host
                        || holder
                            .details
                            .is_some_and(|d| holder_pids.is_empty() || holder_pids.contains(&d.pid))
                })
                .collect()
        })
        .unwrap_or_default();
    PoolInUse {
        path: path.display().to_string(),
        brokers,
        holder_pids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(broker: u16, pid: u32, this_host: bool) -> ClaimHolder {
        ClaimHolder {
            broker,
            details: Some(ClaimDetails {
                pid,
                host_id: 7,
                lease_ms: 1000,
                claimed_unix_ms: 0,
            }),
            this_host,
        }
    }

    #[test]
    fn pool_users_are_named_once_each() {
        let error = PoolInUse {
            path: "/dev/hugepages/p".into(),
            brokers: vec![holder(0, 10, true), holder(3, 10, false)],
            holder_pids: vec![10, 11],
        };
        let text = error.to_string();
        assert!(
            text.contains(
                "in use by broker 0 (pid 10 on this host), broker 3 (pid 10 on host \
                 0000000000000007), processes 11 on this host"
            ),
            "{text}"
        );
        let nobody_named = PoolInUse {
            path: "/p".into(),
            brokers: Vec::new(),
            holder_pids: Vec::new(),
        };
        assert!(
            nobody_named
                .to_string()
                .contains("in use by processes on this host")
        );
    }

    #[test]
    fn a_claim_lease_out_of_range_is_refused_before_anything_is_claimed() {
        let pool = shared_log::heap::small_test_pool();
        // 3 ms would beat every 0 ms (a spinning thread); past the maximum, watchers would
        // judge the claim dead between two beats.
        for lease_ms in [3, claim::CLAIM_LEASE_MS_MAX + 1] {
            match HeldClaim::take(&pool, 0, lease_ms) {
                Err(ClaimError::LeaseOutOfRange { lease_ms: refused }) => {
                    assert_eq!(refused, lease_ms);
                }
                other => panic!("expected LeaseOutOfRange for {lease_ms} ms, got {other:?}"),
            }
            assert_eq!(claim::read_claim(&pool, 0).owner, 0, "nothing claimed");
        }
    }

    #[test]
    fn a_loop_checks_the_claim_after_its_clock_jumped_and_at_most_every_interval_otherwise() {
        let pool = shared_log::heap::small_test_pool();
        let held = HeldClaim::take(&pool, 0, 1000).unwrap();
        let mut check = LoopClaimCheck::new(held.guard().clone());
        let start = Timestamp::ZERO;
        assert!(check.holds(start));
        // Another process takes the id over (this one was paused, or its heartbeat starved).
        let successor = claim::test_claimant(0x22);
        claim::try_claim(&pool, 0, held.guard().token(), &successor).unwrap();
        assert!(
            check.holds(start + LOOP_CHECK_INTERVAL / 2),
            "within the interval the owner word is not read"
        );
        assert!(
            !check.holds(start + LOOP_CHECK_INTERVAL),
            "read again: moved on"
        );
        assert!(matches!(
            held.failure(),
            Some(LivenessError::ClaimLost(ClaimError::ClaimLost { .. }))
        ));
        assert!(held.crash_flag().load(Ordering::Relaxed));
        held.abandon();
    }

    #[test]
    fn hashes_and_tokens_are_nonzero_and_tokens_differ() {
        assert_ne!(host_id(), 0);
        assert_eq!(host_id(), host_id());
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        let (a, b) = (new_token(), new_token());
        assert!(a != 0 && b != 0 && a != b);
    }
}
