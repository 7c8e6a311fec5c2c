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
//! * In vxlan mode with a known uplink, [`from_containers`] also encapsulates: when the route's
//!   gateway is a peer's VTEP address recorded in the peer map, it adds the outer Ethernet,
//!   IPv4, UDP and VXLAN headers itself (`bpf_skb_adjust_room`, which marks GSO packets as UDP
//!   tunnel packets so a NIC or the stack segments them correctly) and sends the packet out of
//!   the uplink, skipping the VXLAN device and a second pass through IP output and netfilter.
//!   [`from_vxlan`] on the uplink takes VXLAN packets from a recorded peer node for a local
//!   container off the wire the same way: it strips the outer headers and puts the inner
//!   packet into the container's namespace, skipping outer IP input, the UDP socket lookup, the
//!   VXLAN device and its GRO queue. The packets are the kernel VXLAN device's (same port, VNI,
//!   VTEP MACs), so a node without the fast path, or a packet the programs pass on (VXLAN from
//!   elsewhere, an outer congestion mark), is handled by the device as before.
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
const SKB_LEN: i16 = 0;
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
const IP_FRAG: i16 = 20;
/// The ECN field of the TOS byte, and its "congestion experienced" value.
const ECN_MASK: i32 = 0x03;
const ECN_CE: i32 = 0x03;
const UDP_PROTOCOL: i32 = 17;
/// `htons(IP_MF | IP_OFFSET)` read little-endian: set in any fragment.
const IP_FRAGMENT_WIRE: i32 = 0xff3f;

// A VXLAN packet: outer Ethernet, IPv4 at 14 (no options), UDP at 34, VXLAN at 42, the inner
// Ethernet at 50 and its IPv4 header at 64.
const VXLAN_OVERHEAD: i32 = 50;
const UDP_SOURCE: i16 = 34;
const UDP_DEST: i16 = 36;
const UDP_LEN: i16 = 38;
const UDP_CHECK: i16 = 40;
const VXLAN_FLAGS: i16 = 42;
const VXLAN_VNI: i16 = 46;
const INNER: i16 = 50;
const INNER_IP: i16 = INNER + ETH_PROTO + 2;
const VXLAN_HEADERS: i32 = HEADERS + VXLAN_OVERHEAD;
/// The VXLAN flags word: only the I flag (a valid VNI), reserved bits zero.
const VXLAN_FLAGS_WIRE: i32 = 0x08;
/// The outer header's length and TTL/protocol words as read little-endian: version 4 and 5
/// words, TOS 0; TTL 64 and UDP. The outer header is not ECN-capable (RFC 6040's compatibility
/// mode): the underlay drops rather than marks, and no mark can get lost at decapsulation.
const OUTER_VERSION_IHL_WIRE: i32 = 0x0045;
const OUTER_TTL_UDP_WIRE: i32 = 0x1140;
/// The longest frame that still fits in an IPv4 packet once encapsulated.
const MAX_ENCAPSULATED_FRAME: i32 = 0xffff + 14 - VXLAN_OVERHEAD;
/// Source ports come from the flow hash into 49152-65535 (RFC 7348, section 5).
const SOURCE_PORT_BASE: i32 = 0xc000;
const SOURCE_PORT_SPAN_MASK: i32 = 0x3fff;

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
/// `BPF_FIB_LOOKUP_OUTPUT`: route as a locally generated packet out of `ifindex`.
const FIB_LOOKUP_OUTPUT: i32 = 2;
/// A second `struct bpf_fib_lookup` for the outer packet of an encapsulation.
const OUTER_FIB: i16 = -152;
/// The outer header's identification, saved across helper calls.
const OUTER_ID: i16 = -160;
/// A key on the stack below the FIB parameters.
const KEY: i16 = -68;
// `struct bpf_redir_neigh` (20 bytes) below the key: family, then the next hop's address.
const NEIGH: i16 = -88;
const NEIGH_SIZE: i32 = 20;
/// `PACKET_HOST`: addressed to this interface's MAC.
const PACKET_HOST: i32 = 0;

// Helpers (`enum bpf_func_id`).
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_PRANDOM_U32: i32 = 7;
const GET_HASH_RECALC: i32 = 34;
const SKB_PULL_DATA: i32 = 39;
const SKB_ADJUST_ROOM: i32 = 50;
const FIB_LOOKUP: i32 = 69;
const REDIRECT_NEIGH: i32 = 152;
const REDIRECT_PEER: i32 = 155;

// `bpf_skb_adjust_room`: room at the MAC header (`BPF_ADJ_ROOM_MAC`), and its flags.
const ADJ_ROOM_MAC: i32 = 1;
/// Keep `gso_size`: container MTUs already leave room for the VXLAN headers.
const ADJ_ROOM_FIXED_GSO: u64 = 1;
const ADJ_ROOM_ENCAP_L3_IPV4: u64 = 1 << 1;
const ADJ_ROOM_ENCAP_L4_UDP: u64 = 1 << 4;
/// The inner header is Ethernet (`ETH_P_TEB`, as the VXLAN device marks it).
const ADJ_ROOM_ENCAP_L2_ETH: u64 = 1 << 6;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(14)`: the inner Ethernet header's length.
const ADJ_ROOM_ENCAP_L2_ETHERNET: u64 = 14 << 56;

/// `TC_ACT_UNSPEC`: let the next filter, or the stack, have the packet.
const TC_ACT_UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`: drop.
const TC_ACT_SHOT: i32 = 2;

/// The two bytes in front of the address in a container's or gateway's MAC, as stored by a
/// little-endian 16-bit write.
const MAC_PREFIX_WIRE: i32 = 0x580a;

/// Slot of the statistics array counting packets sent to other nodes.
pub(crate) const STAT_TO_NODES: u32 = 0;
/// Slot counting packets delivered to local containers.
pub(crate) const STAT_TO_CONTAINERS: u32 = 1;
/// Slot counting packets this node encapsulated itself (vxlan).
pub(crate) const STAT_ENCAPSULATED: u32 = 2;
/// Slot counting packets this node decapsulated itself (vxlan).
pub(crate) const STAT_DECAPSULATED: u32 = 3;
/// Number of slots.
pub(crate) const STATS: u32 = 4;

/// What the programs need to carry VXLAN themselves.
pub(crate) struct Tunnel<'a> {
    /// Peer VTEP address -> peer node address (both wire order).
    pub peers: &'a OwnedFd,
    /// The peer nodes' addresses (the keys; the values are unused).
    pub nodes: &'a OwnedFd,
    /// This node's address: the outer source, and the destination `from_vxlan` takes.
    pub local: std::net::Ipv4Addr,
    /// The uplink's interface index (the outer packet's route is looked up out of it).
    pub uplink: u32,
    pub port: u16,
    pub vni: u32,
}

impl Tunnel<'_> {
    fn port_wire(&self) -> i32 {
        i32::from(u16::from_le_bytes(self.port.to_be_bytes()))
    }

    /// The VNI word of the VXLAN header (24 bits, then a reserved byte).
    fn vni_wire(&self) -> i32 {
        let [_, a, b, c] = self.vni.to_be_bytes();
        i32::from_le_bytes([a, b, c, 0])
    }

    /// The one's complement sum of the outer IPv4 header's constant words (read little-endian,
    /// like the program does): version and length, TTL and protocol, the source address.
    fn constant_header_sum(&self) -> i32 {
        let [a, b, c, d] = self.local.octets();
        let words = [
            OUTER_VERSION_IHL_WIRE as u32,
            OUTER_TTL_UDP_WIRE as u32,
            u32::from(u16::from_le_bytes([a, b])),
            u32::from(u16::from_le_bytes([c, d])),
        ];
        // At most four 16-bit words: no carry out of 32 bits.
        words.iter().sum::<u32>() as i32
    }
}

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
    linear(asm, HEADERS, "pass");
}

/// R2 = data, R3 = data_end from the context in R6; on to `short` unless the first `len` bytes
/// are in the linear part.
fn linear(asm: &mut Asm, len: i32, short: &'static str) {
    asm.load(Size::W, Reg::R2, Reg::R6, SKB_DATA)
        .load(Size::W, Reg::R3, Reg::R6, SKB_DATA_END)
        .mov(Reg::R4, Reg::R2)
        .alu64_imm(Alu::Add, Reg::R4, len)
        .jump_reg(Cond::Gt, Reg::R4, Reg::R3, short);
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
/// `ip_decrease_ttl` does (RFC 1624). Uses R4; `done` names the label it places.
fn decrement_ttl(asm: &mut Asm, done: &'static str) {
    asm.load(Size::B, Reg::R4, Reg::R2, IP_TTL)
        .alu64_imm(Alu::Sub, Reg::R4, 1)
        .store(Size::B, Reg::R2, IP_TTL, Reg::R4)
        .load(Size::H, Reg::R4, Reg::R2, IP_CHECK)
        // `htons(0x0100)` as read little-endian.
        .alu64_imm(Alu::Add, Reg::R4, 1)
        .jump_imm(Cond::Lt, Reg::R4, 0xffff, done)
        .alu64_imm(Alu::Add, Reg::R4, 1)
        .label(done)
        .store(Size::H, Reg::R2, IP_CHECK, Reg::R4);
}

fn pass(asm: &mut Asm) {
    asm.label("pass").mov_imm(Reg::R0, TC_ACT_UNSPEC).exit();
}

/// The program on containers' host veths: local container -> container on another node.
/// With `tunnel`, packets for a known VXLAN peer are encapsulated here (see the module docs).
pub(crate) fn from_containers(
    cluster: Subnet,
    local: Subnet,
    stats: &OwnedFd,
    tunnel: Option<&Tunnel<'_>>,
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
    if let Some(tunnel) = tunnel {
        encapsulate(&mut asm, local, stats, tunnel);
    }
    asm.label("device");
    packet_pointers(&mut asm);
    decrement_ttl(&mut asm, "ttl");
    // The next hop (the lookup left the route's gateway in the destination, or the packet's
    // destination on a direct route) for `bpf_redirect_neigh`, which writes the Ethernet
    // header through the neighbour table and keeps the entry confirmed.
    redirect_neigh(&mut asm, FIB);
    pass(&mut asm);
    if tunnel.is_some() {
        asm.label("drop").mov_imm(Reg::R0, TC_ACT_SHOT).exit();
    }
    asm.finish()
}

/// `bpf_redirect_neigh` to the interface and next hop a successful FIB lookup left in the
/// `struct bpf_fib_lookup` at `fib`; returns its verdict.
fn redirect_neigh(asm: &mut Asm, fib: i16) {
    asm.store_imm(Size::W, Reg::R10, NEIGH, AF_INET)
        .load(Size::W, Reg::R4, Reg::R10, fib + (FIB_DST - FIB))
        .store(Size::W, Reg::R10, NEIGH + 4, Reg::R4)
        .store_imm(Size::W, Reg::R10, NEIGH + 8, 0)
        .store_imm(Size::W, Reg::R10, NEIGH + 12, 0)
        .store_imm(Size::W, Reg::R10, NEIGH + 16, 0)
        .load(Size::W, Reg::R1, Reg::R10, fib + (FIB_IFINDEX - FIB))
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(NEIGH))
        .mov_imm(Reg::R3, NEIGH_SIZE)
        .mov_imm(Reg::R4, 0)
        .call(REDIRECT_NEIGH)
        .exit();
}

/// The VXLAN part of `from_containers`, after a successful FIB lookup: on to `device` (the
/// kernel's VXLAN device) unless the gateway is a recorded peer VTEP whose node is routed out
/// of the uplink with its neighbour resolved and the packet can grow by the headers; otherwise
/// encapsulate and send it out of the uplink.
fn encapsulate(asm: &mut Asm, local: Subnet, stats: &OwnedFd, tunnel: &Tunnel<'_>) {
    asm.load(Size::W, Reg::R4, Reg::R10, FIB_DST)
        .store(Size::W, Reg::R10, KEY, Reg::R4)
        .load_map_fd(Reg::R1, tunnel.peers.as_raw_fd())
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(KEY))
        .call(MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, Reg::R0, 0, "device")
        // R7: the peer node's address, the outer destination.
        .load(Size::W, Reg::R7, Reg::R0, 0);
    for off in (OUTER_FIB..OUTER_FIB + FIB_SIZE as i16).step_by(8) {
        asm.store_imm(Size::Dw, Reg::R10, off, 0);
    }
    asm.store_imm(Size::B, Reg::R10, OUTER_FIB, AF_INET)
        .store_imm(Size::B, Reg::R10, OUTER_FIB + 1, UDP_PROTOCOL)
        .store_imm(
            Size::W,
            Reg::R10,
            OUTER_FIB + (FIB_IFINDEX - FIB),
            tunnel.uplink as i32,
        )
        .store_imm(
            Size::W,
            Reg::R10,
            OUTER_FIB + (FIB_SRC - FIB),
            wire(tunnel.local),
        )
        .store(Size::W, Reg::R10, OUTER_FIB + (FIB_DST - FIB), Reg::R7)
        .mov(Reg::R1, Reg::R6)
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(OUTER_FIB))
        .mov_imm(Reg::R3, FIB_SIZE)
        .mov_imm(Reg::R4, FIB_LOOKUP_OUTPUT)
        .call(FIB_LOOKUP)
        .jump_imm(Cond::Ne, Reg::R0, 0, "device")
        .load(Size::W, Reg::R4, Reg::R6, SKB_LEN)
        .jump_imm(Cond::Gt, Reg::R4, MAX_ENCAPSULATED_FRAME, "device")
        // R9: the flow's hash, for the source port; a random identification per packet.
        .mov(Reg::R1, Reg::R6)
        .call(GET_HASH_RECALC)
        .mov(Reg::R9, Reg::R0)
        .call(GET_PRANDOM_U32)
        .store(Size::W, Reg::R10, OUTER_ID, Reg::R0)
        .mov(Reg::R1, Reg::R6)
        .mov_imm(Reg::R2, VXLAN_OVERHEAD)
        .mov_imm(Reg::R3, ADJ_ROOM_MAC)
        .load_imm64(
            Reg::R4,
            ADJ_ROOM_FIXED_GSO
                | ADJ_ROOM_ENCAP_L3_IPV4
                | ADJ_ROOM_ENCAP_L4_UDP
                | ADJ_ROOM_ENCAP_L2_ETH
                | ADJ_ROOM_ENCAP_L2_ETHERNET,
        )
        .call(SKB_ADJUST_ROOM)
        // It fails before changing anything (an old kernel's flags, no memory for headroom).
        .jump_imm(Cond::Ne, Reg::R0, 0, "device");
    count(asm, stats, STAT_ENCAPSULATED, "encapsulated");
    // The new headers sit in the linear part in front of the old ones.
    linear(asm, VXLAN_HEADERS, "drop");
    // Outer IPv4: R1 its total length, R5 the same in network order.
    asm.load(Size::W, Reg::R1, Reg::R6, SKB_LEN)
        .alu64_imm(Alu::Sub, Reg::R1, i32::from(IP_VERSION_IHL))
        .mov(Reg::R5, Reg::R1)
        .htons(Reg::R5)
        .store_imm(Size::H, Reg::R2, IP_VERSION_IHL, OUTER_VERSION_IHL_WIRE)
        .store(Size::H, Reg::R2, IP_VERSION_IHL + 2, Reg::R5)
        .load(Size::W, Reg::R4, Reg::R10, OUTER_ID)
        .alu64_imm(Alu::And, Reg::R4, 0xffff)
        .store(Size::H, Reg::R2, IP_VERSION_IHL + 4, Reg::R4)
        .store_imm(Size::H, Reg::R2, IP_FRAG, 0)
        .store_imm(Size::H, Reg::R2, IP_TTL, OUTER_TTL_UDP_WIRE)
        .store_imm(Size::W, Reg::R2, IP_SRC, wire(tunnel.local))
        .store(Size::W, Reg::R2, IP_DST, Reg::R7)
        // Its checksum: the constant words' sum, plus length, identification and destination,
        // folded to 16 bits and inverted (RFC 1071; little-endian words give the checksum
        // little-endian, stored back as the right bytes).
        .mov_imm(Reg::R0, tunnel.constant_header_sum())
        .alu64_reg(Alu::Add, Reg::R0, Reg::R5)
        .alu64_reg(Alu::Add, Reg::R0, Reg::R4)
        .mov(Reg::R4, Reg::R7)
        .alu64_imm(Alu::And, Reg::R4, 0xffff)
        .alu64_reg(Alu::Add, Reg::R0, Reg::R4)
        .mov(Reg::R4, Reg::R7)
        .alu64_imm(Alu::Rsh, Reg::R4, 16)
        .alu64_reg(Alu::Add, Reg::R0, Reg::R4);
    for _ in 0..2 {
        asm.mov(Reg::R4, Reg::R0)
            .alu64_imm(Alu::Rsh, Reg::R4, 16)
            .alu64_imm(Alu::And, Reg::R0, 0xffff)
            .alu64_reg(Alu::Add, Reg::R0, Reg::R4);
    }
    asm.alu64_imm(Alu::Xor, Reg::R0, 0xffff)
        .store(Size::H, Reg::R2, IP_CHECK, Reg::R0)
        // UDP, without a checksum (as the VXLAN device sends over IPv4).
        .alu64_imm(Alu::And, Reg::R9, SOURCE_PORT_SPAN_MASK)
        .alu64_imm(Alu::Or, Reg::R9, SOURCE_PORT_BASE)
        .htons(Reg::R9)
        .store(Size::H, Reg::R2, UDP_SOURCE, Reg::R9)
        .store_imm(Size::H, Reg::R2, UDP_DEST, tunnel.port_wire())
        .alu64_imm(Alu::Sub, Reg::R1, HEADERS - i32::from(IP_VERSION_IHL))
        .htons(Reg::R1)
        .store(Size::H, Reg::R2, UDP_LEN, Reg::R1)
        .store_imm(Size::H, Reg::R2, UDP_CHECK, 0)
        .store_imm(Size::W, Reg::R2, VXLAN_FLAGS, VXLAN_FLAGS_WIRE)
        .store_imm(Size::W, Reg::R2, VXLAN_VNI, tunnel.vni_wire())
        // The inner Ethernet header, from this node's VTEP MAC to the peer's (`0a:58` and
        // the subnet's network address, see `crate::vxlan::vtep_mac`; the peer's is its VTEP
        // address, the route's gateway).
        .store_imm(Size::H, Reg::R2, INNER, MAC_PREFIX_WIRE)
        .load(Size::W, Reg::R4, Reg::R10, FIB_DST)
        .store(Size::W, Reg::R2, INNER + 2, Reg::R4)
        .store_imm(Size::H, Reg::R2, INNER + 6, MAC_PREFIX_WIRE)
        .store_imm(Size::W, Reg::R2, INNER + 8, wire(local.network()))
        .store_imm(Size::H, Reg::R2, INNER + ETH_PROTO, ETH_P_IP_WIRE)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(INNER));
    decrement_ttl(asm, "inner_ttl");
    redirect_neigh(asm, OUTER_FIB);
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
    addressed_to_this_node(&mut asm);
    require(&mut asm, Reg::R8, local, true, "pass");
    require(&mut asm, Reg::R7, cluster, true, "pass");
    container_veth(&mut asm, routes);
    deliver(&mut asm, local, stats);
    pass(&mut asm);
    asm.finish()
}

/// The program on the uplink in vxlan mode: a VXLAN packet from a peer to a local container
/// loses its outer headers and goes straight into the container's namespace.
pub(crate) fn from_vxlan(
    cluster: Subnet,
    local: Subnet,
    tunnel: &Tunnel<'_>,
    routes: &OwnedFd,
    stats: &OwnedFd,
) -> Result<Vec<Insn>, AsmError> {
    let mut asm = Asm::new();
    // Every header up to the inner IPv4 one in the linear part; pulled in if it is not (but
    // not for packets too short to be VXLAN, such as bare TCP acknowledgements).
    asm.mov(Reg::R6, Reg::R1)
        .load(Size::W, Reg::R4, Reg::R6, SKB_LEN)
        .jump_imm(Cond::Lt, Reg::R4, VXLAN_HEADERS, "pass");
    linear(&mut asm, VXLAN_HEADERS, "pull");
    asm.goto("linear")
        .label("pull")
        .mov(Reg::R1, Reg::R6)
        .mov_imm(Reg::R2, VXLAN_HEADERS)
        .call(SKB_PULL_DATA)
        .jump_imm(Cond::Ne, Reg::R0, 0, "pass");
    linear(&mut asm, VXLAN_HEADERS, "pass");
    asm.label("linear");
    addressed_to_this_node(&mut asm);
    // Outer: IPv4 without options to this node, UDP, not a fragment, to the VXLAN port.
    asm.load(Size::H, Reg::R4, Reg::R2, ETH_PROTO)
        .jump32_imm(Cond::Ne, Reg::R4, ETH_P_IP_WIRE, "pass")
        .load(Size::B, Reg::R4, Reg::R2, IP_VERSION_IHL)
        .jump32_imm(Cond::Ne, Reg::R4, IPV4_NO_OPTIONS, "pass")
        .load(Size::B, Reg::R4, Reg::R2, IP_PROTOCOL)
        .jump32_imm(Cond::Ne, Reg::R4, UDP_PROTOCOL, "pass")
        .load(Size::H, Reg::R4, Reg::R2, IP_FRAG)
        .alu32_imm(Alu::And, Reg::R4, IP_FRAGMENT_WIRE)
        .jump32_imm(Cond::Ne, Reg::R4, 0, "pass")
        // A congestion mark on the outer header is the device's to carry over to the inner one
        // (or to drop the packet, for an inner header that is not ECN-capable: RFC 6040).
        .load(Size::B, Reg::R4, Reg::R2, IP_TOS)
        .alu32_imm(Alu::And, Reg::R4, ECN_MASK)
        .jump32_imm(Cond::Eq, Reg::R4, ECN_CE, "pass")
        .load(Size::W, Reg::R4, Reg::R2, IP_DST)
        .jump32_imm(Cond::Ne, Reg::R4, wire(tunnel.local), "pass")
        .load(Size::H, Reg::R4, Reg::R2, UDP_DEST)
        .jump32_imm(Cond::Ne, Reg::R4, tunnel.port_wire(), "pass")
        // VXLAN with tug's VNI and no other flags.
        .load(Size::W, Reg::R4, Reg::R2, VXLAN_FLAGS)
        .jump32_imm(Cond::Ne, Reg::R4, VXLAN_FLAGS_WIRE, "pass")
        .load(Size::W, Reg::R4, Reg::R2, VXLAN_VNI)
        .jump32_imm(Cond::Ne, Reg::R4, tunnel.vni_wire(), "pass")
        // From a recorded peer node: anything else is the VXLAN device's, behind the node's
        // netfilter rules.
        .load(Size::W, Reg::R4, Reg::R2, IP_SRC)
        .store(Size::W, Reg::R10, KEY, Reg::R4)
        .load_map_fd(Reg::R1, tunnel.nodes.as_raw_fd())
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(KEY))
        .call(MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, Reg::R0, 0, "pass");
    linear(&mut asm, VXLAN_HEADERS, "pass");
    // Inner: what `ipv4_prologue` checks, from the cluster to a local container.
    asm.load(Size::H, Reg::R4, Reg::R2, INNER + ETH_PROTO)
        .jump32_imm(Cond::Ne, Reg::R4, ETH_P_IP_WIRE, "pass")
        .load(Size::B, Reg::R4, Reg::R2, INNER_IP)
        .jump32_imm(Cond::Ne, Reg::R4, IPV4_NO_OPTIONS, "pass")
        .load(Size::B, Reg::R4, Reg::R2, INNER + IP_TTL)
        .jump32_imm(Cond::Le, Reg::R4, 1, "pass")
        .load(Size::W, Reg::R7, Reg::R2, INNER + IP_SRC)
        .load(Size::W, Reg::R8, Reg::R2, INNER + IP_DST);
    require(&mut asm, Reg::R8, local, true, "pass");
    require(&mut asm, Reg::R7, cluster, true, "pass");
    container_veth(&mut asm, routes);
    asm.mov(Reg::R1, Reg::R6)
        .mov_imm(Reg::R2, -VXLAN_OVERHEAD)
        .mov_imm(Reg::R3, ADJ_ROOM_MAC)
        .mov_imm(Reg::R4, ADJ_ROOM_FIXED_GSO as i32)
        .call(SKB_ADJUST_ROOM)
        // It fails before changing anything (no memory to unshare the packet).
        .jump_imm(Cond::Ne, Reg::R0, 0, "pass");
    count(&mut asm, stats, STAT_DECAPSULATED, "decapsulated");
    deliver(&mut asm, local, stats);
    pass(&mut asm);
    asm.finish()
}

/// On to `pass` unless the frame was addressed to this node (not seen in promiscuous mode) and
/// not to a VLAN device on top.
fn addressed_to_this_node(asm: &mut Asm) {
    asm.load(Size::W, Reg::R4, Reg::R6, SKB_PKT_TYPE)
        .jump32_imm(Cond::Ne, Reg::R4, PACKET_HOST, "pass")
        .load(Size::W, Reg::R4, Reg::R6, SKB_VLAN_PRESENT)
        .jump32_imm(Cond::Ne, Reg::R4, 0, "pass");
}

/// R9 = the host veth of the local container at R8, from the route map; on to `pass` if none.
fn container_veth(asm: &mut Asm, routes: &OwnedFd) {
    asm.store(Size::W, Reg::R10, KEY, Reg::R8)
        .load_map_fd(Reg::R1, routes.as_raw_fd())
        .mov(Reg::R2, Reg::R10)
        .alu64_imm(Alu::Add, Reg::R2, i32::from(KEY))
        .call(MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, Reg::R0, 0, "pass")
        .load(Size::W, Reg::R9, Reg::R0, 0);
}

/// Count the packet, address it from the gateway to the container at R8, take one off its TTL
/// and put it into the namespace behind the host veth in R9.
fn deliver(asm: &mut Asm, local: Subnet, stats: &OwnedFd) {
    count(asm, stats, STAT_TO_CONTAINERS, "counted");
    packet_pointers(asm);
    asm.store_imm(Size::H, Reg::R2, 0, MAC_PREFIX_WIRE)
        .store(Size::W, Reg::R2, 2, Reg::R8)
        .store_imm(Size::H, Reg::R2, 6, MAC_PREFIX_WIRE)
        .store_imm(Size::W, Reg::R2, 8, wire(local.gateway()));
    decrement_ttl(asm, "ttl");
    asm.mov(Reg::R1, Reg::R9)
        .mov_imm(Reg::R2, 0)
        .call(REDIRECT_PEER)
        .exit();
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
