//! The bench's datapath part: connection rate (connect, one request and response,
//! close) from a pod to the last-programmed of N ClusterIPs (the worst case for a rule
//! walk) through kube-proxy's iptables layout, our nftables and our eBPF dataplane. Each
//! path is interleaved, in 50 ms blocks, with a twin that nothing proxies (a client and
//! server on a node of their own), so drift cancels inside each round; the ratio is
//! the median of the rounds', with their spread. "conntrack" is the direct path with
//! connection tracking on, the ceiling of any conntrack-based NAT.
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
/// The paths measured, in order: "direct" (node1's pod to pod, nothing installed: how
/// node1 compares with the twin node), then each dataplane.
pub const MODES: [&str; 5] = ["direct", "conntrack", "iptables", "nftables", "ebpf"];

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

/// The twin path's node, client and server: nothing there is proxied.
const TWIN_NODE: (&str, u8) = ("twin", 3);
/// The node kube-proxy's iptables mode is measured on, with pods of its own: its
/// legacy nat table cannot be removed, and would leave connection tracking on for the
/// modes measured after it on node1.
const IPTABLES_NODE: (&str, u8) = ("ipt", 4);
/// Block length of the interleaving.
const BLOCK_MS: u64 = 50;

/// How long each measurement runs: `rounds` rounds of `round_s` seconds, each an even
/// number of blocks shared by the path and its twin.
#[derive(Debug, Clone, Copy)]
pub struct Rounds {
    pub rounds: usize,
    pub round_s: f64,
}

impl Rounds {
    fn blocks_per_round(self) -> u64 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a few seconds in 50 ms blocks"
        )]
        let blocks = (self.round_s * 1000.0 / float(BLOCK_MS)).round() as u64;
        (blocks.max(2) + 1) & !1
    }
}

/// One side of an interleaved measurement, summed over its clients.
#[derive(Debug, Default)]
struct Side {
    /// Exchanges per block index.
    blocks: std::collections::BTreeMap<u64, u64>,
    rate: Rate,
}

fn now_unix_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit")
}

/// `clients` processes in `pod` running `testpod rate-blocks` in the blocks of `phase`;
/// client `i` pinned to CPU `i` (the servers run on CPU 0).
fn spawn_side(
    cluster: &Cluster,
    pod: &str,
    to: &str,
    clients: usize,
    timing: (u64, u64, u64),
) -> Vec<std::process::Child> {
    let testpod = testpod_bin().display().to_string();
    let (start, blocks, phase) = timing;
    (0..clients)
        .map(|i| {
            let cpu = (i % cpus()).to_string();
            let args = [
                "taskset".to_owned(),
                "-c".to_owned(),
                cpu,
                testpod.clone(),
                "rate-blocks".to_owned(),
                to.to_owned(),
                start.to_string(),
                BLOCK_MS.to_string(),
                blocks.to_string(),
                phase.to_string(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster
                .command_in_pod(pod, &args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect()
}

fn collect(children: Vec<std::process::Child>, active_s: f64) -> Side {
    let mut side = Side::default();
    for child in children {
        let out = child.wait_with_output().expect("client output");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(rest) = line.strip_prefix("block=") {
                let index = rest
                    .split(' ')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                *side.blocks.entry(index).or_default() += field(line, "ok=");
            } else if line.starts_with("ok=") {
                side.rate.per_second += float(field(line, "ok=")) / active_s;
                side.rate.errors += field(line, "err=");
                side.rate.p50_us = side.rate.p50_us.max(float(field(line, "p50_us=")));
                side.rate.p99_us = side.rate.p99_us.max(float(field(line, "p99_us=")));
            }
        }
    }
    side
}

/// One path against its twin, interleaved: the path's rate, the twin's, and the
/// ratio of each round.
#[derive(Debug)]
pub struct Interleaved {
    pub path: Rate,
    pub twin: Rate,
    pub ratios: Vec<f64>,
}

impl Interleaved {
    /// The rounds' median ratio, and their lowest and highest.
    #[must_use]
    pub fn spread(&self) -> (f64, f64, f64) {
        let mut sorted = self.ratios.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q| crate::quantile(&sorted, q).unwrap_or(0.0);
        (at(0.5), at(0.0), at(1.0))
    }

    #[must_use]
    pub fn json(&self) -> Value {
        let (median, low, high) = self.spread();
        let mut v = self.path.json(None);
        v["ratio"] = json!(median);
        v["ratio_min"] = json!(low);
        v["ratio_max"] = json!(high);
        v["ratio_rounds"] = json!(self.ratios);
        v["twin_per_second"] = json!(self.twin.per_second);
        v
    }
}

/// `to` from `client` (a pod) against the twin path, `clients` each, in `rounds`.
fn measure(
    cluster: &Cluster,
    client: &str,
    to: &str,
    clients: usize,
    rounds: Rounds,
) -> Interleaved {
    let per_round = rounds.blocks_per_round();
    let blocks = per_round * rounds.rounds as u64;
    // Time for the clients to start before the first block.
    let start = now_unix_ms() + 400;
    let twin_to = format!("{}:8080", twin_ip(0));
    let path = spawn_side(cluster, client, to, clients, (start, blocks, 0));
    let twin = spawn_side(cluster, "cli-twin", &twin_to, clients, (start, blocks, 1));
    let active_s = float(blocks / 2 * BLOCK_MS) / 1000.0;
    let (path, twin) = (collect(path, active_s), collect(twin, active_s));
    let ratios = (0..rounds.rounds as u64)
        .map(|r| {
            let sum = |side: &Side| -> u64 {
                side.blocks
                    .range(r * per_round..(r + 1) * per_round)
                    .map(|(_, n)| n)
                    .sum()
            };
            let (p, t) = (sum(&path), sum(&twin));
            if t == 0 {
                0.0
            } else {
                float(p) / float(t)
            }
        })
        .collect();
    Interleaved {
        path: path.rate,
        twin: twin.rate,
        ratios,
    }
}

/// Single-client and parallel measurements of one path.
#[derive(Debug)]
struct Pair {
    single: Interleaved,
    parallel: Interleaved,
}

fn measure_pair(cluster: &Cluster, client: &str, to: &str, rounds: Rounds) -> Pair {
    Pair {
        single: measure(cluster, client, to, 1, rounds),
        parallel: measure(cluster, client, to, 2, rounds),
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
    install_on(cluster, "node1", mode, desired, bpffs)
}

/// [`install`] on `node`.
fn install_on(
    cluster: &Cluster,
    node: &str,
    mode: &str,
    desired: &DesiredState,
    bpffs: &Path,
) -> Result<(Installed, f64), String> {
    let netns = cluster.node(node).netns.clone();
    let started = Instant::now();
    let installed = match mode {
        "direct" => Installed::Nothing,
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
    uninstall_on(cluster, "node1", mode, installed, bpffs);
}

/// Removes what `install_on` put in `node`. (iptables-legacy's nat table, and the
/// connection tracking it turns on, stay until the namespace goes: that is why the
/// connection-rate bench runs iptables on a node of its own.)
fn uninstall_on(cluster: &Cluster, node: &str, mode: &str, installed: Installed, bpffs: &Path) {
    let netns = cluster.node(node).netns.clone();
    match (mode, installed) {
        ("conntrack", _) => load_nft(&netns, "delete table ip ctbench"),
        ("iptables", _) => {
            for table in ["nat", "filter"] {
                sh_in(&netns, &["iptables-legacy", "-t", table, "-F"]);
                sh_in(&netns, &["iptables-legacy", "-t", table, "-X"]);
            }
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

/// Empties `node`'s connection-tracking table: each mode starts from none. (A mode
/// that turns tracking on after one that turned it off would meet the first one's
/// entries, stale since: with them, most new connections of one client stalled.)
pub fn forget_connections(cluster: &Cluster, node: &str) {
    let netns = cluster.node(node).netns.clone();
    let forgotten = crate::cluster::within_netns(&netns, || {
        use proxy_agent::dataplane::conntrack::Conntrack;
        let mut table = Conntrack::open().expect("ctnetlink");
        let entries = table.dump().expect("conntrack dump");
        let count = entries.len();
        for entry in entries {
            let _ = table.delete(&entry);
        }
        count
    });
    if forgotten > 0 {
        eprintln!("{node}: {forgotten} tracked connections forgotten");
    }
}

/// Whether `to` answers a short `testpod rate` from `pod`.
fn answers(cluster: &Cluster, pod: &str, to: &str) -> bool {
    let testpod = testpod_bin().display().to_string();
    let out = cluster
        .command_in_pod(pod, &[&testpod, "rate", to, "50"])
        .output()
        .expect("client");
    field(&String::from_utf8_lossy(&out.stdout), "ok=") > 0
}

/// Adds the server and client pods to node1, the twin path's and the iptables mode's to
/// nodes of their own, and waits until every direct path answers; returns node1's.
fn pods(cluster: &mut Cluster) -> String {
    let testpod = testpod_bin().display().to_string();
    cluster.add_node(TWIN_NODE.0, TWIN_NODE.1);
    cluster.add_node(IPTABLES_NODE.0, IPTABLES_NODE.1);
    let servers = SERVERS
        .iter()
        .map(|(name, host)| ("node1", *name, *host))
        .chain([
            (TWIN_NODE.0, "srv-twin", 2),
            (IPTABLES_NODE.0, "srv-ipt-a", 2),
            (IPTABLES_NODE.0, "srv-ipt-b", 3),
        ]);
    for (node, name, host) in servers {
        cluster.add_pod(node, name, host);
        cluster.spawn_in_pod(
            name,
            &["taskset", "-c", "0", &testpod, "serve-rate", "8080"],
        );
    }
    cluster.add_pod("node1", "cli", 10);
    cluster.add_pod(TWIN_NODE.0, "cli-twin", 10);
    cluster.add_pod(IPTABLES_NODE.0, "cli-ipt", 10);
    let direct = format!("{}:8080", server_ip(0));
    let twin = format!("{}:8080", twin_ip(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let ipt = format!("{}:8080", Ipv4Addr::new(10, 244, IPTABLES_NODE.1, 2));
    while !answers(cluster, "cli", &direct)
        || !answers(cluster, "cli-twin", &twin)
        || !answers(cluster, "cli-ipt", &ipt)
    {
        assert!(Instant::now() < deadline, "servers never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    direct
}

/// The twin path's server.
fn twin_ip(_: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, TWIN_NODE.1, 2)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The address of server pod `i`.
#[must_use]
pub fn server_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, SERVERS[i].1)
}

/// Runs every mode at every scale, each against its twin for `rounds`.
#[must_use]
pub fn run(cluster: &mut Cluster, bpffs: &Path, scales: &[usize], rounds: Rounds) -> Value {
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
        let ipt_servers = [1, 2].map(|host| Ipv4Addr::new(10, 244, IPTABLES_NODE.1, host + 1));
        let ipt_desired =
            model::build(&scale::with_endpoints(&snapshot, last, &ipt_servers), &node);
        let target = format!("{}:80", scale::cluster_ip(last));
        let mut twins: Vec<(Rate, Rate)> = Vec::new();
        let mut modes = Vec::new();
        for mode in MODES {
            let (on, client, desired) = if mode == "iptables" {
                (IPTABLES_NODE.0, "cli-ipt", &ipt_desired)
            } else {
                ("node1", "cli", &desired)
            };
            let (installed, install_s) = match install_on(cluster, on, mode, desired, bpffs) {
                Ok(done) => done,
                Err(error) => {
                    eprintln!("{services} Services, {mode}: could not load: {error}");
                    uninstall_on(cluster, on, mode, Installed::Nothing, bpffs);
                    modes.push(json!({"mode": mode, "error": error}));
                    continue;
                }
            };
            let to = if mode == "direct" || mode == "conntrack" {
                &direct
            } else {
                &target
            };
            let got = measure_pair(cluster, client, to, rounds);
            uninstall_on(cluster, on, mode, installed, bpffs);
            forget_connections(cluster, on);
            let (median, low, high) = got.single.spread();
            eprintln!(
                "{services} Services, {mode}: {:.0}/s single ({median:.3}× twin, {low:.3}-{high:.3}), {:.0}/s with 2 clients",
                got.single.path.per_second, got.parallel.path.per_second
            );
            twins.push((got.single.twin, got.parallel.twin));
            modes.push(json!({
                "mode": mode,
                "install_s": install_s,
                "single": got.single.json(),
                "parallel": got.parallel.json(),
            }));
        }
        let mean = |f: fn(&(Rate, Rate)) -> Rate| {
            let n = float(twins.len().max(1) as u64);
            let sum = twins.iter().map(f).fold(Rate::default(), |a, r| Rate {
                per_second: a.per_second + r.per_second / n,
                p50_us: a.p50_us + r.p50_us / n,
                p99_us: a.p99_us + r.p99_us / n,
                errors: a.errors + r.errors,
            });
            sum.json(None)
        };
        let spread: Vec<f64> = twins.iter().map(|t| t.0.per_second).collect();
        rows.push(json!({
            "services": services,
            "target": target,
            "direct": {
                "single": mean(|t| t.0),
                "parallel": mean(|t| t.1),
                "single_runs": spread,
            },
            "modes": modes,
        }));
    }
    json!({
        "rounds": rounds.rounds, "round_s": rounds.round_s, "block_ms": BLOCK_MS,
        "endpoints_per_service": 2, "scales": rows,
    })
}

fn cell(rate: &Value) -> String {
    let f = |k: &str| rate[k].as_f64().unwrap_or(0.0);
    let ratio = rate["ratio"].as_f64().map_or_else(String::new, |r| {
        format!(" ({r:.3}×, {:.3}–{:.3})", f("ratio_min"), f("ratio_max"))
    });
    format!(
        "{:.0}/s{ratio} | {:.0} / {:.0} µs",
        f("per_second"),
        f("p50_us"),
        f("p99_us")
    )
}

/// `mode`'s single-client ratio to its twin at `services` (the rounds' median), and
/// the rounds' lowest and highest, if measured.
#[must_use]
pub fn spread(results: &Value, mode: &str, services: usize) -> Option<(f64, f64, f64)> {
    let cell = &results["scales"]
        .as_array()?
        .iter()
        .find(|r| r["services"] == services)?["modes"]
        .as_array()?
        .iter()
        .find(|m| m["mode"] == mode)?["single"];
    Some((
        cell["ratio"].as_f64()?,
        cell["ratio_min"].as_f64()?,
        cell["ratio_max"].as_f64()?,
    ))
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
        "\n## Connection rate to the last-programmed ClusterIP (2 endpoints per Service), ratio to an unproxied twin\n\nconnect + one-byte request + response + close (with a reset, so no TIME_WAIT) from a pod, client and servers pinned to CPU 0 (the second client to CPU 1). Each path is interleaved in {} ms blocks with a twin path on a node nothing proxies (a pod to a pod), {} rounds of {} s; the ratio is the median of the rounds' ratios with their lowest–highest. \"conntrack\" is the direct path with connection tracking on. Latency is p50 / p99 of one connection; \"direct\" is the twin's mean.\n\n| Services | path | 1 client | latency | 2 clients | latency | errors |\n|---|---|---|---|---|---|---|\n",
        results["block_ms"], results["rounds"], results["round_s"]
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
