//! Wall-clock times in `/status`: RFC 3339 in UTC to the second
//! (`2026-11-30T12:30:21Z`), which people and `jq` both read.

use std::{
    fmt,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// Seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(i64);

impl Stamp {
    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// Seconds from `self` to `later` (0 if `later` is earlier).
    pub fn seconds_until(self, later: Stamp) -> u64 {
        u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0)
    }
}

impl From<SystemTime> for Stamp {
    fn from(t: SystemTime) -> Self {
        Stamp(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        })
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = OffsetDateTime::from_unix_timestamp(self.0).map_err(|_| fmt::Error)?;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a time like 2026-11-30T12:30:21Z")]
pub struct BadStamp(String);

impl FromStr for Stamp {
    type Err = BadStamp;

    /// Exactly the form [`Stamp`] displays.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadStamp(s.to_string());
        let b = s.as_bytes();
        let shape_ok = b.len() == 20
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            });
        if !shape_ok {
            return Err(bad());
        }
        let num = |from: usize, to: usize| s[from..to].parse::<u16>().map_err(|_| bad());
        let month =
            Month::try_from(u8::try_from(num(5, 7)?).map_err(|_| bad())?).map_err(|_| bad())?;
        let date = Date::from_calendar_date(i32::from(num(0, 4)?), month, num(8, 10)? as u8)
            .map_err(|_| bad())?;
        let time = Time::from_hms(num(11, 13)? as u8, num(14, 16)? as u8, num(17, 19)? as u8)
            .map_err(|_| bad())?;
        Ok(Stamp(
            PrimitiveDateTime::new(date, time)
                .assume_utc()
                .unix_timestamp(),
        ))
    }
}

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Stamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn round_trips_through_rfc3339() {
        let t = Stamp::from(UNIX_EPOCH + Duration::from_secs(1_796_041_821));
        assert_eq!(t.to_string(), "2026-11-30T12:30:21Z");
        assert_eq!("2026-11-30T12:30:21Z".parse::<Stamp>().unwrap(), t);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-30T12:30:21Z\"");
        assert_eq!(serde_json::from_str::<Stamp>(&json).unwrap(), t);
        assert_eq!(Stamp(0).to_string(), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "2026-12-01 12:30:21Z",
            "2026-13-01T12:30:21Z",
            "2026-02-30T12:30:21Z",
            "2026-12-01T24:30:21Z",
            "2026-12-01T12:30:21+01:00",
            "２026-12-01T12:30:21Z",
        ] {
            assert!(bad.parse::<Stamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_until_never_goes_negative() {
        assert_eq!(Stamp(10).seconds_until(Stamp(25)), 15);
        assert_eq!(Stamp(25).seconds_until(Stamp(10)), 0);
    }
}
