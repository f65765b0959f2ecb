//! Points in monotonic time, as the sans-IO cores take them.
//!
//! The cores never read a clock: an adapter reads [`Timestamp::now`] and passes the value in,
//! and a simulation passes its own clock, starting at [`Timestamp::ZERO`]. Spans are
//! [`std::time::Duration`].

use std::ops::{Add, AddAssign};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A point in time: nanoseconds on a monotonic clock since an arbitrary origin (the process's
/// first [`Timestamp::now`]; 0 in a simulation). Only differences between two timestamps of
/// the same clock mean anything. `u64` nanoseconds last 584 years.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

/// The instant behind timestamp 0 of [`Timestamp::now`], set by its first call.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

impl Timestamp {
    /// The origin of the clock.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The point `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Timestamp {
        Timestamp(nanos)
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Reads the process's monotonic clock. For I/O adapters only: the cores take time as an
    /// argument so that tests and simulations can drive it.
    pub fn now() -> Timestamp {
        let origin = *ORIGIN.get_or_init(Instant::now);
        Timestamp::ZERO.saturating_add(Instant::now().saturating_duration_since(origin))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self` plus `span`, `None` beyond the range.
    pub fn checked_add(self, span: Duration) -> Option<Timestamp> {
        let nanos = u64::try_from(span.as_nanos()).ok()?;
        self.0.checked_add(nanos).map(Timestamp)
    }

    /// `self` plus `span`, the last representable point beyond the range.
    pub fn saturating_add(self, span: Duration) -> Timestamp {
        self.checked_add(span).unwrap_or(Timestamp(u64::MAX))
    }
}

/// Saturating, so that a deadline beyond the range is one that never comes.
impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, span: Duration) -> Timestamp {
        self.saturating_add(span)
    }
}

impl AddAssign<Duration> for Timestamp {
    fn add_assign(&mut self, span: Duration) {
        *self = self.saturating_add(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_round_trip() {
        assert_eq!(Timestamp::from_nanos(42).as_nanos(), 42);
        assert_eq!(Timestamp::ZERO, Timestamp::default());
        assert!(Timestamp::from_nanos(1) > Timestamp::ZERO);
    }

    #[test]
    fn duration_since_saturates_at_zero() {
        let early = Timestamp::from_nanos(1_000);
        let late = Timestamp::from_nanos(3_500);
        assert_eq!(
            late.saturating_duration_since(early),
            Duration::from_nanos(2_500)
        );
        assert_eq!(early.saturating_duration_since(late), Duration::ZERO);
    }

    #[test]
    fn adding_beyond_the_range_saturates() {
        let near_end = Timestamp::from_nanos(u64::MAX - 10);
        assert_eq!(
            near_end.checked_add(Duration::from_nanos(10)),
            Some(Timestamp::from_nanos(u64::MAX))
        );
        assert_eq!(near_end.checked_add(Duration::from_nanos(11)), None);
        assert_eq!(
            near_end + Duration::from_nanos(11),
            Timestamp::from_nanos(u64::MAX)
        );
        assert_eq!(Timestamp::ZERO.checked_add(Duration::MAX), None);
        assert_eq!(
            Timestamp::ZERO + Duration::MAX,
            Timestamp::from_nanos(u64::MAX)
        );
        assert_eq!(
            Timestamp::from_nanos(5) + Duration::from_millis(2),
            Timestamp::from_nanos(2_000_005)
        );
    }

    #[test]
    fn now_is_monotonic_from_the_first_reading() {
        let first = Timestamp::now();
        std::thread::sleep(Duration::from_millis(2));
        let second = Timestamp::now();
        assert!(second.saturating_duration_since(first) >= Duration::from_millis(2));
    }
}
