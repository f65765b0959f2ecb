//! Pacing: a publisher with a rate sends message `seq` no earlier than `start + seq x
//! interval`.

use std::thread;
use std::time::Duration;

use client::{ClientError, Publisher};
use units::Timestamp;

/// The send schedule of one publisher.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    start: Timestamp,
    /// Time between two messages; `None`: as fast as the publisher takes them.
    interval: Option<Duration>,
}

impl Pacing {
    /// The schedule of one of `publishers` publishers that share `rate_msgs_per_s` evenly
    /// (0: unlimited), starting at `start`.
    pub(crate) fn new(rate_msgs_per_s: u64, publishers: usize, start: Timestamp) -> Self {
        let interval = (rate_msgs_per_s > 0)
            .then(|| Duration::from_secs_f64(publishers as f64 / rate_msgs_per_s as f64));
        Pacing { start, interval }
    }

    /// Waits until message `seq` is due.
    pub(crate) fn wait_for(&self, publisher: &mut Publisher, seq: u64) -> Result<(), ClientError> {
        match self.interval {
            Some(interval) => pace(publisher, self.start + interval.mul_f64(seq as f64)),
            None => Ok(()),
        }
    }
}

/// Waits until `due`, letting the publisher seal lingering batches meanwhile. Sleeps for
/// most of the wait and spins briefly at the end, since a sleep overshoots by tens of us.
fn pace(publisher: &mut Publisher, due: Timestamp) -> Result<(), ClientError> {
    loop {
        let now = Timestamp::now();
        if now >= due {
            return Ok(());
        }
        let wake = publisher.linger_deadline().map_or(due, |d| d.min(due));
        let wait = wake.saturating_duration_since(now);
        if wait > Duration::from_micros(200) {
            thread::sleep(wait - Duration::from_micros(100));
        } else {
            std::hint::spin_loop();
        }
        publisher.poll()?;
    }
}
