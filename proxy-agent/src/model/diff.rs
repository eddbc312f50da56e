//! What must change to go from the programmed state to the desired one. Both are
//! persistent maps, so when one was derived from the other the diff skips what they
//! share and costs what changed.
use std::{collections::BTreeMap, sync::Arc};

use imbl::ordmap::DiffItem;

use super::types::{DesiredState, Frontend, FrontendKey};

/// Frontends to write (new or with other backends) and to delete, with the version each
/// of them had before, for consumers that follow what went away (stale UDP flows,
/// health checks, counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert: BTreeMap<FrontendKey, Arc<Frontend>>,
    pub remove: Vec<FrontendKey>,
    /// The programmed version of every upserted frontend that existed and of every
    /// removed one.
    pub before: BTreeMap<FrontendKey, Arc<Frontend>>,
}

impl Plan {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }

    /// Every frontend the plan touches: (key, before, after).
    pub fn changes(
        &self,
    ) -> impl Iterator<Item = (FrontendKey, Option<&Frontend>, Option<&Frontend>)> {
        let upserts = self
            .upsert
            .iter()
            .map(|(k, f)| (*k, self.before.get(k).map(AsRef::as_ref), Some(f.as_ref())));
        let removes = self
            .remove
            .iter()
            .map(|k| (*k, self.before.get(k).map(AsRef::as_ref), None));
        upserts.chain(removes)
    }
}

/// Compares programming only: names are not kept in the kernel, so a restored state
/// carries none and must not look different for that.
#[must_use]
pub fn diff(programmed: &DesiredState, desired: &DesiredState) -> Plan {
    let mut plan = Plan::default();
    for item in programmed.frontends.diff(&desired.frontends) {
        match item {
            DiffItem::Add(key, want) => {
                plan.upsert.insert(*key, want.clone());
            }
            DiffItem::Remove(key, have) => {
                plan.remove.push(*key);
                plan.before.insert(*key, have.clone());
            }
            DiffItem::Update {
                old: (key, have),
                new: (_, want),
            } => {
                if !have.same_programming(want) {
                    plan.upsert.insert(*key, want.clone());
                    plan.before.insert(*key, have.clone());
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::types::{Backend, Protocol};

    fn key(last: u8) -> FrontendKey {
        FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn frontend(ports: &[u16]) -> Frontend {
        Frontend::backends_only(
            ports
                .iter()
                .map(|&port| Backend {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)),
                    port,
                })
                .collect(),
        )
    }

    #[test]
    fn diff_finds_added_changed_and_removed_frontends() {
        let mut old = DesiredState::default();
        old.frontends.insert(key(1), frontend(&[1]).into());
        old.frontends.insert(key(2), frontend(&[2]).into());
        old.frontends.insert(key(3), frontend(&[3]).into());
        let mut new = DesiredState::default();
        new.frontends.insert(key(1), frontend(&[1]).into());
        new.frontends.insert(key(2), frontend(&[2, 4]).into());
        new.frontends.insert(key(4), frontend(&[]).into());
        let plan = diff(&old, &new);
        assert_eq!(
            plan.upsert.keys().copied().collect::<Vec<_>>(),
            vec![key(2), key(4)]
        );
        assert_eq!(plan.remove, vec![key(3)]);
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn names_alone_do_not_make_a_change() {
        let mut restored = DesiredState::default();
        restored.frontends.insert(key(1), frontend(&[1]).into());
        let mut named = restored.clone();
        named
            .frontends
            .get_mut(&key(1))
            .map(std::sync::Arc::make_mut)
            .unwrap()
            .service
            .name = "web".into();
        assert!(diff(&restored, &named).is_empty());
    }
}
