//! Desired state → one `nft -f` ruleset per family, in kube-proxy's iptables chain layout
//! (KUBE-SERVICES → KUBE-SVC/SVL/EXT/FW → KUBE-SEP) with nftables dispatch: verdict maps
//! keyed by `daddr . l4proto . dport` (constant cost however many Services), `numgen`
//! for endpoint choice, dynamic sets for affinity. Marks carry masquerade (0x4000), drop
//! (0x8000) and reject (0x10000) from the nat hooks to postrouting and the filter hooks.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{
    names,
    table::{
        Chain, Set, Table, TableKey, COUNTER_DROP_NO_LOCAL_ENDPOINTS, COUNTER_DROP_SOURCE_RANGE,
        COUNTER_REJECT_NO_ENDPOINTS, TABLE,
    },
};
use crate::model::{
    Backend, DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, LocalTraffic,
    Protocol, Route, ServicePortName,
};

/// Up to this many endpoints, choose one with kube-proxy's iptables cascade (one
/// `numgen random mod (N-i) 0` rule per endpoint); above it with one anonymous
/// `numgen … vmap`. Each anonymous set costs the kernel a scan of the table's sets
/// list, so a vmap in every Service makes a full load quadratic (10 000 Services × 10
/// endpoints: 199 s with vmaps, 12 s with cascades on this machine).
pub const CASCADE_MAX: usize = 32;

/// One Service port of one family: every frontend it has.
pub(super) struct Group<'a> {
    pub service: &'a ServicePortName,
    pub protocol: Protocol,
    pub frontends: Vec<(&'a FrontendKey, &'a Frontend)>,
}

#[derive(Clone, Copy)]
pub(super) struct Family {
    pub v6: bool,
}

impl Family {
    pub(super) fn table(self) -> &'static str {
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
    pub fn holds(self, ip: IpAddr) -> bool {
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

/// Our tables, preceded by the removal of every table of ours, as one atomic `nft -f`
/// transaction.
#[must_use]
pub fn render(desired: &DesiredState, local: &LocalTraffic) -> String {
    full_text(&build(desired, local), &|table, out| table.write_text(out))
}

/// The tables for a desired state, every chain with its text: per family the main
/// table, then each Service table that holds a Service (the full build; `Rendered`
/// keeps them current change by change).
#[must_use]
pub fn build(desired: &DesiredState, local: &LocalTraffic) -> Vec<Table> {
    super::rendered::Rendered::full_text(desired, local).live()
}

/// Writes one table whole (the Service chains made again where the table keeps none).
pub type WriteTable<'a> = dyn Fn(&Table, &mut dyn std::fmt::Write) -> std::fmt::Result + 'a;

/// Replaces every table of ours with `tables`.
#[must_use]
pub fn full_text(tables: &[Table], write: &WriteTable) -> String {
    let mut out = removal();
    for table in tables {
        let _ = write(table, &mut out);
    }
    out
}

/// The names a table of ours holds in the kernel (read before a full load).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeSet<String>,
    /// Name → `set` or `map`.
    pub sets: BTreeMap<String, &'static str>,
}

impl Existing {
    /// Our tables' names in `nft -t list chains|sets|maps <family>` output (which lists
    /// every table of the family: a table line starts each one's names), by table.
    #[must_use]
    pub fn parse(family: &'static str, listing: &str) -> BTreeMap<TableKey, Self> {
        let mut tables: BTreeMap<TableKey, Self> = BTreeMap::new();
        let mut ours: Option<TableKey> = None;
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            let first = (words.next(), words.next(), words.next());
            if let (Some("table"), Some(_), Some(name)) = first {
                ours = super::table::is_ours(name).then(|| (family, name.to_owned()));
                if let Some(key) = &ours {
                    tables.entry(key.clone()).or_default();
                }
                continue;
            }
            let Some(existing) = ours.as_ref().and_then(|key| tables.get_mut(key)) else {
                continue;
            };
            match first {
                (Some("chain"), Some(name), Some("{")) => {
                    existing.chains.insert(name.to_owned());
                }
                (Some(kind @ ("set" | "map")), Some(name), Some("{")) => {
                    let kind = if kind == "set" { "set" } else { "map" };
                    existing.sets.insert(name.to_owned(), kind);
                }
                _ => {}
            }
        }
        tables
    }
}

/// The statements that remove every table of ours (and nothing else).
#[must_use]
pub fn removal() -> String {
    let mut out = String::new();
    for family in ["ip", "ip6"] {
        for name in super::table::all_names() {
            out.push_str(&removal_of(family, &name));
        }
    }
    out
}

/// Removes one table, whether it exists or not.
pub(super) fn removal_of(family: &str, name: &str) -> String {
    format!("add table {family} {name}\ndelete table {family} {name}\n")
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

fn chain(comment: &str, rules: Vec<String>) -> Chain {
    Chain {
        hook: None,
        comment: Some(comment.into()),
        rules: rules.into_iter().collect(),
    }
}

/// The main table of one family: the filter hooks that carry out the drop and reject
/// marks, and the postrouting hook that masquerades.
pub(super) fn main_table(family: Family) -> Table {
    let mut t = Table::new(
        family.table(),
        TABLE.to_owned(),
        "rules for proxy-agent (kube-proxy replacement)",
    );
    main_chains(&mut t);
    t
}

/// Service table `shard` of one family with no Service in it: its nat hooks, dispatch
/// and mark chains, the cluster CIDRs and empty dispatch maps.
pub(super) fn shard_table(local: &LocalTraffic, family: Family, shard: usize) -> Table {
    let mut t = Table::new(
        family.table(),
        super::table::shard_name(shard),
        "Services for proxy-agent (kube-proxy replacement)",
    )
    .with_counters();
    let addr_type = family.addr_type();
    let mut cidrs = Set::new("set", &[&format!("type {addr_type}"), "flags interval"]);
    // An interval set refuses overlapping elements: `--cluster-cidr 10.0.0.0/8,10.244.0.0/16`
    // is one range to the kernel.
    let family_cidrs: Vec<IpNet> = local_sources(local)
        .iter()
        .filter(|c| family.holds(c.addr()))
        .map(IpNet::trunc)
        .collect();
    for cidr in IpNet::aggregate(&family_cidrs) {
        cidrs.elements.insert(cidr.to_string(), String::new());
    }
    t.sets.insert("cluster-cidrs".to_owned(), cidrs);
    t.sets.insert(
        NODEPORT_IPS.to_owned(),
        Set::new("set", &[&format!("type {addr_type}")]),
    );
    t.sets.insert(
        SERVICE_IPS.to_owned(),
        Set::new(
            "map",
            &[&format!(
                "type {addr_type} . inet_proto . inet_service : verdict"
            )],
        ),
    );
    t.sets.insert(
        SERVICE_NODEPORTS.to_owned(),
        Set::new("map", &["type inet_proto . inet_service : verdict"]),
    );
    shard_chains(&mut t, family.addr());
    t
}

/// The dispatch maps' names.
pub(super) const SERVICE_IPS: &str = "service-ips";
pub(super) const SERVICE_NODEPORTS: &str = "service-nodeports";
pub(super) const NODEPORT_IPS: &str = "nodeport-ips";
/// The sets a Service table's frontends fill, element by element.
pub(super) const DISPATCH: [&str; 3] = [SERVICE_IPS, SERVICE_NODEPORTS, NODEPORT_IPS];

/// A frontend's element in `service-ips` (ClusterIP, external and load-balancer IPs) or
/// in `service-nodeports` (NodePorts, whose address goes into `nodeport-ips`).
pub(super) enum Element {
    ServiceIp(String, String),
    NodePort(String, String),
}

pub(super) fn element(group: &Group, key: &FrontendKey, frontend: &Frontend) -> Element {
    let ext = names::external_chain(group.service, group.protocol);
    match frontend.kind {
        FrontendKind::ClusterIp => Element::ServiceIp(
            service_ip(key),
            format!("goto {}", target(group, &frontend.pod)),
        ),
        FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
            let guarded =
                frontend.kind == FrontendKind::LoadBalancer && !frontend.source_ranges.is_empty();
            let chain = if guarded {
                names::firewall_chain(group.service, group.protocol)
            } else {
                ext
            };
            Element::ServiceIp(service_ip(key), format!("goto {chain}"))
        }
        FrontendKind::NodePort => Element::NodePort(
            format!("{} . {}", proto(key.protocol), key.port),
            format!("goto {ext}"),
        ),
    }
}

fn service_ip(key: &FrontendKey) -> String {
    format!("{} . {} . {}", key.ip, proto(key.protocol), key.port)
}

fn fixed(t: &mut Table, name: &str, hook: Option<String>, rules: &[&str]) {
    let chain = Chain {
        hook,
        comment: None,
        rules: rules.iter().collect(),
    };
    t.chains.insert(name.to_owned(), chain);
}

/// The main table's hooks and chains.
fn main_chains(t: &mut Table) {
    fixed(
        t,
        "nat-postrouting",
        Some("type nat hook postrouting priority srcnat; policy accept;".to_owned()),
        &["jump KUBE-POSTROUTING"],
    );
    for hook in ["input", "forward", "output"] {
        let spec = format!("type filter hook {hook} priority filter; policy accept;");
        fixed(
            t,
            &format!("filter-{hook}"),
            Some(spec),
            &["jump KUBE-FILTER"],
        );
    }
    fixed(
        t,
        "KUBE-FILTER",
        None,
        &[
            "meta mark & 0x00008000 == 0x00008000 drop",
            "meta mark & 0x00010000 == 0x00010000 meta l4proto tcp reject with tcp reset",
            "meta mark & 0x00010000 == 0x00010000 reject",
        ],
    );
    fixed(
        t,
        "KUBE-POSTROUTING",
        None,
        &[
            "meta mark & 0x00004000 == 0x00000000 return",
            "meta mark set meta mark ^ 0x00004000",
            "masquerade fully-random",
        ],
    );
}

/// A Service table's nat hooks, dispatch chains and mark chains. Marks cross tables:
/// the main table's filter and postrouting hooks act on them. At a nat hook the kernel
/// runs the nat chains of every table in turn until one translates the connection, so
/// each new connection looks a Service up in each table until it is found.
fn shard_chains(t: &mut Table, addr: &str) {
    for (name, hook, priority) in [
        ("nat-prerouting", "prerouting", "dstnat"),
        ("nat-output", "output", "-100"),
    ] {
        let hook = format!("type nat hook {hook} priority {priority}; policy accept;");
        fixed(t, name, Some(hook), &["jump KUBE-SERVICES"]);
    }
    fixed(
        t,
        "KUBE-SERVICES",
        None,
        &[
            &format!("{addr} daddr . meta l4proto . th dport vmap @service-ips"),
            &format!("{addr} daddr @nodeport-ips jump KUBE-NODEPORTS"),
        ],
    );
    fixed(
        t,
        "KUBE-NODEPORTS",
        None,
        &["meta l4proto . th dport vmap @service-nodeports"],
    );
    // DROP and REJECT are marked in the nat hooks and carried out in KUBE-FILTER; the
    // named counters say how often, by reason (the metrics read them).
    for (name, counter, mark) in [
        ("KUBE-MARK-MASQ", None, "0x00004000"),
        (
            "KUBE-MARK-DROP",
            Some(COUNTER_DROP_NO_LOCAL_ENDPOINTS),
            "0x00008000",
        ),
        (
            "KUBE-MARK-REJECT",
            Some(COUNTER_REJECT_NO_ENDPOINTS),
            "0x00010000",
        ),
    ] {
        let count = counter
            .map(|c| format!("counter name \"{c}\" "))
            .unwrap_or_default();
        fixed(
            t,
            name,
            None,
            &[&format!("{count}meta mark set meta mark | {mark}")],
        );
    }
}

/// The Service table a Service's chains go to: a fixed hash of its namespace and name,
/// so its ports share one table and the table never changes between runs or versions.
#[must_use]
pub fn shard_of(service: &ServicePortName) -> usize {
    // FNV-1a.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in service
        .namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(service.name.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(hash % super::table::SHARDS as u64).unwrap_or(0)
}

/// One endpoint among `backends`, uniformly: kube-proxy's iptables cascade, or a vmap
/// for large sets (see [`CASCADE_MAX`]).
fn choose(group: &Group, backends: &[Backend]) -> Vec<String> {
    let sep = |b: &Backend| names::endpoint_chain(group.service, group.protocol, b);
    let n = backends.len();
    if n > CASCADE_MAX {
        let choices: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : goto {}", sep(b)))
            .collect();
        return vec![format!(
            "numgen random mod {n} vmap {{ {} }}",
            choices.join(", ")
        )];
    }
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i + 1 == n {
                format!("goto {}", sep(b))
            } else {
                format!("numgen random mod {} 0 goto {}", n - i, sep(b))
            }
        })
        .collect()
}

/// The prefixes local traffic comes from, when detection is by source.
fn local_sources(local: &LocalTraffic) -> &[IpNet] {
    match local {
        LocalTraffic::Sources(cidrs) => cidrs,
        LocalTraffic::Interface(_) | LocalTraffic::InterfacePrefix(_) => &[],
    }
}

/// How one family's rules tell local pod traffic (kube-proxy's `LocalTrafficDetector`):
/// the match and its negation, and whether anything can match at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LocalMatch {
    is: String,
    not: String,
    detects: bool,
}

impl LocalMatch {
    pub(super) fn new(local: &LocalTraffic, family: Family) -> Self {
        let addr = family.addr();
        let interface = |pattern: String| Self {
            is: format!("iifname \"{pattern}\""),
            not: format!("iifname != \"{pattern}\""),
            detects: true,
        };
        match local {
            LocalTraffic::Sources(cidrs) => Self {
                is: format!("{addr} saddr @cluster-cidrs"),
                not: format!("{addr} saddr != @cluster-cidrs"),
                detects: cidrs.iter().any(|c| family.holds(c.addr())),
            },
            LocalTraffic::Interface(name) => interface(name.clone()),
            LocalTraffic::InterfacePrefix(prefix) => interface(format!("{prefix}*")),
        }
    }
}

/// The chains of one Service port: SVC/SVL (endpoint choice), EXT (external traffic
/// policy), FW (source ranges) and one SEP per endpoint.
pub(super) fn group_chains(group: &Group, local: &LocalMatch, family: Family, t: &mut Table) {
    let addr = family.addr();
    let comment = group.service.to_string();
    let affinity = group.frontends.iter().find_map(|(_, f)| f.affinity_timeout);
    let mut endpoint_sets: BTreeMap<String, Vec<Backend>> = BTreeMap::new();
    let mut endpoints = BTreeSet::new();
    for (_, frontend) in &group.frontends {
        for route in frontend.routes() {
            if !route.backends.is_empty() {
                endpoint_sets.insert(target(group, route), route.backends.to_vec());
                endpoints.extend(route.backends.iter().copied());
            }
        }
    }
    for (name, backends) in &endpoint_sets {
        let mut rules = Vec::new();
        for (key, frontend) in group
            .frontends
            .iter()
            .filter(|(_, f)| f.kind == FrontendKind::ClusterIp)
        {
            // ClusterIP traffic from outside the pods is masqueraded, all of it with
            // --masquerade-all (only for the ClusterIP itself, so external traffic
            // passing through here keeps its source).
            if target(group, &frontend.pod) != *name {
                continue;
            }
            let condition = if frontend.pod.masquerade {
                String::new()
            } else if frontend.external.masquerade && local.detects {
                format!(" {}", local.not)
            } else {
                continue;
            };
            rules.push(format!(
                "{addr} daddr {} meta l4proto {} th dport {}{condition} jump KUBE-MARK-MASQ",
                key.ip,
                proto(key.protocol),
                key.port,
            ));
        }
        if affinity.is_some() {
            for backend in backends {
                let sep = names::endpoint_chain(group.service, group.protocol, backend);
                rules.push(format!("{addr} saddr @{} goto {sep}", affinity_set(&sep)));
            }
        }
        rules.extend(choose(group, backends));
        t.chains.insert(name.clone(), chain(&comment, rules));
    }
    for backend in &endpoints {
        let sep = names::endpoint_chain(group.service, group.protocol, backend);
        let mut rules = vec![format!("{addr} saddr {} jump KUBE-MARK-MASQ", backend.ip)];
        if let Some(timeout) = affinity {
            let set = affinity_set(&sep);
            let mut decl = Set::new(
                "set",
                &[
                    &format!("type {}", family.addr_type()),
                    "flags dynamic,timeout",
                    &format!("timeout {timeout}s"),
                ],
            );
            decl.dynamic = true;
            t.sets.insert(set.clone(), decl);
            rules.push(format!("update @{set} {{ {addr} saddr }}"));
        }
        rules.push(format!(
            "meta l4proto {} dnat to {}",
            proto(group.protocol),
            endpoint(backend)
        ));
        t.chains.insert(sep, chain(&comment, rules));
    }
    external_chains(group, local, family, t);
}

fn affinity_set(sep: &str) -> String {
    format!("affinity-{}", sep.trim_start_matches("KUBE-SEP-"))
}

/// KUBE-EXT (and KUBE-FW) for the port's NodePort, external and load-balancer frontends.
fn external_chains(group: &Group, local: &LocalMatch, family: Family, t: &mut Table) {
    let Some((_, frontend)) = group
        .frontends
        .iter()
        .find(|(_, f)| f.kind != FrontendKind::ClusterIp)
    else {
        return;
    };
    let addr = family.addr();
    let comment = group.service.to_string();
    let ext = names::external_chain(group.service, group.protocol);
    let same =
        |a: &Route, b: &Route| target(group, a) == target(group, b) && a.masquerade == b.masquerade;
    let mut rules = Vec::new();
    let mut rule = |condition: &str, route: &Route| {
        if route.masquerade {
            rules.push(format!("{condition}jump KUBE-MARK-MASQ"));
        }
        rules.push(format!("{condition}goto {}", target(group, route)));
    };
    // Same order as the oracle classifies sources: the node itself, then pods.
    if !same(&frontend.node, &frontend.external) {
        rule("fib saddr type local ", &frontend.node);
    }
    if !same(&frontend.pod, &frontend.external) {
        rule(&format!("{} ", local.is), &frontend.pod);
    }
    rule("", &frontend.external);
    t.chains.insert(ext.clone(), chain(&comment, rules));
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
        let rules = vec![
            format!("{addr} saddr {{ {list} }} goto {ext}"),
            format!(
                "counter name \"{COUNTER_DROP_SOURCE_RANGE}\" meta mark set meta mark | 0x00008000"
            ),
        ];
        t.chains.insert(fw, chain(&comment, rules));
    }
}

#[cfg(test)]
mod tests {
    use super::{shard_of, shard_table, Family, LocalMatch};
    use crate::model::{DesiredState, LocalTraffic, ServicePortName};

    #[test]
    fn overlapping_cluster_cidrs_become_one_interval() {
        let cidrs = ["10.0.0.0/8", "10.244.0.0/16", "10.244.1.5/16", "fd00::/64"]
            .map(|c| c.parse().unwrap());
        let local = LocalTraffic::Sources(cidrs.to_vec());
        let [v4, v6] = [false, true].map(|v6| shard_table(&local, Family { v6 }, 3));
        let elements = |t: &super::Table| -> Vec<String> {
            t.sets["cluster-cidrs"].elements.keys().cloned().collect()
        };
        assert_eq!(elements(&v4), ["10.0.0.0/8"]);
        assert_eq!(elements(&v6), ["fd00::/64"]);
    }

    #[test]
    fn local_traffic_is_matched_by_source_or_by_interface() {
        let v4 = Family { v6: false };
        let by_source = LocalMatch::new(
            &LocalTraffic::Sources(vec!["10.244.0.0/16".parse().unwrap()]),
            v4,
        );
        assert_eq!(
            (by_source.is.as_str(), by_source.detects),
            ("ip saddr @cluster-cidrs", true)
        );
        // A family without a prefix of its own detects nothing there.
        let v6 = LocalMatch::new(
            &LocalTraffic::Sources(vec!["10.244.0.0/16".parse().unwrap()]),
            Family { v6: true },
        );
        assert!(!v6.detects);
        let prefix = LocalMatch::new(&LocalTraffic::InterfacePrefix("veth".into()), v4);
        assert_eq!(
            (prefix.is.as_str(), prefix.not.as_str()),
            ("iifname \"veth*\"", "iifname != \"veth*\"")
        );
        let bridge = LocalMatch::new(&LocalTraffic::Interface("cbr0".into()), Family { v6: true });
        assert_eq!(
            (bridge.is.as_str(), bridge.detects),
            ("iifname \"cbr0\"", true)
        );
        // Interface detection leaves the prefix set empty.
        let table = shard_table(&LocalTraffic::InterfacePrefix("veth".into()), v4, 0);
        assert!(table.sets["cluster-cidrs"].elements.is_empty());
    }

    #[test]
    fn no_service_loads_the_main_tables_only() {
        let tables = super::build(&DesiredState::default(), &LocalTraffic::default());
        let names: Vec<_> = tables.iter().map(super::Table::key).collect();
        assert_eq!(
            names,
            [
                ("ip", "proxy-agent".to_owned()),
                ("ip6", "proxy-agent".to_owned())
            ]
        );
    }

    #[test]
    fn a_services_ports_share_a_table_that_never_changes() {
        let port = |name: &str, port: &str| ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
        };
        assert_eq!(
            shard_of(&port("echo", "http")),
            shard_of(&port("echo", "dns"))
        );
        // Fixed forever: a restarted or upgraded agent finds each Service where it was.
        assert_eq!(shard_of(&port("echo", "http")), 10);
        assert_eq!(shard_of(&port("kube-dns", "")), 8);
    }
}
