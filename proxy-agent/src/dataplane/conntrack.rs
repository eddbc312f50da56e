//! UDP conntrack hygiene over ctnetlink, as kube-proxy's conntrack cleaner: a UDP flow
//! keeps its NAT binding until it idles out, so after an endpoint change every UDP entry
//! to a Service whose DNAT target is no longer one of its endpoints is deleted, and the
//! client's next packet is balanced afresh.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Tuple as CtTuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::{
    model::{DesiredState, Frontend, FrontendKey, FrontendKind, Protocol},
    netlink::{Netlink, NetlinkError, NLM_F_ACK},
};

pub type ConntrackError = NetlinkError;

/// `CTA_ZONE`, which the crate carries as a raw attribute.
const CTA_ZONE: u16 = 18;
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
    zone: Option<DefaultNla>,
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
        Netlink::open(NETLINK_NETFILTER).map(Self)
    }

    /// Every entry of both families.
    ///
    /// # Errors
    /// On socket errors or messages that cannot be read.
    pub fn dump(&mut self) -> Result<Vec<Entry>, ConntrackError> {
        let mut entries = Vec::new();
        for family in [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6] {
            let request = message(family, ConntrackMessage::Get(Vec::new()));
            entries.extend(self.0.dump_map(&request, |reply| entry_of(&reply))?);
        }
        Ok(entries)
    }

    /// Deletes one entry; one already gone is not an error.
    ///
    /// # Errors
    /// On socket errors or a refusal other than "no such entry".
    pub fn delete(&mut self, entry: &Entry) -> Result<(), ConntrackError> {
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(tuple_attributes(
            &entry.orig,
        ))];
        attributes.extend(entry.zone.clone().map(ConntrackAttribute::Other));
        let family = if entry.orig.src.is_ipv6() {
            NetfilterProtoFamily::IPv6
        } else {
            NetfilterProtoFamily::IPv4
        };
        let request = message(family, ConntrackMessage::Delete(attributes));
        match self.0.request(&request, NLM_F_ACK) {
            Err(error) if error.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

fn message(family: NetfilterProtoFamily, inner: ConntrackMessage) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), inner)
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

fn tuple_attributes(t: &Tuple) -> Vec<CtTuple> {
    vec![
        CtTuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        CtTuple::Proto(vec![
            ProtoTuple::Protocol(t.proto.into()),
            ProtoTuple::SourcePort(t.sport),
            ProtoTuple::DestinationPort(t.dport),
        ]),
    ]
}

fn tuple_of(parts: &[CtTuple]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// One conntrack entry from a dump's message; `None` for another message or when an
/// attribute it needs is missing.
#[must_use]
pub fn entry_of(message: &NetfilterMessage) -> Option<Entry> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) = &message.inner else {
        return None;
    };
    let (mut orig, mut reply, mut timeout, mut tcp_state, mut zone) =
        (None, None, None, None, None);
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(parts) => orig = tuple_of(parts),
            ConntrackAttribute::CtaTupleReply(parts) => reply = tuple_of(parts),
            ConntrackAttribute::CtaTimeout(t) => timeout = Some(*t),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                tcp_state = infos.iter().find_map(|info| match info {
                    ProtoInfo::TCP(tcp) => tcp.iter().find_map(|field| match field {
                        ProtoInfoTCP::State(state) => Some(tcp_state_name(*state)),
                        _ => None,
                    }),
                    _ => None,
                });
            }
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE => zone = Some(nla.clone()),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        timeout,
        tcp_state,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_netfilter::{
        conntrack::{ConntrackAttribute, ConntrackMessage},
        NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    };

    use super::{entry_of, tuple_attributes, Entry, Tuple, UdpServices, IPPROTO_UDP};

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
    fn entries_survive_encoding() {
        for (src, dst) in [("10.244.1.10", "10.96.0.10"), ("fd00::1:2", "fd00::10")] {
            let t = Tuple {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: IPPROTO_UDP,
                sport: 40000,
                dport: 53,
            };
            let sent = NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(vec![
                    ConntrackAttribute::CtaTupleOrig(tuple_attributes(&t)),
                    ConntrackAttribute::CtaTupleReply(tuple_attributes(&t)),
                    ConntrackAttribute::CtaTimeout(30),
                ]),
            );
            let mut raw = vec![0; sent.buffer_len()];
            sent.emit(&mut raw);
            // IPCTNL_MSG_CT_NEW of the conntrack subsystem.
            let read = NetfilterMessage::parse_with_param(&raw, 1 << 8).unwrap();
            let entry = entry_of(&read).unwrap();
            assert_eq!((entry.orig, entry.reply, entry.timeout), (t, t, Some(30)));
        }
    }
}
