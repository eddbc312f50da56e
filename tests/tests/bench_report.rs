//! `cargo xtask bench --quick` produces its report from real measurements: every
//! dataplane and the baseline present, every time, count and rate non-zero.
use std::process::Command;

use proxy_agent_tests::{agent::agent_bin, nodeportbench};
use serde_json::Value;

#[test]
fn the_quick_bench_measures_every_mode() {
    let bench = agent_bin().with_file_name("bench");
    assert!(
        bench.exists(),
        "{} is missing: run `cargo xtask build`",
        bench.display()
    );
    let out = std::env::temp_dir().join(format!("proxy-agent-bench-{}", std::process::id()));
    let status = Command::new(&bench)
        .args(["--quick", "--out"])
        .arg(&out)
        .status()
        .expect("run bench");
    assert!(status.success(), "bench failed");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
            .expect("results.json parses");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for plot in ["full_sync.png", "connection_rate.png", "nodeport.png"] {
        let size = std::fs::metadata(out.join(plot)).map_or(0, |m| m.len());
        assert!(size > 1000, "{plot} missing or empty ({size} bytes)");
    }
    let _ = std::fs::remove_dir_all(&out);
    let full = &results["full_sync"][0];
    for key in [
        "iptables_restore_s",
        "nftables_s",
        "nftables_json_input_s",
        "ebpf_s",
        "nftables_statements",
        "ebpf_map_writes",
        "iptables_rules",
    ] {
        assert!(
            full[key].as_f64().unwrap_or(0.0) > 0.0,
            "full sync {key}: {full}"
        );
    }
    for key in [
        "kube_proxy_iptables_legacy",
        "kube_proxy_iptables_nft",
        "kube_proxy_nftables",
    ] {
        let cell = &full["kube_proxy"][key];
        assert!(
            cell["s"].as_f64().unwrap_or(0.0) > 0.0 && cell["lines"].as_u64().unwrap_or(0) > 0,
            "full sync {key}: {full}"
        );
    }
    let change = &results["endpoint_change"];
    for key in [
        "kube_proxy_iptables_legacy",
        "kube_proxy_iptables_nft",
        "kube_proxy_nftables",
        "nftables_partial",
        "ebpf",
    ] {
        let runs = change[key]["runs"].as_array().expect("runs");
        assert!(
            !runs.is_empty() && runs.iter().all(|r| r.as_f64().unwrap_or(0.0) > 0.0),
            "{key}: {change}"
        );
    }
    assert!(change["nftables_statements"].as_u64().unwrap_or(0) > 0);
    for workload in ["cache_hit", "cluster_name"] {
        for server in ["unbound", "proxy-agent", "dnsmasq"] {
            let cell = &results["dns"]["workloads"][workload][server];
            for key in ["qps", "p99_s"] {
                assert!(
                    cell[key].as_f64().unwrap_or(0.0) > 0.0,
                    "DNS {workload} {server} {key}: {cell}"
                );
            }
        }
    }
    check_datapath(&results["datapath"]);
    check_nodeport(&results["nodeport"]);
    for mode in [
        "iptables",
        "kube-proxy iptables (nft)",
        "kube-proxy nftables",
        "nftables",
        "eBPF",
        "unbound",
        "Connection rate",
        "NodePort",
    ] {
        assert!(report.contains(mode), "report lacks {mode}:\n{report}");
    }
}

/// Every connection-rate mode measured at every scale.
fn check_datapath(datapath: &Value) {
    let scales = datapath["scales"].as_array().expect("datapath scales");
    assert!(!scales.is_empty());
    for row in scales {
        let direct = row["direct"]["single"]["per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(direct > 0.0, "direct rate: {row}");
        let modes: Vec<&str> = row["modes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["mode"].as_str())
            .collect();
        assert_eq!(
            modes,
            ["direct", "conntrack", "iptables", "nftables", "ebpf"],
            "{row}"
        );
        for mode in row["modes"].as_array().into_iter().flatten() {
            for clients in ["single", "parallel"] {
                let cell = &mode[clients];
                assert!(
                    cell["per_second"].as_f64().unwrap_or(0.0) > 0.0
                        && cell["ratio"].as_f64().unwrap_or(0.0) > 0.0
                        && cell["p99_us"].as_f64().unwrap_or(0.0) > 0.0,
                    "{clients} {mode}"
                );
            }
        }
    }
}

/// Every NodePort mode measured, both protocols, without errors.
fn check_nodeport(nodeport: &Value) {
    let modes: Vec<&str> = nodeport["modes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mode"].as_str())
        .collect();
    assert_eq!(modes, nodeportbench::MODES, "{nodeport}");
    for mode in nodeport["modes"].as_array().into_iter().flatten() {
        for protocol in ["tcp", "udp"] {
            let cell = &mode[protocol];
            assert!(
                cell["per_second"].as_f64().unwrap_or(0.0) > 0.0
                    && cell["ratio"].as_f64().unwrap_or(0.0) > 0.0
                    // A flood may lose a datagram; a connection may not fail.
                    && (protocol == "udp" || cell["errors"].as_u64() == Some(0)),
                "NodePort {protocol} {mode}"
            );
        }
    }
}
