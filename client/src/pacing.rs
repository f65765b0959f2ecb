//! Open-loop pacing for load tools: when each message is due ([`Schedule`]), how to wait for
//! it without burning a core ([`SleepPlanner`]), and latency measured from the due time
//! ([`record_since`]).
//!
//! Measuring from the time a message was *meant* to be sent, not from when the sender got
//! round to it, keeps a stall visible: a sender held up for 10 ms sends the messages due
//! meanwhile late, and each of them counts the wait (coordinated omission, as wrk2 and
//! HdrHistogram describe it). The schedule is a pure function of its start, so a
//! subscriber in the same process can tell when any message was due from its
//! (stream, sequence) alone.
//!
//! Everything here takes time as an input; the only I/O is [`sleep_until`],
//! [`set_timer_slack_min`] and [`CpuMeter`].

use std::thread;
use std::time::Duration;

use units::Timestamp;

use hdrhistogram::Histogram;

/// When each message of `streams` interleaved senders is due: sender `stream` sends its
/// message `seq` at `start + (seq x streams + stream) / rate`, so the senders together send
/// evenly spaced messages at `rate_msgs_per_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    start: Timestamp,
    rate_msgs_per_s: u64,
    streams: u64,
}

impl Schedule {
    /// The schedule of `streams` senders sharing `rate_msgs_per_s` from `start`; `None` for
    /// rate 0 (unpaced: nothing is due at a particular time) or no streams.
    pub fn new(start: Timestamp, rate_msgs_per_s: u64, streams: u64) -> Option<Self> {
        (rate_msgs_per_s > 0 && streams > 0).then_some(Schedule {
            start,
            rate_msgs_per_s,
            streams,
        })
    }

    /// The instant the schedule starts.
    pub fn start(&self) -> Timestamp {
        self.start
    }

    /// How long after the start message `seq` of sender `stream` is due. Computed from the
    /// start each time (in integer nanoseconds), so the schedule never drifts.
    pub fn offset(&self, stream: u64, seq: u64) -> Duration {
        let slot = u128::from(seq) * u128::from(self.streams) + u128::from(stream);
        let nanos = slot * 1_000_000_000 / u128::from(self.rate_msgs_per_s);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Time between two messages of one sender.
    pub fn interval(&self) -> Duration {
        self.offset(0, 1)
    }

    /// When message `seq` of sender `stream` is due.
    pub fn due(&self, stream: u64, seq: u64) -> Timestamp {
        self.start + self.offset(stream, seq)
    }
}

/// Records, for each message `seqs` of `stream`, the time from when it was due to `at`, in
/// microseconds (at least 1, the histogram's lowest value).
pub fn record_since(
    histogram: &mut Histogram<u64>,
    schedule: &Schedule,
    stream: u64,
    seqs: std::ops::Range<u64>,
    at: Timestamp,
) {
    for seq in seqs {
        let latency = at.saturating_duration_since(schedule.due(stream, seq));
        histogram.saturating_record((latency.as_micros() as u64).max(1));
    }
}

/// What a pacing loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaceStep {
    /// The message is due: send it.
    Send,
    /// Sleep this long, then ask again.
    Sleep(Duration),
    /// Too close to the due time for a sleep to end in time: spin and ask again.
    Spin,
}

/// Spin margin kept on top of the expected oversleep.
pub const SPIN_MARGIN_US_DEFAULT: u64 = 2;
/// Most a pacing loop spins before a due time.
pub const SPIN_MAX_US_DEFAULT: u64 = 50;

/// Plans the wait for a due time: sleep until shortly before it, then spin the rest. A
/// sleep ends late by the timer's slack plus the scheduler's wake-up time; the planner
/// learns that oversleep (a moving average of what the caller reports) and wakes that much
/// earlier plus a margin, never spinning more than `spin_max`. So a sender at 10,000
/// messages per second spins a few microseconds per message (the margin and the error of
/// the estimate) instead of the whole gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepPlanner {
    spin_margin: Duration,
    spin_max: Duration,
    oversleep: Duration,
    /// Shortest sleep (fast schedules, see [`SleepPlanner::for_interval`]).
    sleep_min: Duration,
}

impl Default for SleepPlanner {
    fn default() -> Self {
        SleepPlanner::new(
            Duration::from_micros(SPIN_MARGIN_US_DEFAULT),
            Duration::from_micros(SPIN_MAX_US_DEFAULT),
        )
    }
}

impl SleepPlanner {
    /// A planner that spins at least `spin_margin` and at most `spin_max` before a due time
    /// (`spin_margin` is capped by `spin_max`).
    pub fn new(spin_margin: Duration, spin_max: Duration) -> Self {
        SleepPlanner {
            spin_margin: spin_margin.min(spin_max),
            spin_max,
            oversleep: Duration::ZERO,
            sleep_min: Duration::ZERO,
        }
    }

    /// The planner for a sender whose messages are `interval` apart. Spinning pays only
    /// when the gap is at least twice the longest spin: a faster sender would spin (or wake
    /// for every message) all the time, taking the core from its own I/O threads. So it
    /// never spins, sleeps at least `SPIN_MAX_US_DEFAULT` at a time, and sends what fell
    /// due meanwhile in a burst; each message is still measured from its own due time, so
    /// the wait shows in the figures (at most that sleep plus the oversleep).
    pub fn for_interval(interval: Duration) -> Self {
        let spin_max = Duration::from_micros(SPIN_MAX_US_DEFAULT);
        if interval >= 2 * spin_max {
            SleepPlanner::default()
        } else {
            SleepPlanner {
                sleep_min: spin_max,
                ..SleepPlanner::new(Duration::ZERO, Duration::ZERO)
            }
        }
    }

    /// How long before a due time the planner stops sleeping.
    pub fn lead(&self) -> Duration {
        (self.oversleep + self.spin_margin).min(self.spin_max)
    }

    /// The oversleep it expects (moving average of the reported ones).
    pub fn expected_oversleep(&self) -> Duration {
        self.oversleep
    }

    /// What to do at `now` for a message due at `due`.
    pub fn step(&self, now: Timestamp, due: Timestamp) -> PaceStep {
        let remaining = due.saturating_duration_since(now);
        if remaining.is_zero() {
            return PaceStep::Send;
        }
        match remaining.checked_sub(self.lead()) {
            Some(sleep) if !sleep.is_zero() => PaceStep::Sleep(sleep.max(self.sleep_min)),
            _ => PaceStep::Spin,
        }
    }

    /// Learns from a sleep of `asked` that took `took`: the average moves by an eighth of the
    /// difference (rounded away from zero, so it reaches a steady oversleep exactly), so one
    /// late wake-up (a preemption) does not make every later wait spin.
    pub fn observe_sleep(&mut self, asked: Duration, took: Duration) {
        let sample = took.saturating_sub(asked).min(self.spin_max);
        let average = self.oversleep.as_nanos() as i128;
        let difference = sample.as_nanos() as i128 - average;
        let moved = average + (difference + difference.signum() * 7) / 8;
        self.oversleep = Duration::from_nanos(moved.clamp(0, u64::MAX.into()) as u64);
    }
}

/// Waits until `due` with `planner` (sleeping, then spinning), teaching it each sleep's
/// oversleep; `between` runs after every sleep (a sender's housekeeping), and an error from
/// it ends the wait.
pub fn sleep_until<E>(
    planner: &mut SleepPlanner,
    due: Timestamp,
    mut between: impl FnMut() -> Result<(), E>,
) -> Result<(), E> {
    loop {
        let now = Timestamp::now();
        match planner.step(now, due) {
            PaceStep::Send => return Ok(()),
            PaceStep::Sleep(asked) => {
                thread::sleep(asked);
                planner.observe_sleep(asked, Timestamp::now().saturating_duration_since(now));
                between()?;
            }
            PaceStep::Spin => std::hint::spin_loop(),
        }
    }
}

/// Sets the calling thread's timer slack to 1 ns (`PR_SET_TIMERSLACK`), so its sleeps end
/// when asked instead of up to 50 us later (the default slack). Fails only on kernels
/// without the call.
pub fn set_timer_slack_min() -> Result<(), std::io::Error> {
    nix::sys::prctl::set_timerslack(1).map_err(std::io::Error::from)
}

/// This process's CPU (user + system, all its threads) over a stretch of wall time, as the
/// cores it kept busy: for a load tool to report what it cost the machine it measures.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    cpu: Result<Duration, nix::Error>,
    wall: Timestamp,
}

impl CpuMeter {
    /// Starts measuring now.
    pub fn start() -> CpuMeter {
        CpuMeter {
            cpu: process_cpu_time(),
            wall: Timestamp::now(),
        }
    }

    /// Cores busy on average since [`CpuMeter::start`]; an error when `getrusage` failed.
    pub fn cores(&self) -> Result<f64, nix::Error> {
        let used = process_cpu_time()?.saturating_sub(self.cpu?);
        let wall = Timestamp::now().saturating_duration_since(self.wall);
        Ok(used.as_secs_f64() / wall.as_secs_f64().max(1e-9))
    }
}

/// User plus system CPU time of this process (all its threads) so far.
fn process_cpu_time() -> Result<Duration, nix::Error> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let duration = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(duration(usage.user_time()) + duration(usage.system_time()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency_histogram;

    #[test]
    fn schedule_interleaves_streams_evenly_without_drift() {
        let start = Timestamp::now();
        assert_eq!(Schedule::new(start, 0, 1), None);
        let schedule = Schedule::new(start, 10_000, 4).unwrap();
        // 10,000 msgs/s over 4 senders: a message every 100 us, each sender every 400 us.
        assert_eq!(schedule.offset(0, 0), Duration::ZERO);
        assert_eq!(schedule.offset(1, 0), Duration::from_micros(100));
        assert_eq!(schedule.offset(3, 0), Duration::from_micros(300));
        assert_eq!(schedule.offset(0, 1), Duration::from_micros(400));
        assert_eq!(schedule.offset(2, 5), Duration::from_micros(2_200));
        // A rate that does not divide a second: exact after a billion messages.
        let odd = Schedule::new(start, 3, 1).unwrap();
        assert_eq!(odd.offset(0, 1), Duration::from_nanos(333_333_333));
        assert_eq!(
            odd.offset(0, 3_000_000_000),
            Duration::from_secs(1_000_000_000)
        );
        assert_eq!(schedule.due(2, 5), start + Duration::from_micros(2_200));
        assert_eq!(schedule.interval(), Duration::from_micros(400));
    }

    #[test]
    fn latency_counts_from_the_due_time_so_a_stall_is_not_hidden() {
        // 1,000 msgs/s; the sender stalls for 100 ms at the start, then sends the 100
        // messages due meanwhile at once, and each is acknowledged 50 us after it is sent.
        let start = Timestamp::now();
        let schedule = Schedule::new(start, 1_000, 1).unwrap();
        let mut histogram = latency_histogram();
        let sent_at = start + Duration::from_millis(100);
        for seq in 0..100 {
            let acked = sent_at + Duration::from_micros(50);
            record_since(&mut histogram, &schedule, 0, seq..seq + 1, acked);
        }
        // Measured from the send (the coordinated-omission mistake) all would be 50 us.
        assert_eq!(histogram.len(), 100);
        assert_eq!(histogram.min(), 1_050);
        assert!(histogram.max() >= 100_050 && histogram.max() <= 100_150);
        let median = histogram.value_at_quantile(0.5);
        assert!((50_000..=51_100).contains(&median), "{median}");
        // A range records each message against its own due time.
        let mut batch = latency_histogram();
        record_since(
            &mut batch,
            &schedule,
            0,
            10..12,
            start + Duration::from_millis(12),
        );
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.min(), 1_000);
        assert!((1_999..=2_001).contains(&batch.max()));
        // Early (clock read before the due time): the lowest value, not a wrap-around.
        let mut early = latency_histogram();
        record_since(&mut early, &schedule, 0, 5..6, start);
        assert_eq!(early.max(), 1);
    }

    #[test]
    fn planner_sleeps_then_spins_the_last_microseconds() {
        let planner = SleepPlanner::default();
        let now = Timestamp::now();
        let us = Duration::from_micros;
        assert_eq!(planner.lead(), us(SPIN_MARGIN_US_DEFAULT));
        assert_eq!(planner.step(now, now), PaceStep::Send);
        assert_eq!(planner.step(now + us(1), now), PaceStep::Send);
        let margin = us(SPIN_MARGIN_US_DEFAULT);
        assert_eq!(
            planner.step(now, now + us(100)),
            PaceStep::Sleep(us(100) - margin)
        );
        assert_eq!(planner.step(now, now + margin), PaceStep::Spin);
        assert_eq!(planner.step(now, now + us(1)), PaceStep::Spin);
    }

    #[test]
    fn fast_schedules_sleep_to_the_due_time_instead_of_spinning() {
        let us = Duration::from_micros;
        let now = Timestamp::now();
        // 10,000 msgs/s: sleep, then spin the last microseconds.
        let slow = SleepPlanner::for_interval(us(100));
        assert_eq!(slow, SleepPlanner::default());
        assert_eq!(slow.step(now, now + us(1)), PaceStep::Spin);
        // 100,000 msgs/s: a spin before every message would never end.
        let mut fast = SleepPlanner::for_interval(us(10));
        // It sleeps at least spin_max and sends what fell due meanwhile at once.
        let sleep_min = us(SPIN_MAX_US_DEFAULT);
        assert_eq!(fast.lead(), Duration::ZERO);
        assert_eq!(fast.step(now, now + us(1)), PaceStep::Sleep(sleep_min));
        assert_eq!(fast.step(now, now + us(9)), PaceStep::Sleep(sleep_min));
        assert_eq!(fast.step(now, now + us(80)), PaceStep::Sleep(us(80)));
        assert_eq!(fast.step(now, now), PaceStep::Send);
        fast.observe_sleep(us(1), us(60));
        assert_eq!(fast.lead(), Duration::ZERO);
    }

    #[test]
    fn planner_learns_the_oversleep_within_bounds() {
        let us = Duration::from_micros;
        let mut planner = SleepPlanner::default();
        for _ in 0..100 {
            planner.observe_sleep(us(90), us(120));
        }
        // Converges to the 30 us oversleep and wakes that much earlier, plus the margin.
        let margin = us(SPIN_MARGIN_US_DEFAULT);
        assert_eq!(planner.expected_oversleep(), us(30));
        assert_eq!(planner.lead(), us(30) + margin);
        let now = Timestamp::now();
        assert_eq!(
            planner.step(now, now + us(100)),
            PaceStep::Sleep(us(70) - margin)
        );
        // One preemption of 10 ms moves the average by at most an eighth of spin_max.
        planner.observe_sleep(us(90), us(10_090));
        assert!(planner.lead() <= us(SPIN_MAX_US_DEFAULT));
        assert!(planner.expected_oversleep() <= us(33), "{planner:?}");
        // A huge oversleep never makes it spin more than spin_max.
        for _ in 0..100 {
            planner.observe_sleep(us(10), us(5_000));
        }
        assert_eq!(planner.lead(), us(SPIN_MAX_US_DEFAULT));
        // Waking early (a short sleep) pulls the estimate back down.
        for _ in 0..200 {
            planner.observe_sleep(us(90), us(90));
        }
        assert_eq!(planner.lead(), us(SPIN_MARGIN_US_DEFAULT));
    }

    #[test]
    fn sleep_until_returns_at_or_after_the_due_time() {
        let mut planner = SleepPlanner::default();
        let due = Timestamp::now() + Duration::from_millis(2);
        let mut calls = 0;
        sleep_until::<()>(&mut planner, due, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert!(Timestamp::now() >= due);
        assert!(calls >= 1);
        let stopped = sleep_until(
            &mut planner,
            Timestamp::now() + Duration::from_millis(2),
            || Err("stop"),
        );
        assert_eq!(stopped, Err("stop"));
    }
}
