//! Typed units for the configuration: byte sizes (`"32MiB"`, `1048576`) and durations
//! (`"250ms"`, `"30s"`, `"5m"`), parsed with `bytesize` and `humantime`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A number of bytes, written in TOML as a plain integer or a string with a unit
/// (`B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

/// Formats a byte count in binary units (`512 B`, `1.5 KiB`, `32 MiB`), for humans.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if (value - value.round()).abs() < 0.05 {
        format!("{:.0} {}", value, UNITS[unit])
    } else {
        format!("{:.1} {}", value, UNITS[unit])
    }
}

/// A byte count in both forms, binary units and exact bytes: `1 MiB (1,048,576 bytes)`;
/// `512 bytes` when the two would say the same.
pub fn both_forms(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    format!("{} ({} bytes)", human_bytes(bytes), thousands(bytes))
}

/// `1048576` → `1,048,576`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether a size as written uses a decimal unit (`"1MB"`, `"100 kb"`): 1000-based, where
/// nginx (`1m`), Express (`'1mb'`) and Flask (`1 * 1024 * 1024`) count 1024-based.
pub fn decimal_unit(written: &str) -> Option<&'static str> {
    let unit: String = written
        .trim()
        .trim_matches('"')
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
        .to_ascii_lowercase();
    match unit.as_str() {
        "kb" | "k" => Some("KiB"),
        "mb" | "m" => Some("MiB"),
        "gb" | "g" => Some("GiB"),
        "tb" | "t" => Some("TiB"),
        _ => None,
    }
}

/// Parses a byte size string such as `"32MiB"`, `"1.5 KB"` or `"1024"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('-') {
        return Err(format!("invalid size {text:?}"));
    }
    trimmed
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("invalid size {text:?}"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"32MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::custom(format!(
                        "expected a size like \"32MiB\", found {v}: sizes cannot be negative"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(|_| {
                    E::custom(format!(
                        "expected a size like \"32MiB\" (a number and B, KB, KiB, MB, MiB, GB or GiB), found {v:?}"
                    ))
                })
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration, written in TOML as a string such as `"250ms"`, `"30s"` or `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl Visitor<'_> for DurVisitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"250ms\", \"30s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v.trim()).map(Dur).map_err(|_| {
                    E::custom(format!(
                        "expected a duration like \"250ms\", \"30s\" or \"5m\" (ms, s, m, h, d), found {v:?}"
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "expected a duration with a unit, like \"{v}s\", found {v}"
                )))
            }
        }
        deserializer.deserialize_any(DurVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("32MiB"), Ok(32 * 1024 * 1024));
        assert_eq!(parse_size("1 KB"), Ok(1000));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("17"), Ok(17));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("-1MiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn both_forms_and_decimal_units() {
        assert_eq!(both_forms(1024 * 1024), "1 MiB (1,048,576 bytes)");
        assert_eq!(both_forms(1_000_000), "976.6 KiB (1,000,000 bytes)");
        assert_eq!(both_forms(512), "512 bytes");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(decimal_unit("\"1MB\""), Some("MiB"));
        assert_eq!(decimal_unit("1.5 kb"), Some("KiB"));
        assert_eq!(decimal_unit("1MiB"), None);
        assert_eq!(decimal_unit("1048576"), None);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1024 * 1024), "1 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
