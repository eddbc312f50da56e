//! End to end: the packet-path tools against a live agent in the simulated cluster.
//! `monitor` sees a real connection's NAT decision and a refused one with its reason,
//! `dump` shows the Services, backends and flows with names and counters, `trace`
//! finds an existing flow and the backend it is pinned to, and the metrics move.
use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{agent_bin, sample_sum, testpod_bin},
    manifests,
    scenarios::{self, setup_on, setup_with, Bed, ECHO_IP, EMPTY_IP, POD_PORTS},
};
use serde_json::Value;

const ENDPOINTS: [&str; 2] = ["10.244.1.2:8080", "10.244.2.2:8080"];
const UDP_ENDPOINTS: [&str; 2] = ["10.244.1.2:5353", "10.244.2.2:5353"];

/// Runs the agent binary with `args` in node1's network namespace; stdout.
fn tool(bed: &Bed, args: &[&str]) -> String {
    let bin = agent_bin().display().to_string();
    let mut full = vec![bin.as_str()];
    full.extend_from_slice(args);
    bed.cluster.run_on_node("node1", &full)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The rows of `dump WHAT --json`.
fn dump(bed: &Bed, what: &str) -> Vec<Value> {
    let bpffs = bed.agent.bpffs.display().to_string();
    let out = tool(bed, &["dump", what, "--json", "--bpffs", &bpffs]);
    json(&out).as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [Value], field: &str, value: &str) -> &'a Value {
    rows.iter()
        .find(|r| r[field] == value)
        .unwrap_or_else(|| panic!("no row with {field}={value}: {rows:#?}"))
}

/// One UDP flow from the client's fixed source port 40053 to echo's DNS port.
fn udp_flow(bed: &Bed) -> String {
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:53");
    let out = bed
        .cluster
        .run_in_pod("client", &[&testpod, "udp-from", "40053", &to, "3"]);
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
    out
}

/// `trace` of the UDP flow, asked of the live agent.
fn live_trace(bed: &Bed) -> Value {
    let to = format!("{ECHO_IP}:53/udp");
    json(&tool(
        bed,
        &["trace", "--from", "10.244.1.10", "--to", &to, "--json"],
    ))
}

fn metrics(bed: &Bed) -> String {
    let (code, text) = bed
        .agent
        .http_get(&bed.cluster, "127.0.0.1:10249", "/metrics");
    assert_eq!(code, 200);
    text
}

/// Echo's slice again, stamped with the controller's last-change-trigger-time.
fn stamp_echo_slice(bed: &Bed) {
    let now = rfc3339_now();
    let slice = manifests::slice(
        "echo-abc",
        "echo",
        &POD_PORTS,
        &[
            manifests::Endpoint {
                ip: "10.244.1.2",
                ready: true,
                node: "node1",
            },
            manifests::Endpoint {
                ip: "10.244.2.2",
                ready: true,
                node: "node2",
            },
        ],
    )
    .replacen(
        "  namespace: default\n",
        &format!(
            "  namespace: default\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"\n"
        ),
        1,
    );
    manifests::write(&bed.dir, "echo-slice.yaml", &slice);
}

/// Now as RFC 3339 with seconds (what the EndpointSlice controller writes).
fn rfc3339_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts `monitor --json` on node1 and waits until it listens.
fn start_monitor(bed: &Bed, extra: &[&str]) -> std::process::Child {
    let netns = format!("--net=/run/netns/{}", bed.cluster.node("node1").netns);
    let bpffs = bed.agent.bpffs.display().to_string();
    let mut child = Command::new("nsenter")
        .arg(netns)
        .arg("--")
        .arg(agent_bin())
        .args(["monitor", "--json", "--bpffs", &bpffs])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "monitor did not start: {line}");
    child
}

fn monitor_lines(mut child: std::process::Child) -> Vec<Value> {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    out.lines().map(json).collect()
}

#[test]
fn monitor_dump_trace_and_counters_show_real_connections_with_ebpf() {
    // `-v`: the kernel programs load with their debug records live, and pass the verifier.
    let bed = setup_with("dbg", &agent_bin(), &["--dataplane", "ebpf", "-v"]);
    bed.agent.wait_healthy(&bed.cluster);
    assert!(
        bed.agent
            .log_text()
            .contains("kernel programs' debug records followed"),
        "{}",
        bed.agent.log_text()
    );
    let monitor = start_monitor(&bed, &["--duration", "3"]);
    let to = format!("{ECHO_IP}:80");
    let answered = scenarios::requests(&bed.cluster, "tcp", &to, 6);
    assert!(
        answered.iter().all(|l| l.starts_with("ok ")),
        "{answered:?}"
    );
    let refused = scenarios::requests(&bed.cluster, "tcp", &format!("{EMPTY_IP}:80"), 2);
    assert!(refused.iter().all(|l| l.contains("ConnectionRefused")));
    let events = monitor_lines(monitor);

    // monitor: each connection's NAT decision, named, and the refusals with a reason.
    let nat: Vec<&Value> = events
        .iter()
        .filter(|e| e["verdict"] == "nat" && e["hook"] == "connect4")
        .collect();
    assert_eq!(nat.len(), 6, "one NAT event per connection: {events:#?}");
    for event in &nat {
        assert_eq!(event["service"], "default/echo:http");
        assert_eq!(event["frontend"], format!("{ECHO_IP}:80/TCP"));
        let backend = event["backend"].as_str().unwrap();
        assert!(ENDPOINTS.contains(&backend), "{event}");
    }
    let rejects: Vec<&Value> = events.iter().filter(|e| e["verdict"] == "reject").collect();
    assert_eq!(rejects.len(), 2, "{events:#?}");
    for event in &rejects {
        assert_eq!(event["service"], "default/empty:http");
        assert_eq!(event["reason"], "no_endpoints");
    }
    println!("monitor: {}\n{}", nat[0], rejects[0]);

    // dump: the same connections counted per Service and per backend.
    let services = dump(&bed, "services");
    let echo = row(&services, "frontend", &format!("{ECHO_IP}:80/TCP"));
    assert_eq!(echo["service"], "default/echo:http");
    assert_eq!(echo["backends"], 2);
    assert_eq!(echo["decisions"], 6);
    let empty = row(&services, "frontend", &format!("{EMPTY_IP}:80/TCP"));
    assert_eq!(empty["target"], "reject (no endpoints)");
    assert_eq!(empty["rejects"], 2);
    let backends = dump(&bed, "backends");
    let counted: u64 = ENDPOINTS
        .iter()
        .map(|b| {
            let r = row(&backends, "backend", b);
            assert!(
                r["services"].to_string().contains("default/echo:http"),
                "{r}"
            );
            r["decisions"].as_u64().unwrap()
        })
        .sum();
    assert!(counted >= 6, "{backends:#?}");
    let table = tool(
        &bed,
        &[
            "dump",
            "services",
            "--bpffs",
            &bed.agent.bpffs.display().to_string(),
        ],
    );
    assert!(
        table.starts_with("SERVICE") && table.contains("default/echo:http"),
        "{table}"
    );

    // The UDP flow: in the socket table, and in the live trace with its backend.
    udp_flow(&bed);
    let flows = dump(&bed, "conntrack");
    // The TCP connections above are closed: sock_release took them out of the table.
    assert!(
        !flows
            .iter()
            .any(|f| f["frontend"] == format!("{ECHO_IP}:80/TCP")),
        "closed sockets still listed: {flows:#?}"
    );
    let flow = row(&flows, "frontend", &format!("{ECHO_IP}:53/UDP"));
    assert_eq!(flow["table"], "socket");
    assert_eq!(flow["service"], "default/echo:dns");
    assert!(UDP_ENDPOINTS.contains(&flow["backend"].as_str().unwrap()));
    let trace = live_trace(&bed);
    let pinned = trace["flows"].as_array().unwrap();
    assert!(
        pinned.iter().any(|f| f["table"] == "socket"
            && f["live_backend"] == true
            && UDP_ENDPOINTS.contains(&f["backend"].as_str().unwrap())),
        "{trace:#}"
    );

    check_metrics(&bed);
}

/// The eBPF counters, map fill, health answers and programming latency after the
/// connections above.
fn check_metrics(bed: &Bed) {
    stamp_echo_slice(bed);
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = metrics(bed);
        if sample_sum(
            &text,
            "kubeproxy_network_programming_duration_seconds_count",
            &[],
        ) >= 1.0
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no programming latency:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let decisions = sample_sum(
        &text,
        "proxyagent_datapath_decisions_total",
        &["service=\"default/echo:http\"", "hook=\"connect4\""],
    );
    assert!(decisions >= 6.0, "{text}");
    let refusals = sample_sum(
        &text,
        "proxyagent_datapath_rejects_total",
        &["service=\"default/empty:http\"", "reason=\"no_endpoints\""],
    );
    assert!((refusals - 2.0).abs() < f64::EPSILON, "{text}");
    for want in [
        "proxyagent_bpf_map_entries{map=\"LB4_SERVICES\"}",
        "proxyagent_bpf_map_fill_ratio{map=\"LB4_SK_REVNAT\"}",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
}

#[test]
fn dump_and_trace_read_the_nftables_table_and_conntrack() {
    let bed = setup_on("dbn", "nftables");
    bed.agent.wait_healthy(&bed.cluster);
    let services = dump(&bed, "services");
    let echo = row(&services, "frontend", &format!("{ECHO_IP}:53/UDP"));
    assert_eq!(echo["service"], "default/echo:dns");
    assert_eq!(echo["backends"], 2);
    assert!(echo["target"].as_str().unwrap().starts_with("KUBE-SVC-"));
    let empty = row(&services, "frontend", &format!("{EMPTY_IP}:80/TCP"));
    assert_eq!(empty["target"], "KUBE-MARK-REJECT");
    let backends = dump(&bed, "backends");
    for endpoint in ENDPOINTS.iter().chain(&UDP_ENDPOINTS) {
        let r = row(&backends, "backend", endpoint);
        assert!(r["id"].as_str().unwrap().starts_with("KUBE-SEP-"), "{r}");
    }

    // Refusals are counted by reason from the table's named counters.
    let refused = scenarios::requests(&bed.cluster, "tcp", &format!("{EMPTY_IP}:80"), 2);
    assert!(refused.iter().all(|l| l.contains("ConnectionRefused")));
    let counted = sample_sum(
        &metrics(&bed),
        "proxyagent_datapath_rejects_total",
        &["reason=\"no_endpoints\""],
    );
    assert!(counted >= 2.0, "{}", metrics(&bed));

    udp_flow(&bed);
    let flows = dump(&bed, "conntrack");
    let flow = row(&flows, "client", "10.244.1.10:40053");
    assert_eq!(flow["table"], "conntrack");
    assert_eq!(flow["frontend"], format!("{ECHO_IP}:53/UDP"));
    assert_eq!(flow["service"], "default/echo:dns");
    assert!(UDP_ENDPOINTS.contains(&flow["backend"].as_str().unwrap()));
    assert!(flow["expires_in"].as_u64().unwrap() > 0);
    let trace = live_trace(&bed);
    let pinned = &trace["flows"][0];
    assert_eq!(pinned["table"], "conntrack", "{trace:#}");
    assert_eq!(pinned["client"], "10.244.1.10:40053");
    assert_eq!(pinned["backend"], flow["backend"]);
    assert_eq!(pinned["live_backend"], true);
    let text = tool(
        &bed,
        &[
            "trace",
            "--from",
            "10.244.1.10",
            "--to",
            &format!("{ECHO_IP}:53/udp"),
        ],
    );
    assert!(
        text.contains("flows") && text.contains("10.244.1.10:40053"),
        "{text}"
    );
    println!("{text}");

    // The flow's backend leaves: trace says the flow is pinned to a backend that left
    // until the conntrack cleaner removes it; either way it never shows as live.
    let gone = flow["backend"].as_str().unwrap().replace(":5353", "");
    let stays: Vec<(&'static str, bool, &'static str)> =
        [("10.244.1.2", "node1"), ("10.244.2.2", "node2")]
            .into_iter()
            .map(|(ip, node)| (ip, ip != gone, node))
            .collect();
    scenarios::write_echo_slice(&bed.dir, &stays);
    bed.agent.wait_healthy(&bed.cluster);
    let trace = live_trace(&bed);
    for pinned in trace["flows"].as_array().unwrap() {
        assert!(
            pinned["live_backend"] == true
                || pinned["backend"].as_str().unwrap().starts_with(&gone),
            "{trace:#}"
        );
    }
}

const STICKY_IP: &str = "10.96.0.52";

/// `sessionAffinity: ClientIP`: 20 connections from one client reach one backend, the
/// kernel remembers the client, and `dump affinity` shows it with the time left.
fn sticky(dataplane: &str) {
    let bed = setup_on(&format!("aff{}", &dataplane[..1]), dataplane);
    let service = manifests::service("sticky", STICKY_IP, &[("http", "TCP", 80)]).replacen(
        "spec:\n",
        "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        1,
    );
    manifests::write(&bed.dir, "sticky-svc.yaml", &service);
    let endpoints =
        [("10.244.1.2", "node1"), ("10.244.2.2", "node2")].map(|(ip, node)| manifests::Endpoint {
            ip,
            ready: true,
            node,
        });
    manifests::write(
        &bed.dir,
        "sticky-slice.yaml",
        &manifests::slice("sticky-abc", "sticky", &POD_PORTS[..1], &endpoints),
    );
    // The source notices the new files asynchronously: wait until they are programmed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dump(&bed, "services")
        .iter()
        .any(|r| r["frontend"] == format!("{STICKY_IP}:80/TCP") && r["backends"] == 2)
    {
        assert!(Instant::now() < deadline, "sticky not programmed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let to = format!("{STICKY_IP}:80");
    let lines = scenarios::requests(&bed.cluster, "tcp", &to, 20);
    let pods: std::collections::BTreeSet<&str> = lines
        .iter()
        .map(|l| {
            assert!(l.starts_with("ok "), "{l}");
            l.split_whitespace().nth(1).unwrap()
        })
        .collect();
    assert_eq!(pods.len(), 1, "20 connections, one backend: {lines:?}");
    let rows = dump(&bed, "affinity");
    let remembered = row(&rows, "service", "default/sticky:http");
    let backend = remembered["backend"].as_str().unwrap();
    let pod_ip = if pods.contains("web-a") {
        "10.244.1.2:8080"
    } else {
        "10.244.2.2:8080"
    };
    assert_eq!(backend, pod_ip, "{rows:#?}");
    let left = remembered["expires_in"].as_u64().unwrap();
    assert!(left > 590 && left <= 600, "{remembered}");
    println!("{dataplane}: 20 connections to {pods:?}; remembered {remembered}");
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_with_ebpf() {
    sticky("ebpf");
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_with_nftables() {
    sticky("nftables");
}
