//! Validation inside serde visitors: an error raised while the scalar is being read carries that
//! scalar's line and column (an error raised after deserializing would point at its parent).

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{self, Visitor};

struct StrCheck<T> {
    check: fn(&str) -> Result<T, String>,
    expecting: &'static str,
}

impl<T> Visitor<'_> for StrCheck<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(v).map_err(E::custom)
    }
}

/// A string scalar, checked (or converted) by `check`.
pub fn string<'de, D: Deserializer<'de>, T>(
    d: D,
    check: fn(&str) -> Result<T, String>,
    expecting: &'static str,
) -> Result<T, D::Error> {
    d.deserialize_str(StrCheck { check, expecting })
}

struct IntCheck<T> {
    check: fn(i128) -> Result<T, String>,
    expecting: &'static str,
    _t: PhantomData<T>,
}

impl<T> Visitor<'_> for IntCheck<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.check)(v.into()).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.check)(v.into()).map_err(E::custom)
    }
}

/// An integer scalar, checked (or converted) by `check`.
pub fn integer<'de, D: Deserializer<'de>, T>(
    d: D,
    check: fn(i128) -> Result<T, String>,
    expecting: &'static str,
) -> Result<T, D::Error> {
    d.deserialize_i64(IntCheck {
        check,
        expecting,
        _t: PhantomData,
    })
}
