//! Pacing: a publisher with a rate sends its message `seq` no earlier than the schedule's
//! due time (`client::pacing`), sleeping until shortly before it.

use client::pacing::{Schedule, SleepPlanner, set_timer_slack_min, sleep_until};
use client::{ClientError, Publisher};
use units::Timestamp;

/// The send schedule of one publisher.
#[derive(Debug, Clone)]
pub(crate) struct Pacing {
    /// `None`: as fast as the publisher takes them.
    schedule: Option<Schedule>,
    stream: u64,
    planner: SleepPlanner,
}

impl Pacing {
    /// The pacing of publisher `stream` on `schedule`. A paced thread gets the smallest
    /// timer slack, so its sleeps end on time (logged when the kernel refuses).
    pub(crate) fn new(schedule: Option<Schedule>, stream: u64) -> Self {
        if schedule.is_some()
            && let Err(error) = set_timer_slack_min()
        {
            log::warn!(
                "timer slack stays at the default (sleeps may end up to 50 us late): {error}"
            );
        }
        Pacing {
            schedule,
            stream,
            planner: schedule.map_or_else(SleepPlanner::default, |s| {
                SleepPlanner::for_interval(s.interval())
            }),
        }
    }

    /// When message `seq` is due (`None` when unpaced).
    pub(crate) fn due(&self, seq: u64) -> Option<Timestamp> {
        self.schedule.map(|s| s.due(self.stream, seq))
    }

    /// Waits until message `seq` is due, letting the publisher seal lingering batches and
    /// process acks after each sleep.
    pub(crate) fn wait_for(
        &mut self,
        publisher: &mut Publisher,
        seq: u64,
    ) -> Result<(), ClientError> {
        let Some(due) = self.due(seq) else {
            return Ok(());
        };
        loop {
            // A lingering batch is sealed on time even when the next message is far off.
            let linger = publisher.linger_deadline().filter(|&d| d < due);
            sleep_until(&mut self.planner, linger.unwrap_or(due), || {
                publisher.poll()
            })?;
            if linger.is_none() || Timestamp::now() >= due {
                return Ok(());
            }
            publisher.poll()?;
        }
    }
}
