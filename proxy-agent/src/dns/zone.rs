//! The cluster zone the agent answers itself, built from the model's snapshot per the
//! Kubernetes DNS-Based Service Discovery specification 1.1.0; pure, no I/O. Its maps
//! are persistent, so `ZoneTracker` publishes a new zone per change in O(1) after
//! rewriting only the changed Services' records.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use hickory_proto::rr::{
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV},
    Name, RData, Record, RecordType,
};

use crate::model::{
    service::{ServiceInfo, ServiceType},
    slice::Slice,
    Protocol, Snapshot,
};

/// The schema version `dns-version.<domain>` reports.
pub(super) const SCHEMA_VERSION: &str = "1.1.0";
/// Where names outside the agent's authority go unless `--dns-upstream` says otherwise.
pub const KUBE_DNS: (&str, &str) = ("kube-system", "kube-dns");

/// What the zone says about one question.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Records of the asked type (or the name's CNAME).
    Answer(Vec<RData>),
    /// The name exists without records of that type.
    NoData,
    /// The name does not exist (within the agent's authority).
    NxDomain,
    /// Not the agent's to answer: in the cluster domain (goes to the cluster DNS).
    Cluster,
    /// Not the agent's to answer: outside the cluster domain.
    External,
}

/// Every name the agent is authoritative for, lower-cased and fully qualified.
#[derive(Debug)]
pub struct Zone {
    domain: Name,
    svc: Name,
    ttl: u32,
    records: imbl::HashMap<String, Vec<RData>>,
    /// Ancestors of names with records, below `svc.<domain>`: they exist (NODATA); the
    /// value counts the names below.
    empty: imbl::HashMap<String, usize>,
    /// The ready addresses (and DNS port) of `kube-system/kube-dns`.
    kube_dns: Vec<SocketAddr>,
    /// kube-dns's ClusterIPs with each port 53 and its protocol number.
    kube_dns_frontends: Vec<(IpAddr, u16, u8)>,
    /// Distinct for every zone built in this process (answers reused from an older
    /// zone must never be sent).
    serial: u64,
}

/// The serial the next zone gets.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(super) fn key(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if !text.ends_with('.') {
        text.push('.');
    }
    text
}

pub(super) fn name(text: &str) -> Option<Name> {
    let mut n = Name::from_ascii(text).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// The reverse-lookup name of an address (`in-addr.arpa` / nibbles under `ip6.arpa`).
#[must_use]
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(ip) => {
            let mut out = String::new();
            for byte in ip.octets().iter().rev() {
                let _ = write!(out, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
            out + "ip6.arpa."
        }
    }
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    }
}

/// An endpoint as DNS sees it.
struct DnsEndpoint {
    ip: IpAddr,
    hostname: Option<String>,
}

/// The ready (or, with `publishNotReadyAddresses`, all) endpoints of a Service, and
/// its slices' ports `(name, protocol, port)`.
fn endpoints(slices: &[&Slice], all: bool) -> (Vec<DnsEndpoint>, BTreeSet<(String, String, u16)>) {
    let mut found = Vec::new();
    let mut ports = BTreeSet::new();
    for slice in slices {
        for port in &slice.ports {
            if let (Some(name), Some(number)) = (&port.name, port.port) {
                let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
                if let Ok(number) = u16::try_from(number) {
                    ports.insert((name.clone(), protocol, number));
                }
            }
        }
        for endpoint in &slice.endpoints {
            if !(endpoint.ready().unwrap_or(true) || all) {
                continue;
            }
            let ip = endpoint.address;
            if !found.iter().any(|e: &DnsEndpoint| e.ip == ip) {
                found.push(DnsEndpoint {
                    ip,
                    hostname: endpoint.hostname().map(str::to_owned),
                });
            }
        }
    }
    found.sort_by_key(|e| e.ip);
    (found, ports)
}

/// A label for an endpoint without a hostname, unique within its Service (CoreDNS's
/// dashed address).
fn endpoint_label(e: &DnsEndpoint) -> String {
    e.hostname.clone().unwrap_or_else(|| match e.ip {
        IpAddr::V4(ip) => ip.to_string().replace('.', "-"),
        IpAddr::V6(ip) => ip.to_string().replace(':', "-"),
    })
}

/// The records one Service contributes, in the order it adds them, each once.
pub(super) struct Builder {
    pub svc: String,
    pub records: Vec<(String, RData)>,
}

impl Builder {
    fn add(&mut self, owner: &str, data: RData) {
        let owner = owner.to_ascii_lowercase();
        if !self.records.iter().any(|(o, d)| *o == owner && *d == data) {
            self.records.push((owner, data));
        }
    }

    pub fn service(&mut self, service: &ServiceInfo, slices: &[&Slice]) -> Option<()> {
        let namespace = Some(service.namespace.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        let svc_name = Some(service.name.as_str()).filter(|n| !n.is_empty())?;
        if !service.has_spec {
            return None;
        }
        let owner = format!("{svc_name}.{namespace}.{}", self.svc);
        let target = name(&owner)?;
        if service.type_ == ServiceType::ExternalName {
            let external = name(service.external_name.as_deref()?)?;
            self.add(&owner, RData::CNAME(CNAME(external)));
            return Some(());
        }
        if !service.headless {
            for &ip in &service.cluster_ips {
                self.add(&owner, address(ip));
                self.add(&reverse_name(ip), RData::PTR(PTR(target.clone())));
            }
            for port in &service.ports {
                let Some(port_name) = &port.name else {
                    continue;
                };
                let protocol = port.protocol.to_string().to_ascii_lowercase();
                let srv = SRV::new(0, 100, port.port, target.clone());
                self.add(
                    &format!("_{port_name}._{protocol}.{owner}"),
                    RData::SRV(srv),
                );
            }
            return Some(());
        }
        let all = service.publish_not_ready_addresses;
        let (ready, ports) = endpoints(slices, all);
        let weight = u16::try_from(100 / ready.len().max(1)).unwrap_or(100);
        for endpoint in &ready {
            let host = format!("{}.{owner}", endpoint_label(endpoint));
            let host_name = name(&host)?;
            self.add(&owner, address(endpoint.ip));
            self.add(&host, address(endpoint.ip));
            self.add(
                &reverse_name(endpoint.ip),
                RData::PTR(PTR(host_name.clone())),
            );
            for (port_name, protocol, number) in &ports {
                let srv = SRV::new(0, weight, *number, host_name.clone());
                let protocol = protocol.to_ascii_lowercase();
                self.add(
                    &format!("_{port_name}._{protocol}.{owner}"),
                    RData::SRV(srv),
                );
            }
        }
        Some(())
    }
}

impl Zone {
    /// Distinct for every zone built by this process.
    #[must_use]
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The zone for `domain` (e.g. `cluster.local`) with records of `ttl` seconds.
    #[must_use]
    pub fn build(snapshot: &Snapshot, domain: &str, ttl: u32) -> Self {
        super::zone_tracker::ZoneTracker::new(snapshot, domain, ttl).zone()
    }

    /// A zone of these parts, with a serial of its own.
    #[allow(
        clippy::too_many_arguments,
        reason = "the zone's parts, assembled by the tracker only"
    )]
    pub(super) fn from_parts(
        domain: Name,
        svc: Name,
        ttl: u32,
        records: imbl::HashMap<String, Vec<RData>>,
        empty: imbl::HashMap<String, usize>,
        kube_dns: Vec<SocketAddr>,
        kube_dns_frontends: Vec<(IpAddr, u16, u8)>,
    ) -> Self {
        Self {
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            domain,
            svc,
            ttl,
            records,
            empty,
            kube_dns,
            kube_dns_frontends,
        }
    }

    /// Whether two zones answer alike (serials aside).
    #[must_use]
    pub fn same_content(&self, other: &Self) -> bool {
        self.domain == other.domain
            && self.ttl == other.ttl
            && self.records == other.records
            && self.empty == other.empty
            && self.kube_dns == other.kube_dns
            && self.kube_dns_frontends == other.kube_dns_frontends
    }

    /// The TTL of the records the agent answers itself.
    #[must_use]
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// The ready endpoints of `kube-system/kube-dns` on its TCP DNS port.
    #[must_use]
    pub fn kube_dns(&self) -> &[SocketAddr] {
        &self.kube_dns
    }

    /// kube-dns's ClusterIP frontends on port 53: (address, port, IANA protocol).
    #[must_use]
    pub fn kube_dns_frontends(&self) -> &[(IpAddr, u16, u8)] {
        &self.kube_dns_frontends
    }

    /// Whether `name` is in the cluster domain.
    #[must_use]
    pub fn in_domain(&self, name: &Name) -> bool {
        self.domain.zone_of(name)
    }

    /// What the zone says about `name`/`rtype`.
    #[must_use]
    pub fn lookup(&self, name: &Name, rtype: RecordType) -> Lookup {
        let owner = key(name);
        if let Some(records) = self.records.get(&owner) {
            let matching: Vec<RData> = records
                .iter()
                .filter(|r| {
                    rtype == RecordType::ANY
                        || r.record_type() == rtype
                        || r.record_type() == RecordType::CNAME
                })
                .cloned()
                .collect();
            return if matching.is_empty() {
                Lookup::NoData
            } else {
                Lookup::Answer(matching)
            };
        }
        if self.empty.contains_key(&owner) || owner == key(&self.svc) {
            return Lookup::NoData;
        }
        if self.svc.zone_of(name) {
            return Lookup::NxDomain;
        }
        // Reverse names the zone does not hold may be pods': the cluster DNS knows.
        let reverse = owner.ends_with(".in-addr.arpa.") || owner.ends_with(".ip6.arpa.");
        if self.domain.zone_of(name) || reverse {
            Lookup::Cluster
        } else {
            Lookup::External
        }
    }

    /// The zone's SOA record, for the authority section of negative answers.
    #[must_use]
    pub fn soa(&self) -> Record {
        let mname = Name::from_ascii("ns.dns")
            .ok()
            .and_then(|n| n.append_domain(&self.domain).ok())
            .unwrap_or_else(|| self.domain.clone());
        let rname = Name::from_ascii("hostmaster")
            .ok()
            .and_then(|n| n.append_domain(&self.domain).ok())
            .unwrap_or_else(|| self.domain.clone());
        let ttl = self.ttl;
        let soa = SOA::new(mname, rname, 1, 7200, 1800, 86400, ttl);
        Record::from_rdata(self.domain.clone(), ttl, RData::SOA(soa))
    }
}

/// The ready endpoints of `kube-system/kube-dns` on its TCP DNS port.
pub(super) fn kube_dns_of(snapshot: &Snapshot) -> Vec<SocketAddr> {
    let key = (KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned());
    if !snapshot.services().contains_key(&key) {
        return Vec::new();
    }
    let own = snapshot.slices_of(KUBE_DNS.0, KUBE_DNS.1);
    let (ready, ports) = endpoints(&own, false);
    let port = ports
        .iter()
        .find(|(_, protocol, _)| protocol == "TCP")
        .map_or(53, |p| p.2);
    ready.iter().map(|e| SocketAddr::new(e.ip, port)).collect()
}

/// kube-dns's ClusterIPs with each port 53 and its protocol number.
pub(super) fn kube_dns_frontends_of(snapshot: &Snapshot) -> Vec<(IpAddr, u16, u8)> {
    let key = (KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned());
    snapshot
        .services()
        .get(&key)
        .filter(|s| s.has_spec)
        .map(|service| {
            let ips: BTreeSet<IpAddr> = service.cluster_ips.iter().copied().collect();
            let ports: Vec<(u16, u8)> = service
                .ports
                .iter()
                .filter(|p| p.port == 53)
                .map(|p| match p.protocol {
                    Protocol::Udp => (53, 17),
                    _ => (53, 6),
                })
                .collect();
            ips.iter()
                .flat_map(|&ip| ports.iter().map(move |&(port, proto)| (ip, port, proto)))
                .collect()
        })
        .unwrap_or_default()
}
