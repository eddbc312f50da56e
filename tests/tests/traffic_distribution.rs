//! End to end, `trafficDistribution: PreferSameNode` on both dataplanes: a pod's
//! connections go to its own node's endpoint (the node hint the EndpointSlice controller
//! writes), fall back to every endpoint when that endpoint leaves (the agent says why,
//! once), and come back when it returns.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::Agent,
    cluster::Cluster,
    manifests,
    scenarios::{self, POD_PORTS},
};

const NODE_LOCAL_IP: &str = "10.96.0.70";

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: node-local, namespace: default}
spec:
  clusterIP: 10.96.0.70
  trafficDistribution: PreferSameNode
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http}]
";

/// The slice as the `EndpointSlice` controller writes it for `PreferSameNode`: each
/// endpoint hinted for its own node and zone. `(pod address, node)` pairs.
fn slice(endpoints: &[(&str, &str)]) -> String {
    let mut text = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: node-local-1\n  namespace: default\n  labels: {kubernetes.io/service-name: node-local}\naddressType: IPv4\n",
    );
    let (name, protocol, port) = POD_PORTS[0];
    let _ = write!(
        text,
        "ports: [{{name: {name}, protocol: {protocol}, port: {port}}}]\nendpoints:\n"
    );
    for (ip, node) in endpoints {
        let _ = write!(
            text,
            "- addresses: [{ip}]\n  nodeName: {node}\n  zone: zone-{node}\n  conditions: {{ready: true}}\n  hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: zone-{node}}}]}}\n"
        );
    }
    text
}

/// The pods that answered `count` connections from the client pod on node1.
fn answered(cluster: &Cluster, count: usize) -> BTreeSet<String> {
    scenarios::requests(cluster, "tcp", &format!("{NODE_LOCAL_IP}:80"), count)
        .iter()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.first(), Some(&"ok"), "{line}");
            fields[1].to_owned()
        })
        .collect()
}

/// Waits until the client's connections are answered by exactly `want`.
fn until_answered_by(cluster: &Cluster, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let since = Instant::now();
    loop {
        let got = answered(cluster, 12);
        if got == want {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{what}: want {want:?}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn prefer_same_node_with_nftables() {
    prefer_same_node("tdn", "nftables");
}

#[test]
fn prefer_same_node_with_ebpf() {
    prefer_same_node("tde", "ebpf");
}

fn prefer_same_node(tag: &str, dataplane: &str) {
    let mut cluster = scenarios::echo_cluster(tag);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "service.yaml", SERVICE);
    let both = [("10.244.1.2", "node1"), ("10.244.2.2", "node2")];
    manifests::write(&dir, "slice.yaml", &slice(&both));
    manifests::write(
        &dir,
        "node1.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-node1}}\n",
    );
    let args = [
        "--manifests".to_owned(),
        dir.display().to_string(),
        "--dataplane".into(),
        dataplane.into(),
        "--cluster-cidr".into(),
        "10.244.0.0/16".into(),
    ];
    let agent = Agent::start_with(&mut cluster, "node1", &args);

    // Every connection of node1's pod goes to node1's endpoint.
    let got = answered(&cluster, 24);
    assert_eq!(got, BTreeSet::from(["web-a".to_owned()]), "{dataplane}");

    // node1's endpoint leaves: no endpoint is hinted for node1 nor its zone, so every
    // endpoint serves, and the agent says why once.
    manifests::write(&dir, "slice.yaml", &slice(&both[1..]));
    until_answered_by(&cluster, &["web-b"], "after node1's endpoint left");
    let log = agent.log_text();
    let said = log.matches("topology hints passed over").count();
    assert_eq!(said, 1, "said once: {log}");
    assert!(
        log.contains("node hints: none for node node1"),
        "the reason is named: {log}"
    );

    // It returns: back to node1's endpoint only.
    manifests::write(&dir, "slice.yaml", &slice(&both));
    until_answered_by(&cluster, &["web-a"], "after node1's endpoint returned");

    // trace names the hint that decided.
    let (code, body) = agent.http_get(
        &cluster,
        "127.0.0.1:10249",
        "/debug/trace?from=10.244.1.10&to=10.96.0.70%3A80%2Ftcp",
    );
    assert_eq!(code, 200, "{body}");
    let trace: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        trace["topology"], "PreferSameNode: endpoints hinted for node node1",
        "{trace}"
    );
}
