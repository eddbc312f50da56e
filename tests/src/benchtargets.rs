//! The bench's verdicts: each speed and memory target of the project, stated as met,
//! not met, within noise (the measured spread straddles the target) or not measured in
//! this run, from the results the bench just wrote.
use std::fmt::Write as _;

use serde_json::Value;

use crate::{connbench, nodeportbench};

/// A target's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    /// The spread of the rounds straddles the target.
    WithinNoise,
}

impl From<bool> for Verdict {
    fn from(met: bool) -> Self {
        if met {
            Self::Met
        } else {
            Self::NotMet
        }
    }
}

impl Verdict {
    /// Whether the interval `(low, high)` lies wholly at or above `floor`, wholly
    /// below it, or across it.
    #[must_use]
    pub fn at_least((low, high): (f64, f64), floor: f64) -> Self {
        if low >= floor {
            Self::Met
        } else if high < floor {
            Self::NotMet
        } else {
            Self::WithinNoise
        }
    }

    /// As [`Self::at_least`], for a ceiling.
    #[must_use]
    pub fn at_most((low, high): (f64, f64), ceiling: f64) -> Self {
        if high <= ceiling {
            Self::Met
        } else if low > ceiling {
            Self::NotMet
        } else {
            Self::WithinNoise
        }
    }

    #[must_use]
    pub fn text(verdict: Option<Self>) -> &'static str {
        match verdict {
            Some(Self::Met) => "met",
            Some(Self::NotMet) => "**NOT met**",
            Some(Self::WithinNoise) => "within noise",
            None => "not measured in this run",
        }
    }
}

fn row_at(rows: &Value, services: u64) -> Option<&Value> {
    rows.as_array()?
        .iter()
        .find(|r| r["services"].as_u64() == Some(services))
}

/// The largest `key` among the end-to-end change rows of `dataplane` at `services`
/// (both sources, or only `source`).
fn worst(
    rows: &Value,
    dataplane: &str,
    services: u64,
    source: Option<&str>,
    key: &str,
) -> Option<f64> {
    rows.as_array()?
        .iter()
        .filter(|r| {
            r["dataplane"].as_str() == Some(dataplane)
                && r["services"].as_u64() == Some(services)
                && source.is_none_or(|s| r["source"].as_str() == Some(s))
        })
        .filter_map(|r| r[key].as_f64())
        .reduce(f64::max)
}

/// Issue 17's targets on the end-to-end change rows: change → traffic p99, CPU per
/// change, and peak RSS with API-shaped objects.
fn change_targets(rows: &Value, line: &mut impl FnMut(&str, String, Option<Verdict>)) {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    let mib = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} MiB"));
    for (dataplane, services, limit) in [
        ("ebpf", 10_000, 25.0),
        ("ebpf", 30_000, 25.0),
        ("nftables", 10_000, 100.0),
        ("nftables", 30_000, 200.0),
    ] {
        let p99 = worst(rows, dataplane, services, None, "p99_ms");
        line(
            &format!("{dataplane}: change → traffic at {services} Services, p99 ≤ {limit} ms (end to end)"),
            ms(p99),
            p99.map(|p| p <= limit).map(Verdict::from),
        );
    }
    let cpu = worst(rows, "ebpf", 30_000, None, "cpu_ms_per_change_p50");
    line(
        "eBPF: agent CPU per endpoint change at 30 000 Services ≤ 2 ms",
        ms(cpu),
        cpu.map(|c| c <= 2.0).map(Verdict::from),
    );
    for (services, limit) in [(10_000, 80.0), (30_000, 150.0)] {
        for dataplane in ["ebpf", "nftables"] {
            let rss = worst(rows, dataplane, services, Some("api"), "peak_rss_mib");
            line(
                &format!("{dataplane}: peak RSS with API-shaped objects at {services} × 10 ≤ {limit} MiB"),
                mib(rss),
                rss.map(|r| r <= limit).map(Verdict::from),
            );
        }
    }
}

/// DNS cache hits under EndpointSlice churn against the agent idle.
fn dns_churn_target(churn: &Value, line: &mut impl FnMut(&str, String, Option<Verdict>)) {
    let ratio = churn["p99_ratio"]
        .as_f64()
        .filter(|_| churn["services"].as_u64() == Some(10_000));
    line(
        "DNS cache-hit p99 during 100 EndpointSlice changes/s at 10 000 Services ≤ 1.5× idle",
        ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}×")),
        ratio.map(|r| r <= 1.5).map(Verdict::from),
    );
}

/// The connection-rate targets, judged on the rounds' spread.
fn datapath_targets(datapath: &Value, line: &mut impl FnMut(&str, String, Option<Verdict>)) {
    for (mode, floor) in [("ebpf", 0.97), ("nftables", 0.85)] {
        let r = connbench::spread(datapath, mode, 10_000);
        line(
            &format!("{mode} ClusterIP connection rate at 10 000 Services ≥ {floor}× direct"),
            r.map_or_else(
                || "-".to_owned(),
                |(m, lo, hi)| format!("{m:.3}× ({lo:.3}–{hi:.3})"),
            ),
            r.map(|(_, lo, hi)| Verdict::at_least((lo, hi), floor)),
        );
        // The fall from 1 to 30 000 Services, as an interval from the two spreads.
        let fall = connbench::spread(datapath, mode, 1)
            .zip(connbench::spread(datapath, mode, 30_000))
            .map(|((s, s_lo, s_hi), (l, l_lo, l_hi))| {
                (1.0 - l / s, 1.0 - l_hi / s_lo, 1.0 - l_lo / s_hi)
            });
        line(
            &format!("{mode}: falls ≤ 3% from 1 to 30 000 Services"),
            fall.map_or_else(
                || "-".to_owned(),
                |(f, lo, hi)| format!("{:.1}% ({:.1}–{:.1}%)", f * 100.0, lo * 100.0, hi * 100.0),
            ),
            fall.map(|(_, lo, hi)| Verdict::at_most((lo, hi), 0.03)),
        );
    }
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    let mut md = String::from("\n## Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    let mut line = |target: &str, measured: String, verdict: Option<Verdict>| {
        let _ = writeln!(md, "| {target} | {measured} | {} |", Verdict::text(verdict));
    };
    datapath_targets(&results["datapath"], &mut line);
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
            r.map(|r| r >= floor).map(Verdict::from),
        );
    }
    let full = row_at(&results["full_sync"], 10_000);
    for (mode, key, limit) in [("eBPF", "ebpf_s", 1.0), ("nftables", "nftables_s", 3.0)] {
        let s = full.and_then(|r| r[key].as_f64());
        line(
            &format!("{mode} full sync of 10 000 × 10 under {limit} s"),
            s.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s")),
            s.map(|s| s < limit).map(Verdict::from),
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
            p99.map(|s| s < limit).map(Verdict::from),
        );
    }
    change_targets(&results["change_e2e"]["rows"], &mut line);
    let rss = row_at(&results["memory"]["scales"], 30_000).and_then(|r| r["peak_rss_mib"].as_f64());
    line(
        "peak RSS at 30 000 Services × 10 endpoints under 150 MiB",
        rss.map_or_else(|| "-".to_owned(), |m| format!("{m:.1} MiB")),
        rss.map(|m| m < 150.0).map(Verdict::from),
    );
    dns_churn_target(&results["dns_churn"], &mut line);
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
        qps.zip(p99)
            .map(|((q, uq), (p, up))| q >= uq && p <= up)
            .map(Verdict::from),
    );
    md
}
