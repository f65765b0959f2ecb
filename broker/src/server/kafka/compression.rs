//! The codecs of compressed record batches (attributes bits 0-2: 1 gzip, 2 snappy, 3 lz4,
//! 4 zstd), decompressed with a bound: a few bytes must not expand without limit (a
//! decompression bomb). The log stores a compressed batch as the producer compressed it;
//! its records are decompressed only to check them as they arrive and to hand their values
//! to our own subscribers.
//!
//! Kafka's framing of each: gzip, a gzip stream; snappy, xerial's framing (a 16-byte header,
//! then blocks each with a 4-byte big-endian length) as the Java client writes it, or one
//! raw snappy block as other clients do; lz4, an LZ4 frame; zstd, a zstd frame.

use std::io::Read;

/// The most bytes the records of one produced partition may decompress to (in all its
/// batches).
pub const DECOMPRESSED_BYTES_MAX: usize = 16 << 20;

/// The magic bytes that begin xerial's snappy framing.
const XERIAL_MAGIC: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
/// xerial's header: the magic, a version and a compatible version (4 bytes each).
const XERIAL_HEADER_BYTES: usize = 16;

/// Why compressed records cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    /// A codec number Kafka does not define.
    #[error("compression codec {0} is not one of Kafka's (1 gzip, 2 snappy, 3 lz4, 4 zstd)")]
    UnknownCodec(u8),
    /// The bytes are not what the codec writes.
    #[error("the {codec} data does not decompress: {detail}")]
    Corrupt {
        /// The codec.
        codec: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// More than the bound.
    #[error("the records decompress to more than {limit} bytes")]
    TooLarge {
        /// The bound.
        limit: usize,
    },
}

/// The codec's name.
pub fn codec_name(codec: u8) -> &'static str {
    match codec {
        0 => "none",
        1 => "gzip",
        2 => "snappy",
        3 => "lz4",
        4 => "zstd",
        _ => "unknown",
    }
}

/// Decompresses `data`, compressed with Kafka codec `codec`, into at most `limit` bytes.
pub fn decompress(codec: u8, data: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    match codec {
        1 => read_bounded("gzip", flate2::read::MultiGzDecoder::new(data), limit),
        2 => snappy(data, limit),
        3 => read_bounded("lz4", lz4_flex::frame::FrameDecoder::new(data), limit),
        4 => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| {
                DecompressError::Corrupt {
                    codec: "zstd",
                    detail: e.to_string(),
                }
            })?;
            read_bounded("zstd", decoder, limit)
        }
        other => Err(DecompressError::UnknownCodec(other)),
    }
}

fn read_bounded(
    codec: &'static str,
    reader: impl Read,
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::Corrupt {
            codec,
            detail: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    Ok(out)
}

fn snappy(data: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |detail: String| DecompressError::Corrupt {
        codec: "snappy",
        detail,
    };
    let mut out = Vec::new();
    let block = |block: &[u8], out: &mut Vec<u8>| -> Result<(), DecompressError> {
        let len = snap::raw::decompress_len(block).map_err(|e| corrupt(e.to_string()))?;
        if out.len() + len > limit {
            return Err(DecompressError::TooLarge { limit });
        }
        let start = out.len();
        out.resize(start + len, 0);
        let written = snap::raw::Decoder::new()
            .decompress(block, &mut out[start..])
            .map_err(|e| corrupt(e.to_string()))?;
        out.truncate(start + written);
        Ok(())
    };
    if !data.starts_with(&XERIAL_MAGIC) {
        block(data, &mut out)?;
        return Ok(out);
    }
    let mut rest = data
        .get(XERIAL_HEADER_BYTES..)
        .ok_or_else(|| corrupt("xerial header cut off".into()))?;
    while !rest.is_empty() {
        let (length, after) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("xerial block length cut off".into()))?;
        let length = u32::from_be_bytes(*length) as usize;
        let (compressed, after) = after
            .split_at_checked(length)
            .ok_or_else(|| corrupt("xerial block cut off".into()))?;
        block(compressed, &mut out)?;
        rest = after;
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write;

    use super::*;

    /// `data` compressed as a Kafka client would with `codec`.
    pub(crate) fn compress(codec: u8, data: &[u8]) -> Vec<u8> {
        match codec {
            1 => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            2 => snap::raw::Encoder::new().compress_vec(data).unwrap(),
            3 => {
                let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            4 => {
                ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
            }
            _ => unreachable!("a test codec"),
        }
    }

    fn xerial(blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = XERIAL_MAGIC.to_vec();
        out.extend_from_slice(&1i32.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
        for block in blocks {
            let compressed = snap::raw::Encoder::new().compress_vec(block).unwrap();
            out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    #[test]
    fn every_codec_reads_back_what_it_wrote() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for codec in 1..=4 {
            let compressed = compress(codec, &data);
            assert_eq!(
                decompress(codec, &compressed, data.len()),
                Ok(data.clone()),
                "{codec}"
            );
            assert_eq!(
                decompress(codec, &compressed, data.len() - 1),
                Err(DecompressError::TooLarge {
                    limit: data.len() - 1
                }),
                "codec {codec} stops at its bound"
            );
        }
        assert_eq!(
            decompress(2, &xerial(&[&data[..1000], &data[1000..]]), data.len()),
            Ok(data.clone())
        );
        assert_eq!(
            decompress(5, &data, 10),
            Err(DecompressError::UnknownCodec(5))
        );
    }

    #[test]
    fn a_bomb_stops_at_the_bound_and_garbage_is_an_error() {
        let zeros = vec![0u8; 64 << 20];
        for codec in 1..=4 {
            let bomb = compress(codec, &zeros);
            assert!(bomb.len() < 4 << 20, "codec {codec}: {} bytes", bomb.len());
            assert_eq!(
                decompress(codec, &bomb, 1 << 20),
                Err(DecompressError::TooLarge { limit: 1 << 20 })
            );
            let garbage: Vec<u8> = (0..500u32).map(|i| (i * 37 % 256) as u8).collect();
            assert!(matches!(
                decompress(codec, &garbage, 1 << 20),
                Err(DecompressError::Corrupt { .. } | DecompressError::TooLarge { .. })
            ));
        }
    }
}
