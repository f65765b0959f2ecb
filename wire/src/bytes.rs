//! Little-endian field access shared by the frame views.
//!
//! Offsets come from each view's `field` module; the views check buffer lengths in
//! `new_checked`, so these helpers index directly (and panic only on an unchecked view over a
//! buffer that is too short, as documented on each `new_unchecked`).

fn array<const N: usize>(buffer: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buffer[at..at + N]);
    out
}

pub(crate) fn u16_at(buffer: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(buffer, at))
}

pub(crate) fn u32_at(buffer: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(buffer, at))
}

pub(crate) fn u64_at(buffer: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(buffer, at))
}

pub(crate) fn magic_at(buffer: &[u8], at: usize) -> [u8; 4] {
    array(buffer, at)
}

pub(crate) fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) {
    buffer[at..at + bytes.len()].copy_from_slice(bytes);
}

pub(crate) fn set_u16(buffer: &mut [u8], at: usize, value: u16) {
    put(buffer, at, &value.to_le_bytes());
}

pub(crate) fn set_u32(buffer: &mut [u8], at: usize, value: u32) {
    put(buffer, at, &value.to_le_bytes());
}

pub(crate) fn set_u64(buffer: &mut [u8], at: usize, value: u64) {
    put(buffer, at, &value.to_le_bytes());
}

/// The first non-zero byte of `buffer[range]` as `(offset, value)`, if any.
pub(crate) fn first_non_zero(buffer: &[u8], range: core::ops::Range<usize>) -> Option<(usize, u8)> {
    let start = range.start;
    buffer[range]
        .iter()
        .enumerate()
        .find(|(_, byte)| **byte != 0)
        .map(|(index, byte)| (start + index, *byte))
}

/// Encodes an optional position or sequence, `None` as `u64::MAX`.
pub(crate) fn encode_optional(value: Option<u64>) -> u64 {
    value.unwrap_or(u64::MAX)
}

/// Decodes an optional position or sequence, `u64::MAX` as `None`.
pub(crate) fn decode_optional(raw: u64) -> Option<u64> {
    (raw != u64::MAX).then_some(raw)
}
