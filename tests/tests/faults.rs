//! Faults under live traffic: the agent killed with SIGKILL at random points of large
//! syncs, again and again, while a pod keeps connecting to a Service. The node keeps
//! serving through it (the kernel state outlives the agent), and the agent that finally
//! stays up holds exactly what a clean start holds: no stale and no missing entries.
//! And manifests replaced the way editors, shells and kubelet replace them, under traffic;
//! and a node interface removed and plugged in again: its NodePorts come back while the
//! node's other address keeps serving.
use std::{
    io::Write as _,
    os::unix::fs::symlink,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use proxy_agent_tests::{
    agent::testpod_bin,
    cluster::{sh, sh_in, Cluster},
    manifests, scale,
    scenarios::{
        assert_served, client_report, setup_on, setup_with, Bed, ECHO_IP, POD_PORTS, SVC_PORTS,
        WEB_A_AND_B,
    },
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
    assert_served(&report, "while the agent was killed");
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

/// Puts `text` in `dir/..NAME/FILE` and points `dir/..data` at it (through a link renamed
/// over the old one), as kubelet updates a config map volume.
fn configmap_version(dir: &Path, name: &str, file: &str, text: &str) {
    let version = dir.join(format!("..{name}"));
    std::fs::create_dir_all(&version).expect("version directory");
    std::fs::write(version.join(file), text).expect("versioned file");
    symlink(format!("..{name}"), dir.join("..data_tmp")).expect("data link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap the data link");
}

/// echo's Service file truncated and written again 1.2 s later (`kubectl get … > file`),
/// then made a config map volume's link and swapped to a new version twice, while a pod
/// keeps connecting to echo: no connection fails (a half-written file read as empty
/// would remove echo's Service).
fn manifests_replaced_in_place(dataplane: &str) {
    let bed = setup_on(&format!("repl{}", &dataplane[..1]), dataplane);
    let traffic = client(&bed, 5000);
    std::thread::sleep(Duration::from_millis(300));
    let file = bed.dir.join("echo-svc.yaml");
    let text = std::fs::read_to_string(&file).expect("echo's Service");
    let mut writer = std::fs::File::create(&file).expect("truncate");
    std::thread::sleep(Duration::from_millis(1200));
    writer.write_all(text.as_bytes()).expect("write");
    drop(writer);
    std::thread::sleep(Duration::from_millis(500));
    configmap_version(&bed.dir, "v1", "echo-svc.yaml", &text);
    symlink("..data/echo-svc.yaml", bed.dir.join(".echo-link")).expect("file link");
    std::fs::rename(bed.dir.join(".echo-link"), &file).expect("file becomes a link");
    for version in ["v2", "v3"] {
        std::thread::sleep(Duration::from_millis(700));
        configmap_version(&bed.dir, version, "echo-svc.yaml", &text);
    }
    let output = traffic.wait_with_output().expect("client output");
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!("{dataplane}: echo's Service file rewritten in place, then swapped as a ConfigMap: {report}");
    assert_served(&report, "while echo's Service file was replaced");
}

#[test]
fn manifests_replaced_in_place_keep_serving_with_ebpf() {
    manifests_replaced_in_place("ebpf");
}

#[test]
fn manifests_replaced_in_place_keep_serving_with_nftables() {
    manifests_replaced_in_place("nftables");
}

/// A second interface of node1 on the LAN (`eth1`, 10.101.0.21/24: a subnet of its own,
/// so no route of the node's first address goes through it), as a NIC plugged in.
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
        "02:00:0a:65:00:15",
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
        &["ip", "addr", "add", "10.101.0.21/24", "dev", "eth1"],
    );
    sh_in(&node, &["ip", "link", "set", "eth1", "up"]);
}

/// Polls a NodePort connection from the LAN's 10.101.0.254 to `to` until one succeeds.
fn served_within(cluster: &Cluster, to: &str, limit: Duration) -> Duration {
    let testpod = testpod_bin().display().to_string();
    let started = std::time::Instant::now();
    loop {
        let out = cluster.run_in_lan(&[&testpod, "probe", "tcp", "10.101.0.254", to, "1", "300"]);
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
fn an_interface_removed_and_plugged_in_again_serves_its_nodeports_again_with_ebpf() {
    let bed = setup_with(
        "ifce",
        &proxy_agent_tests::agent::agent_bin(),
        &["--dataplane", "ebpf", "--cluster-cidr", "10.244.0.0/16"],
    );
    let service = manifests::service("edge", "10.96.0.70", &SVC_PORTS[..1])
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30080}")
        + "---\n"
        + &manifests::slice("edge-abc", "edge", &POD_PORTS[..1], &WEB_A_AND_B);
    manifests::write(&bed.dir, "edge.yaml", &service);
    let cluster = &bed.cluster;
    // Only the interface holding an address answers ARP for it, so eth1's traffic
    // arrives on eth1, through the programs attached there.
    sh_in(
        &cluster.node("node1").netns,
        &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"],
    );
    cluster.run_in_lan(&["ip", "addr", "add", "10.101.0.254/24", "dev", "br0"]);
    plug(cluster);
    let first = served_within(cluster, "10.101.0.21:30080", Duration::from_secs(5));
    // The node's first address serves throughout.
    let testpod = testpod_bin().display().to_string();
    let traffic = cluster
        .command_in_lan(&[&testpod, "request-for", "tcp", "10.100.0.1:30080", "2500"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    std::thread::sleep(Duration::from_millis(300));
    sh_in(&cluster.node("node1").netns, &["ip", "link", "del", "eth1"]);
    std::thread::sleep(Duration::from_millis(500));
    plug(cluster);
    let again = served_within(cluster, "10.101.0.21:30080", Duration::from_secs(5));
    let report = client_report(traffic);
    println!(
        "plugged: served after {first:?}; removed and plugged again: served after {again:?}; the node's first address meanwhile: {report}"
    );
    let log = bed.agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("per-packet load balancing detached") && l.contains("eth1")),
        "eth1's programs were not detached when it went"
    );
    assert_served(
        &report,
        "to the node's first address while eth1 went and came back",
    );
}
