//! kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go) as the `nft -f`
//! transactions its proxier runs: the `ip kube-proxy` table with the service-ips /
//! service-nodeports verdict maps, a chain per Service port and per endpoint, and
//! `numgen random` vmaps; full syncs and partial ones that rewrite only the changed
//! Services' chains and the map elements that changed. Layout as kube-proxy's own
//! `TestOverallNFTablesRules` expects it (IPv4).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use super::{changed_services, service_of, Policy, PortKey, ServicePort};
use crate::kube_proxy::ports;
use proxy_agent::model::{Backend, DesiredState, ServicePortName};

const TABLE: &str = "ip kube-proxy";
const MARK_MASQ: &str = "mark-for-masquerade";

/// The node's side of the proxier's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--cluster-cidr` (local traffic detection by CIDR).
    pub cluster_cidr: String,
    /// The Service CIDRs (traffic to unallocated ClusterIPs is dropped).
    pub service_cidrs: String,
    /// `--nodeport-addresses` resolved to this node's addresses.
    pub nodeport_ips: Vec<IpAddr>,
    /// The node's primary IP (a load-balancer source range holding it admits the node).
    pub node_ip: IpAddr,
}

/// The proxier between syncs: the map and set elements it wrote (its
/// `nftElementStorage`s), the Service chains and affinity sets that exist, the chains
/// flushed as stale (deleted by the next sync), and the Service ports it last wrote.
#[derive(Debug)]
pub struct Proxier {
    config: Config,
    elements: BTreeMap<(&'static str, String), String>,
    chains: BTreeSet<String>,
    affinity_sets: BTreeSet<String>,
    stale: BTreeSet<String>,
    last: BTreeMap<PortKey, ServicePort>,
}

/// One transaction being written.
#[derive(Default)]
struct Tx {
    text: String,
}

impl Tx {
    fn line(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
    }
    fn rule(&mut self, chain: &str, rule: &str) {
        self.line(format_args!("add rule {TABLE} {chain} {rule}"));
    }
}

/// kube-proxy's `hashAndTruncate`: the first 8 base32 characters of the name's SHA-256,
/// a dash, and the name (never long enough here to be truncated).
fn hashed(name: &str) -> String {
    let encoded = BASE32.encode(&Sha256::digest(name.as_bytes()));
    format!("{}-{name}", &encoded[..8])
}

fn port_base(name: &ServicePortName, protocol: &str) -> String {
    hashed(&format!(
        "{}/{}/{protocol}/{}",
        name.namespace, name.name, name.port
    ))
}

fn endpoint_base(name: &ServicePortName, protocol: &str, backend: &Backend) -> String {
    let ip = backend.ip.to_string().replace(':', ".");
    hashed(&format!(
        "{}/{}/{protocol}/{}__{ip}/{}",
        name.namespace, name.name, name.port, backend.port
    ))
}

/// The chains and sets of one Service port, named as kube-proxy names them.
struct Names {
    cluster: String,
    local: String,
    external: String,
    firewall: String,
    endpoints: Vec<(Backend, String, String)>,
}

impl Names {
    fn of(name: &ServicePortName, protocol: &str, port: &ServicePort) -> Self {
        let base = port_base(name, protocol);
        Self {
            cluster: format!("service-{base}"),
            local: format!("local-{base}"),
            external: format!("external-{base}"),
            firewall: format!("firewall-{base}"),
            endpoints: port
                .reachable_endpoints()
                .into_iter()
                .map(|b| {
                    let base = endpoint_base(name, protocol, &b);
                    (b, format!("endpoint-{base}"), format!("affinity-{base}"))
                })
                .collect(),
        }
    }

    /// The chain of the Local or the Cluster policy.
    fn policy_chain(&self, local: bool) -> &str {
        if local {
            &self.local
        } else {
            &self.cluster
        }
    }

    fn endpoint(&self, backend: &Backend) -> &str {
        self.endpoints
            .iter()
            .find(|(b, _, _)| b == backend)
            .map_or("", |(_, chain, _)| chain)
    }

    fn affinity(&self, backend: &Backend) -> &str {
        self.endpoints
            .iter()
            .find(|(b, _, _)| b == backend)
            .map_or("", |(_, _, set)| set)
    }
}

/// One sync in progress: its transaction, the chains and elements it keeps.
struct Sync<'a> {
    proxier: &'a mut Proxier,
    tx: Tx,
    active: BTreeSet<String>,
    affinity: BTreeSet<String>,
    ensured: BTreeSet<(&'static str, String)>,
}

impl Sync<'_> {
    fn chain(&mut self, name: &str, skip: bool) {
        self.active.insert(name.to_owned());
        if !skip {
            self.tx.line(format_args!("add chain {TABLE} {name}"));
            self.tx.line(format_args!("flush chain {TABLE} {name}"));
        }
    }

    /// `ensureElem`: written only when new or changed (deleted and added again).
    fn element(
        &mut self,
        map: &'static str,
        key: &str,
        value: Option<&str>,
        comment: Option<&str>,
    ) {
        let stored = value.unwrap_or_default().to_owned();
        let id = (map, key.to_owned());
        let comment = comment
            .map(|c| format!(" comment \"{c}\""))
            .unwrap_or_default();
        let add = match value {
            Some(v) => format!("add element {TABLE} {map} {{ {key}{comment} : {v} }}"),
            None => format!("add element {TABLE} {map} {{ {key}{comment} }}"),
        };
        match self.proxier.elements.get(&id) {
            Some(existing) if *existing == stored => {}
            Some(_) => {
                self.tx
                    .line(format_args!("delete element {TABLE} {map} {{ {key} }}"));
                self.tx.line(format_args!("{add}"));
            }
            None => self.tx.line(format_args!("{add}")),
        }
        self.proxier.elements.insert(id.clone(), stored);
        self.ensured.insert(id);
    }
}

impl Proxier {
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            config,
            elements: BTreeMap::new(),
            chains: BTreeSet::new(),
            affinity_sets: BTreeSet::new(),
            stale: BTreeSet::new(),
            last: BTreeMap::new(),
        }
    }

    /// The transactions of a full sync of `desired` (`setupNFTables`, then every
    /// Service), in the order the proxier runs them.
    pub fn full(&mut self, desired: &DesiredState) -> Vec<String> {
        self.sync(desired, false)
    }

    /// The transactions of a partial sync after `desired` changed from the last sync:
    /// stale chains deleted, then the changed Services' chains and the changed
    /// elements.
    pub fn partial(&mut self, desired: &DesiredState) -> Vec<String> {
        self.sync(desired, true)
    }

    fn sync(&mut self, desired: &DesiredState, partial: bool) -> Vec<String> {
        let mut transactions = Vec::new();
        if !self.stale.is_empty() {
            let mut tx = Tx::default();
            for chain in std::mem::take(&mut self.stale) {
                tx.line(format_args!("delete chain {TABLE} {chain}"));
                self.chains.remove(&chain);
            }
            transactions.push(tx.text);
        }
        let ports = ports(desired);
        let changed = changed_services(&self.last, &ports);
        let mut tx = Tx::default();
        if !partial {
            self.elements.clear();
            base(&self.config, &mut tx);
        }
        let mut sync = Sync {
            proxier: self,
            tx,
            active: BTreeSet::new(),
            affinity: BTreeSet::new(),
            ensured: BTreeSet::new(),
        };
        for ((name, protocol), port) in &ports {
            let skip = partial && !changed.contains(&service_of(name));
            service(
                &mut sync,
                name,
                &protocol.to_string().to_lowercase(),
                port,
                skip,
            );
        }
        let Sync {
            proxier,
            mut tx,
            active,
            affinity,
            ensured,
        } = sync;
        for chain in proxier.chains.difference(&active) {
            tx.line(format_args!("flush chain {TABLE} {chain}"));
            proxier.stale.insert(chain.clone());
        }
        for set in proxier.affinity_sets.difference(&affinity) {
            tx.line(format_args!("delete set {TABLE} {set}"));
        }
        let leftover: Vec<_> = proxier
            .elements
            .keys()
            .filter(|k| !ensured.contains(*k))
            .cloned()
            .collect();
        for (map, key) in leftover {
            tx.line(format_args!("delete element {TABLE} {map} {{ {key} }}"));
            proxier.elements.remove(&(map, key));
        }
        proxier.chains.extend(active);
        proxier.affinity_sets = affinity;
        proxier.last = ports;
        transactions.push(tx.text);
        transactions
    }
}

/// `setupNFTables`: the table, its sets, maps, base chains and rules, each base object
/// flushed and refilled.
fn base(config: &Config, tx: &mut Tx) {
    tx.line(format_args!(
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    for (kind, name, spec) in [
        ("set", "cluster-ips", "type ipv4_addr ; comment \"Active ClusterIPs\" ;"),
        ("set", "nodeport-ips", "type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ;"),
        ("map", "firewall-ips", "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ;"),
        ("map", "no-endpoint-nodeports", "type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ;"),
        ("map", "no-endpoint-services", "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ;"),
        ("map", "service-ips", "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ;"),
        ("map", "service-nodeports", "type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ;"),
    ] {
        tx.line(format_args!("add {kind} {TABLE} {name} {{ {spec} }}"));
        tx.line(format_args!("flush {kind} {TABLE} {name}"));
    }
    for (name, spec) in [
        ("cluster-ips-check", ""),
        (
            "filter-prerouting-pre-dnat",
            " { type filter hook prerouting priority -110 ; }",
        ),
        (
            "filter-output-pre-dnat",
            " { type filter hook output priority -110 ; }",
        ),
        (
            "filter-forward",
            " { type filter hook forward priority 0 ; }",
        ),
        ("filter-input", " { type filter hook input priority 0 ; }"),
        ("filter-output", " { type filter hook output priority 0 ; }"),
        ("firewall-check", ""),
        ("mark-for-masquerade", ""),
        ("masquerading", ""),
        ("nat-output", " { type nat hook output priority -100 ; }"),
        (
            "nat-postrouting",
            " { type nat hook postrouting priority 100 ; }",
        ),
        (
            "nat-prerouting",
            " { type nat hook prerouting priority -100 ; }",
        ),
        ("nodeport-endpoints-check", ""),
        (
            "reject-chain",
            " { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        ),
        ("services", ""),
        ("service-endpoints-check", ""),
    ] {
        tx.line(format_args!("add chain {TABLE} {name}{spec}"));
        tx.line(format_args!("flush chain {TABLE} {name}"));
    }
    let service_cidrs = &config.service_cidrs;
    for (chain, rule) in [
        ("cluster-ips-check", "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".to_owned()),
        ("cluster-ips-check", format!("ip daddr {{ {service_cidrs} }} drop comment \"Drop traffic to unallocated ClusterIPs\"")),
        ("filter-prerouting-pre-dnat", "ct state new jump firewall-check".to_owned()),
        ("filter-forward", "ct state new jump service-endpoints-check".to_owned()),
        ("filter-forward", "ct state new jump cluster-ips-check".to_owned()),
        ("filter-input", "ct state new jump nodeport-endpoints-check".to_owned()),
        ("filter-input", "ct state new jump service-endpoints-check".to_owned()),
        ("filter-output", "ct state new jump service-endpoints-check".to_owned()),
        ("filter-output-pre-dnat", "ct state new jump firewall-check".to_owned()),
        ("filter-output", "ct state new jump cluster-ips-check".to_owned()),
        ("firewall-check", "ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned()),
        ("mark-for-masquerade", "mark set mark or 0x4000".to_owned()),
        ("masquerading", "mark and 0x4000 == 0 return".to_owned()),
        ("masquerading", "mark set mark xor 0x4000".to_owned()),
        ("masquerading", "masquerade fully-random".to_owned()),
        ("nat-output", "jump services".to_owned()),
        ("nat-postrouting", "jump masquerading".to_owned()),
        ("nat-prerouting", "jump services".to_owned()),
        ("nodeport-endpoints-check", "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned()),
        ("reject-chain", "reject".to_owned()),
        ("services", "ip daddr . meta l4proto . th dport vmap @service-ips".to_owned()),
        ("services", "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned()),
        ("service-endpoints-check", "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned()),
    ] {
        tx.rule(chain, &rule);
    }
    for ip in &config.nodeport_ips {
        if ip.is_ipv4() {
            tx.line(format_args!("add element {TABLE} nodeport-ips {{ {ip} }}"));
        }
    }
}

/// A firewall chain for `loadBalancerSourceRanges` (this proxier writes it even when
/// the Service has no endpoints).
fn uses_firewall(port: &ServicePort) -> bool {
    !port.lb_ips.is_empty() && !port.source_ranges.is_empty()
}

/// One Service port, as the proxier's loop body writes it; `skip` (a partial sync, the
/// Service unchanged) writes only the elements that changed.
fn service(
    sync: &mut Sync<'_>,
    name: &ServicePortName,
    protocol: &str,
    port: &ServicePort,
    skip: bool,
) {
    let names = Names::of(name, protocol, port);
    let policy = port.policy();
    for (_, chain, set) in &names.endpoints {
        sync.chain(chain, skip);
        if port.affinity_timeout.is_some() {
            sync.affinity.insert(set.clone());
        }
    }
    for (used, chain) in [
        (policy.uses_cluster, &names.cluster),
        (policy.uses_local, &names.local),
        (policy.uses_external, &names.external),
        (uses_firewall(port), &names.firewall),
    ] {
        if used {
            sync.chain(chain, skip);
        }
    }
    elements(sync, &name.to_string(), protocol, port, &names, policy);
    if !skip {
        let config = &sync.proxier.config;
        rules(&mut sync.tx, config, protocol, port, &names, policy);
    }
}

/// A Service port's map and set elements.
fn elements(
    sync: &mut Sync<'_>,
    comment: &str,
    protocol: &str,
    port: &ServicePort,
    names: &Names,
    policy: Policy,
) {
    let key = |ip: &IpAddr| format!("{ip} . {protocol} . {}", port.port);
    let external = format!("goto {}", names.external);
    let empty = Some(if port.has_endpoints {
        "drop"
    } else {
        "goto reject-chain"
    });
    if let Some(cluster_ip) = &port.cluster_ip {
        sync.element("cluster-ips", &cluster_ip.to_string(), None, None);
        if policy.has_internal {
            let to = format!("goto {}", names.policy_chain(port.internal_local));
            sync.element("service-ips", &key(cluster_ip), Some(&to), None);
        } else {
            sync.element(
                "no-endpoint-services",
                &key(cluster_ip),
                empty,
                Some(comment),
            );
        }
    }
    for ip in &port.external_ips {
        if port.has_endpoints {
            sync.element("service-ips", &key(ip), Some(&external), None);
        }
        if !policy.has_external {
            sync.element("no-endpoint-services", &key(ip), empty, Some(comment));
        }
    }
    for ip in &port.lb_ips {
        if port.has_endpoints {
            sync.element("service-ips", &key(ip), Some(&external), None);
        }
        if uses_firewall(port) {
            let to = format!("goto {}", names.firewall);
            sync.element("firewall-ips", &key(ip), Some(&to), None);
        }
    }
    if !policy.has_external {
        for ip in &port.lb_ips {
            sync.element("no-endpoint-services", &key(ip), empty, Some(comment));
        }
    }
    if let Some(node_port) = port.node_port {
        let key = format!("{protocol} . {node_port}");
        if port.has_endpoints {
            sync.element("service-nodeports", &key, Some(&external), None);
        }
        if !policy.has_external {
            sync.element("no-endpoint-nodeports", &key, empty, Some(comment));
        }
    }
}

/// A Service port's chains' rules and affinity sets.
fn rules(
    tx: &mut Tx,
    config: &Config,
    protocol: &str,
    port: &ServicePort,
    names: &Names,
    policy: Policy,
) {
    let cidr = &config.cluster_cidr;
    if let (true, Some(cluster_ip)) = (policy.has_internal, port.cluster_ip) {
        let masquerade = format!("ip daddr {cluster_ip} ip saddr != {cidr} jump {MARK_MASQ}");
        tx.rule(names.policy_chain(port.internal_local), &masquerade);
    }
    if policy.uses_external {
        let (external, cluster) = (&names.external, &names.cluster);
        if port.external_local {
            for rule in [
                format!("ip saddr {cidr} goto {cluster} comment \"short-circuit pod traffic\""),
                format!(
                    "fib saddr type local jump {MARK_MASQ} comment \"masquerade local traffic\""
                ),
                format!(
                    "fib saddr type local goto {cluster} comment \"short-circuit local traffic\""
                ),
            ] {
                tx.rule(external, &rule);
            }
        } else {
            tx.rule(external, &format!("jump {MARK_MASQ}"));
        }
        if policy.has_external {
            tx.rule(
                external,
                &format!("goto {}", names.policy_chain(port.external_local)),
            );
        }
    }
    if uses_firewall(port) {
        let mut sources: Vec<String> = port.source_ranges.iter().map(ToString::to_string).collect();
        if port
            .source_ranges
            .iter()
            .any(|r| r.contains(&config.node_ip))
        {
            sources.extend(port.lb_ips.iter().map(ToString::to_string));
        }
        let rule = format!("ip saddr != {{ {} }} drop", sources.join(" , "));
        tx.rule(&names.firewall, &rule);
    }
    let affinity = port.affinity_timeout.is_some();
    if let Some(timeout) = port.affinity_timeout {
        for (_, _, set) in &names.endpoints {
            tx.line(format_args!(
                "add set {TABLE} {set} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"
            ));
        }
    }
    if policy.uses_cluster {
        endpoint_rules(tx, names, &names.cluster, &port.cluster_endpoints, affinity);
    }
    if policy.uses_local {
        endpoint_rules(tx, names, &names.local, &port.local_endpoints, affinity);
    }
    for (backend, chain, set) in &names.endpoints {
        tx.rule(chain, &format!("ip saddr {} jump {MARK_MASQ}", backend.ip));
        if affinity {
            tx.rule(chain, &format!("update @{set} {{ ip saddr }}"));
        }
        tx.rule(chain, &format!("meta l4proto {protocol} dnat to {backend}"));
    }
}

/// `writeServiceToEndpointRules`: affinity first, then the random split.
fn endpoint_rules(tx: &mut Tx, names: &Names, chain: &str, endpoints: &[Backend], affinity: bool) {
    if affinity {
        for backend in endpoints {
            tx.rule(
                chain,
                &format!(
                    "ip saddr @{} goto {}",
                    names.affinity(backend),
                    names.endpoint(backend)
                ),
            );
        }
    }
    let elements: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : goto {}", names.endpoint(b)))
        .collect();
    tx.rule(
        chain,
        &format!(
            "numgen random mod {} vmap {{ {} }}",
            endpoints.len(),
            elements.join(" , ")
        ),
    );
}
