//! A small IPv4 prefix type (`10.88.3.0/24`). Kept in-crate rather than pulling in a CIDR crate:
//! the plugin needs parsing, containment and the few well-known addresses of a node subnet.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// An IPv4 network: its address with the host bits cleared, and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The network containing `addr` with `prefix` bits; host bits of `addr` are dropped.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Subnet, Error> {
        if prefix > 32 {
            return Err(Error::InvalidSubnet {
                text: format!("{addr}/{prefix}"),
                reason: "the prefix length must be at most 32".into(),
            });
        }
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// The network address (all host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast address (all host bits one).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// The first usable address: the bridge's (and the containers' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    /// Whether `addr` lies inside this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_subnet(&self, other: &Subnet) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains_subnet(other) || other.contains_subnet(self)
    }

    /// Addresses a container may get: everything but network, gateway and broadcast.
    pub(crate) fn host_range(&self) -> std::ops::RangeInclusive<u32> {
        u32::from(self.network) + 2..=u32::from(self.broadcast()).saturating_sub(1)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = Error;

    /// Parses `a.b.c.d/len`; host bits must be zero so a typo such as `10.88.3.7/24` is caught.
    fn from_str(text: &str) -> Result<Subnet, Error> {
        let invalid = |reason: &str| Error::InvalidSubnet {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| invalid("the /len part is missing"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| invalid("the address part is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| invalid("the prefix length is not a number"))?;
        let subnet = Subnet::new(addr, prefix)?;
        if subnet.network != addr {
            return Err(invalid(&format!(
                "host bits are set (the network is {subnet})"
            )));
        }
        Ok(subnet)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parse a subnet literal in unit tests (panics on a typo in the test itself).
#[cfg(test)]
pub(crate) fn test_subnet(text: &str) -> Subnet {
    match text.parse() {
        Ok(s) => s,
        Err(err) => panic!("{err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_addresses() -> Result<(), Error> {
        let s: Subnet = "10.88.3.0/24".parse()?;
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 3, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 88, 3, 255));
        assert_eq!(s.to_string(), "10.88.3.0/24");
        assert!(s.contains(Ipv4Addr::new(10, 88, 3, 77)));
        assert!(!s.contains(Ipv4Addr::new(10, 88, 4, 1)));
        let cluster: Subnet = "10.88.0.0/16".parse()?;
        assert!(cluster.contains_subnet(&s));
        assert!(!s.contains_subnet(&cluster));
        assert!(s.overlaps(&cluster));
        Ok(())
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "10.88.3.0",
            "10.88.3.7/24",
            "10.88.3.0/33",
            "x/24",
            "10.88.3.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} parsed");
        }
    }
}
