//! Resource quantities as Kubernetes writes them: CPU in cores (`500m`, `0.5`, `2`), memory in
//! bytes with binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`) suffixes.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// CPU in millicores: `500m` = 500, `0.25` = 250, `2` = 2000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cpu(pub u64);

/// Memory in bytes: `128Mi` = 134217728, `1G` = 1000000000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Memory(pub u64);

impl Cpu {
    pub fn parse(s: &str) -> Result<Cpu, String> {
        let bad = || format!("invalid cpu quantity {s:?}: use cores (0.5, 2) or millicores (500m)");
        if let Some(m) = s.strip_suffix('m') {
            let v: u64 = digits(m).ok_or_else(bad)?;
            return nonzero(v, s).map(Cpu);
        }
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            digits(int).ok_or_else(bad)?
        };
        if !frac.is_empty() && digits(frac).is_none() {
            return Err(bad());
        }
        if frac.len() > 3 && frac[3..].bytes().any(|b| b != b'0') {
            return Err(format!(
                "invalid cpu quantity {s:?}: finer than a millicore"
            ));
        }
        let milli_frac: u64 = format!("{:0<3}", &frac[..frac.len().min(3)])
            .parse()
            .map_err(|_| bad())?;
        let v = whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(milli_frac))
            .ok_or_else(|| format!("cpu quantity {s:?} is too large"))?;
        nonzero(v, s).map(Cpu)
    }
}

impl Memory {
    pub fn parse(s: &str) -> Result<Memory, String> {
        const SUFFIXES: [(&str, u64); 10] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("Pi", 1 << 50),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
            ("P", 1_000_000_000_000_000),
        ];
        let (num, mult) = SUFFIXES
            .iter()
            .find_map(|(suffix, mult)| s.strip_suffix(suffix).map(|n| (n, *mult)))
            .unwrap_or((s, 1));
        let v: u64 = digits(num).ok_or_else(|| {
            format!("invalid memory quantity {s:?}: use bytes or a suffix such as 128Mi, 1Gi, 500M")
        })?;
        let bytes = v
            .checked_mul(mult)
            .ok_or_else(|| format!("memory quantity {s:?} is too large"))?;
        nonzero(bytes, s).map(Memory)
    }
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn nonzero(v: u64, s: &str) -> Result<u64, String> {
    if v == 0 {
        Err(format!(
            "quantity {s:?} must be more than zero (leave it out for no limit)"
        ))
    } else {
        Ok(v)
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{suffix}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Accept `500m`, `"0.5"`, `2`, `0.5` (YAML numbers or strings).
struct QuantityVisitor<T>(fn(&str) -> Result<T, String>, &'static str);

impl<T> Visitor<'_> for QuantityVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuantityVisitor(
            Cpu::parse,
            "a cpu quantity such as 500m or 2",
        ))
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuantityVisitor(
            Memory::parse,
            "a memory quantity such as 128Mi",
        ))
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        for (s, m) in [
            ("500m", 500),
            ("0.5", 500),
            (".25", 250),
            ("2", 2000),
            ("1.5", 1500),
            ("0.001", 1),
            ("2.000", 2000),
        ] {
            assert_eq!(Cpu::parse(s), Ok(Cpu(m)), "{s}");
        }
        for s in [
            "", "m", "-1", "0", "0m", "1.0001", "abc", "1.5m", "5 m", "1e3",
        ] {
            assert!(Cpu::parse(s).is_err(), "{s}");
        }
        assert_eq!(Cpu(1500).to_string(), "1500m");
        assert_eq!(Cpu(2000).to_string(), "2");
    }

    #[test]
    fn memory() {
        for (s, b) in [
            ("128Mi", 128 << 20),
            ("1Gi", 1 << 30),
            ("500M", 500_000_000),
            ("1024", 1024),
            ("64k", 64_000),
        ] {
            assert_eq!(Memory::parse(s), Ok(Memory(b)), "{s}");
        }
        for s in [
            "",
            "Mi",
            "-1Mi",
            "0",
            "1.5Gi",
            "12MB",
            "1mi",
            "99999999999Ti",
        ] {
            assert!(Memory::parse(s).is_err(), "{s}");
        }
        assert_eq!(Memory(128 << 20).to_string(), "128Mi");
        assert_eq!(Memory(1000).to_string(), "1000");
    }
}
