//! The bench's north-south part: a client outside the cluster (the LAN namespace) to a
//! NodePort on node1 whose Service is the last of N, TCP connection rate and UDP
//! packet rate (a bounded flood), through kube-proxy's iptables layout, our nftables and our
//! eBPF per-packet programs; the baseline is the same client straight to the pod
//! through the node (routed, no NAT), measured before and after each mode.
use std::{path::Path, process::Stdio};

use k8s_openapi::api::discovery::v1::EndpointPort;
use proxy_agent::{
    dataplane::{
        ebpf::{EbpfDataplane, Sizing},
        Dataplane,
    },
    model::{
        self,
        service::{PortInfo, ServiceType},
        NodeInfo, Protocol, Snapshot,
    },
};
use serde_json::{json, Value};

use crate::{
    agent::testpod_bin,
    cluster::{sh_in, within_netns, Cluster},
    connbench::{self, Rate},
    scale,
};

const NODE_IP: &str = "10.100.0.1";
const TCP_NODEPORT: u16 = 30080;
const UDP_NODEPORT: u16 = 30053;
/// The dataplanes measured, each between two direct measurements; iptables last (its
/// legacy nat table cannot be removed, and keeps connection tracking on after it).
pub const MODES: [&str; 4] = ["conntrack", "nftables", "ebpf", "iptables"];

/// Service `last` of the snapshot as a NodePort (TCP and UDP) over `servers`.
fn with_nodeport(snapshot: &Snapshot, last: usize) -> Snapshot {
    let mut changed = snapshot.clone();
    let name = format!("s{last}");
    let key = ("bench".to_owned(), name.clone());
    let mut service = (**changed.services().get(&key).expect("service")).clone();
    service.type_ = ServiceType::NodePort;
    service.policies.externally_accessible = true;
    service.ports[0].node_port = Some(TCP_NODEPORT);
    service.ports.push(PortInfo {
        name: Some("dns".into()),
        protocol: Protocol::Udp,
        port: 53,
        node_port: Some(UDP_NODEPORT),
    });
    changed.put_service(key, std::sync::Arc::new(service));
    let slice_key = ("bench".to_owned(), format!("{name}-1"));
    let mut slice = (**changed.endpoint_slices().get(&slice_key).expect("slice")).clone();
    slice.ports.push(EndpointPort {
        name: Some("dns".into()),
        port: Some(8080),
        protocol: Some("UDP".into()),
        ..EndpointPort::default()
    });
    changed.put_slice(slice_key, std::sync::Arc::new(slice));
    changed
}

/// One client in the LAN, pinned to CPU 0 like the servers: `testpod` `kind` to `to`.
fn measure(cluster: &Cluster, kind: &str, to: &str, seconds: f64) -> Rate {
    let testpod = testpod_bin().display().to_string();
    let millis = format!("{}", (seconds * 1000.0).round());
    let out = cluster
        .command_in_lan(&["taskset", "-c", "0", &testpod, kind, to, &millis])
        .stdout(Stdio::piped())
        .output()
        .expect("client");
    Rate::parse(&String::from_utf8_lossy(&out.stdout), seconds)
}

/// TCP and UDP rates of one path.
fn measure_both(cluster: &Cluster, tcp: &str, udp: &str, seconds: f64) -> (Rate, Rate) {
    (
        measure(cluster, "rate", tcp, seconds),
        measure(cluster, "udp-flood", udp, seconds),
    )
}

/// Runs every mode for a NodePort that is the last of `services`; `seconds` per round.
/// Needs `connbench::run`'s pods (its servers answer TCP and UDP on 8080).
#[must_use]
pub fn run(cluster: &mut Cluster, bpffs: &Path, services: usize, seconds: f64) -> Value {
    // The LAN reaches pods through node1: the direct path, routed, without NAT.
    let _ = cluster.run_in_lan(&["ip", "route", "replace", "10.244.1.0/24", "via", NODE_IP]);
    let last = services - 1;
    let servers = [connbench::server_ip(0), connbench::server_ip(1)];
    let snapshot = with_nodeport(
        &scale::with_endpoints(&scale::snapshot(services, 2), last, &servers),
        last,
    );
    let node = NodeInfo {
        addresses: vec![NODE_IP.parse().expect("ip")],
        ..connbench::node_info()
    };
    let desired = model::build(&snapshot, &node);
    let direct = format!("{}:8080", servers[0]);
    let (tcp, udp) = (
        format!("{NODE_IP}:{TCP_NODEPORT}"),
        format!("{NODE_IP}:{UDP_NODEPORT}"),
    );
    let mut before = measure_both(cluster, &direct, &direct, seconds);
    let mut directs = vec![before];
    let mut modes = Vec::new();
    for mode in MODES {
        let installed = if mode == "ebpf" {
            install_ebpf(cluster, bpffs, &desired, &node)
        } else {
            connbench::install(cluster, mode, &desired, bpffs).map(|(_, s)| (None, s))
        };
        let (dataplane, install_s) = match installed {
            Ok(done) => done,
            Err(error) => {
                eprintln!("NodePort, {mode}: could not load: {error}");
                connbench::uninstall_mode(cluster, mode, bpffs);
                modes.push(json!({"mode": mode, "error": error}));
                continue;
            }
        };
        let (to_tcp, to_udp) = if mode == "conntrack" {
            (&direct, &direct)
        } else {
            (&tcp, &udp)
        };
        let got = measure_both(cluster, to_tcp, to_udp, seconds);
        drop(dataplane);
        if mode == "ebpf" {
            uninstall_ebpf(cluster, bpffs);
        } else {
            connbench::uninstall_mode(cluster, mode, bpffs);
        }
        connbench::forget_connections(cluster, "node1");
        let after = measure_both(cluster, &direct, &direct, seconds);
        let tcp_base = f64::midpoint(before.0.per_second, after.0.per_second);
        let udp_base = f64::midpoint(before.1.per_second, after.1.per_second);
        eprintln!(
            "NodePort of {services} Services, {mode}: TCP {:.0}/s ({:.3}× direct), UDP {:.0}/s ({:.3}×)",
            got.0.per_second,
            got.0.per_second / tcp_base,
            got.1.per_second,
            got.1.per_second / udp_base
        );
        modes.push(json!({
            "mode": mode,
            "install_s": install_s,
            "tcp": got.0.json(Some(tcp_base)),
            "udp": got.1.json(Some(udp_base)),
        }));
        directs.push(after);
        before = after;
    }
    let mean = |f: fn(&(Rate, Rate)) -> f64| {
        directs.iter().map(f).sum::<f64>() / f64::from(u32::try_from(directs.len()).unwrap_or(1))
    };
    json!({
        "services": services,
        "seconds_per_measurement": seconds,
        "direct": {"tcp_per_second": mean(|d| d.0.per_second), "udp_per_second": mean(|d| d.1.per_second)},
        "modes": modes,
    })
}

/// The eBPF dataplane started in node1 (socket and per-packet programs, the latter on
/// node1's eth0), programmed with `desired`.
fn install_ebpf(
    cluster: &Cluster,
    bpffs: &Path,
    desired: &model::DesiredState,
    node: &NodeInfo,
) -> Result<(Option<Box<EbpfDataplane>>, f64), String> {
    let started = std::time::Instant::now();
    let (bpffs, cgroup) = (bpffs.to_owned(), cluster.node("node1").cgroup.clone());
    let local = node.local();
    let netns = cluster.node("node1").netns.clone();
    let mut dataplane = within_netns(&netns, move || {
        EbpfDataplane::start(&bpffs, &cgroup, Some(&local), Sizing::default())
            .map_err(|e| e.to_string())
    })?;
    dataplane
        .apply(
            &model::diff(&model::DesiredState::default(), desired),
            desired,
        )
        .map_err(|e| e.to_string())?;
    Ok((Some(Box::new(dataplane)), started.elapsed().as_secs_f64()))
}

fn uninstall_ebpf(cluster: &Cluster, bpffs: &Path) {
    let _ = proxy_agent::dataplane::ebpf::loader::cleanup(bpffs);
    let netns = cluster.node("node1").netns.clone();
    let _ = sh_in(
        &netns,
        &[
            "nft",
            "delete",
            "table",
            "inet",
            proxy_agent::dataplane::ebpf::nodeport::TABLE,
        ],
    );
}

/// The ratio of `mode`'s TCP (`"tcp"`) or UDP rate to direct, if measured.
#[must_use]
pub fn ratio(results: &Value, mode: &str, protocol: &str) -> Option<f64> {
    results["modes"]
        .as_array()?
        .iter()
        .find(|m| m["mode"] == mode)?[protocol]["ratio"]
        .as_f64()
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = format!(
        "\n## NodePort from outside the cluster ({} Services, the NodePort the last), ratio to direct through the node\n\nA client in the LAN namespace to node1's NodePort (TCP: connect + request + response + reset close; UDP: a bounded flood, one flow keeping 32 datagrams in flight, counting echoes: two packets through the path per echo), {} s per measurement, each between two of the same client straight to the pod through node1 (routed, no NAT). \"conntrack\" is that direct path with connection tracking on.\n\n| path | TCP connections | latency p50 / p99 | UDP echoes | latency p50 / p99 |\n|---|---|---|---|---|\n",
        results["services"], results["seconds_per_measurement"]
    );
    let _ = writeln!(
        md,
        "| direct | {:.0}/s | | {:.0}/s | |",
        results["direct"]["tcp_per_second"].as_f64().unwrap_or(0.0),
        results["direct"]["udp_per_second"].as_f64().unwrap_or(0.0)
    );
    for mode in results["modes"].as_array().into_iter().flatten() {
        let name = mode["mode"].as_str().unwrap_or("?");
        if let Some(error) = mode["error"].as_str() {
            let _ = writeln!(
                md,
                "| {name} | failed to load: {} | | | |",
                error.lines().next().unwrap_or_default()
            );
            continue;
        }
        let cell = |rate: &Value| {
            let f = |k: &str| rate[k].as_f64().unwrap_or(0.0);
            (
                format!("{:.0}/s ({:.3}×)", f("per_second"), f("ratio")),
                if f("p99_us") > 0.0 {
                    format!("{:.0} / {:.0} µs", f("p50_us"), f("p99_us"))
                } else {
                    "-".to_owned()
                },
            )
        };
        let ((tcp, tcp_latency), (udp, udp_latency)) = (cell(&mode["tcp"]), cell(&mode["udp"]));
        let _ = writeln!(
            md,
            "| {name} | {tcp} | {tcp_latency} | {udp} | {udp_latency} |"
        );
    }
    md
}
