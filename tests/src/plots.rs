//! The bench's plots, drawn with plotters from the results it just wrote: full-sync
//! time and connection rate per scale for each dataplane, and the NodePort ratios.
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

type Failure = Box<dyn std::error::Error>;
/// A named, coloured line of (x, y) points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// (name, colour) of each dataplane line.
const SERIES: [(&str, RGBColor); 6] = [
    ("iptables", RGBColor(214, 39, 40)),
    ("iptables-nft", RGBColor(255, 127, 14)),
    ("kube-proxy nftables", RGBColor(148, 103, 189)),
    ("nftables", RGBColor(31, 119, 180)),
    ("ebpf", RGBColor(44, 160, 44)),
    ("conntrack", RGBColor(127, 127, 127)),
];

/// Draws every plot into `out`; returns the files written.
///
/// # Errors
/// When a plot cannot be drawn (no font, an unwritable directory).
pub fn draw(out: &Path, results: &Value) -> Result<Vec<String>, Failure> {
    let mut written = Vec::new();
    if let Some(name) = full_sync(out, results)? {
        written.push(name);
    }
    if let Some(name) = connection_rate(out, results)? {
        written.push(name);
    }
    if let Some(name) = nodeport(out, results)? {
        written.push(name);
    }
    Ok(written)
}

/// `log10` of a scale, for a logarithmic x axis (1 Service is 10^0).
#[allow(clippy::cast_precision_loss, reason = "Service counts are small")]
fn log_scale(n: u64) -> f64 {
    (n.max(1) as f64).log10()
}

/// The whiskers of one line: (Services, lowest, highest) of its rounds.
type Bars<'a> = &'a dyn Fn(&str) -> Vec<(u64, f64, f64)>;
/// A line's colour and its whiskers in chart coordinates (x, low, high).
type Whiskers = (RGBColor, Vec<(f64, f64, f64)>);

/// One line per dataplane over the scales; `points(mode)` gives (Services, value) and
/// `bars(mode)` the spread drawn as error bars around them.
fn lines(
    file: &Path,
    caption: &str,
    y_label: &str,
    log_y: bool,
    points: &dyn Fn(&str) -> Vec<(u64, f64)>,
    bars: Bars<'_>,
) -> Result<(), Failure> {
    let y = |v: f64| if log_y { v.log10() } else { v };
    let series: Vec<Line> = SERIES
        .iter()
        .map(|(name, colour)| {
            let pts = points(name)
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .map(|(n, v)| (log_scale(n), y(v)))
                .collect();
            (*name, *colour, pts)
        })
        .filter(|(_, _, pts): &Line| !pts.is_empty())
        .collect();
    let whiskers: Vec<Whiskers> = SERIES
        .iter()
        .map(|(name, colour)| {
            let bars = bars(name)
                .into_iter()
                .filter(|(_, low, _)| *low > 0.0)
                .map(|(n, low, high)| (log_scale(n), y(low), y(high)))
                .collect();
            (*colour, bars)
        })
        .collect();
    let all = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, v)| *v));
    let ends = whiskers
        .iter()
        .flat_map(|(_, b)| b.iter().flat_map(|(_, lo, hi)| [*lo, *hi]));
    let (mut y_min, mut y_max) = (f64::MAX, f64::MIN);
    for value in all.chain(ends) {
        y_min = y_min.min(value);
        y_max = y_max.max(value);
    }
    if series.is_empty() {
        return Ok(());
    }
    let pad = ((y_max - y_min) * 0.1).max(0.05);
    let root = BitMapBackend::new(file, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.2f64..4.7f64, (y_min - pad)..(y_max + pad))?;
    chart
        .configure_mesh()
        .x_desc("Services (log scale)")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .y_label_formatter(&|y| {
            if log_y {
                format!("{:.2}", 10f64.powf(*y))
            } else {
                format!("{y:.2}")
            }
        })
        .draw()?;
    for (name, colour, pts) in series {
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
            });
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, colour.filled())))?;
    }
    for (colour, bars) in whiskers {
        for (x, low, high) in bars {
            let style = colour.stroke_width(2);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, low), (x, high)],
                style,
            )))?;
            for end in [low, high] {
                let cap = vec![(x - 0.04, end), (x + 0.04, end)];
                chart.draw_series(std::iter::once(PathElement::new(cap, style)))?;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn full_sync(out: &Path, results: &Value) -> Result<Option<String>, Failure> {
    let rows = results["full_sync"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return Ok(None);
    }
    // kube-proxy's modes (iptables is its legacy backend) and ours.
    let seconds = |row: &Value, mode: &str| match mode {
        "iptables" => row["iptables_restore_s"].as_f64(),
        "iptables-nft" => row["kube_proxy"]["kube_proxy_iptables_nft"]["s"].as_f64(),
        "kube-proxy nftables" => row["kube_proxy"]["kube_proxy_nftables"]["s"].as_f64(),
        "nftables" => row["nftables_s"].as_f64(),
        "ebpf" => row["ebpf_s"].as_f64(),
        _ => None,
    };
    let name = "full_sync.png";
    lines(
        &out.join(name),
        "Full sync of N Services × 10 endpoints",
        "seconds (log scale)",
        true,
        &|mode| {
            rows.iter()
                .filter_map(|r| Some((r["services"].as_u64()?, seconds(r, mode)?)))
                .collect()
        },
        &|_| Vec::new(),
    )?;
    Ok(Some(name.to_owned()))
}

fn connection_rate(out: &Path, results: &Value) -> Result<Option<String>, Failure> {
    let rows = results["datapath"]["scales"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        return Ok(None);
    }
    let name = "connection_rate.png";
    lines(
        &out.join(name),
        "ClusterIP connection rate, ratio to an unproxied twin (1 client; bars: lowest–highest round)",
        "× direct",
        false,
        &|mode| {
            rows.iter()
                .filter_map(|r| {
                    let ratio = r["modes"].as_array()?.iter().find(|m| m["mode"] == mode)?
                        ["single"]["ratio"]
                        .as_f64()?;
                    Some((r["services"].as_u64()?, ratio))
                })
                .collect()
        },
        &|mode| {
            rows.iter()
                .filter_map(|r| {
                    let cell = &r["modes"].as_array()?.iter().find(|m| m["mode"] == mode)?
                        ["single"];
                    let (low, high) = (cell["ratio_min"].as_f64()?, cell["ratio_max"].as_f64()?);
                    Some((r["services"].as_u64()?, low, high))
                })
                .collect()
        },
    )?;
    Ok(Some(name.to_owned()))
}

/// Bars: TCP and UDP ratio to direct per dataplane.
fn nodeport(out: &Path, results: &Value) -> Result<Option<String>, Failure> {
    let modes = results["nodeport"]["modes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if modes.is_empty() {
        return Ok(None);
    }
    let name = "nodeport.png";
    let file = out.join(name);
    let root = BitMapBackend::new(&file, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let count = u32::try_from(modes.len()).unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "NodePort from outside, ratio to direct through the node (TCP | UDP)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..f64::from(count), 0f64..1.3f64)?;
    let labels: Vec<String> = modes
        .iter()
        .map(|m| m["mode"].as_str().unwrap_or("?").to_owned())
        .collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(modes.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 0.01 {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "small index"
                )]
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("× direct")
        .draw()?;
    for (i, mode) in modes.iter().enumerate() {
        let x = f64::from(u32::try_from(i).unwrap_or(0));
        let colour = SERIES
            .iter()
            .find(|(n, _)| mode["mode"] == *n)
            .map_or(BLACK, |(_, c)| *c);
        for (j, protocol) in ["tcp", "udp"].iter().enumerate() {
            let ratio = mode[protocol]["ratio"].as_f64().unwrap_or(0.0);
            let left = x + 0.1 + 0.4 * f64::from(u32::try_from(j).unwrap_or(0));
            let style = if j == 0 {
                colour.filled()
            } else {
                colour.mix(0.5).filled()
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [(left, 0.0), (left + 0.38, ratio)],
                style,
            )))?;
        }
    }
    root.present()?;
    Ok(Some(name.to_owned()))
}
