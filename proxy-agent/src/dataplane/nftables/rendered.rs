//! Our tables kept current change by change: a changed frontend re-renders the chains
//! of its Service port only (kube-proxy's per-Service chains), in its Service's table,
//! and rewrites its own dispatch-map element, so a sync costs what changed, never the
//! whole ruleset. A full build is the same steps from empty tables.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use imbl::ordmap::DiffItem;
use ipnet::IpNet;

use super::{
    ruleset::{
        element, group_chains, main_table, shard_of, shard_table, Element, Family, Group,
        NODEPORT_IPS, SERVICE_IPS, SERVICE_NODEPORTS,
    },
    table::{write_chain, Chain, Rules, Table, SHARDS},
};
use crate::model::{DesiredState, Frontend, FrontendKey, Protocol, ServicePortName};

/// One Service port of one family (`true`: IPv6).
type GroupKey = (bool, ServicePortName, Protocol);

fn group_of(key: &FrontendKey, frontend: &Frontend) -> GroupKey {
    (key.ip.is_ipv6(), frontend.service.clone(), key.protocol)
}

/// Tables per family: the main one, then the Service tables.
const PER_FAMILY: usize = SHARDS + 1;

/// Where a group's Service table is in `Rendered::tables`.
fn slot_of(group: &GroupKey) -> usize {
    usize::from(group.0) * PER_FAMILY + 1 + shard_of(&group.1)
}

/// The names of the chains and sets one group puts into its table.
type Owned = (Vec<String>, Vec<String>);

#[derive(Clone, Debug)]
pub struct Rendered {
    /// `ip` then `ip6`: each the main table, then the Service tables (all of them, empty
    /// ones included; [`Self::live`] leaves those out).
    tables: Vec<Table>,
    /// Service ports in each table.
    groups: Vec<usize>,
    cidrs_present: [bool; 2],
    /// Each Service port's frontends (a port with none has nothing in the tables).
    members: HashMap<GroupKey, BTreeSet<FrontendKey>>,
    /// NodePort frontends per (table, node address) (the `nodeport-ips` element stays
    /// while any).
    nodeport_ips: HashMap<(usize, IpAddr), usize>,
    /// The `service-nodeports` element of each (table, `proto . port`), by the frontends
    /// that ask for it: the last by (Service port, key) wins, as in a full build.
    nodeports: BTreeMap<(usize, String), BTreeMap<(ServicePortName, FrontendKey), String>>,
    /// Chains keep their text (`render`, tests), not only its digest.
    text: bool,
    /// The chains the last [`Self::update`] rendered, with their text (for the partial
    /// transaction that writes them).
    fresh: HashMap<String, Chain>,
    /// Whether to keep `fresh` (not while building whole tables).
    stash: bool,
}

impl Rendered {
    /// Tables with no Service in them, whose Service chains will be kept as digests.
    #[must_use]
    pub fn empty(cluster_cidrs: &[IpNet]) -> Self {
        let mut tables = Vec::with_capacity(2 * PER_FAMILY);
        for v6 in [false, true] {
            let family = Family { v6 };
            tables.push(main_table(family));
            tables.extend((0..SHARDS).map(|shard| shard_table(cluster_cidrs, family, shard)));
        }
        let cidrs_present = [0, 1].map(|i| {
            tables[i * PER_FAMILY + 1]
                .sets
                .get("cluster-cidrs")
                .is_some_and(|s| !s.elements.is_empty())
        });
        Self {
            groups: vec![0; tables.len()],
            tables,
            cidrs_present,
            members: HashMap::new(),
            nodeport_ips: HashMap::new(),
            nodeports: BTreeMap::new(),
            text: false,
            fresh: HashMap::new(),
            stash: true,
        }
    }

    /// The tables for `desired`, built from empty ones, Service chains as digests.
    #[must_use]
    pub fn full(desired: &DesiredState, cluster_cidrs: &[IpNet]) -> Self {
        let mut rendered = Self::empty(cluster_cidrs);
        rendered.stash = false;
        rendered.update(&DesiredState::default(), desired);
        rendered.stash = true;
        rendered
    }

    /// [`Self::full`] with every chain's text.
    #[must_use]
    pub fn full_text(desired: &DesiredState, cluster_cidrs: &[IpNet]) -> Self {
        let mut rendered = Self::empty(cluster_cidrs);
        rendered.text = true;
        rendered.update(&DesiredState::default(), desired);
        rendered
    }

    /// The chains the last [`Self::update`] rendered, with their text.
    pub fn take_fresh(&mut self) -> HashMap<String, Chain> {
        std::mem::take(&mut self.fresh)
    }

    /// One of [`Self::live`]'s tables whole, its Service chains rendered again from
    /// `desired` (what the tables were rendered from), one Service port at a time.
    ///
    /// # Errors
    /// When `out` refuses the text.
    pub fn write_table(
        &self,
        table: &Table,
        desired: &DesiredState,
        out: &mut dyn std::fmt::Write,
    ) -> std::fmt::Result {
        table.write_open(out)?;
        for (name, chain) in &table.chains {
            if !matches!(chain.rules, Rules::Digest(_)) {
                write_chain(out, name, chain)?;
            }
        }
        let Some(at) = self.tables.iter().position(|t| t.key() == table.key()) else {
            return out.write_str("}\n");
        };
        let mut groups: Vec<&GroupKey> = self
            .members
            .keys()
            .filter(|group| slot_of(group) == at)
            .collect();
        groups.sort();
        for group in groups {
            let Some(scratch) = self.render_group(group, desired) else {
                continue;
            };
            for (name, chain) in &scratch.chains {
                if table
                    .chains
                    .get(name)
                    .is_some_and(|c| matches!(c.rules, Rules::Digest(_)))
                {
                    write_chain(out, name, chain)?;
                }
            }
        }
        out.write_str("}\n")
    }

    /// The tables to program: per family the main table, then each Service table that
    /// holds a Service (copies are O(1)).
    #[must_use]
    pub fn live(&self) -> Vec<Table> {
        self.tables
            .iter()
            .zip(&self.groups)
            .enumerate()
            .filter(|(i, (_, groups))| i % PER_FAMILY == 0 || **groups > 0)
            .map(|(_, (table, _))| table.clone())
            .collect()
    }

    /// Follows the frontends that differ from `old` (what the tables were rendered
    /// from) to `new`, names included.
    pub fn update(&mut self, old: &DesiredState, new: &DesiredState) {
        let changes: Vec<_> = old
            .frontends
            .diff(&new.frontends)
            .map(|item| match item {
                DiffItem::Add(k, f) => (k, None, Some(f)),
                DiffItem::Remove(k, f) => (k, Some(f), None),
                DiffItem::Update { old, new } => (old.0, Some(old.1), Some(new.1)),
            })
            .collect();
        let mut dirty = BTreeSet::new();
        for (key, before, after) in &changes {
            dirty.extend(before.map(|f| group_of(key, f)));
            dirty.extend(after.map(|f| group_of(key, f)));
        }
        // The names each changed port put into its table, rendered again from `old`
        // while the memberships are still those (kept, they would cost as much again as
        // the chains' digests).
        let owned: Vec<(GroupKey, Option<Owned>)> = dirty
            .into_iter()
            .map(|group| {
                let names = self.render_group(&group, old).map(|t| {
                    (
                        t.chains.keys().cloned().collect(),
                        t.sets.keys().cloned().collect(),
                    )
                });
                (group, names)
            })
            .collect();
        for (key, before, after) in changes {
            if let Some(before) = before {
                self.withdraw(key, before);
            }
            if let Some(after) = after {
                self.place(key, after);
            }
        }
        for (group, names) in owned {
            self.rebuild(&group, names.as_ref(), new);
        }
    }

    fn withdraw(&mut self, key: &FrontendKey, frontend: &Frontend) {
        let group = group_of(key, frontend);
        if let Some(members) = self.members.get_mut(&group) {
            members.remove(key);
        }
        let at = slot_of(&group);
        match element(&as_group(&group, Vec::new()), key, frontend) {
            Element::ServiceIp(element, _) => {
                if let Some(map) = self.tables[at].sets.get_mut(SERVICE_IPS) {
                    map.elements.remove(&element);
                }
            }
            Element::NodePort(element, _) => {
                let refs = self.nodeport_ips.entry((at, key.ip)).or_default();
                *refs = refs.saturating_sub(1);
                if *refs == 0 {
                    self.nodeport_ips.remove(&(at, key.ip));
                    if let Some(set) = self.tables[at].sets.get_mut(NODEPORT_IPS) {
                        set.elements.remove(&key.ip.to_string());
                    }
                }
                let slot = (at, element);
                if let Some(askers) = self.nodeports.get_mut(&slot) {
                    askers.remove(&(frontend.service.clone(), *key));
                }
                self.settle_nodeport(slot);
            }
        }
    }

    fn place(&mut self, key: &FrontendKey, frontend: &Frontend) {
        let group = group_of(key, frontend);
        let at = slot_of(&group);
        let element = element(&as_group(&group, Vec::new()), key, frontend);
        self.members.entry(group).or_default().insert(*key);
        match element {
            Element::ServiceIp(element, value) => {
                if let Some(map) = self.tables[at].sets.get_mut(SERVICE_IPS) {
                    map.elements.insert(element, value);
                }
            }
            Element::NodePort(element, value) => {
                *self.nodeport_ips.entry((at, key.ip)).or_default() += 1;
                if let Some(set) = self.tables[at].sets.get_mut(NODEPORT_IPS) {
                    set.elements.insert(key.ip.to_string(), String::new());
                }
                let slot = (at, element);
                self.nodeports
                    .entry(slot.clone())
                    .or_default()
                    .insert((frontend.service.clone(), *key), value);
                self.settle_nodeport(slot);
            }
        }
    }

    /// Writes the winning value of one `service-nodeports` element, or removes it.
    fn settle_nodeport(&mut self, slot: (usize, String)) {
        let winner = self
            .nodeports
            .get(&slot)
            .and_then(|askers| askers.values().next_back().cloned());
        if winner.is_none() {
            self.nodeports.remove(&slot);
        }
        let (at, element) = slot;
        if let Some(map) = self.tables[at].sets.get_mut(SERVICE_NODEPORTS) {
            match winner {
                Some(value) => map.elements.insert(element, value),
                None => map.elements.remove(&element),
            };
        }
    }

    /// Replaces the chains and sets one group put into its table (`owned`) with those
    /// its frontends in `desired` make.
    fn rebuild(&mut self, group: &GroupKey, owned: Option<&Owned>, desired: &DesiredState) {
        let at = slot_of(group);
        if let Some((chains, sets)) = owned {
            self.groups[at] -= 1;
            let table = &mut self.tables[at];
            for chain in chains {
                table.chains.remove(chain);
            }
            for set in sets {
                table.sets.remove(set);
            }
        }
        let Some(scratch) = self.render_group(group, desired) else {
            self.members.remove(group);
            return;
        };
        for (name, chain) in scratch.chains {
            let kept = if self.text {
                chain.clone()
            } else {
                // The declarations of the group's sets the chain names go into its digest.
                let named: Vec<String> = scratch
                    .sets
                    .iter()
                    .filter(|(set, _)| chain.rules.iter().any(|r| r.contains(&format!("@{set}"))))
                    .map(|(set, decl)| format!("{set} {}", decl.decl.join("; ")))
                    .collect();
                let named: Vec<&str> = named.iter().map(String::as_str).collect();
                Chain {
                    hook: chain.hook.clone(),
                    comment: None,
                    rules: chain.rules.digest(&named),
                }
            };
            if !self.text && self.stash {
                self.fresh.insert(name.clone(), chain);
            }
            self.tables[at].chains.insert(name, kept);
        }
        for (name, set) in scratch.sets {
            self.tables[at].sets.insert(name, set);
        }
        self.groups[at] += 1;
    }

    /// The chains and sets of one group's frontends in `desired` (`None`: no frontend).
    fn render_group(&self, group: &GroupKey, desired: &DesiredState) -> Option<Table> {
        let v6 = group.0;
        let mut scratch = Table::new(family_name(v6), String::new(), "");
        let frontends: Vec<(FrontendKey, Arc<Frontend>)> = self
            .members
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((*key, desired.frontends.get(key)?.clone())))
            .collect();
        if frontends.is_empty() {
            return None;
        }
        let refs = frontends.iter().map(|(k, f)| (k, f.as_ref())).collect();
        group_chains(
            &as_group(group, refs),
            self.cidrs_present[usize::from(v6)],
            Family { v6 },
            &mut scratch,
        );
        Some(scratch)
    }
}

fn family_name(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

fn as_group<'a>(group: &'a GroupKey, frontends: Vec<(&'a FrontendKey, &'a Frontend)>) -> Group<'a> {
    Group {
        service: &group.1,
        protocol: group.2,
        frontends,
    }
}
