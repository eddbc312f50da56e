//! End to end, `--detect-local-mode` on both dataplanes, with no `--cluster-cidr`: pods
//! are told by the interface their traffic arrives on (the testbed's host-side `v<N>`
//! veths) or by the Node object's pod CIDRs, followed as the Node changes. What tells:
//! a pod's connection to its own node's eTP=Local NodePort is short-circuited to every
//! endpoint, a remote pod's is external (Local endpoints only), and a ClusterIP reached
//! from outside is masqueraded while a pod's is not.
use std::time::{Duration, Instant};

use proxy_agent_tests::{
    agent::Agent,
    cluster::Cluster,
    manifests,
    scenarios::{self, POD_PORTS, WEB_A_AND_B},
};

const LAN_CLIENT: &str = "10.100.0.254";
/// A pod on node1 (the echo cluster's client) and one on node2.
const POD1: &str = "10.244.1.10";
const POD2: &str = "10.244.2.10";
const ROUTED_CLUSTER_IP: &str = "10.96.0.64";

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: np-local, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.61
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: np-both, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.65
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30082}]
---
apiVersion: v1
kind: Service
metadata: {name: routed, namespace: default}
spec:
  clusterIP: 10.96.0.64
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http}]
";

/// node1's Node object with `pod_cidrs`.
fn node1(pod_cidrs: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{podCIDR: {first}, podCIDRs: [{pod_cidrs}]}}\n",
        first = pod_cidrs.split(',').next().unwrap_or_default()
    )
}

struct Bed {
    cluster: Cluster,
    agents: Vec<Agent>,
    dir: std::path::PathBuf,
}

/// The echo cluster plus a pod on node2; np-local's only endpoint is web-b on node2,
/// np-both's are web-a and web-b;
/// `routed` (web-a, on node1) is routed to node1 from the LAN. Agents on both nodes.
fn setup(tag: &str, dataplane: &str, detect: &[&str]) -> Bed {
    let mut cluster = scenarios::echo_cluster(tag);
    cluster.add_pod("node2", "client2", 10);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "services.yaml", SERVICES);
    manifests::write(
        &dir,
        "np-local.yaml",
        &manifests::slice("np-local-1", "np-local", &POD_PORTS[..1], &WEB_A_AND_B[1..]),
    );
    manifests::write(
        &dir,
        "np-both.yaml",
        &manifests::slice("np-both-1", "np-both", &POD_PORTS[..1], &WEB_A_AND_B),
    );
    // web-a only: node1 sees the replies whether it masquerades or not.
    manifests::write(
        &dir,
        "routed.yaml",
        &manifests::slice("routed-1", "routed", &POD_PORTS[..1], &WEB_A_AND_B[..1]),
    );
    manifests::write(&dir, "node1.yaml", &node1("10.244.1.0/24"));
    cluster.run_in_lan(&[
        "ip",
        "route",
        "add",
        &format!("{ROUTED_CLUSTER_IP}/32"),
        "via",
        "10.100.0.1",
    ]);
    let mut args = vec![
        "--manifests".to_owned(),
        dir.display().to_string(),
        "--dataplane".into(),
        dataplane.into(),
    ];
    args.extend(detect.iter().map(|&a| a.to_owned()));
    let agents = ["node1", "node2"]
        .iter()
        .map(|node| Agent::start_with(&mut cluster, node, &args))
        .collect();
    Bed {
        cluster,
        agents,
        dir,
    }
}

/// Every connection answered; the peers the pods saw.
fn served(results: &[Result<(String, String), String>], what: &str) -> Vec<String> {
    results
        .iter()
        .map(|r| {
            r.as_ref()
                .unwrap_or_else(|e| panic!("{what}: failed: {e} in {results:?}"))
                .1
                .clone()
        })
        .collect()
}

/// A pod on node2 reaching node1's eTP=Local NodePort arrives through eth0: external
/// unless its address says otherwise, so node1's own endpoint only, its address kept
/// (as a pod it would be sent to every endpoint, and web-b's replies would not come
/// back through node1).
fn remote_pod_is_external(bed: &Bed) {
    let results = scenarios::probe(
        &bed.cluster,
        Some("client2"),
        "tcp",
        POD2,
        "10.100.0.1:30082",
        8,
    );
    let answers: Vec<(String, String)> = results
        .iter()
        .map(|r| {
            r.clone()
                .unwrap_or_else(|e| panic!("remote pod: {e} in {results:?}"))
        })
        .collect();
    assert!(
        answers
            .iter()
            .all(|(pod, peer)| pod == "web-a" && peer == POD2),
        "remote pod: want web-a only, client kept: {answers:?}"
    );
}

/// Every connection silently dropped (eTP=Local with no local endpoint).
fn dropped(results: &[Result<(String, String), String>], what: &str) {
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.contains("TimedOut"))),
        "{what}: want every connection dropped: {results:?}"
    );
}

/// What both modes share: the local pod is short-circuited (keeping its address), the
/// LAN keeps its address on the node with the endpoint and is dropped on the other,
/// a ClusterIP routed in from the LAN is masqueraded and a pod's is not.
fn local_and_external(bed: &Bed, what: &str) {
    let peers = served(
        &scenarios::probe(
            &bed.cluster,
            Some("client"),
            "tcp",
            POD1,
            "10.100.0.1:30081",
            6,
        ),
        what,
    );
    assert!(
        peers.iter().all(|p| p == POD1),
        "{what}: pod short-circuit: {peers:?}"
    );
    dropped(
        &scenarios::probe(&bed.cluster, None, "tcp", LAN_CLIENT, "10.100.0.1:30081", 2),
        what,
    );
    let peers = served(
        &scenarios::probe(&bed.cluster, None, "tcp", LAN_CLIENT, "10.100.0.2:30081", 4),
        what,
    );
    assert!(
        peers.iter().all(|p| p == LAN_CLIENT),
        "{what}: eTP=Local keeps the client: {peers:?}"
    );
    let to = format!("{ROUTED_CLUSTER_IP}:80");
    let peers = served(
        &scenarios::probe(&bed.cluster, None, "tcp", LAN_CLIENT, &to, 12),
        what,
    );
    assert!(
        !peers.iter().any(|p| p == LAN_CLIENT),
        "{what}: a ClusterIP from outside must be masqueraded: {peers:?}"
    );
    let peers = served(
        &scenarios::probe(&bed.cluster, Some("client"), "tcp", POD1, &to, 12),
        what,
    );
    assert!(
        peers.iter().all(|p| p == POD1),
        "{what}: a pod's ClusterIP traffic keeps its address: {peers:?}"
    );
}

#[test]
fn interface_name_prefix_tells_pods_with_nftables() {
    interface_name_prefix("dln", "nftables");
}

#[test]
fn interface_name_prefix_tells_pods_with_ebpf() {
    interface_name_prefix("dle", "ebpf");
}

fn interface_name_prefix(tag: &str, dataplane: &str) {
    let bed = setup(
        tag,
        dataplane,
        &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "v",
        ],
    );
    local_and_external(&bed, dataplane);
    // By interface, whatever its address: --cluster-cidr would call it a pod.
    remote_pod_is_external(&bed);
    // `trace` decides as the dataplane does, by the interface given.
    let trace = |iif: &str| {
        let path = format!("/debug/trace?from={POD1}&to=10.100.0.1%3A30081%2Ftcp{iif}");
        let (code, body) = bed.agents[0].http_get(&bed.cluster, "127.0.0.1:10249", &path);
        assert_eq!(code, 200, "{body}");
        let trace: serde_json::Value = serde_json::from_str(&body).expect("trace JSON");
        (
            trace["client"].as_str().unwrap_or_default().to_owned(),
            trace["verdict"].as_str().unwrap_or_default().to_owned(),
        )
    };
    assert_eq!(trace("&iif=v10").0, "Pod");
    assert_eq!(
        trace("&iif=eth0"),
        ("External".to_owned(), "DROP".to_owned())
    );
    let log = bed.agents[0].log_text();
    assert!(
        log.contains("InterfaceNamePrefix") && log.contains("arriving on v*"),
        "{log}"
    );
}

#[test]
fn node_cidr_follows_the_node_object_with_nftables() {
    node_cidr("dcn", "nftables");
}

#[test]
fn node_cidr_follows_the_node_object_with_ebpf() {
    node_cidr("dce", "ebpf");
}

fn node_cidr(tag: &str, dataplane: &str) {
    let bed = setup(tag, dataplane, &["--detect-local-mode", "NodeCIDR"]);
    local_and_external(&bed, dataplane);
    // node2's pod is outside node1's pod CIDR: external there.
    remote_pod_is_external(&bed);
    // The Node's pod CIDRs change (to the LAN's, for the test): node1 follows, so the
    // LAN client is a pod there and its ClusterIP traffic keeps its address; then back.
    for (cidrs, lan_is_pod) in [("10.100.0.0/24", true), ("10.244.1.0/24", false)] {
        manifests::write(&bed.dir, "node1.yaml", &node1(cidrs));
        let since = Instant::now();
        loop {
            let to = format!("{ROUTED_CLUSTER_IP}:80");
            let peers = served(
                &scenarios::probe(&bed.cluster, None, "tcp", LAN_CLIENT, &to, 1),
                "routed",
            );
            if (peers[0] == LAN_CLIENT) == lan_is_pod {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "node1 did not follow its Node's pod CIDRs {cidrs} in 5 s: {peers:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    local_and_external(&bed, dataplane);
}
