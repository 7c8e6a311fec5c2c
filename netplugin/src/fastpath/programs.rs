//! The two fast-path programs, both tc ingress classifiers in direct-action mode.
//!
//! * [`from_containers`] runs on each container's host-side veth. A packet from a local
//!   container to a container on another node is looked up in the node's FIB
//!   (`bpf_fib_lookup`: the host-gw route or the VXLAN route), gets a decremented TTL, and is
//!   handed straight to the uplink or VXLAN device through the neighbour table
//!   (`bpf_redirect_neigh`, which writes the next hop's MAC and keeps the entry confirmed),
//!   skipping the bridge, netfilter and IP forwarding.
//! * [`to_containers`] runs on the uplink (host-gw) or the VXLAN device (vxlan). A packet from
//!   the cluster to a local container is looked up in the route map (address -> host veth) and
//!   put straight into the container's namespace (`bpf_redirect_peer`): no bridge, no forwarding
//!   and no second pass through the veth's backlog queue. The container's MAC is its address
//!   behind `0a:58` (see [`crate::container::container_mac`]), so nothing else needs storing.
//!
//! Anything else (other protocols, IP options, TTL about to expire, traffic to or from outside
//! the cluster CIDR, a packet too big for the next hop) goes on through
//! the normal stack unchanged: masquerade, published ports and ICMP errors keep working there.
//! Traffic that needs NAT never matches: tug only translates traffic leaving the cluster CIDR
//! (masquerade, whose replies come back to the node's address) and traffic to the node's address
//! (published ports, whose replies leave for the client's address outside the cluster, since a
//! container reaching another node's port is masqueraded first).

use std::os::fd::{AsRawFd, OwnedFd};

use super::asm::{Alu, Asm, AsmError, Cond, Insn, Reg, Size};
use crate::subnet::Subnet;

// `struct __sk_buff` offsets.
const SKB_PKT_TYPE: i16 = 4;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_INGRESS_IFINDEX: i16 = 36;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

// Packet offsets: Ethernet, then an IPv4 header without options.
const ETH_PROTO: i16 = 12;
const IP_VERSION_IHL: i16 = 14;
const IP_TOS: i16 = 15;
const IP_TTL: i16 = 22;
const IP_PROTOCOL: i16 = 23;
const IP_CHECK: i16 = 24;
const IP_SRC: i16 = 26;
const IP_DST: i16 = 30;
const HEADERS: i32 = 34;
/// `ETH_P_IP` as its two bytes on the wire read little-endian.
const ETH_P_IP_WIRE: i32 = 0x0008;
/// Version 4, 5 words of header: no options.
const IPV4_NO_OPTIONS: i32 = 0x45;

// `struct bpf_fib_lookup`, 64 bytes on the stack at FIB.
const FIB: i16 = -64;
const FIB_SIZE: i32 = 64;
const FIB_FAMILY: i16 = FIB;
const FIB_L4_PROTOCOL: i16 = FIB + 1;
const FIB_IFINDEX: i16 = FIB + 8;
const FIB_TOS: i16 = FIB + 12;
const FIB_SRC: i16 = FIB + 16;
const FIB_DST: i16 = FIB + 32;
const AF_INET: i32 = 2;
/// A key on the stack below the FIB parameters.
const KEY: i16 = -68;
// `struct bpf_redir_neigh` (20 bytes) below the key: family, then the next hop's address.
const NEIGH: i16 = -88;
const NEIGH_SIZE: i32 = 20;
/// `PACKET_HOST`: addressed to this interface's MAC.
const PACKET_HOST: i32 = 0;

// Helpers (`enum bpf_func_id`).
const MAP_LOOKUP_ELEM: i32 = 1;
const FIB_LOOKUP: i32 = 69;
const REDIRECT_NEIGH: i32 = 152;
const REDIRECT_PEER: i32 = 155;

/// `TC_ACT_UNSPEC`: let the next filter, or the stack, have the packet.
const TC_ACT_UNSPEC: i32 = -1;

/// The two bytes in front of the address in a container's or gateway's MAC, as stored by a
/// little-endian 16-bit write.
const MAC_PREFIX_WIRE: i32 = 0x580a;

/// Slot of the statistics array counting packets sent to other nodes.
pub(crate) const STAT_TO_NODES: u32 = 0;
/// Slot counting packets delivered to local containers.
pub(crate) const STAT_TO_CONTAINERS: u32 = 1;
/// Number of slots.
pub(crate) const STATS: u32 = 2;

/// An address or mask as the program sees it: its wire bytes loaded as a little-endian `u32`.
fn wire(addr: std::net::Ipv4Addr) -> i32 {
    i32::from_le_bytes(addr.octets())
}

fn mask(prefix: u8) -> std::net::Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    std::net::Ipv4Addr::from(bits)
}

/// `(mask, network)` of a subnet, as the program compares them.
fn matcher(subnet: Subnet) -> (i32, i32) {
    (wire(mask(subnet.prefix())), wire(subnet.network()))
}

/// R2 = data, R3 = data_end from the context in R6; on to `pass` unless the Ethernet and IPv4
/// headers are there.
fn packet_pointers(asm: &mut Asm) {
    asm.load(Size::W, Reg::R2, Reg::R6, SKB_DATA)
        .load(Size::W, Reg::R3, Reg::R6, SKB_DATA_END)
        .mov(Reg::R4, Reg::R2)
        .alu64_imm(Alu::Add, Reg::R4, HEADERS)
        .jump_reg(Cond::Gt, Reg::R4, Reg::R3, "pass");
}

/// The checks both programs start with: an IPv4 packet without options whose TTL survives a
/// hop. Leaves the source address in R7 and the destination in R8 (wire order).
fn ipv4_prologue(asm: &mut Asm) {
    asm.mov(Reg::R6, Reg::R1);
    packet_pointers(asm);
    asm.load(Size::H, Reg::R4, Reg::R2, ETH_PROTO)
        .jump32_imm(Cond::Ne, Reg::R4, ETH_P_IP_WIRE, "pass")
        .load(Size::B, Reg::R4, Reg::R2, IP_VERSION_IHL)
        .jump32_imm(Cond::Ne, Reg::R4, IPV4_NO_OPTIONS, "pass")
        .load(Size::B, Reg::R4, Reg::R2, IP_TTL)
        .jump32_imm(Cond::Le, Reg::R4, 1, "pass")
        .load(Size::W, Reg::R7, Reg::R2, IP_SRC)
        .load(Size::W, Reg::R8, Reg::R2, IP_DST);
}

/// On to `to` unless `(addr & mask) == network` (or, with `inside` false, unless it is not).
fn require(asm: &mut Asm, addr: Reg, subnet: Subnet, inside: bool, to: &'static str) {
    let (mask, network) = matcher(subnet);
    asm.mov(Reg::R4, addr)
        .alu32_imm(Alu::And, Reg::R4, mask)
        .jump32_imm(
            if inside { Cond::Ne } else { Cond::Eq },
            Reg::R4,
            network,
            to,
        );
}

/// Add one to statistics slot `slot`. Clobbers R0-R5.
fn count(asm: &mut Asm, stats: &OwnedFd, slot: u32, done: &'static str) {
    asm.store_imm(Size::W, Reg::R10, KEY, slot as i32)
        .load_map_fd(Reg::R1, stats.as_raw_fd())
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(KEY))
        .call(MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, Reg::R0, 0, done)
        .mov_imm(Reg::R1, 1)
        .atomic_add64(Reg::R0, 0, Reg::R1)
        .label(done);
}

/// Decrement the TTL in the packet at R2 and patch the header checksum as the kernel's
/// `ip_decrease_ttl` does (RFC 1624). Uses R4.
fn decrement_ttl(asm: &mut Asm) {
    asm.load(Size::B, Reg::R4, Reg::R2, IP_TTL)
        .alu64_imm(Alu::Sub, Reg::R4, 1)
        .store(Size::B, Reg::R2, IP_TTL, Reg::R4)
        .load(Size::H, Reg::R4, Reg::R2, IP_CHECK)
        // `htons(0x0100)` as read little-endian.
        .alu64_imm(Alu::Add, Reg::R4, 1)
        .jump_imm(Cond::Lt, Reg::R4, 0xffff, "checksum")
        .alu64_imm(Alu::Add, Reg::R4, 1)
        .label("checksum")
        .store(Size::H, Reg::R2, IP_CHECK, Reg::R4);
}

fn pass(asm: &mut Asm) {
    asm.label("pass").mov_imm(Reg::R0, TC_ACT_UNSPEC).exit();
}

/// The program on containers' host veths: local container -> container on another node.
pub(crate) fn from_containers(
    cluster: Subnet,
    local: Subnet,
    stats: &OwnedFd,
) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    ipv4_prologue(&mut asm);
    // Only what the container sent to its gateway (the bridge's MAC) to be routed.
    asm.load(Size::H, Reg::R4, Reg::R2, 0)
        .jump32_imm(Cond::Ne, Reg::R4, MAC_PREFIX_WIRE, "pass")
        .load(Size::W, Reg::R4, Reg::R2, 2)
        .jump32_imm(Cond::Ne, Reg::R4, wire(local.gateway()), "pass");
    require(&mut asm, Reg::R8, cluster, true, "pass");
    require(&mut asm, Reg::R8, local, false, "pass");
    require(&mut asm, Reg::R7, local, true, "pass");
    for off in (FIB..0).step_by(8) {
        asm.store_imm(Size::Dw, Reg::R10, off, 0);
    }
    asm.store_imm(Size::B, Reg::R10, FIB_FAMILY, AF_INET)
        .load(Size::B, Reg::R4, Reg::R2, IP_PROTOCOL)
        .store(Size::B, Reg::R10, FIB_L4_PROTOCOL, Reg::R4)
        .load(Size::B, Reg::R4, Reg::R2, IP_TOS)
        .store(Size::B, Reg::R10, FIB_TOS, Reg::R4)
        .load(Size::W, Reg::R4, Reg::R6, SKB_INGRESS_IFINDEX)
        .store(Size::W, Reg::R10, FIB_IFINDEX, Reg::R4)
        .store(Size::W, Reg::R10, FIB_SRC, Reg::R7)
        .store(Size::W, Reg::R10, FIB_DST, Reg::R8)
        .mov(Reg::R1, Reg::R6)
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(FIB))
        .mov_imm(Reg::R3, FIB_SIZE)
        .mov_imm(Reg::R4, 0)
        .call(FIB_LOOKUP)
        // Anything but BPF_FIB_LKUP_RET_SUCCESS (no route, a next hop not resolved yet, too
        // big for the next hop, not forwarded) is the stack's to handle: it resolves the next
        // hop, or answers with the ICMP error.
        .jump_imm(Cond::Ne, Reg::R0, 0, "pass");
    count(&mut asm, stats, STAT_TO_NODES, "counted");
    packet_pointers(&mut asm);
    decrement_ttl(&mut asm);
    // The next hop (the lookup left the route's gateway in the destination, or the packet's
    // destination on a direct route) for `bpf_redirect_neigh`, which writes the Ethernet
    // header through the neighbour table and keeps the entry confirmed.
    asm.store_imm(Size::W, Reg::R10, NEIGH, AF_INET)
        .load(Size::W, Reg::R4, Reg::R10, FIB_DST)
        .store(Size::W, Reg::R10, NEIGH + 4, Reg::R4)
        .store_imm(Size::W, Reg::R10, NEIGH + 8, 0)
        .store_imm(Size::W, Reg::R10, NEIGH + 12, 0)
        .store_imm(Size::W, Reg::R10, NEIGH + 16, 0)
        .load(Size::W, Reg::R1, Reg::R10, FIB_IFINDEX)
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(NEIGH))
        .mov_imm(Reg::R3, NEIGH_SIZE)
        .mov_imm(Reg::R4, 0)
        .call(REDIRECT_NEIGH)
        .exit();
    pass(&mut asm);
    asm.finish()
}

/// The program on the uplink or VXLAN device: cluster -> local container.
pub(crate) fn to_containers(
    cluster: Subnet,
    local: Subnet,
    routes: &OwnedFd,
    stats: &OwnedFd,
) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    ipv4_prologue(&mut asm);
    // Addressed to this node (not seen in promiscuous mode), and not for a VLAN device on top.
    asm.load(Size::W, Reg::R4, Reg::R6, SKB_PKT_TYPE)
        .jump32_imm(Cond::Ne, Reg::R4, PACKET_HOST, "pass")
        .load(Size::W, Reg::R4, Reg::R6, SKB_VLAN_PRESENT)
        .jump32_imm(Cond::Ne, Reg::R4, 0, "pass");
    require(&mut asm, Reg::R8, local, true, "pass");
    require(&mut asm, Reg::R7, cluster, true, "pass");
    asm.store(Size::W, Reg::R10, KEY, Reg::R8)
        .load_map_fd(Reg::R1, routes.as_raw_fd())
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(KEY))
        .call(MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, Reg::R0, 0, "pass")
        .load(Size::W, Reg::R9, Reg::R0, 0);
    count(&mut asm, stats, STAT_TO_CONTAINERS, "counted");
    packet_pointers(&mut asm);
    asm.store_imm(Size::H, Reg::R2, 0, MAC_PREFIX_WIRE)
        .store(Size::W, Reg::R2, 2, Reg::R8)
        .store_imm(Size::H, Reg::R2, 6, MAC_PREFIX_WIRE)
        .store_imm(Size::W, Reg::R2, 8, wire(local.gateway()));
    decrement_ttl(&mut asm);
    asm.mov(Reg::R1, Reg::R9)
        .mov_imm(Reg::R2, 0)
        .call(REDIRECT_PEER)
        .exit();
    pass(&mut asm);
    asm.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_masks_are_compared_in_wire_order() -> Result<(), Box<dyn std::error::Error>> {
        let subnet: Subnet = "10.88.0.0/16".parse()?;
        let (mask, network) = matcher(subnet);
        assert_eq!(mask.to_le_bytes(), [255, 255, 0, 0]);
        assert_eq!(network.to_le_bytes(), [10, 88, 0, 0]);
        assert_eq!(wire("10.88.3.7".parse()?) & mask, network);
        let host: Subnet = "10.88.3.0/24".parse()?;
        assert_eq!(matcher(host).0.to_le_bytes(), [255, 255, 255, 0]);
        Ok(())
    }
}
