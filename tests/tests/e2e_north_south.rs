//! End to end, north-south: clients outside the cluster (the LAN namespace) reach
//! NodePorts, external IPs and load-balancer IPs on both nodes, each served by its own
//! agent; checks who answers, what source address the backend saw, and what is dropped.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{sample_sum, testpod_bin, Agent},
    cluster::Cluster,
    manifests::{self, Endpoint},
    scenarios::{self, Probed, POD_PORTS, WEB_A_AND_B},
};

/// The echo pods' ports, with the line-echo port long-lived connections use.
const PORTS: [(&str, &str, u16); 3] = [POD_PORTS[0], POD_PORTS[1], ("echo", "TCP", 7070)];

const CLIENT: &str = "10.100.0.254";
/// A second LAN address outside the load balancer's source ranges.
const OTHER_CLIENT: &str = "10.100.0.253";
const EXTERNAL_IP: &str = "10.100.0.200";
const LB_IP: &str = "10.100.0.201";

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: np-cluster, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080},
          {name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053},
          {name: echo, protocol: TCP, port: 7070, targetPort: echo, nodePort: 30070}]
---
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
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.62
  externalIPs: [10.100.0.200]
  loadBalancerSourceRanges: [10.100.0.254/32]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30082}]
status:
  loadBalancer:
    ingress: [{ip: 10.100.0.201}]
---
apiVersion: v1
kind: Service
metadata: {name: np-sticky, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.63
  sessionAffinity: ClientIP
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30083}]
";

struct Bed {
    cluster: Cluster,
    agents: Vec<Agent>,
    dir: std::path::PathBuf,
}

/// The echo cluster with agents on both nodes: np-cluster and lb have web-a (node1)
/// and web-b (node2); np-local has web-a only, so node2 has no local endpoint.
fn setup(tag: &str, dataplane: &str) -> Bed {
    let mut cluster = scenarios::echo_cluster(tag);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "services.yaml", SERVICES);
    let both = WEB_A_AND_B;
    for (slice, service, endpoints) in [
        ("np-cluster-1", "np-cluster", &both[..]),
        ("lb-1", "lb", &both[..]),
        ("np-sticky-1", "np-sticky", &both[..]),
        ("np-local-1", "np-local", &both[..1]),
    ] {
        manifests::write(
            &dir,
            &format!("{slice}.yaml"),
            &manifests::slice(slice, service, &PORTS, endpoints),
        );
    }
    // The outside world: a second client address, and routes to the external and
    // load-balancer IPs through node1 (as an upstream router or a BGP speaker would).
    cluster.run_in_lan(&[
        "ip",
        "addr",
        "add",
        &format!("{OTHER_CLIENT}/24"),
        "dev",
        "br0",
    ]);
    for ip in [EXTERNAL_IP, LB_IP] {
        cluster.run_in_lan(&[
            "ip",
            "route",
            "add",
            &format!("{ip}/32"),
            "via",
            "10.100.0.1",
        ]);
    }
    let args = [
        "--manifests".to_owned(),
        dir.display().to_string(),
        "--dataplane".into(),
        dataplane.into(),
        "--cluster-cidr".into(),
        "10.244.0.0/16".into(),
    ];
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

/// `count` connections from `source` in the LAN to `to` (`scenarios::probe`).
fn probe(bed: &Bed, proto: &str, source: &str, to: &str, count: usize) -> Vec<Probed> {
    scenarios::probe(&bed.cluster, None, proto, source, to, count)
}

/// Every connection answered: the pods that answered and the client addresses they saw.
fn answered(results: &[Result<(String, String), String>]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut pods = BTreeSet::new();
    let mut peers = BTreeSet::new();
    for result in results {
        let (pod, peer) = result
            .as_ref()
            .unwrap_or_else(|e| panic!("failed: {e} in {results:?}"));
        pods.insert(pod.clone());
        peers.insert(peer.clone());
    }
    (pods, peers)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn north_south_with_nftables() {
    north_south("ns", "nftables");
}

#[test]
fn north_south_with_ebpf() {
    north_south("nse", "ebpf");
}

fn north_south(tag: &str, dataplane: &str) {
    let bed = setup(tag, dataplane);

    // externalTrafficPolicy: Cluster, on either node: every endpoint, and the backend
    // sees a node address (masquerade), never the client.
    for node_ip in ["10.100.0.1", "10.100.0.2"] {
        let (pods, peers) = answered(&probe(&bed, "tcp", CLIENT, &format!("{node_ip}:30080"), 24));
        assert_eq!(pods, set(&["web-a", "web-b"]), "NodePort on {node_ip}");
        assert!(
            !peers.contains(CLIENT),
            "client address leaked through masquerade: {peers:?}"
        );
        let (pods, _) = answered(&probe(&bed, "udp", CLIENT, &format!("{node_ip}:30053"), 24));
        assert_eq!(pods, set(&["web-a", "web-b"]), "UDP NodePort on {node_ip}");
    }

    // externalTrafficPolicy: Local: node1's own endpoint only, with the client address
    // preserved; node2 has none and drops.
    let (pods, peers) = answered(&probe(&bed, "tcp", CLIENT, "10.100.0.1:30081", 10));
    assert_eq!((pods, peers), (set(&["web-a"]), set(&[CLIENT])));
    let dropped = probe(&bed, "tcp", CLIENT, "10.100.0.2:30081", 2);
    assert!(
        dropped
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.contains("TimedOut"))),
        "eTP=Local without a local endpoint must drop (time out, not refuse): {dropped:?}"
    );

    // Load balancers ask each node's healthCheckNodePort whether it has local endpoints.
    let testpod = testpod_bin().display().to_string();
    for (node_ip, want_code, want_count) in [("10.100.0.1", "200", 1), ("10.100.0.2", "503", 0)] {
        let out = bed.cluster.run_in_lan(&[
            &testpod,
            "http-get",
            &format!("{node_ip}:32000"),
            "/anything",
        ]);
        let (code, body) = out.trim().split_once(' ').unwrap_or_default();
        assert_eq!(code, want_code, "{node_ip}: {out}");
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(body["service"]["namespace"], "default");
        assert_eq!(body["service"]["name"], "np-local");
        assert_eq!(body["localEndpoints"], want_count, "{body}");
        assert_eq!(body["serviceProxyHealthy"], true, "{body}");
    }

    // External IP and load-balancer IP, routed to node1 from outside.
    for ip in [EXTERNAL_IP, LB_IP] {
        let (pods, _) = answered(&probe(&bed, "tcp", CLIENT, &format!("{ip}:80"), 24));
        assert_eq!(pods, set(&["web-a", "web-b"]), "{ip}");
    }
    // loadBalancerSourceRanges filter the load-balancer IP only.
    let filtered = probe(&bed, "tcp", OTHER_CLIENT, &format!("{LB_IP}:80"), 2);
    assert!(
        filtered.iter().all(Result::is_err),
        "a client outside loadBalancerSourceRanges reached the LB IP: {filtered:?}"
    );
    answered(&probe(
        &bed,
        "tcp",
        OTHER_CLIENT,
        &format!("{EXTERNAL_IP}:80"),
        4,
    ));
    // Each drop is counted by reason on the node that took it.
    let drops = |agent: usize, reason: &str| -> f64 {
        let (_, text) = bed.agents[agent].http_get(&bed.cluster, "127.0.0.1:10249", "/metrics");
        let reason = format!("reason=\"{reason}\"");
        sample_sum(&text, "proxyagent_datapath_drops_total", &[&reason])
    };
    assert!(
        drops(0, "source_range") >= 2.0,
        "source-range drops not counted"
    );
    assert!(
        drops(1, "no_local_endpoints") >= 2.0,
        "eTP=Local drops not counted"
    );
    if dataplane == "ebpf" {
        // Every flow from outside was a decision of the per-packet program, per backend.
        let (_, text) = bed.agents[0].http_get(&bed.cluster, "127.0.0.1:10249", "/metrics");
        let flows = sample_sum(
            &text,
            "proxyagent_datapath_decisions_total",
            &["hook=\"tc_ingress\"", "service=\"default/np-cluster:http\""],
        );
        assert!(
            flows >= 24.0,
            "NodePort flows on node1 not counted: {flows}"
        );
    }

    // An address added to the node later serves NodePorts within a second (rtnetlink).
    let _ = bed.cluster.run_on_node(
        "node1",
        &["ip", "addr", "add", "10.100.0.11/24", "dev", "eth0"],
    );
    let added = Instant::now();
    loop {
        let result = probe(&bed, "tcp", CLIENT, "10.100.0.11:30080", 1);
        if result[0].is_ok() {
            break;
        }
        assert!(
            added.elapsed() < Duration::from_secs(1),
            "NodePort not served on a new node address after 1 s: {result:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    sticky_clients(&bed);
    autoscaler_taint(&bed);
}

/// `sessionAffinity: ClientIP` from outside: every connection of one client goes to
/// one backend, on either node (masqueraded or not, the client address is the key).
fn sticky_clients(bed: &Bed) {
    for node_ip in ["10.100.0.1", "10.100.0.2"] {
        let (pods, _) = answered(&probe(bed, "tcp", CLIENT, &format!("{node_ip}:30083"), 20));
        assert_eq!(
            pods.len(),
            1,
            "20 connections of one client via {node_ip}: {pods:?}"
        );
    }
}

#[test]
fn a_nodeport_udp_flow_moves_off_a_removed_endpoint_with_ebpf() {
    nodeport_udp_flow_moves("nue", "ebpf");
}

#[test]
fn a_nodeport_udp_flow_moves_off_a_removed_endpoint_with_nftables() {
    nodeport_udp_flow_moves("nun", "nftables");
}

/// One UDP flow from outside (a fixed source port) to node1's NodePort, pinned to a
/// backend; that backend leaves the Service but keeps running; the flow's next
/// datagrams reach the other backend instead of vanishing into the removed one.
fn nodeport_udp_flow_moves(tag: &str, dataplane: &str) {
    let bed = setup(tag, dataplane);
    let testpod = testpod_bin().display().to_string();
    let flow = |count: usize| -> Vec<String> {
        let to = "10.100.0.1:30053";
        let out = bed
            .cluster
            .run_in_lan(&[&testpod, "udp-from", "40053", to, &count.to_string()]);
        scenarios::udp_flow_pods(&out)
    };
    let first = flow(5);
    assert!(
        first.iter().all(|p| *p == first[0]),
        "one flow, one backend: {first:?}"
    );
    let (gone, survivor) = if first[0] == "web-a" {
        ("10.244.1.2", "web-b")
    } else {
        ("10.244.2.2", "web-a")
    };
    if dataplane == "ebpf" {
        // `dump conntrack` shows the flow the per-packet program remembers.
        let bin = proxy_agent_tests::agent::agent_bin().display().to_string();
        let bpffs = bed.agents[0].bpffs.display().to_string();
        let out = bed.cluster.run_on_node(
            "node1",
            &[&bin, "dump", "conntrack", "--json", "--bpffs", &bpffs],
        );
        let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON rows");
        let flow = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["table"] == "packet" && r["client"] == format!("{CLIENT}:40053"))
            .unwrap_or_else(|| panic!("the UDP flow is not in dump conntrack: {out}"));
        assert_eq!(flow["service"], "default/np-cluster:dns", "{flow}");
        assert_eq!(flow["backend"], format!("{gone}:5353"), "{flow}");
        assert_eq!(flow["state"], "open,masquerade", "{flow}");
    }
    let endpoints: Vec<Endpoint> = [("10.244.1.2", "node1"), ("10.244.2.2", "node2")]
        .into_iter()
        .map(|(ip, node)| Endpoint {
            ip,
            ready: ip != gone,
            node,
        })
        .collect();
    manifests::write(
        &bed.dir,
        "np-cluster-1.yaml",
        &manifests::slice("np-cluster-1", "np-cluster", &PORTS, &endpoints),
    );
    let started = Instant::now();
    while flow(1)[0] != survivor {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the flow still reaches the removed endpoint {} after 3 s\n{}",
            first[0],
            bed.agents[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = flow(5);
    assert!(
        after.iter().all(|p| p == survivor),
        "the flow went back to the removed endpoint {}: {after:?}",
        first[0]
    );
    println!(
        "{dataplane}: flow moved from {} to {survivor} after {:?}",
        first[0],
        started.elapsed()
    );
}

/// The autoscaler taints node2 for removal: its /healthz fails (load balancers drain
/// it) while /livez stays 200 (nothing to restart).
fn autoscaler_taint(bed: &Bed) {
    manifests::write(
        &bed.dir,
        "node2.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node2}\nspec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]\n",
    );
    let agent2 = &bed.agents[1];
    let tainted = Instant::now();
    while agent2.healthz(&bed.cluster).0 != 503 {
        assert!(
            tainted.elapsed() < Duration::from_secs(2),
            "{}",
            agent2.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = agent2.http_get(&bed.cluster, "127.0.0.1:10256", "/livez");
    assert_eq!(code, 200, "{body}");
    assert_eq!(bed.agents[0].healthz(&bed.cluster).0, 200);
}

#[test]
fn restarts_and_upgrades_drop_no_north_south_connection_with_ebpf() {
    restarts_drop_nothing("nre", "ebpf");
}

#[test]
fn restarts_and_upgrades_drop_no_north_south_connection_with_nftables() {
    restarts_drop_nothing("nrn", "nftables");
}

/// A long-lived connection and a stream of new ones through node1's NodePorts from
/// outside, across a SIGTERM + restart of node1's agent and then an upgrade to another
/// binary: no exchange and no connection may fail.
fn restarts_drop_nothing(tag: &str, dataplane: &str) {
    let mut bed = setup(tag, dataplane);
    let (held, stream) = scenarios::restart_under_load(
        &mut bed.cluster,
        &bed.agents[0],
        "10.100.0.1:30070",
        "10.100.0.1:30080",
    );
    println!("{dataplane}: long-lived connection {held}; new connections {stream}");
}
