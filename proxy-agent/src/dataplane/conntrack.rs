//! UDP conntrack hygiene over ctnetlink, as kube-proxy's conntrack cleaner: a UDP flow
//! keeps its NAT binding until it idles out, so after an endpoint change every UDP entry
//! to a Service whose DNAT target is no longer one of its endpoints is deleted, and the
//! client's next packet is balanced afresh.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::{
    model::{DesiredState, Frontend, FrontendKey, FrontendKind, Protocol},
    netlink::{
        attr, attrs, Netlink, NetlinkError, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    },
};

pub type ConntrackError = NetlinkError;

const CT_GET: u16 = 1 << 8 | 1;
const CT_DELETE: u16 = 1 << 8 | 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

/// One direction of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// One conntrack entry: the tuple as the client sent it and the one replies come on
/// (whose source is the DNAT target).
#[derive(Debug, Clone)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
    /// Seconds until the entry expires.
    pub timeout: Option<u32>,
    /// TCP entries: the tracked state (`ESTABLISHED`, `TIME_WAIT`, ...).
    pub tcp_state: Option<&'static str>,
    /// The raw `CTA_ZONE` attribute, echoed back when deleting.
    zone: Option<Vec<u8>>,
}

impl Entry {
    /// Whether destination NAT rewrote it: replies come from another address or port
    /// than the client sent to.
    #[must_use]
    pub fn translated(&self) -> bool {
        self.reply.src != self.orig.dst || self.reply.sport != self.orig.dport
    }
}

/// The kernel's `enum tcp_conntrack` names.
fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "NONE",
    }
}

/// What UDP traffic a desired state expects: for each Service address and port, the
/// endpoints an entry may be translated to; for each NodePort, the same.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UdpServices {
    by_address: BTreeMap<(IpAddr, u16), BTreeSet<IpAddr>>,
    by_node_port: BTreeMap<u16, BTreeSet<IpAddr>>,
    node_port_ips: BTreeSet<IpAddr>,
}

impl UdpServices {
    /// Every UDP frontend of a desired state.
    #[must_use]
    pub fn of(desired: &DesiredState) -> Self {
        Self::of_frontends(desired.frontends.iter().map(|(k, f)| (k, f.as_ref())))
    }

    /// The UDP frontends that differ from `old` to `new`, as `new` has them (a removed
    /// one is not looked at, as before): the only ones whose entries can have gone stale.
    #[must_use]
    pub fn changed(old: &DesiredState, new: &DesiredState) -> Self {
        let changed = old
            .frontends
            .diff(&new.frontends)
            .filter_map(|item| match item {
                imbl::ordmap::DiffItem::Add(k, f) => Some((k, f.as_ref())),
                imbl::ordmap::DiffItem::Update { new, .. } => Some((new.0, new.1.as_ref())),
                imbl::ordmap::DiffItem::Remove(..) => None,
            });
        Self::of_frontends(changed)
    }

    /// Whether nothing UDP changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty() && self.by_node_port.is_empty()
    }

    fn of_frontends<'a>(frontends: impl Iterator<Item = (&'a FrontendKey, &'a Frontend)>) -> Self {
        let mut udp = Self::default();
        for (key, frontend) in frontends {
            if key.protocol != Protocol::Udp {
                continue;
            }
            let endpoints = frontend
                .routes()
                .iter()
                .flat_map(|r| r.backends.iter().map(|b| b.ip))
                .collect::<BTreeSet<_>>();
            let slot = if frontend.kind == FrontendKind::NodePort {
                udp.node_port_ips.insert(key.ip);
                udp.by_node_port.entry(key.port).or_default()
            } else {
                udp.by_address.entry((key.ip, key.port)).or_default()
            };
            slot.extend(endpoints);
        }
        udp
    }

    /// Whether `entry` is a UDP flow to a Service that its translation no longer
    /// matches: DNAT'ed to a removed endpoint, or never translated (it was refused while
    /// the Service had no endpoints) although it has some now.
    #[must_use]
    pub fn is_stale(&self, entry: &Entry) -> bool {
        if entry.orig.proto != IPPROTO_UDP {
            return false;
        }
        let untranslated =
            entry.reply.src == entry.orig.dst && entry.reply.sport == entry.orig.dport;
        let allowed = self
            .by_address
            .get(&(entry.orig.dst, entry.orig.dport))
            .or_else(|| {
                self.node_port_ips
                    .contains(&entry.orig.dst)
                    .then(|| self.by_node_port.get(&entry.orig.dport))
                    .flatten()
            });
        match allowed {
            Some(endpoints) if untranslated => !endpoints.is_empty(),
            Some(endpoints) => !endpoints.contains(&entry.reply.src),
            None => false,
        }
    }
}

/// A ctnetlink socket in the current network namespace.
pub struct Conntrack(Netlink);

impl Conntrack {
    /// Opens the socket.
    ///
    /// # Errors
    /// When netlink is unavailable.
    pub fn open() -> Result<Self, ConntrackError> {
        Netlink::open(NETLINK_NETFILTER, 0).map(Self)
    }

    /// Every entry of both families.
    ///
    /// # Errors
    /// On socket errors or messages that cannot be read.
    pub fn dump(&mut self) -> Result<Vec<Entry>, ConntrackError> {
        let mut entries = Vec::new();
        for family in [libc_af(false), libc_af(true)] {
            self.0
                .send(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, &nfgen(family), &[])?;
            self.0.receive(|_, body| {
                // Past the nfgenmsg header: the entry's attributes.
                if let Some(entry) = body.get(4..).and_then(parse_entry) {
                    entries.push(entry);
                }
            })?;
        }
        Ok(entries)
    }

    /// Deletes one entry; one already gone is not an error.
    ///
    /// # Errors
    /// On socket errors or a refusal other than "no such entry".
    pub fn delete(&mut self, entry: &Entry) -> Result<(), ConntrackError> {
        let mut attrs = tuple_attr(CTA_TUPLE_ORIG, &entry.orig);
        if let Some(zone) = &entry.zone {
            attrs.extend(attr(CTA_ZONE, zone));
        }
        let family = libc_af(entry.orig.src.is_ipv6());
        self.0
            .send(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, &nfgen(family), &attrs)?;
        match self.0.receive(|_, _| {}) {
            Err(NetlinkError::Kernel(-2)) => Ok(()),
            other => other,
        }
    }
}

/// The netfilter message header: family, version 0, resource id 0.
fn nfgen(family: u8) -> [u8; 4] {
    [family, 0, 0, 0]
}

/// Deletes the stale UDP entries for `udp`; returns how many went.
///
/// # Errors
/// When ctnetlink cannot be used.
pub fn clean_udp(udp: &UdpServices) -> Result<usize, ConntrackError> {
    let mut conntrack = Conntrack::open()?;
    let stale: Vec<Entry> = conntrack
        .dump()?
        .into_iter()
        .filter(|e| udp.is_stale(e))
        .collect();
    for entry in &stale {
        conntrack.delete(entry)?;
    }
    Ok(stale.len())
}

fn libc_af(v6: bool) -> u8 {
    if v6 {
        10
    } else {
        2
    }
}

fn tuple_attr(kind: u16, t: &Tuple) -> Vec<u8> {
    let ip = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [attr(1, &s.octets()), attr(2, &d.octets())].concat(),
        (s, d) => [attr(3, &v6(s).octets()), attr(4, &v6(d).octets())].concat(),
    };
    let proto = [
        attr(CTA_PROTO_NUM, &[t.proto]),
        attr(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
        attr(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
    ]
    .concat();
    let inner = [
        attr(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
        attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
    ]
    .concat();
    attr(kind | NLA_F_NESTED, &inner)
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
    }
}

fn parse_tuple(data: &[u8]) -> Option<Tuple> {
    let top = attrs(data);
    let ip = attrs(top.get(&CTA_TUPLE_IP)?);
    let proto = attrs(top.get(&CTA_TUPLE_PROTO)?);
    let addr = |kind: u16| -> Option<IpAddr> {
        let raw = ip.get(&kind)?;
        match raw.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(*raw).ok()?))),
            16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(*raw).ok()?))),
            _ => None,
        }
    };
    let port = |kind: u16| {
        proto
            .get(&kind)
            .and_then(|p| p.get(0..2))
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    let (src, dst) = match (addr(1), addr(2)) {
        (Some(s), Some(d)) => (s, d),
        _ => (addr(3)?, addr(4)?),
    };
    Some(Tuple {
        src,
        dst,
        proto: *proto.get(&CTA_PROTO_NUM)?.first()?,
        sport: port(CTA_PROTO_SRC_PORT),
        dport: port(CTA_PROTO_DST_PORT),
    })
}

/// One conntrack entry from a dump message's payload (after `nfgenmsg`); `None` when
/// an attribute it needs is missing or malformed.
#[must_use]
pub fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let top = attrs(payload);
    Some(Entry {
        orig: parse_tuple(top.get(&CTA_TUPLE_ORIG)?)?,
        reply: parse_tuple(top.get(&CTA_TUPLE_REPLY)?)?,
        timeout: top
            .get(&CTA_TIMEOUT)
            .and_then(|t| Some(u32::from_be_bytes(t.get(0..4)?.try_into().ok()?))),
        tcp_state: top.get(&CTA_PROTOINFO).and_then(|info| {
            let tcp = attrs(attrs(info).get(&CTA_PROTOINFO_TCP)?)
                .get(&CTA_PROTOINFO_TCP_STATE)?
                .first()
                .copied()?;
            Some(tcp_state_name(tcp))
        }),
        zone: top.get(&CTA_ZONE).map(|z| z.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_tuple, tuple_attr, Entry, Tuple, UdpServices, IPPROTO_UDP};
    use crate::netlink::attrs;

    fn entry(dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> Entry {
        let t = |src: &str, dst: &str, sport, dport| Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: IPPROTO_UDP,
            sport,
            dport,
        };
        Entry {
            orig: t("10.244.1.10", dst, 40000, dport),
            reply: t(reply_src, "10.244.1.10", reply_sport, 40000),
            timeout: None,
            tcp_state: None,
            zone: None,
        }
    }

    #[test]
    fn stale_means_translated_to_a_removed_endpoint_or_refused_before_endpoints() {
        let mut udp = UdpServices::default();
        udp.by_address
            .entry(("10.96.0.10".parse().unwrap(), 53))
            .or_default()
            .insert("10.244.2.2".parse().unwrap());
        udp.by_address
            .entry(("10.96.0.11".parse().unwrap(), 53))
            .or_default();
        assert!(!udp.is_stale(&entry("10.96.0.10", 53, "10.244.2.2", 5353)));
        assert!(udp.is_stale(&entry("10.96.0.10", 53, "10.244.1.2", 5353)));
        assert!(udp.is_stale(&entry("10.96.0.10", 53, "10.96.0.10", 53)));
        assert!(!udp.is_stale(&entry("10.96.0.11", 53, "10.96.0.11", 53)));
        assert!(!udp.is_stale(&entry("192.0.2.1", 53, "192.0.2.1", 53)));
    }

    #[test]
    fn tuples_survive_encoding() {
        for (src, dst) in [("10.244.1.10", "10.96.0.10"), ("fd00::1:2", "fd00::10")] {
            let t = Tuple {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: IPPROTO_UDP,
                sport: 40000,
                dport: 53,
            };
            let encoded = tuple_attr(1, &t);
            let outer = attrs(&encoded);
            assert_eq!(parse_tuple(outer[&1]), Some(t));
        }
    }
}
