//! End to end, `--nodeport-addresses primary` on both dataplanes: NodePorts are served on
//! the Node object's primary address (its first InternalIP of the family) and not on the
//! node's other addresses; the Node changing its primary address moves them.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{testpod_bin, Agent},
    cluster::Cluster,
    manifests,
    scenarios::{self, POD_PORTS, WEB_A_AND_B},
};

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080}]
";

/// node1 whose `InternalIP` addresses are `internal` (the first is the primary).
fn node1(internal: &[&str]) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nstatus:\n  addresses:\n",
    );
    for ip in internal {
        let _ = writeln!(text, "  - {{type: InternalIP, address: {ip}}}");
    }
    text
}

/// Whether a connection from the LAN to `to` is answered.
fn served(cluster: &Cluster, to: &str) -> bool {
    let testpod = testpod_bin().display().to_string();
    let out = cluster.run_in_lan(&[&testpod, "probe", "tcp", "10.100.0.254", to, "1", "500"]);
    out.starts_with("ok ")
}

/// Waits until `served` NodePort addresses answer and `refused` ones do not.
fn until(cluster: &Cluster, served_on: &str, not_on: &str, what: &str) {
    let since = Instant::now();
    loop {
        let on = served(cluster, &format!("{served_on}:30080"));
        let off = !served(cluster, &format!("{not_on}:30080"));
        if on && off {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{what}: served on {served_on}: {on}, not on {not_on}: {off}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn primary_nodeport_addresses_with_nftables() {
    primary("npn", "nftables");
}

#[test]
fn primary_nodeport_addresses_with_ebpf() {
    primary("npe", "ebpf");
}

fn primary(tag: &str, dataplane: &str) {
    let mut cluster = scenarios::echo_cluster(tag);
    // A second address on node1's LAN interface, which NodePorts would serve by default.
    let _ = cluster.run_on_node(
        "node1",
        &["ip", "addr", "add", "10.100.0.11/24", "dev", "eth0"],
    );
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "service.yaml", SERVICE);
    manifests::write(
        &dir,
        "slice.yaml",
        &manifests::slice("np-1", "np", &POD_PORTS[..1], &WEB_A_AND_B),
    );
    manifests::write(&dir, "node1.yaml", &node1(&["10.100.0.1", "10.100.0.11"]));
    let args = [
        "--manifests".to_owned(),
        dir.display().to_string(),
        "--dataplane".into(),
        dataplane.into(),
        "--nodeport-addresses".into(),
        "primary".into(),
    ];
    let _agent = Agent::start_with(&mut cluster, "node1", &args);
    until(&cluster, "10.100.0.1", "10.100.0.11", "primary 10.100.0.1");
    // The Node's primary address changes: the NodePorts follow it.
    manifests::write(&dir, "node1.yaml", &node1(&["10.100.0.11", "10.100.0.1"]));
    until(&cluster, "10.100.0.11", "10.100.0.1", "primary 10.100.0.11");
}
