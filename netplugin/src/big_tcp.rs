//! IPv4 BIG TCP (Linux 6.3+): TCP hands the stack GSO packets of up to 192 KiB instead of
//! 64 KiB, so each device a container's packet crosses (its veth, the fast path's redirect, the
//! uplink) is paid for a third as often. The NIC still segments them into MTU-sized frames: the
//! wire sees no difference.
//!
//! - **The uplink is raised only on request** (`NodeConfig::big_tcp`, `tug agent --big-tcp on`,
//!   like Cilium's `enable-ipv4-big-tcp`). It changes how the host's own TCP sends, and only
//!   drivers whose TSO limit is above 64 KiB take such packets, so the limit is the smaller of
//!   [`BIG_TCP_SIZE`] and the driver's.
//! - **Containers follow the uplink.** In host-gw mode their veths get the uplink's limit whenever
//!   it is above 64 KiB, whoever raised it. They must not exceed it: a device segments a larger
//!   GSO packet in software, which costs far more than BIG TCP saves.
//! - **vxlan mode keeps 64 KiB** for containers: an encapsulated packet's outer IPv4 and UDP
//!   lengths are 16 bits. (The kernel never aggregates tunnel packets beyond 64 KiB either.)
//! - **The bridge takes the containers' limit**, for traffic the stack forwards to them through
//!   it (fast path off, or a published port reached from another node).
//! - Container traffic that leaves through another device than the uplink (a second NIC) is
//!   still correct, but segmented in software at that device if its limit is lower.

use tracing::{info, warn};

use crate::error::Result;
use crate::netlink::{Link, Netlink};
use crate::node::{Mode, NodeConfig};

/// The IPv4 GSO/GRO limit tug sets for BIG TCP (Cilium's default, 192 KiB).
pub const BIG_TCP_SIZE: u32 = 196_608;
/// The kernel's default limit, the largest an IPv4 length field can state.
pub const LEGACY_SIZE: u32 = 65_536;

/// Raise the uplink's limit when `cfg.big_tcp` asks for it, and give the bridge the limit
/// containers get. Returns that limit (`None`: the kernel's default) and whether anything
/// changed. Idempotent. Best effort, being only an optimisation: a limit that cannot be set is
/// a warning, and containers then keep 64 KiB.
pub(crate) async fn converge(
    nl: &Netlink,
    cfg: &NodeConfig,
    bridge: &Link,
) -> Result<(Option<u32>, bool)> {
    let mut changed = false;
    let mut uplink_limit = LEGACY_SIZE;
    match &cfg.uplink {
        None if cfg.big_tcp => {
            warn!("no uplink (a node known by a loopback address): BIG TCP stays off");
        }
        None => {}
        Some(name) => {
            let link = nl
                .require_link(name, " (it was given as the uplink interface)")
                .await?;
            match (link.gso_ipv4_max_size, link.gro_ipv4_max_size) {
                (Some(gso), Some(gro)) => {
                    uplink_limit = gso.min(gro);
                    let driver = link.tso_max_size.unwrap_or(LEGACY_SIZE);
                    let want = BIG_TCP_SIZE.min(driver);
                    if cfg.big_tcp && want <= LEGACY_SIZE {
                        warn!(uplink = %name, driver, "the uplink's driver takes no TSO packet above 64 KiB: BIG TCP stays off");
                    } else if cfg.big_tcp && uplink_limit < want {
                        match nl.set_ipv4_gso_gro_limit(link.index, name, want).await {
                            Ok(()) => {
                                info!(uplink = %name, from = uplink_limit, to = want, "IPv4 BIG TCP turned on");
                                uplink_limit = want;
                                changed = true;
                            }
                            Err(e) => {
                                warn!(uplink = %name, cause = %e, "could not raise the uplink's IPv4 GSO/GRO limit: BIG TCP stays off");
                            }
                        }
                    }
                }
                _ if cfg.big_tcp => {
                    warn!(uplink = %name, "this kernel has no IPv4 BIG TCP (Linux 6.3+): the uplink keeps 64 KiB packets");
                }
                _ => {}
            }
        }
    }
    let mut containers =
        (cfg.mode == Mode::HostGw && uplink_limit > LEGACY_SIZE).then_some(uplink_limit);
    let want = containers.unwrap_or(LEGACY_SIZE);
    // A bridge that never had ports has a driver limit of 64 KiB (afterwards its ports'
    // least): then raising waits for the first container (`raise_bridge`).
    if let Some(have) = bridge.gso_ipv4_max_size
        && (have != want || bridge.gro_ipv4_max_size != Some(want))
        && bridge.tso_max_size.is_some_and(|driver| driver >= want)
    {
        match nl
            .set_ipv4_gso_gro_limit(bridge.index, &cfg.bridge, want)
            .await
        {
            Ok(()) => {
                info!(from = have, to = want, "bridge IPv4 GSO/GRO limit set");
                changed = true;
            }
            Err(e) => {
                warn!(cause = %e, to = want, "could not set the bridge's IPv4 GSO/GRO limit: containers keep 64 KiB");
                containers = None;
            }
        }
    }
    Ok((containers, changed))
}

/// Raise the bridge's limit to a container's `size` once the container's veth has joined it
/// (a bridge without ports takes no more than 64 KiB). Best effort: a bridge left lower only
/// slows traffic the stack forwards to containers (it is segmented there).
pub(crate) async fn raise_bridge(nl: &Netlink, name: &str, size: u32) {
    let link = match nl.link_by_name(name).await {
        Ok(Some(link)) => link,
        Ok(None) => return,
        Err(e) => {
            warn!(bridge = %name, cause = %e, "could not read the bridge's IPv4 GSO limit");
            return;
        }
    };
    if link.gso_ipv4_max_size.is_some_and(|have| have < size)
        || link.gro_ipv4_max_size.is_some_and(|have| have < size)
    {
        match nl.set_ipv4_gso_gro_limit(link.index, name, size).await {
            Ok(()) => info!(bridge = %name, to = size, "bridge IPv4 GSO limit raised"),
            Err(e) => {
                warn!(bridge = %name, cause = %e, "could not raise the bridge's IPv4 GSO limit")
            }
        }
    }
}

/// The IPv4 GSO limit of the link `name` in the calling thread's network namespace; `None` on
/// kernels without a separate IPv4 limit (before 6.3).
pub async fn ipv4_gso_limit(name: &str) -> Result<Option<u32>> {
    let nl = Netlink::open()?;
    Ok(nl.require_link(name, "").await?.gso_ipv4_max_size)
}

/// Whether this kernel's release has a separate IPv4 GSO limit (Linux 6.3+), from
/// `/proc/sys/kernel/osrelease`; `None` when that cannot be read as `MAJOR.MINOR...`. It tells
/// a kernel without IPv4 BIG TCP from one whose limit [`ipv4_gso_limit`] failed to read.
pub fn kernel_has_ipv4_gso_limit() -> Option<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    release_has_ipv4_gso_limit(&release)
}

fn release_has_ipv4_gso_limit(release: &str) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= (6, 3))
}

/// Set the IPv4 GSO and GRO limits of the link `name` in the calling thread's network
/// namespace, as an operator tunes a NIC (`ip link set NAME gso_ipv4_max_size SIZE
/// gro_ipv4_max_size SIZE` with iproute2 6.3+).
pub async fn set_ipv4_gso_gro_limit(name: &str, size: u32) -> Result<()> {
    let nl = Netlink::open()?;
    let link = nl.require_link(name, "").await?;
    nl.set_ipv4_gso_gro_limit(link.index, name, size).await
}

#[cfg(test)]
mod tests {
    use super::release_has_ipv4_gso_limit;

    #[test]
    fn kernel_releases_from_6_3_have_the_ipv4_limit() {
        assert_eq!(release_has_ipv4_gso_limit("6.18.44-fc-v669\n"), Some(true));
        assert_eq!(release_has_ipv4_gso_limit("6.3.0"), Some(true));
        assert_eq!(release_has_ipv4_gso_limit("6.1.0-28-amd64"), Some(false));
        assert_eq!(release_has_ipv4_gso_limit("5.19"), Some(false));
        assert_eq!(release_has_ipv4_gso_limit("garbage"), None);
    }
}
