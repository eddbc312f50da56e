//! What must change to go from the programmed state to the desired one.
use std::collections::BTreeMap;

use super::types::{DesiredState, Frontend, FrontendKey};

/// Frontends to write (new or with other backends) and to delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert: BTreeMap<FrontendKey, Frontend>,
    pub remove: Vec<FrontendKey>,
}

impl Plan {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Compares backends only: names are not kept in the kernel, so a restored state
/// carries none and must not look different for that.
#[must_use]
pub fn diff(programmed: &DesiredState, desired: &DesiredState) -> Plan {
    let upsert = desired
        .frontends
        .iter()
        .filter(|(key, want)| {
            programmed
                .frontends
                .get(key)
                .is_none_or(|have| !have.same_programming(want))
        })
        .map(|(key, want)| (*key, want.clone()))
        .collect();
    let remove = programmed
        .frontends
        .keys()
        .filter(|key| !desired.frontends.contains_key(key))
        .copied()
        .collect();
    Plan { upsert, remove }
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
        old.frontends.insert(key(1), frontend(&[1]));
        old.frontends.insert(key(2), frontend(&[2]));
        old.frontends.insert(key(3), frontend(&[3]));
        let mut new = DesiredState::default();
        new.frontends.insert(key(1), frontend(&[1]));
        new.frontends.insert(key(2), frontend(&[2, 4]));
        new.frontends.insert(key(4), frontend(&[]));
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
        restored.frontends.insert(key(1), frontend(&[1]));
        let mut named = restored.clone();
        named.frontends.get_mut(&key(1)).unwrap().service.name = "web".into();
        assert!(diff(&restored, &named).is_empty());
    }
}
