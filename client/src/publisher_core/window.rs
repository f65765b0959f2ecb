//! The in-flight window: how many batches each connection may have outstanding.
//!
//! Latency at saturation is bytes in flight divided by throughput, so the window should be
//! the smallest one that still gives full throughput. How large that is depends on the
//! path: one connection to a broker with a core of its own reaches full speed with 4
//! batches, while twelve connections to four brokers that share one core need more
//! (docs/results.md). An [`InFlightWindow::Adaptive`] window finds it by measuring: it
//! starts at [`WINDOW_START`] batches, halves while the acknowledged bytes per second hold,
//! and afterwards tries a step up and a step down now and then, keeping a step up only when
//! it pays (10%) and a step down only when it costs (almost) nothing. A step up that paid is
//! followed by the next at once, and a step down that cost by a step up soon after: the
//! path is held back by the window there. It does not start at the maximum: a run's first
//! second at 64 batches of 64 KiB per connection queued 10-30 ms of acks on four brokers,
//! enough to set the p99 of a run of several seconds, while 8-16 batches gave them the same
//! or more throughput (docs/results.md).
//!
//! What a step down may cost is measured two ways. The acknowledged rate must stay within
//! 7% of the rate at the widest window measured (not of the window just left, so that small
//! losses cannot add up). And a publisher that hardly waited for window space (its
//! application sets the pace) must not wait more than 1 point more of the time: its rate is
//! its pace whatever the window, but once the window starts to hold it back it falls behind
//! its schedule. A publisher the window already held back is judged by its rate alone: at
//! the same rate, waiting longer for window space costs it nothing (with 4 brokers on one
//! core, such a publisher waited 37% of the time at 32 batches and 52% at 16, at the same
//! rate, and a rule on its waiting kept it at 32 with 13 ms of acks queued, where 8 gave
//! more throughput at 2 ms). A window that never fills changes nothing, so shrinking it is
//! free; [`WINDOW_MIN`] keeps room for bursts.
//!
//! The first periods are not measured: connections and the path ramp up (four brokers on
//! one core took half a second to reach their rate), and a widest window measured then
//! would make every smaller one look fast enough.
//!
//! Sans-IO: the publisher core feeds it seals, waits, acknowledged bytes and the time.

use std::time::Duration;

use units::Timestamp;

/// How the in-flight window is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightWindow {
    /// Always `in_flight_batches_max`.
    Fixed,
    /// Between [`WINDOW_MIN`] and `in_flight_batches_max`, from measured throughput.
    Adaptive,
}

/// The smallest adaptive window: a burst of a few batches (a scheduling hiccup of the
/// broker's) still goes out at once.
pub const WINDOW_MIN: usize = 8;

/// Where an adaptive window starts (at most the maximum): 1 MiB of 64 KiB batches, which gave
/// one connection to a broker with a core of its own its full speed in every measurement
/// here (docs/results.md).
pub const WINDOW_START: usize = 16;

/// A measurement period lasts at least this long, so that scheduling noise averages out.
const PERIOD_MIN: Duration = Duration::from_millis(100);
/// ... and at least this many rounds (a full window of every connection acknowledged).
const ROUNDS_PER_PERIOD: u64 = 2;
/// A smaller window is kept when it keeps this share of the widest window's rate ...
const KEEP_SMALLER_RATIO: f64 = 0.93;
/// ... and a publisher that hardly waited before (the application sets its pace) waits for
/// window space at most this much more of the time: a paced publisher that waits falls
/// behind its schedule.
const KEEP_SMALLER_WAIT_SHARE_PACED: f64 = 0.01;
/// A larger window is kept only when it raises the rate by this factor: one period's rate
/// moves by 5-10% from the last on four brokers sharing a core, and a step up taken on
/// such noise queues more acks for nothing.
const KEEP_LARGER_RATIO: f64 = 1.10;
/// A publisher that waits this share of the time is held back by its window: only then is
/// a larger window tried, and below it the application sets the pace.
const HELD_BACK_WAIT_SHARE: f64 = 0.05;
/// Weight of a new period in the widest window's average rate.
const WIDEST_WEIGHT: f64 = 0.25;
/// Periods at a settled window between two trials.
const PERIODS_BETWEEN_TRIALS: u32 = 16;
/// Periods at the start that are not measured (the ramp-up).
const WARMUP_PERIODS: u32 = 5;

/// What one period measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    bytes_per_s: f64,
    /// Share of the period the publisher waited for window space.
    wait_share: f64,
}

impl Measured {
    /// The most a smaller window may make the publisher wait, as a share of the time, where
    /// these figures were measured: `None` (no bound) for a publisher the window already
    /// held back.
    fn wait_share_allowed(self) -> Option<f64> {
        (self.wait_share < HELD_BACK_WAIT_SHARE)
            .then_some(self.wait_share + KEEP_SMALLER_WAIT_SHARE_PACED)
    }
}

/// A window being tried against the one it replaced.
#[derive(Debug, Clone, Copy)]
struct Trial {
    from: usize,
    /// What `from` measured.
    reference: Measured,
}

/// The window controller (see the module docs).
#[derive(Debug)]
pub(crate) struct Window {
    mode: InFlightWindow,
    max: usize,
    current: usize,
    /// Still halving from the maximum.
    descending: bool,
    trial: Option<Trial>,
    /// The largest window measured, and its rate.
    widest: Option<(usize, f64)>,
    periods_settled: u32,
    /// Periods still to pass before the first is measured.
    warmup_periods: u32,
    next_trial_larger: bool,
    /// Batches still to be acknowledged before a period starts (those sent under the
    /// previous window).
    skip_batches: u64,
    period_started: Option<Timestamp>,
    period_bytes: u64,
    period_batches: u64,
    period_waited: Duration,
    /// Since when the window holds back the next seal.
    held_since: Option<Timestamp>,
    changes: u64,
}

impl Window {
    /// A window of at most `max` batches per connection (at least 1): `max` when fixed,
    /// starting at [`WINDOW_START`] when adaptive.
    pub fn new(mode: InFlightWindow, max: usize) -> Self {
        Self::starting_at(mode, max, WINDOW_START)
    }

    /// An adaptive window starts at `start` batches (a fixed one is always `max`).
    fn starting_at(mode: InFlightWindow, max: usize, start: usize) -> Self {
        let max = max.max(1);
        let current = match mode {
            InFlightWindow::Fixed => max,
            InFlightWindow::Adaptive => start.clamp(1, max),
        };
        Window {
            mode,
            max,
            current,
            descending: true,
            trial: None,
            widest: None,
            periods_settled: 0,
            warmup_periods: WARMUP_PERIODS,
            next_trial_larger: false,
            skip_batches: 0,
            period_started: None,
            period_bytes: 0,
            period_batches: 0,
            period_waited: Duration::ZERO,
            held_since: None,
            changes: 0,
        }
    }

    /// Batches each connection may have outstanding now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// How often the window changed.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The window kept a batch from being sealed at `now`.
    pub fn on_held(&mut self, now: Timestamp) {
        self.held_since.get_or_insert(now);
    }

    /// A batch was sealed at `now`.
    pub fn on_sealed(&mut self, now: Timestamp) {
        if let Some(since) = self.held_since.take() {
            self.period_waited += now.saturating_duration_since(since);
        }
    }

    /// A batch of `bytes` was acknowledged at `now`; `connections` is how many connections
    /// share the window (a round is a full window of each).
    pub fn on_acked(&mut self, bytes: u64, connections: usize, now: Timestamp) {
        if self.mode == InFlightWindow::Fixed || self.max <= WINDOW_MIN {
            return;
        }
        if self.skip_batches > 0 {
            self.skip_batches -= 1;
            return;
        }
        let Some(started) = self.period_started else {
            self.start_period(now);
            return;
        };
        self.period_bytes += bytes;
        self.period_batches += 1;
        let elapsed = now.saturating_duration_since(started);
        if self.smaller_trial_failed(now, connections) {
            return;
        }
        let round = (self.current * connections.max(1)) as u64;
        if elapsed < PERIOD_MIN || self.period_batches < ROUNDS_PER_PERIOD * round {
            return;
        }
        if self.warmup_periods > 0 {
            self.warmup_periods -= 1;
            self.start_period(now);
            return;
        }
        if let Some(since) = self.held_since {
            // Waiting right now: count it up to here.
            self.period_waited += now.saturating_duration_since(since);
            self.held_since = Some(now);
        }
        let measured = Measured {
            bytes_per_s: self.period_bytes as f64 / elapsed.as_secs_f64(),
            wait_share: (self.period_waited.as_secs_f64() / elapsed.as_secs_f64()).min(1.0),
        };
        self.decide(measured, connections);
        if self.period_started.is_some() {
            // Unchanged: the next period starts here (a change starts it after the skip).
            self.start_period(now);
        }
    }

    /// Gives up a smaller window at once when the publisher already waited longer for
    /// window space than a whole period may: a paced publisher falls behind its schedule
    /// for as long as the trial lasts.
    fn smaller_trial_failed(&mut self, now: Timestamp, connections: usize) -> bool {
        let Some(trial) = self.trial.filter(|t| self.current < t.from) else {
            return false;
        };
        let Some(allowed_share) = trial.reference.wait_share_allowed() else {
            return false;
        };
        let waiting = self
            .held_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        let allowed = PERIOD_MIN.mul_f64(allowed_share.min(1.0));
        if self.period_waited + waiting <= allowed {
            return false;
        }
        self.trial = None;
        self.reject(trial, connections);
        true
    }

    fn start_period(&mut self, now: Timestamp) {
        self.period_started = Some(now);
        self.period_bytes = 0;
        self.period_batches = 0;
        self.period_waited = Duration::ZERO;
        if self.held_since.is_some() {
            self.held_since = Some(now);
        }
    }

    /// The end of a measured period.
    fn decide(&mut self, measured: Measured, connections: usize) {
        let Some(trial) = self.trial.take() else {
            self.record_widest(measured);
            self.periods_settled += 1;
            if self.descending {
                self.try_smaller(measured, connections);
            } else if self.periods_settled >= PERIODS_BETWEEN_TRIALS {
                self.try_next(measured, connections);
            }
            return;
        };
        let kept = if self.current < trial.from {
            let widest = self
                .widest
                .map_or(trial.reference.bytes_per_s, |(_, rate)| rate);
            measured.bytes_per_s >= KEEP_SMALLER_RATIO * widest
                && trial
                    .reference
                    .wait_share_allowed()
                    .is_none_or(|allowed| measured.wait_share <= allowed)
        } else {
            measured.bytes_per_s >= KEEP_LARGER_RATIO * trial.reference.bytes_per_s
        };
        // A step up that did not pay leaves the widest window as it was: its one period,
        // perhaps a lucky one, must not become what every smaller window is held to.
        if kept || self.current < trial.from {
            self.record_widest(measured);
        }
        if !kept {
            self.reject(trial, connections);
        } else if self.current > trial.from {
            if let Some(larger) = self.larger(measured) {
                self.start_trial(larger, measured, connections);
            }
        } else if self.descending {
            self.try_smaller(measured, connections);
        }
    }

    /// Takes a period at the current window into the widest window's rate.
    fn record_widest(&mut self, measured: Measured) {
        self.widest = match self.widest {
            // Averaged over the periods at the widest window: one lucky period must not
            // make every smaller window look slow.
            Some((window, rate)) if window == self.current => {
                Some((window, rate + WIDEST_WEIGHT * (measured.bytes_per_s - rate)))
            }
            Some((window, _)) if window > self.current => self.widest,
            _ => Some((self.current, measured.bytes_per_s)),
        };
    }

    /// `trial` did not pay: back to the window it replaced, and no more halving. After a
    /// smaller window cost, a larger one (if the window held the publisher back) is tried
    /// next, two periods later.
    fn reject(&mut self, trial: Trial, connections: usize) {
        self.descending = false;
        let smaller_failed = self.current < trial.from;
        self.set(trial.from, connections);
        if smaller_failed && self.larger(trial.reference).is_some() {
            self.periods_settled = PERIODS_BETWEEN_TRIALS.saturating_sub(2);
            self.next_trial_larger = true;
        }
    }

    fn try_smaller(&mut self, reference: Measured, connections: usize) {
        let smaller = (self.current / 2).max(WINDOW_MIN);
        if smaller >= self.current {
            self.descending = false;
            return;
        }
        self.start_trial(smaller, reference, connections);
    }

    /// A settled window's trial: larger and smaller in turn (whichever may help).
    fn try_next(&mut self, reference: Measured, connections: usize) {
        let larger = self.larger(reference);
        let smaller = (self.current - (self.current / 5).max(1)).max(WINDOW_MIN);
        let smaller = (smaller < self.current).then_some(smaller);
        let larger_first = self.next_trial_larger;
        self.next_trial_larger = !self.next_trial_larger;
        let to = if larger_first {
            larger.or(smaller)
        } else {
            smaller.or(larger)
        };
        if let Some(to) = to {
            self.start_trial(to, reference, connections);
        }
    }

    /// A step up, when the window held the publisher back in `reference` and may grow.
    fn larger(&self, reference: Measured) -> Option<usize> {
        let larger = (self.current + self.current.div_ceil(4)).min(self.max);
        (reference.wait_share >= HELD_BACK_WAIT_SHARE && larger > self.current).then_some(larger)
    }

    fn start_trial(&mut self, to: usize, reference: Measured, connections: usize) {
        self.trial = Some(Trial {
            from: self.current,
            reference,
        });
        self.set(to, connections);
    }

    fn set(&mut self, window: usize, connections: usize) {
        if window != self.current {
            // The batches sent under the old window are acknowledged before the new one
            // is measured.
            self.skip_batches = (self.current.max(window) * connections.max(1)) as u64;
            self.current = window;
            self.changes += 1;
        }
        self.periods_settled = 0;
        self.period_started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH_BYTES: u64 = 64 * 1024;

    /// Runs a publisher over `connections` connections for `duration` on a path that, for a
    /// window, gives `path(window)`: the acknowledged bytes/s and the share of the time the
    /// publisher waits for window space. Returns the windows it went through.
    fn run(
        window: &mut Window,
        connections: usize,
        duration: Duration,
        path: impl Fn(usize) -> (f64, f64),
    ) -> Vec<usize> {
        run_timed(window, connections, duration, |_, w| path(w))
    }

    /// [`run`] on a path that also changes with the time since the start:
    /// `path(now, window)`.
    fn run_timed(
        window: &mut Window,
        connections: usize,
        duration: Duration,
        path: impl Fn(Timestamp, usize) -> (f64, f64),
    ) -> Vec<usize> {
        let mut now = Timestamp::ZERO;
        let end = now + duration;
        let mut seen = vec![window.current()];
        while now < end {
            let (rate, wait_share) = path(now, window.current());
            let gap = Duration::from_secs_f64(BATCH_BYTES as f64 / rate);
            window.on_held(now + gap.mul_f64(1.0 - wait_share));
            now += gap;
            window.on_sealed(now);
            window.on_acked(BATCH_BYTES, connections, now);
            if *seen.last().unwrap() != window.current() {
                seen.push(window.current());
            }
        }
        seen
    }

    /// A publisher twice as fast as a path that reaches its full rate from `knee` batches on
    /// (proportionally less below).
    fn knee(knee: usize, full: f64) -> impl Fn(usize) -> (f64, f64) {
        move |window| {
            let rate = full * (window.min(knee) as f64 / knee as f64);
            (rate, 1.0 - rate / (2.0 * full))
        }
    }

    #[test]
    fn a_path_that_needs_few_batches_gets_a_small_window() {
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        let seen = run(&mut window, 1, Duration::from_secs(3), knee(4, 1.2e9));
        assert_eq!(seen[..2], [16, 8], "halves while the rate holds: {seen:?}");
        assert_eq!(window.current(), WINDOW_MIN, "{seen:?}");
    }

    #[test]
    fn a_path_that_needs_every_batch_climbs_to_the_largest_window() {
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        let seen = run(&mut window, 12, Duration::from_secs(10), knee(64, 1.5e9));
        let climbed = seen.iter().position(|&w| w >= 60).expect("climbed");
        assert!(climbed <= 10, "one step up after another: {seen:?}");
        assert!(
            seen[climbed..].iter().all(|&w| w >= 48),
            "no trial below 48 survives: {seen:?}"
        );
        // 63 of 64 gives 98% of the rate: a step up to 64 does not pay 10%.
        assert!(window.current() >= 60, "{seen:?}");
    }

    #[test]
    fn losses_below_the_threshold_do_not_add_up_over_halvings() {
        // Each halving costs 4%: every one alone is within 7% of the window before it, but
        // two cost 8%.
        let rate_of = |window: usize| 1e9 * 0.96f64.powf((64.0 / window as f64).log2());
        let mut window = Window::starting_at(InFlightWindow::Adaptive, 64, 64);
        let seen = run(&mut window, 1, Duration::from_secs(20), |w| {
            (rate_of(w), 0.5)
        });
        assert_eq!(
            seen[..4],
            [64, 32, 16, 32],
            "the second halving is undone: {seen:?}"
        );
        assert!(seen.iter().all(|&w| w >= 16), "{seen:?}");
        assert!(rate_of(window.current()) >= 0.93e9, "{seen:?}");
    }

    #[test]
    fn a_held_back_publisher_waiting_longer_at_the_same_rate_takes_the_smaller_window() {
        // Four brokers on one core: the rate is the same from 8 batches on, and the
        // publisher waits longer for window space the smaller the window.
        let path = |window: usize| (1e9, 1.0 - 0.7 * (window.min(64) as f64 / 64.0).sqrt());
        let mut window = Window::starting_at(InFlightWindow::Adaptive, 64, 64);
        let seen = run(&mut window, 4, Duration::from_secs(5), path);
        assert_eq!(seen[..4], [64, 32, 16, 8], "{seen:?}");
        assert_eq!(window.current(), WINDOW_MIN, "{seen:?}");
    }

    #[test]
    fn a_slow_start_is_not_taken_for_the_widest_windows_rate() {
        // For its first 150 ms the path gives half its rate; then a window needs 16 batches
        // for the full rate. Measured during the ramp, 64 batches would look no faster than 8.
        let path = |now: Timestamp, window: usize| {
            let ramp = if now < Timestamp::ZERO + Duration::from_millis(150) {
                0.5
            } else {
                1.0
            };
            (ramp * 1e9 * (window.min(16) as f64 / 16.0), 0.5)
        };
        let mut window = Window::starting_at(InFlightWindow::Adaptive, 64, 64);
        let seen = run_timed(&mut window, 1, Duration::from_millis(1200), path);
        assert!(window.current() >= 16, "{seen:?}");
    }

    #[test]
    fn a_step_up_must_pay_more_than_the_noise() {
        // The path needs 16 batches; above that the rate is 7% higher: within one period's
        // noise on a shared core, not worth the queued acks.
        let path = |window: usize| match window {
            0..=16 => (1e9 * window as f64 / 16.0, 0.5),
            _ => (1.07e9, 0.5),
        };
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        let seen = run(&mut window, 1, Duration::from_secs(10), path);
        // A kept step to 20 would be followed at once by a trial of 25.
        assert!(!seen.contains(&25), "{seen:?}");
        assert_eq!(window.current(), 16, "{seen:?}");
    }

    #[test]
    fn a_step_down_that_cost_is_soon_followed_by_a_step_up() {
        // The path needs 32 batches; from the start (16) the halving costs, and the window
        // grows within a second instead of after 16 periods.
        let path = |window: usize| (1e9 * (window.min(32) as f64 / 32.0), 0.5);
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        let seen = run(&mut window, 1, Duration::from_millis(1500), path);
        assert!(window.current() >= 20, "{seen:?}");
    }

    #[test]
    fn a_paced_publisher_keeps_the_window_its_pace_needs() {
        // The pace needs 40 batches in flight; with fewer the publisher falls behind.
        let needed = 40.0;
        let pace = 5e8;
        let path = |window: usize| {
            let share = (window as f64 / needed).min(1.0);
            (pace * share, 1.0 - share)
        };
        // From the start (16) it climbs to the pace's window and stays there.
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        let seen = run(&mut window, 1, Duration::from_secs(20), path);
        assert!(window.current() >= 40, "{seen:?}");
        let at_pace = seen.iter().position(|&w| w >= 40).expect("climbed");
        assert!(seen[at_pace..].iter().all(|&w| w >= 32), "{seen:?}");
        // From a window at its pace, the first halving is undone.
        let mut window = Window::starting_at(InFlightWindow::Adaptive, 64, 64);
        let seen = run(&mut window, 1, Duration::from_secs(20), path);
        assert_eq!(seen[..3], [64, 32, 64], "{seen:?}");
        assert!(window.current() >= 40, "{seen:?}");
    }

    #[test]
    fn a_paced_publisher_spends_little_time_in_windows_too_small_for_its_pace() {
        let needed = 40;
        let path = |window: usize| {
            let share = (window as f64 / needed as f64).min(1.0);
            (5e8 * share, 1.0 - share)
        };
        // Once at a window its pace needs (a climb from the start takes about a second: a
        // paced publisher that needs more than WINDOW_START takes a fixed window).
        let mut window = Window::starting_at(InFlightWindow::Adaptive, 64, 64);
        let mut now = Timestamp::ZERO;
        let mut too_small = Duration::ZERO;
        while now < Timestamp::ZERO + Duration::from_secs(20) {
            let (rate, wait_share) = path(window.current());
            let gap = Duration::from_secs_f64(BATCH_BYTES as f64 / rate);
            window.on_held(now + gap.mul_f64(1.0 - wait_share));
            now += gap;
            if window.current() < needed {
                too_small += gap;
            }
            window.on_sealed(now);
            window.on_acked(BATCH_BYTES, 1, now);
        }
        assert!(window.changes() >= 4, "trials were made");
        assert!(
            too_small < Duration::from_millis(200),
            "{too_small:?} of 20 s in windows below the pace's"
        );
    }

    #[test]
    fn a_window_that_never_fills_shrinks_for_free() {
        let path = |_| (1e8, 0.0);
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        run(&mut window, 1, Duration::from_secs(2), path);
        assert_eq!(window.current(), WINDOW_MIN);
    }

    #[test]
    fn a_fixed_window_never_changes() {
        let mut window = Window::new(InFlightWindow::Fixed, 64);
        run(&mut window, 1, Duration::from_secs(2), knee(4, 1e9));
        assert_eq!((window.current(), window.changes()), (64, 0));
    }

    #[test]
    fn a_settled_window_grows_when_the_path_needs_more() {
        let mut window = Window::new(InFlightWindow::Adaptive, 64);
        run(&mut window, 1, Duration::from_secs(2), knee(4, 1e9));
        assert_eq!(window.current(), WINDOW_MIN);
        // The path's round trip grows: now 32 batches are needed.
        run(&mut window, 1, Duration::from_secs(30), knee(32, 1e9));
        assert!(window.current() >= 24, "window {}", window.current());
    }
}
