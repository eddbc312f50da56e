//! End to end over IPv6: a dual-stack Service's IPv6 ClusterIP from a pod (the socket
//! LB's connect6/sendmsg6/recvmsg6/getpeername6, or nftables' ip6 rules), an IPv4
//! ClusterIP asked for through a dual-stack socket (`::ffff:a.b.c.d`), the IPv6
//! NodePort from outside with either external traffic policy, its
//! `loadBalancerSourceRanges`, a connected UDP socket leaving a removed endpoint, and
//! IPv6 connections across agent restarts.
use std::collections::BTreeSet;

use proxy_agent_tests::{
    agent::{sample_sum, testpod_bin, Agent},
    cluster::Cluster,
    manifests, scenarios,
};

const CLUSTER_IP6: &str = "fd00:10:96::70";
const CLUSTER_IP4: &str = "10.96.0.70";
const CLIENT6: &str = "fd00:10:244:1::a";

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: fd00:10:96::70
  clusterIPs: [fd00:10:96::70, 10.96.0.70]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30090},
          {name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30091},
          {name: echo, protocol: TCP, port: 7070, targetPort: echo, nodePort: 30093}]
---
apiVersion: v1
kind: Service
metadata: {name: dual-local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: fd00:10:96::71
  clusterIPs: [fd00:10:96::71, 10.96.0.71]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30092}]
---
apiVersion: v1
kind: Service
metadata: {name: dual-lb, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: fd00:10:96::72
  clusterIPs: [fd00:10:96::72, 10.96.0.72]
  loadBalancerSourceRanges: [\"fd00:10:100::254/128\", 10.100.0.254/32]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30094}]
status:
  loadBalancer:
    ingress: [{ip: \"fd00:10:100::200\"}, {ip: 10.100.0.200}]
";

/// The pods' ports, with the echo port the restart test holds a connection on.
const PORTS: [(&str, &str, u16); 3] = [
    ("http", "TCP", 8080),
    ("dns", "UDP", 5353),
    ("echo", "TCP", 7070),
];

/// The echo cluster with a dual-stack Service over web-a (node1) and web-b (node2),
/// and an agent on node1.
fn setup(tag: &str, dataplane: &str) -> (Cluster, Agent) {
    let mut cluster = scenarios::echo_cluster(tag);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "dual.yaml", SERVICE);
    let v4 = dual_slice(true, true);
    manifests::write(&dir, "dual-4.yaml", &v4);
    let v6 = to_ipv6(&v4);
    manifests::write(&dir, "dual-6.yaml", &v6);
    // A second LAN client outside the source ranges, and the load-balancer IP routed
    // to node1 (as an upstream router would).
    cluster.run_in_lan(&[
        "ip",
        "addr",
        "add",
        "fd00:10:100::253/64",
        "dev",
        "br0",
        "nodad",
    ]);
    cluster.run_in_lan(&[
        "ip",
        "route",
        "add",
        "fd00:10:100::200/128",
        "via",
        "fd00:10:100::1",
    ]);
    for service in ["dual-local", "dual-lb"] {
        for (family, text) in [("4", &v4), ("6", &v6)] {
            let copy = text
                .replace("name: dual-", &format!("name: {service}-"))
                .replace("service-name: dual", &format!("service-name: {service}"));
            manifests::write(&dir, &format!("{service}-{family}.yaml"), &copy);
        }
    }
    let agent = Agent::start_with(
        &mut cluster,
        "node1",
        &[
            "--manifests".into(),
            dir.display().to_string(),
            "--dataplane".into(),
            dataplane.into(),
            "--cluster-cidr".into(),
            "10.244.0.0/16,fd00:10:244::/48".into(),
        ],
    );
    (cluster, agent)
}

/// The IPv4 slice of `dual`: web-a (node1) and web-b (node2), each ready or not.
fn dual_slice(web_a: bool, web_b: bool) -> String {
    manifests::slice(
        "dual-4",
        "dual",
        &PORTS,
        &[
            manifests::Endpoint {
                ip: "10.244.1.2",
                ready: web_a,
                node: "node1",
            },
            manifests::Endpoint {
                ip: "10.244.2.2",
                ready: web_b,
                node: "node2",
            },
        ],
    )
}

/// The same endpoints' IPv6 slice.
fn to_ipv6(v4: &str) -> String {
    v4.replace("name: dual-4", "name: dual-6")
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace("10.244.1.2", "fd00:10:244:1::2")
        .replace("10.244.2.2", "fd00:10:244:2::2")
}

/// `count` requests from the client pod to `to`: the pods that answered; every one
/// must have been answered, seen by the server as `client` and by the client as `to`.
fn answered(cluster: &Cluster, proto: &str, to: &str, client: &str) -> BTreeSet<String> {
    let mut pods = BTreeSet::new();
    for line in scenarios::requests(cluster, proto, to, 20) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields.first(),
            Some(&"ok"),
            "request to {to} failed: {line}"
        );
        let seen_client = fields[2].rsplit_once(':').map_or(fields[2], |(ip, _)| ip);
        assert_eq!(seen_client, client, "server saw another client: {line}");
        assert_eq!(
            fields[3], to,
            "the client saw the backend, not the Service: {line}"
        );
        pods.insert(fields[1].to_owned());
    }
    pods
}

/// The LAN client's IPv6 address, as a server prints it.
const LAN_CLIENT6: &str = "[fd00:10:100::254]";

/// 20 TCP connections from the LAN client to `to`: the pods that answered, the client
/// addresses they saw, and how many distinct client ports (a port the kernel hands out
/// twice continues the first one's flow); every connection must be answered.
fn from_outside(cluster: &Cluster, to: &str) -> (BTreeSet<String>, BTreeSet<String>, u32) {
    let out = probe_from(cluster, "fd00:10:100::254", to, 20);
    let mut pods = BTreeSet::new();
    let mut peers = BTreeSet::new();
    let mut flows = BTreeSet::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields.first(),
            Some(&"ok"),
            "{to} from outside failed: {out}"
        );
        pods.insert(fields[1].to_owned());
        let peer = fields[2].rsplit_once(':').map_or(fields[2], |(ip, _)| ip);
        peers.insert(peer.to_owned());
        flows.insert(fields[2].to_owned());
    }
    (pods, peers, u32::try_from(flows.len()).unwrap_or(u32::MAX))
}

/// `count` TCP connections from `source` in the LAN to `to`: the probe's lines.
fn probe_from(cluster: &Cluster, source: &str, to: &str, count: u32) -> String {
    let testpod = testpod_bin().display().to_string();
    cluster.run_in_lan(&[
        &testpod,
        "probe",
        "tcp",
        source,
        to,
        &count.to_string(),
        "700",
    ])
}

fn both() -> BTreeSet<String> {
    ["web-a", "web-b"].iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn ipv6_cluster_ip_and_nodeport_with_ebpf() {
    ipv6("v6e", "ebpf");
}

#[test]
fn ipv6_cluster_ip_and_nodeport_with_nftables() {
    ipv6("v6n", "nftables");
}

fn ipv6(tag: &str, dataplane: &str) {
    let (cluster, agent) = setup(tag, dataplane);
    let client6 = format!("[{CLIENT6}]");
    let tcp = format!("[{CLUSTER_IP6}]:80");
    assert_eq!(
        answered(&cluster, "tcp", &tcp, &client6),
        both(),
        "TCP over IPv6"
    );
    let udp = format!("[{CLUSTER_IP6}]:53");
    for mode in ["udp", "udp-connected"] {
        assert_eq!(
            answered(&cluster, mode, &udp, &client6),
            both(),
            "{mode} over IPv6"
        );
    }
    // A dual-stack socket asking for the IPv4 ClusterIP as an IPv4-mapped address.
    let mapped = format!("[::ffff:{CLUSTER_IP4}]:80");
    assert_eq!(
        answered(&cluster, "tcp", &mapped, "10.244.1.10"),
        both(),
        "IPv4-mapped ClusterIP"
    );
    if dataplane == "ebpf" {
        let (_, text) = agent.http_get(&cluster, "127.0.0.1:10249", "/metrics");
        for hook in ["connect6", "sendmsg6"] {
            let label = format!("hook=\"{hook}\"");
            let decisions = sample_sum(&text, "proxyagent_datapath_decisions_total", &[&label]);
            assert!(
                decisions >= 20.0,
                "{hook} decisions not counted: {decisions}"
            );
        }
    }
    // The IPv6 NodePort from outside the cluster reaches both backends.
    let (pods, peers, flows) = from_outside(&cluster, "[fd00:10:100::1]:30090");
    assert_eq!(pods, both(), "IPv6 NodePort from outside");
    assert!(
        !peers.contains(LAN_CLIENT6),
        "eTP=Cluster must masquerade: {peers:?}"
    );
    // externalTrafficPolicy: Local: node1's own endpoint only, the client address kept.
    let (pods, peers, _) = from_outside(&cluster, "[fd00:10:100::1]:30092");
    assert_eq!(pods, BTreeSet::from(["web-a".to_owned()]), "IPv6 eTP=Local");
    assert_eq!(
        peers,
        BTreeSet::from([LAN_CLIENT6.to_owned()]),
        "IPv6 eTP=Local keeps the client address"
    );
    if dataplane == "ebpf" {
        // Those were the per-packet program's decisions (web-b answering at all shows
        // the masquerade: node2 would otherwise reply straight to the client).
        let (_, text) = agent.http_get(&cluster, "127.0.0.1:10249", "/metrics");
        let decisions = sample_sum(
            &text,
            "proxyagent_datapath_decisions_total",
            &["hook=\"tc_ingress\"", "service=\"default/dual:http\""],
        );
        assert!(
            decisions >= f64::from(flows),
            "IPv6 NodePort flows not counted: {decisions} decisions for {flows} flows"
        );
    }
    // loadBalancerSourceRanges: the IPv6 range admits the client; another LAN address
    // is dropped (the IPv4 range beside it does not apply to IPv6).
    let (pods, _, _) = from_outside(&cluster, "[fd00:10:100::200]:80");
    assert_eq!(pods, both(), "IPv6 load-balancer IP from an allowed client");
    let filtered = probe_from(&cluster, "fd00:10:100::253", "[fd00:10:100::200]:80", 2);
    assert!(
        filtered.lines().all(|l| l.starts_with("err")),
        "a client outside loadBalancerSourceRanges reached the IPv6 LB IP: {filtered}"
    );
    // Last, as it takes a backend away: a connected UDP socket leaves it.
    ipv6_connected_udp(&cluster, &agent, dataplane);
}

/// A connected UDP socket to the IPv6 ClusterIP whose backend leaves: as over IPv4,
/// it reaches the other backend within two seconds (eBPF: the socket is destroyed
/// through the IPv6 per-socket map and an IPv6 `sock_diag` dump).
fn ipv6_connected_udp(cluster: &Cluster, agent: &Agent, dataplane: &str) {
    let hold = scenarios::UdpHold::start(cluster, &format!("[{CLUSTER_IP6}]:53"));
    let web_a_left = hold.pinned == "ok web-a";
    let dir = cluster.scratch().join("manifests");
    manifests::write(
        &dir,
        "dual-6.yaml",
        &to_ipv6(&dual_slice(!web_a_left, web_a_left)),
    );
    let want = if web_a_left { "ok web-b" } else { "ok web-a" };
    let moved = hold.follow(want, std::time::Instant::now());
    let replaced = moved.assert_moved_to(want);
    if dataplane == "ebpf" {
        scenarios::assert_destroyed(cluster, agent, replaced);
    }
    println!(
        "{dataplane} over IPv6: connected UDP socket moved to {want} {:?} after the removal; sockets replaced: {replaced}",
        moved.after_move
    );
}

#[test]
fn ipv6_nodeport_connections_survive_restarts_and_upgrades_with_ebpf() {
    ipv6_restarts("v6re", "ebpf");
}

#[test]
fn ipv6_nodeport_connections_survive_restarts_and_upgrades_with_nftables() {
    ipv6_restarts("v6rn", "nftables");
}

/// A long-lived IPv6 connection and a stream of new ones through node1's IPv6
/// NodePorts from outside, across a restart and an upgrade of node1's agent.
fn ipv6_restarts(tag: &str, dataplane: &str) {
    let (mut cluster, agent) = setup(tag, dataplane);
    let (held, stream) = scenarios::restart_under_load(
        &mut cluster,
        &agent,
        "[fd00:10:100::1]:30093",
        "[fd00:10:100::1]:30090",
    );
    println!("{dataplane} over IPv6: long-lived connection {held}; new connections {stream}");
}
