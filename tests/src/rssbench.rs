//! The bench's memory part: the agent's peak resident memory (`VmHWM`) once it has
//! programmed N Services × 10 endpoints with the eBPF dataplane, read from a real agent
//! process fed a manifests directory.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    agent::{agent_bin, testpod_bin},
    cluster::Cluster,
    scale,
};

const ENDPOINTS: usize = 10;
const NODE: &str = "node2";

/// `VmHWM` of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn healthy(cluster: &Cluster) -> bool {
    let testpod = testpod_bin().display().to_string();
    let out = cluster.run_on_node(NODE, &[&testpod, "http-get", "127.0.0.1:10256", "/healthz"]);
    out.starts_with("200 ") && {
        let body: Value = serde_json::from_str(&out[4..]).unwrap_or_default();
        body["sourceGeneration"] == body["programmedGeneration"]
    }
}

/// One agent per scale on a node of its own; peak RSS once everything is programmed.
#[must_use]
pub fn run(cluster: &mut Cluster, scales: &[usize]) -> Value {
    cluster.add_node(NODE, 2);
    let bpffs = cluster.bpffs_dir(NODE);
    let cgroup = cluster.node(NODE).cgroup.clone();
    let mut rows = Vec::new();
    for &services in scales {
        let dir = cluster.scratch().join(format!("rss-{services}"));
        std::fs::create_dir_all(&dir).expect("manifests dir");
        std::fs::write(dir.join("all.yaml"), scale::manifests(services, ENDPOINTS))
            .expect("manifests");
        let args = [
            agent_bin().display().to_string(),
            "run".into(),
            "--node-name".into(),
            NODE.into(),
            "--manifests".into(),
            dir.display().to_string(),
            "--dataplane".into(),
            "ebpf".into(),
            "--bpffs".into(),
            bpffs.display().to_string(),
            "--cgroup-root".into(),
            cgroup.display().to_string(),
            "--healthz-bind-address".into(),
            "127.0.0.1:10256".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        cluster.spawn_on_node(NODE, "rss", &args, Stdio::null());
        while !healthy(cluster) {
            assert!(
                started.elapsed() < Duration::from_mins(5),
                "agent never programmed {services} Services"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let ready_s = started.elapsed().as_secs_f64();
        let peak: u64 = cluster.pids(NODE, "rss").into_iter().map(peak_rss).sum();
        let _ = cluster.terminate(NODE, "rss");
        let _ = Command::new(agent_bin())
            .args(["cleanup", "--dataplane", "ebpf", "--bpffs"])
            .arg(&bpffs)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        let mib = f64::from(u32::try_from(peak / 1024).unwrap_or(u32::MAX)) / 1024.0;
        eprintln!("{services} Services × {ENDPOINTS}: peak RSS {mib:.1} MiB, programmed after {ready_s:.1} s");
        rows.push(json!({
            "services": services, "endpoints_per_service": ENDPOINTS,
            "peak_rss_mib": mib, "programmed_after_s": ready_s,
        }));
    }
    json!({"scales": rows})
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::from("\n## Agent memory (eBPF dataplane, Services × 10 endpoints from a manifests directory)\n\n| Services | peak RSS | programmed after |\n|---|---|---|\n");
    for row in results["scales"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB | {:.1} s |",
            row["services"],
            row["peak_rss_mib"].as_f64().unwrap_or(0.0),
            row["programmed_after_s"].as_f64().unwrap_or(0.0)
        );
    }
    md
}
