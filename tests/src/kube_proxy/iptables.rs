//! kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go) as the
//! `iptables-restore --noflush` input its proxier writes: the filter table (KUBE-SERVICES
//! rejects, KUBE-EXTERNAL-SERVICES drops, KUBE-NODEPORTS health checks,
//! KUBE-PROXY-FIREWALL, KUBE-FORWARD) and the nat table (KUBE-SERVICES, KUBE-NODEPORTS,
//! KUBE-SVC / KUBE-SVL / KUBE-EXT / KUBE-FW / KUBE-SEP per Service port). Full syncs, and
//! partial ones (`MinimizeIPTablesRestore`, GA in 1.28) that write only the changed
//! Services' chains; stale chains deleted as it deletes them; comments dropped past
//! 1 000 endpoints (its large-cluster mode). Layout as its `TestOverallIPTablesRules`
//! expects it (IPv4).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use proxy_agent::{
    dataplane::nftables::names,
    model::{Backend, DesiredState, Protocol, ServicePortName},
};

use super::{changed_services, ports, service_of, PortKey, ServicePort};

/// kube-proxy's `largeClusterEndpointsThreshold`.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The node's side of the proxier's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--cluster-cidr` (local traffic detection by CIDR).
    pub cluster_cidr: String,
    /// The node's primary IP (a load-balancer source range holding it admits the LB IPs).
    pub node_ip: std::net::IpAddr,
    /// `--iptables-localhost-nodeports` (its default: true).
    pub localhost_nodeports: bool,
    /// Whether the kernel has the nfacct counters kube-proxy counts with (not here:
    /// kube-proxy then writes the same rules without them).
    pub nfacct: bool,
    /// Whether iptables has `MASQUERADE --random-fully` (every current one).
    pub random_fully: bool,
}

impl Config {
    /// kube-proxy's defaults on a node like this one, pods in `cluster_cidr`.
    #[must_use]
    pub fn for_cluster(cluster_cidr: &str) -> Self {
        Self {
            cluster_cidr: cluster_cidr.to_owned(),
            node_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            localhost_nodeports: true,
            nfacct: false,
            random_fully: true,
        }
    }
}

/// The proxier between syncs: the Service ports it last wrote and the nat chains that
/// exist (what its `iptables-save` would list).
#[derive(Debug)]
pub struct Proxier {
    config: Config,
    last: BTreeMap<PortKey, ServicePort>,
    chains: BTreeSet<String>,
    large: bool,
}

/// The tables being written. A Service's own nat chains and their rules are kept apart
/// from the rules of the top-level chains (KUBE-SERVICES, KUBE-NODEPORTS), which every
/// sync writes whole.
#[derive(Default)]
struct Restore {
    filter_chains: String,
    filter_rules: String,
    nat_chains: String,
    nat_rules: String,
    own_chains: String,
    own_rules: String,
}

fn line(out: &mut String, text: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(text);
    out.push('\n');
}

impl Proxier {
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            config,
            last: BTreeMap::new(),
            chains: BTreeSet::new(),
            large: false,
        }
    }

    /// The restore input of a full sync of `desired`.
    pub fn full(&mut self, desired: &DesiredState) -> String {
        self.sync(desired, false)
    }

    /// The restore input of a partial sync after `desired` changed from the last sync.
    pub fn partial(&mut self, desired: &DesiredState) -> String {
        self.sync(desired, true)
    }

    /// Whether the last sync read the nat table back (`iptables-save`) to find stale
    /// chains: kube-proxy does below 1 000 endpoints (and once a sync period above).
    #[must_use]
    pub fn saves_nat(&self) -> bool {
        !self.large
    }

    fn sync(&mut self, desired: &DesiredState, partial: bool) -> String {
        let ports = ports(desired);
        let changed = changed_services(&self.last, &ports);
        let endpoints: usize = ports.values().map(|p| p.reachable_endpoints().len()).sum();
        self.large = endpoints > LARGE_CLUSTER_ENDPOINTS;
        let mut out = Restore::default();
        self.head(&mut out);
        let mut active = BTreeSet::new();
        for ((name, protocol), port) in &ports {
            let mut written = Restore::default();
            self.service(&mut written, &mut active, name, *protocol, port);
            out.filter_rules.push_str(&written.filter_rules);
            out.nat_rules.push_str(&written.nat_rules);
            // A Service unchanged since the last sync: its own chains are not written.
            if !partial || changed.contains(&service_of(name)) {
                out.nat_chains.push_str(&written.own_chains);
                out.nat_rules.push_str(&written.own_rules);
            }
        }
        // Stale chains are found by reading the table back, which a large cluster
        // does only once a sync period: between, they stay.
        if self.large {
            self.chains.extend(active);
        } else {
            for chain in self.chains.difference(&active) {
                line(&mut out.nat_chains, format_args!(":{chain} - [0:0]"));
                line(&mut out.nat_rules, format_args!("-X {chain}"));
            }
            self.chains = active;
        }
        self.tail(&mut out);
        self.last = ports;
        format!(
            "*filter\n{}{}COMMIT\n*nat\n{}{}COMMIT\n",
            out.filter_chains, out.filter_rules, out.nat_chains, out.nat_rules
        )
    }

    /// The top-level chains, the masquerade chains and the localnet firewall.
    fn head(&self, out: &mut Restore) {
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            line(&mut out.filter_chains, format_args!(":{chain} - [0:0]"));
        }
        for chain in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            line(&mut out.nat_chains, format_args!(":{chain} - [0:0]"));
        }
        let random = if self.config.random_fully {
            " --random-fully"
        } else {
            ""
        };
        for rule in [
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_owned(),
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".to_owned(),
            format!("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{random}"),
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".to_owned(),
        ] {
            line(&mut out.nat_rules, format_args!("{rule}"));
        }
        if self.config.localhost_nodeports {
            line(
                &mut out.filter_chains,
                format_args!(":KUBE-FIREWALL - [0:0]"),
            );
            line(&mut out.filter_rules, format_args!("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"));
        }
    }

    /// The NodePorts tail call and the forwarding rules.
    fn tail(&self, out: &mut Restore) {
        let localhost = if self.config.localhost_nodeports {
            ""
        } else {
            " ! -d 127.0.0.0/8"
        };
        line(&mut out.nat_rules, format_args!("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL{localhost} -j KUBE-NODEPORTS"));
        let nfacct = if self.config.nfacct {
            " -m nfacct --nfacct-name ct_state_invalid_dropped_pkts"
        } else {
            ""
        };
        for rule in [
            format!("-A KUBE-FORWARD -m conntrack --ctstate INVALID{nfacct} -j DROP"),
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT".to_owned(),
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        ] {
            line(&mut out.filter_rules, format_args!("{rule}"));
        }
    }

    /// `-m comment --comment TEXT ` unless in large-cluster mode.
    fn comment(&self, text: &str) -> String {
        if self.large {
            String::new()
        } else {
            format!("-m comment --comment {text} ")
        }
    }

    /// One Service port, as the proxier's loop body writes it.
    #[expect(
        clippy::too_many_lines,
        reason = "the proxier's loop body, in its order"
    )]
    fn service(
        &self,
        out: &mut Restore,
        active: &mut BTreeSet<String>,
        name: &ServicePortName,
        protocol: Protocol,
        port: &ServicePort,
    ) {
        let p = protocol.to_string().to_lowercase();
        let svc = name.to_string();
        let cluster = names::service_chain(name, protocol);
        let local_chain = names::local_chain(name, protocol);
        let external = names::external_chain(name, protocol);
        let firewall = names::firewall_chain(name, protocol);
        let policy = port.policy();
        let chain_of = |local: bool| if local { &local_chain } else { &cluster };
        let (internal_chain, external_policy) =
            (chain_of(port.internal_local), chain_of(port.external_local));
        let uses_firewall =
            port.has_endpoints && !port.lb_ips.is_empty() && !port.source_ranges.is_empty();
        let lb_chain = if uses_firewall { &firewall } else { &external };
        // The filter rule for frontends left without endpoints (all of them, or this
        // node's under a Local policy).
        let (empty, target) = if port.has_endpoints {
            (
                format!("-m comment --comment \"{svc} has no local endpoints\""),
                "DROP",
            )
        } else {
            (
                format!("-m comment --comment \"{svc} has no endpoints\""),
                "REJECT",
            )
        };
        let dst = |ip: &dyn std::fmt::Display, port_number: u16| {
            format!("-m {p} -p {p} -d {ip} --dport {port_number}")
        };
        let (filter, nat) = (&mut out.filter_rules, &mut out.nat_rules);
        if let Some(ip) = port.cluster_ip {
            if policy.has_internal {
                line(nat, format_args!("-A KUBE-SERVICES -m comment --comment \"{svc} cluster IP\" {} -j {internal_chain}", dst(&ip, port.port)));
            } else {
                line(
                    filter,
                    format_args!(
                        "-A KUBE-SERVICES {empty} {} -j {target}",
                        dst(&ip, port.port)
                    ),
                );
            }
        }
        for ip in &port.external_ips {
            if port.has_endpoints {
                line(nat, format_args!("-A KUBE-SERVICES -m comment --comment \"{svc} external IP\" {} -j {external}", dst(ip, port.port)));
            }
            if !policy.has_external {
                line(
                    filter,
                    format_args!(
                        "-A KUBE-EXTERNAL-SERVICES {empty} {} -j {target}",
                        dst(ip, port.port)
                    ),
                );
            }
        }
        for ip in &port.lb_ips {
            if port.has_endpoints {
                line(nat, format_args!("-A KUBE-SERVICES -m comment --comment \"{svc} loadbalancer IP\" {} -j {lb_chain}", dst(ip, port.port)));
            }
            if uses_firewall {
                line(filter, format_args!("-A KUBE-PROXY-FIREWALL -m comment --comment \"{svc} traffic not accepted by {firewall}\" {} -j DROP", dst(ip, port.port)));
            }
        }
        if !policy.has_external {
            for ip in &port.lb_ips {
                line(
                    filter,
                    format_args!(
                        "-A KUBE-EXTERNAL-SERVICES {empty} {} -j {target}",
                        dst(ip, port.port)
                    ),
                );
            }
        }
        if let Some(node_port) = port.node_port {
            if port.has_endpoints {
                if self.config.localhost_nodeports && self.config.nfacct {
                    line(nat, format_args!("-A KUBE-NODEPORTS -m comment --comment {svc} -m {p} -p {p} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {external}"));
                }
                line(nat, format_args!("-A KUBE-NODEPORTS -m comment --comment {svc} -m {p} -p {p} --dport {node_port} -j {external}"));
            }
            if !policy.has_external {
                line(filter, format_args!("-A KUBE-EXTERNAL-SERVICES {empty} -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j {target}"));
            }
        }
        if let Some(health) = port.health_check_node_port {
            line(filter, format_args!("-A KUBE-NODEPORTS -m comment --comment \"{svc} health check node port\" -m tcp -p tcp --dport {health} -j ACCEPT"));
        }
        // The Service's own chains.
        let (chains, nat) = (&mut out.own_chains, &mut out.own_rules);
        let mut chain = |name: &str| {
            line(chains, format_args!(":{name} - [0:0]"));
            active.insert(name.to_owned());
        };
        if policy.uses_cluster {
            chain(&cluster);
        }
        if policy.uses_local {
            chain(&local_chain);
        }
        if policy.has_internal {
            if let Some(ip) = port.cluster_ip {
                let cidr = &self.config.cluster_cidr;
                line(nat, format_args!("-A {internal_chain} -m comment --comment \"{svc} cluster IP\" {} ! -s {cidr} -j KUBE-MARK-MASQ", dst(&ip, port.port)));
            }
        }
        if policy.uses_external {
            chain(&external);
            if port.external_local {
                let cidr = &self.config.cluster_cidr;
                line(nat, format_args!("-A {external} -m comment --comment \"pod traffic for {svc} external destinations\" -s {cidr} -j {cluster}"));
                line(nat, format_args!("-A {external} -m comment --comment \"masquerade LOCAL traffic for {svc} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"));
                line(nat, format_args!("-A {external} -m comment --comment \"route LOCAL traffic for {svc} external destinations\" -m addrtype --src-type LOCAL -j {cluster}"));
            } else {
                line(nat, format_args!("-A {external} -m comment --comment \"masquerade traffic for {svc} external destinations\" -j KUBE-MARK-MASQ"));
            }
            if policy.has_external {
                line(nat, format_args!("-A {external} -j {external_policy}"));
            }
        }
        if uses_firewall {
            chain(&firewall);
            let head = format!("-A {firewall} -m comment --comment \"{svc} loadbalancer IP\"");
            for range in &port.source_ranges {
                line(nat, format_args!("{head} -s {range} -j {external}"));
            }
            if port
                .source_ranges
                .iter()
                .any(|r| r.contains(&self.config.node_ip))
            {
                for ip in &port.lb_ips {
                    line(nat, format_args!("{head} -s {ip} -j {external}"));
                }
            }
            line(nat, format_args!("-A {firewall} -m comment --comment \"other traffic to {svc} will be dropped by KUBE-PROXY-FIREWALL\""));
        }
        if policy.uses_cluster {
            self.to_endpoints(nat, name, protocol, port, &cluster, &port.cluster_endpoints);
        }
        if policy.uses_local {
            self.to_endpoints(
                nat,
                name,
                protocol,
                port,
                &local_chain,
                &port.local_endpoints,
            );
        }
        for backend in port.reachable_endpoints() {
            let sep = names::endpoint_chain(name, protocol, &backend);
            chain(&sep);
            let head = format!("-A {sep} {}", self.comment(&svc));
            line(
                nat,
                format_args!("{head}-s {} -j KUBE-MARK-MASQ", backend.ip),
            );
            let recent = if port.affinity_timeout.is_some() {
                format!("-m recent --name {sep} --set ")
            } else {
                String::new()
            };
            line(
                nat,
                format_args!("{head}{recent}-m {p} -p {p} -j DNAT --to-destination {backend}"),
            );
        }
    }

    /// `writeServiceToEndpointRules`: affinity first, then the probability splits.
    fn to_endpoints(
        &self,
        nat: &mut String,
        name: &ServicePortName,
        protocol: Protocol,
        port: &ServicePort,
        chain: &str,
        endpoints: &[Backend],
    ) {
        if let Some(timeout) = port.affinity_timeout {
            for backend in endpoints {
                let sep = names::endpoint_chain(name, protocol, backend);
                let comment = self.comment(&format!("\"{name} -> {backend}\""));
                line(nat, format_args!("-A {chain} {comment}-m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"));
            }
        }
        let n = endpoints.len();
        for (i, backend) in endpoints.iter().enumerate() {
            let sep = names::endpoint_chain(name, protocol, backend);
            let comment = self.comment(&format!("\"{name} -> {backend}\""));
            let split = if i + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "endpoint counts are small")]
                let probability = 1.0 / (n - i) as f64;
                format!("-m statistic --mode random --probability {probability:.10} ")
            } else {
                String::new()
            };
            line(nat, format_args!("-A {chain} {comment}{split}-j {sep}"));
        }
    }
}

/// A full sync's restore input for `desired` with kube-proxy's defaults (the datapath
/// bench's baseline).
#[must_use]
pub fn ruleset(desired: &DesiredState, cluster_cidr: &str) -> String {
    Proxier::new(Config::for_cluster(cluster_cidr)).full(desired)
}
