//! `cargo xtask demo`: brings up the simulated cluster the bundled manifests describe
//! (nodes from `v1/Node`, pods from `EndpointSlice` endpoints), runs the agent on the
//! first node, sends requests to each `ClusterIP` from a client pod there, and prints
//! which pod answered.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use proxy_agent::{model::Snapshot, source::manifests::ManifestsDir};
use proxy_agent_tests::{
    agent::{testpod_bin, Agent},
    cluster::Cluster,
};

const REQUESTS: usize = 30;
const CLIENT_HOST: u8 = 100;

fn last_octet(ip: &str) -> Option<u8> {
    ip.parse::<Ipv4Addr>().ok().map(|ip| ip.octets()[3])
}

/// (node name, index) from each Node's `InternalIP`.
fn nodes(snapshot: &Snapshot) -> Vec<(String, u8)> {
    snapshot
        .nodes()
        .iter()
        .filter_map(|(name, node)| {
            let addresses = node.status.as_ref()?.addresses.as_ref()?;
            let ip = addresses.iter().find(|a| a.type_ == "InternalIP")?;
            Some((name.clone(), last_octet(&ip.address)?))
        })
        .collect()
}

/// (pod, node, host octet, listeners) from the `EndpointSlice`s.
fn pods(snapshot: &Snapshot) -> BTreeMap<String, (String, u8, Vec<String>)> {
    let mut pods = BTreeMap::new();
    for slice in snapshot.endpoint_slices().values() {
        let listeners: Vec<String> = slice
            .ports
            .iter()
            .filter_map(|p| {
                Some(format!(
                    "{}:{}",
                    p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                    p.port?
                ))
            })
            .collect();
        for endpoint in &slice.endpoints {
            let (ip, Some(node)) = (endpoint.address.to_string(), endpoint.node_name()) else {
                continue;
            };
            let node = node.to_owned();
            let name = format!("pod-{ip}");
            if let Some(host) = last_octet(&ip) {
                let entry = pods.entry(name).or_insert((node, host, Vec::new()));
                entry.2.extend(listeners.iter().cloned());
            }
        }
    }
    pods
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "examples/demo".into()),
    );
    let mut manifests = ManifestsDir::new(&dir);
    manifests.reload().expect("read the demo manifests");
    let snapshot = manifests.snapshot();
    let mut cluster = Cluster::new("demo");
    let nodes = nodes(&snapshot);
    for (name, index) in &nodes {
        cluster.add_node(name, *index);
    }
    let testpod = testpod_bin().display().to_string();
    for (pod, (node, host, listeners)) in pods(&snapshot) {
        cluster.add_pod(&node, &pod, host);
        let mut args = vec![testpod.as_str(), "serve", pod.as_str()];
        args.extend(listeners.iter().map(String::as_str));
        cluster.spawn_in_pod(&pod, &args);
    }
    let first = nodes.first().expect("the manifests name no Node").0.clone();
    cluster.add_pod(&first, "client", CLIENT_HOST);
    let _agent = Agent::start(&mut cluster, &first, &dir);
    println!(
        "agent running on {first}; client pod 10.244.{}.{CLIENT_HOST}",
        cluster.node(&first).index
    );
    for ((ns, name), service) in snapshot.services() {
        let Some(ip) = service.cluster_ips.iter().find(|ip| ip.is_ipv4()) else {
            continue;
        };
        for port in &service.ports {
            let proto = port.protocol.to_string().to_lowercase();
            let to = format!("{ip}:{}", port.port);
            println!(
                "\n{REQUESTS} {} requests to {ns}/{name} at {to}:",
                proto.to_uppercase()
            );
            let out = cluster.run_in_pod(
                "client",
                &[&testpod, "request", &proto, &to, &REQUESTS.to_string()],
            );
            let mut totals: BTreeMap<String, usize> = BTreeMap::new();
            for (i, line) in out.lines().enumerate() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let who = if fields.first() == Some(&"ok") {
                    fields[1].to_owned()
                } else {
                    line.to_owned()
                };
                println!(
                    "  #{:<3} answered by {who:<8} (the client saw {})",
                    i + 1,
                    fields.get(3).unwrap_or(&"-")
                );
                *totals.entry(who).or_insert(0) += 1;
            }
            println!(
                "  totals: {}",
                totals
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    println!("\ntearing down the simulated cluster");
}
