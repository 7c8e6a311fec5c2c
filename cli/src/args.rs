//! The command line: global flags and one subcommand per role or client action (DESIGN.md,
//! "Roles of the one binary").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tug",
    version,
    about = "tug: a multi-host container orchestrator in one binary",
    long_about = "tug: a multi-host container orchestrator in one binary.\n\n\
        Roles: `controller` (a Raft replica and API server), `agent` (one per machine), `up` \
        (a single-host cluster in one process). Client: `apply`, `get`, `describe`, `delete`, \
        `cluster status`, `logs`, `exec`, `scale`, `rollout`, `nodes`, `drain`, `uncordon`. \
        This machine only: `run`, `runtime`, `image`.",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every role understands; each can also come from the environment.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Everything a role persists lives under this directory.
    #[arg(
        long,
        global = true,
        env = "TUG_DATA_DIR",
        default_value = "/var/lib/tug"
    )]
    pub data_dir: PathBuf,
    /// Controller addresses for client commands (comma-separated; any replica will do).
    #[arg(long, global = true, env = "TUG_CONTROLLER", value_delimiter = ',')]
    pub controller: Vec<String>,
    /// Allow plain HTTP to this registry (HOST[:PORT]); repeatable.
    #[arg(
        long,
        global = true,
        env = "TUG_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registry: Vec<String>,
    /// Log line format.
    #[arg(long, global = true, env = "TUG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one controller replica (Raft member and API server).
    Controller(ControllerArgs),
    /// Run the node agent of this machine.
    Agent(AgentArgs),
    /// Run a single-host cluster: one controller and one agent in one process.
    Up(UpArgs),
    /// Create or update the objects described in manifest files.
    Apply(ApplyArgs),
    /// List objects (services, tasks, nodes).
    Get(ObjectArgs),
    /// Show one object in detail, with events and scheduling reasons.
    Describe(ObjectArgs),
    /// Delete objects by name or by manifest file.
    Delete(ObjectArgs),
    /// The controller cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print a container's output.
    Logs(LogsArgs),
    /// Run a command inside a running container.
    Exec(ExecArgs),
    /// Change a service's replica count.
    Scale(ScaleArgs),
    /// Follow or undo a service's rolling update.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// List nodes with state, labels, capacity and tasks.
    Nodes,
    /// Live CPU and memory use of nodes or services, as the agents last reported it.
    #[command(subcommand)]
    Top(TopCommand),
    /// Move every task off a node and stop scheduling onto it.
    Drain(NodeArgs),
    /// Allow scheduling onto a drained node again.
    Uncordon(NodeArgs),
    /// Run one container on this machine, without a controller (like `docker run`).
    Run(Box<RunArgs>),
    /// List this machine's containers (running ones; -a for all).
    Ps {
        #[arg(short, long)]
        all: bool,
    },
    /// Stop containers: SIGTERM, then SIGKILL after the timeout.
    Stop {
        names: Vec<String>,
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Remove stopped containers (-f: stop them first).
    Rm {
        names: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
    /// Freeze every process of a container.
    Pause { name: String },
    /// Thaw a paused container.
    Unpause { name: String },
    /// The built-in OCI runtime, callable like runc.
    #[command(subcommand)]
    Runtime(RuntimeCommand),
    /// Manage this machine's image store.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The per-container monitor (started by tug itself, not by hand).
    #[command(name = "__monitor", hide = true)]
    Monitor { state_dir: PathBuf },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ControllerArgs {
    /// This replica's Raft id (1, 2, ...).
    #[arg(long, required = true)]
    pub id: Option<u64>,
    /// Address to serve the API and peer traffic on.
    #[arg(long, default_value = "127.0.0.1:7440")]
    pub listen: String,
    /// Every replica as ID=ADDR, comma-separated (this one included).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Start empty and wait to be added to a running cluster (`tug controller add-member`),
    /// instead of bootstrapping a new cluster from --peers.
    #[arg(long)]
    pub join: bool,
    /// How often agents heartbeat; a node silent for three periods is marked down and its tasks
    /// are replaced elsewhere.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_period: std::time::Duration,
    /// Address to serve Prometheus /metrics and service discovery (/sd) on (default: the host
    /// of --listen, port 7442; `off`: not served). Every replica should use the same port: the
    /// discovery document lists the others at the host of their peer address and this port.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Free space to keep on the data dir's disk: below it, writes are refused with a clear
    /// error instead of the replica failing to persist its log (0: no check).
    #[arg(long, default_value = "128Mi")]
    pub disk_reserve: String,
    /// Threads of the async runtime that runs the Raft loop, the API and the peer streams
    /// (default: half the CPUs, at least 1). The leader's log sync runs off them. Fewer threads
    /// hand fewer tasks across threads: on 2 CPUs, one thread made a write ~7% faster at one
    /// client and cost ~15% less CPU than two (`e2e/bench.sh controller`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[command(flatten)]
    pub network: ClusterNetworkFlags,
    /// Change the membership of a running cluster (through `--controller`).
    #[command(subcommand)]
    pub member: Option<MemberCommand>,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a controller (started with --join) to the cluster as a voter.
    AddMember {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
        /// host:port its peers and clients reach it at (its --listen address).
        #[arg(long)]
        address: String,
    },
    /// Remove a controller from the cluster (a leader hands leadership over first).
    RemoveMember {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
    },
}

/// The container address plan of a new cluster: shared by `tug controller` and `tug up`.
#[derive(Debug, Clone, Args)]
pub struct ClusterNetworkFlags {
    /// The IPv4 range containers get their addresses from; each node gets one subnet of it. Fixed
    /// when the first node registers: later values are ignored.
    #[arg(long, default_value = "10.88.0.0/16")]
    pub cluster_cidr: String,
    /// The prefix length of each node's subnet (24: 253 containers per node).
    #[arg(long, default_value_t = 24)]
    pub node_subnet_prefix: u8,
}

/// What a node says about itself: shared by `tug agent` and `tug up`.
#[derive(Debug, Clone, Args)]
pub struct NodeFlags {
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Node labels as k=v, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// CPUs the scheduler may hand out here (2, 1.5, 500m; default: all of this machine's).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Memory the scheduler may hand out here (4Gi, 512Mi; default: MemTotal).
    #[arg(long)]
    pub memory: Option<String>,
    /// Run containers with this OCI runtime (runc, crun) instead of the built-in one.
    #[arg(long)]
    pub oci_runtime: Option<PathBuf>,
    /// Pulls, creates and stops running at once.
    #[arg(long, default_value_t = 4)]
    pub max_parallel: usize,
    /// How containers on different nodes reach each other: `host-gw` (a route per peer node;
    /// the nodes share a network segment), `vxlan` (an overlay, for nodes in different
    /// segments) or `none` (containers get no network).
    #[arg(long, default_value = "host-gw")]
    pub network_mode: String,
    /// This node's IPv4 address, that other nodes route container traffic to and published
    /// ports listen on (default: the host of the advertised agent address).
    #[arg(long)]
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Attach containers with the standard CNI plugins of the first network configuration in
    /// this directory instead of the built-in setup (`$TUG_NODE_SUBNET` in it is replaced by
    /// the node's subnet).
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Where the CNI plugin binaries are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// The eBPF fast path for traffic between containers on different nodes (`on`: used where
    /// the kernel can, Linux 5.11+, else the normal path with a warning; `off`: always the
    /// bridge and IP forwarding). Not used with --cni-conf-dir.
    #[arg(long, default_value = "on")]
    pub fast_path: String,
    /// IPv4 BIG TCP (Linux 6.3+; `on`: raise the uplink's GSO/GRO limit from 64 KiB to 192 KiB,
    /// or to what its driver takes, so TCP passes larger packets through the stack; the NIC
    /// still sends MTU-sized frames). In host-gw mode containers take the uplink's limit
    /// whether tug or the operator raised it. `off`: the uplink is left as it is (lower it with
    /// `ip link set DEV gso_ipv4_max_size 65536 gro_ipv4_max_size 65536` to undo `on`). Not
    /// used with --cni-conf-dir.
    #[arg(long, default_value = "off")]
    pub big_tcp: String,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Controller addresses to register with (comma-separated; tried in turn).
    #[arg(long, value_delimiter = ',', required = true)]
    pub join: Vec<String>,
    /// Address of the agent API (logs, exec).
    #[arg(long, default_value = "0.0.0.0:7441")]
    pub listen: String,
    /// Address the controllers and clients reach the agent API at (default: derived from
    /// --listen and the route to the first controller).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Address to serve Prometheus /metrics on (default: the node's advertised address, port
    /// 7443; `off`: not served). Registered with the controllers for service discovery.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the controller API (what `tug --controller` talks to).
    #[arg(long, default_value = "127.0.0.1:7440")]
    pub listen: String,
    /// Address of the agent API (logs, exec).
    #[arg(long, default_value = "127.0.0.1:7441")]
    pub agent_listen: String,
    /// Address of the controller's Prometheus /metrics and service discovery (/sd) (default:
    /// 127.0.0.1:7442); `off`: not served.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Address of the agent's Prometheus /metrics (default: the host of --agent-listen, port
    /// 7443); `off`: not served.
    #[arg(long)]
    pub agent_metrics_listen: Option<String>,
    #[command(flatten)]
    pub network: ClusterNetworkFlags,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file or directory; repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ObjectArgs {
    /// Object kind: service, task or node.
    #[arg(required_unless_present = "files")]
    pub kind: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// Namespace (default: `default`; `get` without a name lists every namespace).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// The objects described in these manifest files or directories (`delete -f`).
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// Output format (`get`): a table by default.
    #[arg(short, long, value_enum)]
    pub output: Option<OutputFormat>,
    /// Read this controller's state as it is, without confirming it with the leader.
    #[arg(long)]
    pub stale: bool,
    /// Only objects whose (service) labels match, e.g. `-l app=web,tier=front`.
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// `get tasks`: only this service's tasks.
    #[arg(long)]
    pub service: Option<String>,
    /// `get tasks`: only the tasks on this node.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Yaml,
    Wide,
}

#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Per node: CPU and memory in use by its tasks, against its capacity.
    Nodes {
        /// Output format: a table by default.
        #[arg(short, long, value_enum)]
        output: Option<OutputFormat>,
    },
    /// Per service: tasks reporting, CPU and memory in use.
    Services {
        /// Only this namespace's services.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format: a table by default.
        #[arg(short, long, value_enum)]
        output: Option<OutputFormat>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The controllers: members, leader, term, commit and applied index.
    Status,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A task id or a service name (through the controller, from the agent that runs it), or a
    /// container on this machine.
    pub task: String,
    /// Keep printing new lines.
    #[arg(short, long)]
    pub follow: bool,
    /// Namespace of the service or task.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// A task id (through the controller, on the agent that runs it), or a container on this
    /// machine.
    pub task: String,
    /// Extra environment NAME=VALUE; repeatable.
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Service name.
    pub service: String,
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Desired number of replicas.
    pub replicas: u32,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Follow a service's rollout until every replica runs the current spec.
    Status {
        service: String,
        #[arg(short, long)]
        namespace: Option<String>,
        /// Give up after this long (e.g. 5m).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Roll a service back to its previous spec.
    Undo {
        service: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Node name.
    pub node: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image reference, e.g. busybox or registry:5000/app:1.2.
    pub image: String,
    /// Command and arguments: replace the image's cmd (and run after its entrypoint).
    #[arg(last = true)]
    pub command: Vec<String>,
    /// Replace the image's entrypoint (the image's cmd is then dropped too).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Remove the container (state, log, rootfs, cgroup) when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Start it and return at once, printing its name; it runs on under its monitor.
    #[arg(short, long)]
    pub detach: bool,
    /// Run this (by /bin/sh -c) once the container's empty network namespace exists, before
    /// its process starts; it gets TUG_CONTAINER_ID, TUG_NETNS and TUG_PID.
    #[arg(long)]
    pub network_hook: Option<String>,
    /// Run the container with this OCI runtime (e.g. /usr/bin/crun) instead of the built-in one.
    #[arg(long)]
    pub oci_runtime: Option<PathBuf>,
    /// Container name (default: a random id).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable NAME=VALUE; repeatable.
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// user[:group], names or numbers.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Host name inside the container (default: the container's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Memory limit, e.g. 64Mi or 1G (swap is off).
    #[arg(short, long)]
    pub memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5 or 250m.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Most processes the container may have.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Bind mount HOST_PATH:CONTAINER_PATH[:ro]; repeatable.
    #[arg(short, long = "volume")]
    pub volumes: Vec<String>,
    /// OS/ARCH[/VARIANT] to pull.
    #[arg(long)]
    pub platform: Option<String>,
    /// Restart policy: no, always, on-failure or on-failure:N (exponential back-off).
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// Seconds between SIGTERM and SIGKILL when tug run is interrupted.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// Create a container from an OCI bundle; its process waits for `start`.
    Create {
        id: String,
        /// Directory with config.json and the root filesystem.
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
    },
    /// Start a created container.
    Start { id: String },
    /// Print a container's state as OCI state JSON.
    State { id: String },
    /// Write a default config.json (running `sh`) into the bundle directory.
    Spec {
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
    },
    /// List containers.
    List,
    /// Send a signal to a container's process (default SIGTERM).
    Kill {
        id: String,
        #[arg(default_value = "TERM")]
        signal: String,
    },
    /// Delete a stopped container (with --force, stop it first).
    Delete {
        id: String,
        #[arg(long, short)]
        force: bool,
    },
    /// Create, start and wait for a container from a bundle; exit with its status.
    Run {
        id: String,
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image into the store (verified, unpacked, ready to run).
    Pull {
        /// e.g. busybox, user/app:1.2, registry:5000/ns/app@sha256:...
        reference: String,
        /// OS/ARCH[/VARIANT] to pick from a multi-platform image (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Docker-style credentials file (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json).
        #[arg(long, env = "TUG_REGISTRY_AUTH")]
        auth_file: Option<PathBuf>,
    },
    /// List images in the store.
    Ls,
    /// Forget an image; its data goes at the next prune unless something else uses it.
    Rm { reference: String },
    /// Delete blobs and layers that no image references and no container uses.
    Prune,
    /// Show an image's config: env, entrypoint, cmd, user, working dir, exposed ports.
    Inspect { reference: String },
}
