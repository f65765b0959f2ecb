//! The input formats of the fuzz targets in `fuzz/fuzz_targets`, shared by the targets (which
//! decode them) and by `write-seeds` (which writes valid inputs as seed corpora). This crate
//! is built without coverage instrumentation, so the seed writer needs no libFuzzer.
//!
//! | target          | input |
//! |-----------------|-------|
//! | `frame_decoder` | [`Prefixed`]: `chunk_seed:u8 config:u8` then a frame stream |
//! | `hello`, `control`, `ack` | a frame body |
//! | `batch`         | a 32-byte batch header then the payload |
//! | `delivery`      | a 48-byte delivery header then the payload |
//! | `connection`    | [`ConnectionInput`]: `chunk_seed:u8 config:u8` then up to [`CONNECTIONS_MAX`] client streams, each `len:u16 LE` then `len` bytes |

/// Client connections a `connection` input opens at most.
pub const CONNECTIONS_MAX: usize = 4;

/// `connection` config bit: before feeding a stream, set each Batch frame's `body_bytes` and
/// CRC-32C to match the payload that follows it (see [`repair_batches`]), so that mutated
/// payloads reach the checks behind the checksum.
pub const REPAIR_BATCHES: u8 = 1;

/// A small deterministic generator (xorshift64*) seeded from one input byte: it draws chunk
/// sizes and clock steps, so one input always runs the same way.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; every seed gives a different, non-zero state.
    pub fn new(seed: u8) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(seed) << 17 | u64::from(seed)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A chunk length in `1..=max`: mostly tiny (a byte at a time splits every field), often
    /// a few dozen bytes, sometimes all of `max`.
    pub fn chunk_len(&mut self, max: usize) -> usize {
        let max = max.max(1);
        let len = match self.below(8) {
            0..=2 => 1 + self.below(4) as usize,
            3..=5 => 1 + self.below(64) as usize,
            6 => 1 + self.below(4096) as usize,
            _ => max,
        };
        len.min(max)
    }
}

/// An input that starts with a chunking seed and a config byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixed<'a> {
    /// Seed of the [`Rng`] that cuts the rest into chunks.
    pub chunk_seed: u8,
    /// Target-specific settings.
    pub config: u8,
    /// The rest of the input.
    pub rest: &'a [u8],
}

impl<'a> Prefixed<'a> {
    /// Splits off the two prefix bytes; `None` when the input is shorter.
    pub fn parse(data: &'a [u8]) -> Option<Prefixed<'a>> {
        match data {
            [chunk_seed, config, rest @ ..] => Some(Prefixed {
                chunk_seed: *chunk_seed,
                config: *config,
                rest,
            }),
            _ => None,
        }
    }

    /// The input bytes.
    pub fn encode(chunk_seed: u8, config: u8, rest: &[u8]) -> Vec<u8> {
        let mut out = vec![chunk_seed, config];
        out.extend_from_slice(rest);
        out
    }
}

/// A `connection` input: the byte streams of up to [`CONNECTIONS_MAX`] clients of one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInput<'a> {
    /// Seed of the [`Rng`] that cuts the streams into chunks and advances the clock.
    pub chunk_seed: u8,
    /// Broker and pool settings; bit 0 is [`REPAIR_BATCHES`], the others are the target's.
    pub config: u8,
    /// What each client sends, in connection order.
    pub streams: Vec<&'a [u8]>,
}

impl<'a> ConnectionInput<'a> {
    /// Decodes an input; the last stream takes what is left when its length overruns the
    /// input. `None` when the input is shorter than its prefix.
    pub fn parse(data: &'a [u8]) -> Option<ConnectionInput<'a>> {
        let prefixed = Prefixed::parse(data)?;
        let mut rest = prefixed.rest;
        let mut streams = Vec::new();
        while streams.len() < CONNECTIONS_MAX {
            let Some((len, after)) = rest.split_first_chunk::<2>() else {
                break;
            };
            let len = usize::from(u16::from_le_bytes(*len)).min(after.len());
            let (stream, after) = after.split_at(len);
            streams.push(stream);
            rest = after;
        }
        Some(ConnectionInput {
            chunk_seed: prefixed.chunk_seed,
            config: prefixed.config,
            streams,
        })
    }

    /// Encodes an input.
    ///
    /// # Panics
    /// With more than [`CONNECTIONS_MAX`] streams, or a stream longer than `u16::MAX` bytes.
    pub fn encode(chunk_seed: u8, config: u8, streams: &[Vec<u8>]) -> Vec<u8> {
        assert!(streams.len() <= CONNECTIONS_MAX, "too many streams");
        let mut out = vec![chunk_seed, config];
        for stream in streams {
            let len = u16::try_from(stream.len()).expect("stream longer than u16::MAX bytes");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(stream);
        }
        out
    }
}

/// Walks a client stream frame by frame and makes each Batch frame's `body_bytes` and
/// checksum agree with the payload behind it (cut short where the stream ends). Other frames
/// are skipped by their `body_bytes`; the walk stops at a header it cannot skip.
pub fn repair_batches(stream: &mut [u8]) {
    const KIND_BATCH: u8 = 3;
    let mut at = 0;
    while let Some(header) = stream.get(at..at + wire::FRAME_HEADER_BYTES) {
        let body_bytes = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let body = at + wire::FRAME_HEADER_BYTES;
        if header[0] != KIND_BATCH || stream.len() < body + wire::BATCH_HEADER_BYTES {
            at = body.saturating_add(body_bytes);
            continue;
        }
        let payload = body + wire::BATCH_HEADER_BYTES;
        let announced = u32::from_le_bytes([
            stream[body + 12],
            stream[body + 13],
            stream[body + 14],
            stream[body + 15],
        ]) as usize;
        let payload_bytes = announced.min(stream.len() - payload);
        let checksum = wire::payload::checksum(&stream[payload..payload + payload_bytes]);
        // `payload_bytes` is at most `announced`, a u32.
        let payload_len = payload_bytes as u32;
        let body_len = payload_len.saturating_add(wire::BATCH_HEADER_BYTES as u32);
        stream[body - 4..body].copy_from_slice(&body_len.to_le_bytes());
        stream[body + 12..body + 16].copy_from_slice(&payload_len.to_le_bytes());
        stream[body + 16..body + 20].copy_from_slice(&checksum.to_le_bytes());
        at = payload + payload_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{BatchHeaderRepr, Frame, Limits};

    fn batch(seq: u64, messages: &[&[u8]]) -> Vec<u8> {
        let mut payload = Vec::new();
        for message in messages {
            wire::payload::push_message(&mut payload, message);
        }
        let header =
            BatchHeaderRepr::for_payload(seq, messages.len() as u32, &payload, &Limits::default())
                .unwrap();
        let mut frame = header.frame_prefix().to_vec();
        frame.extend_from_slice(&payload);
        frame
    }

    #[test]
    fn connection_input_round_trip_and_overrun() {
        let streams = vec![b"abc".to_vec(), Vec::new(), vec![7; 300]];
        let bytes = ConnectionInput::encode(1, 2, &streams);
        let parsed = ConnectionInput::parse(&bytes).unwrap();
        assert_eq!((parsed.chunk_seed, parsed.config), (1, 2));
        assert_eq!(parsed.streams, vec![&b"abc"[..], &[], &[7; 300][..]]);
        let cut = ConnectionInput::parse(&bytes[..bytes.len() - 10]).unwrap();
        assert_eq!(cut.streams[2].len(), 290);
        assert_eq!(ConnectionInput::parse(&[0]), None);
    }

    #[test]
    fn repair_restores_a_valid_batch_and_leaves_others_alone() {
        let good = [batch(0, &[b"hello", b"x"]), Frame::Goodbye.to_bytes()].concat();
        let mut stream = good.clone();
        repair_batches(&mut stream);
        assert_eq!(stream, good, "valid frames are unchanged");
        // A flipped payload byte and a wrong length are repaired.
        stream[8 + 32 + 4] ^= 0xff;
        stream[4] = 200;
        let mut expected = stream.clone();
        expected[4] = good[4];
        let crc = wire::payload::checksum(&stream[40..40 + 14]);
        expected[8 + 16..8 + 20].copy_from_slice(&crc.to_le_bytes());
        repair_batches(&mut stream);
        assert_eq!(stream, expected);
        // A payload cut short by the end of the stream gets the length that is there.
        let mut short = batch(1, &[b"abcdef"]);
        short.truncate(short.len() - 2);
        repair_batches(&mut short);
        assert_eq!(&short[8 + 12..8 + 16], &8u32.to_le_bytes());
        assert_eq!(&short[4..8], &40u32.to_le_bytes());
    }

    #[test]
    fn chunks_stay_within_bounds() {
        let mut rng = Rng::new(9);
        for _ in 0..1000 {
            let len = rng.chunk_len(10);
            assert!((1..=10).contains(&len));
        }
        assert_eq!(Rng::new(0).chunk_len(0), 1);
    }
}
