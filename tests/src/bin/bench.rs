//! `cargo xtask bench`: programming cost of each dataplane against kube-proxy's iptables
//! mode, measured in one run on this machine, in network namespaces of its own. Writes
//! `report.md` and `results.json` to the directory given with `--out`.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use proxy_agent::{
    dataplane::{
        ebpf::{EbpfDataplane, Sizing},
        nftables::NftablesDataplane,
        Dataplane,
    },
    model::{self, DesiredState, NodeInfo},
};
use proxy_agent_tests::{
    cluster::{sh_in, sh_in_with_stdin, Cluster},
    connbench, dnsbench, kpbench, nodeportbench, rssbench, scale,
};
use serde_json::{json, Value};

const ENDPOINTS: usize = 10;
const CLUSTER_CIDR: &str = "10.128.0.0/9";
/// The largest scale whose ruleset is also loaded through `nft -j -f`.
const JSON_UP_TO: usize = 10_000;

struct Config {
    dns_seconds: u32,
    datapath_scales: Vec<usize>,
    datapath_seconds: f64,
    datapath_rounds: connbench::Rounds,
    scales: Vec<usize>,
    change_scale: usize,
    repeats: usize,
}

impl Config {
    /// The DNS-under-churn and NodePort rows' scale: the largest up to 10 000.
    fn scale_to_10k(&self) -> usize {
        self.scales
            .iter()
            .copied()
            .filter(|n| *n <= 10_000)
            .max()
            .unwrap_or(1_000)
    }
}

/// Seconds of each repeat, and what they summarise to.
struct Sample {
    seconds: Vec<f64>,
}

impl Sample {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.seconds.clone();
        sorted.sort_by(f64::total_cmp);
        proxy_agent_tests::quantile(&sorted, q).expect("a sample of at least one run")
    }
    fn json(&self) -> Value {
        json!({"p50": self.quantile(0.5), "p99": self.quantile(0.99), "runs": self.seconds})
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64()
}

fn run_with_stdin(netns: &str, args: &[&str], input: &str) -> f64 {
    timed(|| sh_in_with_stdin(netns, args, input))
}

/// `nft -j list` output as `nft -j -f` input through the nftables crate's typed schema:
/// our tables read as its objects and serialized back by it (`listing::batch`).
fn typed_batch(listing: &str) -> String {
    use proxy_agent::dataplane::nftables::listing;
    let objects = listing::ours(listing).expect("our tables read as the crate's schema");
    listing::batch(objects).expect("serializable")
}

/// `nft list ruleset` without comments (the schema keeps no table or chain comment).
fn uncommented(listing: &str) -> String {
    listing
        .lines()
        .filter(|l| !l.trim_start().starts_with("comment "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{netns}"))
}

fn apply(dp: &mut dyn Dataplane, from: &DesiredState, to: &DesiredState) -> (f64, usize) {
    let started = Instant::now();
    let applied = dp.apply(&model::diff(from, to), to).expect("apply");
    (started.elapsed().as_secs_f64(), applied.writes)
}

/// Full programming of `services` Services by each dataplane and the baseline.
fn full_syncs(cluster: &Cluster, ebpf: &mut EbpfDataplane, services: usize) -> Value {
    let snapshot = scale::snapshot(services, ENDPOINTS);
    let node = node_info();
    let mut desired = DesiredState::default();
    let build = timed(|| desired = model::build(&snapshot, &node));
    let nft_ns = cluster.add_netns(&format!("nft{services}"));
    let mut nft =
        NftablesDataplane::start_in(node.cluster_cidrs.clone(), Some(netns_path(&nft_ns)))
            .expect("nftables");
    let (nft_secs, nft_ops) = apply(&mut nft, &DesiredState::default(), &desired);
    // Above 10 000 Services `nft -j list ruleset` alone runs for minutes and takes
    // gigabytes, and text input has won at every scale measured: JSON stops there.
    let json_ns = cluster.add_netns(&format!("json{services}"));
    let json_secs = (services <= JSON_UP_TO).then(|| {
        let exported = typed_batch(&sh_in(&nft_ns, &["nft", "-j", "list", "ruleset"]));
        run_with_stdin(&json_ns, &["nft", "-j", "-f", "-"], &exported)
    });
    // The typed round trip must load what the text did, comments aside, or its time
    // means nothing; checked where listing is quick (nft's listing is quadratic).
    let json_same = json_secs.filter(|_| services <= 1_000).map(|_| {
        let list = |ns: &str| uncommented(&sh_in(ns, &["nft", "list", "ruleset"]));
        list(&nft_ns) == list(&json_ns)
    });
    let mut baselines =
        kpbench::Baseline::all(cluster, &services.to_string(), services, CLUSTER_CIDR);
    // kube-proxy's layouts can fail to load at all at large scales: that is a result.
    let kube_proxy = kpbench::full_syncs(&mut baselines, &desired);
    drop(baselines);
    let legacy = &kube_proxy["kube_proxy_iptables_legacy"];
    let (ebpf_secs, ebpf_writes) = apply(ebpf, &DesiredState::default(), &desired);
    let (_, _) = apply(ebpf, &desired, &DesiredState::default());
    for ns in [&nft_ns, &json_ns] {
        let _ = Command::new("ip").args(["netns", "delete", ns]).status();
    }
    eprintln!(
        "{services} Services: model {build:.2} s, nftables {nft_secs:.2} s (json {json_secs:.2?} s), ebpf {ebpf_secs:.2} s"
    );
    json!({
        "services": services, "endpoints_per_service": ENDPOINTS,
        "model_build_s": build,
        "kube_proxy": kube_proxy,
        "iptables_restore_s": legacy["s"], "iptables_error": legacy["error"],
        "iptables_rules": legacy["lines"],
        "nftables_s": nft_secs, "nftables_statements": nft_ops,
        "nftables_json_input_s": json_secs, "nftables_json_same_ruleset": json_same,
        "ebpf_s": ebpf_secs, "ebpf_map_writes": ebpf_writes,
    })
}

/// One endpoint of one Service moving, repeatedly, at `services` Services: our
/// dataplanes' plan and apply against kube-proxy's partial syncs, each baseline as it
/// runs (iptables on legacy and nft, nftables mode).
fn endpoint_changes(cluster: &Cluster, ebpf: &mut EbpfDataplane, cfg: &Config) -> Value {
    let services = cfg.change_scale;
    let snapshot = scale::snapshot(services, ENDPOINTS);
    let node = node_info();
    let a = model::build(&snapshot, &node);
    let moved = scale::with_endpoint(&snapshot, services / 2, "10.127.0.1".parse().expect("ip"));
    let b = model::build(&moved, &node);
    let nft_ns = cluster.add_netns("nftchg");
    let mut nft =
        NftablesDataplane::start_in(node.cluster_cidrs.clone(), Some(netns_path(&nft_ns)))
            .expect("nftables");
    apply(&mut nft, &DesiredState::default(), &a);
    apply(ebpf, &DesiredState::default(), &a);
    let mut baselines = kpbench::Baseline::all(cluster, "chg", services, CLUSTER_CIDR);
    for baseline in &mut baselines {
        if let Err(error) = baseline.sync(&a, true) {
            eprintln!("{}: its first sync failed: {error}", baseline.name);
        }
    }
    let (mut nft_secs, mut ebpf_secs) = (Vec::new(), Vec::new());
    // Each baseline's times, the part of them reading the table back, lines written.
    let mut kube_proxy: Vec<(Vec<f64>, Vec<f64>, usize)> =
        vec![(Vec::new(), Vec::new(), 0); baselines.len()];
    let (mut nft_ops, mut ebpf_writes) = (0, 0);
    // iptables partial restores still rewrite KUBE-SERVICES whole (seconds at 10 000 on
    // iptables-nft): a quarter of the repeats keep the run within its time.
    let iptables_every = if cfg.repeats >= 8 { 4 } else { 1 };
    for r in 0..cfg.repeats {
        let (from, to) = if r.is_multiple_of(2) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        let (s, ops) = apply(&mut nft, from, to);
        nft_secs.push(s);
        nft_ops = nft_ops.max(ops);
        let (s, writes) = apply(ebpf, from, to);
        ebpf_secs.push(s);
        ebpf_writes = ebpf_writes.max(writes);
        for (baseline, (samples, read_back, lines)) in baselines.iter_mut().zip(&mut kube_proxy) {
            // Every baseline follows every change; the slow ones are timed on some.
            let timed = baseline.key() == "kube_proxy_nftables" || r.is_multiple_of(iptables_every);
            let Ok((s, written)) = baseline.sync(to, false) else {
                continue;
            };
            if timed {
                samples.push(s);
                read_back.push(baseline.last_read_back_s);
                *lines = (*lines).max(written);
            }
        }
    }
    let last = if cfg.repeats.is_multiple_of(2) {
        &a
    } else {
        &b
    };
    apply(ebpf, last, &DesiredState::default());
    let _ = Command::new("ip")
        .args(["netns", "delete", &nft_ns])
        .status();
    let (nft_secs, ebpf_secs) = (Sample { seconds: nft_secs }, Sample { seconds: ebpf_secs });
    let mut row = json!({
        "services": services, "repeats": cfg.repeats,
        "iptables_repeats": cfg.repeats.div_ceil(iptables_every),
        "nftables_partial": nft_secs.json(), "nftables_statements": nft_ops,
        "ebpf": ebpf_secs.json(), "ebpf_map_writes": ebpf_writes,
    });
    for (baseline, (samples, read_back, lines)) in baselines.iter().zip(kube_proxy) {
        if let Some(error) = &baseline.failed {
            row[baseline.key()] = json!({"error": error});
            continue;
        }
        let sample = Sample { seconds: samples };
        let read_back = Sample { seconds: read_back };
        eprintln!(
            "one endpoint change at {services}: {} p50 {:.4} s ({lines} lines)",
            baseline.name,
            sample.quantile(0.5)
        );
        let mut cell = sample.json();
        cell["lines"] = json!(lines);
        cell["read_back_p50"] = json!(read_back.quantile(0.5));
        row[baseline.key()] = cell;
    }
    eprintln!(
        "one endpoint change at {services}: nftables p50 {:.4} s ({nft_ops} statements), ebpf p50 {:.5} s ({ebpf_writes} writes)",
        nft_secs.quantile(0.5),
        ebpf_secs.quantile(0.5)
    );
    row
}

fn node_info() -> NodeInfo {
    NodeInfo {
        cluster_cidrs: vec![CLUSTER_CIDR.parse().expect("cidr")],
        ..NodeInfo::named("node1")
    }
}

fn ratio(x: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.3}×", x / baseline)
    } else {
        "n/a".to_owned()
    }
}

/// kube-proxy's baselines in report order: JSON key and column name.
const KUBE_PROXY: [(&str, &str); 3] = [
    ("kube_proxy_iptables_legacy", "kube-proxy iptables (legacy)"),
    ("kube_proxy_iptables_nft", "kube-proxy iptables (nft)"),
    ("kube_proxy_nftables", "kube-proxy nftables"),
];

/// A time and its ratio to `base`.
fn cell(seconds: Option<f64>, base: f64, digits: usize) -> String {
    seconds.map_or_else(
        || "not measured".to_owned(),
        |s| format!("{s:.digits$} s ({})", ratio(s, base)),
    )
}

fn full_sync_report(md: &mut String, results: &Value) {
    md.push_str("## Full sync (Services × 10 endpoints), ratio to kube-proxy's nftables mode\n\n| Services | kube-proxy iptables (legacy) | kube-proxy iptables (nft) | kube-proxy nftables | nftables | nftables (JSON input) | eBPF | nftables statements | eBPF map writes | model build |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for row in results["full_sync"].as_array().into_iter().flatten() {
        let kp = &row["kube_proxy"];
        let base = kp["kube_proxy_nftables"]["s"].as_f64().unwrap_or(0.0);
        let baselines: Vec<String> = KUBE_PROXY
            .iter()
            .map(
                |(key, _)| match (kp[key]["s"].as_f64(), kp[key]["error"].as_str()) {
                    (Some(s), _) => {
                        format!("{s:.2} s ({}, {} lines)", ratio(s, base), kp[key]["lines"])
                    }
                    (None, Some(error)) if error.starts_with("stopped") => error.to_owned(),
                    (None, Some(_)) => "failed to load".to_owned(),
                    (None, None) => "not measured".to_owned(),
                },
            )
            .collect();
        let f = |k: &str| row[k].as_f64();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
            row["services"],
            baselines.join(" | "),
            cell(f("nftables_s"), base, 2),
            cell(f("nftables_json_input_s"), base, 2),
            cell(f("ebpf_s"), base, 3),
            row["nftables_statements"],
            row["ebpf_map_writes"],
            f("model_build_s").unwrap_or(0.0),
        );
    }
    let _ = writeln!(
        md,
        "\nkube-proxy's rows are its own rulesets for the same Services (`tests/src/kube_proxy`, checked against its `TestOverall*Rules` layouts): iptables mode as `iptables-restore --noflush` of its filter and nat tables on each backend (iptables-nft up to {} Services), nftables mode as `nft -f` of its transaction plus the chain and set listings each of its syncs makes. Deviations from kube-proxy as it runs: no nfacct counters (this kernel has none; kube-proxy then writes the same rules without them); the jump rules from the built-in chains are installed once, not checked on each full sync; its nftables mode's stale chains are deleted by the next sync rather than after a second; restores still running after {} s are stopped.",
        kpbench::IPTABLES_NFT_UP_TO,
        kpbench::RESTORE_LIMIT_S
    );
}

fn endpoint_change_report(md: &mut String, c: &Value) {
    let q = |k: &str, p: &str| c[k][p].as_f64();
    let base = q("kube_proxy_nftables", "p50").unwrap_or(0.0);
    let _ = writeln!(
        md,
        "\n## One endpoint change at {} Services ({} repeats; iptables {}), ratio to kube-proxy's nftables mode\n\n| dataplane | p50 | p99 | ratio (p50) | written |\n|---|---|---|---|---|",
        c["services"], c["repeats"], c["iptables_repeats"],
    );
    for (key, name) in KUBE_PROXY {
        if let Some(error) = c[key]["error"].as_str() {
            let _ = writeln!(md, "| {name} (partial sync) | {error} | | | |");
        }
        if let (Some(p50), Some(p99)) = (q(key, "p50"), q(key, "p99")) {
            let _ = writeln!(
                md,
                "| {name} (partial sync) | {p50:.4} s (reading back {:.4} s) | {p99:.4} s | {} | {} lines |",
                q(key, "read_back_p50").unwrap_or(0.0),
                ratio(p50, base),
                c[key]["lines"]
            );
        }
    }
    for (key, name, unit, ops) in [
        (
            "nftables_partial",
            "nftables (partial)",
            "statements",
            "nftables_statements",
        ),
        ("ebpf", "eBPF", "map writes", "ebpf_map_writes"),
    ] {
        let (p50, p99) = (q(key, "p50").unwrap_or(0.0), q(key, "p99").unwrap_or(0.0));
        let _ = writeln!(
            md,
            "| {name} | {p50:.5} s | {p99:.5} s | {} | {} {unit} |",
            ratio(p50, base),
            c[ops]
        );
    }
}

fn report(results: &Value) -> String {
    let mut md = String::from("# proxy-agent bench\n\n");
    let _ = writeln!(
        md,
        "Machine: {}; kernel {}; {}; {} (kube-proxy's nftables rows pay this nft's cache fetches, which grow with the table).\n",
        results["machine"]["cpu"].as_str().unwrap_or("?"),
        results["machine"]["kernel"].as_str().unwrap_or("?"),
        results["machine"]["iptables"].as_str().unwrap_or("?"),
        results["machine"]["nft"].as_str().unwrap_or("?")
    );
    let run = &results["run"];
    let _ = writeln!(
        md,
        "Run: **{}** (`--quick` when quick): full syncs at {} Services; one endpoint change repeated {} times; end-to-end changes {} times per row; connection rate at {} Services in {} rounds of {} s (50 ms blocks against a twin path); NodePort {} s per measurement; DNS {} s rounds.\n",
        run["kind"].as_str().unwrap_or(if results["quick"] == true { "quick" } else { "full" }),
        run["scales"],
        run["change_repeats"],
        run["change_e2e_repeats"],
        run["datapath_scales"],
        run["datapath_rounds"],
        run["datapath_round_s"],
        run["nodeport_seconds"],
        run["dns_seconds"],
    );
    full_sync_report(&mut md, results);
    endpoint_change_report(&mut md, &results["endpoint_change"]);
    let d = &results["dns"];
    let _ = writeln!(
        md,
        "\n## NodeLocal DNS, dnsperf (2 clients, 64 outstanding), median of {} alternating {} s rounds, ratio to unbound\n\n| workload | server | QPS | ratio | p50 | p99 | QPS of each round |\n|---|---|---|---|---|---|---|",
        d["rounds"],
        d["seconds"]
    );
    for (workload, title) in [
        ("cache_hit", "cache hit (100 names)"),
        ("cluster_name", "cluster name"),
    ] {
        let row = &d["workloads"][workload];
        let base = row["unbound"]["qps"].as_f64().unwrap_or(0.0);
        for server in ["unbound", "proxy-agent", "dnsmasq"] {
            let cell = &row[server];
            let f = |k: &str| cell[k].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                md,
                "| {title} | {server} | {:.0} | {} | {:.3} ms | {:.3} ms | {} |",
                f("qps"),
                ratio(f("qps"), base),
                f("p50_s") * 1000.0,
                f("p99_s") * 1000.0,
                cell["rounds_qps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|q| format!("{:.0}", q.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    md.push_str("\nTimes are the plan (`model::diff`) and the dataplane's `apply` (render and load), not the model build, which all share. The nftables JSON column loads the same ruleset through `nft -j -f`: exported with `nft -j list ruleset`, read into the nftables crate's typed schema and serialized back by it (the crate's batch), checked to leave the same ruleset as the text.\n");
    md.push_str(&connbench::report(&results["datapath"]));
    md.push_str(&nodeportbench::report(&results["nodeport"]));
    md.push_str(&proxy_agent_tests::progbench::report(&results["programs"]));
    md.push_str(&rssbench::report(&results["memory"]));
    md.push_str(&proxy_agent_tests::changebench::report(
        &results["change_e2e"],
    ));
    if !results["dns_churn"].is_null() {
        md.push_str(&proxy_agent_tests::dnschurn::report(&results["dns_churn"]));
    }
    md.push_str(&proxy_agent_tests::benchtargets::report(results));
    md
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cmd = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": format!("{cpu} ({cores} cores)"),
        "kernel": cmd(&["uname", "-r"]),
        "nft": cmd(&["nft", "--version"]),
        "iptables": cmd(&["iptables-legacy", "--version"]),
        "agent": env!("CARGO_PKG_VERSION"),
        "dns_servers": cmd(&["dpkg-query", "-W", "-f", "${Package} ${Version}; ", "dnsperf", "unbound", "dnsmasq-base"]),
    })
}

/// The end-to-end change rows alone (by hand, while working on the control plane);
/// `rows` (`api:ebpf,manifests:nftables`) narrows them.
fn only_change(scales: &[usize], repeats: usize, rows: Option<&String>, out: &Path) {
    let only: Vec<String> = rows
        .map(|r| r.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let rows = proxy_agent_tests::changebench::run(scales, repeats, &only);
    std::fs::create_dir_all(out).expect("out dir");
    std::fs::write(out.join("change.json"), rows.to_string()).expect("change.json");
    print!("{}", proxy_agent_tests::changebench::report(&rows));
}

/// The run's sizes: quick or full, narrowed by hand with `--scales 1000,10000
/// --repeats 6`.
fn config(quick: bool, scales: Option<&String>, repeats: Option<&String>) -> Config {
    let mut cfg = if quick {
        Config {
            dns_seconds: 1,
            datapath_scales: vec![1, 1_000],
            datapath_seconds: 0.5,
            datapath_rounds: connbench::Rounds {
                rounds: 5,
                round_s: 0.4,
            },
            scales: vec![1_000],
            change_scale: 1_000,
            repeats: 5,
        }
    } else {
        Config {
            dns_seconds: 5,
            datapath_scales: vec![1, 1_000, 10_000, 30_000],
            datapath_seconds: 2.0,
            datapath_rounds: connbench::Rounds {
                rounds: 7,
                round_s: 1.0,
            },
            scales: vec![1_000, 10_000, 30_000],
            change_scale: 10_000,
            repeats: 20,
        }
    };
    if let Some(scales) = scales {
        cfg.scales = scales.split(',').filter_map(|s| s.parse().ok()).collect();
        cfg.change_scale = cfg.scales.iter().copied().max().unwrap_or(cfg.change_scale);
        cfg.datapath_scales = std::iter::once(1)
            .chain(cfg.scales.iter().copied())
            .collect();
    }
    if let Some(repeats) = repeats.and_then(|r| r.parse().ok()) {
        cfg.repeats = repeats;
    }
    cfg
}

/// The connection-rate rows alone (`--only-datapath`).
fn only_datapath(cluster: &mut Cluster, bpffs: &Path, cfg: &Config) {
    let _ = proxy_agent::dataplane::ebpf::loader::cleanup(bpffs);
    let rows = connbench::run(cluster, bpffs, &cfg.datapath_scales, cfg.datapath_rounds);
    print!("{}", connbench::report(&rows));
}

/// The programming rows alone (`--only-sync`): full syncs and one endpoint change.
fn only_sync(out: &Path, full: &[Value], change: &Value) {
    std::fs::create_dir_all(out).expect("out dir");
    let rows = json!({"full_sync": full, "endpoint_change": change});
    std::fs::write(out.join("sync.json"), rows.to_string()).expect("sync.json");
    let mut md = String::new();
    full_sync_report(&mut md, &rows);
    endpoint_change_report(&mut md, &rows["endpoint_change"]);
    print!("{md}");
}

/// `--compare OLD_DIR NEW_DIR` and `--replot DIR`: work on earlier runs' results, no
/// measurement; whether one was asked for.
fn offline(args: &[String]) -> bool {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(old) = value("--compare") {
        // Two runs side by side: `--compare OLD_DIR NEW_DIR`.
        let new = args
            .iter()
            .position(|a| a == "--compare")
            .and_then(|i| args.get(i + 2))
            .expect("--compare OLD_DIR NEW_DIR");
        let read = |dir: &str| -> Value {
            let text = std::fs::read_to_string(Path::new(dir).join("results.json"))
                .unwrap_or_else(|e| panic!("{dir}/results.json: {e}"));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{dir}/results.json: {e}"))
        };
        let md = proxy_agent_tests::benchcompare::report(&read(old), &read(new), (old, new));
        std::fs::write(Path::new(new).join("compare.md"), &md).expect("compare.md");
        print!("{md}");
        return true;
    }
    if let Some(dir) = value("--replot") {
        // The report and plots again from a run's results.json (no measurement).
        let dir = PathBuf::from(dir);
        let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
        write(
            &dir,
            &serde_json::from_str(&text).expect("results.json parses"),
        );
        return true;
    }
    false
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if offline(&args) {
        return;
    }
    let cfg = config(quick, value("--scales"), value("--repeats"));
    let out = value("--out").map_or_else(|| PathBuf::from("bench/results/latest"), PathBuf::from);
    let change_repeats = if quick { 5 } else { 15 };
    let scale_to_10k = cfg.scale_to_10k();
    if args.iter().any(|a| a == "--only-dns-churn") {
        let row = proxy_agent_tests::dnschurn::run(scale_to_10k, cfg.dns_seconds);
        std::fs::create_dir_all(&out).expect("out dir");
        std::fs::write(out.join("dns_churn.json"), row.to_string()).expect("dns_churn.json");
        print!("{}", proxy_agent_tests::dnschurn::report(&row));
        return;
    }
    if args.iter().any(|a| a == "--only-programs") {
        let programs = proxy_agent_tests::progbench::run();
        print!("{}", proxy_agent_tests::progbench::report(&programs));
        return;
    }
    if args.iter().any(|a| a == "--only-change") {
        only_change(&cfg.scales, change_repeats, value("--change-rows"), &out);
        return;
    }
    let mut cluster = Cluster::new("bench");
    let node = cluster.add_node("node1", 1);
    let bpffs = cluster.bpffs_dir("node1");
    std::fs::create_dir_all(&bpffs).expect("bpffs dir");
    let mut ebpf = EbpfDataplane::start(&bpffs, &node.cgroup, None, Sizing::default())
        .expect("eBPF dataplane");
    if args.iter().any(|a| a == "--only-datapath") {
        drop(ebpf);
        only_datapath(&mut cluster, &bpffs, &cfg);
        return;
    }
    let full: Vec<Value> = cfg
        .scales
        .iter()
        .map(|&n| full_syncs(&cluster, &mut ebpf, n))
        .collect();
    if args.iter().any(|a| a == "--only-full-sync") {
        std::fs::create_dir_all(&out).expect("out dir");
        std::fs::write(out.join("full_sync.json"), Value::from(full).to_string())
            .expect("full_sync.json");
        return;
    }
    let change = endpoint_changes(&cluster, &mut ebpf, &cfg);
    if args.iter().any(|a| a == "--only-sync") {
        only_sync(&out, &full, &change);
        return;
    }
    drop(ebpf);
    let _ = proxy_agent::dataplane::ebpf::loader::cleanup(&bpffs);
    let dns = dnsbench::run(&mut cluster, cfg.dns_seconds);
    let memory = rssbench::run(&mut cluster, &cfg.scales);
    let change_e2e = proxy_agent_tests::changebench::run(&cfg.scales, change_repeats, &[]);
    let dns_churn = proxy_agent_tests::dnschurn::run(scale_to_10k, cfg.dns_seconds);
    let datapath = connbench::run(
        &mut cluster,
        &bpffs,
        &cfg.datapath_scales,
        cfg.datapath_rounds,
    );
    // Needs the connection-rate bench's pods.
    let nodeport = nodeportbench::run(&mut cluster, &bpffs, scale_to_10k, cfg.datapath_seconds);
    let programs = proxy_agent_tests::progbench::run();
    let results = json!({
        "quick": quick,
        "run": {
            "kind": if quick { "quick" } else { "full" },
            "scales": cfg.scales,
            "change_repeats": cfg.repeats,
            "change_e2e_repeats": change_repeats,
            "datapath_scales": cfg.datapath_scales,
            "datapath_rounds": cfg.datapath_rounds.rounds,
            "datapath_round_s": cfg.datapath_rounds.round_s,
            "nodeport_seconds": cfg.datapath_seconds,
            "dns_seconds": cfg.dns_seconds,
        },
        "machine": machine(),
        "full_sync": full,
        "endpoint_change": change,
        "dns": dns,
        "datapath": datapath,
        "nodeport": nodeport,
        "programs": programs,
        "memory": memory,
        "change_e2e": change_e2e,
        "dns_churn": dns_churn,
    });
    write(&out, &results);
}

fn write(out: &Path, results: &Value) {
    std::fs::create_dir_all(out).expect("results dir");
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(results).expect("json"),
    )
    .expect("results.json");
    let mut md = report(results);
    match proxy_agent_tests::plots::draw(out, results) {
        Ok(files) => {
            md.push_str("\n## Plots\n\n");
            for file in files {
                let _ = writeln!(md, "![{file}]({file})");
            }
        }
        Err(error) => {
            let _ = writeln!(md, "\n(plots not drawn: {error})");
        }
    }
    std::fs::write(out.join("report.md"), &md).expect("report.md");
    println!("{md}");
    println!("written to {}", out.display());
}
