//! Faults on the wire, for the tests (sans IO): a seeded, deterministic RNG decides for
//! each frame whether it is dropped, duplicated, delivered late or corrupted.
//!
//! [`crate::device::XskDevice`] applies them where frames meet the wire: to a frame from
//! the rx ring before the hooks see it, and to a frame for the tx ring after the hooks let
//! it go. Frames that never cross a wire are never faulted (the hooks' synthesized SYNs,
//! held segments and ARP replies; smoltcp's ARP requests and an adoption's SYN-ACK): a
//! network cannot lose them, and losing the synthesized SYN of an adoption left its
//! client without an answer until the adoption timed out.

use std::str::FromStr;

/// Bytes of an Ethernet header.
const ETHERNET_HEADER: usize = 14;

/// Fault rates, each in percent of frames, and the RNG seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultConfig {
    /// Received and sent frames dropped.
    pub drop: u8,
    /// Received frames delivered twice.
    pub duplicate: u8,
    /// Received frames held back and delivered after the next one.
    pub reorder: u8,
    /// Received and sent frames with one bit of the IPv4 header flipped (the IPv4 checksum
    /// catches it: TCP checksums of received frames cannot be verified on veth, see
    /// docs/xdp.md, so payload corruption would not be caught by anybody).
    pub corrupt: u8,
    /// Seed of the deterministic RNG.
    pub seed: u64,
}

/// Why a fault specification was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad fault specification {spec:?}: {reason} (expected e.g. drop=1,duplicate=1,reorder=1,corrupt=1,seed=7; rates in percent, 0 to 100)"
)]
pub struct FaultSpecError {
    spec: String,
    reason: String,
}

impl FromStr for FaultConfig {
    type Err = FaultSpecError;

    fn from_str(spec: &str) -> Result<FaultConfig, FaultSpecError> {
        let fail = |reason: String| FaultSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let mut config = FaultConfig::default();
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| fail(format!("{item:?} has no '='")))?;
            if key == "seed" {
                config.seed = value
                    .parse()
                    .map_err(|_| fail(format!("seed {value:?} is not a number")))?;
                continue;
            }
            let rate: u8 = value
                .parse()
                .ok()
                .filter(|rate| *rate <= 100)
                .ok_or_else(|| fail(format!("{key} rate {value:?} is not 0 to 100")))?;
            match key {
                "drop" => config.drop = rate,
                "duplicate" | "dup" => config.duplicate = rate,
                "reorder" => config.reorder = rate,
                "corrupt" => config.corrupt = rate,
                other => return Err(fail(format!("unknown fault {other:?}"))),
            }
        }
        Ok(config)
    }
}

/// What the faults did, for the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Frames dropped (both directions).
    pub dropped: u64,
    /// Frames delivered twice.
    pub duplicated: u64,
    /// Frames delivered after their successor.
    pub reordered: u64,
    /// Frames corrupted (both directions).
    pub corrupted: u64,
}

/// What the held copy is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Nothing held.
    Empty,
    /// Deliver it before the next frame from the wire (a duplicate, or a late frame whose
    /// successor went by).
    Due,
    /// Deliver it after the next frame from the wire (reordering).
    AfterNext,
}

/// The faults of one device's wire. Only reachable through the broker's hidden
/// `--debug-inject-faults` flag (see docs/xdp.md).
#[derive(Debug)]
pub struct WireFaults {
    config: FaultConfig,
    rng_rx: u64,
    rng_tx: u64,
    /// A copy of a received frame, to deliver again or late (one at a time).
    held: Vec<u8>,
    held_state: Held,
    counts: FaultCounts,
}

impl WireFaults {
    /// Faults at the rates of `config`.
    pub fn new(config: FaultConfig) -> WireFaults {
        WireFaults {
            config,
            rng_rx: config.seed | 1,
            rng_tx: config.seed.rotate_left(17) | 1,
            held: Vec::new(),
            held_state: Held::Empty,
            counts: FaultCounts::default(),
        }
    }

    /// What was done so far.
    pub fn counts(&self) -> FaultCounts {
        self.counts
    }

    /// A copy to receive before the next frame from the wire, if one is due (it is then a
    /// received frame like any other).
    pub fn take_due(&mut self) -> Option<Vec<u8>> {
        if self.held_state != Held::Due {
            return None;
        }
        self.held_state = Held::Empty;
        Some(std::mem::take(&mut self.held))
    }

    /// A frame came off the wire: returns whether to receive it (it may have been
    /// corrupted in place). A duplicate or a late copy is kept for [`WireFaults::take_due`].
    pub fn on_rx(&mut self, frame: &mut [u8]) -> bool {
        match self.held_state {
            Held::AfterNext => {
                self.held_state = Held::Due;
                return true;
            }
            // Only one copy is held at a time; the caller takes a due one first.
            Held::Due => return true,
            Held::Empty => {}
        }
        let (config, rng) = (self.config, &mut self.rng_rx);
        if roll(rng) < config.drop {
            self.counts.dropped += 1;
            false
        } else if roll(rng) < config.duplicate {
            copy_into(&mut self.held, frame);
            self.held_state = Held::Due;
            self.counts.duplicated += 1;
            true
        } else if roll(rng) < config.reorder {
            copy_into(&mut self.held, frame);
            self.held_state = Held::AfterNext;
            self.counts.reordered += 1;
            false
        } else if roll(rng) < config.corrupt {
            let bit = roll(rng);
            corrupt(frame, bit);
            self.counts.corrupted += 1;
            true
        } else {
            true
        }
    }

    /// Nothing came off the wire: a frame held for after the next one is delivered on the
    /// next receive rather than never.
    pub fn on_rx_idle(&mut self) {
        if self.held_state == Held::AfterNext {
            self.held_state = Held::Due;
        }
    }

    /// A frame is about to go on the wire: returns whether it goes (it may have been
    /// corrupted in place).
    pub fn on_tx(&mut self, frame: &mut [u8]) -> bool {
        let rng = &mut self.rng_tx;
        let (drop, corrupt_it, bit) = (
            roll(rng) < self.config.drop,
            roll(rng) < self.config.corrupt,
            roll(rng),
        );
        if drop {
            self.counts.dropped += 1;
            return false;
        }
        if corrupt_it {
            corrupt(frame, bit);
            self.counts.corrupted += 1;
        }
        true
    }
}

/// xorshift64*: a percentage roll in 0..100.
fn roll(state: &mut u64) -> u8 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32).wrapping_rem(100) as u8
}

/// Flips one bit of the IPv4 header of an Ethernet frame (or of the frame's last byte when
/// it is too short to have one).
fn corrupt(frame: &mut [u8], bit: u8) {
    const IPV4: std::ops::Range<usize> = ETHERNET_HEADER..ETHERNET_HEADER + 20;
    let index = if frame.len() >= IPV4.end {
        IPV4.start + usize::from(bit) % IPV4.len()
    } else {
        frame.len().wrapping_sub(1)
    };
    if let Some(byte) = frame.get_mut(index) {
        *byte ^= 1 << (bit % 8);
    }
}

fn copy_into(buffer: &mut Vec<u8>, frame: &[u8]) {
    buffer.clear();
    buffer.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_refuse_nonsense() {
        let config: FaultConfig = "drop=1,dup=2,reorder=3,corrupt=4,seed=9".parse().unwrap();
        assert_eq!(
            config,
            FaultConfig {
                drop: 1,
                duplicate: 2,
                reorder: 3,
                corrupt: 4,
                seed: 9
            }
        );
        assert!("drop=101".parse::<FaultConfig>().is_err());
        assert!("melt=1".parse::<FaultConfig>().is_err());
        assert!("drop".parse::<FaultConfig>().is_err());
    }

    #[test]
    fn the_rng_is_deterministic_and_roughly_uniform() {
        let (mut a, mut b) = (7u64, 7u64);
        let rolls: Vec<u8> = (0..10_000).map(|_| roll(&mut a)).collect();
        assert!(rolls.iter().all(|r| *r < 100));
        assert_eq!(rolls, (0..10_000).map(|_| roll(&mut b)).collect::<Vec<_>>());
        let below_10 = rolls.iter().filter(|r| **r < 10).count();
        assert!((800..1200).contains(&below_10), "{below_10}");
    }

    #[test]
    fn corruption_flips_one_bit_of_the_ipv4_header() {
        let mut frame = [0u8; 60];
        corrupt(&mut frame, 42);
        let flipped: Vec<usize> = (0..60).filter(|i| frame[*i] != 0).collect();
        assert_eq!(flipped.len(), 1);
        assert!((14..34).contains(&flipped[0]));
        assert_eq!(frame[flipped[0]].count_ones(), 1);
    }

    /// Frames `frames` off the wire, each 60 bytes of its number, received as a device
    /// does: a due copy before each next frame, and the held one once the wire is quiet.
    fn receive(faults: &mut WireFaults, frames: std::ops::RangeInclusive<u8>) -> Vec<u8> {
        let mut got = Vec::new();
        for byte in frames {
            if let Some(copy) = faults.take_due() {
                got.push(copy[0]);
            }
            let mut frame = [byte; 60];
            if faults.on_rx(&mut frame) {
                got.push(frame[0]);
            }
        }
        for _ in 0..2 {
            faults.on_rx_idle();
            if let Some(copy) = faults.take_due() {
                got.push(copy[0]);
            }
        }
        got
    }

    #[test]
    fn duplicates_and_reordering_deliver_every_frame() {
        let mut faults = WireFaults::new(FaultConfig {
            duplicate: 30,
            reorder: 30,
            seed: 3,
            ..FaultConfig::default()
        });
        let got = receive(&mut faults, 1..=50);
        let counts = faults.counts();
        assert!(counts.duplicated > 0 && counts.reordered > 0, "{counts:?}");
        assert_eq!(got.len() as u64, 50 + counts.duplicated);
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique, (1..=50).collect::<Vec<u8>>());
        assert_ne!(got, unique, "some frames are out of order");
    }

    #[test]
    fn a_frame_held_back_is_delivered_when_the_wire_goes_quiet() {
        let mut faults = WireFaults::new(FaultConfig {
            reorder: 100,
            seed: 1,
            ..FaultConfig::default()
        });
        assert!(!faults.on_rx(&mut [7; 60]), "held back");
        assert_eq!(faults.take_due(), None, "not before its successor");
        faults.on_rx_idle();
        assert_eq!(faults.take_due(), Some(vec![7; 60]));
        assert_eq!(faults.counts().reordered, 1);
    }

    #[test]
    fn drops_lose_frames_in_both_directions_and_corruption_stays_in_the_ipv4_header() {
        let mut faults = WireFaults::new(FaultConfig {
            drop: 50,
            seed: 5,
            ..FaultConfig::default()
        });
        let got = receive(&mut faults, 1..=40);
        let received_drops = faults.counts().dropped;
        assert_eq!(got.len() as u64, 40 - received_drops);
        assert!(received_drops > 0);
        let sent = (0..40).filter(|_| faults.on_tx(&mut [1; 60])).count() as u64;
        assert!(
            faults.counts().dropped > received_drops,
            "sent frames are dropped too"
        );
        assert_eq!(sent, 40 - (faults.counts().dropped - received_drops));

        let mut faults = WireFaults::new(FaultConfig {
            corrupt: 100,
            seed: 9,
            ..FaultConfig::default()
        });
        let mut frame = [0u8; 60];
        assert!(faults.on_tx(&mut frame));
        let flipped: Vec<usize> = (0..60).filter(|i| frame[*i] != 0).collect();
        assert!(flipped.len() == 1 && (14..34).contains(&flipped[0]));
        assert_eq!(faults.counts().corrupted, 1);
    }
}
