//! Node-local IPAM for the node's one subnet. Allocations are keyed by container id, so asking
//! again for the same id returns the same address (an agent retrying an add after a crash gets
//! what the container already has), and are persisted in a JSON file replaced atomically
//! (temporary file, fdatasync, rename) so addresses survive agent restarts. A `flock` on a lock file
//! serialises concurrent adds, in this process or another (a CNI-style hook runs as its own
//! process). Addresses are handed out round-robin after the last one given, like CNI's
//! host-local: a just-released address is not reused at once, so stale ARP entries of the old
//! container don't misdirect traffic for the new one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::subnet::Subnet;

const STATE_FILE: &str = "ipam.json";
const LOCK_FILE: &str = "ipam.lock";

/// The allocations of one subnet, stored under a directory (the agent's data dir).
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    subnet: Subnet,
}

/// What the state file holds.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    subnet: Subnet,
    /// the address handed out most recently: the next search starts after it
    last: Option<Ipv4Addr>,
    allocations: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    /// IPAM for `subnet` persisted under `dir` (created if missing). Fails if the subnet has no
    /// room for a container, or if `dir` already holds state for another subnet.
    pub fn open(dir: impl Into<PathBuf>, subnet: Subnet) -> Result<Ipam> {
        if subnet.prefix() > 30 {
            return Err(Error::SubnetTooSmall(subnet));
        }
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(Error::io("create the IPAM directory", &dir))?;
        let ipam = Ipam { dir, subnet };
        // read once now so a subnet mismatch or corrupt file is reported at startup
        ipam.read()?;
        Ok(ipam)
    }

    /// The subnet addresses come from.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The path of the state file.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The address of container `id`, allocating the next free one if it has none.
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let mut state = self.read()?;
        if let Some(addr) = state.allocations.get(id) {
            return Ok(*addr);
        }
        let addr = self.next_free(&state)?;
        state.allocations.insert(id.to_string(), addr);
        state.last = Some(addr);
        self.write(&state)?;
        tracing::debug!(container.id = id, %addr, "address allocated");
        Ok(addr)
    }

    /// Release the address of container `id`; returns it, or `None` if it held none.
    pub fn release(&self, id: &str) -> Result<Option<Ipv4Addr>> {
        let _lock = self.lock()?;
        let mut state = self.read()?;
        let released = state.allocations.remove(id);
        if released.is_some() {
            self.write(&state)?;
            tracing::debug!(container.id = id, addr = ?released, "address released");
        }
        Ok(released)
    }

    /// The address of container `id`, if it holds one.
    pub fn get(&self, id: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self.read()?.allocations.get(id).copied())
    }

    /// Every allocation, by container id.
    pub fn allocations(&self) -> Result<BTreeMap<String, Ipv4Addr>> {
        Ok(self.read()?.allocations)
    }

    fn next_free(&self, state: &State) -> Result<Ipv4Addr> {
        let range = self.subnet.host_range();
        let (first, last) = (*range.start(), *range.end());
        let used: std::collections::BTreeSet<u32> =
            state.allocations.values().map(|a| u32::from(*a)).collect();
        let start = state
            .last
            .map(u32::from)
            .filter(|a| range.contains(a))
            .map_or(first, |a| if a >= last { first } else { a + 1 });
        let after = start..=last;
        let before = first..start;
        after
            .chain(before)
            .find(|a| !used.contains(a))
            .map(Ipv4Addr::from)
            .ok_or(Error::IpamExhausted {
                subnet: self.subnet,
                allocated: state.allocations.len(),
            })
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("open the IPAM lock file", &path))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| Error::io("lock the IPAM lock file", &path)(errno.into()))
    }

    fn read(&self) -> Result<State> {
        let path = self.state_path();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    subnet: self.subnet,
                    last: None,
                    allocations: BTreeMap::new(),
                });
            }
            Err(err) => return Err(Error::io("read the IPAM state file", &path)(err)),
        };
        let state: State = serde_json::from_slice(&text).map_err(|err| Error::IpamCorrupt {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        if state.subnet != self.subnet {
            return Err(Error::IpamSubnetMismatch {
                path,
                stored: state.subnet,
                configured: self.subnet,
            });
        }
        if let Some((id, addr)) = state
            .allocations
            .iter()
            .find(|(_, a)| !self.subnet.host_range().contains(&u32::from(**a)))
        {
            return Err(Error::IpamCorrupt {
                path,
                reason: format!(
                    "container {id} holds {addr}, which is not a host address of {}",
                    self.subnet
                ),
            });
        }
        Ok(state)
    }

    /// Replace the state file atomically: a crash leaves either the old or the new file.
    fn write(&self, state: &State) -> Result<()> {
        let path = self.state_path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(state).map_err(|err| Error::IpamCorrupt {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        let mut file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        file.write_all(&text).map_err(Error::io("write", &tmp))?;
        // synced before the rename so a crash can never leave a torn file under the real name
        file.sync_data().map_err(Error::io("sync", &tmp))?;
        // The directory is not synced: losing the rename itself in a machine crash only brings
        // back the previous state, and a machine crash ends every container anyway. Skipping it
        // halves the disk flushes on the add/del path.
        std::fs::rename(&tmp, &path).map_err(Error::io("replace the IPAM state file", &path))?;
        Ok(())
    }
}

/// Container ids become JSON keys and parts of interface names: reject what can't be either.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(Error::InvalidContainerId(id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::subnet::test_subnet as subnet;

    #[test]
    fn allocates_skipping_network_gateway_broadcast() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        let ipam = Ipam::open(dir.path(), subnet("10.0.0.0/29"))?;
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(ipam.allocate(&format!("c{i}"))?);
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 0, 0, h)).collect();
        assert_eq!(got, want);
        match ipam.allocate("one-too-many") {
            Err(Error::IpamExhausted { allocated: 5, .. }) => {}
            other => panic!("expected exhaustion, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn same_id_same_address_and_release() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        let ipam = Ipam::open(dir.path(), subnet("10.0.0.0/24"))?;
        let a = ipam.allocate("a")?;
        assert_eq!(ipam.allocate("a")?, a);
        let b = ipam.allocate("b")?;
        assert_ne!(a, b);
        assert_eq!(ipam.release("a")?, Some(a));
        assert_eq!(ipam.release("a")?, None);
        // round-robin: the next one is after b, not the just-released a
        let c = ipam.allocate("c")?;
        assert_eq!(u32::from(c), u32::from(b) + 1);
        Ok(())
    }

    #[test]
    fn wraps_around_to_released_addresses() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        let ipam = Ipam::open(dir.path(), subnet("10.0.0.0/30"))?;
        // a /30 has exactly one container address
        let a = ipam.allocate("a")?;
        assert_eq!(a, Ipv4Addr::new(10, 0, 0, 2));
        assert!(ipam.allocate("b").is_err());
        ipam.release("a")?;
        assert_eq!(ipam.allocate("b")?, a);
        Ok(())
    }

    #[test]
    fn survives_a_reload() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        let before = {
            let ipam = Ipam::open(dir.path(), subnet("10.88.3.0/24"))?;
            ipam.allocate("x")?;
            ipam.allocate("y")?;
            ipam.allocations()?
        };
        let ipam = Ipam::open(dir.path(), subnet("10.88.3.0/24"))?;
        assert_eq!(ipam.allocations()?, before);
        assert_eq!(Some(ipam.allocate("y")?), before.get("y").copied());
        let z = ipam.allocate("z")?;
        assert!(!before.values().any(|a| *a == z));
        Ok(())
    }

    #[test]
    fn subnet_mismatch_and_corruption_are_clear_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        Ipam::open(dir.path(), subnet("10.88.3.0/24"))?.allocate("x")?;
        let err = Ipam::open(dir.path(), subnet("10.88.4.0/24")).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("10.88.3.0/24") && text.contains("10.88.4.0/24"),
            "{text}"
        );
        std::fs::write(dir.path().join(STATE_FILE), b"{not json")
            .map_err(Error::io("write", dir.path()))?;
        let err = Ipam::open(dir.path(), subnet("10.88.3.0/24")).err();
        assert!(matches!(err, Some(Error::IpamCorrupt { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn rejects_bad_ids_and_tiny_subnets() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("create", "tempdir"))?;
        assert!(Ipam::open(dir.path(), subnet("10.0.0.0/31")).is_err());
        let ipam = Ipam::open(dir.path(), subnet("10.0.0.0/24"))?;
        assert!(ipam.allocate("").is_err());
        assert!(ipam.allocate("a\nb").is_err());
        Ok(())
    }
}
