//! Sizes as scan_scaled(3) reads them and fmt_scaled(3) prints them.

use thiserror::Error;

const UNITS: &[u8] = b"BKMGTPE";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("invalid size")]
    Invalid,
    #[error("size out of range")]
    Range,
}

/// Parses `N[.F][unit]` with a unit of B, K, M, G, T, P or E in any case,
/// each a power of 1024, as scan_scaled(3) does for non-negative numbers.
pub fn parse(text: &str) -> Result<u64, SizeError> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (whole, rest) = text.split_at(digits_end);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            after.split_at(end)
        }
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(SizeError::Invalid);
    }
    let shift = match rest.as_bytes() {
        [] => 0,
        [unit] => {
            let pos = UNITS
                .iter()
                .position(|u| u.eq_ignore_ascii_case(unit))
                .ok_or(SizeError::Invalid)?;
            10 * pos as u32
        }
        _ => return Err(SizeError::Invalid),
    };
    let scale = 1u128 << shift;
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| SizeError::Range)?
    };
    let mut value = whole.checked_mul(scale).ok_or(SizeError::Range)?;
    if !fraction.is_empty() {
        // More than 19 fraction digits cannot change a 64-bit result.
        let digits = &fraction[..fraction.len().min(19)];
        let numerator: u128 = digits.parse().map_err(|_| SizeError::Invalid)?;
        value += numerator * scale / 10u128.pow(digits.len() as u32);
    }
    u64::try_from(value).map_err(|_| SizeError::Range)
}

/// Formats a byte count as fmt_scaled(3): `512M`, `1.0G`, `64.0M`, `0B`.
pub fn format(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes / 1024 >= 1u64 << (10 * unit) {
        unit += 1;
    }
    let factor = 1u64 << (10 * unit);
    let mut number = bytes / factor;
    let mut tenths = if unit == 0 {
        0
    } else {
        (10 * ((bytes % factor) >> (10 * (unit - 1))) + 512) / 1024
    };
    if tenths >= 10 {
        number += 1;
        tenths = 0;
    }
    let suffix = UNITS[unit] as char;
    if number == 0 {
        "0B".to_string()
    } else if unit == 0 || number >= 100 {
        if tenths >= 5 {
            number += 1;
        }
        format!("{number}{suffix}")
    } else {
        format!("{number}.{tenths}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_fractions() {
        assert_eq!(parse("1048576"), Ok(1 << 20));
        assert_eq!(parse("512M"), Ok(512 << 20));
        assert_eq!(parse("512m"), Ok(512 << 20));
        assert_eq!(parse("4.5G"), Ok(9 << 29));
        assert_eq!(parse("1048575K"), Ok(1048575 << 10));
        assert_eq!(parse("10b"), Ok(10));
        assert_eq!(parse(".5K"), Ok(512));
        assert_eq!(parse("1E"), Ok(1 << 60));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse(""), Err(SizeError::Invalid));
        assert_eq!(parse("M"), Err(SizeError::Invalid));
        assert_eq!(parse("12X"), Err(SizeError::Invalid));
        assert_eq!(parse("12MB"), Err(SizeError::Invalid));
        assert_eq!(parse("-1"), Err(SizeError::Invalid));
        assert_eq!(parse("16E"), Err(SizeError::Range));
        assert_eq!(parse("99999999999999999999999"), Err(SizeError::Range));
    }

    #[test]
    fn formats_like_fmt_scaled() {
        assert_eq!(format(0), "0B");
        assert_eq!(format(1000), "1000B");
        assert_eq!(format(512 << 20), "512M");
        assert_eq!(format(1 << 30), "1.0G");
        assert_eq!(format(3 << 29), "1.5G");
        assert_eq!(format(64 << 20), "64.0M");
        assert_eq!(format(1023 << 20), "1023M");
    }
}
