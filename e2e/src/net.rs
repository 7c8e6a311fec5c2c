//! "Hosts" for multi-host tests: network namespaces joined by a bridge that lives in a namespace
//! of its own, so nothing is added to the machine's own namespace. Every test network uses the
//! same benchmarking range (RFC 2544, `198.18.0.0/24`): test networks never see each other.
//!
//! ```text
//!   [h0: eth0 198.18.0.1] --veth-- p0 \
//!   [h1: eth0 198.18.0.2] --veth-- p1 --[br0 in its own netns]
//!   [reg: eth0 198.18.0.3] --veth- p2 /
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::exec;
use crate::netns::Netns;
use crate::process::{self, ChildGuard};

/// The test hosts' subnet: the first 254 addresses of RFC 2544's benchmarking range.
pub const SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 24);
const BRIDGE: &str = "br0";
const MAX_HOSTS: usize = 254;

/// One test host: its own network namespace with `eth0` on the test bridge.
#[derive(Debug)]
pub struct Host {
    name: String,
    index: usize,
    addr: Ipv4Addr,
    ns: Arc<Netns>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn netns(&self) -> &Arc<Netns> {
        &self.ns
    }

    /// A command that runs `program` on this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// A command that runs `program` on this host's network, keeping the machine's mounts (for
    /// processes that need the real `/sys/fs/cgroup`, such as an agent).
    pub fn enter_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.ns.enter_command(program)
    }

    /// Start `args` as a long-running process on this host, stopped by PID when the guard
    /// drops. For more control (env, output), build it with `command` and use `process::spawn`.
    pub fn spawn(&self, args: &[&str]) -> Result<ChildGuard> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| Error::Net("empty command".into()))?;
        process::spawn(self.command(program).args(rest))
    }

    /// Run `args` on this host and return its output whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| Error::Net("empty command".into()))?;
        exec::output(self.command(program).args(rest))
    }

    /// Run `args` on this host; a non-zero exit is an error.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| Error::Net("empty command".into()))?;
        exec::run(self.command(program).args(rest))
    }

    /// One ICMP echo to `addr` from this host, waiting at most a second; true if answered.
    pub fn ping(&self, addr: Ipv4Addr) -> Result<bool> {
        let out = self.output(&["busybox", "ping", "-c", "1", "-W", "1", &addr.to_string()])?;
        Ok(out.status.success())
    }

    /// A TCP connection opened from inside this host's namespace (usable from the test process).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.ns
            .run_in(|| TcpStream::connect_timeout(&addr, timeout))?
            .ctx(|| format!("connect to {addr} from {}", self.name))
    }
}

/// A set of hosts on one test bridge; everything is removed when it is dropped.
#[derive(Debug)]
pub struct TestNet {
    // Hosts first: fields drop in order, so hosts go before the bridge they hang on.
    hosts: Vec<Host>,
    bridge: Netns,
}

impl TestNet {
    /// A test network with `n` hosts named `h0`, `h1`, ...
    pub fn new(n: usize) -> Result<TestNet> {
        let bridge = Netns::create("br")?;
        bridge.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        bridge.ip(&["link", "set", BRIDGE, "up"])?;
        let mut net = TestNet {
            hosts: Vec::new(),
            bridge,
        };
        for i in 0..n {
            net.add_host(&format!("h{i}"))?;
        }
        Ok(net)
    }

    /// Add a host (a registry, a client...) with the next free address.
    pub fn add_host(&mut self, name: &str) -> Result<&Host> {
        let index = self.hosts.len();
        if index >= MAX_HOSTS {
            return Err(Error::Net(format!(
                "at most {MAX_HOSTS} hosts fit in the test subnet"
            )));
        }
        if self.hosts.iter().any(|h| h.name == name) {
            return Err(Error::Net(format!("host {name} already exists")));
        }
        let [a, b, c, _] = SUBNET.0.octets();
        let addr = Ipv4Addr::new(a, b, c, index as u8 + 1);
        let ns = Arc::new(Netns::create(name)?);
        let port = port_name(index);
        self.bridge.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.bridge
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{}", SUBNET.1),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.hosts.push(Host {
            name: name.to_string(),
            index,
            addr,
            ns,
        });
        self.hosts
            .last()
            .ok_or_else(|| Error::Net("host vanished".into()))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The `i`th host; panics (a bug in the test) if there is none.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn by_name(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Cut a host off the network: its bridge port goes down, so every packet to or from it is
    /// lost (its own interface stays configured, as with a pulled cable).
    pub fn cut(&self, host: &Host) -> Result<()> {
        self.bridge
            .ip(&["link", "set", &port_name(host.index), "down"])?;
        Ok(())
    }

    /// Undo `cut`.
    pub fn heal(&self, host: &Host) -> Result<()> {
        self.bridge
            .ip(&["link", "set", &port_name(host.index), "up"])?;
        Ok(())
    }

    /// Silently drop all traffic between `a` and `b` (both directions), leaving their other
    /// links working: a partial partition. Rules live in `a`'s namespace only.
    pub fn partition(&self, a: &Host, b: &Host) -> Result<()> {
        self.drop_rules(a, b, "-I")
    }

    /// Undo `partition`.
    pub fn unpartition(&self, a: &Host, b: &Host) -> Result<()> {
        self.drop_rules(a, b, "-D")
    }

    fn drop_rules(&self, a: &Host, b: &Host, op: &str) -> Result<()> {
        let peer = b.addr.to_string();
        a.run(&["iptables", "-w", op, "INPUT", "-s", &peer, "-j", "DROP"])?;
        a.run(&["iptables", "-w", op, "OUTPUT", "-d", &peer, "-j", "DROP"])?;
        Ok(())
    }

    pub fn bridge_netns(&self) -> &Netns {
        &self.bridge
    }

    /// The bridge port (in [`TestNet::bridge_netns`]) that `host`'s `eth0` hangs off.
    pub fn port_of(&self, host: &Host) -> String {
        port_name(host.index)
    }
}

fn port_name(index: usize) -> String {
    format!("p{index}")
}
