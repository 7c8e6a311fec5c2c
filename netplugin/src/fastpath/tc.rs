//! Attaching the programs with tc: a `clsact` qdisc on the interface and one `bpf` filter in
//! direct-action mode on its ingress, at tug's own priority, all through rtnetlink.
//!
//! Not tcx (`BPF_PROG_ATTACH`, Linux 6.6+): each tcx attach waits out an RCU grace period
//! (13.5 ms on the test machine) and so does removing a device that carries one, while adding a
//! clsact qdisc and a filter is a few netlink messages, and removing the veth costs nothing
//! more (from Linux 5.16; before, the first filter on a new qdisc and the last one leaving ran
//! an `rcu_barrier`). It also works on older kernels (Debian 12's 6.1). A filter at tug's priority is
//! replaced in place, so loading the programs again swaps them without a gap and never stacks
//! them; filters of other software at other priorities are left alone.

use futures_util::StreamExt;
use nix::errno::Errno;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};

use crate::error::{Error, Result};
use crate::netlink::{Netlink, is_errno};

/// `TC_H_CLSACT` (the same value as `TC_H_INGRESS`): where a clsact qdisc hangs.
const CLSACT_PARENT: u32 = 0xffff_fff1;
/// The clsact qdisc's own handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the ingress hook of a clsact qdisc.
const INGRESS: u32 = 0xffff_fff2;
/// tug's filter priority (lower runs first); "tu" in ASCII, unlikely to be anyone else's.
pub(crate) const PRIORITY: u16 = 0x7475;
/// The filter's handle within its priority.
const FILTER_HANDLE: u32 = 1;
/// `htons(ETH_P_ALL)`: every protocol (the programs pick IPv4 themselves).
const ETH_P_ALL_NETWORK_ORDER: u32 = 0x0300;

fn info() -> u32 {
    (u32::from(PRIORITY) << 16) | ETH_P_ALL_NETWORK_ORDER
}

fn message(index: u32, handle: u32, parent: u32, info: u32) -> Result<TcMessage> {
    let mut msg = TcMessage::default();
    msg.header.index = i32::try_from(index).map_err(|_| Error::FastPath {
        what: format!("address interface #{index}"),
        reason: "the index is out of range".into(),
    })?;
    msg.header.handle = TcHandle::from(handle);
    msg.header.parent = TcHandle::from(parent);
    msg.header.info = info;
    Ok(msg)
}

/// Send one request and wait for its acknowledgement; the messages of a dump are returned.
async fn request(
    nl: &Netlink,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> std::result::Result<Vec<TcMessage>, rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | flags;
    let mut handle = nl.handle.clone();
    let mut responses = handle.request(req)?;
    let mut out = Vec::new();
    while let Some(reply) = responses.next().await {
        match reply.payload {
            NetlinkPayload::Error(err) => return Err(rtnetlink::Error::NetlinkError(err)),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => out.push(m),
            _ => {}
        }
    }
    Ok(out)
}

/// Put program `fd` (named `name`) on `index`'s ingress (`interface` names it in errors),
/// replacing tug's filter there if there is one.
pub(crate) async fn attach(
    nl: &Netlink,
    index: u32,
    interface: &str,
    fd: u32,
    name: &str,
) -> Result<()> {
    let mut qdisc = message(index, CLSACT_HANDLE, CLSACT_PARENT, 0)?;
    qdisc.attributes.push(TcAttribute::Kind("clsact".into()));
    match request(
        nl,
        RouteNetlinkMessage::NewQueueDiscipline(qdisc),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .await
    {
        Ok(_) => {}
        Err(e) if is_errno(&e, Errno::EEXIST) => {}
        Err(e) => {
            return Err(Error::netlink(format!(
                "add a clsact qdisc to {interface:?} for the fast path"
            ))(e));
        }
    }
    let mut filter = message(index, FILTER_HANDLE, INGRESS, info())?;
    filter.attributes.push(TcAttribute::Kind("bpf".into()));
    filter.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(fd)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    request(
        nl,
        RouteNetlinkMessage::NewTrafficFilter(filter),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .await
    .map_err(Error::netlink(format!(
        "attach fast-path program {name} to {interface:?}"
    )))?;
    Ok(())
}

/// Remove tug's filter from `index`'s ingress; whether there was one. The clsact qdisc stays
/// (other software may use it; it costs nothing empty).
pub(crate) async fn detach(nl: &Netlink, index: u32, interface: &str) -> Result<bool> {
    let mut filter = message(index, FILTER_HANDLE, INGRESS, info())?;
    filter.attributes.push(TcAttribute::Kind("bpf".into()));
    match request(nl, RouteNetlinkMessage::DelTrafficFilter(filter), NLM_F_ACK).await {
        Ok(_) => Ok(true),
        // No such filter, or no clsact qdisc at all.
        Err(e) if is_errno(&e, Errno::ENOENT) || is_errno(&e, Errno::EINVAL) => Ok(false),
        Err(e) => Err(Error::netlink(format!(
            "remove the fast-path program from {interface:?}"
        ))(e)),
    }
}

/// The program names of tug's filters on `index`'s ingress.
pub(crate) async fn names(nl: &Netlink, index: u32, interface: &str) -> Result<Vec<String>> {
    let msg = message(index, 0, INGRESS, 0)?;
    let filters = match request(nl, RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP).await {
        Ok(filters) => filters,
        Err(e) if is_errno(&e, Errno::EINVAL) || is_errno(&e, Errno::ENOENT) => Vec::new(),
        Err(e) => {
            return Err(Error::netlink(format!(
                "list the tc filters on {interface:?}"
            ))(e));
        }
    };
    Ok(filters
        .into_iter()
        .filter(|f| f.header.info >> 16 == u32::from(PRIORITY))
        .flat_map(|f| f.attributes)
        .filter_map(|a| match a {
            TcAttribute::Options(options) => Some(options),
            _ => None,
        })
        .flatten()
        .filter_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name),
            _ => None,
        })
        .collect())
}
