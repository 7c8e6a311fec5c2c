//! The node's container network (DESIGN.md, "Network"), driving `tug-netplugin`: the bridge,
//! the cross-host mode (host-gw routes or VXLAN), masquerade and the service DNS server are set
//! up once the controller has given the node its subnet; each container is attached between
//! create and start (veth, address, `/etc/hosts`, `/etc/resolv.conf`, published ports) and
//! detached when it is removed. The network map the controller streams keeps the peers and the
//! DNS table current.
//!
//! The subnet is saved under `DATA/network/`, so a restarted agent sets the node up and restarts
//! containers before any controller answers; container addresses survive in the plugin's IPAM
//! file there too.

mod etc;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tug_api::v1::NetworkMap;
use tug_netplugin::cni::CniNetwork;
use tug_netplugin::container::CONTAINER_IFNAME;
use tug_netplugin::dns::{self, DnsTable};
use tug_netplugin::fastpath::{FastPath, FastPathConfig, TunnelConfig};
use tug_netplugin::nat::{self, PortMapping};
use tug_netplugin::node::DEFAULT_BRIDGE;
use tug_netplugin::vxlan::{DEFAULT_DEVICE, DEFAULT_PORT, DEFAULT_VNI};
use tug_netplugin::{ContainerNet, HostGwConfig, Mode, NodeConfig, Subnet, VxlanConfig};

/// How containers on different nodes reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Containers get no network (only loopback).
    None,
    #[default]
    HostGw,
    Vxlan,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetworkMode::None),
            "host-gw" => Ok(NetworkMode::HostGw),
            "vxlan" => Ok(NetworkMode::Vxlan),
            other => Err(format!(
                "network mode {other:?} is not one of host-gw, vxlan, none"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Plugin(#[from] tug_netplugin::Error),
    #[error("the node has no container subnet yet (no controller has answered)")]
    NotReady,
    #[error("the node network could not be set up: {0}")]
    SetupFailed(String),
    #[error("the controller gave an invalid subnet {0:?}")]
    BadSubnet(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serve DNS on {address}: {source}")]
    Dns {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The saved subnet (`DATA/network/node.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    subnet: Subnet,
    cluster_cidr: Subnet,
}

/// What one container asks of the network.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub id: String,
    pub namespace: String,
    pub hostname: String,
    pub netns_path: PathBuf,
    /// The mounted rootfs, where `/etc/hosts` and `/etc/resolv.conf` go.
    pub rootfs: PathBuf,
    pub ports: Vec<PortMapping>,
}

/// Standard CNI plugins for containers instead of the built-in setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// Where the network configuration is (`--cni-conf-dir`).
    pub conf_dir: PathBuf,
    /// Where the plugin binaries are (`--cni-bin-dir`).
    pub bin_dir: PathBuf,
}

/// The node's eBPF fast path once loaded; shared with the metrics, which read its counters.
pub type FastPathSlot = Arc<Mutex<Option<Arc<FastPath>>>>;

/// The node's network; shared by the worker's parts.
#[derive(Debug)]
pub struct NodeNetwork {
    mode: NetworkMode,
    cni_settings: Option<CniSettings>,
    /// Loaded at setup (it names the node's subnet).
    cni: Mutex<Option<Arc<CniNetwork>>>,
    dir: PathBuf,
    node_ip: Ipv4Addr,
    state: Mutex<Option<Saved>>,
    /// Serialises setup and peer syncs.
    setup: tokio::sync::Mutex<()>,
    dns: Arc<DnsTable>,
    dns_server: Mutex<Option<(Ipv4Addr, JoinHandle<()>)>>,
    /// Why the last setup failed, for tasks that cannot be attached meanwhile.
    failure: Mutex<Option<String>>,
    /// The revision of the newest network map applied.
    map_revision: AtomicU64,
    /// Containers with published ports, as the NAT rules said at start and as attach and
    /// detach changed them since; `None` if the rules could not be read (every detach then asks
    /// iptables). Spares a removal without ports two iptables runs.
    published: Mutex<Option<BTreeSet<String>>>,
    /// Whether to load the eBPF fast path (built-in plugin only).
    fast_path_wanted: bool,
    /// The loaded fast path; `None` when off, not supported or not set up yet.
    fast_path: FastPathSlot,
    /// The peers of the last map synced, for a fast path loaded afterwards (vxlan).
    peers: Mutex<Vec<(Subnet, Ipv4Addr)>>,
    /// Whether to raise the uplink's IPv4 GSO limit for BIG TCP (never with CNI plugins).
    big_tcp: bool,
    /// The IPv4 GSO limit node setup gave container veths; 0: the kernel's default.
    container_gso: AtomicU32,
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        if let Some((_, task)) = self.lock_dns().take() {
            task.abort();
        }
    }
}

impl NodeNetwork {
    /// The network of a node at `node_ip`, keeping its files in `DATA/network`. A subnet saved
    /// by an earlier run is set up again at once.
    pub async fn open(
        mode: NetworkMode,
        cni: Option<CniSettings>,
        fast_path: bool,
        big_tcp: bool,
        data_dir: &Path,
        node_ip: Ipv4Addr,
    ) -> Result<NodeNetwork, NetworkError> {
        let dir = data_dir.join("network");
        // CNI plugins make their own veths at 64 KiB: an uplink raised for them would only
        // build packets to be segmented on their way in.
        if big_tcp && cni.is_some() {
            tracing::warn!("--big-tcp is not used with CNI plugins (their veths keep 64 KiB)");
        }
        let big_tcp = big_tcp && cni.is_none();
        let net = NodeNetwork {
            mode,
            cni_settings: cni,
            cni: Mutex::new(None),
            dir,
            node_ip,
            state: Mutex::new(None),
            setup: tokio::sync::Mutex::new(()),
            dns: Arc::new(DnsTable::default()),
            dns_server: Mutex::new(None),
            failure: Mutex::new(None),
            map_revision: AtomicU64::new(0),
            published: Mutex::new(None),
            fast_path_wanted: fast_path,
            fast_path: FastPathSlot::default(),
            peers: Mutex::new(Vec::new()),
            big_tcp,
            container_gso: AtomicU32::new(0),
        };
        if mode == NetworkMode::None {
            return Ok(net);
        }
        std::fs::create_dir_all(&net.dir).map_err(|source| NetworkError::Io {
            what: "create",
            path: net.dir.clone(),
            source,
        })?;
        if let Some(saved) = net.load()? {
            // Failing here must not keep the agent from supervising what it runs: tasks that
            // need the network fail with the reason, and registration tries again.
            if let Err(e) = net.set_up(saved).await {
                tracing::error!(cause = %e, subnet = %saved.subnet, "cannot set up the saved node network");
                net.set_failure(e.to_string());
            }
        }
        if let Ok(Ok(rules)) = tokio::task::spawn_blocking(nat::published).await {
            *net.lock_published() = Some(rules.into_iter().map(|p| p.id).collect());
        }
        Ok(net)
    }

    pub fn enabled(&self) -> bool {
        self.mode != NetworkMode::None
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Option<Saved>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot holding the node's fast path (for its metrics).
    pub fn fast_path_slot(&self) -> FastPathSlot {
        self.fast_path.clone()
    }

    fn fast_path(&self) -> Option<Arc<FastPath>> {
        self.fast_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The containers holding an address in `subnet` (IPAM's `id -> address`); none if the file
    /// cannot be read.
    fn allocations(&self, subnet: Subnet) -> std::collections::BTreeMap<String, Ipv4Addr> {
        tug_netplugin::Ipam::open(self.dir.join("ipam"), subnet)
            .and_then(|ipam| ipam.allocations())
            .unwrap_or_default()
    }

    /// Load the fast path for `saved` (replacing an earlier one, on this node's hooks too) and
    /// attach the containers already running. Without it, traffic takes the normal path: a
    /// failure is logged, not returned.
    async fn set_up_fast_path(
        &self,
        saved: Saved,
        uplink: Option<String>,
        running: &std::collections::BTreeMap<String, Ipv4Addr>,
    ) {
        // In vxlan mode with an uplink, the programs carry VXLAN themselves (the device stays
        // for what they pass on); their program on the uplink goes with them.
        let (ingress, tunnel) = match self.mode {
            NetworkMode::Vxlan => (
                Some(DEFAULT_DEVICE.to_string()),
                TunnelConfig::of(&self.vxlan_config(saved, uplink, 0)),
            ),
            _ => (uplink, None),
        };
        let loaded = if self.fast_path_wanted && self.cni_settings.is_none() {
            let cfg = FastPathConfig {
                cluster_cidr: saved.cluster_cidr,
                subnet: saved.subnet,
                ingress: ingress.clone(),
                tunnel: tunnel.clone(),
            };
            match FastPath::setup(&cfg).await {
                Ok(fast) => {
                    let adopted = fast.adopt(running).await;
                    let peers = self.lock_peers().clone();
                    if let Err(e) = fast.set_peers(&peers) {
                        tracing::warn!(cause = %e, "VXLAN peers left to the VXLAN device");
                    }
                    tracing::info!(
                        containers = adopted,
                        vxlan = tunnel.is_some(),
                        "eBPF fast path between nodes on"
                    );
                    Some(Arc::new(fast))
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "no eBPF fast path: traffic between nodes takes the bridge and IP forwarding");
                    None
                }
            }
        } else {
            None
        };
        if loaded.is_none() {
            // Left by an earlier run with the fast path on: those on the node's devices would
            // route by maps nothing updates any more, those on running containers' veths would
            // keep their traffic off the normal path.
            match tug_netplugin::fastpath::remove_node_programs_everywhere().await {
                Ok(removed) => {
                    for interface in removed {
                        tracing::info!(%interface, "fast-path program removed");
                    }
                }
                Err(e) => tracing::warn!(cause = %e, "fast-path programs not looked for"),
            }
            let veths = running
                .keys()
                .map(|id| tug_netplugin::container::host_veth_name(id));
            for interface in veths {
                match tug_netplugin::fastpath::remove_from(&interface).await {
                    Ok(false) => {}
                    Ok(true) => tracing::info!(%interface, "fast-path program removed"),
                    // No such interface (a container gone meanwhile): nothing of ours is there.
                    Err(e) => {
                        tracing::debug!(%interface, cause = %e, "fast-path program not removed")
                    }
                }
            }
        }
        *self.fast_path.lock().unwrap_or_else(|p| p.into_inner()) = loaded;
    }

    fn lock_peers(&self) -> std::sync::MutexGuard<'_, Vec<(Subnet, Ipv4Addr)>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_published(&self) -> std::sync::MutexGuard<'_, Option<BTreeSet<String>>> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_dns(&self) -> std::sync::MutexGuard<'_, Option<(Ipv4Addr, JoinHandle<()>)>> {
        self.dns_server.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The controller's answer to a registration: set the node up for `subnet` (nothing to do
    /// when it is what the node has).
    pub async fn configure(&self, subnet: &str, cluster_cidr: &str) -> Result<(), NetworkError> {
        if !self.enabled() || subnet.is_empty() {
            return Ok(());
        }
        let parse = |s: &str| {
            s.parse::<Subnet>()
                .map_err(|_| NetworkError::BadSubnet(s.to_string()))
        };
        let wanted = Saved {
            subnet: parse(subnet)?,
            cluster_cidr: parse(cluster_cidr)?,
        };
        if *self.lock_state() == Some(wanted) {
            return Ok(());
        }
        // The saved file, not the state: a setup that failed at start left the state empty.
        if let Some(old) = self.load()?.filter(|old| old.subnet != wanted.subnet) {
            // The node was given another subnet (it was removed from the cluster and came
            // back): the old addresses mean nothing in the new one.
            self.forget_addresses(old.subnet);
        }
        self.set_up(wanted).await?;
        self.save(wanted)
    }

    async fn set_up(&self, saved: Saved) -> Result<(), NetworkError> {
        let _one = self.setup.lock().await;
        // A node known by a loopback address (`tug up`) has no uplink to take the MTU from.
        let uplink = if self.node_ip.is_loopback() {
            None
        } else {
            tug_netplugin::node::interface_with_address(self.node_ip).await?
        };
        let mode = match self.mode {
            NetworkMode::Vxlan => Mode::Vxlan,
            _ => Mode::HostGw,
        };
        let node = tug_netplugin::setup_node(&NodeConfig {
            bridge: DEFAULT_BRIDGE.into(),
            subnet: saved.subnet,
            uplink: uplink.clone(),
            mode,
            big_tcp: self.big_tcp,
        })
        .await?;
        self.container_gso
            .store(node.gso_ipv4_max_size.unwrap_or(0), Ordering::SeqCst);
        if self.mode == NetworkMode::Vxlan {
            tug_netplugin::setup_vxlan(&self.vxlan_config(saved, uplink.clone(), node.mtu)).await?;
        }
        let (subnet, cidr) = (saved.subnet, saved.cluster_cidr);
        tokio::task::spawn_blocking(move || nat::setup_nat(subnet, cidr))
            .await
            .map_err(|e| NetworkError::Internal(e.to_string()))??;
        // Containers that kept running across an agent restart.
        let running = self.allocations(saved.subnet);
        self.set_up_fast_path(saved, uplink.clone(), &running).await;
        if self.cni_settings.is_none() {
            // Those wired by an agent without hairpin mode get it, and the limit chosen now.
            tug_netplugin::container::ensure_running(running.keys(), node.gso_ipv4_max_size).await;
        }
        if let Some(settings) = &self.cni_settings {
            let loaded = CniNetwork::load(
                &settings.conf_dir,
                &settings.bin_dir,
                &self.dir,
                saved.subnet,
            )?;
            tracing::info!(file = %loaded.file.display(), network = %loaded.name, "containers are attached by CNI plugins");
            *self.cni.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(loaded));
        }
        self.start_dns(saved.subnet.gateway(), saved.subnet.prefix())
            .await?;
        *self.lock_state() = Some(saved);
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(subnet = %saved.subnet, mode = ?self.mode, mtu = node.mtu, container_gso = ?node.gso_ipv4_max_size, "node network set up");
        Ok(())
    }

    fn vxlan_config(&self, saved: Saved, uplink: Option<String>, mtu: u32) -> VxlanConfig {
        VxlanConfig {
            device: DEFAULT_DEVICE.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            local: self.node_ip,
            uplink,
            mtu,
            subnets: HostGwConfig {
                cluster_cidr: saved.cluster_cidr,
                own_subnet: saved.subnet,
            },
        }
    }

    /// Serve DNS at the bridge address (again, if the address changed).
    async fn start_dns(&self, at: Ipv4Addr, subnet_prefix: u8) -> Result<(), NetworkError> {
        if self.lock_dns().as_ref().is_some_and(|(a, _)| *a == at) {
            return Ok(());
        }
        let address = SocketAddr::from((at, 53));
        let socket = tokio::net::UdpSocket::bind(address)
            .await
            .map_err(|source| NetworkError::Dns { address, source })?;
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| dns::nameservers(&t))
            .unwrap_or_default();
        let tcp = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| NetworkError::Dns { address, source })?;
        let clients = Subnet::new(at, subnet_prefix)?;
        let upstreams = Arc::new(upstreams);
        let udp = dns::serve(socket, clients, self.dns.clone(), upstreams.clone());
        let tcp = dns::serve_tcp(tcp, clients, self.dns.clone(), upstreams);
        let task = tokio::spawn(async move {
            tokio::join!(udp, tcp);
        });
        if let Some((_, old)) = self.lock_dns().replace((at, task)) {
            old.abort();
        }
        Ok(())
    }

    /// Drops the IPAM state of `old` (and kept CNI results): their containers were stopped with
    /// the node's removal, and `del` still removes their veths by name.
    fn forget_addresses(&self, old: Subnet) {
        for dir in [self.dir.join("ipam"), self.dir.join("cni")] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::warn!(%old, dir = %dir.display(), "the node has a new subnet: addresses of the old one forgotten")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), cause = %e, "cannot forget the old subnet's addresses")
                }
            }
        }
    }

    fn node_file(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    fn load(&self) -> Result<Option<Saved>, NetworkError> {
        let path = self.node_file();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(saved) => Ok(Some(saved)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "ignoring an unreadable saved subnet");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NetworkError::Io {
                what: "read",
                path,
                source,
            }),
        }
    }

    fn save(&self, saved: Saved) -> Result<(), NetworkError> {
        let path = self.node_file();
        let tmp = path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec(&saved).map_err(|e| NetworkError::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| NetworkError::Io {
                what: "write",
                path,
                source,
            })
    }

    /// A session began at the controller's `revision`: a cluster rebuilt from scratch counts
    /// revisions from 1 again, so older maps count again.
    pub fn session_started(&self, revision: u64) {
        if revision < self.map_revision.load(Ordering::SeqCst) {
            self.map_revision.store(0, Ordering::SeqCst);
        }
    }

    /// Remember why setting the node up failed.
    pub fn set_failure(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn container_net(&self, id: &str, netns_path: PathBuf) -> Result<ContainerNet, NetworkError> {
        let saved = self.lock_state().ok_or_else(|| {
            match self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                Some(why) => NetworkError::SetupFailed(why),
                None => NetworkError::NotReady,
            }
        })?;
        Ok(ContainerNet {
            id: id.to_string(),
            netns_path,
            bridge: DEFAULT_BRIDGE.into(),
            subnet: saved.subnet,
            state_dir: self.dir.join("ipam"),
            gso_ipv4_max_size: Some(self.container_gso.load(Ordering::SeqCst))
                .filter(|size| *size != 0),
        })
    }

    /// Wire a created container in: veth and address, `/etc` files, published ports. On error
    /// nothing of it stays.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Ipv4Addr, NetworkError> {
        let net = self.container_net(&req.id, req.netns_path.clone())?;
        let gateway = net.subnet.gateway();
        let address = match self.cni_network() {
            Some(cni) => {
                let (id, netns) = (req.id.clone(), req.netns_path.clone());
                tokio::task::spawn_blocking(move || {
                    // A restart attaches a new namespace: what the old one held goes first
                    // (host-local refuses a second lease for the same container).
                    if cni.address_of(&id).is_some()
                        && let Err(e) = cni.del(&id, &netns, CONTAINER_IFNAME)
                    {
                        tracing::warn!(container = %id, cause = %e, "CNI DEL before a re-attach failed");
                    }
                    cni.add(&id, &netns, CONTAINER_IFNAME)
                })
                .await
                .map_err(|e| NetworkError::Internal(e.to_string()))??
            }
            None => {
                let attachment = tug_netplugin::add(&net).await?;
                if let Some(fast) = self.fast_path()
                    && let Err(e) = fast.attach(&attachment.host_veth, attachment.address).await
                {
                    tracing::warn!(container = %req.id, cause = %e, "container left on the normal path");
                }
                attachment.address
            }
        };
        let finish = {
            let req = req.clone();
            tokio::task::spawn_blocking(move || -> Result<(), NetworkError> {
                write_etc(&req, address, gateway)?;
                nat::publish(&req.id, address, &req.ports)?;
                Ok(())
            })
            .await
            .map_err(|e| NetworkError::Internal(e.to_string()))
            .and_then(|r| r)
        };
        if let Err(e) = finish {
            if let Err(cleanup) = self.remove_container_net(net).await {
                tracing::warn!(container = %req.id, cause = %cleanup, "cleanup after a failed attach");
            }
            return Err(e);
        }
        if !req.ports.is_empty()
            && let Some(ids) = self.lock_published().as_mut()
        {
            ids.insert(req.id.clone());
        }
        Ok(address)
    }

    fn cni_network(&self) -> Option<Arc<CniNetwork>> {
        self.cni.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn remove_container_net(&self, net: ContainerNet) -> Result<(), NetworkError> {
        match self.cni_network() {
            Some(cni) => tokio::task::spawn_blocking(move || {
                cni.del(&net.id, &net.netns_path, CONTAINER_IFNAME)
            })
            .await
            .map_err(|e| NetworkError::Internal(e.to_string()))??,
            None => {
                if let Some(fast) = self.fast_path()
                    && let Some(address) = self.address_of(&net.id)
                    && let Err(e) = fast.detach(address)
                {
                    tracing::warn!(container = %net.id, cause = %e, "cannot remove the container from the fast path");
                }
                tug_netplugin::del(&net).await?
            }
        }
        Ok(())
    }

    /// Undo [`NodeNetwork::attach`]: ports, veth, address. Nothing to do is fine.
    pub async fn detach(&self, id: &str) -> Result<(), NetworkError> {
        if !self.enabled() {
            return Ok(());
        }
        // Both halves run whatever the other did; the first error is returned.
        let has_ports = self.lock_published().as_ref().map(|ids| ids.contains(id));
        let unpublished = if has_ports == Some(false) {
            Ok(())
        } else {
            let id2 = id.to_string();
            tokio::task::spawn_blocking(move || nat::unpublish(&id2))
                .await
                .map_err(|e| NetworkError::Internal(e.to_string()))
                .and_then(|r| r.map(|_| ()).map_err(NetworkError::from))
        };
        if unpublished.is_ok()
            && let Some(ids) = self.lock_published().as_mut()
        {
            ids.remove(id);
        }
        // The namespace is gone by now; CNI plugins are told its old path all the same.
        let netns = self.dir.join("gone");
        let removed = match self.container_net(id, netns) {
            Ok(net) => self.remove_container_net(net).await,
            // Never set up: nothing was attached.
            Err(NetworkError::NotReady | NetworkError::SetupFailed(_)) => Ok(()),
            Err(e) => Err(e),
        };
        unpublished.and(removed)
    }

    /// Releases what containers that no longer exist still hold (an agent killed between
    /// removing a container and detaching it): addresses, veths, published ports, CNI leases.
    /// Run before any container is created, with every container the runtime knows.
    pub async fn collect_garbage(&self, live: &BTreeSet<String>) {
        if !self.enabled() || self.lock_state().is_none() {
            return;
        }
        let mut stale: BTreeSet<String> = self.lock_published().clone().unwrap_or_default();
        match self.cni_network() {
            Some(cni) => stale.extend(cni.attached()),
            None => {
                if let Some(saved) = *self.lock_state()
                    && let Ok(ipam) = tug_netplugin::Ipam::open(self.dir.join("ipam"), saved.subnet)
                {
                    stale.extend(ipam.allocations().unwrap_or_default().into_keys());
                }
            }
        }
        stale.retain(|id| !live.contains(id));
        for id in stale {
            match self.detach(&id).await {
                Ok(()) => {
                    tracing::info!(container = %id, "released the network of a container that is gone")
                }
                Err(e) => {
                    tracing::warn!(container = %id, cause = %e, "cannot release the network of a container that is gone")
                }
            }
        }
    }

    /// The address a container holds (after an agent restart: from IPAM).
    pub fn address_of(&self, id: &str) -> Option<Ipv4Addr> {
        if let Some(cni) = self.cni_network() {
            return cni.address_of(id);
        }
        let saved = (*self.lock_state())?;
        tug_netplugin::Ipam::open(self.dir.join("ipam"), saved.subnet)
            .ok()?
            .get(id)
            .ok()?
    }

    /// Program the peers and the DNS table from the controller's map. A map from before the
    /// cluster network was known, or older than one applied already (a lagging replica), is
    /// ignored; peers that cannot be routed (outside the cluster CIDR, overlapping this node's
    /// or another peer's subnet, a node address inside the CIDR) are left out, not the whole map.
    pub async fn sync(&self, map: &NetworkMap) -> Result<(), NetworkError> {
        if map.cluster_cidr.is_empty() {
            return Ok(());
        }
        let newest = self.map_revision.fetch_max(map.revision, Ordering::SeqCst);
        if map.revision < newest {
            return Ok(());
        }
        let services = map.services.iter().map(|s| {
            let addrs: Vec<Ipv4Addr> = s.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            (s.namespace.as_str(), s.name.as_str(), addrs)
        });
        self.dns.set_services(services);
        let Some(saved) = *self.lock_state() else {
            return Ok(());
        };
        let mut peers: Vec<(Subnet, Ipv4Addr)> = Vec::new();
        for p in &map.peers {
            let (Ok(subnet), Ok(ip)) = (p.subnet.parse::<Subnet>(), p.node_ip.parse::<Ipv4Addr>())
            else {
                continue;
            };
            let routable = saved.cluster_cidr.contains_subnet(&subnet)
                && !subnet.overlaps(&saved.subnet)
                && !saved.cluster_cidr.contains(ip)
                && !peers.iter().any(|(other, _)| other.overlaps(&subnet));
            if routable {
                peers.push((subnet, ip));
            } else if subnet != saved.subnet {
                tracing::warn!(peer = %p.name, %subnet, node_ip = %ip, "peer left out: it cannot be routed");
            }
        }
        let _one = self.setup.lock().await;
        let cfg = HostGwConfig {
            cluster_cidr: saved.cluster_cidr,
            own_subnet: saved.subnet,
        };
        let changed = match self.mode {
            NetworkMode::None => return Ok(()),
            NetworkMode::HostGw => tug_netplugin::sync_peer_routes(&cfg, &peers).await?,
            NetworkMode::Vxlan => {
                let vx = self.vxlan_config(saved, None, 0);
                let changed = tug_netplugin::sync_vxlan_peers(&vx, &peers).await;
                // Also after a failed sync: the programs follow the map, not a device half
                // brought up to date.
                if let Some(fast) = self.fast_path()
                    && let Err(e) = fast.set_peers(&peers)
                {
                    tracing::warn!(cause = %e, "VXLAN peers left to the VXLAN device");
                }
                *self.lock_peers() = peers.clone();
                changed?
            }
        };
        if !changed.added.is_empty() || !changed.removed.is_empty() {
            tracing::info!(
                added = changed.added.len(),
                removed = changed.removed.len(),
                peers = peers.len(),
                "peer routes synced"
            );
        }
        Ok(())
    }
}

fn write_etc(
    req: &AttachRequest,
    address: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<(), NetworkError> {
    let hosts = tug_netplugin::etc_files::hosts(&req.hostname, address, &[]);
    let search = dns::search_domains(&req.namespace);
    let search: Vec<&str> = search.iter().map(String::as_str).collect();
    let resolv = tug_netplugin::etc_files::resolv_conf(&[gateway.into()], &search, &[]);
    for (name, text) in [("hosts", hosts), ("resolv.conf", resolv)] {
        etc::write_etc_file(&req.rootfs, name, &text).map_err(|source| NetworkError::Io {
            what: "write /etc file",
            path: req.rootfs.join("etc").join(name),
            source,
        })?;
    }
    Ok(())
}
