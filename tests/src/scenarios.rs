//! Ready-made simulated clusters shared by the end-to-end tests.
use crate::{agent::testpod_bin, cluster::Cluster};

/// The echo Service's address and ports, and its pods' ports.
pub const ECHO_IP: &str = "10.96.0.50";
pub const SVC_PORTS: [(&str, &str, u16); 2] = [("http", "TCP", 80), ("dns", "UDP", 53)];
pub const POD_PORTS: [(&str, &str, u16); 2] = [("http", "TCP", 8080), ("dns", "UDP", 5353)];

/// Two nodes; echo pods web-a (10.244.1.2, node1), web-b (10.244.2.2, node2) and
/// web-c (10.244.2.3, node2) answering on TCP 8080 and UDP 5353; a client pod
/// (10.244.1.10) on node1. No agent yet.
#[must_use]
pub fn echo_cluster(tag: &str) -> Cluster {
    let mut cluster = Cluster::new(tag);
    cluster.add_node("node1", 1);
    cluster.add_node("node2", 2);
    let testpod = testpod_bin().display().to_string();
    for (node, pod, host) in [
        ("node1", "web-a", 2),
        ("node2", "web-b", 2),
        ("node2", "web-c", 3),
    ] {
        cluster.add_pod(node, pod, host);
        cluster.spawn_in_pod(pod, &[&testpod, "serve", pod, "tcp:8080", "udp:5353"]);
    }
    cluster.add_pod("node1", "client", 10);
    cluster
}

/// `count` requests from the client pod; one output line each.
#[must_use]
pub fn requests(cluster: &Cluster, proto: &str, to: &str, count: usize) -> Vec<String> {
    let testpod = testpod_bin().display().to_string();
    cluster
        .run_in_pod(
            "client",
            &[&testpod, "request", proto, to, &count.to_string()],
        )
        .lines()
        .map(str::to_owned)
        .collect()
}
