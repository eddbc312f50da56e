//! The `iptables-restore` input kube-proxy's iptables proxier writes for a desired
//! state's ClusterIP frontends (pkg/proxy/iptables/proxier.go: KUBE-SERVICES →
//! KUBE-SVC-* with `statistic mode random` splits → KUBE-SEP-* DNAT, masquerade by mark),
//! and for `externalTrafficPolicy: Cluster` NodePorts KUBE-NODEPORTS → KUBE-EXT-*
//! (mark for masquerade) → the Service's KUBE-SVC-*, for the bench's baseline.
//! Deviation: only the nat table; the filter-table chains (KUBE-FORWARD,
//! KUBE-EXTERNAL-SERVICES) and Local-policy KUBE-SVL-* chains are left out.
use std::fmt::Write;

use proxy_agent::{
    dataplane::nftables::names,
    model::{DesiredState, FrontendKind},
};

/// The nat table, for `iptables-restore --noflush` (our chains are declared, so they
/// are flushed and refilled; the built-in chains are left alone).
#[must_use]
pub fn ruleset(desired: &DesiredState, cluster_cidr: &str) -> String {
    let mut chains = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut nodeports = std::collections::BTreeSet::new();
    for (key, frontend) in &desired.frontends {
        let external = frontend.kind == FrontendKind::NodePort
            && !frontend.external.local
            && !frontend.pod.backends.is_empty();
        if external && key.ip.is_ipv4() && nodeports.insert((key.port, key.protocol)) {
            // One rule per port: KUBE-NODEPORTS matches any local address.
            let (svc, proto) = (&frontend.service, key.protocol);
            let p = proto.to_string().to_lowercase();
            let ext = names::external_chain(svc, proto);
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment \"{svc}\" -m {p} -p {p} --dport {} -j {ext}\n-A {ext} -m comment --comment \"masquerade traffic for {svc} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {}",
                key.port,
                names::service_chain(svc, proto)
            );
        }
        if frontend.kind != FrontendKind::ClusterIp || key.ip.is_ipv6() {
            continue;
        }
        let (svc, proto) = (&frontend.service, key.protocol);
        let p = proto.to_string().to_lowercase();
        let svc_chain = names::service_chain(svc, proto);
        let backends = &frontend.pod.backends;
        // Services without endpoints get filter-table REJECT rules, not modelled here.
        if backends.is_empty() {
            continue;
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{svc} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {svc_chain}",
            key.ip, key.port
        );
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{svc} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
            key.ip, key.port
        );
        let n = backends.len();
        for (i, backend) in backends.iter().enumerate() {
            let sep = names::endpoint_chain(svc, proto, backend);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let split = if i + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "endpoint counts are small")]
                let probability = 1.0 / (n - i) as f64;
                format!(" -m statistic --mode random --probability {probability:.10}")
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{svc} -> {backend}\"{split} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {svc} -s {}/32 -j KUBE-MARK-MASQ\n-A {sep} -m comment --comment {svc} -m {p} -p {p} -j DNAT --to-destination {backend}",
                backend.ip
            );
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    chains.push_str(&rules);
    chains
}
