//! The eBPF fast path between containers on different nodes (Linux 6.6+, tcx hooks).
//!
//! Without it, a packet from a container to one on another node crosses the host veth's
//! backlog queue, the bridge, netfilter and IP forwarding on the way out, and IP forwarding,
//! netfilter, the bridge and the container veth's backlog again on the way in. With it (see
//! [`programs`] for exactly which packets qualify), the sending node's program on the
//! container's host veth hands the packet straight to the uplink or VXLAN device with the
//! next hop's MACs, and the receiving node's program on that device puts it straight into the
//! destination container's namespace. Traffic to or from outside the cluster, and anything the
//! programs are unsure about, still takes the normal path, so masquerade, published ports and
//! ICMP errors are unchanged.
//!
//! [`FastPath::setup`] loads both programs and attaches the receiving one; [`FastPath::attach`]
//! records a container's address in the route map (microseconds); [`FastPath::hook_veth`] puts
//! the sending program on the container's host veth, which costs an RCU grace period, so the
//! agent runs it after the container started (its first packets take the normal path);
//! [`FastPath::detach`] forgets the address (the veth's program goes with the veth).
//!
//! The sending program sits on the veth, not on the bridge: with `br_netfilter` loaded, a
//! packet reaching the bridge device has been through the IPv4 PREROUTING hooks already, and
//! the answer of a published port reached from inside the cluster would arrive there with its
//! destination translated back but its source not yet: redirected then, it would skip the
//! reverse DNAT. On the veth every packet is as the container sent it. The
//! programs and maps live in the kernel as long as something uses them: a new agent loads new
//! ones and replaces the old ones on every hook (programs are recognised by their `tug_` names).

// The programs compare addresses as their wire bytes loaded little-endian (`programs::wire`).
#[cfg(target_endian = "big")]
compile_error!("tug's eBPF fast path is written for little-endian machines");

mod asm;
mod bpf;
mod programs;

use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use crate::error::{Error, Result};
use crate::subnet::Subnet;

/// The name of the program on container veths.
pub const FROM_CONTAINERS: &str = "tug_from_ctr";
/// The name of the program on the uplink or VXLAN device.
pub const TO_CONTAINERS: &str = "tug_to_ctr";
/// The prefix every tug program's name has.
const PREFIX: &str = "tug_";
/// The license the programs declare to the kernel (some helpers are GPL-only). The programs
/// are tug's own, generated in [`programs`]; tug itself is Apache-2.0, and "Dual MIT/GPL" is a
/// license string the kernel accepts as GPL-compatible for code that is offered under both.
const LICENSE: &CStr = c"Dual MIT/GPL";
/// At most this many containers per node in the route map.
const MAX_CONTAINERS: u32 = 65536;

/// What the fast path needs of the node.
#[derive(Debug, Clone)]
pub struct FastPathConfig {
    /// The whole cluster's CIDR: only traffic inside it is fast-pathed.
    pub cluster_cidr: Subnet,
    /// This node's container subnet.
    pub subnet: Subnet,
    /// Where traffic from other nodes' containers arrives: the uplink in host-gw mode, the VXLAN
    /// device in vxlan mode; `None` for a node without one (nothing arrives from other nodes).
    pub ingress: Option<String>,
}

/// Packet counts of the fast path since its programs were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPathStats {
    /// Packets from local containers sent straight to another node.
    pub to_nodes: u64,
    /// Packets from other nodes put straight into a local container.
    pub to_containers: u64,
}

/// The loaded programs and maps of one node (one network namespace).
#[derive(Debug)]
pub struct FastPath {
    from_containers: OwnedFd,
    routes: bpf::Map,
    stats: bpf::Map,
    subnet: Subnet,
}

impl FastPath {
    /// Load the programs and attach the receiving one to `cfg.ingress`, replacing tug programs
    /// already there. Works in the calling thread's network namespace. Fails on kernels without
    /// tcx (before 6.6): the caller then goes on without a fast path.
    pub fn setup(cfg: &FastPathConfig) -> Result<FastPath> {
        let routes = bpf::map_create(bpf::MAP_HASH, 4, 4, MAX_CONTAINERS, "tug_routes")
            .map_err(Error::bpf("create the fast path's route map"))?;
        let stats = bpf::map_create(bpf::MAP_ARRAY, 4, 8, programs::STATS, "tug_stats")
            .map_err(Error::bpf("create the fast path's statistics map"))?;
        let from_containers = load(
            FROM_CONTAINERS,
            programs::from_containers(cfg.cluster_cidr, cfg.subnet, stats.fd()),
        )?;
        let to_containers = load(
            TO_CONTAINERS,
            programs::to_containers(cfg.cluster_cidr, cfg.subnet, routes.fd(), stats.fd()),
        )?;
        if let Some(name) = &cfg.ingress {
            replace_on(&to_containers, name)?;
        }
        tracing::info!(ingress = ?cfg.ingress, "eBPF fast path loaded");
        Ok(FastPath {
            from_containers,
            routes,
            stats,
            subnet: cfg.subnet,
        })
    }

    /// Record that `address` lives behind `host_veth` (a map update: no program is attached per
    /// container, so adding one costs microseconds).
    pub fn attach(&self, host_veth: &str, address: Ipv4Addr) -> Result<()> {
        if !self.subnet.contains(address) {
            return Err(Error::FastPath {
                what: format!("route {address} to {host_veth:?}"),
                reason: format!("the address is outside the node subnet {}", self.subnet),
            });
        }
        let index = if_index(host_veth)?;
        bpf::map_update(&self.routes, &address.octets(), &index.to_ne_bytes()).map_err(Error::bpf(
            format!("record {address} in the fast path's route map"),
        ))
    }

    /// Put the sending program on a container's host veth (replacing an older tug program
    /// there). It takes a kernel RCU grace period (about 10 ms, nearly all of it waiting), so
    /// callers run it off the container's start path; until then the container's packets take
    /// the normal path.
    pub fn hook_veth(&self, host_veth: &str) -> Result<()> {
        replace_on(&self.from_containers, host_veth).map(drop)
    }

    /// Record every container of `allocations` (IPAM's `id -> address`) whose host veth exists:
    /// after an agent restart, containers that kept running get their routes (their veths are
    /// for [`FastPath::hook_veth`], off the async threads). Returns their veths; failures are
    /// logged and skipped (those containers keep the normal path).
    pub fn adopt(&self, allocations: &std::collections::BTreeMap<String, Ipv4Addr>) -> Vec<String> {
        let mut adopted = Vec::new();
        for (id, address) in allocations {
            let veth = crate::container::host_veth_name(id);
            if nix::net::if_::if_nametoindex(veth.as_str()).is_err() {
                continue;
            }
            match self.attach(&veth, *address) {
                Ok(()) => adopted.push(veth),
                Err(e) => {
                    tracing::warn!(container = %id, cause = %e, "container left on the normal path")
                }
            }
        }
        adopted
    }

    /// Forget `address` (its veth, and the program on it, go when the container's network is
    /// deleted). Whether it was recorded.
    pub fn detach(&self, address: Ipv4Addr) -> Result<bool> {
        bpf::map_delete(&self.routes, &address.octets()).map_err(Error::bpf(format!(
            "remove {address} from the fast path's route map"
        )))
    }

    /// The recorded `(address, host veth index)` pairs.
    pub fn routes(&self) -> Result<Vec<(Ipv4Addr, u32)>> {
        let what = "read the fast path's route map";
        let mut out = Vec::new();
        for key in bpf::map_keys::<4>(&self.routes).map_err(Error::bpf(what))? {
            let mut value = [0u8; 4];
            if bpf::map_lookup(&self.routes, &key, &mut value).map_err(Error::bpf(what))? {
                out.push((Ipv4Addr::from(key), u32::from_ne_bytes(value)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The packet counters.
    pub fn stats(&self) -> Result<FastPathStats> {
        let read = |slot: u32| -> Result<u64> {
            let mut value = [0u8; 8];
            bpf::map_lookup(&self.stats, &slot.to_ne_bytes(), &mut value)
                .map_err(Error::bpf("read the fast path's statistics"))?;
            Ok(u64::from_ne_bytes(value))
        };
        Ok(FastPathStats {
            to_nodes: read(programs::STAT_TO_NODES)?,
            to_containers: read(programs::STAT_TO_CONTAINERS)?,
        })
    }
}

/// The names of the tug programs on `interface`'s ingress hook.
pub fn programs_on(interface: &str) -> Result<Vec<String>> {
    let index = if_index(interface)?;
    let mut names = Vec::new();
    for id in bpf::tcx_programs(index, bpf::TCX_INGRESS)
        .map_err(Error::bpf(format!("list the programs on {interface:?}")))?
    {
        if let Some((_, name)) = bpf::program_by_id(id)
            .map_err(Error::bpf(format!("look up program {id} on {interface:?}")))?
            .filter(|(_, name)| name.starts_with(PREFIX))
        {
            names.push(name);
        }
    }
    Ok(names)
}

/// Remove every tug program from `interface`'s ingress hook; how many there were.
pub fn remove_from(interface: &str) -> Result<usize> {
    let index = if_index(interface)?;
    detach_tug_programs(index, interface, None)
}

fn load(name: &str, insns: std::result::Result<Vec<asm::Insn>, asm::AsmError>) -> Result<OwnedFd> {
    let insns = insns.map_err(|e| Error::FastPath {
        what: format!("assemble program {name}"),
        reason: e.to_string(),
    })?;
    bpf::prog_load(name, &insns, LICENSE).map_err(|e| Error::BpfLoad {
        program: name.to_string(),
        source: e.source,
        log: e.log,
    })
}

/// Attach `prog` to `interface`'s ingress, then detach the tug programs that were there before
/// (so the hook is never without one). Returns the interface's index.
fn replace_on(prog: &OwnedFd, interface: &str) -> Result<u32> {
    let index = if_index(interface)?;
    bpf::tcx_attach(prog, index, bpf::TCX_INGRESS).map_err(|e| {
        let hint = if e.raw_os_error() == Some(nix::libc::EINVAL) {
            " (tcx hooks need Linux 6.6 or later)"
        } else {
            ""
        };
        Error::Bpf {
            what: format!("attach the fast path to {interface:?}{hint}"),
            source: e,
        }
    })?;
    detach_tug_programs(index, interface, Some(prog))?;
    Ok(index)
}

/// Detach the tug programs on `index`'s ingress except `keep`.
fn detach_tug_programs(index: u32, interface: &str, keep: Option<&OwnedFd>) -> Result<usize> {
    let keep_id = match keep {
        Some(fd) => Some(prog_id(fd)?),
        None => None,
    };
    let mut removed = 0;
    let ids = bpf::tcx_programs(index, bpf::TCX_INGRESS)
        .map_err(Error::bpf(format!("list the programs on {interface:?}")))?;
    for id in ids.into_iter().filter(|id| Some(*id) != keep_id) {
        let Some((fd, name)) = bpf::program_by_id(id)
            .map_err(Error::bpf(format!("look up program {id} on {interface:?}")))?
        else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        if bpf::tcx_detach(&fd, index, bpf::TCX_INGRESS)
            .map_err(Error::bpf(format!("detach {name} from {interface:?}")))?
        {
            removed += 1;
        }
    }
    Ok(removed)
}

fn prog_id(fd: &OwnedFd) -> Result<u32> {
    bpf::program_id(fd).map_err(Error::bpf("read a program's id"))
}

fn if_index(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface).map_err(|e| Error::Bpf {
        what: format!("find interface {interface:?} for the fast path"),
        source: e.into(),
    })
}
