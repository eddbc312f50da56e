//! NodeLocal DNS: authoritative answers for Services straight from the model, a caching
//! forwarder for everything else, served on the node so pods skip kube-dns and conntrack.
pub mod cache;
pub mod iface;
pub mod metrics;
pub mod notrack;
pub mod redirect;
pub mod resolver;
pub mod server;
pub mod upstream;
pub mod wire;
pub mod zone;
pub mod zone_tracker;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::watch;

use crate::source::{addresses::AddressError, SourceUpdate};

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS listen addresses: {0}")]
    Interface(#[from] AddressError),
    #[error("DNS listener: {0}")]
    Listen(#[from] std::io::Error),
    #[error("the socket LB redirects to an IPv4 listener; {0} is not")]
    RedirectTarget(SocketAddr),
    #[error("kube-dns redirect map (is the eBPF dataplane loaded?): {0}")]
    RedirectMap(#[from] aya::maps::MapError),
    #[error("DNS probe name: {0}")]
    ProbeName(#[from] hickory_proto::ProtoError),
}
use resolver::{Resolver, Upstreams};
use zone::Zone;
use zone_tracker::ZoneTracker;

/// What `run` was told about DNS.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    pub upstreams: Upstreams,
    pub domain: String,
    pub ttl: u32,
    /// With the eBPF dataplane: its pin directory, where kube-dns's ClusterIP is
    /// redirected to the first listen address while it answers.
    pub redirect: Option<std::path::PathBuf>,
    /// With the nftables dataplane: answer on kube-dns's ClusterIPs too, NOTRACK'ed.
    pub notrack: bool,
}

/// Parses `ADDR[:PORT]` (IPv6 as `[ADDR]:PORT` or bare), port 53 by default.
///
/// # Errors
/// When it is neither.
pub fn parse_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not ADDR[:PORT]"))
}

/// The `nameserver` lines of a resolv.conf, minus `own` addresses (no forwarding loop).
#[must_use]
pub fn resolv_conf_servers(text: &str, own: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == "nameserver").then_some(())?;
            fields.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|addr| !own.contains(addr))
        .collect()
}

/// Starts the responder: the listen addresses on the dummy interface when needed, the
/// zone following every snapshot the source publishes, UDP and TCP listeners.
///
/// # Errors
/// When the interface or a listener cannot be set up.
pub async fn start(
    config: DnsConfig,
    mut updates: watch::Receiver<SourceUpdate>,
    metrics: metrics::DnsMetrics,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, DnsError> {
    iface::ensure(&config.listen).await?;
    let listeners = server::bind(&config.listen).await?;
    let (zone_tx, zone_rx) = watch::channel(None::<Arc<Zone>>);
    let (domain, ttl) = (config.domain.clone(), config.ttl);
    // The zone is built (whole at start) and followed on a thread of its own, off the
    // runtime that answers: each new snapshot rewrites the records of the Services it
    // changed only.
    crate::background::spawn("dns-zone", move || async move {
        let mut followed: Option<(Arc<crate::model::Snapshot>, ZoneTracker)> = None;
        loop {
            let snapshot = updates.borrow_and_update().snapshot.clone();
            if let Some(snapshot) = snapshot {
                let tracker = match followed.take() {
                    Some((old, mut tracker)) => {
                        tracker.update(&snapshot, &old.changes_to(&snapshot).services);
                        tracker
                    }
                    None => ZoneTracker::new(&snapshot, &domain, ttl),
                };
                zone_tx.send_replace(Some(Arc::new(tracker.zone())));
                followed = Some((snapshot, tracker));
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    })?;
    if let (Some(bpffs), Some(&target)) = (&config.redirect, config.listen.first()) {
        redirect::start(bpffs, target, &config.domain, zone_rx.clone())?;
    }
    let resolver = Resolver::new(
        zone_rx.clone(),
        config.upstreams,
        metrics,
        tokio::runtime::Handle::current(),
    );
    if config.notrack {
        notrack::start(zone_rx, Arc::clone(&resolver));
    }
    Ok(tokio::spawn(listeners.serve(resolver)))
}

#[cfg(test)]
mod tests {
    use super::{parse_server, resolv_conf_servers};

    #[test]
    fn servers_default_to_port_53_and_resolv_conf_skips_our_own() {
        assert_eq!(
            parse_server("10.0.0.10").unwrap().to_string(),
            "10.0.0.10:53"
        );
        assert_eq!(
            parse_server("[fd00::a]:5353").unwrap().to_string(),
            "[fd00::a]:5353"
        );
        assert_eq!(parse_server("fd00::a").unwrap().to_string(), "[fd00::a]:53");
        assert!(parse_server("nope").is_err());
        let conf =
            "# c\nsearch x\nnameserver 169.254.20.10\nnameserver 192.0.2.53\nnameserver junk\n";
        let own = [parse_server("169.254.20.10").unwrap()];
        assert_eq!(
            resolv_conf_servers(conf, &own),
            vec![parse_server("192.0.2.53").unwrap()]
        );
    }
}
