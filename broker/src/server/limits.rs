//! The deadlines and limits that keep one client from holding the others back
//! (docs/protocol.md, "Deadlines and limits"), and the two broker-wide tables they need: the
//! connections per address, and the bytes of slow batches staged outside the pool.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Deadlines and limits for the clients of one broker. Every field is a broker option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// A connection must send Hello or CreateTopic within this time of connecting (and an
    /// admin connection its next CreateTopic or Goodbye within this time of the last).
    pub hello_timeout_ms: u64,
    /// Time every started batch may take on top of its size at the minimum rate.
    pub batch_grace_ms: u64,
    /// Slowest accepted arrival of a batch's payload, in bytes per second: a batch of `n`
    /// bytes must be complete within `batch_grace_ms + n / batch_min_bytes_per_s`.
    pub batch_min_bytes_per_s: u64,
    /// A batch still arriving this long after it got its room in the pool is moved out of
    /// the pool (to staging), so that the room can be reclaimed behind it.
    pub batch_hold_ms: u64,
    /// Bytes all connections of the broker together may hold in staging.
    pub staging_bytes_max: u64,
    /// Connections the broker serves at once.
    pub connections_max: u32,
    /// Connections the broker serves at once from one IP address.
    pub connections_per_address_max: u32,
    /// A subscriber that takes nothing for this long stops holding the log for its
    /// publishers (on topics with `Retention::StallLimited`).
    pub subscriber_stall_ms: u64,
    /// A connection that is closing (after an Error or a Goodbye) but whose peer does not
    /// take the last bytes is dropped after this long.
    pub close_timeout_ms: u64,
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            hello_timeout_ms: 5_000,
            batch_grace_ms: 1_000,
            batch_min_bytes_per_s: 1 << 20,
            batch_hold_ms: 20,
            staging_bytes_max: 64 << 20,
            connections_max: 1024,
            connections_per_address_max: 64,
            subscriber_stall_ms: 2_000,
            close_timeout_ms: 10_000,
        }
    }
}

/// A limit set outside the range the broker can honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{option} is {value}, expected {min}..={max}")]
pub struct LimitOutOfRange {
    /// The option, as the CLI names it.
    pub option: &'static str,
    /// The value given.
    pub value: u64,
    /// Smallest accepted.
    pub min: u64,
    /// Largest accepted.
    pub max: u64,
}

/// One hour: the longest any deadline may be (longer ones are mistakes, and would overflow
/// the clock arithmetic soon enough).
const DEADLINE_MS_MAX: u64 = 3_600_000;

impl ClientLimits {
    /// Checks every limit against the range the broker can honour.
    pub fn validate(&self) -> Result<(), LimitOutOfRange> {
        let checks = [
            (
                "hello-timeout-ms",
                self.hello_timeout_ms,
                1,
                DEADLINE_MS_MAX,
            ),
            ("batch-grace-ms", self.batch_grace_ms, 1, DEADLINE_MS_MAX),
            (
                "batch-min-bytes-per-s",
                self.batch_min_bytes_per_s,
                1,
                u64::MAX,
            ),
            ("batch-hold-ms", self.batch_hold_ms, 1, DEADLINE_MS_MAX),
            (
                "connections-max",
                u64::from(self.connections_max),
                1,
                u64::from(u32::MAX),
            ),
            (
                "connections-per-address-max",
                u64::from(self.connections_per_address_max),
                1,
                u64::from(u32::MAX),
            ),
            (
                "subscriber-stall-ms",
                self.subscriber_stall_ms,
                1,
                DEADLINE_MS_MAX,
            ),
            (
                "close-timeout-ms",
                self.close_timeout_ms,
                1,
                DEADLINE_MS_MAX,
            ),
        ];
        for (option, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(LimitOutOfRange {
                    option,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }

    /// See [`ClientLimits::close_timeout_ms`].
    pub fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.close_timeout_ms)
    }

    /// How long a batch of `payload_bytes` may take to arrive once its room is reserved.
    pub fn batch_deadline(&self, payload_bytes: u64) -> Duration {
        let rate = self.batch_min_bytes_per_s.max(1);
        Duration::from_millis(self.batch_grace_ms)
            + Duration::from_micros(payload_bytes.saturating_mul(1_000_000) / rate)
    }

    /// See [`ClientLimits::hello_timeout_ms`].
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }

    /// See [`ClientLimits::batch_hold_ms`].
    pub fn batch_hold(&self) -> Duration {
        Duration::from_millis(self.batch_hold_ms)
    }

    /// See [`ClientLimits::subscriber_stall_ms`].
    pub fn subscriber_stall(&self) -> Duration {
        Duration::from_millis(self.subscriber_stall_ms)
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRefused {
    /// The broker serves its maximum.
    #[error("the broker serves its maximum of {max} connections (--connections-max)")]
    Broker {
        /// The limit.
        max: u32,
    },
    /// The address has its maximum.
    #[error(
        "{address} has its maximum of {max} connections to this broker \
         (--connections-per-address-max)"
    )]
    Address {
        /// The peer's address.
        address: IpAddr,
        /// The limit.
        max: u32,
    },
}

/// Open connections, in all and per peer address. Entries exist only for addresses with a
/// connection, so the table holds at most `connections_max` of them.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    open: u32,
    by_address: HashMap<IpAddr, u32>,
}

impl ConnectionTable {
    /// Admits a connection from `address`, or says which limit refuses it.
    pub fn admit(
        &mut self,
        address: IpAddr,
        limits: &ClientLimits,
    ) -> Result<(), ConnectionRefused> {
        if self.open >= limits.connections_max {
            return Err(ConnectionRefused::Broker {
                max: limits.connections_max,
            });
        }
        let count = self.by_address.entry(address).or_insert(0);
        if *count >= limits.connections_per_address_max {
            if *count == 0 {
                self.by_address.remove(&address);
            }
            return Err(ConnectionRefused::Address {
                address,
                max: limits.connections_per_address_max,
            });
        }
        *count += 1;
        self.open += 1;
        Ok(())
    }

    /// A connection admitted from `address` ended.
    pub fn release(&mut self, address: IpAddr) {
        let Some(count) = self.by_address.get_mut(&address) else {
            debug_assert!(false, "release of {address} without a connection");
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.by_address.remove(&address);
        }
        self.open -= 1;
    }

    /// Connections open.
    pub fn open(&self) -> u32 {
        self.open
    }
}

/// Bytes of slow batches held outside the pool, against [`ClientLimits::staging_bytes_max`].
#[derive(Debug, Default)]
pub struct StagingBudget {
    used_bytes: u64,
}

impl StagingBudget {
    /// Takes `bytes` of the budget if they are free.
    pub fn take(&mut self, bytes: u64, limits: &ClientLimits) -> bool {
        if self.used_bytes + bytes > limits.staging_bytes_max {
            return false;
        }
        self.used_bytes += bytes;
        true
    }

    /// Gives back `bytes` taken before.
    pub fn give_back(&mut self, bytes: u64) {
        debug_assert!(bytes <= self.used_bytes, "staging budget underflow");
        self.used_bytes = self.used_bytes.saturating_sub(bytes);
    }

    /// Bytes in use.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections_max: u32, connections_per_address_max: u32) -> ClientLimits {
        ClientLimits {
            connections_max,
            connections_per_address_max,
            ..ClientLimits::default()
        }
    }

    #[test]
    fn connections_are_limited_per_address_and_in_all() {
        let limits = limits(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut table = ConnectionTable::default();
        assert_eq!(table.admit(a, &limits), Ok(()));
        assert_eq!(table.admit(a, &limits), Ok(()));
        assert_eq!(
            table.admit(a, &limits),
            Err(ConnectionRefused::Address { address: a, max: 2 })
        );
        assert_eq!(table.admit(b, &limits), Ok(()));
        assert_eq!(
            table.admit(b, &limits),
            Err(ConnectionRefused::Broker { max: 3 })
        );
        table.release(a);
        assert_eq!(table.admit(b, &limits), Ok(()), "a's release made room");
        assert_eq!(table.open(), 3);
        for address in [a, b, b] {
            table.release(address);
        }
        assert_eq!(table.open(), 0);
        assert!(
            table.by_address.is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn a_refused_address_leaves_no_entry() {
        let limits = limits(8, 0);
        let mut table = ConnectionTable::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(table.admit(a, &limits).is_err());
        assert!(table.by_address.is_empty());
    }

    #[test]
    fn batch_deadlines_grow_with_size_at_the_minimum_rate() {
        let limits = ClientLimits {
            batch_grace_ms: 500,
            batch_min_bytes_per_s: 1_000_000,
            ..ClientLimits::default()
        };
        assert_eq!(limits.batch_deadline(0), Duration::from_millis(500));
        assert_eq!(
            limits.batch_deadline(2_000_000),
            Duration::from_millis(2_500)
        );
        let zero_rate = ClientLimits {
            batch_min_bytes_per_s: 0,
            ..limits
        };
        assert!(
            zero_rate.batch_deadline(u64::MAX) > Duration::from_secs(1),
            "no overflow"
        );
    }

    #[test]
    fn limits_out_of_range_are_named() {
        assert_eq!(ClientLimits::default().validate(), Ok(()));
        let zero_rate = ClientLimits {
            batch_min_bytes_per_s: 0,
            ..ClientLimits::default()
        };
        assert_eq!(
            zero_rate.validate().unwrap_err().option,
            "batch-min-bytes-per-s"
        );
        let endless = ClientLimits {
            hello_timeout_ms: u64::MAX,
            ..ClientLimits::default()
        };
        assert_eq!(endless.validate().unwrap_err().option, "hello-timeout-ms");
    }

    #[test]
    fn staging_is_bounded() {
        let limits = ClientLimits {
            staging_bytes_max: 100,
            ..ClientLimits::default()
        };
        let mut budget = StagingBudget::default();
        assert!(budget.take(60, &limits));
        assert!(!budget.take(41, &limits));
        assert!(budget.take(40, &limits));
        budget.give_back(60);
        assert_eq!(budget.used_bytes(), 40);
    }
}
