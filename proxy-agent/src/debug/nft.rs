//! `dump` for the nftables dataplane: reads our tables back with `nft -j` and follows
//! the verdict maps through KUBE-SVC/EXT/FW chains to the KUBE-SEP chains' DNAT targets,
//! and the conntrack table for the flows those rules translated.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use nftables::{
    expr::{Expression, NamedExpression},
    schema::{NfListObject, Rule, Set},
    stmt::Statement,
};

use super::{
    rows::{AffinityRow, BackendRow, FlowRow, ServiceRow},
    Names,
};
use crate::dataplane::{
    conntrack::Conntrack,
    nftables::{
        listing::{self, expression_targets, immediate, Object, VerdictMap},
        table::TABLE,
    },
};

/// Whether our IPv4 table exists in this network namespace.
#[must_use]
pub fn installed() -> bool {
    listing::list(&["list", "table", "ip", TABLE]).is_ok_and(|objects| !objects.is_empty())
}

/// What one chain does, as far as `dump` cares.
#[derive(Debug, Default)]
struct Chain {
    /// Chains it jumps or goes to (directly or through a vmap).
    targets: BTreeSet<String>,
    /// `dnat to ADDR:PORT` (KUBE-SEP chains).
    dnat: Option<String>,
}

/// A frontend from a dispatch map, with the chain it goes to.
#[derive(Debug)]
struct Entry {
    frontend: String,
    node_port: bool,
    target: String,
}

/// Both families' tables, read back.
#[derive(Debug, Default)]
pub struct Tables {
    chains: BTreeMap<String, Chain>,
    entries: Vec<Entry>,
    /// Affinity set name → (client, seconds left).
    affinity: BTreeMap<String, Vec<(String, Option<u64>)>>,
}

fn frontend(address: &str, port: &str, proto: &str) -> String {
    let proto = proto.to_uppercase();
    if address.contains(':') {
        format!("[{address}]:{port}/{proto}")
    } else {
        format!("{address}:{port}/{proto}")
    }
}

impl Tables {
    /// `nft -j list ruleset` for `ip` and `ip6`, our tables only (the main table and the
    /// Service tables), read as the nftables crate's schema.
    ///
    /// # Errors
    /// When `nft` fails or prints something that is not its JSON.
    pub fn read() -> Result<Self> {
        if !installed() {
            bail!("no nftables table ip {TABLE} here");
        }
        let mut tables = Self::default();
        for family in ["ip", "ip6"] {
            for object in listing::list(&["list", "ruleset", family])? {
                tables.absorb(&object);
            }
        }
        Ok(tables)
    }

    fn absorb(&mut self, object: &Object) {
        match object {
            Object::Listed(NfListObject::Rule(rule)) => self.absorb_rule(rule),
            Object::Listed(NfListObject::Set(set)) => self.absorb_set(set),
            Object::VerdictMap(map) => self.absorb_map(map),
            Object::Listed(_) | Object::Counter(_) => {}
        }
    }

    fn absorb_rule(&mut self, rule: &Rule<'_>) {
        let chain = self.chains.entry(rule.chain.to_string()).or_default();
        for statement in rule.expr.iter() {
            listing::targets(statement, &mut |t| {
                chain.targets.insert(t.to_owned());
            });
            if let Statement::DNAT(Some(nat)) = statement {
                let address = nat.addr.as_ref().and_then(immediate).unwrap_or_default();
                let port = nat.port.as_ref().and_then(immediate).unwrap_or_default();
                chain.dnat = Some(if address.contains(':') {
                    format!("[{address}]:{port}")
                } else {
                    format!("{address}:{port}")
                });
            }
        }
    }

    fn absorb_map(&mut self, map: &VerdictMap) {
        let node_port = map.name == "service-nodeports";
        if map.name != "service-ips" && !node_port {
            return;
        }
        for element in map.elem.iter().flatten() {
            let Expression::List(pair) = element else {
                continue;
            };
            let [key, verdict] = pair.as_slice() else {
                continue;
            };
            let parts: Vec<String> = match key {
                Expression::Named(NamedExpression::Concat(parts)) => {
                    parts.iter().filter_map(immediate).collect()
                }
                _ => continue,
            };
            let frontend = match parts.as_slice() {
                [address, proto, port] => frontend(address, port, proto),
                [proto, port] => format!("*:{port}/{}", proto.to_uppercase()),
                _ => continue,
            };
            let mut target = String::new();
            expression_targets(verdict, &mut |t| t.clone_into(&mut target));
            self.entries.push(Entry {
                frontend,
                node_port,
                target,
            });
        }
    }

    fn absorb_set(&mut self, set: &Set<'_>) {
        if !set.name.starts_with("affinity-") {
            return;
        }
        let members = self.affinity.entry(set.name.to_string()).or_default();
        for element in set.elem.iter().flat_map(|e| e.iter()) {
            let member = match element {
                Expression::Named(NamedExpression::Elem(inner)) => {
                    immediate(&inner.val).map(|client| (client, inner.expires.map(u64::from)))
                }
                other => immediate(other).map(|client| (client, None)),
            };
            members.extend(member);
        }
    }

    /// KUBE-SEP chains reachable from `chain` through service chains.
    fn endpoints(&self, chain: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut queue = vec![chain.to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(next) = queue.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            if next.starts_with("KUBE-SEP-") {
                found.insert(next);
                continue;
            }
            if let Some(c) = self.chains.get(&next) {
                queue.extend(
                    c.targets
                        .iter()
                        .filter(|t| !t.starts_with("KUBE-MARK-"))
                        .cloned(),
                );
            }
        }
        found
    }

    fn service_of(entry: &Entry, names: &Names) -> String {
        if entry.node_port {
            names.of_node_port(entry.frontend.trim_start_matches("*:"))
        } else {
            names.of(&entry.frontend)
        }
    }

    #[must_use]
    pub fn services(&self, names: &Names) -> Vec<ServiceRow> {
        self.entries
            .iter()
            .map(|entry| ServiceRow {
                service: Self::service_of(entry, names),
                frontend: entry.frontend.clone(),
                backends: self.endpoints(&entry.target).len(),
                target: entry.target.clone(),
                decisions: None,
                rejects: None,
            })
            .collect()
    }

    /// KUBE-SEP chain → the Services whose frontends reach it.
    fn users(&self, names: &Names) -> BTreeMap<String, BTreeSet<String>> {
        let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in &self.entries {
            for sep in self.endpoints(&entry.target) {
                users
                    .entry(sep)
                    .or_default()
                    .insert(Self::service_of(entry, names));
            }
        }
        users
    }

    #[must_use]
    pub fn backends(&self, names: &Names) -> Vec<BackendRow> {
        let users = self.users(names);
        self.chains
            .iter()
            .filter(|(name, _)| name.starts_with("KUBE-SEP-"))
            .map(|(name, chain)| BackendRow {
                backend: chain.dnat.clone().unwrap_or_else(|| "-".to_owned()),
                id: name.clone(),
                services: users
                    .get(name)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                decisions: None,
            })
            .collect()
    }

    #[must_use]
    pub fn affinity(&self, names: &Names) -> Vec<AffinityRow> {
        let users = self.users(names);
        let mut rows = Vec::new();
        for (set, members) in &self.affinity {
            // kube-proxy's layout: set affinity-X belongs to endpoint chain KUBE-SEP-X.
            let sep = format!("KUBE-SEP-{}", set.trim_start_matches("affinity-"));
            let backend = self
                .chains
                .get(&sep)
                .and_then(|c| c.dnat.clone())
                .unwrap_or_else(|| "-".to_owned());
            let service = users.get(&sep).map_or_else(
                || "-".to_owned(),
                |s| s.iter().cloned().collect::<Vec<_>>().join(","),
            );
            for (client, expires) in members {
                rows.push(AffinityRow {
                    service: service.clone(),
                    client: client.clone(),
                    backend: backend.clone(),
                    expires_in: *expires,
                });
            }
        }
        rows
    }

    /// Frontend addresses (with port and protocol) and NodePorts we translate.
    fn frontends(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut addresses = BTreeSet::new();
        let mut node_ports = BTreeSet::new();
        for entry in &self.entries {
            if entry.node_port {
                node_ports.insert(entry.frontend.trim_start_matches("*:").to_owned());
            } else {
                addresses.insert(entry.frontend.clone());
            }
        }
        (addresses, node_ports)
    }
}

fn protocol_name(number: u8) -> String {
    crate::model::Protocol::from_number(number)
        .map_or_else(|| number.to_string(), |p| p.to_string())
}

fn endpoint(ip: std::net::IpAddr, port: u16) -> String {
    crate::model::Backend { ip, port }.to_string()
}

/// Conntrack entries that our rules translated: to a Service frontend or a NodePort,
/// with the backend replies come from.
///
/// # Errors
/// When ctnetlink cannot be read.
pub fn flows(tables: &Tables, names: &Names) -> Result<Vec<FlowRow>> {
    let (addresses, node_ports) = tables.frontends();
    let mut rows = Vec::new();
    for entry in Conntrack::open()?.dump()? {
        let proto = protocol_name(entry.orig.proto);
        let frontend = endpoint(entry.orig.dst, entry.orig.dport) + "/" + &proto;
        let port_proto = format!("{}/{proto}", entry.orig.dport);
        let service = if addresses.contains(&frontend) {
            names.of(&frontend)
        } else if node_ports.contains(&port_proto) && entry.translated() {
            names.of_node_port(&port_proto)
        } else {
            continue;
        };
        rows.push(FlowRow {
            table: "conntrack",
            protocol: proto,
            client: Some(endpoint(entry.orig.src, entry.orig.sport)),
            frontend,
            service,
            backend: endpoint(entry.reply.src, entry.reply.sport),
            state: entry.tcp_state.map(str::to_owned),
            expires_in: entry.timeout,
            socket_cookie: None,
        });
    }
    Ok(rows)
}
