//! With the nftables dataplane, as node-cache does: the listener also binds kube-dns's
//! ClusterIPs, and raw-priority NOTRACK rules keep DNS to them out of conntrack (no UDP
//! conntrack race, kubernetes#56903), and so out of the Service DNAT, while it runs.
use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{sync::watch, task::AbortHandle};
use tracing::{info, warn};

use super::{iface, resolver::Resolver, server, zone::Zone, DnsError};
use crate::dataplane::nftables;

/// The agent's DNS table, apart from the Service tables.
pub const TABLE: &str = "proxy-agent-dns";

/// The whole table for `ips` (replacing any previous one), or its removal when empty.
#[must_use]
pub fn ruleset(ips: &BTreeSet<IpAddr>) -> String {
    let mut text = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    if ips.is_empty() {
        return text;
    }
    let set = |v6: bool| {
        ips.iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rules = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let addresses = set(v6);
        if addresses.is_empty() {
            continue;
        }
        for proto in ["udp", "tcp"] {
            let _ = write!(
                rules,
                "\t\t{family} daddr {{ {addresses} }} {proto} dport 53 notrack\n\t\t{family} saddr {{ {addresses} }} {proto} sport 53 notrack\n"
            );
        }
    }
    let _ = write!(
        text,
        "table inet {TABLE} {{\n\tcomment \"NodeLocal DNS: kube-dns ClusterIP answered on the node\"\n"
    );
    for (chain, hook) in [("raw-prerouting", "prerouting"), ("raw-output", "output")] {
        let _ = write!(
            text,
            "\tchain {chain} {{\n\t\ttype filter hook {hook} priority raw; policy accept;\n{rules}\t}}\n"
        );
    }
    text.push_str("}\n");
    text
}

/// Removes the table (on exit and in `cleanup`).
///
/// # Errors
/// When `nft` refuses.
pub fn remove() -> Result<(), nftables::NftError> {
    nftables::load(&ruleset(&BTreeSet::new()))
}

/// Follows kube-dns's ClusterIPs: each gets the interface address, a listener and
/// NOTRACK rules; one no longer kube-dns's loses all three.
pub fn start(mut zone: watch::Receiver<Option<Arc<Zone>>>, resolver: Arc<Resolver>) {
    tokio::spawn(async move {
        let mut serving: HashMap<IpAddr, AbortHandle> = HashMap::new();
        loop {
            let wanted: BTreeSet<IpAddr> = zone
                .borrow_and_update()
                .as_ref()
                .map(|z| z.kube_dns_frontends().iter().map(|f| f.0).collect())
                .unwrap_or_default();
            let had: BTreeSet<IpAddr> = serving.keys().copied().collect();
            for ip in had.difference(&wanted) {
                if let Some(task) = serving.remove(ip) {
                    task.abort();
                }
                if let Err(error) = iface::remove_address(*ip).await {
                    warn!(%ip, %error, "cannot remove a former kube-dns address");
                }
            }
            for &ip in wanted.difference(&had) {
                let addr = SocketAddr::new(ip, 53);
                let bound = match iface::ensure(&[addr]).await {
                    Ok(()) => server::bind(&[addr]).await.map_err(DnsError::from),
                    Err(error) => Err(DnsError::from(error)),
                };
                match bound {
                    Ok(listeners) => {
                        let task = tokio::spawn(listeners.serve(Arc::clone(&resolver)));
                        serving.insert(ip, task.abort_handle());
                    }
                    Err(error) => warn!(%ip, %error, "cannot listen on kube-dns's ClusterIP"),
                }
            }
            if had != wanted {
                let bound: BTreeSet<IpAddr> = serving.keys().copied().collect();
                // `nft` is a process: run off the runtime that answers.
                let text = ruleset(&bound);
                let loaded = tokio::task::spawn_blocking(move || nftables::load(&text)).await;
                match loaded.unwrap_or_else(|e| Err(nftables::NftError::Spawn(e.into()))) {
                    Ok(()) => {
                        info!(addresses = ?bound, "kube-dns ClusterIPs answered locally (NOTRACK)");
                    }
                    Err(error) => warn!(%error, "cannot load the DNS NOTRACK rules"),
                }
            }
            if zone.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::ruleset;

    #[test]
    fn both_directions_of_both_protocols_skip_conntrack() {
        let ips = ["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()].into();
        let text = ruleset(&ips);
        for want in [
            "ip daddr { 10.96.0.10 } udp dport 53 notrack",
            "ip saddr { 10.96.0.10 } tcp sport 53 notrack",
            "ip6 daddr { fd00::a } tcp dport 53 notrack",
            "type filter hook prerouting priority raw",
            "type filter hook output priority raw",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        assert!(!ruleset(&[].into()).contains("chain"));
    }
}
