//! Size limits enforced by every parser.

use crate::ack::ACK_BODY_BYTES_MAX;
use crate::payload::MESSAGE_PREFIX_BYTES;

/// Default largest batch payload: 16 MiB.
pub const BATCH_BYTES_DEFAULT: u32 = 16 << 20;
/// Largest batch payload any configuration may allow: 64 MiB.
pub const BATCH_BYTES_HARD_MAX: u32 = 64 << 20;
/// Smallest `batch_bytes_max` that makes sense: one empty message.
pub const BATCH_BYTES_MIN: u32 = MESSAGE_PREFIX_BYTES as u32;
/// Longest topic name (bytes); also the size of the pool's topic-name slot.
pub const TOPIC_BYTES_MAX: usize = 64;
/// Longest Error frame reason (bytes).
pub const REASON_BYTES_MAX: usize = 1024;
/// Default largest control-frame body: 64 KiB.
pub const FRAME_BYTES_DEFAULT: u32 = 64 << 10;
/// Largest control-frame body any configuration may allow: 1 MiB.
pub const FRAME_BYTES_HARD_MAX: u32 = 1 << 20;
/// Smallest allowed `frame_bytes_max`: a full Ack (1024 entries) must fit.
pub const FRAME_BYTES_MIN: u32 = ACK_BODY_BYTES_MAX as u32;

/// Limits used by all parsers and by [`FrameDecoder`](crate::FrameDecoder).
///
/// Build with [`Limits::default`] and the `with_*` methods; each rejects values outside the
/// protocol's hard bounds, so a `Limits` is always within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    batch_bytes_max: u32,
    frame_bytes_max: u32,
    topic_bytes_max: usize,
    reason_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            batch_bytes_max: BATCH_BYTES_DEFAULT,
            frame_bytes_max: FRAME_BYTES_DEFAULT,
            topic_bytes_max: TOPIC_BYTES_MAX,
            reason_bytes_max: REASON_BYTES_MAX,
        }
    }
}

/// A limit set outside its allowed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} of {value} is outside {min}..={max}")]
pub struct LimitsError {
    /// Name of the limit.
    pub field: &'static str,
    /// Value asked for.
    pub value: u64,
    /// Smallest allowed value.
    pub min: u64,
    /// Largest allowed value.
    pub max: u64,
}

fn check(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), LimitsError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LimitsError {
            field,
            value,
            min,
            max,
        })
    }
}

impl Limits {
    /// Largest batch (and delivery) payload accepted, in bytes.
    pub fn batch_bytes_max(&self) -> u32 {
        self.batch_bytes_max
    }

    /// Largest control-frame body accepted (every kind but Batch and Delivery, whose bodies
    /// are bounded by their fixed header plus `batch_bytes_max`).
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// Longest topic name accepted.
    pub fn topic_bytes_max(&self) -> usize {
        self.topic_bytes_max
    }

    /// Longest Error frame reason accepted.
    pub fn reason_bytes_max(&self) -> usize {
        self.reason_bytes_max
    }

    /// Sets the largest batch payload, within [`BATCH_BYTES_MIN`]`..=`[`BATCH_BYTES_HARD_MAX`].
    pub fn with_batch_bytes_max(mut self, bytes: u32) -> Result<Self, LimitsError> {
        check(
            "batch_bytes_max",
            bytes.into(),
            BATCH_BYTES_MIN.into(),
            BATCH_BYTES_HARD_MAX.into(),
        )?;
        self.batch_bytes_max = bytes;
        Ok(self)
    }

    /// Sets the largest control-frame body, within [`FRAME_BYTES_MIN`]`..=`[`FRAME_BYTES_HARD_MAX`].
    pub fn with_frame_bytes_max(mut self, bytes: u32) -> Result<Self, LimitsError> {
        check(
            "frame_bytes_max",
            bytes.into(),
            FRAME_BYTES_MIN.into(),
            FRAME_BYTES_HARD_MAX.into(),
        )?;
        self.frame_bytes_max = bytes;
        Ok(self)
    }

    /// Sets the longest topic name, within `1..=`[`TOPIC_BYTES_MAX`].
    pub fn with_topic_bytes_max(mut self, bytes: usize) -> Result<Self, LimitsError> {
        check("topic_bytes_max", bytes as u64, 1, TOPIC_BYTES_MAX as u64)?;
        self.topic_bytes_max = bytes;
        Ok(self)
    }

    /// Sets the longest Error frame reason, within `0..=`[`REASON_BYTES_MAX`].
    pub fn with_reason_bytes_max(mut self, bytes: usize) -> Result<Self, LimitsError> {
        check("reason_bytes_max", bytes as u64, 0, REASON_BYTES_MAX as u64)?;
        self.reason_bytes_max = bytes;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_within_bounds() {
        let limits = Limits::default();
        assert_eq!(limits.batch_bytes_max(), 16 << 20);
        assert_eq!(limits.topic_bytes_max(), 64);
        assert_eq!(limits.reason_bytes_max(), 1024);
        assert!(FRAME_BYTES_MIN <= limits.frame_bytes_max());
    }

    #[test]
    fn out_of_range_limits_are_refused_with_numbers() {
        let error = Limits::default()
            .with_batch_bytes_max(70_000_000)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "batch_bytes_max of 70000000 is outside 4..=67108864"
        );
        assert!(Limits::default().with_frame_bytes_max(100).is_err());
        assert!(Limits::default().with_topic_bytes_max(0).is_err());
        assert!(Limits::default().with_topic_bytes_max(65).is_err());
        assert!(Limits::default().with_reason_bytes_max(1025).is_err());
        let limits = Limits::default()
            .with_batch_bytes_max(BATCH_BYTES_HARD_MAX)
            .and_then(|l| l.with_topic_bytes_max(8))
            .and_then(|l| l.with_reason_bytes_max(0))
            .and_then(|l| l.with_frame_bytes_max(FRAME_BYTES_HARD_MAX))
            .unwrap();
        assert_eq!(limits.batch_bytes_max(), 64 << 20);
        assert_eq!(limits.topic_bytes_max(), 8);
    }
}
