//! `bench --compare OLD NEW`: two runs' results side by side, each metric's change,
//! and whether the change is beyond the noise both runs measured (their spreads do not
//! overlap). A developer shows a change helped with it, rather than with two numbers.
use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

/// One measured value with the spread its run saw (`low == high` when the run measured
/// it once), and which way is better.
#[derive(Debug, Clone, Copy)]
struct Metric {
    value: f64,
    low: f64,
    high: f64,
    higher_is_better: bool,
}

impl Metric {
    fn single(value: f64, higher_is_better: bool) -> Self {
        Self {
            value,
            low: value,
            high: value,
            higher_is_better,
        }
    }

    /// A sample's median and its lowest and highest.
    fn sample(values: &[f64], higher_is_better: bool) -> Option<Self> {
        let mut sorted: Vec<f64> = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            value: crate::quantile(&sorted, 0.5)?,
            low: *sorted.first()?,
            high: *sorted.last()?,
            higher_is_better,
        })
    }

    fn has_spread(&self) -> bool {
        self.high > self.low
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

/// Every metric of a run, by name.
fn metrics(results: &Value) -> BTreeMap<String, Metric> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, metric: Option<Metric>| {
        if let Some(metric) = metric {
            out.insert(name, metric);
        }
    };
    for row in results["full_sync"].as_array().into_iter().flatten() {
        let n = &row["services"];
        for key in ["nftables_s", "ebpf_s"] {
            let value = row[key].as_f64().map(|v| Metric::single(v, false));
            put(format!("full sync {n}: {key}"), value);
        }
        for (key, cell) in row["kube_proxy"].as_object().into_iter().flatten() {
            let value = cell["s"].as_f64().map(|v| Metric::single(v, false));
            put(format!("full sync {n}: {key}_s"), value);
        }
    }
    let change = &results["endpoint_change"];
    for (key, cell) in change.as_object().into_iter().flatten() {
        if cell["runs"].is_array() {
            let name = format!("endpoint change {}: {key}", change["services"]);
            put(name, Metric::sample(&floats(&cell["runs"]), false));
        }
    }
    for row in results["datapath"]["scales"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for mode in row["modes"].as_array().into_iter().flatten() {
            let cell = &mode["single"];
            let metric = cell["ratio"].as_f64().map(|value| Metric {
                value,
                low: cell["ratio_min"].as_f64().unwrap_or(value),
                high: cell["ratio_max"].as_f64().unwrap_or(value),
                higher_is_better: true,
            });
            let name = format!(
                "connection rate {}: {} (× twin)",
                row["services"],
                mode["mode"].as_str().unwrap_or("?")
            );
            put(name, metric);
        }
    }
    for row in results["change_e2e"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = format!(
            "change → traffic {} {} {}",
            row["services"],
            row["source"].as_str().unwrap_or("?"),
            row["dataplane"].as_str().unwrap_or("?")
        );
        for key in ["p50_ms", "p99_ms", "peak_rss_mib"] {
            let value = row[key].as_f64().map(|v| Metric::single(v, false));
            put(format!("{name}: {key}"), value);
        }
    }
    for row in results["memory"]["scales"].as_array().into_iter().flatten() {
        let value = row["peak_rss_mib"]
            .as_f64()
            .map(|v| Metric::single(v, false));
        put(format!("peak RSS {}: MiB", row["services"]), value);
    }
    for (workload, servers) in results["dns"]["workloads"]
        .as_object()
        .into_iter()
        .flatten()
    {
        // As the ratio to unbound in each alternating round: absolute QPS follows the
        // machine from run to run (-63 % from one quick run to the next here), the
        // ratio does not.
        let ours = floats(&servers["proxy-agent"]["rounds_qps"]);
        let unbound = floats(&servers["unbound"]["rounds_qps"]);
        let ratios: Vec<f64> = ours
            .iter()
            .zip(&unbound)
            .filter(|(_, u)| **u > 0.0)
            .map(|(o, u)| o / u)
            .collect();
        put(
            format!("DNS {workload}: proxy-agent QPS (× unbound)"),
            Metric::sample(&ratios, true),
        );
    }
    out
}

/// Better, worse or within noise: beyond noise only when both runs measured a spread
/// and the spreads do not overlap.
fn verdict(old: &Metric, new: &Metric) -> &'static str {
    if !old.has_spread() || !new.has_spread() {
        return "no spread measured";
    }
    if new.low > old.high {
        if new.higher_is_better {
            "better, beyond noise"
        } else {
            "worse, beyond noise"
        }
    } else if new.high < old.low {
        if new.higher_is_better {
            "worse, beyond noise"
        } else {
            "better, beyond noise"
        }
    } else {
        "within noise"
    }
}

fn shown(m: &Metric) -> String {
    if m.has_spread() {
        format!("{:.4} ({:.4}–{:.4})", m.value, m.low, m.high)
    } else {
        format!("{:.4}", m.value)
    }
}

/// The markdown comparison of two runs' `results.json`.
#[must_use]
pub fn report(old: &Value, new: &Value, names: (&str, &str)) -> String {
    let (before, after) = (metrics(old), metrics(new));
    let kind = |r: &Value| {
        r["run"]["kind"]
            .as_str()
            .unwrap_or(if r["quick"] == true { "quick" } else { "full" })
            .to_owned()
    };
    let mut md = format!(
        "# proxy-agent bench: {} ({}) against {} ({})\n\nA change is beyond noise when both runs measured a spread (rounds or repeats) and the two spreads do not overlap; single measurements show their change only.\n\n| metric | old | new | change | verdict |\n|---|---|---|---|---|\n",
        names.1,
        kind(new),
        names.0,
        kind(old)
    );
    for (name, old) in &before {
        let Some(new) = after.get(name) else {
            let _ = writeln!(md, "| {name} | {} | - | | not in the new run |", shown(old));
            continue;
        };
        let change = if old.value == 0.0 {
            "-".to_owned()
        } else {
            format!("{:+.1}%", (new.value / old.value - 1.0) * 100.0)
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {change} | {} |",
            shown(old),
            shown(new),
            verdict(old, new)
        );
    }
    for (name, new) in after.iter().filter(|(n, _)| !before.contains_key(*n)) {
        let _ = writeln!(md, "| {name} | - | {} | | new in this run |", shown(new));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_that_overlap_are_within_noise_and_others_say_which_way() {
        let m = |value, low, high| Metric {
            value,
            low,
            high,
            higher_is_better: true,
        };
        assert_eq!(
            verdict(&m(1.0, 0.9, 1.1), &m(1.05, 1.0, 1.2)),
            "within noise"
        );
        assert_eq!(
            verdict(&m(1.0, 0.9, 1.1), &m(1.3, 1.2, 1.4)),
            "better, beyond noise"
        );
        assert_eq!(
            verdict(&m(1.0, 0.9, 1.1), &m(0.7, 0.6, 0.8)),
            "worse, beyond noise"
        );
        let slower = Metric {
            higher_is_better: false,
            ..m(2.0, 1.8, 2.2)
        };
        assert_eq!(verdict(&m(1.0, 0.9, 1.1), &slower), "worse, beyond noise");
        assert_eq!(
            verdict(&Metric::single(1.0, true), &m(2.0, 1.9, 2.1)),
            "no spread measured"
        );
    }
}
