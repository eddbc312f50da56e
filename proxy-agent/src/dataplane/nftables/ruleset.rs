//! Desired state → one `nft -f` ruleset per family, in kube-proxy's iptables chain layout
//! (KUBE-SERVICES → KUBE-SVC/SVL/EXT/FW → KUBE-SEP) with nftables dispatch: verdict maps
//! keyed by `daddr . l4proto . dport` (constant cost however many Services), `numgen`
//! for endpoint choice, dynamic sets for affinity. Marks carry masquerade (0x4000), drop
//! (0x8000) and reject (0x10000) from the nat hooks to postrouting and the filter hooks.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    net::IpAddr,
};

use ipnet::IpNet;

use super::names;
use crate::model::{
    Backend, DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol, Route,
    ServicePortName,
};

/// Our tables' name, in the `ip` and `ip6` families.
pub const TABLE: &str = "proxy-agent";

/// One Service port of one family: every frontend it has.
struct Group<'a> {
    service: &'a ServicePortName,
    protocol: Protocol,
    frontends: Vec<(&'a FrontendKey, &'a Frontend)>,
}

#[derive(Clone, Copy)]
struct Family {
    v6: bool,
}

impl Family {
    fn table(self) -> &'static str {
        if self.v6 {
            "ip6"
        } else {
            "ip"
        }
    }
    fn addr(self) -> &'static str {
        if self.v6 {
            "ip6"
        } else {
            "ip"
        }
    }
    fn addr_type(self) -> &'static str {
        if self.v6 {
            "ipv6_addr"
        } else {
            "ipv4_addr"
        }
    }
    fn holds(self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.v6
    }
}

fn proto(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn endpoint(backend: &Backend) -> String {
    backend.to_string()
}

/// Both tables, preceded by their removal, as one atomic `nft -f` transaction.
#[must_use]
pub fn render(desired: &DesiredState, cluster_cidrs: &[IpNet]) -> String {
    let mut out = String::new();
    for v6 in [false, true] {
        let family = Family { v6 };
        let _ = writeln!(out, "add table {} {TABLE}", family.table());
        let _ = writeln!(out, "delete table {} {TABLE}", family.table());
        out.push_str(&table(desired, cluster_cidrs, family));
    }
    out
}

/// The statements that remove our tables (and nothing else).
#[must_use]
pub fn removal() -> String {
    let mut out = String::new();
    for family in ["ip", "ip6"] {
        let _ = writeln!(
            out,
            "add table {family} {TABLE}\ndelete table {family} {TABLE}"
        );
    }
    out
}

fn groups(desired: &DesiredState, family: Family) -> Vec<Group<'_>> {
    let mut groups: BTreeMap<(&ServicePortName, Protocol), Vec<(&FrontendKey, &Frontend)>> =
        BTreeMap::new();
    for (key, frontend) in desired.frontends.iter().filter(|(k, _)| family.holds(k.ip)) {
        groups
            .entry((&frontend.service, key.protocol))
            .or_default()
            .push((key, frontend));
    }
    groups
        .into_iter()
        .map(|((service, protocol), frontends)| Group {
            service,
            protocol,
            frontends,
        })
        .collect()
}

/// Where a route sends a new connection: its endpoint chain, or the mark for its verdict.
fn target(group: &Group, route: &Route) -> String {
    if route.backends.is_empty() {
        return match route.when_empty {
            EmptyVerdict::Reject => "KUBE-MARK-REJECT".to_owned(),
            EmptyVerdict::Drop => "KUBE-MARK-DROP".to_owned(),
        };
    }
    if route.local {
        names::local_chain(group.service, group.protocol)
    } else {
        names::service_chain(group.service, group.protocol)
    }
}

fn table(desired: &DesiredState, cluster_cidrs: &[IpNet], family: Family) -> String {
    let cidrs: Vec<String> = cluster_cidrs
        .iter()
        .filter(|c| family.holds(c.addr()))
        .map(ToString::to_string)
        .collect();
    let groups = groups(desired, family);
    let mut service_ips = Vec::new();
    let mut nodeports = BTreeSet::new();
    let mut nodeport_ips = BTreeSet::new();
    let mut chains = String::new();
    let mut sets = String::new();
    for group in &groups {
        group_chains(group, &cidrs, family, &mut chains, &mut sets);
        for (key, frontend) in &group.frontends {
            let ext = names::external_chain(group.service, group.protocol);
            let element = |target: String| {
                format!(
                    "{} . {} . {} : goto {target}",
                    key.ip,
                    proto(key.protocol),
                    key.port
                )
            };
            match frontend.kind {
                FrontendKind::ClusterIp => service_ips.push(element(target(group, &frontend.pod))),
                FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
                    let guarded = frontend.kind == FrontendKind::LoadBalancer
                        && !frontend.source_ranges.is_empty();
                    let chain = if guarded {
                        names::firewall_chain(group.service, group.protocol)
                    } else {
                        ext
                    };
                    service_ips.push(element(chain));
                }
                FrontendKind::NodePort => {
                    nodeport_ips.insert(key.ip.to_string());
                    nodeports.insert(format!(
                        "{} . {} : goto {ext}",
                        proto(key.protocol),
                        key.port
                    ));
                }
            }
        }
    }
    let (addr, addr_type) = (family.addr(), family.addr_type());
    let mut t = String::new();
    let _ = writeln!(t, "table {} {TABLE} {{", family.table());
    let _ = writeln!(
        t,
        "\tcomment \"rules for proxy-agent (kube-proxy replacement)\""
    );
    let set = |t: &mut String, name: &str, flags: &str, elements: &[String]| {
        let _ = writeln!(t, "\tset {name} {{\n\t\ttype {addr_type}\n{flags}");
        if !elements.is_empty() {
            let _ = writeln!(t, "\t\telements = {{ {} }}", elements.join(", "));
        }
        let _ = writeln!(t, "\t}}");
    };
    set(&mut t, "cluster-cidrs", "\t\tflags interval", &cidrs);
    set(
        &mut t,
        "nodeport-ips",
        "",
        &nodeport_ips.into_iter().collect::<Vec<_>>(),
    );
    let map = |t: &mut String, name: &str, key: &str, elements: &[String]| {
        let _ = writeln!(t, "\tmap {name} {{\n\t\ttype {key} : verdict");
        if !elements.is_empty() {
            let _ = writeln!(
                t,
                "\t\telements = {{\n\t\t\t{}\n\t\t}}",
                elements.join(",\n\t\t\t")
            );
        }
        let _ = writeln!(t, "\t}}");
    };
    map(
        &mut t,
        "service-ips",
        &format!("{addr_type} . inet_proto . inet_service"),
        &service_ips,
    );
    map(
        &mut t,
        "service-nodeports",
        "inet_proto . inet_service",
        &nodeports.into_iter().collect::<Vec<_>>(),
    );
    t.push_str(&sets);
    fixed_chains(&mut t, addr);
    t.push_str(&chains);
    t.push_str("}\n");
    t
}

/// The hooks, the dispatch chains and the mark chains, the same in every ruleset.
fn fixed_chains(t: &mut String, addr: &str) {
    for (name, hook, priority, target) in [
        ("nat-prerouting", "prerouting", "dstnat", "KUBE-SERVICES"),
        ("nat-output", "output", "-100", "KUBE-SERVICES"),
        (
            "nat-postrouting",
            "postrouting",
            "srcnat",
            "KUBE-POSTROUTING",
        ),
    ] {
        let _ = writeln!(t, "\tchain {name} {{\n\t\ttype nat hook {hook} priority {priority}; policy accept;\n\t\tjump {target}\n\t}}");
    }
    for hook in ["input", "forward", "output"] {
        let _ = writeln!(t, "\tchain filter-{hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;\n\t\tjump KUBE-FILTER\n\t}}");
    }
    let _ = writeln!(
        t,
        "\tchain KUBE-FILTER {{\n\t\tmeta mark & 0x00008000 == 0x00008000 drop\n\t\tmeta mark & 0x00010000 == 0x00010000 meta l4proto tcp reject with tcp reset\n\t\tmeta mark & 0x00010000 == 0x00010000 reject\n\t}}"
    );
    let _ = writeln!(
        t,
        "\tchain KUBE-SERVICES {{\n\t\t{addr} daddr . meta l4proto . th dport vmap @service-ips\n\t\t{addr} daddr @nodeport-ips jump KUBE-NODEPORTS\n\t}}"
    );
    let _ = writeln!(
        t,
        "\tchain KUBE-NODEPORTS {{\n\t\tmeta l4proto . th dport vmap @service-nodeports\n\t}}"
    );
    for (name, mark) in [
        ("KUBE-MARK-MASQ", "0x00004000"),
        ("KUBE-MARK-DROP", "0x00008000"),
        ("KUBE-MARK-REJECT", "0x00010000"),
    ] {
        let _ = writeln!(
            t,
            "\tchain {name} {{\n\t\tmeta mark set meta mark | {mark}\n\t}}"
        );
    }
    let _ = writeln!(
        t,
        "\tchain KUBE-POSTROUTING {{\n\t\tmeta mark & 0x00004000 == 0x00000000 return\n\t\tmeta mark set meta mark ^ 0x00004000\n\t\tmasquerade fully-random\n\t}}"
    );
}

/// The chains of one Service port: SVC/SVL (endpoint choice), EXT (external traffic
/// policy), FW (source ranges) and one SEP per endpoint.
fn group_chains(
    group: &Group,
    cidrs: &[String],
    family: Family,
    chains: &mut String,
    sets: &mut String,
) {
    let addr = family.addr();
    let comment = group.service.to_string();
    let affinity = group.frontends.iter().find_map(|(_, f)| f.affinity_timeout);
    let mut endpoint_sets: BTreeMap<String, (bool, Vec<Backend>)> = BTreeMap::new();
    let mut endpoints = BTreeSet::new();
    for (_, frontend) in &group.frontends {
        for route in [&frontend.pod, &frontend.node, &frontend.external] {
            if !route.backends.is_empty() {
                endpoint_sets.insert(target(group, route), (route.local, route.backends.to_vec()));
                endpoints.extend(route.backends.iter().copied());
            }
        }
    }
    for (chain, (_, backends)) in &endpoint_sets {
        let _ = writeln!(chains, "\tchain {chain} {{\n\t\tcomment \"{comment}\"");
        for (key, frontend) in group
            .frontends
            .iter()
            .filter(|(_, f)| f.kind == FrontendKind::ClusterIp)
        {
            // ClusterIP traffic from outside the cluster CIDR is masqueraded (only for the
            // ClusterIP itself, so external traffic passing through here keeps its source).
            if frontend.external.masquerade
                && !cidrs.is_empty()
                && target(group, &frontend.pod) == *chain
            {
                let _ = writeln!(
                    chains,
                    "\t\t{addr} daddr {} meta l4proto {} th dport {} {addr} saddr != @cluster-cidrs jump KUBE-MARK-MASQ",
                    key.ip,
                    proto(key.protocol),
                    key.port
                );
            }
        }
        if affinity.is_some() {
            for backend in backends {
                let sep = names::endpoint_chain(group.service, group.protocol, backend);
                let _ = writeln!(
                    chains,
                    "\t\t{addr} saddr @{} goto {sep}",
                    affinity_set(&sep)
                );
            }
        }
        let choices: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!(
                    "{i} : goto {}",
                    names::endpoint_chain(group.service, group.protocol, b)
                )
            })
            .collect();
        let _ = writeln!(
            chains,
            "\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
            backends.len(),
            choices.join(", ")
        );
    }
    for backend in &endpoints {
        let sep = names::endpoint_chain(group.service, group.protocol, backend);
        let _ = writeln!(
            chains,
            "\tchain {sep} {{\n\t\tcomment \"{comment}\"\n\t\t{addr} saddr {} jump KUBE-MARK-MASQ",
            backend.ip
        );
        if let Some(timeout) = affinity {
            let set = affinity_set(&sep);
            let _ = writeln!(sets, "\tset {set} {{\n\t\ttype {}\n\t\tflags dynamic,timeout\n\t\ttimeout {timeout}s\n\t}}", family.addr_type());
            let _ = writeln!(chains, "\t\tupdate @{set} {{ {addr} saddr }}");
        }
        let _ = writeln!(
            chains,
            "\t\tmeta l4proto {} dnat to {}\n\t}}",
            proto(group.protocol),
            endpoint(backend)
        );
    }
    external_chains(group, family, chains);
}

fn affinity_set(sep: &str) -> String {
    format!("affinity-{}", sep.trim_start_matches("KUBE-SEP-"))
}

/// KUBE-EXT (and KUBE-FW) for the port's NodePort, external and load-balancer frontends.
fn external_chains(group: &Group, family: Family, chains: &mut String) {
    let Some((_, frontend)) = group
        .frontends
        .iter()
        .find(|(_, f)| f.kind != FrontendKind::ClusterIp)
    else {
        return;
    };
    let addr = family.addr();
    let ext = names::external_chain(group.service, group.protocol);
    let _ = writeln!(
        chains,
        "\tchain {ext} {{\n\t\tcomment \"{}\"",
        group.service
    );
    let same =
        |a: &Route, b: &Route| target(group, a) == target(group, b) && a.masquerade == b.masquerade;
    let mut rule = |condition: &str, route: &Route| {
        if route.masquerade {
            let _ = writeln!(chains, "\t\t{condition}jump KUBE-MARK-MASQ");
        }
        let _ = writeln!(chains, "\t\t{condition}goto {}", target(group, route));
    };
    // Same order as the oracle classifies sources: the node itself, then pods.
    if !same(&frontend.node, &frontend.external) {
        rule("fib saddr type local ", &frontend.node);
    }
    if !same(&frontend.pod, &frontend.external) {
        rule(&format!("{addr} saddr @cluster-cidrs "), &frontend.pod);
    }
    rule("", &frontend.external);
    let _ = writeln!(chains, "\t}}");
    let ranges: BTreeSet<String> = group
        .frontends
        .iter()
        .flat_map(|(_, f)| f.source_ranges.iter())
        .filter(|r| family.holds(r.addr()))
        .map(ToString::to_string)
        .collect();
    if !ranges.is_empty() {
        let fw = names::firewall_chain(group.service, group.protocol);
        let list = ranges.into_iter().collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            chains,
            "\tchain {fw} {{\n\t\tcomment \"{}\"\n\t\t{addr} saddr {{ {list} }} goto {ext}\n\t\tgoto KUBE-MARK-DROP\n\t}}",
            group.service
        );
    }
}
