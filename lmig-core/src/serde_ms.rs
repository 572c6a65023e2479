//! `serde` helpers (feature `serde`): a [`Duration`] as milliseconds, an
//! `f64`, for `#[serde(with = "lmig_core::serde_ms")]` (and
//! [`option`] for `Option<Duration>`). lmig's reports serialise every
//! duration this way, in a field whose name ends in `_ms`; an `Instant` is
//! never serialised (it means nothing outside the process), a duration
//! from the session's start is.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Serialise `d` as milliseconds (`f64`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Read milliseconds (`f64`, not negative, finite) back into a `Duration`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ms = f64::deserialize(d)?;
    Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom)
}

/// Serialise named steps (`SourceReport::freeze_steps`) as `[[name, ms], …]`.
pub fn steps<S: Serializer>(steps: &[(&'static str, Duration)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(steps.len()))?;
    for (name, d) in steps {
        seq.serialize_element(&(name, d.as_secs_f64() * 1e3))?;
    }
    seq.end()
}

/// The same for `Option<Duration>` (`null` for `None`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialise `d` as milliseconds (`f64`) or `null`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Read milliseconds or `null` back.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|ms| Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(with = "super")]
        d: Duration,
        #[serde(with = "super::option")]
        o: Option<Duration>,
    }

    #[test]
    fn milliseconds_both_ways_and_negative_is_an_error() {
        let t = T {
            d: Duration::from_micros(1500),
            o: None,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"d":1.5,"o":null}"#);
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), t);
        assert!(serde_json::from_str::<T>(r#"{"d":-1.0,"o":null}"#).is_err());
        let t = T {
            d: Duration::ZERO,
            o: Some(Duration::from_millis(7)),
        };
        let back: T = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
