//! Two "nodes" for cross-host tests: namespaces joined by a veth pair (their shared L2, addresses
//! 192.168.250.0/24), each with its own bridge (node subnets 10.88.1.0/24 and 10.88.2.0/24) and
//! one container namespace wired to it. No peer routes: each test programs those.

use std::net::Ipv4Addr;

use tug_netplugin::big_tcp::set_ipv4_gso_gro_limit;
use tug_netplugin::fastpath::{FastPath, FastPathConfig, TunnelConfig};
use tug_netplugin::nat::{self, PortMapping, Protocol};
use tug_netplugin::netns::block_in_netns;
use tug_netplugin::vxlan::{DEFAULT_DEVICE, DEFAULT_PORT, DEFAULT_VNI};
use tug_netplugin::{
    Attachment, ContainerNet, HostGwConfig, Mode, NodeConfig, RouteSync, Subnet, VxlanConfig, add,
    setup_node, setup_vxlan, sync_peer_routes, sync_vxlan_peers,
};

use super::{TestNs, TestResult, subnet};

pub const CLUSTER: &str = "10.88.0.0/16";

#[derive(Debug)]
pub struct Node {
    pub ns: TestNs,
    pub ctr: TestNs,
    pub subnet: Subnet,
    pub address: Ipv4Addr,
    pub mode: Mode,
    /// whether node setup raises the uplink's GSO limit for BIG TCP
    pub big_tcp: bool,
    /// what the last node setup gave containers
    pub container_gso: Option<u32>,
    /// the container's, once set up
    attachment: Option<Attachment>,
    state: tempfile::TempDir,
    /// the peers of the last sync, which a fast path set up afterwards records
    peers: std::sync::Mutex<Vec<(Subnet, Ipv4Addr)>>,
}

impl Node {
    fn new(role: &str, subnet_text: &str, address: Ipv4Addr, mode: Mode) -> TestResult<Node> {
        Ok(Node {
            ns: TestNs::new(role)?,
            ctr: TestNs::new(&format!("{role}c"))?,
            subnet: subnet(subnet_text)?,
            address,
            mode,
            big_tcp: false,
            container_gso: None,
            attachment: None,
            state: tempfile::tempdir()?,
            peers: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn subnets(&self) -> TestResult<HostGwConfig> {
        Ok(HostGwConfig {
            cluster_cidr: subnet(CLUSTER)?,
            own_subnet: self.subnet,
        })
    }

    fn vxlan(&self, mtu: u32) -> TestResult<VxlanConfig> {
        Ok(VxlanConfig {
            device: DEFAULT_DEVICE.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            local: self.address,
            uplink: Some("wire".into()),
            mtu,
            subnets: self.subnets()?,
        })
    }

    /// What node setup is given.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            bridge: "tug0".into(),
            subnet: self.subnet,
            uplink: Some("wire".into()),
            mode: self.mode,
            big_tcp: self.big_tcp,
        }
    }

    /// Node setup (plus the VXLAN device in vxlan mode) and one container.
    fn setup(&mut self) -> TestResult {
        let cfg = self.node_config();
        let node = block_in_netns(&self.ns.path(), || setup_node(&cfg))?;
        if self.mode == Mode::Vxlan {
            let vx = self.vxlan(node.mtu)?;
            block_in_netns(&self.ns.path(), || setup_vxlan(&vx))?;
        }
        self.container_gso = node.gso_ipv4_max_size;
        let net = self.container_net()?;
        self.attachment = Some(block_in_netns(&self.ns.path(), || add(&net))?);
        Ok(())
    }

    /// The container's network request, as `setup` makes it.
    pub fn container_net(&self) -> TestResult<ContainerNet> {
        Ok(ContainerNet {
            id: format!("{}-ctr", self.ns.name()),
            netns_path: self.ctr.path(),
            bridge: "tug0".into(),
            subnet: self.subnet,
            state_dir: self.state.path().to_path_buf(),
            gso_ipv4_max_size: self.container_gso,
        })
    }

    /// Everything `setup` did, again (as at an agent restart).
    pub fn setup_again(&mut self) -> TestResult {
        self.setup()
    }

    /// Program the peers the node's mode calls for.
    pub fn sync(&self, peers: &[(Subnet, Ipv4Addr)]) -> TestResult<RouteSync> {
        *self.peers.lock().map_err(|_| "poisoned")? = peers.to_vec();
        match self.mode {
            Mode::HostGw => {
                let cfg = self.subnets()?;
                Ok(block_in_netns(&self.ns.path(), || {
                    sync_peer_routes(&cfg, peers)
                })?)
            }
            Mode::Vxlan => {
                let cfg = self.vxlan(0)?;
                Ok(block_in_netns(&self.ns.path(), || {
                    sync_vxlan_peers(&cfg, peers)
                })?)
            }
        }
    }

    pub fn container_address(&self) -> TestResult<Ipv4Addr> {
        Ok(self.attachment.as_ref().ok_or("node not set up")?.address)
    }

    /// The eBPF fast path set up on this node as the agent sets it up (in vxlan mode carrying
    /// VXLAN itself, with the peers of the last sync), with its container attached.
    pub fn fast_path(&self) -> TestResult<FastPath> {
        self.fast_path_with(self.mode == Mode::Vxlan)
    }

    /// The same, in vxlan mode with the VXLAN device carrying VXLAN (`tunnel` false).
    pub fn fast_path_with(&self, tunnel: bool) -> TestResult<FastPath> {
        let cfg = FastPathConfig {
            cluster_cidr: subnet(CLUSTER)?,
            subnet: self.subnet,
            ingress: Some(match self.mode {
                Mode::HostGw => "wire".into(),
                Mode::Vxlan => DEFAULT_DEVICE.into(),
            }),
            tunnel: if tunnel {
                TunnelConfig::of(&self.vxlan(0)?)
            } else {
                None
            },
        };
        let attachment = self.attachment.as_ref().ok_or("node not set up")?;
        let (veth, address) = (attachment.host_veth.clone(), attachment.address);
        let peers = self.peers.lock().map_err(|_| "poisoned")?.clone();
        Ok(block_in_netns(&self.ns.path(), || async move {
            let fast = FastPath::setup(&cfg).await?;
            fast.attach(&veth, address).await?;
            fast.set_peers(&peers)?;
            Ok(fast)
        })?)
    }

    /// The agent's NAT rules on this node, and `container_port` of its container published as
    /// `host_port`.
    pub fn publish(&self, host_port: u16, container_port: u16) -> TestResult {
        let (subnet, cluster) = (self.subnet, subnet(CLUSTER)?);
        let id = format!("{}-ctr", self.ns.name());
        let address = self.container_address()?;
        let ports = [PortMapping {
            host_port,
            container_port,
            protocol: Protocol::Tcp,
        }];
        block_in_netns(&self.ns.path(), || async move {
            nat::setup_nat(subnet, cluster)?;
            nat::publish(&id, address, &ports)
        })?;
        Ok(())
    }

    /// The container's host-side veth.
    pub fn host_veth(&self) -> TestResult<String> {
        Ok(self
            .attachment
            .as_ref()
            .ok_or("node not set up")?
            .host_veth
            .clone())
    }

    pub fn routes(&self) -> TestResult<String> {
        self.ns.ip(&["-4", "route", "show"])
    }
}

/// Two nodes on one wire, bridges and one container each, no peer routes yet.
pub fn two_nodes(mode: Mode) -> TestResult<(Node, Node)> {
    two_nodes_with(mode, false, None)
}

/// The same, with node setup's `big_tcp` as given, after setting both ends of the wire to the
/// IPv4 GSO limit `wire_gso` if one is given (as an operator tunes a NIC).
pub fn two_nodes_with(
    mode: Mode,
    big_tcp: bool,
    wire_gso: Option<u32>,
) -> TestResult<(Node, Node)> {
    let mut a = Node::new("a", "10.88.1.0/24", Ipv4Addr::new(192, 168, 250, 1), mode)?;
    let mut b = Node::new("b", "10.88.2.0/24", Ipv4Addr::new(192, 168, 250, 2), mode)?;
    a.big_tcp = big_tcp;
    b.big_tcp = big_tcp;
    a.ns.ip(&[
        "link",
        "add",
        "wire",
        "type",
        "veth",
        "peer",
        "name",
        "wireb",
        "netns",
        b.ns.name(),
    ])?;
    b.ns.ip(&["link", "set", "wireb", "name", "wire"])?;
    for n in [&a, &b] {
        n.ns.ip(&["addr", "add", &format!("{}/24", n.address), "dev", "wire"])?;
        n.ns.ip(&["link", "set", "wire", "up"])?;
        n.ns.ip(&["link", "set", "lo", "up"])?;
        if let Some(size) = wire_gso {
            block_in_netns(&n.ns.path(), || set_ipv4_gso_gro_limit("wire", size))?;
        }
    }
    a.setup()?;
    b.setup()?;
    Ok((a, b))
}

/// Routes (host-gw) or VXLAN peers from each of `a` and `b` to the other.
pub fn peer_each_other(a: &Node, b: &Node) -> TestResult {
    a.sync(&[(b.subnet, b.address)])?;
    b.sync(&[(a.subnet, a.address)])?;
    Ok(())
}

/// Each node's container pings the other's.
pub fn assert_containers_reach_each_other(a: &Node, b: &Node) -> TestResult {
    assert!(
        a.ctr.pings(b.container_address()?)?,
        "container a -> container b"
    );
    assert!(
        b.ctr.pings(a.container_address()?)?,
        "container b -> container a"
    );
    Ok(())
}
