//! Partial nftables syncs: after every change, the table a partial transaction leaves
//! in the kernel equals a fresh full load of the same state (read back with `nft -j`);
//! stale chains are flushed, then deleted one sync later; and one endpoint change among
//! 10 000 Services is a handful of statements.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use ::nftables::schema::NfListObject;
use proxy_agent::{
    dataplane::{
        nftables::{
            self, delta,
            listing::{self, Object},
            ruleset, table, NftablesDataplane,
        },
        Dataplane,
    },
    model::{self, Backend, DesiredState, Frontend, LocalTraffic, NodeInfo},
};
use proxy_agent_tests::{
    cluster::{sh_in, sh_in_with_stdin, Cluster},
    flows, scale,
};

/// `nft -j list ruleset FAMILY`, our tables only, read as the nftables crate's schema,
/// with handles dropped and set elements sorted: `table/chain` → (declaration, rules in
/// order), and `table/set` → declaration with elements.
type Listing = (
    BTreeMap<String, (NfListObject<'static>, Vec<NfListObject<'static>>)>,
    BTreeMap<String, listing::Object>,
);

fn sorted<'a>(elements: &mut Option<std::borrow::Cow<'a, [::nftables::expr::Expression<'a>]>>) {
    if let Some(elements) = elements {
        elements.to_mut().sort_by_cached_key(|e| format!("{e:?}"));
    }
}

fn listing(netns: &str, family: &str) -> Listing {
    let text = sh_in(netns, &["nft", "-j", "list", "ruleset", family]);
    let (mut chains, mut sets) = (BTreeMap::new(), BTreeMap::new());
    for object in listing::ours(&text).expect("nft json of our tables") {
        match object {
            Object::Listed(NfListObject::Chain(mut chain)) => {
                chain.handle = None;
                let name = format!("{}/{}", chain.table, chain.name);
                chains.insert(name, (NfListObject::Chain(chain), Vec::new()));
            }
            Object::Listed(NfListObject::Rule(mut rule)) => {
                rule.handle = None;
                let name = format!("{}/{}", rule.table, rule.chain);
                chains
                    .get_mut(&name)
                    .expect("rule's chain")
                    .1
                    .push(NfListObject::Rule(rule));
            }
            Object::Listed(NfListObject::Set(mut set)) => {
                set.handle = None;
                sorted(&mut set.elem);
                let name = format!("{}/{}", set.table, set.name);
                sets.insert(name, Object::Listed(NfListObject::Set(set)));
            }
            Object::Listed(NfListObject::Map(mut map)) => {
                map.handle = None;
                sorted(&mut map.elem);
                let name = format!("{}/{}", map.table, map.name);
                sets.insert(name, Object::Listed(NfListObject::Map(map)));
            }
            Object::VerdictMap(mut map) => {
                map.handle = None;
                if let Some(elements) = &mut map.elem {
                    elements.sort_by_cached_key(|e| format!("{e:?}"));
                }
                sets.insert(
                    format!("{}/{}", map.table, map.name),
                    Object::VerdictMap(map),
                );
            }
            Object::Listed(_) | Object::Counter(_) => {}
        }
    }
    (chains, sets)
}

/// Chains in `partial` beyond `full` must be stale ones: flushed, and returned.
fn same_as_full(partial: &Listing, full: &Listing, step: &str) -> BTreeSet<String> {
    assert_eq!(partial.1, full.1, "{step}: sets differ");
    let mut stale = BTreeSet::new();
    for (name, (chain, rules)) in &partial.0 {
        if let Some((want_chain, want_rules)) = full.0.get(name) {
            assert_eq!(
                chain, want_chain,
                "{step}: chain {name} declared differently"
            );
            assert_eq!(rules, want_rules, "{step}: chain {name} has other rules");
        } else {
            assert!(
                rules.is_empty(),
                "{step}: stale chain {name} still has rules"
            );
            stale.insert(name.clone());
        }
    }
    for name in full.0.keys() {
        assert!(partial.0.contains_key(name), "{step}: chain {name} missing");
    }
    stale
}

/// `state` with `change` applied to each frontend.
fn edited(state: &DesiredState, mut change: impl FnMut(&mut Frontend)) -> DesiredState {
    let frontends = state
        .frontends
        .iter()
        .map(|(key, frontend)| {
            let mut frontend = Frontend::clone(frontend);
            change(&mut frontend);
            (*key, frontend)
        })
        .collect();
    DesiredState { frontends }
}

fn without_backend(state: &DesiredState, drop: Backend) -> DesiredState {
    edited(state, |frontend| {
        for route in [
            &mut frontend.pod,
            &mut frontend.node,
            &mut frontend.external,
        ] {
            let kept: Vec<Backend> = route
                .backends
                .iter()
                .copied()
                .filter(|b| *b != drop)
                .collect();
            route.backends = Arc::from(kept);
        }
    })
}

fn with_backend_added(state: &DesiredState, service: &str, added: Backend) -> DesiredState {
    edited(state, |frontend| {
        if frontend.service.name != service {
            return;
        }
        for route in [
            &mut frontend.pod,
            &mut frontend.node,
            &mut frontend.external,
        ] {
            if !route.backends.is_empty() && !route.local {
                let mut all = route.backends.to_vec();
                all.push(added);
                all.sort();
                route.backends = Arc::from(all);
            }
        }
    })
}

fn without_service(state: &DesiredState, service: &str) -> DesiredState {
    let frontends = state
        .frontends
        .iter()
        .filter(|(_, f)| f.service.name != service)
        .map(|(k, f)| (*k, f.clone()))
        .collect();
    DesiredState { frontends }
}

fn with_affinity(state: &DesiredState, timeout: u32) -> DesiredState {
    edited(state, |frontend| {
        if frontend.affinity_timeout.is_some() {
            frontend.affinity_timeout = Some(timeout);
        }
    })
}

#[test]
fn partial_syncs_leave_the_kernel_as_a_full_load_would() {
    let cluster = Cluster::new("nfp");
    let (a, b) = (cluster.add_netns("partial"), cluster.add_netns("full"));
    let path = |n: &str| Some(PathBuf::from(format!("/run/netns/{n}")));
    let snapshot = flows::snapshot();
    let node: NodeInfo = flows::node(&snapshot, "node1");
    let base = model::build(&snapshot, &node);
    let busy = base
        .frontends
        .values()
        .find(|f| f.pod.backends.len() >= 2 && !f.pod.local)
        .expect("a Service with two endpoints");
    let (busy_name, first) = (busy.service.name.clone(), busy.pod.backends[0]);
    let affine = base
        .frontends
        .values()
        .find(|f| f.affinity_timeout.is_some())
        .expect("a Service with affinity")
        .service
        .name
        .clone();
    let other = base
        .frontends
        .values()
        .filter(|f| !f.pod.backends.is_empty())
        .map(|f| f.service.name.clone())
        .find(|n| *n != busy_name && *n != affine)
        .expect("a third Service with endpoints");
    let added = Backend {
        ip: "10.244.1.200".parse().unwrap(),
        port: first.port,
    };
    let steps: Vec<(&str, DesiredState)> = vec![
        ("initial", base.clone()),
        ("endpoint removed", without_backend(&base, first)),
        (
            "endpoint added",
            with_backend_added(&base, &busy_name, added),
        ),
        ("service removed", without_service(&base, &busy_name)),
        ("service back", base.clone()),
        ("affinity timeout changed", with_affinity(&base, 60)),
        ("affinity service removed", without_service(&base, &affine)),
        (
            "another service removed",
            without_service(&without_service(&base, &affine), &other),
        ),
        // Every Service table goes (`delete table`), then comes back whole.
        ("no service", DesiredState::default()),
        ("everything back", base.clone()),
    ];
    let cidrs = node.local();
    let mut partial = NftablesDataplane::start_in(cidrs.clone(), path(&a)).expect("nft");
    let mut previous = DesiredState::default();
    let mut stale_before = BTreeSet::new();
    let mut saw_stale = false;
    let mut over_netlink = Vec::new();
    for (i, (step, desired)) in steps.iter().enumerate() {
        let plan = model::diff(&previous, desired);
        let before = partial.commits().netlink;
        let applied = partial.apply(&plan, desired).expect(step);
        if partial.commits().netlink > before {
            over_netlink.push(*step);
        }
        assert_eq!(applied.full, i == 0, "{step}: only the first sync is full");
        // The reference: a full load into an empty namespace.
        nftables::load_in(path(&b).as_deref(), &ruleset::removal()).expect("clean");
        let mut full = NftablesDataplane::start_in(cidrs.clone(), path(&b)).expect("nft");
        full.apply(&plan, desired).expect(step);
        let mut stale_now = BTreeSet::new();
        for family in ["ip", "ip6"] {
            stale_now.extend(same_as_full(
                &listing(&a, family),
                &listing(&b, family),
                step,
            ));
        }
        // A chain flushed by the previous sync and still unwanted is gone now.
        let lingering: Vec<_> = stale_before.intersection(&stale_now).collect();
        assert!(
            lingering.is_empty(),
            "{step}: stale chains not deleted: {lingering:?}"
        );
        println!(
            "{step}: {} statements, {} stale chains",
            applied.writes,
            stale_now.len()
        );
        saw_stale |= !stale_now.is_empty();
        stale_before = stale_now;
        previous = desired.clone();
    }
    assert!(saw_stale, "some step must leave stale chains behind");
    // Endpoint and Service changes go straight to nf_tables; only what is outside the
    // netlink grammar (affinity sets, source ranges) takes `nft -f`.
    println!("committed over netlink: {over_netlink:?}");
    for step in [
        "endpoint removed",
        "endpoint added",
        "service removed",
        "no service",
    ] {
        assert!(over_netlink.contains(&step), "{step} went through nft -f");
    }
}

#[test]
fn one_endpoint_change_among_10000_services_is_a_handful_of_statements() {
    let snapshot = scale::snapshot(10_000, 10);
    let node = NodeInfo::named("node1");
    let before = ruleset::build(&model::build(&snapshot, &node), &LocalTraffic::default());
    let moved = scale::with_endpoint(&snapshot, 5_000, "10.200.0.1".parse().unwrap());
    let after = ruleset::build(&model::build(&moved, &node), &LocalTraffic::default());
    assert_eq!(
        before.iter().map(table::Table::key).collect::<Vec<_>>(),
        after.iter().map(table::Table::key).collect::<Vec<_>>(),
        "the same tables"
    );
    // Every Service table holds Services (10 000 spread over 16), none twice.
    let services: Vec<usize> = before
        .iter()
        .filter(|t| t.name != table::TABLE)
        .map(|t| t.sets["service-ips"].elements.len())
        .collect();
    println!("Services per table: {services:?}");
    assert_eq!(services.len(), table::SHARDS);
    assert_eq!(services.iter().sum::<usize>(), 10_000);
    assert!(
        services.iter().all(|n| (400..=850).contains(n)),
        "{services:?}"
    );
    let mut changed = Vec::new();
    for (old, new) in before.iter().zip(&after) {
        let (tx, stale) = delta::delta(old, new, &BTreeSet::new());
        if tx.is_empty() {
            continue;
        }
        println!("one endpoint change at 10 000 Services:\n{}", tx.text());
        // New SEP chain (declare + 3 rules), SVC chain refilled (flush + 10 rules), old
        // SEP flushed.
        assert!(
            tx.statements.len() <= 16,
            "{} statements:\n{}",
            tx.statements.len(),
            tx.text()
        );
        assert_eq!(stale.len(), 1, "the old endpoint's chain is stale");
        changed.push(new.key());
    }
    assert_eq!(changed.len(), 1, "one table changes: {changed:?}");
}

/// A full load over our own tables (a restart, or the rewrite after a failed sync)
/// keeps the clients sessionAffinity remembers, and leaves what a fresh load leaves.
#[test]
fn a_full_reload_keeps_the_clients_affinity_remembers() {
    let cluster = Cluster::new("nfk");
    let (a, b) = (cluster.add_netns("reload"), cluster.add_netns("fresh"));
    let path = |n: &str| Some(PathBuf::from(format!("/run/netns/{n}")));
    let snapshot = flows::snapshot();
    let node: NodeInfo = flows::node(&snapshot, "node1");
    let base = model::build(&snapshot, &node);
    let fewer = without_service(
        &base,
        &base
            .frontends
            .values()
            .find(|f| !f.pod.backends.is_empty() && f.affinity_timeout.is_none())
            .expect("a Service without affinity")
            .service
            .name
            .clone(),
    );
    let mut first = NftablesDataplane::start_in(Vec::new(), path(&a)).expect("nft");
    first
        .apply(&model::Plan::default(), &base)
        .expect("first load");
    // A client the kernel remembers in an affinity set.
    let (_, sets) = listing(&a, "ip");
    let (table, set) = sets
        .keys()
        .filter_map(|key| key.split_once('/'))
        .find(|(_, name)| name.starts_with("affinity-"))
        .map(|(t, s)| (t.to_owned(), s.to_owned()))
        .expect("an affinity set");
    sh_in(
        &a,
        &[
            "nft",
            "add",
            "element",
            "ip",
            &table,
            &set,
            "{ 10.244.9.9 }",
        ],
    );
    // Restarted: nothing known, a full load over the tables there, one Service fewer.
    drop(first);
    let mut second = NftablesDataplane::start_in(Vec::new(), path(&a)).expect("nft");
    let applied = second
        .apply(&model::Plan::default(), &fewer)
        .expect("reload");
    assert!(applied.full);
    let remembered = sh_in(&a, &["nft", "list", "set", "ip", &table, &set]);
    assert!(
        remembered.contains("10.244.9.9"),
        "affinity forgotten:\n{remembered}"
    );
    // The removed Service's chains were flushed and go at the next sync.
    second
        .apply(&model::Plan::default(), &fewer)
        .expect("next sync");
    let mut fresh = NftablesDataplane::start_in(Vec::new(), path(&b)).expect("nft");
    fresh.apply(&model::Plan::default(), &fewer).expect("fresh");
    let (mut kept, fresh_listing) = (listing(&a, "ip"), listing(&b, "ip"));
    // The remembered client aside, the reloaded table is the fresh one.
    if let Some(Object::Listed(NfListObject::Set(decl))) = kept.1.get_mut(&format!("{table}/{set}"))
    {
        decl.elem = None;
    }
    let left = same_as_full(&kept, &fresh_listing, "after a reload");
    assert!(left.is_empty(), "left over: {left:?}");
}

/// A full load (fixed parts through `nft -f`, Service tables as netlink batches, what
/// is outside the netlink grammar through `nft -f`) leaves exactly what `nft -f` of the
/// rendered text leaves: for the flow cases (affinity, source ranges, NodePorts, many
/// endpoints, IPv6) and for 500 Services over every Service table.
#[test]
fn a_full_load_leaves_what_nft_leaves_of_the_rendered_text() {
    let cluster = Cluster::new("nff");
    let (a, b) = (cluster.add_netns("load"), cluster.add_netns("text"));
    let path = |n: &str| Some(PathBuf::from(format!("/run/netns/{n}")));
    let flows_snapshot = flows::snapshot();
    let node = flows::node(&flows_snapshot, "node1");
    let cases = [
        (
            "flow cases",
            model::build(&flows_snapshot, &node),
            node.cluster_cidrs.clone(),
        ),
        (
            "500 Services",
            model::build(&scale::snapshot(500, 10), &NodeInfo::named("node1")),
            Vec::new(),
        ),
    ];
    for (case, desired, cidrs) in cases {
        let mut loaded = NftablesDataplane::start_in(cidrs.clone(), path(&a)).expect("nft");
        let applied = loaded.apply(&model::Plan::default(), &desired).expect(case);
        assert!(applied.full, "{case}");
        assert!(loaded.commits().netlink > 0, "{case}: no netlink batch");
        nftables::load_in(
            path(&b).as_deref(),
            &ruleset::render(&desired, &cidrs.clone().into()),
        )
        .expect(case);
        for family in ["ip", "ip6"] {
            let (got, want) = (listing(&a, family), listing(&b, family));
            assert!(!want.0.is_empty(), "{case}: nothing in {family}");
            let stale = same_as_full(&got, &want, case);
            assert!(stale.is_empty(), "{case}: extra chains {stale:?}");
        }
        for netns in [&a, &b] {
            nftables::load_in(path(netns).as_deref(), &ruleset::removal()).expect("clean");
        }
    }
}

/// The nftables crate reads our tables back and writes them as `nft -j -f` loads them:
/// the ruleset it leaves is the text load's, but for table and chain comments (its
/// schema has no field for them), for the flow cases (affinity, source ranges, NodePorts,
/// many endpoints, IPv6).
#[test]
fn the_nftables_crate_writes_back_what_it_read_of_our_tables() {
    let cluster = Cluster::new("nfrt");
    let (a, b) = (cluster.add_netns("text"), cluster.add_netns("json"));
    let snapshot = flows::snapshot();
    let node = flows::node(&snapshot, "node1");
    let desired = model::build(&snapshot, &node);
    let mut nft = NftablesDataplane::start_in(
        node.cluster_cidrs.clone(),
        Some(PathBuf::from(format!("/run/netns/{a}"))),
    )
    .expect("nft");
    nft.apply(&model::Plan::default(), &desired).expect("load");
    let objects = listing::ours(&sh_in(&a, &["nft", "-j", "list", "ruleset"])).expect("read");
    assert!(
        objects.iter().any(|o| matches!(o, Object::VerdictMap(_)))
            && objects.iter().any(|o| matches!(o, Object::Counter(_))),
        "the stand-ins are exercised"
    );
    let document = listing::batch(objects).expect("batch");
    sh_in_with_stdin(&b, &["nft", "-j", "-f", "-"], &document);
    let uncommented = |ns: &str| {
        sh_in(ns, &["nft", "list", "ruleset"])
            .lines()
            .filter(|l| !l.trim_start().starts_with("comment "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (text, json) = (uncommented(&a), uncommented(&b));
    assert!(text.len() > 100, "{text:?}");
    assert_eq!(text, json);
}
