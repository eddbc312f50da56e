//! With the eBPF dataplane, what pods send to kube-dns's ClusterIP goes to the local
//! listener while it answers: each second a real query to the listener refreshes the
//! redirect's heartbeat; a dead or hung responder stops refreshing it, and within
//! `LOCAL_REDIRECT_TTL_NS` the socket LB sends queries to kube-dns's pods again.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RecordType},
};
use proxy_common::{LocalRedirect4, Service4Key};
use tokio::{net::UdpSocket, sync::watch, time::timeout};
use tracing::{info, warn};

use super::{zone::Zone, DnsError};

const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

type RedirectMap = HashMap<MapData, Service4Key, LocalRedirect4>;

fn open(bpffs: &Path) -> Result<RedirectMap, DnsError> {
    let data = MapData::from_pin(bpffs.join(proxy_common::MAP_LOCAL_REDIRECT4))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

fn key(ip: std::net::Ipv4Addr, port: u16, proto: u8) -> Service4Key {
    Service4Key {
        address_be: u32::from_ne_bytes(ip.octets()),
        dport_be: port.to_be(),
        backend_slot: 0,
        proto,
        scope: 0,
        pad: [0; 2],
    }
}

/// Whether the listener at `target` answers a query for `name` right now.
async fn probe(target: SocketAddr, name: &Name) -> bool {
    let mut query = Message::new();
    query
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .add_query(Query::query(name.clone(), RecordType::TXT));
    let Ok(bytes) = query.to_vec() else {
        return false;
    };
    let exchange = async {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        socket.connect(target).await?;
        socket.send(&bytes).await?;
        let mut buffer = [0u8; 1232];
        let n = socket.recv(&mut buffer).await?;
        Ok::<_, std::io::Error>(Message::from_vec(&buffer[..n]).ok())
    };
    matches!(
        timeout(PROBE_TIMEOUT, exchange).await,
        Ok(Ok(Some(answer))) if answer.id() == query.id() && answer.response_code() == ResponseCode::NoError
    )
}

/// Keeps the redirect of kube-dns's frontends to `target` alive while it answers.
///
/// # Errors
/// When the pinned map cannot be opened (the eBPF dataplane is not loaded).
pub fn start(
    bpffs: &Path,
    target: SocketAddr,
    domain: &str,
    zone: watch::Receiver<Option<Arc<Zone>>>,
) -> Result<(), DnsError> {
    let IpAddr::V4(target_ip) = target.ip() else {
        return Err(DnsError::RedirectTarget(target));
    };
    let mut map = open(bpffs)?;
    let probe_name = Name::from_ascii(format!("dns-version.{domain}."))?;
    tokio::spawn(async move {
        let mut written: BTreeSet<Service4Key> = BTreeSet::new();
        let mut healthy = false;
        loop {
            let alive = probe(target, &probe_name).await;
            if alive != healthy {
                info!(%target, alive, "local DNS listener health changed; kube-dns queries go {}", if alive { "to it" } else { "to kube-dns" });
                healthy = alive;
            }
            let wanted: BTreeSet<Service4Key> = zone
                .borrow()
                .as_ref()
                .map(|z| {
                    z.kube_dns_frontends()
                        .iter()
                        .filter_map(|&(ip, port, proto)| match ip {
                            IpAddr::V4(ip) => Some(key(ip, port, proto)),
                            IpAddr::V6(_) => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            for gone in written.difference(&wanted) {
                let _ = map.remove(gone);
            }
            if alive {
                let value = LocalRedirect4 {
                    address_be: u32::from_ne_bytes(target_ip.octets()),
                    port_be: target.port().to_be(),
                    pad: 0,
                    heartbeat_ns: crate::dataplane::system::monotonic_ns(),
                };
                for k in &wanted {
                    if let Err(error) = map.insert(k, value, 0) {
                        warn!(%error, "cannot refresh the DNS redirect");
                    }
                }
            }
            written = wanted;
            tokio::time::sleep(PROBE_EVERY).await;
        }
    });
    Ok(())
}

/// Drops every redirect at once (on exit), so queries go to kube-dns without waiting
/// for the heartbeat to age out.
pub fn clear(bpffs: &Path) {
    let Ok(mut map) = open(bpffs) else {
        return;
    };
    let keys: Vec<Service4Key> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}
