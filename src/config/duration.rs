//! Human-readable durations in config ("5s", "250ms", "2m"), and the serde glue for them.
//!
//! A timeout is `Option<Duration>`: absent or `"0"`/`"off"` means no timeout. Owns parsing only.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses "5s", "250ms", "1m 30s"; "0" and "off" mean `None` (no timeout).
pub fn parse_timeout(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t == "0" || t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: \"5s\", \"250ms\", \"off\")"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is longer than {} (use \"off\" for no bound)",
            fmt_duration(MAX_DURATION)
        ));
    }
    Ok(if d.is_zero() { None } else { Some(d) })
}

/// The longest bound accepted: deadlines are computed as now + duration, which must not
/// overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// serde adapter for `Option<Duration>` fields written as strings.
pub fn de_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Duration>>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    match raw {
        None => Ok(None),
        Some(s) => parse_timeout(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Formats a duration the way config files write it, for messages ("5s", "250ms").
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_timeout("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("off").unwrap(), None);
        assert_eq!(parse_timeout("0").unwrap(), None);
        assert!(parse_timeout("five").is_err());
        assert!(parse_timeout("365days").is_ok());
        assert!(parse_timeout("1000years").is_err());
    }
}
