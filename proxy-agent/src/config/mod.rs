//! kube-proxy's configuration file (`run --config`): a `KubeProxyConfiguration` as
//! kubeadm writes it into the `kube-system/kube-proxy` config map. The fields that apply
//! fill the `run` flags the command line left unset (flags win, as in kube-proxy); the
//! others are named once at start; a file that cannot be read is an error before
//! anything runs.
use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::cli::{LocalMode, NodePortAddress, RunArgs};

const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("{0} is not a KubeProxyConfiguration: {1}")]
    Parse(String, String),
    #[error("{0}: field {1}: {2}")]
    Field(String, &'static str, String),
}

/// The part of `KubeProxyConfiguration` the agent reads; anything else is kept by name.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct KubeProxyConfiguration {
    api_version: String,
    kind: String,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: String,
    node_port_addresses: Option<Vec<String>>,
    detect_local_mode: String,
    detect_local: DetectLocalSection,
    healthz_bind_address: String,
    metrics_bind_address: String,
    hostname_override: String,
    bind_address_hard_fail: bool,
    mode: String,
    client_connection: ClientConnection,
    iptables: SyncSettings,
    nftables: SyncSettings,
    #[serde(flatten)]
    others: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ClientConnection {
    kubeconfig: String,
    qps: f64,
    burst: i64,
    #[serde(flatten)]
    others: BTreeMap<String, serde_yaml::Value>,
}

/// `detectLocal`: the interface arguments of the interface modes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DetectLocalSection {
    bridge_interface: String,
    interface_name_prefix: String,
}

/// The `iptables` and `nftables` sections: the sync periods of kube-proxy's mode.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SyncSettings {
    min_sync_period: Option<String>,
    sync_period: Option<String>,
    masquerade_all: bool,
    #[serde(flatten)]
    others: BTreeMap<String, serde_yaml::Value>,
}

/// What the file says for the flags it can set; `None` where it says nothing.
#[derive(Debug, Default, PartialEq)]
pub struct FileSettings {
    pub cluster_cidr: Option<Vec<IpNet>>,
    pub nodeport_addresses: Option<Vec<NodePortAddress>>,
    pub detect_local_mode: Option<LocalMode>,
    pub pod_bridge_interface: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<std::path::PathBuf>,
    pub min_sync_period: Option<Duration>,
    pub sync_period: Option<Duration>,
    /// `true` only: kubeadm writes `false` for "the default".
    pub masquerade_all: bool,
    pub bind_address_hard_fail: bool,
    pub kube_api_qps: Option<f64>,
    pub kube_api_burst: Option<u32>,
    /// Fields set in the file that the agent does not act on, by their path.
    pub ignored: Vec<String>,
}

/// Reads and checks `path`.
///
/// # Errors
/// When the file cannot be read, is not a `KubeProxyConfiguration`, or a field the
/// agent reads holds a value it cannot take.
pub fn load(path: &Path) -> Result<FileSettings, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(name.clone(), e))?;
    parse(&name, &text)
}

/// [`load`] of a text already read; `name` names it in errors.
///
/// # Errors
/// As [`load`].
pub fn parse(name: &str, text: &str) -> Result<FileSettings, ConfigError> {
    let file: KubeProxyConfiguration = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::Parse(name.to_owned(), e.to_string()))?;
    if file.api_version != API_VERSION || file.kind != KIND {
        return Err(ConfigError::Parse(
            name.to_owned(),
            format!(
                "apiVersion {:?} and kind {:?}, not {API_VERSION} {KIND}",
                file.api_version, file.kind
            ),
        ));
    }
    let field =
        |field: &'static str, error: String| ConfigError::Field(name.to_owned(), field, error);
    let cidrs = |text: &str, field_name: &'static str| {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .map_err(|e| field(field_name, format!("{s}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let address = |text: &str, field_name: &'static str| {
        (!text.is_empty())
            .then(|| {
                text.parse::<SocketAddr>()
                    .map_err(|e| field(field_name, format!("{text}: {e}")))
            })
            .transpose()
    };
    // kube-proxy reads the section of the mode it runs in (iptables when unset).
    let mode_section = if file.mode == "nftables" {
        &file.nftables
    } else {
        &file.iptables
    };
    // kubeadm writes "0s" for "the default".
    let period = |text: Option<&str>, field_name: &'static str| {
        text.map(|text| {
            humantime::parse_duration(text).map_err(|e| field(field_name, format!("{text}: {e}")))
        })
        .transpose()
        .map(|period| period.filter(|p| !p.is_zero()))
    };
    let min_sync_period = period(mode_section.min_sync_period.as_deref(), "minSyncPeriod")?;
    let sync_period = period(mode_section.sync_period.as_deref(), "syncPeriod")?;
    let (kube_api_qps, kube_api_burst) = api_rates(&file.client_connection)
        .map_err(|(field_name, error)| field(field_name, error))?;
    let detect_local_mode = detect_local_mode(&file.detect_local_mode)
        .map_err(|error| field("detectLocalMode", error))?;
    let mode_name = if file.mode == "nftables" {
        "nftables"
    } else {
        "iptables"
    };
    let mut ignored = set_fields("", &file.others);
    ignored.extend(set_fields(
        "clientConnection.",
        &file.client_connection.others,
    ));
    ignored.extend(set_fields(&format!("{mode_name}."), &mode_section.others));
    if !file.mode.is_empty() {
        ignored.push(format!(
            "mode ({}: the agent's --dataplane chooses)",
            file.mode
        ));
    }
    ignored.sort();
    Ok(FileSettings {
        cluster_cidr: Some(cidrs(&file.cluster_cidr, "clusterCIDR")?).filter(|c| !c.is_empty()),
        nodeport_addresses: Some(
            nodeport_addresses(&file.node_port_addresses.unwrap_or_default())
                .map_err(|e| field("nodePortAddresses", e))?,
        )
        .filter(|c| !c.is_empty()),
        detect_local_mode,
        pod_bridge_interface: Some(file.detect_local.bridge_interface).filter(|s| !s.is_empty()),
        pod_interface_name_prefix: Some(file.detect_local.interface_name_prefix)
            .filter(|s| !s.is_empty()),
        healthz_bind_address: address(&file.healthz_bind_address, "healthzBindAddress")?,
        metrics_bind_address: address(&file.metrics_bind_address, "metricsBindAddress")?,
        hostname_override: Some(file.hostname_override).filter(|h| !h.is_empty()),
        kubeconfig: Some(file.client_connection.kubeconfig)
            .filter(|k| !k.is_empty())
            .map(Into::into),
        min_sync_period,
        sync_period,
        masquerade_all: mode_section.masquerade_all,
        bind_address_hard_fail: file.bind_address_hard_fail,
        kube_api_qps,
        kube_api_burst,
        ignored,
    })
}

/// A field's name and what is wrong with its value.
type FieldError = (&'static str, String);

/// `clientConnection.qps` and `burst`; zero means the default, as in kube-proxy.
fn api_rates(connection: &ClientConnection) -> Result<(Option<f64>, Option<u32>), FieldError> {
    if !(connection.qps.is_finite() && connection.qps >= 0.0) {
        return Err((
            "clientConnection.qps",
            format!("{}: not a rate", connection.qps),
        ));
    }
    let qps = (connection.qps > 0.0).then_some(connection.qps);
    let burst = match connection.burst {
        0 => None,
        burst => Some(u32::try_from(burst).map_err(|_| {
            (
                "clientConnection.burst",
                format!("{burst}: not a burst size"),
            )
        })?),
    };
    Ok((qps, burst))
}

/// `detectLocalMode` by kube-proxy's names; empty means the default.
fn detect_local_mode(name: &str) -> Result<Option<LocalMode>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    LocalMode::from_kube_name(name).map(Some).ok_or_else(|| {
        format!("{name}: want ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix")
    })
}

/// `nodePortAddresses`: CIDRs, or `primary` alone.
fn nodeport_addresses(items: &[String]) -> Result<Vec<NodePortAddress>, String> {
    let parsed = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(str::parse::<NodePortAddress>)
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.len() > 1 && parsed.contains(&NodePortAddress::Primary) {
        return Err("primary cannot be combined with CIDRs".into());
    }
    Ok(parsed)
}

/// The fields of `others` set to something besides an empty, zero or null value
/// (kubeadm writes every field, mostly unset), as `prefix` + name.
fn set_fields(prefix: &str, others: &BTreeMap<String, serde_yaml::Value>) -> Vec<String> {
    others
        .iter()
        .filter(|(_, value)| is_set(value))
        .map(|(name, _)| format!("{prefix}{name}"))
        .collect()
}

fn is_set(value: &serde_yaml::Value) -> bool {
    use serde_yaml::Value;
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !(s.is_empty() || s == "0" || s == "0s"),
        Value::Sequence(items) => items.iter().any(is_set),
        Value::Mapping(map) => map.values().any(is_set),
        Value::Tagged(tagged) => is_set(&tagged.value),
    }
}

impl FileSettings {
    /// Fills the flags of `args` that `given` (a flag's id) says the command line left
    /// unset, and names once what the file sets that the agent does not act on.
    pub fn apply(self, args: &mut RunArgs, given: impl Fn(&str) -> bool) {
        if !given("cluster_cidr") {
            if let Some(cidrs) = self.cluster_cidr {
                args.node.cluster_cidr = cidrs;
            }
        }
        if !given("nodeport_addresses") {
            if let Some(addresses) = self.nodeport_addresses {
                args.node.nodeport_addresses = addresses;
            }
        }
        if !given("detect_local_mode") {
            if let Some(mode) = self.detect_local_mode {
                args.node.detect_local_mode = mode;
            }
        }
        if !given("pod_bridge_interface") && self.pod_bridge_interface.is_some() {
            args.node.pod_bridge_interface = self.pod_bridge_interface;
        }
        if !given("pod_interface_name_prefix") && self.pod_interface_name_prefix.is_some() {
            args.node.pod_interface_name_prefix = self.pod_interface_name_prefix;
        }
        if !given("healthz_bind_address") {
            if let Some(addr) = self.healthz_bind_address {
                args.healthz_bind_address = addr;
            }
        }
        if !given("metrics_bind_address") {
            if let Some(addr) = self.metrics_bind_address {
                args.metrics_bind_address = addr;
            }
        }
        if !given("node_name") && self.hostname_override.is_some() {
            args.node_name = self.hostname_override;
        }
        if !given("kubeconfig") && args.manifests.is_none() && self.kubeconfig.is_some() {
            args.kubeconfig = self.kubeconfig;
        }
        if !given("min_sync_period") {
            if let Some(period) = self.min_sync_period {
                args.min_sync_period = period;
            }
        }
        if !given("sync_period") {
            if let Some(period) = self.sync_period {
                args.sync_period = period;
            }
        }
        if !given("masquerade_all") && self.masquerade_all {
            args.node.masquerade_all = true;
        }
        if !given("bind_address_hard_fail") && self.bind_address_hard_fail {
            args.bind_address_hard_fail = true;
        }
        if !given("kube_api_qps") {
            if let Some(qps) = self.kube_api_qps {
                args.kube_api_qps = qps;
            }
        }
        if !given("kube_api_burst") {
            if let Some(burst) = self.kube_api_burst {
                args.kube_api_burst = burst;
            }
        }
        if !self.ignored.is_empty() {
            tracing::warn!(
                fields = %self.ignored.join(", "),
                "kube-proxy configuration fields the agent does not act on"
            );
        }
    }
}

#[cfg(test)]
mod tests;
