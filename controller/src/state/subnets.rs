//! Container subnets: the cluster CIDR (fixed by the first registration, from the leader's
//! `--cluster-cidr`) cut into one subnet per node. A node keeps its subnet across
//! re-registrations; removing the node frees it. Allocation takes the lowest free subnet, so every
//! replica applying the same log picks the same one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::store::StoreError;

/// The cluster's container address plan: which CIDR, cut into subnets of which prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterNetwork {
    pub cidr: Ipv4Net,
    pub node_prefix: u8,
}

impl Default for ClusterNetwork {
    /// 10.88.0.0/16 in /24s: 256 nodes of 253 containers each.
    fn default() -> Self {
        ClusterNetwork {
            cidr: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default(),
            node_prefix: 24,
        }
    }
}

impl ClusterNetwork {
    /// Parses and checks `cidr` ("10.88.0.0/16") and the per-node prefix length (24).
    pub fn parse(cidr: &str, node_prefix: u8) -> Result<ClusterNetwork, StoreError> {
        let bad = |why: String| StoreError::BadClusterNetwork(why);
        let net: Ipv4Net = cidr
            .parse()
            .map_err(|_| bad(format!("{cidr:?} is not an IPv4 CIDR such as 10.88.0.0/16")))?;
        if net.network() != net.addr() {
            return Err(bad(format!(
                "{cidr} has host bits set (did you mean {}?)",
                net.trunc()
            )));
        }
        if node_prefix < net.prefix_len() || node_prefix > 30 {
            return Err(bad(format!(
                "a node subnet of /{node_prefix} does not fit: it must be between /{} (the \
                 cluster CIDR's) and /30",
                net.prefix_len()
            )));
        }
        Ok(ClusterNetwork {
            cidr: net,
            node_prefix,
        })
    }

    /// How many node subnets the CIDR holds.
    pub fn capacity(&self) -> u64 {
        1u64 << (self.node_prefix - self.cidr.prefix_len())
    }
}

/// Which subnets are taken, by whom.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubnetPool {
    network: Option<ClusterNetwork>,
    /// Subnet network address → node name.
    used: BTreeMap<u32, String>,
}

impl SubnetPool {
    pub(crate) fn network(&self) -> Option<ClusterNetwork> {
        self.network
    }

    /// Fixes the cluster network if it is not yet (the first registration's wins).
    pub(crate) fn settle(&mut self, network: ClusterNetwork) -> ClusterNetwork {
        *self.network.get_or_insert(network)
    }

    /// Rebuilds the pool from restored nodes.
    pub(crate) fn restore<'a>(
        &mut self,
        network: Option<ClusterNetwork>,
        nodes: impl Iterator<Item = (&'a str, &'a str)>,
    ) {
        self.network = network;
        self.used.clear();
        for (name, subnet) in nodes {
            if let Ok(net) = subnet.parse::<Ipv4Net>() {
                self.used.insert(u32::from(net.network()), name.to_string());
            }
        }
    }

    /// The lowest free subnet for `node`, taken. One ordered walk over the taken subnets (10,000
    /// nodes: microseconds), and a function of the state alone, so every replica picks the same.
    pub(crate) fn allocate(&mut self, node: &str) -> Result<Ipv4Net, StoreError> {
        let network = self.network.ok_or(StoreError::NoClusterNetwork)?;
        let capacity = network.capacity();
        let step = 1u64 << (32 - network.node_prefix);
        let base = u64::from(u32::from(network.cidr.network()));
        let end = base + capacity * step;
        let mut lowest = base;
        for (&taken, _) in self.used.range(u32::from(network.cidr.network())..) {
            if u64::from(taken) != lowest {
                break;
            }
            lowest += step;
        }
        let subnet = (lowest < end)
            .then(|| u32::try_from(lowest).ok())
            .flatten()
            .and_then(|addr| Ipv4Net::new(Ipv4Addr::from(addr), network.node_prefix).ok())
            .ok_or_else(|| StoreError::SubnetsExhausted {
                cidr: network.cidr.to_string(),
                node_prefix: network.node_prefix,
                node: node.to_string(),
                capacity,
            })?;
        self.used
            .insert(u32::from(subnet.network()), node.to_string());
        Ok(subnet)
    }

    /// Frees `subnet` if `node` holds it.
    pub(crate) fn release(&mut self, node: &str, subnet: &str) {
        if let Ok(net) = subnet.parse::<Ipv4Net>() {
            let key = u32::from(net.network());
            if self.used.get(&key).is_some_and(|n| n == node) {
                self.used.remove(&key);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_networks_are_checked() {
        assert!(ClusterNetwork::parse("10.88.0.0/16", 24).is_ok());
        for (cidr, prefix) in [
            ("10.88.0.0", 24),
            ("10.88.1.0/16", 24),
            ("10.88.0.0/16", 12),
            ("10.88.0.0/16", 31),
            ("fd00::/64", 80),
            ("nonsense", 24),
        ] {
            assert!(
                matches!(
                    ClusterNetwork::parse(cidr, prefix),
                    Err(StoreError::BadClusterNetwork(_))
                ),
                "{cidr} /{prefix}"
            );
        }
    }

    #[test]
    fn lowest_free_subnet_first_and_a_clear_error_when_none_is_left()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut pool = SubnetPool::default();
        pool.settle(ClusterNetwork::parse("10.1.0.0/23", 25)?);
        // A later registration with other flags does not change the plan.
        pool.settle(ClusterNetwork::parse("10.9.0.0/16", 24)?);
        let got: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| pool.allocate(n).map(|s| s.to_string()))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            got,
            [
                "10.1.0.0/25",
                "10.1.0.128/25",
                "10.1.1.0/25",
                "10.1.1.128/25"
            ]
        );
        let err = pool.allocate("e").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "no free /25 subnet left in the cluster CIDR 10.1.0.0/23 for node e (all 4 are \
                 taken; remove nodes that are gone with `tug delete node NAME`)"
            )
        );
        pool.release("b", "10.1.0.128/25");
        // Only the holder can free a subnet.
        pool.release("x", "10.1.0.0/25");
        assert_eq!(pool.allocate("e")?.to_string(), "10.1.0.128/25");
        assert_eq!(pool.in_use(), 4);
        Ok(())
    }

    #[test]
    fn restore_rebuilds_the_pool() -> Result<(), Box<dyn std::error::Error>> {
        let mut pool = SubnetPool::default();
        let network = ClusterNetwork::parse("10.88.0.0/16", 24)?;
        pool.restore(Some(network), [("a", "10.88.0.0/24")].into_iter());
        assert_eq!(pool.allocate("b")?.to_string(), "10.88.1.0/24");
        Ok(())
    }
}
