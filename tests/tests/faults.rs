//! Faults under live traffic: the agent killed with SIGKILL at random points of large
//! syncs, again and again, while a pod keeps connecting to a Service. The node keeps
//! serving through it (the kernel state outlives the agent), and the agent that finally
//! stays up holds exactly what a clean start holds: no stale and no missing entries.
//! And a node interface removed and added again: its NodePorts come back while the
//! node's other address keeps serving.
use std::{
    process::{Child, Stdio},
    time::Duration,
};

use proxy_agent_tests::{
    agent::{testpod_bin, Agent},
    cluster::{sh, sh_in, Cluster},
    manifests, scale,
    scenarios::{self, setup_on, Bed, ECHO_IP, SVC_PORTS},
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SERVICES: usize = 2000;

/// 2 000 Services beside echo (ClusterIPs in 10.97/16, clear of echo's) with
/// `endpoints` endpoints each: each count makes every Service change.
fn many(endpoints: usize) -> String {
    scale::manifests(SERVICES, endpoints).replace("10.96.", "10.97.")
}

fn client(bed: &Bed, millis: u64) -> Child {
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:80");
    let millis = millis.to_string();
    bed.cluster
        .command_in_pod("client", &[&testpod, "request-for", "tcp", &to, &millis])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client")
}

/// The kernel state once the agent has tidied: nftables deletes the chains a full load
/// over a previous agent's tables left flushed one second after that load.
fn settled_counts(bed: &Bed, dataplane: &str) -> Vec<usize> {
    std::thread::sleep(Duration::from_millis(1500));
    bed.agent.kernel_counts(&bed.cluster, dataplane)
}

fn kill_9_during_large_syncs(dataplane: &str) {
    let mut bed = setup_on(&format!("kill{}", &dataplane[..1]), dataplane);
    manifests::write(&bed.dir, "many.yaml", &many(3));
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let traffic = client(&bed, 6000);
    std::thread::sleep(Duration::from_millis(300));
    let mut rng = StdRng::seed_from_u64(9);
    let mut kills = Vec::new();
    for round in 0..6 {
        // Every Service changes while the agent is down: its first sync is large.
        bed.cluster.signal("node1", "agent", "KILL");
        manifests::write(&bed.dir, "many.yaml", &many(2 + round % 2));
        bed.agent.respawn(&mut bed.cluster);
        let after = rng.random_range(20..600);
        kills.push(after);
        std::thread::sleep(Duration::from_millis(after));
    }
    bed.cluster.signal("node1", "agent", "KILL");
    bed.agent.respawn(&mut bed.cluster);
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let survived = settled_counts(&bed, dataplane);
    let output = traffic.wait_with_output().expect("client output");
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    // What a clean start programs from the same manifests.
    bed.cluster.signal("node1", "agent", "KILL");
    bed.agent.cleanup(&bed.cluster, dataplane);
    bed.agent.respawn(&mut bed.cluster);
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let clean = settled_counts(&bed, dataplane);
    println!(
        "{dataplane}: 7 SIGKILLs ({kills:?} ms into a start over 2 000 changed Services); traffic meanwhile: {report}; kernel {survived:?} after, {clean:?} from a clean start"
    );
    assert!(
        report.contains(" err=0"),
        "connections failed while the agent was killed: {report}"
    );
    let ok: u64 = report
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ok="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok > 100, "too few connections: {report}");
    assert_eq!(survived, clean, "stale or missing entries after the kills");
}

#[test]
fn kill_9_during_large_syncs_loses_no_connection_and_leaves_nothing_stale_with_ebpf() {
    kill_9_during_large_syncs("ebpf");
}

#[test]
fn kill_9_during_large_syncs_loses_no_connection_and_leaves_nothing_stale_with_nftables() {
    kill_9_during_large_syncs("nftables");
}

/// A second interface of node1 on the LAN (`eth1`, 10.100.0.21), as a NIC plugged in.
fn plug(cluster: &Cluster) {
    let node = cluster.node("node1").netns.clone();
    let lan = cluster.lan_netns();
    // The same hardware address each time, as the same NIC plugged in again: the LAN's
    // neighbour caches stay right.
    sh(&[
        "ip",
        "link",
        "add",
        "eth1",
        "address",
        "02:00:0a:64:00:15",
        "netns",
        &node,
        "type",
        "veth",
        "peer",
        "name",
        "n1b",
        "netns",
        &lan,
    ]);
    sh_in(&lan, &["ip", "link", "set", "n1b", "master", "br0", "up"]);
    sh_in(
        &node,
        &["ip", "addr", "add", "10.100.0.21/24", "dev", "eth1"],
    );
    sh_in(&node, &["ip", "link", "set", "eth1", "up"]);
    // Only eth1 answers ARP for its address, so its traffic arrives there, through the
    // programs attached to it.
    sh_in(&node, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"]);
}

/// Polls a NodePort connection from the LAN client to `to` until one succeeds.
fn served_within(cluster: &Cluster, to: &str, limit: Duration) -> Duration {
    let testpod = testpod_bin().display().to_string();
    let started = std::time::Instant::now();
    loop {
        let out = cluster.run_in_lan(&[&testpod, "probe", "tcp", "10.100.0.254", to, "1", "300"]);
        if out.starts_with("ok ") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{to} not served after {limit:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_interface_removed_and_added_again_serves_its_nodeports_again_with_ebpf() {
    let mut cluster = scenarios::echo_cluster("ifce");
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let service = manifests::service("echo", ECHO_IP, &SVC_PORTS[..1])
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30080}");
    manifests::write(&dir, "echo-svc.yaml", &service);
    scenarios::write_echo_slice(
        &dir,
        &[("10.244.1.2", true, "node1"), ("10.244.2.2", true, "node2")],
    );
    let agent = Agent::start_with(
        &mut cluster,
        "node1",
        &[
            "--manifests".into(),
            dir.display().to_string(),
            "--dataplane".into(),
            "ebpf".into(),
            "--cluster-cidr".into(),
            "10.244.0.0/16".into(),
        ],
    );
    plug(&cluster);
    let first = served_within(&cluster, "10.100.0.21:30080", Duration::from_secs(5));
    // The node's own address serves throughout.
    let testpod = testpod_bin().display().to_string();
    let traffic = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cluster.lan_netns()))
        .args([
            "--",
            &testpod,
            "request-for",
            "tcp",
            "10.100.0.1:30080",
            "2500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    std::thread::sleep(Duration::from_millis(300));
    sh_in(&cluster.node("node1").netns, &["ip", "link", "del", "eth1"]);
    std::thread::sleep(Duration::from_millis(500));
    plug(&cluster);
    let again = served_within(&cluster, "10.100.0.21:30080", Duration::from_secs(5));
    let report = String::from_utf8_lossy(&traffic.wait_with_output().expect("client").stdout)
        .trim()
        .to_owned();
    println!(
        "plugged: served after {first:?}; removed and plugged again: served after {again:?}; the node's address meanwhile: {report}"
    );
    assert!(report.contains(" err=0"), "{report}\n{}", agent.log_text());
}
