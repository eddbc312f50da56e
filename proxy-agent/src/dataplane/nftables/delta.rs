//! Partial sync: the `nft -f` transaction that turns the table the kernel holds into the
//! desired one touching only what changed, as kube-proxy's nftables proxier does. Both
//! tables are persistent maps and the desired one is derived from the kernel's, so the
//! comparison skips what they share. Chains that are no longer wanted are flushed at
//! once and deleted one sync later, when nothing can refer to them any more; affinity
//! sets keep their elements.
use std::collections::BTreeSet;

use imbl::ordmap::DiffItem;

use super::table::{Chain, Set, Table};

/// One transaction and its size.
#[derive(Debug, Default)]
pub struct Transaction {
    pub statements: Vec<String>,
}

impl Transaction {
    #[must_use]
    pub fn text(&self) -> String {
        let mut text = self.statements.join("\n");
        text.push('\n');
        text
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }
}

/// Whether a rule names one of `sets`.
fn names_any(chain: &Chain, sets: &BTreeSet<&String>) -> bool {
    chain.rules.iter().any(|rule| {
        sets.iter()
            .any(|set| rule.contains(&format!("@{set} ")) || rule.ends_with(&format!("@{set}")))
    })
}

/// The statements from `kernel` to `desired`. `stale` holds the chains flushed by an
/// earlier sync (present, empty, in `kernel`): they are deleted now unless wanted
/// again; the chains this sync drops are flushed and returned as the new `stale`.
/// Either table may hold only part of the chains (the fixed ones and those of the
/// Service ports that changed): what neither holds is left as it is.
#[must_use]
pub fn delta(
    kernel: &Table,
    desired: &Table,
    stale: &BTreeSet<String>,
) -> (Transaction, BTreeSet<String>) {
    let (family, table) = (desired.family, &desired.name);
    // Sets whose declaration changed are recreated; every chain naming them is refilled.
    let redeclared: BTreeSet<&String> = kernel
        .sets
        .diff(&desired.sets)
        .filter_map(|item| match item {
            DiffItem::Update { old, new } if old.1.decl != new.1.decl => Some(new.0),
            _ => None,
        })
        .collect();
    let (mut declare, mut flush, mut refill) = (Vec::new(), Vec::new(), BTreeSet::new());
    let mut newly_stale = BTreeSet::new();
    for item in kernel.chains.diff(&desired.chains) {
        match item {
            DiffItem::Add(name, chain) => {
                declare.push(desired.add_chain(name, chain));
                refill.insert(name);
            }
            DiffItem::Update { old, new } => {
                let (name, old, chain) = (new.0, old.1, new.1);
                if old.comment != chain.comment || old.hook != chain.hook {
                    declare.push(desired.add_chain(name, chain));
                }
                if old.rules != chain.rules {
                    refill.insert(name);
                }
            }
            DiffItem::Remove(name, chain) => {
                newly_stale.insert(name.clone());
                // Stale chains were flushed when they became stale, so they hold no rules.
                if !chain.rules.is_empty() {
                    flush.push(name.clone());
                }
            }
        }
    }
    if !redeclared.is_empty() {
        // Rare (an affinity timeout changed): every chain is looked at.
        for (name, chain) in &desired.chains {
            let old = kernel.chains.get(name);
            if names_any(chain, &redeclared) || old.is_some_and(|o| names_any(o, &redeclared)) {
                refill.insert(name);
            }
        }
    }
    for name in &refill {
        if kernel
            .chains
            .get(*name)
            .is_some_and(|c| !c.rules.is_empty())
        {
            flush.push((*name).clone());
        }
    }
    let mut tx = Transaction::default();
    tx.statements.extend(declare);
    for name in flush {
        tx.statements
            .push(format!("flush chain {family} {table} {name}"));
    }
    sets(kernel, desired, &redeclared, &mut tx);
    for name in &refill {
        for rule in &desired.chains[*name].rules {
            tx.statements
                .push(format!("add rule {family} {table} {name} {rule}"));
        }
    }
    // Flushed by an earlier sync, and no element or rule has named them since.
    for name in stale.iter().filter(|n| !desired.chains.contains_key(*n)) {
        tx.statements
            .push(format!("delete chain {family} {table} {name}"));
        newly_stale.remove(name);
    }
    (tx, newly_stale)
}

/// Set and map declarations and elements; stale sets are deleted after the chains that
/// named them were flushed.
fn sets(kernel: &Table, desired: &Table, redeclared: &BTreeSet<&String>, tx: &mut Transaction) {
    let (family, table) = (desired.family, &desired.name);
    let element = |op: &str, name: &str, key: &str, value: &str| {
        format!(
            "{op} element {family} {table} {name} {{ {} }}",
            Set::element(key, value)
        )
    };
    let mut changes = Vec::new();
    for item in kernel.sets.diff(&desired.sets) {
        match item {
            DiffItem::Remove(name, set) => {
                tx.statements
                    .push(format!("delete {} {family} {table} {name}", set.kind));
            }
            DiffItem::Update { old, new } if redeclared.contains(new.0) => {
                tx.statements
                    .push(format!("delete {} {family} {table} {}", old.1.kind, old.0));
                changes.push((new.0, None, new.1));
            }
            DiffItem::Update { old, new } => changes.push((new.0, Some(old.1), new.1)),
            DiffItem::Add(name, set) => changes.push((name, None, set)),
        }
    }
    for (name, old, set) in changes {
        if old.is_none() {
            tx.statements.push(desired.add_set(name, set));
        }
        if set.dynamic {
            continue;
        }
        let Some(old) = old else {
            for (key, value) in &set.elements {
                tx.statements.push(element("add", name, key, value));
            }
            continue;
        };
        let mut adds = Vec::new();
        for item in old.elements.diff(&set.elements) {
            match item {
                DiffItem::Remove(key, _) => tx.statements.push(element("delete", name, key, "")),
                DiffItem::Update { new, .. } => {
                    tx.statements.push(element("delete", name, new.0, ""));
                    adds.push(element("add", name, new.0, new.1));
                }
                DiffItem::Add(key, value) => adds.push(element("add", name, key, value)),
            }
        }
        tx.statements.extend(adds);
    }
}
