//! The bench's per-packet program cost: the kernel's own mean time per run of the
//! eBPF ingress and egress programs (`BPF_PROG_TEST_RUN` with a repeat count) on the
//! packets a NodePort flow is made of. Free of the network's noise, it shows what each
//! change to the programs costs.
use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_agent::model::{DesiredState, EmptyVerdict, FrontendKey, FrontendKind, Protocol};
use serde_json::{json, Value};

use crate::progtest::{endpoints, frontend, route, tcp, udp, Programs};

const RUNS: u32 = 200_000;
const ACK: u8 = 0x10;

/// Mean nanoseconds per run for each packet kind, the best of three rounds, with the
/// kernel programs' debug records off (the agent's default) and on (`-v`).
#[must_use]
pub fn run() -> Value {
    let off = run_with(false);
    let on = run_with(true);
    let rows: Vec<Value> = off
        .iter()
        .zip(&on)
        .map(|((name, ns), (_, ns_on))| json!({"packet": name, "ns": ns, "ns_kernel_log": ns_on}))
        .collect();
    json!({"runs": RUNS, "rows": rows})
}

fn run_with(kernel_log: bool) -> Vec<(&'static str, u32)> {
    static OFF: u8 = 0;
    static DEBUG: u8 = 4;
    let kernel_log_level = if kernel_log { &DEBUG } else { &OFF };
    let node = Ipv4Addr::new(10, 100, 0, 1);
    let backends = [
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080),
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 8080),
    ];
    let masqueraded = route(&backends, true, EmptyVerdict::Reject);
    let mut state = DesiredState::default();
    for (port, protocol) in [(30080, Protocol::Tcp), (30053, Protocol::Udp)] {
        let key = FrontendKey {
            ip: node.into(),
            port,
            protocol,
        };
        let np = frontend(
            "np",
            FrontendKind::NodePort,
            masqueraded.clone(),
            masqueraded.clone(),
        );
        state.frontends.insert(key, np.into());
    }
    let mut programs = Programs::load_with("progbench", Some(kernel_log_level));
    programs.program(&state);
    programs.cluster_cidr(Ipv4Addr::new(10, 244, 0, 0), 16);
    let client = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 40000);
    let (udp_np, tcp_np) = (
        SocketAddrV4::new(node, 30053),
        SocketAddrV4::new(node, 30080),
    );
    let backend = endpoints(&programs.run(true, &udp(client, udp_np, b"x", true)).packet).1;
    let tcp_backend = endpoints(&programs.run(true, &tcp(client, tcp_np, 0x02)).packet).1;
    let cases: [(&str, bool, Vec<u8>); 5] = [
        ("ingress, UDP flow", true, udp(client, udp_np, b"x", true)),
        ("egress, UDP reply", false, udp(backend, client, b"x", true)),
        ("ingress, TCP flow", true, tcp(client, tcp_np, ACK)),
        ("egress, TCP reply", false, tcp(tcp_backend, client, ACK)),
        (
            "ingress, not a Service",
            true,
            tcp(client, SocketAddrV4::new(node, 22), ACK),
        ),
    ];
    cases
        .iter()
        .map(|(name, ingress, packet)| {
            let best = (0..3)
                .map(|_| programs.run_repeated(*ingress, packet, RUNS).1)
                .min()
                .unwrap_or(0);
            eprintln!("per-packet program, {name}, kernel log level {kernel_log_level}: {best} ns");
            (*name, best)
        })
        .collect()
}

/// The markdown section.
#[must_use]
pub fn report(results: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = format!(
        "\n## Per-packet program cost\n\nThe kernel's mean time per run of the eBPF per-packet programs (`BPF_PROG_TEST_RUN`, {} runs, best of three) on the packets of an established NodePort flow, and on one to no Service; with the kernel programs' debug records off (the agent's default: the verifier prunes their code) and on (`-v`).\n\n| packet | ns per run | with kernel debug records on |\n|---|---|---|\n",
        results["runs"]
    );
    for row in results["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            row["packet"].as_str().unwrap_or("?"),
            row["ns"],
            row["ns_kernel_log"]
        );
    }
    md
}
