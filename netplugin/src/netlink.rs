//! One rtnetlink connection and the few queries every module needs. A netlink socket belongs to
//! the network namespace of the thread that created it, so a [`Netlink`] is opened where it is
//! used: in the caller's namespace for host-side work, inside the container's for `eth0`.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::Handle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// A connection to the kernel's routing netlink in the current thread's network namespace.
/// Dropping it stops the connection task, so no socket or task outlives its user.
#[derive(Debug)]
pub(crate) struct Netlink {
    pub(crate) handle: Handle,
    task: JoinHandle<()>,
}

impl Netlink {
    /// Open a socket in the calling thread's network namespace; needs a tokio runtime.
    pub(crate) fn open() -> Result<Netlink> {
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(Error::NetlinkSocket)?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    /// The link named `name`, or `None` if there is none.
    pub(crate) async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let result = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match result {
            Ok(msg) => Ok(msg.map(Link::from)),
            Err(err) if is_errno(&err, Errno::ENODEV) => Ok(None),
            Err(err) => Err(Error::netlink(format!("look up interface {name:?}"))(err)),
        }
    }

    /// The name of the link with index `index`, if it exists.
    pub(crate) async fn link_name(&self, index: u32) -> Result<Option<String>> {
        let result = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await;
        let msg = match result {
            Ok(msg) => msg,
            Err(err) if is_errno(&err, Errno::ENODEV) => None,
            Err(err) => return Err(Error::netlink(format!("look up interface #{index}"))(err)),
        };
        Ok(msg.and_then(if_name))
    }

    /// Every link of this namespace, `(index, name)`.
    pub(crate) async fn links(&self) -> Result<Vec<(u32, String)>> {
        let mut dump = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(Error::netlink("list the interfaces".to_string()))?
        {
            let index = msg.header.index;
            if let Some(name) = if_name(msg) {
                out.push((index, name));
            }
        }
        Ok(out)
    }

    /// The link named `name`; missing is an error that ends with `hint`.
    pub(crate) async fn require_link(&self, name: &str, hint: &'static str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| Error::LinkNotFound {
                name: name.to_string(),
                hint,
            })
    }

    /// The IPv4 addresses (with prefix lengths) on the link with index `index`.
    pub(crate) async fn ipv4_addresses(
        &self,
        index: u32,
        name: &str,
    ) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Error::netlink(format!("list the addresses of {name:?}")))?
        {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            if let Some(addr) = local_v4(&msg) {
                found.push((addr, msg.header.prefix_len));
            }
        }
        Ok(found)
    }

    /// Every IPv4 address of the namespace: (link index, address, prefix length).
    pub(crate) async fn all_ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let mut stream = self.handle.address().get().execute();
        let mut found = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Error::netlink("list the addresses".to_string()))?
        {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            if let Some(addr) = local_v4(&msg) {
                found.push((msg.header.index, addr, msg.header.prefix_len));
            }
        }
        Ok(found)
    }

    /// The index of the link holding the IPv4 address `addr`, if any.
    pub(crate) async fn link_index_with_address(&self, addr: Ipv4Addr) -> Result<Option<u32>> {
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Error::netlink("list the addresses".to_string()))?
        {
            if msg.header.family == AddressFamily::Inet && local_v4(&msg) == Some(addr) {
                return Ok(Some(msg.header.index));
            }
        }
        Ok(None)
    }

    /// Remove `addr/prefix` from the link `index`.
    pub(crate) async fn del_ipv4_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        name: &str,
    ) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = index;
        msg.header.prefix_len = prefix;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "remove address {addr}/{prefix} from {name:?}"
            )))
    }

    /// Set a link up by index.
    pub(crate) async fn set_up(&self, index: u32, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Error::netlink(format!("set {name:?} up")))
    }

    /// Set the IPv4 GSO and GRO limits of the link `index` (see [`crate::big_tcp`]).
    pub(crate) async fn set_ipv4_gso_gro_limit(
        &self,
        index: u32,
        name: &str,
        size: u32,
    ) -> Result<()> {
        let msg = with_ipv4_gso_gro_limit(rtnetlink::LinkUnspec::new_with_index(index), Some(size))
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "set the IPv4 GSO/GRO limit of {name:?} to {size}"
            )))
    }

    /// Delete a link by name; `Ok(false)` if it did not exist.
    pub(crate) async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            // gone between the lookup and the delete (its peer's namespace was just removed)
            Err(err) if is_errno(&err, Errno::ENODEV) => Ok(false),
            Err(err) => Err(Error::netlink(format!("delete interface {name:?}"))(err)),
        }
    }
}

impl Netlink {
    /// Every IPv4 route of the main table.
    pub(crate) async fn main_ipv4_routes(&self) -> Result<Vec<Route>> {
        let mut stream = self
            .handle
            .route()
            .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut routes = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(Error::netlink("list the IPv4 routes"))?
        {
            let route = Route::from(msg);
            if route.table == u32::from(RouteHeader::RT_TABLE_MAIN) {
                routes.push(route);
            }
        }
        Ok(routes)
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `link` with the IPv4 GSO and GRO limits `size` (unchanged for `None`).
pub(crate) fn with_ipv4_gso_gro_limit(
    link: rtnetlink::LinkMessageBuilder<rtnetlink::LinkUnspec>,
    size: Option<u32>,
) -> rtnetlink::LinkMessageBuilder<rtnetlink::LinkUnspec> {
    match size {
        None => link,
        Some(size) => link
            .append_extra_attribute(LinkAttribute::GsoIpv4MaxSize(size))
            .append_extra_attribute(LinkAttribute::GroIpv4MaxSize(size)),
    }
}

/// The parts of a link message the plugin looks at.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) up: bool,
    pub(crate) mtu: Option<u32>,
    pub(crate) kind: Option<InfoKind>,
    pub(crate) controller: Option<u32>,
    pub(crate) mac: Option<Vec<u8>>,
    /// As a bridge port: whether it is in hairpin mode.
    pub(crate) hairpin: Option<bool>,
    /// The largest IPv4 GSO packet the stack hands it; `None` on kernels before 6.3, which
    /// have no separate IPv4 limit (and no IPv4 BIG TCP).
    pub(crate) gso_ipv4_max_size: Option<u32>,
    /// The largest IPv4 packet GRO builds on it; `None` as for `gso_ipv4_max_size`.
    pub(crate) gro_ipv4_max_size: Option<u32>,
    /// The largest TSO packet its driver takes.
    pub(crate) tso_max_size: Option<u32>,
}

/// The interface name a link message carries.
fn if_name(msg: LinkMessage) -> Option<String> {
    msg.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name),
        _ => None,
    })
}

impl From<LinkMessage> for Link {
    fn from(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: None,
            kind: None,
            controller: None,
            mac: None,
            hairpin: None,
            gso_ipv4_max_size: None,
            gro_ipv4_max_size: None,
            tso_max_size: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::Controller(index) => link.controller = Some(index),
                LinkAttribute::Address(mac) => link.mac = Some(mac),
                LinkAttribute::GsoIpv4MaxSize(size) => link.gso_ipv4_max_size = Some(size),
                LinkAttribute::GroIpv4MaxSize(size) => link.gro_ipv4_max_size = Some(size),
                LinkAttribute::TsoMaxSize(size) => link.tso_max_size = Some(size),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind),
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                for item in port {
                                    if let InfoBridgePort::HairpinMode(on) = item {
                                        link.hairpin = Some(on);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The parts of an IPv4 route the plugin looks at.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) destination: Ipv4Addr,
    pub(crate) prefix: u8,
    pub(crate) gateway: Option<Ipv4Addr>,
    pub(crate) oif: Option<u32>,
    pub(crate) protocol: u8,
    pub(crate) table: u32,
    pub(crate) message: RouteMessage,
}

impl From<RouteMessage> for Route {
    fn from(msg: RouteMessage) -> Route {
        let mut route = Route {
            destination: Ipv4Addr::UNSPECIFIED,
            prefix: msg.header.destination_prefix_length,
            gateway: None,
            oif: None,
            protocol: msg.header.protocol.into(),
            table: u32::from(msg.header.table),
            message: RouteMessage::default(),
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => route.destination = *a,
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => route.gateway = Some(*a),
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        route.message = msg;
        route
    }
}

/// The local IPv4 address of an address message (IFA_LOCAL, else IFA_ADDRESS).
fn local_v4(msg: &AddressMessage) -> Option<Ipv4Addr> {
    let mut fallback = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => return Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => fallback = Some(*a),
            _ => {}
        }
    }
    fallback
}

/// Whether a netlink error carries the kernel errno `errno`.
pub(crate) fn is_errno(err: &rtnetlink::Error, errno: Errno) -> bool {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.raw_code().abs() == errno as i32,
        _ => false,
    }
}

/// `aa:bb:cc:dd:ee:ff` for a hardware address.
pub(crate) fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
