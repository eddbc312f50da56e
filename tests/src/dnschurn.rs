//! The bench's DNS-under-churn row: the agent's NodeLocal DNS cache-hit latency while the
//! fake API server sends 100 EndpointSlice changes per second at 10 000 Services (eBPF),
//! against the same agent idle while the fake sends as many changes it does not watch,
//! in alternating rounds (ABBA order). Syncs must not slow DNS down.
use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    agent::Agent,
    changebench::{api_shaped, load_api, slice_yaml},
    cluster::Cluster,
    dns_upstream::Upstream,
    dnsbench::{dnsperf_at, UPSTREAM},
    fake_api::{FakeApi, ENDPOINT_SLICES, NODES},
};

/// EndpointSlice changes per second while churning.
const RATE: u32 = 100;
/// Alternating idle and churning rounds (the median of five is steady against a
/// passing stall of the machine's host).
const ROUNDS: usize = 5;
const LISTEN: &str = "127.0.0.10";
/// The steady query load: what a busy node's pods ask, well below saturation, so the
/// latency measured is the responder's and not a queue's.
const QPS: u32 = 20_000;

const OFF: u8 = 0;
/// Changes to Nodes of other names: the fake API stores them and wakes its watches, but
/// the agent (watching its own Node) receives nothing. The fake runs on the same CPUs
/// as the agent and dnsperf, so these rounds carry its cost without the agent's.
const FOREIGN: u8 = 1;
/// Changes to the EndpointSlices of the agent's Services.
const SLICES: u8 = 2;

/// Sends [`RATE`] changes per second of the kind `mode` says until `stop`.
fn churn(api: &FakeApi, services: usize, mode: &AtomicU8, stop: &AtomicBool, sent: &AtomicUsize) {
    let period = Duration::from_secs(1) / RATE;
    let mut next = Instant::now();
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        // A different Service each time, its endpoint alternating between two pods.
        let service = 1 + (k * 7919) % (services - 1);
        match mode.load(Ordering::Relaxed) {
            FOREIGN => {
                let node = json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": format!("other-{service}")}});
                api.upsert(NODES, api_shaped(node, "Node", service));
            }
            SLICES => {
                let ip = if (k / (services - 1)).is_multiple_of(2) {
                    "10.244.2.2"
                } else {
                    "10.244.1.2"
                };
                let slice: Value = serde_yaml::from_str(&slice_yaml(service, ip)).expect("slice");
                api.upsert(ENDPOINT_SLICES, api_shaped(slice, "EndpointSlice", service));
            }
            _ => {
                next = Instant::now();
                std::thread::sleep(period);
                continue;
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
        k += 1;
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// CPU time the machine's host took from this virtual machine so far (`steal` in
/// `/proc/stat`), 0 where it is not told: a round that lost much measured the host.
fn steal_s() -> f64 {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let cpu = stat.lines().next()?.to_owned();
            cpu.split_whitespace().nth(8)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0);
    // USER_HZ is 100 on every Linux architecture the agent runs on.
    ticks / 100.0
}

/// The median round's cache-hit p99 (and QPS) with the agent idle and under churn, at
/// `services`.
#[must_use]
pub fn run(services: usize, seconds: u32) -> Value {
    let mut cluster = Cluster::new("dnschurn");
    cluster.add_node("node1", 1);
    let netns = cluster.node("node1").netns.clone();
    let _upstream = Upstream::start(&netns, UPSTREAM);
    let dir = cluster.scratch().join("dns-churn");
    std::fs::create_dir_all(&dir).expect("dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = cluster.listen_on_lan("10.100.0.254:0");
    let api = runtime.block_on(async { FakeApi::start_on(listener) });
    load_api(&api, services, 0, "10.244.1.2");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let args: Vec<String> = [
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--dataplane",
        "ebpf",
        "--dns-listen",
        LISTEN,
        "--dns-forward",
        UPSTREAM,
    ]
    .map(str::to_owned)
    .to_vec();
    let agent = Agent::spawn_with(&mut cluster, "node1", &args);
    agent.wait_healthy_within(&cluster, Duration::from_mins(5));
    let hits = dir.join("cache-hit.txt");
    let names = (0..100).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "host{i}.example.org A");
        text
    });
    std::fs::write(&hits, names).expect("queries");
    // Every name cached before anything is timed.
    dnsperf_at(&netns, LISTEN, &hits, 1, None);

    let api = Arc::new(api);
    let (mode, stop, sent) = (
        Arc::new(AtomicU8::new(OFF)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let churner = {
        let (api, mode, stop, sent) = (api.clone(), mode.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || churn(&api, services, &mode, &stop, &sent))
    };
    let mut cells: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        // Idle first, then churn first, and so on: a drift over the run (the machine's,
        // the fake's) weighs on both alike.
        let order = if round % 2 == 0 {
            [(0, FOREIGN), (1, SLICES)]
        } else {
            [(1, SLICES), (0, FOREIGN)]
        };
        for (i, kind) in order {
            let before = sent.load(Ordering::Relaxed);
            mode.store(kind, Ordering::Relaxed);
            let started = Instant::now();
            let stolen = steal_s();
            let mut cell = dnsperf_at(&netns, LISTEN, &hits, seconds, Some(QPS));
            cell["steal_s"] = json!(steal_s() - stolen);
            mode.store(OFF, Ordering::Relaxed);
            let changes = sent.load(Ordering::Relaxed) - before;
            #[allow(clippy::cast_precision_loss, reason = "a count of changes")]
            let rate = changes as f64 / started.elapsed().as_secs_f64();
            cell["changes_per_s"] = json!(rate);
            cells[i].push(cell);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churner.join();
    // The churn was programmed: the agent kept up.
    agent.wait_healthy_within(&cluster, Duration::from_mins(1));
    let _ = cluster.terminate("node1", "agent");
    let _ = std::process::Command::new(crate::agent::agent_bin())
        .args(["cleanup", "--dataplane", "ebpf", "--bpffs"])
        .arg(&agent.bpffs)
        .stderr(std::process::Stdio::null())
        .status();
    let [idle, churn] = cells.map(median_round);
    let ratio =
        churn["p99_s"].as_f64().unwrap_or(f64::NAN) / idle["p99_s"].as_f64().unwrap_or(f64::NAN);
    let row = json!({
        "services": services, "rate_per_s": RATE, "seconds": seconds, "rounds": ROUNDS,
        "idle": idle, "churn": churn, "p99_ratio": ratio,
    });
    eprintln!("DNS under churn: {row}");
    row
}

/// The round of median p99, with every round's p99, answers and steal beside it.
fn median_round(mut cells: Vec<Value>) -> Value {
    let rounds = |field: &str| -> Vec<Value> { cells.iter().map(|c| c[field].clone()).collect() };
    let (p99s, answers, steal) = (rounds("p99_s"), rounds("answers"), rounds("steal_s"));
    cells.sort_by(|a, b| {
        let p = |v: &Value| v["p99_s"].as_f64().unwrap_or(f64::NAN);
        p(a).total_cmp(&p(b))
    });
    let mut median = cells[cells.len() / 2].clone();
    median["rounds_p99_s"] = json!(p99s);
    median["rounds_answers"] = json!(answers);
    median["rounds_steal_s"] = json!(steal);
    median
}

/// The markdown section.
#[must_use]
pub fn report(row: &Value) -> String {
    let ms = |v: &Value| v["p99_s"].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let p50 = |v: &Value| v["p50_s"].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let qps = |v: &Value| v["qps"].as_f64().unwrap_or(f64::NAN);
    let (idle, churn) = (&row["idle"], &row["churn"]);
    let stolen = |v: &Value| -> f64 {
        v["rounds_steal_s"]
            .as_array()
            .map_or(0.0, |r| r.iter().filter_map(Value::as_f64).sum())
    };
    format!(
        "\n## DNS cache hits under EndpointSlice churn ({} Services, eBPF, API source; median of {} alternating rounds of {} s)\n\n\
         Idle rounds: the fake API server, on the same CPUs, changes as many Nodes the agent does not watch.\n\n\
         | agent | QPS | p50 | p99 |\n|---|---|---|---|\n\
         | idle | {:.0} | {:.3} ms | {:.3} ms |\n\
         | {:.0} EndpointSlice changes/s | {:.0} | {:.3} ms | {:.3} ms |\n\n\
         p99 under churn / idle: {:.2}×. CPU the host took from this machine in all rounds: idle {:.2} s, churn {:.2} s.\n",
        row["services"], row["rounds"], row["seconds"],
        qps(idle), p50(idle), ms(idle),
        churn["changes_per_s"].as_f64().unwrap_or(f64::NAN), qps(churn), p50(churn), ms(churn),
        row["p99_ratio"].as_f64().unwrap_or(f64::NAN),
        stolen(idle),
        stolen(churn),
    )
}
