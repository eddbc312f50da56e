//! Churn soak: endpoints added, marked terminating and removed at 20 changes a second
//! while ClusterIP (from a pod) and NodePort (from outside) connections run throughout.
//! Every pod keeps serving, and the Service always keeps a ready endpoint, so any
//! failed connection is the dataplane's fault. The agent's memory stays flat and,
//! once the first endpoint set is back, its kernel state is what it was then.
//! `PROXY_AGENT_SOAK_SECS` sets the churn's length (60 s by default); `SOAK_DEBUG=1` prints
//! the maps and the datapath counters at the end.
use std::{
    fmt::Write as _,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{agent_bin, testpod_bin, Agent},
    cluster::{sh_in, Cluster},
    manifests, scenarios,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: churn, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.70
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30090}]
";
const CLUSTER_IP: &str = "10.96.0.70:80";
const NODE_PORT: &str = "10.100.0.1:30090";

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    Ready,
    Terminating,
}

/// The churned endpoints: (address, node, pod name, host part of the pod address).
const POOL: [(&str, &str, &str, u8); 6] = [
    ("10.244.1.2", "node1", "web-a", 2),
    ("10.244.2.2", "node2", "web-b", 2),
    ("10.244.2.3", "node2", "web-c", 3),
    ("10.244.1.3", "node1", "web-d", 3),
    ("10.244.2.4", "node2", "web-e", 4),
    ("10.244.1.4", "node1", "web-f", 4),
];

fn slice(states: &[State]) -> String {
    let mut text = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: churn-1, namespace: default, labels: {kubernetes.io/service-name: churn}}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 9090}]\nendpoints:\n",
    );
    for ((ip, node, _, _), state) in POOL.iter().zip(states) {
        let conditions = match state {
            State::Absent => continue,
            State::Ready => "{ready: true, serving: true, terminating: false}",
            State::Terminating => "{ready: false, serving: true, terminating: true}",
        };
        let _ = writeln!(
            text,
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {conditions}"
        );
    }
    text
}

/// One change: an absent endpoint is added, a ready one starts terminating (never the
/// last ready one), a terminating one goes.
fn churn(rng: &mut StdRng, states: &mut [State]) {
    let ready = states.iter().filter(|s| **s == State::Ready).count();
    loop {
        let i = rng.random_range(0..states.len());
        states[i] = match states[i] {
            State::Absent => State::Ready,
            State::Ready if ready > 1 => State::Terminating,
            State::Ready => continue,
            State::Terminating => State::Absent,
        };
        return;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn agent_pid(cluster: &Cluster) -> u32 {
    cluster
        .pids("node1", "agent")
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "proxy-agent")
        })
        .expect("the agent's pid")
}

/// `testpod rate <to> <millis>`: from the client pod (in its node's cgroup,
/// so through the socket programs) when `in_pod`, else from the LAN.
fn client(cluster: &Cluster, in_pod: bool, to: &str, millis: u128) -> Child {
    let testpod = testpod_bin().display().to_string();
    let millis = millis.to_string();
    let args = [testpod.as_str(), "rate", to, &millis];
    let mut command = if in_pod {
        cluster.command_in_pod("client", &args)
    } else {
        cluster.command_in_lan(&args)
    };
    command
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn a client")
}

fn count(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|f| f.strip_prefix(key))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

const FIRST: [State; 6] = [
    State::Ready,
    State::Ready,
    State::Absent,
    State::Absent,
    State::Absent,
    State::Absent,
];

/// The echo cluster with three more pods, all six answering on 9090, the churned
/// Service at its first endpoint set, and the agent on node1.
fn bed(dataplane: &str) -> (Cluster, Agent, std::path::PathBuf) {
    let mut cluster = scenarios::echo_cluster(&format!("soak{}", &dataplane[..1]));
    let testpod = testpod_bin().display().to_string();
    for (_, node, pod, host) in &POOL[3..] {
        cluster.add_pod(node, pod, *host);
    }
    // Answers one byte per connection; the clients close with a reset, so no side keeps
    // TIME_WAIT and ports come round again within seconds, as on a busy client.
    for (_, _, pod, _) in &POOL {
        cluster.spawn_in_pod(pod, &[&testpod, "serve-rate", "9090"]);
    }
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(&dir, "churn-svc.yaml", SERVICE);
    manifests::write(&dir, "churn-slice.yaml", &slice(&FIRST));
    let agent = Agent::start_with(
        &mut cluster,
        "node1",
        &[
            "--manifests".into(),
            dir.display().to_string(),
            "--dataplane".into(),
            dataplane.into(),
            "--cluster-cidr".into(),
            "10.244.0.0/16".into(),
        ],
    );
    (cluster, agent, dir)
}

/// With `SOAK_DEBUG` set: the maps (or table) and the datapath's counters.
fn debug_dump(cluster: &Cluster, agent: &Agent, dataplane: &str) {
    if std::env::var_os("SOAK_DEBUG").is_none() {
        return;
    }
    let netns = cluster.node("node1").netns.clone();
    let bin = agent_bin().display().to_string();
    let bpffs = agent.bpffs.display().to_string();
    for what in ["services", "backends"] {
        let args = [
            bin.as_str(),
            "dump",
            what,
            "--dataplane",
            dataplane,
            "--bpffs",
            &bpffs,
        ];
        eprintln!("SOAK {what}:\n{}", sh_in(&netns, &args));
    }
    let (_, metrics) = agent.http_get(cluster, "127.0.0.1:10249", "/metrics");
    for line in metrics
        .lines()
        .filter(|l| l.contains("verdict") || l.contains("reject"))
    {
        eprintln!("SOAK {line}");
    }
}

/// The kernel state once it settles on `want` (within 5 s; nftables deletes the chains
/// a sync flushed one second later, as kube-proxy does), or the last one read.
fn settled_state(cluster: &Cluster, agent: &Agent, dataplane: &str, want: &[usize]) -> Vec<usize> {
    let started = Instant::now();
    let mut state = agent.kernel_counts(cluster, dataplane);
    while state != want && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        state = agent.kernel_counts(cluster, dataplane);
    }
    state
}

fn soak(dataplane: &str) {
    let secs: u64 = std::env::var("PROXY_AGENT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (cluster, agent, dir) = bed(dataplane);
    let before = agent.kernel_counts(&cluster, dataplane);
    let pid = agent_pid(&cluster);
    let churn_for = Duration::from_secs(secs);
    // The clients outlast the churn a little on both sides.
    let millis = churn_for.as_millis() + 1000;
    let pod_client = client(&cluster, true, CLUSTER_IP, millis);
    let lan_client = client(&cluster, false, NODE_PORT, millis);
    std::thread::sleep(Duration::from_millis(500));
    let mut rng = StdRng::seed_from_u64(secs);
    let mut states = FIRST;
    let started = Instant::now();
    let (mut changes, mut rss) = (0u64, Vec::new());
    while started.elapsed() < churn_for {
        churn(&mut rng, &mut states);
        manifests::write(&dir, "churn-slice.yaml", &slice(&states));
        changes += 1;
        if changes % 20 == 0 {
            rss.push(rss_kib(pid));
        }
        let next = started + Duration::from_millis(changes * 50);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (pod_report, lan_report) = (
        scenarios::client_report(pod_client),
        scenarios::client_report(lan_client),
    );
    debug_dump(&cluster, &agent, dataplane);
    // Back to the first set: the kernel holds what it held then, nothing more.
    manifests::write(&dir, "churn-slice.yaml", &slice(&FIRST));
    std::thread::sleep(Duration::from_millis(200));
    agent.wait_healthy(&cluster);
    let after = settled_state(&cluster, &agent, dataplane, &before);
    let early = rss[rss.len() / 4];
    let end = *rss.last().expect("RSS samples");
    println!(
        "{dataplane}: {changes} changes in {:?}; ClusterIP from a pod: {pod_report}; NodePort from outside: {lan_report}; agent RSS {early} KiB at {} s, {end} KiB at the end (max {} KiB); kernel state {before:?} before, {after:?} after",
        started.elapsed(),
        secs / 4,
        rss.iter().max().copied().unwrap_or(0)
    );
    for (what, text) in [("ClusterIP", &pod_report), ("NodePort", &lan_report)] {
        assert!(
            text.contains(" err=0"),
            "{what} connections failed under churn: {text}\n{}",
            agent.log_text()
        );
        assert!(
            count(text, "ok=") > 1000,
            "{what}: too few connections: {text}"
        );
    }
    assert!(
        end * 10 <= early * 11,
        "agent RSS grew from {early} KiB to {end} KiB: {rss:?}"
    );
    assert_eq!(before, after, "the kernel state grew under churn");
}

#[test]
fn churn_drops_no_connection_and_leaks_nothing_with_ebpf() {
    soak("ebpf");
}

#[test]
fn churn_drops_no_connection_and_leaks_nothing_with_nftables() {
    soak("nftables");
}
