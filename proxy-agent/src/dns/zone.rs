//! The cluster zone the agent answers itself, built from the model's snapshot per the
//! Kubernetes DNS-Based Service Discovery specification 1.1.0; pure, no I/O.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use hickory_proto::rr::{
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
    Name, RData, Record, RecordType,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{Snapshot, LABEL_SERVICE_NAME};

/// The schema version `dns-version.<domain>` reports.
const SCHEMA_VERSION: &str = "1.1.0";
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
    records: HashMap<String, Vec<RData>>,
    /// Ancestors of names with records, below `svc.<domain>`: they exist (NODATA).
    empty: BTreeSet<String>,
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

fn key(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if !text.ends_with('.') {
        text.push('.');
    }
    text
}

fn name(text: &str) -> Option<Name> {
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
fn endpoints(
    slices: &[&EndpointSlice],
    all: bool,
) -> (Vec<DnsEndpoint>, BTreeSet<(String, String, u16)>) {
    let mut found = Vec::new();
    let mut ports = BTreeSet::new();
    for slice in slices {
        for port in slice.ports.iter().flatten() {
            if let (Some(name), Some(number)) = (&port.name, port.port) {
                let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
                if let Ok(number) = u16::try_from(number) {
                    ports.insert((name.clone(), protocol, number));
                }
            }
        }
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !(ready || all) {
                continue;
            }
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                if !found.iter().any(|e: &DnsEndpoint| e.ip == ip) {
                    found.push(DnsEndpoint {
                        ip,
                        hostname: endpoint.hostname.clone(),
                    });
                }
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

struct Builder {
    svc: String,
    records: HashMap<String, Vec<RData>>,
}

impl Builder {
    fn add(&mut self, owner: &str, data: RData) {
        let list = self.records.entry(owner.to_ascii_lowercase()).or_default();
        if !list.contains(&data) {
            list.push(data);
        }
    }

    fn service(&mut self, service: &Service, slices: &[&EndpointSlice]) -> Option<()> {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let svc_name = service.metadata.name.as_deref()?;
        let spec = service.spec.as_ref()?;
        let owner = format!("{svc_name}.{namespace}.{}", self.svc);
        let target = name(&owner)?;
        if spec.type_.as_deref() == Some("ExternalName") {
            let external = name(spec.external_name.as_deref()?)?;
            self.add(&owner, RData::CNAME(CNAME(external)));
            return Some(());
        }
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let headless = spec.cluster_ip.as_deref() == Some("None");
        if !headless {
            for &ip in &cluster_ips {
                self.add(&owner, address(ip));
                self.add(&reverse_name(ip), RData::PTR(PTR(target.clone())));
            }
            for port in spec.ports.iter().flatten() {
                let (Some(port_name), Ok(number)) = (&port.name, u16::try_from(port.port)) else {
                    continue;
                };
                let protocol = port
                    .protocol
                    .as_deref()
                    .unwrap_or("TCP")
                    .to_ascii_lowercase();
                let srv = SRV::new(0, 100, number, target.clone());
                self.add(
                    &format!("_{port_name}._{protocol}.{owner}"),
                    RData::SRV(srv),
                );
            }
            return Some(());
        }
        let all = spec.publish_not_ready_addresses == Some(true);
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
        let domain = name(domain).unwrap_or_else(|| name("cluster.local").expect("valid"));
        let svc = Name::from_ascii("svc")
            .expect("valid")
            .append_domain(&domain)
            .expect("short");
        let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in snapshot.endpoint_slices().values() {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME));
            if let Some(service) = service {
                let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                slices
                    .entry((namespace, service.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut builder = Builder {
            svc: key(&svc),
            records: HashMap::new(),
        };
        let none = Vec::new();
        for ((namespace, service_name), service) in snapshot.services() {
            let own = slices
                .get(&(namespace.clone(), service_name.clone()))
                .unwrap_or(&none);
            // A Service that cannot be named in DNS is skipped, not fatal.
            let _ = builder.service(service, own);
        }
        let version = format!("dns-version.{}", key(&domain));
        builder.add(&version, RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])));
        let svc_key = key(&svc);
        let mut empty = BTreeSet::new();
        for owner in builder.records.keys().filter(|k| k.ends_with(&svc_key)) {
            let mut rest = owner.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if parent.len() < svc_key.len() {
                    break;
                }
                empty.insert(parent.to_owned());
                rest = parent;
            }
        }
        let kube_dns = snapshot
            .services()
            .get(&(KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned()))
            .map(|_| {
                let own = slices
                    .get(&(KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned()))
                    .unwrap_or(&none);
                let (ready, ports) = endpoints(own, false);
                let port = ports
                    .iter()
                    .find(|(_, protocol, _)| protocol == "TCP")
                    .map_or(53, |p| p.2);
                ready.iter().map(|e| SocketAddr::new(e.ip, port)).collect()
            })
            .unwrap_or_default();
        let kube_dns_frontends = snapshot
            .services()
            .get(&(KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned()))
            .and_then(|s| s.spec.as_ref())
            .map(|spec| {
                let ips = spec
                    .cluster_ips
                    .iter()
                    .flatten()
                    .chain(spec.cluster_ip.iter());
                let ips: BTreeSet<IpAddr> = ips.filter_map(|ip| ip.parse().ok()).collect();
                let ports: Vec<(u16, u8)> = spec
                    .ports
                    .iter()
                    .flatten()
                    .filter(|p| p.port == 53)
                    .map(|p| match p.protocol.as_deref() {
                        Some("UDP") => (53, 17),
                        _ => (53, 6),
                    })
                    .collect();
                ips.iter()
                    .flat_map(|&ip| ports.iter().map(move |&(port, proto)| (ip, port, proto)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            domain,
            svc,
            ttl,
            records: builder.records,
            empty,
            kube_dns,
            kube_dns_frontends,
        }
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
        if self.empty.contains(&owner) || owner == key(&self.svc) {
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
