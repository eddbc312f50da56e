//! Partial sync: the `nft -f` transaction that turns the table the kernel holds into the
//! desired one touching only what changed, as kube-proxy's nftables proxier does. Chains
//! that are no longer wanted are flushed at once and deleted one sync later, when
//! nothing can refer to them any more; affinity sets keep their elements.
use std::collections::BTreeSet;

use super::table::{Chain, Set, Table, TABLE};

/// One transaction and its size.
#[derive(Debug, Default)]
pub struct Transaction {
    pub statements: Vec<String>,
}

impl Transaction {
    fn push(&mut self, statement: String) {
        self.statements.push(statement);
    }

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

/// The statements from `kernel` to `desired`. `stale` holds the chains flushed by an
/// earlier sync: they are deleted now unless wanted again; the chains this sync drops
/// are flushed and returned as the new `stale`. `kernel` then holds both.
#[must_use]
pub fn delta(
    kernel: &Table,
    desired: &Table,
    stale: &BTreeSet<String>,
) -> (Transaction, BTreeSet<String>) {
    let family = desired.family;
    let mut tx = Transaction::default();
    // Sets whose declaration changed are recreated; every chain naming them is refilled.
    let redeclared: BTreeSet<&String> = desired
        .sets
        .iter()
        .filter(|(name, set)| {
            kernel
                .sets
                .get(*name)
                .is_some_and(|old| old.decl != set.decl)
        })
        .map(|(name, _)| name)
        .collect();
    let names_set = |chain: &Chain| {
        chain.rules.iter().any(|rule| {
            redeclared
                .iter()
                .any(|set| rule.contains(&format!("@{set} ")) || rule.ends_with(&format!("@{set}")))
        })
    };
    // Chains whose rules are (re)written: new, changed, or naming a recreated set.
    let refilled: BTreeSet<&String> = desired
        .chains
        .iter()
        .filter(|(name, chain)| match kernel.chains.get(*name) {
            None => true,
            Some(old) => old.rules != chain.rules || names_set(old) || names_set(chain),
        })
        .map(|(name, _)| name)
        .collect();
    for (name, chain) in &desired.chains {
        let declared = kernel.chains.get(name);
        if declared.is_none_or(|old| old.comment != chain.comment || old.hook != chain.hook) {
            tx.push(desired.add_chain(name, chain));
        }
    }
    let mut newly_stale = BTreeSet::new();
    for (name, chain) in &kernel.chains {
        let unwanted = !desired.chains.contains_key(name);
        if unwanted {
            newly_stale.insert(name.clone());
        }
        // Stale chains were flushed when they became stale, so they hold no rules.
        if !chain.rules.is_empty() && (unwanted || refilled.contains(name)) {
            tx.push(format!("flush chain {family} {TABLE} {name}"));
        }
    }
    sets(kernel, desired, &redeclared, &mut tx);
    for name in &refilled {
        for rule in &desired.chains[*name].rules {
            tx.push(format!("add rule {family} {TABLE} {name} {rule}"));
        }
    }
    // Flushed by an earlier sync, and no element or rule has named them since.
    for name in stale.iter().filter(|n| !desired.chains.contains_key(*n)) {
        tx.push(format!("delete chain {family} {TABLE} {name}"));
        newly_stale.remove(name);
    }
    (tx, newly_stale)
}

/// Set and map declarations and elements; stale sets are deleted after the chains that
/// named them were flushed.
fn sets(kernel: &Table, desired: &Table, redeclared: &BTreeSet<&String>, tx: &mut Transaction) {
    let family = desired.family;
    for (name, set) in &kernel.sets {
        if !desired.sets.contains_key(name) || redeclared.contains(name) {
            tx.push(format!("delete {} {family} {TABLE} {name}", set.kind));
        }
    }
    let empty = Set::new("set", &[]);
    for (name, set) in &desired.sets {
        let old = match kernel.sets.get(name) {
            Some(old) if !redeclared.contains(name) => old,
            _ => {
                tx.push(desired.add_set(name, set));
                &empty
            }
        };
        if set.dynamic {
            continue;
        }
        let element = |op: &str, key: &str, value: &str| {
            format!(
                "{op} element {family} {TABLE} {name} {{ {} }}",
                Set::element(key, value)
            )
        };
        for (key, value) in &old.elements {
            if set.elements.get(key) != Some(value) {
                tx.push(element("delete", key, ""));
            }
        }
        for (key, value) in &set.elements {
            if old.elements.get(key) != Some(value) {
                tx.push(element("add", key, value));
            }
        }
    }
}
