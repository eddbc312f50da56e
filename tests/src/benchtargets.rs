//! The bench's verdicts: each speed and memory target of the project, stated as met,
//! not met, or not measured in this run, from the results the bench just wrote.
use std::fmt::Write as _;

use serde_json::Value;

use crate::{connbench, nodeportbench};

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**NOT met**",
        None => "not measured in this run",
    }
}

fn row_at(rows: &Value, services: u64) -> Option<&Value> {
    rows.as_array()?
        .iter()
        .find(|r| r["services"].as_u64() == Some(services))
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    let mut md = String::from("\n## Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    let mut line = |target: &str, measured: String, met: Option<bool>| {
        let _ = writeln!(md, "| {target} | {measured} | {} |", verdict(met));
    };
    let datapath = &results["datapath"];
    for (mode, floor) in [("ebpf", 0.97), ("nftables", 0.85)] {
        let r = connbench::ratio(datapath, mode, 10_000);
        line(
            &format!("{mode} ClusterIP connection rate at 10 000 Services ≥ {floor}× direct"),
            r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}×")),
            r.map(|r| r >= floor),
        );
        let (small, large) = (
            connbench::ratio(datapath, mode, 1),
            connbench::ratio(datapath, mode, 30_000),
        );
        let fall = small.zip(large).map(|(s, l)| 1.0 - l / s);
        line(
            &format!("{mode}: falls ≤ 3% from 1 to 30 000 Services"),
            fall.map_or_else(|| "-".to_owned(), |f| format!("{:.1}%", f * 100.0)),
            fall.map(|f| f <= 0.03),
        );
    }
    let nodeport = &results["nodeport"];
    for (mode, protocol, floor, what) in [
        (
            "ebpf",
            "tcp",
            0.90,
            "eBPF NodePort TCP connection rate from outside",
        ),
        (
            "nftables",
            "tcp",
            0.80,
            "nftables NodePort TCP connection rate from outside",
        ),
        ("ebpf", "udp", 0.90, "eBPF NodePort UDP rate from outside"),
    ] {
        let r = nodeportbench::ratio(nodeport, mode, protocol);
        line(
            &format!("{what} ≥ {floor}× direct through the node"),
            r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}×")),
            r.map(|r| r >= floor),
        );
    }
    let full = row_at(&results["full_sync"], 10_000);
    for (mode, key, limit) in [("eBPF", "ebpf_s", 1.0), ("nftables", "nftables_s", 3.0)] {
        let s = full.and_then(|r| r[key].as_f64());
        line(
            &format!("{mode} full sync of 10 000 × 10 under {limit} s"),
            s.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s")),
            s.map(|s| s < limit),
        );
    }
    let change = &results["endpoint_change"];
    let at_10k = change["services"].as_u64() == Some(10_000);
    for (mode, key, limit) in [
        ("eBPF", "ebpf", 0.050),
        ("nftables", "nftables_partial", 0.200),
    ] {
        let p99 = change[key]["p99"].as_f64().filter(|_| at_10k);
        line(
            &format!(
                "{mode}: one endpoint change at 10 000 Services programmed, p99 under {} ms",
                limit * 1000.0
            ),
            p99.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s * 1000.0)),
            p99.map(|s| s < limit),
        );
    }
    let rss = row_at(&results["memory"]["scales"], 30_000).and_then(|r| r["peak_rss_mib"].as_f64());
    line(
        "peak RSS at 30 000 Services × 10 endpoints under 150 MiB",
        rss.map_or_else(|| "-".to_owned(), |m| format!("{m:.1} MiB")),
        rss.map(|m| m < 150.0),
    );
    let hit = &results["dns"]["workloads"]["cache_hit"];
    let (ours, unbound) = (&hit["proxy-agent"], &hit["unbound"]);
    let qps = ours["qps"].as_f64().zip(unbound["qps"].as_f64());
    let p99 = ours["p99_s"].as_f64().zip(unbound["p99_s"].as_f64());
    line(
        "DNS cache-hit QPS ≥ unbound's, p99 no worse",
        qps.zip(p99).map_or_else(
            || "-".to_owned(),
            |((q, uq), (p, up))| {
                format!(
                    "{:.2}× QPS, p99 {:.2} ms against {:.2} ms",
                    q / uq,
                    p * 1000.0,
                    up * 1000.0
                )
            },
        ),
        qps.zip(p99).map(|((q, uq), (p, up))| q >= uq && p <= up),
    );
    md
}
