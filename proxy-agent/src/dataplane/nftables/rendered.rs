//! Our tables kept current change by change: a changed frontend re-renders the chains
//! of its Service port only (kube-proxy's per-Service chains), in its Service's table,
//! before and after, and rewrites its own dispatch-map element, so a sync costs what
//! changed, never the whole ruleset; the Service chains themselves are not kept. A full
//! build is the same steps from empty tables.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use imbl::ordmap::DiffItem;

use super::{
    ruleset::{
        element, group_chains, main_table, shard_of, shard_table, Element, Family, Group,
        LocalMatch, NODEPORT_IPS, SERVICE_IPS, SERVICE_NODEPORTS,
    },
    table::{write_chain, Chain, Table, TableKey, SHARDS},
};
use crate::model::{DesiredState, Frontend, FrontendKey, LocalTraffic, Protocol, ServicePortName};

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

#[derive(Clone, Debug)]
pub struct Rendered {
    /// `ip` then `ip6`: each the main table, then the Service tables (all of them, empty
    /// ones included; [`Self::live`] leaves those out).
    tables: Vec<Table>,
    /// Service ports in each table.
    groups: Vec<usize>,
    /// How each family's rules tell local pod traffic.
    local: [LocalMatch; 2],
    /// Each Service port's frontends (a port with none has nothing in the tables).
    members: HashMap<GroupKey, BTreeSet<FrontendKey>>,
    /// NodePort frontends per (table, node address) (the `nodeport-ips` element stays
    /// while any).
    nodeport_ips: HashMap<(usize, IpAddr), usize>,
    /// The `service-nodeports` element of each (table, `proto . port`), by the frontends
    /// that ask for it: the last by (Service port, key) wins, as in a full build.
    nodeports: BTreeMap<(usize, String), BTreeMap<(ServicePortName, FrontendKey), String>>,
    /// The tables hold the Service ports' chains (`render`, tests). Else they hold the
    /// fixed chains only: the Service chains are made again whenever they are needed
    /// (a changed port's, a full load's), so what they cost is never kept.
    text: bool,
    /// The chains of each port the updates since the last [`Self::take_changes`] changed,
    /// before and after (not while building whole tables).
    changes: Vec<GroupChange>,
    record: bool,
}

/// One Service port's chains in its table, before and after a change.
#[derive(Clone, Debug)]
pub struct GroupChange {
    pub table: TableKey,
    pub before: Vec<(String, Chain)>,
    pub after: Vec<(String, Chain)>,
}

impl Rendered {
    /// Tables with no Service in them, whose Service chains will not be kept.
    #[must_use]
    pub fn empty(local: &LocalTraffic) -> Self {
        let mut tables = Vec::with_capacity(2 * PER_FAMILY);
        for v6 in [false, true] {
            let family = Family { v6 };
            tables.push(main_table(family));
            tables.extend((0..SHARDS).map(|shard| shard_table(local, family, shard)));
        }
        Self {
            groups: vec![0; tables.len()],
            tables,
            local: [false, true].map(|v6| LocalMatch::new(local, Family { v6 })),
            members: HashMap::new(),
            nodeport_ips: HashMap::new(),
            nodeports: BTreeMap::new(),
            text: false,
            changes: Vec::new(),
            record: true,
        }
    }

    /// The tables for `desired`, built from empty ones, without the Service chains.
    #[must_use]
    pub fn full(desired: &DesiredState, local: &LocalTraffic) -> Self {
        let mut rendered = Self::empty(local);
        rendered.record = false;
        rendered.update(&DesiredState::default(), desired);
        rendered.record = true;
        rendered
    }

    /// [`Self::full`] with every chain's text.
    #[must_use]
    pub fn full_text(desired: &DesiredState, local: &LocalTraffic) -> Self {
        let mut rendered = Self::empty(local);
        rendered.text = true;
        rendered.update(&DesiredState::default(), desired);
        rendered
    }

    /// The Service ports' chains the updates since the last call changed.
    pub fn take_changes(&mut self) -> Vec<GroupChange> {
        std::mem::take(&mut self.changes)
    }

    /// The chains and sets of each Service port in table `key`, made again from
    /// `desired` (what the tables were rendered from), one port at a time.
    pub fn service_ports<'a>(
        &'a self,
        key: &TableKey,
        desired: &'a DesiredState,
    ) -> impl Iterator<Item = Table> + 'a {
        self.slot(key)
            .into_iter()
            .flat_map(move |at| self.groups_in(at, desired))
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
        if self.text {
            return table.write_text(out);
        }
        table.write_open(out)?;
        for (name, chain) in &table.chains {
            write_chain(out, name, chain)?;
        }
        for scratch in self.service_ports(&table.key(), desired) {
            for (name, chain) in &scratch.chains {
                write_chain(out, name, chain)?;
            }
        }
        out.write_str("}\n")
    }

    /// Where table `key` is in `tables`.
    fn slot(&self, key: &TableKey) -> Option<usize> {
        self.tables
            .iter()
            .position(|t| t.family == key.0 && t.name == key.1)
    }

    /// The chains and sets of each Service port in table `at`, made from `desired`, in
    /// the ports' order.
    fn groups_in<'a>(
        &'a self,
        at: usize,
        desired: &'a DesiredState,
    ) -> impl Iterator<Item = Table> + 'a {
        let mut groups: Vec<&GroupKey> = self
            .members
            .keys()
            .filter(|group| slot_of(group) == at)
            .collect();
        groups.sort();
        groups
            .into_iter()
            .filter_map(move |group| self.render_group(group, desired))
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
        // What each changed port put into its table, made again from `old` while the
        // memberships are still those (never kept: they would cost as much as the
        // chains themselves).
        let owned: Vec<(GroupKey, Option<Table>)> = dirty
            .into_iter()
            .map(|group| {
                let before = self.render_group(&group, old);
                (group, before)
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
        for (group, before) in owned {
            self.rebuild(&group, before.as_ref(), new);
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

    /// Replaces the chains and sets one group put into its table (`before`) with those
    /// its frontends in `desired` make.
    fn rebuild(&mut self, group: &GroupKey, before: Option<&Table>, desired: &DesiredState) {
        let at = slot_of(group);
        if let Some(before) = before {
            self.groups[at] -= 1;
            let table = &mut self.tables[at];
            for chain in before.chains.keys() {
                table.chains.remove(chain);
            }
            for set in before.sets.keys() {
                table.sets.remove(set);
            }
        }
        // A whole build keeps no chains: a port's render is needed only for its
        // affinity sets.
        let after = if self.text || self.record || self.has_affinity(group, desired) {
            self.render_group(group, desired)
        } else {
            self.has_frontends(group, desired)
                .then(|| Table::new(Family { v6: group.0 }.table(), String::new(), ""))
        };
        if after.is_none() {
            self.members.remove(group);
        }
        if !self.text && self.record {
            let chains = |t: Option<&Table>| -> Vec<(String, Chain)> {
                t.iter()
                    .flat_map(|t| t.chains.iter().map(|(n, c)| (n.clone(), c.clone())))
                    .collect()
            };
            self.changes.push(GroupChange {
                table: self.tables[at].key(),
                before: chains(before),
                after: chains(after.as_ref()),
            });
        }
        let Some(scratch) = after else {
            return;
        };
        let table = &mut self.tables[at];
        if self.text {
            for (name, chain) in scratch.chains {
                table.chains.insert(name, chain);
            }
        }
        for (name, set) in scratch.sets {
            table.sets.insert(name, set);
        }
        self.groups[at] += 1;
    }

    /// The frontends of one group in `desired`.
    fn group_frontends<'a>(
        &'a self,
        group: &GroupKey,
        desired: &'a DesiredState,
    ) -> impl Iterator<Item = (&'a FrontendKey, &'a Frontend)> + 'a {
        self.members
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, desired.frontends.get(key)?.as_ref())))
    }

    fn has_frontends(&self, group: &GroupKey, desired: &DesiredState) -> bool {
        self.group_frontends(group, desired).next().is_some()
    }

    fn has_affinity(&self, group: &GroupKey, desired: &DesiredState) -> bool {
        self.group_frontends(group, desired)
            .any(|(_, f)| f.affinity_timeout.is_some())
    }

    /// The chains and sets of one group's frontends in `desired` (`None`: no frontend).
    fn render_group(&self, group: &GroupKey, desired: &DesiredState) -> Option<Table> {
        let v6 = group.0;
        let mut scratch = Table::new(Family { v6 }.table(), String::new(), "");
        let frontends: Vec<_> = self.group_frontends(group, desired).collect();
        if frontends.is_empty() {
            return None;
        }
        group_chains(
            &as_group(group, frontends),
            &self.local[usize::from(v6)],
            Family { v6 },
            &mut scratch,
        );
        Some(scratch)
    }
}

fn as_group<'a>(group: &'a GroupKey, frontends: Vec<(&'a FrontendKey, &'a Frontend)>) -> Group<'a> {
    Group {
        service: &group.1,
        protocol: group.2,
        frontends,
    }
}
