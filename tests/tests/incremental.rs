//! The incremental pipeline is exact: a random sequence of Service and EndpointSlice
//! changes, followed change by change (snapshot diff → tracker → plan → each dataplane's
//! rendered form), always ends where a full rebuild from the same snapshot does: the
//! same desired state, the same nftables tables, eBPF maps that hold the same
//! frontends, slots, backends and Maglev tables (up to the ids they were given), and
//! the same DNS zone.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_agent::{
    dataplane::{
        ebpf::{store::MapContents, MapWriter},
        nftables::{rendered::Rendered, ruleset},
    },
    dns::{zone::Zone, zone_tracker::ZoneTracker},
    model::{
        self,
        snapshot::{slim_service, slim_slice},
        DesiredState, NodeInfo, ObjectKey, Snapshot, Tracker,
    },
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

const SERVICES: usize = 24;

fn node() -> NodeInfo {
    let mut node = NodeInfo::named("node1");
    node.addresses = vec![
        "10.100.0.1".parse().unwrap(),
        "fd00:100::1".parse().unwrap(),
    ];
    node.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    node.zone = Some("a".into());
    node
}

/// A random Service `i`: any type and policy, sometimes dual-stack, sometimes sharing
/// its ClusterIP or NodePort with another Service (invalid, but it must resolve as a
/// full build does).
fn service(rng: &mut StdRng, i: usize) -> Service {
    let kind = [
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ClusterIP",
        "ExternalName",
    ][rng.random_range(0..5)];
    let shared = rng.random_bool(0.1);
    let ip_index = if shared { i % 3 } else { i };
    let mut ips = vec![format!("10.96.0.{}", ip_index + 1)];
    if rng.random_bool(0.3) {
        ips.push(format!("fd00:96::{:x}", ip_index + 1));
    }
    let headless = rng.random_bool(0.1);
    let node_port = 30000 + if rng.random_bool(0.1) { 0 } else { i };
    let mut ports = vec![
        json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
        "nodePort": node_port}),
    ];
    if rng.random_bool(0.5) {
        ports.push(
            json!({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353,
            "nodePort": node_port + 100}),
        );
    }
    if kind == "ClusterIP" || kind == "ExternalName" {
        for port in &mut ports {
            port.as_object_mut().unwrap().remove("nodePort");
        }
    }
    let mut spec = json!({
        "type": kind,
        "clusterIP": if headless { "None".to_owned() } else { ips[0].clone() },
        "clusterIPs": if headless { vec!["None".to_owned()] } else { ips },
        "ports": ports,
        "internalTrafficPolicy": if rng.random_bool(0.2) { "Local" } else { "Cluster" },
    });
    if kind == "ExternalName" {
        spec = json!({"type": "ExternalName", "externalName": "example.com"});
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        spec["externalTrafficPolicy"] = json!(if rng.random_bool(0.4) {
            "Local"
        } else {
            "Cluster"
        });
        spec["healthCheckNodePort"] = json!(32000 + i);
    }
    if rng.random_bool(0.2) {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] =
            json!({"clientIP": {"timeoutSeconds": rng.random_range(10..100)}});
    }
    if rng.random_bool(0.2) {
        spec["externalIPs"] = json!([format!("192.0.2.{}", i + 1)]);
    }
    if rng.random_bool(0.2) {
        spec["trafficDistribution"] = json!("PreferClose");
    }
    let mut status = json!({});
    if kind == "LoadBalancer" {
        status = json!({"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", i + 1)}]}});
        if rng.random_bool(0.5) {
            spec["loadBalancerSourceRanges"] = json!(["203.0.113.0/24"]);
        }
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}"), "namespace": "ns"},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

/// A random slice of Service `service`: endpoints on either node, in any condition.
fn slice(rng: &mut StdRng, name: &str, service: usize, v6: bool) -> EndpointSlice {
    let count = rng.random_range(0..5);
    let endpoints: Vec<_> = (0..count)
        .map(|_| {
            let host = rng.random_range(1..12);
            let address = if v6 {
                format!("fd00:244::{host:x}")
            } else {
                format!("10.244.{}.{host}", rng.random_range(1..3))
            };
            let ready = rng.random_bool(0.7);
            let mut endpoint = json!({
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready || rng.random_bool(0.5),
                    "terminating": !ready && rng.random_bool(0.5)},
                "nodeName": if rng.random_bool(0.5) { "node1" } else { "node2" },
                "zone": if rng.random_bool(0.5) { "a" } else { "b" },
            });
            if rng.random_bool(0.5) {
                endpoint["hints"] = json!({"forZones": [{"name": "a"}]});
            }
            endpoint
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("s{service}")}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn key(name: &str) -> ObjectKey {
    ("ns".to_owned(), name.to_owned())
}

/// One random change to the cluster.
fn change(rng: &mut StdRng, snapshot: &mut Snapshot) {
    let i = rng.random_range(0..SERVICES);
    match rng.random_range(0..10) {
        0 => {
            snapshot.remove_service(&key(&format!("s{i}")));
        }
        1 | 2 => snapshot.put_service(
            key(&format!("s{i}")),
            Arc::new(slim_service(service(rng, i))),
        ),
        3 => {
            let name = format!("s{i}-{}", rng.random_range(0..3));
            snapshot.remove_slice(&key(&name));
        }
        // A slice moving to another Service.
        4 => {
            let name = format!("s{i}-{}", rng.random_range(0..3));
            let other = rng.random_range(0..SERVICES);
            snapshot.put_slice(
                key(&name),
                Arc::new(slim_slice(slice(rng, &name, other, false))),
            );
        }
        _ => {
            let name = format!("s{i}-{}", rng.random_range(0..3));
            let v6 = name.ends_with("-2");
            snapshot.put_slice(key(&name), Arc::new(slim_slice(slice(rng, &name, i, v6))));
        }
    }
}

/// The eBPF maps with ids replaced by what they stand for.
fn resolved(maps: &MapContents) -> BTreeSet<String> {
    let backend = |id: u32| {
        maps.backends
            .get(&id)
            .map_or_else(|| format!("missing {id}"), |b| format!("{:?}", b.parts()))
    };
    let revnat = |index: u32| format!("{:?}", maps.revnat.get(&index));
    let mut out = BTreeSet::new();
    for (key, value) in &maps.services {
        let mut line = format!(
            "{:?} {} {} slot {} scope {} count {} flags {} revnat {}",
            key.ip(),
            key.port(),
            key.proto(),
            key.slot(),
            key.scope(),
            value.count,
            value.flags,
            revnat(value.rev_nat_index)
        );
        if key.slot() == 0 {
            let _ = write!(line, " affinity {}", value.backend_id);
            if value.maglev_table != 0 {
                let (size, ids) = &maps.maglev[&value.maglev_table];
                let names: BTreeSet<String> = ids.iter().map(|id| backend(*id)).collect();
                let _ = write!(line, " maglev {size} {names:?}");
            }
        } else {
            let _ = write!(line, " backend {}", backend(value.backend_id));
        }
        out.insert(line);
    }
    for range in &maps.source_ranges {
        out.insert(format!(
            "range {} of {}",
            range.range(),
            revnat(range.rev_nat_index())
        ));
    }
    let referenced: BTreeSet<u32> = maps
        .services
        .iter()
        .filter(|(k, _)| k.slot() > 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    assert_eq!(
        referenced,
        maps.backends.keys().copied().collect(),
        "every backend is in some slot, and only those"
    );
    out
}

fn ebpf_full(desired: &DesiredState) -> BTreeSet<String> {
    let mut writer = MapWriter::restore(MapContents::default()).unwrap();
    writer
        .apply(&model::diff(&DesiredState::default(), desired))
        .unwrap();
    resolved(writer.store())
}

#[test]
fn random_changes_followed_incrementally_end_where_a_full_rebuild_does() {
    let node = node();
    let cidrs = node.local();
    for seed in 0..6 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut snapshot = Snapshot::default();
        for i in 0..SERVICES {
            snapshot.put_service(
                key(&format!("s{i}")),
                Arc::new(slim_service(service(&mut rng, i))),
            );
            let name = format!("s{i}-0");
            snapshot.put_slice(
                key(&name),
                Arc::new(slim_slice(slice(&mut rng, &name, i, false))),
            );
        }
        let mut tracker = Tracker::new(&snapshot, node.clone());
        // As the agent keeps them (no Service chain), and with every chain's text.
        let mut rendered = Rendered::full(tracker.desired(), &cidrs);
        let mut rendered_text = Rendered::full_text(tracker.desired(), &cidrs);
        let mut writer = MapWriter::restore(MapContents::default()).unwrap();
        writer
            .apply(&model::diff(&DesiredState::default(), tracker.desired()))
            .unwrap();
        let mut zone = ZoneTracker::new(&snapshot, "cluster.local", 30);
        let mut sizes = BTreeMap::new();
        for step in 0..100 {
            let before = snapshot.clone();
            let programmed = tracker.desired().clone();
            for _ in 0..rng.random_range(1..4) {
                change(&mut rng, &mut snapshot);
            }
            let changes = before.changes_to(&snapshot);
            tracker.update(&snapshot, &changes.services);
            zone.update(&snapshot, &changes.services);
            let full = model::build(&snapshot, &node);
            let at = format!("seed {seed} step {step}");
            assert_eq!(*tracker.desired(), full, "{at}: desired state");
            rendered.update(&programmed, tracker.desired());
            rendered.take_changes();
            rendered_text.update(&programmed, tracker.desired());
            assert!(
                rendered.live() == Rendered::full(&full, &cidrs).live(),
                "{at}: nftables tables (fixed chains, sets) differ from a full build"
            );
            assert!(
                rendered_text.live() == ruleset::build(&full, &cidrs),
                "{at}: nftables tables differ from a full build"
            );
            assert!(
                zone.zone()
                    .same_content(&Zone::build(&snapshot, "cluster.local", 30)),
                "{at}: DNS zone"
            );
            let plan = model::diff(&programmed, tracker.desired());
            *sizes
                .entry(plan.upsert.len() + plan.remove.len())
                .or_insert(0) += 1;
            writer.apply(&plan).unwrap();
            assert_eq!(
                resolved(writer.store()),
                ebpf_full(&full),
                "{at}: eBPF maps"
            );
        }
        assert!(
            sizes.keys().any(|&n| n > 0),
            "seed {seed}: the changes changed something: {sizes:?}"
        );
    }
}
