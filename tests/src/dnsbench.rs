//! The bench's DNS part: dnsperf against the agent's NodeLocal DNS responder, unbound
//! and dnsmasq, all caching forwarders to one in-process upstream, in one namespace.
use std::{fmt::Write as _, path::Path, process::Stdio, time::Duration};

use serde_json::{json, Value};

use crate::{
    agent::agent_bin,
    cluster::{sh_in, Cluster},
    dns_upstream::Upstream,
    manifests,
    scenarios::SVC_PORTS,
};

pub(crate) const UPSTREAM: &str = "127.0.0.2:53";
/// (name, listen address) of each server measured; unbound is the baseline.
const SERVERS: [(&str, &str); 3] = [
    ("unbound", "127.0.0.11"),
    ("proxy-agent", "127.0.0.10"),
    ("dnsmasq", "127.0.0.12"),
];
/// Alternating rounds per workload.
const ROUNDS: usize = 3;
/// Distinct names of the cache-hit workload.
const NAMES: usize = 100;

fn unbound_config(dir: &Path) -> String {
    format!(
        "server:\n  interface: 127.0.0.11\n  port: 53\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  num-threads: 2\n  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  module-config: \"iterator\"\nforward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.2@53\n",
        dir.display()
    )
}

/// One dnsperf run: queries per second and latency quantiles (seconds) of the answers.
fn dnsperf(netns: &str, server: &str, queries: &Path, seconds: u32) -> Value {
    dnsperf_at(netns, server, queries, seconds, None)
}

/// [`dnsperf`] sending at most `max_qps` queries per second (a steady load, not a
/// saturating one), when given.
pub(crate) fn dnsperf_at(
    netns: &str,
    server: &str,
    queries: &Path,
    seconds: u32,
    max_qps: Option<u32>,
) -> Value {
    let length = seconds.to_string();
    let file = queries.display().to_string();
    let mut args = vec![
        "dnsperf", "-s", server, "-d", &file, "-l", &length, "-c", "2", "-q", "64", "-v",
    ];
    let limit = max_qps.map(|q| q.to_string());
    if let Some(limit) = &limit {
        args.extend(["-Q", limit.as_str()]);
    }
    let out = sh_in(netns, &args);
    let qps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut latencies: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> NOERROR"))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| crate::quantile(&latencies, p).unwrap_or(0.0);
    json!({"qps": qps, "p50_s": q(0.5), "p99_s": q(0.99), "answers": latencies.len()})
}

/// unbound, dnsmasq and the agent on node1, forwarding to the upstream.
fn start_servers(cluster: &mut Cluster, dir: &Path, manifests_dir: &Path) {
    let conf = dir.join("unbound.conf");
    std::fs::write(&conf, unbound_config(dir)).expect("unbound.conf");
    let conf = conf.display().to_string();
    cluster.spawn_on_node(
        "node1",
        "unbound",
        &["unbound", "-d", "-c", &conf],
        Stdio::null(),
    );
    cluster.spawn_on_node(
        "node1",
        "dnsmasq",
        &[
            "dnsmasq",
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--server=127.0.0.2",
            "--listen-address=127.0.0.12",
            "--bind-interfaces",
            "--cache-size=10000",
            "-u",
            "root",
            "--pid-file=",
        ],
        Stdio::null(),
    );
    let agent = agent_bin().display().to_string();
    let manifests_arg = manifests_dir.display().to_string();
    cluster.spawn_on_node(
        "node1",
        "dns-agent",
        &[
            &agent,
            "run",
            "--manifests",
            &manifests_arg,
            "--node-name",
            "node1",
            "--dataplane",
            "none",
            "--dns-listen",
            "127.0.0.10",
            "--dns-forward",
            UPSTREAM,
        ],
        Stdio::null(),
    );
}

/// Starts the three servers on node1 of `cluster`, warms their caches, and measures
/// each workload for `seconds`, the baseline first.
#[must_use]
pub fn run(cluster: &mut Cluster, seconds: u32) -> Value {
    let netns = cluster.node("node1").netns.clone();
    let _upstream = Upstream::start(&netns, UPSTREAM);
    let dir = cluster.scratch().join("dns-bench");
    std::fs::create_dir_all(&dir).expect("dns bench dir");
    let manifests_dir = dir.join("manifests");
    std::fs::create_dir_all(&manifests_dir).expect("manifests dir");
    manifests::write(
        &manifests_dir,
        "echo.yaml",
        &manifests::service("echo", "10.96.0.50", &SVC_PORTS),
    );
    start_servers(cluster, &dir, &manifests_dir);
    let hits = dir.join("cache-hit.txt");
    let names = (0..NAMES).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "host{i}.example.org A");
        text
    });
    std::fs::write(&hits, names).expect("queries");
    let cluster_names = dir.join("cluster-name.txt");
    std::fs::write(&cluster_names, "echo.default.svc.cluster.local A\n").expect("queries");
    // Every server up and every name cached before anything is timed.
    for (name, server) in SERVERS {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = std::process::Command::new("nsenter")
                .args([&format!("--net=/run/netns/{netns}"), "--", "dig", "+short"])
                .args([
                    "+time=1",
                    "+tries=1",
                    &format!("@{server}"),
                    "host0.example.org",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if out.contains("192.0.2.1") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} does not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for file in [&hits, &cluster_names] {
            dnsperf(&netns, server, file, 1);
        }
    }
    let mut results = serde_json::Map::new();
    for (workload, file) in [("cache_hit", &hits), ("cluster_name", &cluster_names)] {
        // Rounds alternate the servers, so a drifting machine affects each alike; each
        // server's median round is reported.
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); SERVERS.len()];
        for _ in 0..ROUNDS {
            for (i, (_, server)) in SERVERS.iter().enumerate() {
                runs[i].push(dnsperf(&netns, server, file, seconds));
            }
        }
        let mut row = serde_json::Map::new();
        for ((name, _), mut cells) in SERVERS.iter().zip(runs) {
            cells.sort_by(|a, b| {
                a["qps"]
                    .as_f64()
                    .unwrap_or(0.0)
                    .total_cmp(&b["qps"].as_f64().unwrap_or(0.0))
            });
            let qps: Vec<Value> = cells.iter().map(|c| c["qps"].clone()).collect();
            let mut median = cells[cells.len() / 2].clone();
            median["rounds_qps"] = Value::Array(qps);
            row.insert((*name).to_owned(), median);
        }
        results.insert(workload.to_owned(), Value::Object(row));
    }
    for role in ["dns-agent", "unbound", "dnsmasq"] {
        cluster.terminate("node1", role);
    }
    json!({
        "seconds": seconds,
        "rounds": ROUNDS,
        "servers": SERVERS.iter().map(|(n, a)| json!({"name": n, "address": a})).collect::<Vec<_>>(),
        "workloads": results,
    })
}
