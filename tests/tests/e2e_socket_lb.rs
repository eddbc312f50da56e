//! End to end: the real agent on a simulated two-node cluster, real packets from a client
//! pod to a `ClusterIP` through the socket-level load balancer.
use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{agent_bin, testpod_bin},
    manifests,
    scenarios::{self, ECHO_IP, SVC_PORTS},
};

use scenarios::{assert_served, setup, setup_on, write_echo_slice, Bed, EMPTY_IP};

fn requests(bed: &Bed, proto: &str, to: &str, count: usize) -> Vec<String> {
    scenarios::requests(&bed.cluster, proto, to, count)
}

/// Pods that answered, with counts; panics on any failed request.
fn answered_by(lines: &[String], seen_as: &str) -> BTreeMap<String, usize> {
    let mut pods = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"ok"), "request failed: {line}");
        assert_eq!(
            fields[2].split(':').next(),
            Some("10.244.1.10"),
            "server saw another client address: {line}"
        );
        assert_eq!(
            fields[3], seen_as,
            "client saw the backend instead of the Service: {line}"
        );
        *pods.entry(fields[1].to_owned()).or_insert(0) += 1;
    }
    pods
}

fn names(pods: &BTreeMap<String, usize>) -> Vec<&str> {
    pods.keys().map(String::as_str).collect()
}

/// Polls until every one of 10 requests is answered by exactly `want`, within `limit`.
fn wait_for_backends(bed: &Bed, want: &[&str], limit: Duration) -> Duration {
    let started = Instant::now();
    let to = format!("{ECHO_IP}:80");
    loop {
        let lines = requests(bed, "tcp", &to, 10);
        let ok = lines.iter().all(|l| l.starts_with("ok "));
        if ok && names(&answered_by(&lines, &to)) == want {
            // Balanced random choice over 2+ backends may miss one in 10 tries; the
            // check needs every wanted backend to appear, so ask once more if not.
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "backends not {want:?} after {limit:?}: {lines:?}\n{}",
            bed.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_and_udp_to_a_cluster_ip_reach_every_ready_backend() {
    spread("ebpf");
}

#[test]
fn tcp_and_udp_to_a_cluster_ip_reach_every_ready_backend_with_nftables() {
    spread("nftables");
}

fn spread(dataplane: &str) {
    let bed = setup_on(&format!("rd{}", &dataplane[..1]), dataplane);
    let tcp_to = format!("{ECHO_IP}:80");
    let tcp = answered_by(&requests(&bed, "tcp", &tcp_to, 40), &tcp_to);
    assert_eq!(names(&tcp), ["web-a", "web-b"], "TCP spread: {tcp:?}");
    let udp_to = format!("{ECHO_IP}:53");
    for mode in ["udp", "udp-connected"] {
        let udp = answered_by(&requests(&bed, mode, &udp_to, 40), &udp_to);
        assert_eq!(names(&udp), ["web-a", "web-b"], "{mode} spread: {udp:?}");
    }
    println!("TCP {tcp:?}");
    // The running agent explains the same connection from its live state.
    let bin = agent_bin().display().to_string();
    let to = format!("{ECHO_IP}:80/tcp");
    let trace = bed.cluster.run_on_node(
        "node1",
        &[&bin, "trace", "--from", "10.244.1.10", "--to", &to],
    );
    for want in [
        "default/echo:http",
        "10.244.2.3:8080",
        "excluded: not ready",
        "10.244.1.2:8080,10.244.2.2:8080",
    ] {
        assert!(
            trace.contains(want),
            "{want} missing from live trace:\n{trace}"
        );
    }
    let (code, metrics) = bed
        .agent
        .http_get(&bed.cluster, "127.0.0.1:10249", "/metrics");
    assert_eq!(code, 200);
    let info = format!("proxyagent_dataplane_info{{dataplane=\"{dataplane}\"}} 1");
    for want in [
        info.as_str(),
        "proxyagent_programmed_frontends 3",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
    ] {
        assert!(
            metrics.contains(want),
            "{want} missing from /metrics:\n{metrics}"
        );
    }
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    hairpin("ebpf");
}

#[test]
fn a_pod_reaches_itself_through_its_service_with_nftables() {
    hairpin("nftables");
}

/// Hairpin: backend web-a asks its own Service and is sometimes answered by itself.
/// nftables masquerades such a connection (kube-proxy's KUBE-SEP source match), else
/// the pod would get a packet from its own address; the socket LB connects the pod to
/// itself directly, so it keeps its address.
fn hairpin(dataplane: &str) {
    let bed = setup_on(&format!("hp{}", &dataplane[..1]), dataplane);
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:80");
    let out = bed
        .cluster
        .run_in_pod("web-a", &[&testpod, "request", "tcp", &to, "30"]);
    let mut seen_by_itself = BTreeSet::new();
    let mut pods = BTreeSet::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"ok"), "request failed: {out}");
        assert_eq!(fields[3], to, "the pod saw the backend, not the Service");
        if fields[1] == "web-a" {
            seen_by_itself.insert(fields[2].split(':').next().unwrap_or_default().to_owned());
        }
        pods.insert(fields[1]);
    }
    assert_eq!(pods, BTreeSet::from(["web-a", "web-b"]), "{out}");
    let want = if dataplane == "ebpf" {
        BTreeSet::from(["10.244.1.2".to_owned()])
    } else {
        // Masqueraded to node1's address on web-a's link.
        seen_by_itself
            .iter()
            .filter(|a| *a != "10.244.1.2")
            .cloned()
            .collect()
    };
    assert!(
        !seen_by_itself.is_empty() && seen_by_itself == want,
        "web-a saw itself as {seen_by_itself:?}"
    );
    println!("{dataplane}: web-a answered itself seeing the client as {seen_by_itself:?}");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    refused("ebpf");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_with_nftables() {
    refused("nftables");
}

fn refused(dataplane: &str) {
    let bed = setup_on(&format!("ref{}", &dataplane[..1]), dataplane);
    for line in requests(&bed, "tcp", &format!("{EMPTY_IP}:80"), 5) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[..2], ["err", "ConnectionRefused"], "{line}");
        let ms: u64 = fields[2].parse().unwrap();
        assert!(ms < 100, "refusal took {ms} ms");
    }
}

#[test]
fn internal_traffic_policy_local_without_a_local_endpoint_drops_like_kube_proxy() {
    local_policy_drops("ebpf");
}

#[test]
fn internal_traffic_policy_local_without_a_local_endpoint_drops_like_kube_proxy_with_nftables() {
    local_policy_drops("nftables");
}

/// kube-proxy drops a pod's traffic to an `internalTrafficPolicy: Local` Service whose
/// endpoints are all on other nodes: the client waits out its timeout (no refusal), and
/// traffic comes back once a local endpoint does.
fn local_policy_drops(dataplane: &str) {
    const LOCAL_IP: &str = "10.96.0.52";
    let bed = setup_on(&format!("itp{}", &dataplane[..1]), dataplane);
    let service = manifests::service("local", LOCAL_IP, &SVC_PORTS[..1]).replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  internalTrafficPolicy: Local\n",
    );
    manifests::write(&bed.dir, "local-svc.yaml", &service);
    let slice = |ip: &'static str, node: &'static str| {
        manifests::slice(
            "local-abc",
            "local",
            &scenarios::POD_PORTS[..1],
            &[manifests::Endpoint {
                ip,
                ready: true,
                node,
            }],
        )
    };
    let to = format!("{LOCAL_IP}:80");
    let wait_for = |want: &str| {
        let started = Instant::now();
        loop {
            let line = requests(&bed, "tcp", &to, 1).remove(0);
            if line.starts_with(want) {
                return line;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no {want:?} after 10 s, last {line:?}\n{}",
                bed.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    manifests::write(&bed.dir, "local-slice.yaml", &slice("10.244.1.2", "node1"));
    wait_for("ok web-a");
    // Only web-b, on node2: dropped, so the 2 s connect times out.
    manifests::write(&bed.dir, "local-slice.yaml", &slice("10.244.2.2", "node2"));
    let line = wait_for("err");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..2], ["err", "TimedOut"], "{line}");
    let ms: u64 = fields[2].parse().unwrap();
    assert!(ms >= 1900, "gave up after {ms} ms: {line}");
    for line in requests(&bed, "tcp", &to, 2) {
        assert!(line.starts_with("err TimedOut"), "{line}");
    }
    // A local endpoint again: served again.
    manifests::write(&bed.dir, "local-slice.yaml", &slice("10.244.1.2", "node1"));
    wait_for("ok web-a");
}

#[test]
fn endpoint_changes_reach_new_connections_within_a_second() {
    changes("ebpf");
}

#[test]
fn endpoint_changes_reach_new_connections_within_a_second_with_nftables() {
    changes("nftables");
}

fn changes(dataplane: &str) {
    let bed = setup_on(&format!("chg{}", &dataplane[..1]), dataplane);
    write_echo_slice(
        &bed.dir,
        &[
            ("10.244.1.2", true, "node1"),
            ("10.244.2.2", false, "node2"),
            ("10.244.2.3", false, "node2"),
        ],
    );
    let took = wait_for_backends(&bed, &["web-a"], Duration::from_secs(1));
    println!("removal live after {took:?}");
    write_echo_slice(
        &bed.dir,
        &[("10.244.1.2", true, "node1"), ("10.244.2.3", true, "node2")],
    );
    let started = Instant::now();
    loop {
        let to = format!("{ECHO_IP}:80");
        let pods = answered_by(&requests(&bed, "tcp", &to, 20), &to);
        if names(&pods) == ["web-a", "web-c"] {
            break;
        }
        assert!(
            !pods.contains_key("web-b"),
            "removed endpoint still used: {pods:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "added endpoint not used after 1 s: {pods:?}\n{}",
            bed.agent.log_text()
        );
    }
    println!("addition live after {:?}", started.elapsed());
}

#[test]
fn a_udp_flow_moves_off_a_removed_endpoint_with_nftables() {
    udp_flow_moves("nftables");
}

/// One UDP flow (fixed source port) pinned to a backend; the backend leaves the
/// Service but keeps running; the flow's next datagrams reach the remaining backend
/// (kube-proxy deletes the stale conntrack entry; the socket LB picks afresh).
fn udp_flow_moves(dataplane: &str) {
    let bed = setup_on(&format!("udp{}", &dataplane[..1]), dataplane);
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:53");
    let flow = |count: usize| -> Vec<String> {
        let out = bed.cluster.run_in_pod(
            "client",
            &[&testpod, "udp-from", "40053", &to, &count.to_string()],
        );
        scenarios::udp_flow_pods(&out)
    };
    let first = flow(5);
    assert!(
        first.iter().all(|p| *p == first[0]),
        "one flow, one backend: {first:?}"
    );
    let (gone, stays) = if first[0] == "web-a" {
        (("10.244.1.2", "node1"), ("10.244.2.2", "node2"))
    } else {
        (("10.244.2.2", "node2"), ("10.244.1.2", "node1"))
    };
    write_echo_slice(
        &bed.dir,
        &[(gone.0, false, gone.1), (stays.0, true, stays.1)],
    );
    let survivor = if first[0] == "web-a" {
        "web-b"
    } else {
        "web-a"
    };
    wait_for_backends(&bed, &[survivor], Duration::from_secs(2));
    // The conntrack entry goes right after the ruleset changes, within the same sync.
    let started = Instant::now();
    while flow(1)[0] != survivor {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the flow still reaches the removed endpoint {} after 2 s\n{}",
            first[0],
            bed.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = flow(5);
    assert!(
        after.iter().all(|p| p == survivor),
        "the flow still reaches the removed endpoint {}: {after:?}\n{}",
        first[0],
        bed.agent.log_text()
    );
    println!("flow moved from {} to {survivor}", first[0]);
}

#[test]
fn a_connected_udp_socket_leaves_a_removed_endpoint() {
    connected_udp_moves("ebpf", false);
}

#[test]
fn a_connected_udp_socket_leaves_a_removed_endpoint_with_nftables() {
    connected_udp_moves("nftables", false);
}

#[test]
fn a_connected_udp_socket_leaves_an_endpoint_removed_while_the_agent_was_down() {
    connected_udp_moves("ebpf", true);
}

#[test]
fn a_connected_udp_socket_leaves_an_endpoint_removed_while_the_agent_was_down_with_nftables() {
    connected_udp_moves("nftables", true);
}

/// A long-lived connected UDP socket (one `connect()`, a datagram every 50 ms) whose
/// backend leaves the Service but keeps running: its exchanges reach the remaining
/// backend within two seconds and never the removed one again. nftables: the stale
/// conntrack entry goes and the next datagram is balanced afresh. eBPF: the socket LB
/// chose at `connect()`, so the agent destroys the socket; the client's exchange fails
/// once and the socket it opens next goes to the survivor. With `while_down`, the
/// endpoint leaves while the agent is stopped: the restarted agent finds the change
/// against what it programmed before (pinned maps, or the conntrack table).
fn connected_udp_moves(dataplane: &str, while_down: bool) {
    let tag = format!("c{}{}", u8::from(while_down), &dataplane[..1]);
    let mut bed = setup_on(&tag, dataplane);
    let hold = scenarios::UdpHold::start(&bed.cluster, &format!("{ECHO_IP}:53"));
    let (gone, survivor) = if hold.pinned == "ok web-a" {
        (("10.244.1.2", "node1"), ("10.244.2.2", "node2"))
    } else {
        (("10.244.2.2", "node2"), ("10.244.1.2", "node1"))
    };
    if while_down {
        let exits = bed.cluster.terminate("node1", "agent");
        assert!(exits.iter().all(std::process::ExitStatus::success));
    }
    write_echo_slice(
        &bed.dir,
        &[(gone.0, false, gone.1), (survivor.0, true, survivor.1)],
    );
    let mut removed_at = Instant::now();
    if while_down {
        std::thread::sleep(Duration::from_millis(300));
        bed.agent.respawn(&mut bed.cluster);
        // The move is timed from the restart.
        removed_at = Instant::now();
        bed.agent.wait_healthy(&bed.cluster);
    }
    let want = if survivor.1 == "node1" {
        "ok web-a"
    } else {
        "ok web-b"
    };
    let pinned = hold.pinned.clone();
    let moved = hold.follow(want, removed_at);
    let replaced = moved.assert_moved_to(want);
    if dataplane == "ebpf" {
        scenarios::assert_destroyed(&bed.cluster, &bed.agent, replaced);
    }
    println!(
        "{dataplane}: connected UDP socket moved from {pinned} to {want} {:?} after the \
         {}; sockets replaced: {replaced}; exchanges meanwhile: {:?}",
        moved.after_move,
        if while_down { "restart" } else { "removal" },
        moved.before
    );
}

#[test]
fn malformed_manifests_change_nothing() {
    let bed = setup("bad");
    manifests::write(
        &bed.dir,
        "echo-slice.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: [broken\n",
    );
    let bad_object = manifests::service("echo", "10.96.0.999", &SVC_PORTS);
    manifests::write(&bed.dir, "echo-svc.yaml", &bad_object);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(bed.agent.log_text().contains("echo-slice.yaml")
        && bed.agent.log_text().contains("10.96.0.999"))
    {
        assert!(
            Instant::now() < deadline,
            "rejections not logged:\n{}",
            bed.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.agent.wait_healthy(&bed.cluster);
    let to = format!("{ECHO_IP}:80");
    let pods = answered_by(&requests(&bed, "tcp", &to, 30), &to);
    assert_eq!(names(&pods), ["web-a", "web-b"]);
}

#[test]
fn a_restarted_agent_takes_over_and_cleanup_removes_everything() {
    let mut bed = setup("rst");
    let to = format!("{ECHO_IP}:80");
    // SIGTERM leaves the programs and maps in place: traffic keeps flowing.
    let exits = bed.cluster.terminate("node1", "agent");
    assert!(
        exits.len() == 1 && exits[0].success(),
        "SIGTERM exit: {exits:?}"
    );
    assert_eq!(
        names(&answered_by(&requests(&bed, "tcp", &to, 20), &to)),
        ["web-a", "web-b"]
    );
    // A new agent restores the maps and replaces the links without a gap.
    bed.agent.respawn(&mut bed.cluster);
    bed.agent.wait_healthy(&bed.cluster);
    assert_eq!(
        names(&answered_by(&requests(&bed, "tcp", &to, 20), &to)),
        ["web-a", "web-b"]
    );
    assert!(
        bed.agent.log_text().contains("kernel_writes=0"),
        "restart rewrote the maps:\n{}",
        bed.agent.log_text()
    );
    assert!(bed
        .cluster
        .terminate("node1", "agent")
        .iter()
        .all(std::process::ExitStatus::success));
    let status = Command::new(agent_bin())
        .args(["cleanup", "--bpffs"])
        .arg(&bed.agent.bpffs)
        .arg("--cgroup-root")
        .arg(&bed.agent.cgroup_root)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!bed.agent.bpffs.exists(), "pins left behind");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&bed.agent.cgroup_root)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&attached.stdout).trim().is_empty(),
        "programs left: {}",
        String::from_utf8_lossy(&attached.stdout)
    );
    // Without the programs, the ClusterIP is just an unroutable address again.
    let after = requests(&bed, "tcp", &to, 1);
    assert!(
        after[0].starts_with("err"),
        "still translated after cleanup: {after:?}"
    );
}

#[test]
fn an_agent_finding_maps_of_another_layout_makes_them_anew() {
    let mut bed = setup("lay");
    let to = format!("{ECHO_IP}:80");
    assert!(bed
        .cluster
        .terminate("node1", "agent")
        .iter()
        .all(std::process::ExitStatus::success));
    // What an agent from before layout 2 left: no stamp, and 12-byte service values.
    let pin = |name: &str| bed.agent.bpffs.join(name).display().to_string();
    std::fs::remove_file(pin("LB_LAYOUT")).expect("unpin the stamp");
    std::fs::remove_file(pin("LB4_SERVICES")).expect("unpin the services");
    let created = Command::new("bpftool")
        .args(["map", "create", &pin("LB4_SERVICES"), "type", "hash"])
        .args([
            "key",
            "12",
            "value",
            "12",
            "entries",
            "1024",
            "name",
            "LB4_SERVICES",
        ])
        .args(["flags", "1"])
        .status()
        .unwrap();
    assert!(created.success(), "bpftool map create");
    bed.agent.respawn(&mut bed.cluster);
    bed.agent.wait_healthy(&bed.cluster);
    assert!(
        bed.agent.log_text().contains("another layout"),
        "the old maps were not named:\n{}",
        bed.agent.log_text()
    );
    let show = |name: &str| {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned", &pin(name)])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    assert_eq!(
        show("LB4_SERVICES")["bytes_value"],
        16,
        "the map was not made anew"
    );
    let stamp = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &pin("LB_LAYOUT")])
        .output()
        .unwrap();
    let stamp: serde_json::Value = serde_json::from_slice(&stamp.stdout).unwrap_or_default();
    // With BTF the value is a number; without, its bytes in hex.
    let value = &stamp[0]["value"];
    let layout = value.as_u64().or_else(|| {
        let bytes: Vec<u8> = value
            .as_array()?
            .iter()
            .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect();
        Some(u64::from(u32::from_ne_bytes(bytes.try_into().ok()?)))
    });
    assert_eq!(layout, Some(2), "not stamped: {stamp}");
    assert_eq!(
        names(&answered_by(&requests(&bed, "tcp", &to, 20), &to)),
        ["web-a", "web-b"]
    );
}

#[test]
fn replacing_the_agent_fails_no_connection() {
    replace_agent("ebpf");
}

#[test]
fn replacing_the_agent_fails_no_connection_with_nftables() {
    replace_agent("nftables");
}

fn replace_agent(dataplane: &str) {
    let mut bed = setup_on(&format!("zd{}", &dataplane[..1]), dataplane);
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:80");
    let client = bed
        .cluster
        .command_in_pod("client", &[&testpod, "request-for", "tcp", &to, "3000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // An upgrade: the old agent exits on SIGTERM, a new one takes over its pins.
    let exits = bed.cluster.terminate("node1", "agent");
    assert!(
        exits.iter().all(std::process::ExitStatus::success),
        "{exits:?}"
    );
    bed.agent.respawn(&mut bed.cluster);
    bed.agent.wait_healthy(&bed.cluster);
    let output = client.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    println!("during the restart: {}", report.trim());
    assert_served(&report, "during the restart");
}

#[test]
fn cleanup_removes_the_nftables_tables() {
    let mut bed = setup_on("cln", "nftables");
    let tables = bed.cluster.run_on_node("node1", &["nft", "list", "tables"]);
    assert!(
        tables.contains("table ip proxy-agent") && tables.contains("table ip6 proxy-agent"),
        "{tables}"
    );
    assert!(bed
        .cluster
        .terminate("node1", "agent")
        .iter()
        .all(std::process::ExitStatus::success));
    // SIGTERM left the rules in place: the Service still works without the agent.
    let to = format!("{ECHO_IP}:80");
    assert_eq!(
        names(&answered_by(&requests(&bed, "tcp", &to, 20), &to)),
        ["web-a", "web-b"]
    );
    let bin = agent_bin().display().to_string();
    let _ = bed
        .cluster
        .run_on_node("node1", &[&bin, "cleanup", "--dataplane", "nftables"]);
    let tables = bed.cluster.run_on_node("node1", &["nft", "list", "tables"]);
    assert!(!tables.contains("proxy-agent"), "tables left: {tables}");
    let after = requests(&bed, "tcp", &to, 1);
    assert!(
        after[0].starts_with("err"),
        "still translated after cleanup: {after:?}"
    );
}
