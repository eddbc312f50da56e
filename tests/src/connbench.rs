//! The bench's datapath part: connection rate (connect, one request and response,
//! close) from a pod to the last-programmed of N ClusterIPs (the worst case for a rule
//! walk) through kube-proxy's iptables layout, our nftables and our eBPF dataplane. Each
//! measurement sits between two of the direct path to the pod, so the ratio cancels the
//! machine's drift; "conntrack" is the direct path with connection tracking on, the
//! ceiling of any conntrack-based NAT.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_agent::{
    dataplane::{ebpf, nftables::NftablesDataplane, Dataplane},
    model::{self, DesiredState, NodeInfo},
};
use serde_json::{json, Value};

use crate::{
    agent::testpod_bin,
    cluster::{sh_in, Cluster},
    kube_proxy, scale,
};

/// The two backends of the measured Service, on node1: (pod, host byte).
const SERVERS: [(&str, u8); 2] = [("srv-a", 2), ("srv-b", 3)];
const POD_CIDR: &str = "10.244.0.0/16";
/// The dataplanes measured, in order, each between two direct measurements.
pub const MODES: [&str; 4] = ["conntrack", "iptables", "nftables", "ebpf"];

/// Connections per second and latency of one measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

impl Rate {
    /// A client's `ok=N err=M p50_us=X p99_us=Y` line over `seconds`.
    #[must_use]
    pub fn parse(text: &str, seconds: f64) -> Self {
        let line = text.lines().next().unwrap_or_default();
        Self {
            per_second: float(field(line, "ok=")) / seconds,
            errors: field(line, "err="),
            p50_us: float(field(line, "p50_us=")),
            p99_us: float(field(line, "p99_us=")),
        }
    }

    #[must_use]
    pub fn json(&self, baseline: Option<f64>) -> Value {
        let mut v = json!({
            "per_second": self.per_second, "p50_us": self.p50_us,
            "p99_us": self.p99_us, "errors": self.errors,
        });
        if let Some(base) = baseline.filter(|b| *b > 0.0) {
            v["ratio"] = json!(self.per_second / base);
        }
        v
    }
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Counts and microseconds as floats (all far below 2^52).
#[allow(clippy::cast_precision_loss, reason = "small counts")]
fn float(n: u64) -> f64 {
    n as f64
}

/// `clients` processes in the client pod connecting to `to` for `seconds`, client `i`
/// pinned to CPU `i` (the servers run on CPU 0: one client never wakes another CPU).
fn measure(cluster: &Cluster, to: &str, seconds: f64, clients: usize) -> Rate {
    let testpod = testpod_bin().display().to_string();
    let millis = format!("{}", (seconds * 1000.0).round());
    let children: Vec<_> = (0..clients)
        .map(|i| {
            let cpu = (i % cpus()).to_string();
            cluster
                .command_in_pod(
                    "cli",
                    &["taskset", "-c", &cpu, &testpod, "rate", to, &millis],
                )
                .stdout(Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect();
    let mut rate = Rate::default();
    for child in children {
        let out = child.wait_with_output().expect("client output");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or_default();
        rate.per_second += float(field(line, "ok=")) / seconds;
        rate.errors += field(line, "err=");
        rate.p50_us = rate.p50_us.max(float(field(line, "p50_us=")));
        rate.p99_us = rate.p99_us.max(float(field(line, "p99_us=")));
    }
    rate
}

/// Single-client and parallel measurements of one path.
#[derive(Debug, Clone, Copy)]
struct Pair {
    single: Rate,
    parallel: Rate,
}

fn measure_pair(cluster: &Cluster, to: &str, seconds: f64) -> Pair {
    Pair {
        single: measure(cluster, to, seconds, 1),
        parallel: measure(cluster, to, seconds, 2),
    }
}

/// node1 with the pod CIDR as `--cluster-cidr`.
#[must_use]
pub fn node_info() -> NodeInfo {
    NodeInfo {
        cluster_cidrs: vec![POD_CIDR.parse().expect("cidr")],
        ..NodeInfo::named("node1")
    }
}

/// What a mode leaves installed, to be removed after its measurement.
pub enum Installed {
    Nothing,
    Ebpf(Box<ebpf::EbpfDataplane>),
}

/// Programs `mode` for `desired` in node1; seconds it took, or why it could not load.
///
/// # Errors
/// When the mode's rules or programs do not load.
pub fn install(
    cluster: &Cluster,
    mode: &str,
    desired: &DesiredState,
    bpffs: &Path,
) -> Result<(Installed, f64), String> {
    let netns = cluster.node("node1").netns.clone();
    let started = Instant::now();
    let installed = match mode {
        "conntrack" => {
            load_nft(
                &netns,
                "table ip ctbench {\n\tchain pre {\n\t\ttype filter hook prerouting priority 0; policy accept;\n\t\tct state new accept\n\t}\n}\n",
            );
            Installed::Nothing
        }
        "iptables" => {
            let rules = kube_proxy::iptables::ruleset(desired, POD_CIDR);
            crate::cluster::try_sh_in_with_stdin(
                &netns,
                &["iptables-legacy-restore", "--noflush"],
                &rules,
            )?;
            for (chain, target) in [
                ("PREROUTING", "KUBE-SERVICES"),
                ("OUTPUT", "KUBE-SERVICES"),
                ("POSTROUTING", "KUBE-POSTROUTING"),
            ] {
                sh_in(
                    &netns,
                    &["iptables-legacy", "-t", "nat", "-A", chain, "-j", target],
                );
            }
            Installed::Nothing
        }
        "nftables" => {
            let path = PathBuf::from(format!("/run/netns/{netns}"));
            let mut nft = NftablesDataplane::start_in(node_info().cluster_cidrs, Some(path))
                .expect("nftables");
            nft.apply(&model::diff(&DesiredState::default(), desired), desired)
                .expect("nftables apply");
            Installed::Nothing
        }
        _ => {
            let mut dp = ebpf::EbpfDataplane::start(
                bpffs,
                &cluster.node("node1").cgroup,
                None,
                ebpf::Sizing::default(),
            )
            .expect("ebpf");
            dp.apply(&model::diff(&DesiredState::default(), desired), desired)
                .expect("ebpf apply");
            Installed::Ebpf(Box::new(dp))
        }
    };
    Ok((installed, started.elapsed().as_secs_f64()))
}

fn load_nft(netns: &str, text: &str) {
    crate::cluster::sh_in_with_stdin(netns, &["nft", "-f", "-"], text);
}

/// Removes what `install` put in node1 for a mode other than eBPF.
pub fn uninstall_mode(cluster: &Cluster, mode: &str, bpffs: &Path) {
    uninstall(cluster, mode, Installed::Nothing, bpffs);
}

/// Removes what `install` put in node1.
fn uninstall(cluster: &Cluster, mode: &str, installed: Installed, bpffs: &Path) {
    let netns = cluster.node("node1").netns.clone();
    match (mode, installed) {
        ("conntrack", _) => load_nft(&netns, "delete table ip ctbench"),
        ("iptables", _) => {
            sh_in(&netns, &["iptables-legacy", "-t", "nat", "-F"]);
            sh_in(&netns, &["iptables-legacy", "-t", "nat", "-X"]);
        }
        ("nftables", _) => load_nft(
            &netns,
            &proxy_agent::dataplane::nftables::ruleset::removal(),
        ),
        (_, Installed::Ebpf(dp)) => {
            drop(dp);
            ebpf::loader::cleanup(bpffs).expect("eBPF cleanup");
        }
        _ => {}
    }
}

/// Adds the server and client pods to node1 and waits until the direct path answers.
fn pods(cluster: &mut Cluster) -> String {
    let testpod = testpod_bin().display().to_string();
    for (name, host) in SERVERS {
        cluster.add_pod("node1", name, host);
        cluster.spawn_in_pod(
            name,
            &["taskset", "-c", "0", &testpod, "serve-rate", "8080"],
        );
    }
    cluster.add_pod("node1", "cli", 10);
    let direct = format!("{}:8080", server_ip(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while measure(cluster, &direct, 0.05, 1).per_second == 0.0 {
        assert!(Instant::now() < deadline, "servers never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    direct
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The address of server pod `i`.
#[must_use]
pub fn server_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, SERVERS[i].1)
}

/// Runs every mode at every scale; `seconds` per measurement.
#[must_use]
pub fn run(cluster: &mut Cluster, bpffs: &Path, scales: &[usize], seconds: f64) -> Value {
    let direct = pods(cluster);
    let node = node_info();
    let mut rows = Vec::new();
    for &services in scales {
        let last = services - 1;
        let snapshot = scale::with_endpoints(
            &scale::snapshot(services, 2),
            last,
            &[server_ip(0), server_ip(1)],
        );
        let desired = model::build(&snapshot, &node);
        let target = format!("{}:80", scale::cluster_ip(last));
        let mut before = measure_pair(cluster, &direct, seconds);
        let mut directs = vec![before];
        let mut modes = Vec::new();
        for mode in MODES {
            let (installed, install_s) = match install(cluster, mode, &desired, bpffs) {
                Ok(done) => done,
                Err(error) => {
                    eprintln!("{services} Services, {mode}: could not load: {error}");
                    uninstall(cluster, mode, Installed::Nothing, bpffs);
                    modes.push(json!({"mode": mode, "error": error}));
                    continue;
                }
            };
            let to = if mode == "conntrack" {
                &direct
            } else {
                &target
            };
            let got = measure_pair(cluster, to, seconds);
            uninstall(cluster, mode, installed, bpffs);
            let after = measure_pair(cluster, &direct, seconds);
            let base = |f: fn(&Pair) -> f64| f64::midpoint(f(&before), f(&after));
            modes.push(json!({
                "mode": mode,
                "install_s": install_s,
                "single": got.single.json(Some(base(|p| p.single.per_second))),
                "parallel": got.parallel.json(Some(base(|p| p.parallel.per_second))),
            }));
            eprintln!(
                "{services} Services, {mode}: {:.0}/s single ({:.3}× direct), {:.0}/s with 2 clients",
                got.single.per_second,
                got.single.per_second / base(|p| p.single.per_second),
                got.parallel.per_second
            );
            directs.push(after);
            before = after;
        }
        let mean = |f: fn(&Pair) -> Rate| {
            let n = float(directs.len() as u64);
            let sum = directs.iter().map(f).fold(Rate::default(), |a, r| Rate {
                per_second: a.per_second + r.per_second / n,
                p50_us: a.p50_us + r.p50_us / n,
                p99_us: a.p99_us + r.p99_us / n,
                errors: a.errors + r.errors,
            });
            sum.json(None)
        };
        let spread: Vec<f64> = directs.iter().map(|d| d.single.per_second).collect();
        rows.push(json!({
            "services": services,
            "target": target,
            "direct": {
                "single": mean(|p| p.single),
                "parallel": mean(|p| p.parallel),
                "single_runs": spread,
            },
            "modes": modes,
        }));
    }
    json!({"seconds_per_measurement": seconds, "endpoints_per_service": 2, "scales": rows})
}

fn cell(rate: &Value) -> String {
    let f = |k: &str| rate[k].as_f64().unwrap_or(0.0);
    let ratio = rate["ratio"]
        .as_f64()
        .map_or_else(String::new, |r| format!(" ({r:.3}×)"));
    format!(
        "{:.0}/s{ratio} | {:.0} / {:.0} µs",
        f("per_second"),
        f("p50_us"),
        f("p99_us")
    )
}

/// The ratio of `mode`'s single-client rate to direct at `services`, if measured.
#[must_use]
pub fn ratio(results: &Value, mode: &str, services: usize) -> Option<f64> {
    results["scales"]
        .as_array()?
        .iter()
        .find(|r| r["services"] == services)?["modes"]
        .as_array()?
        .iter()
        .find(|m| m["mode"] == mode)?["single"]["ratio"]
        .as_f64()
}

/// The markdown section of the datapath results.
#[must_use]
pub fn report(results: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = format!(
        "\n## Connection rate to the last-programmed ClusterIP (2 endpoints per Service), ratio to direct\n\nconnect + one-byte request + response + close (with a reset, so no TIME_WAIT) from a pod, client and servers pinned to CPU 0 (the second client to CPU 1), {} s per measurement, each between two direct ones (the ratio uses their mean: drift-corrected); \"conntrack\" is the direct path with connection tracking on. Latency is p50 / p99 of one connection.\n\n| Services | path | 1 client | latency | 2 clients | latency | errors |\n|---|---|---|---|---|---|---|\n",
        results["seconds_per_measurement"]
    );
    for row in results["scales"].as_array().into_iter().flatten() {
        let services = &row["services"];
        let _ = writeln!(
            md,
            "| {services} | direct | {} | {} | 0 |",
            cell(&row["direct"]["single"]),
            cell(&row["direct"]["parallel"])
        );
        for mode in row["modes"].as_array().into_iter().flatten() {
            if let Some(error) = mode["error"].as_str() {
                let _ = writeln!(
                    md,
                    "| {services} | {} | failed to load: {} | | | | |",
                    mode["mode"].as_str().unwrap_or("?"),
                    error.lines().next().unwrap_or_default()
                );
                continue;
            }
            let errors = mode["single"]["errors"].as_u64().unwrap_or(0)
                + mode["parallel"]["errors"].as_u64().unwrap_or(0);
            let _ = writeln!(
                md,
                "| {services} | {} | {} | {} | {errors} |",
                mode["mode"].as_str().unwrap_or("?"),
                cell(&mode["single"]),
                cell(&mode["parallel"])
            );
        }
    }
    md
}
