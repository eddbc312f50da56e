//! The bench's change → traffic part, end to end as a user sees it: the real agent on
//! node1 programs N Services × 10 endpoints from a manifests directory or the fake API
//! server (objects shaped as a real API server returns them: labels, annotations,
//! `managedFields`, owner references), and a pod keeps connecting to one Service's
//! ClusterIP while that Service's EndpointSlice moves to another pod. Measured: from the
//! source event (the file renamed into place, the watch event sent) to the first
//! connection answered by the new pod; the agent's CPU time per change; its peak RSS;
//! start → programmed.
use std::{
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};

use crate::{
    agent::{testpod_bin, Agent},
    cluster::Cluster,
    fake_api::{FakeApi, ENDPOINT_SLICES, NODES, SERVICES},
    scale, scenarios,
};

const ENDPOINTS: usize = 10;
/// The two pods the changed Service's endpoint moves between (node1, node2).
const PODS: [(&str, &str); 2] = [("web-a", "10.244.1.2"), ("web-b", "10.244.2.2")];

/// Where the agent's objects come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Manifests,
    Api,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Manifests => "manifests",
            Self::Api => "api",
        }
    }
}

/// One Service's EndpointSlice with a single ready endpoint at `ip`.
pub(crate) fn slice_yaml(service: usize, ip: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{service}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [{ip}]\n  conditions: {{ready: true}}\n"
    )
}

/// What a real API server adds to every object: uid, timestamps, owner references,
/// `managedFields`, and annotations such as kubectl's last-applied configuration.
pub(crate) fn api_shaped(mut object: Value, kind: &str, i: usize) -> Value {
    let meta = object["metadata"].as_object_mut().expect("metadata");
    meta.insert(
        "uid".into(),
        json!(format!("6f1c2e8a-0000-4000-8000-{i:012}")),
    );
    meta.insert("creationTimestamp".into(), json!("2026-11-30T10:00:00Z"));
    meta.insert("generation".into(), json!(1));
    let labels = meta
        .entry("labels")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("labels");
    labels.insert("app.kubernetes.io/name".into(), json!(format!("app-{i}")));
    labels.insert("app.kubernetes.io/part-of".into(), json!("bench"));
    meta.insert("annotations".into(), json!({
        "kubectl.kubernetes.io/last-applied-configuration": format!("{{\"apiVersion\":\"v1\",\"kind\":\"{kind}\",\"metadata\":{{\"name\":\"s{i}\",\"namespace\":\"bench\"}},\"spec\":{{\"ports\":[{{\"name\":\"http\",\"port\":80,\"targetPort\":8080}}],\"selector\":{{\"app\":\"app-{i}\"}}}}}}"),
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-30T10:00:00Z",
    }));
    meta.insert("managedFields".into(), json!([{
        "manager": if kind == "Service" { "kubectl-client-side-apply" } else { "kube-controller-manager" },
        "operation": "Update", "apiVersion": "v1", "time": "2026-11-30T10:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                     "f:labels": {".": {}, "f:app.kubernetes.io/name": {}}},
                     "f:spec": {"f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                                "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}
    }]));
    if kind == "EndpointSlice" {
        meta.insert(
            "ownerReferences".into(),
            json!([{"apiVersion": "v1", "kind": "Service",
            "name": format!("s{i}"), "uid": format!("6f1c2e8a-0000-4000-8000-{i:012}"),
            "controller": true, "blockOwnerDeletion": true}]),
        );
        meta.insert("generateName".into(), json!(format!("s{i}-")));
    }
    object
}

/// The scale manifests as API objects.
pub(crate) fn load_api(api: &FakeApi, services: usize, target: usize, first_ip: &str) {
    let text = scale::manifests(services, ENDPOINTS);
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(doc).expect("scale manifest");
        if value.is_null() {
            continue;
        }
        let (kind, n) = (value["kind"].as_str().unwrap_or("").to_owned(), i / 2);
        let value = if kind == "EndpointSlice" && n == target {
            serde_yaml::from_str(&slice_yaml(target, first_ip)).expect("slice")
        } else {
            value
        };
        let plural = if kind == "Service" {
            SERVICES
        } else {
            ENDPOINT_SLICES
        };
        api.upsert(plural, api_shaped(value, &kind, n));
    }
    api.upsert(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}),
    );
}

/// CPU time of every thread of `pid` (the scheduler's nanosecond count), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    #[allow(clippy::cast_precision_loss, reason = "nanoseconds to seconds")]
    let seconds = nanos as f64 / 1e9;
    seconds
}

/// `VmHWM` (peak) or `VmRSS` (now) of `pid`, in MiB.
fn rss_mib(pid: u32, field: &str) -> f64 {
    let kib: f64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Waits (at most a minute) until the machine is quiet: the kernel frees a large
/// ruleset or map set in deferred work after the process that held it is gone.
fn wait_quiet() {
    let started = Instant::now();
    while started.elapsed() < Duration::from_mins(1) {
        let (busy0, total0) = cpu_jiffies();
        std::thread::sleep(Duration::from_millis(500));
        let (busy1, total1) = cpu_jiffies();
        let (busy, total) = (busy1.saturating_sub(busy0), total1.saturating_sub(total0));
        if total > 0 && busy * 10 <= total {
            break;
        }
    }
    eprintln!("quiet after {:.1} s", started.elapsed().as_secs_f64());
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    crate::quantile(sorted, q).unwrap_or(f64::NAN)
}

/// One change: the client loops on the ClusterIP until `pod` answers; returns the
/// latency from the event in ms.
fn one_change(
    cluster: &Cluster,
    to: &str,
    pod: &str,
    change: &mut dyn FnMut() -> SystemTime,
) -> Option<f64> {
    let testpod = testpod_bin().display().to_string();
    let client = cluster
        .command_in_pod("client", &[&testpod, "first-from", to, pod, "10000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    // The client is connecting (to the old pod) before the change is made.
    std::thread::sleep(Duration::from_millis(150));
    let at = change();
    let out = client.wait_with_output().expect("client output");
    let text = String::from_utf8_lossy(&out.stdout);
    // `first AT attempts N failed M last-error KIND@MS`: a failed attempt (refused, or no
    // answer in 50 ms) is a packet path that broke, not only a slow one. Seen here only
    // in nftables rows run after eBPF rows, before the change (MS < 150): the socket
    // LB's direct connections left the same client ports in TIME_WAIT on the pods, and a
    // SYN through DNAT carries another timestamp offset (the pods count these as
    // TcpExtPAWSTimewait).
    let failed: u64 = text
        .split_whitespace()
        .nth(5)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if failed > 0 {
        eprintln!(
            "change to {pod}: {failed} failed connection attempts ({})",
            text.trim()
        );
    }
    let micros: u128 = text.split_whitespace().nth(1)?.parse().ok()?;
    let event = at.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_micros();
    #[allow(clippy::cast_precision_loss, reason = "microseconds to milliseconds")]
    Some(micros.saturating_sub(event) as f64 / 1000.0)
}

/// One row: a source, a dataplane and a scale.
fn row(
    cluster: &mut Cluster,
    source: Source,
    dataplane: &str,
    services: usize,
    repeats: usize,
) -> Value {
    let target = services / 2;
    let to = format!("{}:80", scale::cluster_ip(target));
    let dir = cluster.scratch().join(format!("change-{services}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut api = None;
    let source_args = match source {
        Source::Manifests => {
            std::fs::write(dir.join("all.yaml"), scale::manifests(services, ENDPOINTS))
                .expect("manifests");
            std::fs::write(dir.join("zz-change.yaml"), slice_yaml(target, PODS[0].1))
                .expect("slice");
            vec!["--manifests".to_owned(), dir.display().to_string()]
        }
        Source::Api => {
            let listener = cluster.listen_on_lan("10.100.0.254:0");
            let fake = runtime.block_on(async { FakeApi::start_on(listener) });
            load_api(&fake, services, target, PODS[0].1);
            let kubeconfig = dir.join("kubeconfig");
            std::fs::write(&kubeconfig, fake.kubeconfig()).expect("kubeconfig");
            api = Some(fake);
            vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()]
        }
    };
    let mut args = source_args;
    args.extend(["--dataplane".to_owned(), dataplane.to_owned()]);
    // The scratch log is shared by every row's agent: this row's is what follows.
    let log_from =
        std::fs::metadata(cluster.scratch().join("agent-node1.log")).map_or(0, |m| m.len());
    let started = Instant::now();
    let agent = Agent::spawn_with(cluster, "node1", &args);
    agent.wait_healthy_within(cluster, Duration::from_mins(5));
    let ready_s = started.elapsed().as_secs_f64();
    let pid = cluster.pids("node1", "agent").first().copied().unwrap_or(0);
    let mut latencies = Vec::new();
    let mut cpu = Vec::new();
    for k in 0..repeats {
        let (pod, ip) = PODS[(k + 1) % 2];
        let before = cpu_seconds(pid);
        let mut change = || {
            if let Some(api) = &api {
                let slice: Value = serde_yaml::from_str(&slice_yaml(target, ip)).expect("slice");
                let slice = api_shaped(slice, "EndpointSlice", target);
                let at = SystemTime::now();
                api.upsert(ENDPOINT_SLICES, slice);
                return at;
            }
            let staged = dir.join("zz-change.yaml.tmp");
            std::fs::write(&staged, slice_yaml(target, ip)).expect("staged");
            let at = SystemTime::now();
            std::fs::rename(&staged, dir.join("zz-change.yaml")).expect("rename");
            at
        };
        if let Some(ms) = one_change(cluster, &to, pod, &mut change) {
            latencies.push(ms);
        }
        // Let the sync finish before reading its CPU time.
        std::thread::sleep(Duration::from_millis(200));
        cpu.push((cpu_seconds(pid) - before) * 1000.0);
    }
    let rss = rss_mib(pid, "VmHWM");
    let rss_now = rss_mib(pid, "VmRSS");
    let _ = cluster.terminate("node1", "agent");
    // The agent's log outlives the cluster, for a reader of the numbers.
    let kept = std::env::temp_dir().join(format!(
        "changebench-{}-{dataplane}-{services}.log",
        source.name()
    ));
    let log = std::fs::read(&agent.log).unwrap_or_default();
    let from = usize::try_from(log_from).unwrap_or(0).min(log.len());
    let _ = std::fs::write(&kept, &log[from..]);
    eprintln!("agent log: {}", kept.display());
    // In the node's namespace: the next row starts from nothing, not over this row's
    // tables (a restart over 330 000 chains is another measurement), and the kernel's
    // deferred teardown of them is not charged to it.
    let _ = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cluster.node("node1").netns))
        .arg(crate::agent::agent_bin())
        .args(["cleanup", "--dataplane", dataplane, "--bpffs"])
        .arg(&agent.bpffs)
        .stderr(Stdio::null())
        .status();
    drop(api);
    wait_quiet();
    latencies.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let row = json!({
        "source": source.name(), "dataplane": dataplane, "services": services,
        "endpoints_per_service": ENDPOINTS, "changes": repeats, "reached": latencies.len(),
        "p50_ms": quantile(&latencies, 0.5), "p99_ms": quantile(&latencies, 0.99),
        "max_ms": latencies.last().copied().unwrap_or(f64::NAN),
        "cpu_ms_per_change_p50": quantile(&cpu, 0.5),
        "peak_rss_mib": rss, "rss_after_mib": rss_now, "programmed_after_s": ready_s,
    });
    eprintln!("change → traffic: {row}");
    row
}

/// Every row for `scales`, both sources, both dataplanes; `only` (`source:dataplane`
/// names, by hand) narrows the rows.
#[must_use]
pub fn run(scales: &[usize], repeats: usize, only: &[String]) -> Value {
    let mut cluster = scenarios::echo_cluster("chg");
    let mut rows = Vec::new();
    for &services in scales {
        // eBPF rows first: tearing down a large nftables table keeps the kernel busy for
        // seconds (each row also waits for a quiet machine before the next starts).
        for dataplane in ["ebpf", "nftables"] {
            for source in [Source::Manifests, Source::Api] {
                let name = format!("{}:{dataplane}", source.name());
                if !only.is_empty() && !only.contains(&name) {
                    continue;
                }
                rows.push(row(&mut cluster, source, dataplane, services, repeats));
            }
        }
    }
    json!({"rows": rows})
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## Change → traffic, end to end (Services × 10 endpoints; one EndpointSlice moves to another pod; a pod connects to its ClusterIP until the new pod answers)\n\n\
         Source `manifests`: a file renamed into the directory; `api`: a watch event from the fake API server, objects shaped as a real API server sends them. CPU: the agent's user+system time per change.\n\n\
         | source | dataplane | Services | p50 | p99 | max | CPU per change | peak RSS | RSS after | start → programmed |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in results["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} MiB | {:.2} s |",
            row["source"].as_str().unwrap_or(""),
            row["dataplane"].as_str().unwrap_or(""),
            row["services"],
            f("p50_ms"),
            f("p99_ms"),
            f("max_ms"),
            f("cpu_ms_per_change_p50"),
            f("peak_rss_mib"),
            f("rss_after_mib"),
            f("programmed_after_s"),
        );
    }
    md
}
