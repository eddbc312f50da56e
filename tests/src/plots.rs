//! The bench's plots, drawn with plotters from the results it just wrote: full-sync
//! time and connection rate per scale for each dataplane, and the NodePort ratios.
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

type Failure = Box<dyn std::error::Error>;
/// A named, coloured line of (x, y) points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// (name, colour) of each dataplane line.
const SERIES: [(&str, RGBColor); 4] = [
    ("iptables", RGBColor(214, 39, 40)),
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

/// One line per dataplane over the scales; `points(mode)` gives (Services, value).
fn lines(
    file: &Path,
    caption: &str,
    y_label: &str,
    log_y: bool,
    points: &dyn Fn(&str) -> Vec<(u64, f64)>,
) -> Result<(), Failure> {
    let series: Vec<Line> = SERIES
        .iter()
        .map(|(name, colour)| {
            let pts = points(name)
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .map(|(n, v)| (log_scale(n), if log_y { v.log10() } else { v }))
                .collect();
            (*name, *colour, pts)
        })
        .filter(|(_, _, pts): &Line| !pts.is_empty())
        .collect();
    let all = series.iter().flat_map(|(_, _, p)| p.iter());
    let (mut y_min, mut y_max) = (f64::MAX, f64::MIN);
    for (_, y) in all {
        y_min = y_min.min(*y);
        y_max = y_max.max(*y);
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
    let key = |mode: &str| match mode {
        "iptables" => "iptables_restore_s",
        "nftables" => "nftables_s",
        "ebpf" => "ebpf_s",
        _ => "",
    };
    let name = "full_sync.png";
    lines(
        &out.join(name),
        "Full sync of N Services × 10 endpoints",
        "seconds (log scale)",
        true,
        &|mode| {
            rows.iter()
                .filter_map(|r| Some((r["services"].as_u64()?, r[key(mode)].as_f64()?)))
                .collect()
        },
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
        "ClusterIP connection rate, ratio to direct (1 client)",
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
