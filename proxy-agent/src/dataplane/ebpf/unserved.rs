//! Frontends with no endpoint on this node under a Local traffic policy. kube-proxy drops
//! their traffic (the client waits out its timeout), so the socket programs leave such a
//! connection untranslated and the netfilter table drops it by these sets.
use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use super::nodeport::TABLE;
use crate::model::{DesiredState, EmptyVerdict, Frontend, FrontendKey, Plan};

/// The sets, by family.
pub const SET4: &str = "no-endpoints4";
pub const SET6: &str = "no-endpoints6";

/// Whether pods' traffic to this frontend is dropped for want of a local endpoint.
fn dropped(frontend: &Frontend) -> bool {
    frontend.pod.when_empty == EmptyVerdict::Drop && frontend.pod.backends.is_empty()
}

/// The frontends in the kernel's sets, as last loaded.
#[derive(Debug, Default)]
pub struct Unserved {
    set: BTreeSet<FrontendKey>,
}

/// The nft commands one plan needs: additions go in before the maps change (an element
/// for a frontend that still has endpoints matches nothing, since its connections are
/// translated), removals after.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Steps {
    pub added: Vec<FrontendKey>,
    pub removed: Vec<FrontendKey>,
}

impl Unserved {
    /// What a restarted agent finds programmed.
    #[must_use]
    pub fn of(state: &DesiredState) -> Self {
        Self {
            set: state
                .frontends
                .iter()
                .filter(|(_, f)| dropped(f))
                .map(|(k, _)| *k)
                .collect(),
        }
    }

    /// Every element, as commands to follow the table's definition.
    #[must_use]
    pub fn elements(&self) -> String {
        let keys: Vec<FrontendKey> = self.set.iter().copied().collect();
        commands("add", &keys)
    }

    /// Follows a plan in memory; the caller loads the steps and calls [`Self::undo`]
    /// with those that failed.
    pub fn follow(&mut self, plan: &Plan) -> Steps {
        let mut steps = Steps::default();
        for (key, _, after) in plan.changes() {
            let want = after.is_some_and(dropped);
            if want && self.set.insert(key) {
                steps.added.push(key);
            } else if !want && self.set.remove(&key) {
                steps.removed.push(key);
            }
        }
        steps
    }

    /// Forgets additions (or removals) the kernel refused: the transaction changed
    /// nothing, so the next plan that carries these keys tries them again.
    pub fn undo(&mut self, added: &[FrontendKey], removed: &[FrontendKey]) {
        for key in added {
            self.set.remove(key);
        }
        self.set.extend(removed.iter().copied());
    }
}

/// `add element` or `delete element` commands for `keys`, one per family that has any.
#[must_use]
pub fn commands(verb: &str, keys: &[FrontendKey]) -> String {
    let mut text = String::new();
    for (set, v4) in [(SET4, true), (SET6, false)] {
        let elements: Vec<String> = keys
            .iter()
            .filter(|k| k.ip.is_ipv4() == v4)
            .map(|k| element(k.ip, k.protocol.number(), k.port))
            .collect();
        if !elements.is_empty() {
            let _ = writeln!(
                text,
                "{verb} element inet {TABLE} {set} {{ {} }}",
                elements.join(", ")
            );
        }
    }
    text
}

fn element(ip: IpAddr, proto: u8, port: u16) -> String {
    format!("{ip} . {proto} . {port}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{commands, Unserved};
    use crate::model::{Backend, EmptyVerdict, Frontend, FrontendKey, Plan, Protocol};

    fn frontend(when_empty: EmptyVerdict, backends: usize) -> Arc<Frontend> {
        let backends: Vec<Backend> = (0..backends)
            .map(|i| Backend {
                ip: format!("10.244.1.{}", i + 2).parse().unwrap(),
                port: 8080,
            })
            .collect();
        let mut frontend = Frontend::backends_only(backends);
        frontend.pod.when_empty = when_empty;
        Arc::new(frontend)
    }

    fn key(ip: &str) -> FrontendKey {
        FrontendKey {
            ip: ip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn only_frontends_left_without_local_endpoints_are_dropped() {
        let mut unserved = Unserved::default();
        let mut plan = Plan::default();
        plan.upsert
            .insert(key("10.96.0.1"), frontend(EmptyVerdict::Drop, 0));
        plan.upsert
            .insert(key("10.96.0.2"), frontend(EmptyVerdict::Reject, 0));
        plan.upsert
            .insert(key("10.96.0.3"), frontend(EmptyVerdict::Drop, 1));
        plan.upsert
            .insert(key("fd00:96::4"), frontend(EmptyVerdict::Drop, 0));
        let steps = unserved.follow(&plan);
        assert_eq!(steps.added, [key("10.96.0.1"), key("fd00:96::4")]);
        assert_eq!(
            commands("add", &steps.added),
            "add element inet proxy-agent-ebpf no-endpoints4 { 10.96.0.1 . 6 . 80 }\n\
             add element inet proxy-agent-ebpf no-endpoints6 { fd00:96::4 . 6 . 80 }\n"
        );
        // An endpoint arrives for one, the other's Service goes away.
        let mut plan = Plan::default();
        plan.upsert
            .insert(key("10.96.0.1"), frontend(EmptyVerdict::Drop, 1));
        plan.remove.push(key("fd00:96::4"));
        let steps = unserved.follow(&plan);
        assert!(steps.added.is_empty());
        assert_eq!(steps.removed, [key("10.96.0.1"), key("fd00:96::4")]);
        // The kernel refused: the next plan with the same keys tries again.
        unserved.undo(&[], &steps.removed);
        assert_eq!(unserved.follow(&plan).removed.len(), 2);
        assert!(unserved.elements().is_empty());
    }
}
