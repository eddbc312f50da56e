//! Command line, with kube-proxy's flag names where one exists (CONTRACT.md).
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::model::{DetectLocal, NodeInfo};

#[derive(Debug, Parser)]
#[command(
    name = "proxy-agent",
    version,
    about = "Kubernetes Service dataplane replacing kube-proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// More logging (repeat for more).
    #[arg(short, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

impl Cli {
    /// Parses a command line (for tools and tests that hold the arguments as data).
    ///
    /// # Errors
    /// When clap rejects the arguments.
    pub fn try_parse_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataplaneKind {
    Auto,
    Ebpf,
    Nftables,
    None,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the cluster and program this node's dataplane.
    Run(Box<RunArgs>),
    /// Print what would be programmed for a node, without touching the kernel.
    Render(RenderArgs),
    /// Remove everything the agent installs.
    Cleanup(CleanupArgs),
    /// Explain what happens to a connection: the frontend, each endpoint, the verdict.
    Trace(TraceArgs),
    /// Print what the live dataplane holds: its Services, backends, flows or affinities.
    Dump(DumpArgs),
    /// Stream the datapath's decisions as they happen (eBPF dataplane).
    Monitor(MonitorArgs),
}

/// What `dump` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    #[arg(value_enum)]
    pub what: DumpWhat,
    /// Which dataplane's state to read; `auto` reads the one installed.
    #[arg(long, value_enum, default_value_t = DataplaneKind::Auto)]
    pub dataplane: DataplaneKind,
    #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
    pub bpffs: PathBuf,
    /// The running agent's metrics address, asked for Service names.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub agent: std::net::SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Verdicts `monitor --verdict` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictFilter {
    /// Translations to a backend or node-local listener.
    Nat,
    /// Calls refused (ECONNREFUSED), with the reason.
    Reject,
    /// Anything refused or dropped (the socket load balancer only refuses).
    Drop,
    /// Replies shown as coming from the Service.
    ReverseNat,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Only this Service's events (`namespace/name`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only these verdicts (repeatable).
    #[arg(long, value_enum)]
    pub verdict: Vec<VerdictFilter>,
    #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
    pub bpffs: PathBuf,
    /// The running agent's metrics address, asked for Service names.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub agent: std::net::SocketAddr,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<u64>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Client address.
    #[arg(long)]
    pub from: std::net::IpAddr,
    /// Destination as IP:PORT[/tcp|udp|sctp] (IPv6 as [IP]:PORT).
    #[arg(long)]
    pub to: String,
    /// The interface the packet arrives on, for interface-based `--detect-local-mode`
    /// (as iptables' `-i`); absent: sent by the node, or not said.
    #[arg(long)]
    pub in_interface: Option<String>,
    /// Explain offline from a manifests directory (with `--node-name`) instead of
    /// asking the running agent.
    #[arg(long, requires = "node_name")]
    pub manifests: Option<PathBuf>,
    #[arg(long)]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// The running agent's metrics address, asked when `--manifests` is absent.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub agent: std::net::SocketAddr,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KernelPaths {
    /// cgroup v2 directory where socket load balancing attaches.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Directory on a bpf filesystem where maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
    pub bpffs: PathBuf,
}

/// kube-proxy's `--detect-local-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalMode {
    /// Sources in `--cluster-cidr`.
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Sources in the Node object's `spec.podCIDRs`, followed as they change.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Packets arriving on `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Packets arriving on interfaces named `--pod-interface-name-prefix`*.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

impl LocalMode {
    /// The mode by kube-proxy's name of it (as its configuration file spells it).
    #[must_use]
    pub fn from_kube_name(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).ok()
    }
}

/// One `--nodeport-addresses` item: a CIDR, or `primary` (kube-proxy 1.29+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpNet),
    Primary,
}

impl std::str::FromStr for NodePortAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "primary" {
            return Ok(Self::Primary);
        }
        s.parse()
            .map(Self::Cidr)
            .map_err(|e| format!("{s}: {e} (want a CIDR or `primary`)"))
    }
}

/// What the model needs to know about this node besides the cluster.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Pod CIDRs; traffic to a Service from outside them is masqueraded.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// How traffic from this node's pods is told from external traffic (kube-proxy's
    /// modes): it decides ClusterIP masquerade and which pods skip a Local policy.
    #[arg(long, value_enum, default_value_t = LocalMode::ClusterCidr)]
    pub detect_local_mode: LocalMode,
    /// The bridge pods are attached to, for `--detect-local-mode BridgeInterface`.
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// The name prefix of pods' host-side interfaces, for
    /// `--detect-local-mode InterfaceNamePrefix`.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// Masquerade every client of a ClusterIP, pods too (kube-proxy's
    /// `--masquerade-all`; with eBPF, clients translated at `connect()` keep their
    /// address: only the per-packet path masquerades).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Node addresses that accept NodePort traffic: CIDRs, or `primary` for the Node
    /// object's primary address of each family (default: all but loopback).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<NodePortAddress>,
}

impl NodeArgs {
    /// The node's settings, checked as kube-proxy checks them.
    ///
    /// # Errors
    /// An interface mode without its interface, or `primary` beside CIDRs.
    pub fn node_info(&self, name: &str) -> Result<NodeInfo, String> {
        let interface = |value: &Option<String>, flag: &str| {
            let name = value.clone().filter(|v| !v.is_empty()).ok_or_else(|| {
                format!(
                    "--detect-local-mode {:?} needs {flag}",
                    self.detect_local_mode
                )
            })?;
            let bad = name.len() > 15
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '"' | '\\' | '*' | '/' | ':'));
            if bad {
                return Err(format!("{flag} {name:?}: not an interface name (at most 15 bytes, no space, quote, '*', '/' or ':')"));
            }
            Ok(name)
        };
        let detect_local = match self.detect_local_mode {
            LocalMode::ClusterCidr => DetectLocal::ClusterCidr,
            LocalMode::NodeCidr => DetectLocal::NodeCidr,
            LocalMode::BridgeInterface => DetectLocal::BridgeInterface(interface(
                &self.pod_bridge_interface,
                "--pod-bridge-interface",
            )?),
            LocalMode::InterfaceNamePrefix => DetectLocal::InterfaceNamePrefix(interface(
                &self.pod_interface_name_prefix,
                "--pod-interface-name-prefix",
            )?),
        };
        let primary = self.nodeport_addresses.contains(&NodePortAddress::Primary);
        if primary && self.nodeport_addresses.len() > 1 {
            return Err("--nodeport-addresses primary cannot be combined with CIDRs".into());
        }
        let nodeport_cidrs = self
            .nodeport_addresses
            .iter()
            .filter_map(|a| match a {
                NodePortAddress::Cidr(cidr) => Some(*cidr),
                NodePortAddress::Primary => None,
            })
            .collect();
        Ok(NodeInfo {
            cluster_cidrs: self.cluster_cidr.clone(),
            detect_local,
            nodeport_cidrs,
            nodeport_primary: primary,
            masquerade_all: self.masquerade_all,
            ..NodeInfo::named(name)
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// kube-proxy's configuration file (a `KubeProxyConfiguration`, as in the
    /// `kube-system/kube-proxy` ConfigMap): its fields fill the flags not given here.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node this agent serves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Read the cluster from a directory of manifests instead of the API server.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// API server credentials (default: in-cluster config, else `~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How often a sync runs with no change (kube-proxy's `--sync-period`); at most once
    /// an hour such a sync re-reads what the kernel holds and repairs any drift there
    /// (kube-proxy's full resync).
    #[arg(long, default_value = "30s", value_parser = parse_sync_period)]
    pub sync_period: std::time::Duration,
    /// The shortest time between two syncs (kube-proxy's `--min-sync-period`): a change
    /// after a quiet period is programmed at once, one within this period of the last
    /// sync waits for its end, so a burst of changes coalesces into few syncs.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub min_sync_period: std::time::Duration,
    /// Which backend programs the kernel.
    #[arg(long, value_enum, default_value_t = DataplaneKind::Auto)]
    pub dataplane: DataplaneKind,
    /// Entries of each Maglev table of the eBPF per-packet path (a prime up to 16381;
    /// a backend change moves about 1/N of flows, and a table costs 4 bytes per entry).
    #[arg(long, default_value_t = crate::dataplane::ebpf::maglev::DEFAULT_SIZE, value_parser = parse_maglev_size)]
    pub maglev_table_size: u32,
    /// Entries of the eBPF service map of each family (Cilium's `--bpf-lb-map-max`): a
    /// slot for each frontend and one for each of its backends. The backend maps hold
    /// half as many, and so do the reverse-NAT maps (one per frontend). Changing it
    /// makes the pinned maps anew at the next start.
    #[arg(long, default_value_t = proxy_common::MAX_SERVICE_ENTRIES, value_parser = parse_lb_map_max)]
    pub bpf_lb_map_max: u32,
    #[command(flatten)]
    pub paths: KernelPaths,
    #[command(flatten)]
    pub node: NodeArgs,
    /// `/healthz` turns 503 when a pending change waits this long (seconds).
    #[arg(long, default_value_t = 60)]
    pub healthz_stale_after: u64,
    /// Where Prometheus `/metrics` is served.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,
    /// Where `/healthz` and `/livez` are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// Exit when the health or metrics address cannot be bound (kube-proxy's
    /// `--bind-address-hard-fail`); without it the failure is logged and tried again
    /// every 5 s.
    #[arg(long)]
    pub bind_address_hard_fail: bool,
    /// Requests per second to the API server (kube-proxy's `--kube-api-qps`), with
    /// bursts of `--kube-api-burst`: relists after errors are spaced by them.
    #[arg(long, default_value_t = 5.0, value_parser = parse_qps)]
    pub kube_api_qps: f64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_api_burst: u32,
    #[command(flatten)]
    pub dns: DnsArgs,
}

/// The NodeLocal DNS responder (off unless `--dns-listen` is given).
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Addresses (ADDR[:PORT], comma-separated) to answer DNS on.
    #[arg(long, value_delimiter = ',', value_parser = crate::dns::parse_server)]
    pub dns_listen: Vec<SocketAddr>,
    /// Cluster DNS for names in the cluster domain the agent does not answer (over TCP);
    /// default: the ready endpoints of kube-system/kube-dns.
    #[arg(long, value_delimiter = ',', value_parser = crate::dns::parse_server)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Where names outside the cluster domain go; default: the node's resolv.conf.
    #[arg(long, value_delimiter = ',', value_parser = crate::dns::parse_server)]
    pub dns_forward: Vec<SocketAddr>,
    /// TTL of the records the agent answers itself (seconds).
    #[arg(long, default_value_t = 5)]
    pub dns_ttl: u32,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[arg(long)]
    pub manifests: PathBuf,
    #[arg(long)]
    pub node_name: String,
    #[arg(long, value_enum, default_value_t = DataplaneKind::Ebpf)]
    pub dataplane: DataplaneKind,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[arg(long, value_enum, default_value_t = DataplaneKind::Auto)]
    pub dataplane: DataplaneKind,
    #[command(flatten)]
    pub paths: KernelPaths,
}

fn parse_lb_map_max(text: &str) -> Result<u32, String> {
    let entries: u32 = text.parse().map_err(|e| format!("{e}"))?;
    let min = crate::dataplane::ebpf::Sizing::MIN_LB_MAP;
    if entries < min {
        return Err(format!("{entries} is less than {min}"));
    }
    Ok(entries)
}

fn parse_maglev_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if crate::dataplane::ebpf::maglev::valid_size(size) {
        Ok(size)
    } else {
        Err(format!(
            "{size} is not a prime between 3 and {}",
            proxy_common::MAGLEV_MAX
        ))
    }
}

/// `--sync-period`: more than zero, as kube-proxy requires.
fn parse_sync_period(text: &str) -> Result<std::time::Duration, String> {
    let period = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if period.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(period)
}

/// `--kube-api-qps`: a positive number.
fn parse_qps(text: &str) -> Result<f64, String> {
    let qps: f64 = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if !(qps.is_finite() && qps > 0.0) {
        return Err(format!("{text}: must be more than 0"));
    }
    Ok(qps)
}
