//! Go-compatible durations and human sizes, as flyctl reads them: `time.ParseDuration` /
//! `Duration.String()` and docker's `go-units` (`RAMInBytes` binary, `FromHumanSize`
//! decimal), with flyctl's rule that a bare number is already in the target unit.

use std::time::Duration;

/// Parses a Go duration string such as `"5s"`, `"1m30s"`, `"300ms"`, `"1.5h"`.
/// Negative durations are refused: no fly.toml field means anything by them.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.starts_with('-') {
        return Err(format!("negative duration {text:?}"));
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("invalid duration {text:?}"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("missing unit in duration {text:?}")),
            other => return Err(format!("unknown unit {other:?} in duration {text:?}")),
        };
        total_nanos += number * scale;
    }
    if total_nanos > u64::MAX as f64 {
        return Err(format!("duration {text:?} is too long"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Formats like Go's `time.Duration.String()`: `"10s"`, `"1m0s"`, `"1.5s"`, `"300ms"`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (unit, div) = if nanos < 1_000 {
            ("ns", 1u128)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", fraction(nanos, div));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let sec_nanos = nanos % 60_000_000_000;
    let seconds = format!("{}s", fraction(sec_nanos, 1_000_000_000));
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}")
    } else {
        seconds
    }
}

fn fraction(value: u128, div: u128) -> String {
    let whole = value / div;
    let frac = value % div;
    if frac == 0 {
        return whole.to_string();
    }
    let width = div.to_string().len() - 1;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Which multiplier table a size uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeUnits {
    /// 1k = 1024 (docker `RAMInBytes`), used for guest memory.
    Binary,
    /// 1k = 1000 (docker `FromHumanSize`), used for volume sizes.
    Decimal,
}

/// flyctl's `helpers.ParseSize`: a bare integer is already in `quotient` units; anything
/// else is parsed as a human size in bytes and divided (rounding down) by `quotient`.
pub fn parse_size(text: &str, units: SizeUnits, quotient: u64) -> Result<u64, String> {
    if let Ok(n) = text.parse::<i64>() {
        if n < 0 {
            return Err(format!("invalid size {text:?}: negative"));
        }
        return Ok(n as u64);
    }
    Ok(human_size_bytes(text, units)? / quotient)
}

fn human_size_bytes(text: &str, units: SizeUnits) -> Result<u64, String> {
    let Some(sep) = text.rfind(|c: char| c.is_ascii_digit() || c == '.' || c == ' ') else {
        return Err(format!("invalid size {text:?}"));
    };
    let (num, suffix) = if text.as_bytes()[sep] == b' ' {
        (&text[..sep], &text[sep + 1..])
    } else {
        (&text[..=sep], &text[sep + 1..])
    };
    let number: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {text:?}"))?;
    if number < 0.0 {
        return Err(format!("invalid size {text:?}"));
    }
    if suffix.is_empty() {
        return Ok(number as u64);
    }
    let bad = || format!("invalid size {text:?}: unknown suffix {suffix:?}");
    let lower = suffix.to_ascii_lowercase();
    if lower.len() > 3 {
        return Err(bad());
    }
    if lower == "b" {
        return Ok(number as u64);
    }
    let base: f64 = match units {
        SizeUnits::Binary => 1024.0,
        SizeUnits::Decimal => 1000.0,
    };
    let power = match lower.as_bytes()[0] {
        b'k' => 1,
        b'm' => 2,
        b'g' => 3,
        b't' => 4,
        b'p' => 5,
        _ => return Err(bad()),
    };
    match lower.len() {
        2 if &lower[1..] != "b" => return Err(bad()),
        3 if &lower[1..] != "ib" => return Err(bad()),
        _ => {}
    }
    Ok((number * base.powi(power)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_round_trip() {
        for (input, want) in [
            ("5s", "5s"),
            ("3m", "3m0s"),
            ("1m21s", "1m21s"),
            ("1.5s", "1.5s"),
            ("300ms", "300ms"),
            ("1h", "1h0m0s"),
            ("90s", "1m30s"),
            ("0", "0s"),
        ] {
            let d = parse_go_duration(input).unwrap();
            assert_eq!(format_go_duration(d), want, "{input}");
        }
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("five seconds").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("10x").is_err());
    }

    #[test]
    fn sizes_follow_go_units() {
        let mib = 1024 * 1024;
        assert_eq!(parse_size("512", SizeUnits::Binary, mib).unwrap(), 512);
        assert_eq!(parse_size("1gb", SizeUnits::Binary, mib).unwrap(), 1024);
        assert_eq!(parse_size("4G", SizeUnits::Binary, mib).unwrap(), 4096);
        assert_eq!(parse_size("8g", SizeUnits::Binary, mib).unwrap(), 8192);
        assert_eq!(parse_size("2GiB", SizeUnits::Binary, mib).unwrap(), 2048);
        assert!(parse_size("lots", SizeUnits::Binary, mib).is_err());
        assert!(parse_size("1gigs", SizeUnits::Binary, mib).is_err());
        let gb = 1_000_000_000;
        assert_eq!(parse_size("30gb", SizeUnits::Decimal, gb).unwrap(), 30);
        assert_eq!(parse_size("15Mb", SizeUnits::Decimal, gb).unwrap(), 0);
        assert_eq!(parse_size("200", SizeUnits::Decimal, gb).unwrap(), 200);
    }
}
