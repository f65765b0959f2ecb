//! Byte sizes as operators write them, parsed one way by every binary, config file and
//! script of the project.
//!
//! A size is a number of bytes, optionally followed by a unit, in any case, with optional
//! spaces between number and unit:
//!
//! | unit | bytes |
//! | --- | --- |
//! | none, `B` | 1 |
//! | `K`, `KiB` / `M`, `MiB` / `G`, `GiB` / `T`, `TiB` | 2^10 / 2^20 / 2^30 / 2^40 |
//! | `KB` / `MB` / `GB` / `TB` | 10^3 / 10^6 / 10^9 / 10^12 |
//!
//! A bare `K`, `M`, `G` or `T` is binary because that is what the kernel (`/proc/mounts`,
//! hugepage sizes) and tools such as `dd` mean by it; decimal sizes spell the `B` out
//! (`100MB`). A decimal fraction is accepted when it comes to whole bytes (`1.5G`, `0.5K`).

use std::fmt;

/// The accepted forms, for the paragraph of a `--help` text that explains `SIZE`.
pub const SIZE_HELP: &str = "SIZE is a number of bytes, optionally with a unit (any case): K, \
M, G, T and KiB, MiB, GiB, TiB are binary (1G = 1GiB = 2^30 bytes); KB, MB, GB, TB are \
decimal (1GB = 10^9 bytes); a decimal fraction is accepted when it comes to whole bytes \
(1.5G).";

/// The accepted forms, short, for error messages.
const FORMS: &str = "give a number of bytes with an optional unit: K, M, G, T or KiB, MiB, \
GiB, TiB (binary, 1G = 2^30), KB, MB, GB, TB (decimal, 1GB = 10^9), e.g. 4096, 64K, 1.5G, \
100MB";

/// Digits accepted after the decimal point (trailing zeros not counted): more than any
/// size written by hand needs, few enough for exact integer arithmetic.
const FRACTION_DIGITS_MAX: usize = 18;

/// The units, lower case, and their bytes.
const UNITS: [(&str, u64); 14] = [
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

/// Why a text is not a size. Each message quotes the text and names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseBytesError {
    /// Nothing, or only whitespace.
    Empty,
    /// The number is not digits with at most one decimal point between digits.
    NotANumber { text: String },
    /// A unit that is not in the table above.
    UnknownUnit { text: String, unit: String },
    /// More digits after the decimal point than [`FRACTION_DIGITS_MAX`].
    TooManyDecimals { text: String },
    /// A fraction that does not come to whole bytes (`1.5`, `0.1K`).
    NotWholeBytes { text: String },
    /// More bytes than the setting holds (`max`: 2^64 - 1, or less for a narrower type).
    TooLarge { text: String, max: u64 },
}

impl fmt::Display for ParseBytesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseBytesError::Empty => write!(f, "an empty size: {FORMS}"),
            ParseBytesError::NotANumber { text } => write!(f, "{text:?} is not a size: {FORMS}"),
            ParseBytesError::UnknownUnit { text, unit } => {
                write!(f, "{text:?} has the unknown unit {unit:?}: {FORMS}")
            }
            ParseBytesError::TooManyDecimals { text } => write!(
                f,
                "{text:?} has more than {FRACTION_DIGITS_MAX} decimal places: use a smaller \
                 unit or round it"
            ),
            ParseBytesError::NotWholeBytes { text } => write!(
                f,
                "{text:?} is not a whole number of bytes: round it, or use a smaller unit"
            ),
            ParseBytesError::TooLarge { text, max } => {
                write!(
                    f,
                    "{text:?} is more than {max} bytes, the most this setting holds"
                )
            }
        }
    }
}

impl std::error::Error for ParseBytesError {}

/// Integer types a byte count is kept in, with the largest value each holds.
pub trait ByteCount: TryFrom<u64> {
    /// The largest byte count the type holds.
    const MAX_BYTES: u64;
}

impl ByteCount for u64 {
    const MAX_BYTES: u64 = u64::MAX;
}

impl ByteCount for u32 {
    const MAX_BYTES: u64 = u32::MAX as u64;
}

impl ByteCount for usize {
    const MAX_BYTES: u64 = usize::MAX as u64;
}

/// Parses a size (see the crate documentation) into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, ParseBytesError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ParseBytesError::Empty);
    }
    let not_a_number = || ParseBytesError::NotANumber {
        text: trimmed.to_owned(),
    };
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    if number.is_empty() {
        return Err(not_a_number());
    }
    let unit = unit.trim_start();
    let unit_bytes = UNITS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(unit))
        .map(|&(_, bytes)| bytes)
        .ok_or_else(|| ParseBytesError::UnknownUnit {
            text: trimmed.to_owned(),
            unit: unit.to_owned(),
        })?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let is_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !is_digits(whole) || (number.contains('.') && !is_digits(fraction)) {
        return Err(not_a_number());
    }
    let too_large = || ParseBytesError::TooLarge {
        text: trimmed.to_owned(),
        max: u64::MAX,
    };
    // Only digits remain, so parsing fails only by overflow.
    let whole_bytes = whole
        .parse::<u64>()
        .ok()
        .and_then(|whole| whole.checked_mul(unit_bytes))
        .ok_or_else(too_large)?;
    let fraction_bytes = fraction_bytes(fraction.trim_end_matches('0'), unit_bytes, trimmed)?;
    whole_bytes
        .checked_add(fraction_bytes)
        .ok_or_else(too_large)
}

/// The bytes of `.digits` of a unit of `unit_bytes` (`digits` without trailing zeros).
fn fraction_bytes(digits: &str, unit_bytes: u64, text: &str) -> Result<u64, ParseBytesError> {
    if digits.is_empty() {
        return Ok(0);
    }
    if digits.len() > FRACTION_DIGITS_MAX {
        return Err(ParseBytesError::TooManyDecimals {
            text: text.to_owned(),
        });
    }
    let numerator = digits
        .parse::<u128>()
        .map_err(|_| ParseBytesError::NotANumber {
            text: text.to_owned(),
        })?
        * u128::from(unit_bytes);
    let denominator = 10u128.pow(digits.len() as u32);
    if numerator % denominator != 0 {
        return Err(ParseBytesError::NotWholeBytes {
            text: text.to_owned(),
        });
    }
    // Below one unit, so it fits.
    Ok((numerator / denominator) as u64)
}

/// Parses a size into the integer type a setting keeps it in; more bytes than `T` holds is
/// [`ParseBytesError::TooLarge`].
pub fn parse_bytes_as<T: ByteCount>(text: &str) -> Result<T, ParseBytesError> {
    let bytes = parse_bytes(text)?;
    T::try_from(bytes).map_err(|_| ParseBytesError::TooLarge {
        text: text.trim().to_owned(),
        max: T::MAX_BYTES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("4096B"), Ok(4096));
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn single_letters_are_binary() {
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("2T"), Ok(2 << 40));
    }

    #[test]
    fn iec_units_are_binary() {
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("64MiB"), Ok(1 << 26));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("3TiB"), Ok(3 << 40));
    }

    #[test]
    fn units_with_b_are_decimal() {
        assert_eq!(parse_bytes("200KB"), Ok(200_000));
        assert_eq!(parse_bytes("64MB"), Ok(64_000_000));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("5TB"), Ok(5_000_000_000_000));
    }

    #[test]
    fn case_does_not_matter() {
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("2048k"), Ok(2 << 20));
        assert_eq!(parse_bytes("64kb"), Ok(64_000));
        assert_eq!(parse_bytes("64kib"), Ok(64 << 10));
        assert_eq!(parse_bytes("64MIB"), Ok(64 << 20));
        assert_eq!(parse_bytes("7b"), Ok(7));
    }

    #[test]
    fn whitespace_around_and_before_the_unit_is_ignored() {
        assert_eq!(parse_bytes("  1G\n"), Ok(1 << 30));
        assert_eq!(parse_bytes("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("\t10 MB "), Ok(10_000_000));
        assert_eq!(
            parse_bytes("1 0K"),
            Err(ParseBytesError::UnknownUnit {
                text: "1 0K".into(),
                unit: "0K".into()
            })
        );
    }

    #[test]
    fn fractions_must_come_to_whole_bytes() {
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("0.5K"), Ok(512));
        assert_eq!(parse_bytes("2.000"), Ok(2));
        assert_eq!(parse_bytes("0.25KB"), Ok(250));
        assert_eq!(
            parse_bytes("0.1K"),
            Err(ParseBytesError::NotWholeBytes {
                text: "0.1K".into()
            })
        );
        assert_eq!(
            parse_bytes("1.5"),
            Err(ParseBytesError::NotWholeBytes { text: "1.5".into() })
        );
        assert_eq!(
            parse_bytes("1.0000000000000000001T"),
            Err(ParseBytesError::TooManyDecimals {
                text: "1.0000000000000000001T".into()
            })
        );
    }

    #[test]
    fn overflow_is_too_large() {
        let too_large = |text: &str| ParseBytesError::TooLarge {
            text: text.into(),
            max: u64::MAX,
        };
        assert_eq!(
            parse_bytes("18446744073709551616"),
            Err(too_large("18446744073709551616"))
        );
        assert_eq!(parse_bytes("16777216T"), Err(too_large("16777216T")));
        assert_eq!(parse_bytes("16777215T"), Ok(16_777_215 << 40));
        assert_eq!(
            parse_bytes("99999999999999999999999G"),
            Err(too_large("99999999999999999999999G"))
        );
        assert_eq!(
            parse_bytes("16777215.9999999999T"),
            Err(ParseBytesError::NotWholeBytes {
                text: "16777215.9999999999T".into()
            })
        );
        assert_eq!(
            parse_bytes("18446744073709551615.5K"),
            Err(too_large("18446744073709551615.5K"))
        );
    }

    #[test]
    fn narrower_types_refuse_what_they_cannot_hold() {
        assert_eq!(
            parse_bytes_as::<u32>("4G"),
            Err(ParseBytesError::TooLarge {
                text: "4G".into(),
                max: u64::from(u32::MAX)
            })
        );
        assert_eq!(parse_bytes_as::<u32>(" 4095M "), Ok(4095 << 20));
        assert_eq!(parse_bytes_as::<usize>("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes_as::<u64>("1T"), Ok(1 << 40));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_bytes(""), Err(ParseBytesError::Empty));
        assert_eq!(parse_bytes("   "), Err(ParseBytesError::Empty));
        for text in ["G", "KiB", ".5G", "1.G", "1..5G", "1.2.3", "-1", "+5"] {
            assert!(
                parse_bytes(text) == Err(ParseBytesError::NotANumber { text: text.into() }),
                "{text:?} gave {:?}",
                parse_bytes(text)
            );
        }
        assert_eq!(
            parse_bytes("12X"),
            Err(ParseBytesError::UnknownUnit {
                text: "12X".into(),
                unit: "X".into()
            })
        );
        assert_eq!(
            parse_bytes("3Gi"),
            Err(ParseBytesError::UnknownUnit {
                text: "3Gi".into(),
                unit: "Gi".into()
            })
        );
    }

    #[test]
    fn messages_name_the_accepted_forms() {
        for text in ["", "G", "12X"] {
            let message = parse_bytes(text).unwrap_err().to_string();
            for form in ["KiB", "KB", "2^30", "10^9"] {
                assert!(message.contains(form), "{message:?} lacks {form}");
            }
        }
    }
}
