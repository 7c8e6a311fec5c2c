//! The process's privileges, set last before exec: rlimits, user and groups, capabilities
//! (bounding set dropped first, kept across setuid, then the other sets), no_new_privs.

use std::collections::HashSet;
use std::str::FromStr;

use caps::{CapSet, CapsHashSet};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
use oci_spec::runtime::{Capability, PosixRlimitType, Process};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct SecurityError {
    pub what: String,
    pub reason: String,
}

fn err(what: impl Into<String>, reason: impl ToString) -> SecurityError {
    SecurityError {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn resource(t: PosixRlimitType) -> Option<Resource> {
    use PosixRlimitType as T;
    Some(match t {
        T::RlimitCpu => Resource::RLIMIT_CPU,
        T::RlimitFsize => Resource::RLIMIT_FSIZE,
        T::RlimitData => Resource::RLIMIT_DATA,
        T::RlimitStack => Resource::RLIMIT_STACK,
        T::RlimitCore => Resource::RLIMIT_CORE,
        T::RlimitRss => Resource::RLIMIT_RSS,
        T::RlimitNproc => Resource::RLIMIT_NPROC,
        T::RlimitNofile => Resource::RLIMIT_NOFILE,
        T::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        T::RlimitAs => Resource::RLIMIT_AS,
        T::RlimitLocks => Resource::RLIMIT_LOCKS,
        T::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        T::RlimitNice => Resource::RLIMIT_NICE,
        T::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        T::RlimitRttime => Resource::RLIMIT_RTTIME,
    })
}

pub fn set_rlimits(process: &Process) -> Result<(), SecurityError> {
    for r in process.rlimits().iter().flatten() {
        if let Some(res) = resource(r.typ()) {
            setrlimit(res, r.soft(), r.hard())
                .map_err(|e| err(format!("set {:?} to {}/{}", r.typ(), r.soft(), r.hard()), e))?;
        }
    }
    Ok(())
}

fn to_caps(set: &Option<HashSet<Capability>>) -> Result<CapsHashSet, SecurityError> {
    let mut out = CapsHashSet::new();
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.insert(
            caps::Capability::from_str(&name).map_err(|e| err(format!("capability {name}"), e))?,
        );
    }
    Ok(out)
}

/// Switch to the spec's user with exactly the spec's capabilities.
pub fn drop_privileges(process: &Process) -> Result<(), SecurityError> {
    let wanted = process.capabilities().clone().unwrap_or_default();
    let bounding = to_caps(wanted.bounding())?;
    for c in caps::all() {
        if !bounding.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| err(format!("drop {c} from the bounding set"), e))?;
        }
    }
    let user = process.user();
    nix::sys::prctl::set_keepcaps(true).map_err(|e| err("keep capabilities across setuid", e))?;
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| err("set supplementary groups", e))?;
    let (uid, gid) = (Uid::from_raw(user.uid()), Gid::from_raw(user.gid()));
    setresgid(gid, gid, gid).map_err(|e| err(format!("set gid {gid}"), e))?;
    setresuid(uid, uid, uid).map_err(|e| err(format!("set uid {uid}"), e))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| err("reset keepcaps", e))?;
    // capset keeps effective within permitted: shrink effective first, then permitted.
    let (effective, permitted) = (to_caps(wanted.effective())?, to_caps(wanted.permitted())?);
    caps::set(
        None,
        CapSet::Effective,
        &effective.intersection(&permitted).copied().collect(),
    )
    .map_err(|e| err("set effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &permitted)
        .map_err(|e| err("set permitted capabilities", e))?;
    caps::set(None, CapSet::Inheritable, &to_caps(wanted.inheritable())?)
        .map_err(|e| err("set inheritable capabilities", e))?;
    let ambient = to_caps(wanted.ambient())?;
    if !ambient.is_empty() {
        caps::set(None, CapSet::Ambient, &ambient)
            .map_err(|e| err("set ambient capabilities", e))?;
    }
    Ok(())
}

pub fn set_no_new_privs(process: &Process) -> Result<(), SecurityError> {
    if process.no_new_privileges().unwrap_or(false) {
        nix::sys::prctl::set_no_new_privs().map_err(|e| err("set no_new_privs", e))?;
    }
    Ok(())
}
