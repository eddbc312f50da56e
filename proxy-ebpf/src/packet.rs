//! Per-packet load balancing on the node's external interfaces: a packet from outside
//! to a NodePort, external or load-balancer IP (or a routed ClusterIP) is sent to a
//! backend chosen once per flow and remembered in `LB4_CT`; the backend's replies get
//! the frontend back as their source on the way out. Masquerade and reject are left to
//! the node's netfilter through packet marks (as Cilium does without BPF masquerade).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use proxy_common::{
    Backend4, Ct4Key, Ct4Value, MonitorEvent, Service4Key, ServiceValue, SourceRange4,
    CT_FLAG_CLOSING, CT_FLAG_MASQ, CT_FORWARD, CT_REPLY, HOOK_TC_INGRESS, MARK_MASQ, MARK_REJECT,
    PROTO_TCP, PROTO_UDP, REASON_BACKEND_GONE, REASON_BACKEND_MISSING, REASON_NO_ENDPOINTS,
    REASON_NO_LOCAL_ENDPOINTS, REASON_RESELECTED, REASON_SOURCE_RANGE, SCOPE_EXTERNAL,
    SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DROP_EMPTY, SERVICE_FLAG_EXTERNAL_MASQ,
    SERVICE_FLAG_EXTERNAL_SCOPE, SERVICE_FLAG_MASQ, SERVICE_FLAG_SOURCE_RANGES, VERDICT_DROP,
    VERDICT_NAT, VERDICT_REJECT,
};

use crate::{
    affinity, lb,
    maps::{CLUSTER_CIDR4, LB4_BACKENDS, LB4_CT, LB4_SOURCE_RANGES},
    observe,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// `bpf_l4_csum_replace` flags: the change is in the pseudo header; a zero UDP
/// checksum (none) stays zero.
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const TCP_FIN_OR_RST: u8 = 0x01 | 0x04;
/// Marks `affinity::select4` clients that are addresses, not network namespaces.
const ADDRESS_CLIENT: u64 = 1 << 63;

/// The fields of an IPv4 TCP or UDP packet the programs read.
struct Packet {
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    tcp_flags: u8,
    l4: usize,
}

impl Packet {
    fn parse(ctx: &TcContext) -> Option<Self> {
        let ethertype: u16 = ctx.load(12).ok()?;
        if u16::from_be(ethertype) != ETH_P_IP {
            return None;
        }
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        // Fragments carry no ports past the first: they pass untouched.
        let fragment: u16 = ctx.load(ETH_HLEN + 6).ok()?;
        if u16::from_be(fragment) & 0x3fff != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let l4 = ETH_HLEN + ihl;
        Some(Self {
            src_be: ctx.load(IP_SRC).ok()?,
            dst_be: ctx.load(IP_DST).ok()?,
            sport_be: ctx.load(l4).ok()?,
            dport_be: ctx.load(l4 + 2).ok()?,
            proto,
            tcp_flags: if proto == PROTO_TCP {
                ctx.load(l4 + 13).ok()?
            } else {
                0
            },
            l4,
        })
    }

    /// The flow's hash for Maglev: the same on every node.
    fn hash(&self) -> u32 {
        let ports = (u32::from(self.sport_be) << 16) | u32::from(self.dport_be);
        let mut h = mix(0x9e37_79b9 ^ self.src_be);
        h = mix(h ^ self.dst_be);
        h = mix(h ^ ports);
        mix(h ^ u32::from(self.proto))
    }

    fn key(&self, direction: u8) -> Ct4Key {
        Ct4Key {
            src_be: self.src_be,
            dst_be: self.dst_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            direction,
            pad: [0; 2],
        }
    }

    /// Rewrites the destination (`dst`) or source address and port, checksums included.
    fn rewrite(&self, ctx: &TcContext, dst: bool, address_be: u32, port_be: u16) -> Option<()> {
        let (old_address, address_at, old_port, port_at) = if dst {
            (self.dst_be, IP_DST, self.dport_be, self.l4 + 2)
        } else {
            (self.src_be, IP_SRC, self.sport_be, self.l4)
        };
        let (csum_at, mangled) = if self.proto == PROTO_TCP {
            (self.l4 + 16, 0)
        } else {
            (self.l4 + 6, BPF_F_MARK_MANGLED_0)
        };
        ctx.l4_csum_replace(
            csum_at,
            u64::from(old_address),
            u64::from(address_be),
            BPF_F_PSEUDO_HDR | mangled | 4,
        )
        .ok()?;
        ctx.l4_csum_replace(
            csum_at,
            u64::from(old_port),
            u64::from(port_be),
            mangled | 2,
        )
        .ok()?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old_address), u64::from(address_be), 4)
            .ok()?;
        ctx.store(address_at, &address_be, 0).ok()?;
        ctx.store(port_at, &port_be, 0).ok()?;
        Some(())
    }
}

/// Murmur3's finalizer: every input bit reaches every output bit.
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn now() -> u64 {
    // SAFETY: helper call with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Ingress: existing flows go to their backend (a UDP flow whose backend left moves to
/// a live one; a TCP flow's gets a reset), new ones are load-balanced.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(packet) = Packet::parse(ctx) else {
        return TC_ACT_OK;
    };
    let key = packet.key(CT_FORWARD);
    let mut reselected = false;
    if let Some(flow) = LB4_CT.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; racing packets of one flow write the same.
        let current = unsafe { *flow };
        // SAFETY: copied out at once.
        let live = unsafe { LB4_BACKENDS.get(current.backend_id) }
            .is_some_and(|b| b.address_be == current.nat_be && b.port_be == current.nat_port_be);
        if live {
            // SAFETY: as above.
            unsafe {
                (*flow).last_seen_ns = now();
                if packet.tcp_flags & TCP_FIN_OR_RST != 0 {
                    (*flow).flags |= CT_FLAG_CLOSING;
                }
            }
            return translate(
                ctx,
                &packet,
                current.nat_be,
                current.nat_port_be,
                current.flags,
            );
        }
        let _ = LB4_CT.remove(key);
        let _ = LB4_CT.remove(Ct4Key {
            src_be: current.nat_be,
            dst_be: packet.src_be,
            sport_be: current.nat_port_be,
            dport_be: packet.sport_be,
            proto: packet.proto,
            direction: CT_REPLY,
            pad: [0; 2],
        });
        if packet.proto == PROTO_TCP {
            return reject(ctx, &packet, current.rev_nat_index, REASON_BACKEND_GONE);
        }
        reselected = true;
    }
    let frontend = lb::frontend_key(packet.dst_be, packet.dport_be, packet.proto, 0);
    let Some(svc) = lb::lookup(&frontend) else {
        return TC_ACT_OK;
    };
    if svc.flags & SERVICE_FLAG_SOURCE_RANGES != 0 && !source_allowed(&svc, packet.src_be) {
        return drop_packet(&packet, svc.rev_nat_index, REASON_SOURCE_RANGE);
    }
    let external = !in_cluster(packet.src_be);
    let (frontend, route, masquerade) = if external && svc.flags & SERVICE_FLAG_EXTERNAL_SCOPE != 0
    {
        let scoped = Service4Key {
            scope: SCOPE_EXTERNAL,
            ..frontend
        };
        let Some(route) = lb::lookup(&scoped) else {
            return TC_ACT_OK;
        };
        (scoped, route, route.flags & SERVICE_FLAG_MASQ != 0)
    } else if external {
        (frontend, svc, svc.flags & SERVICE_FLAG_EXTERNAL_MASQ != 0)
    } else {
        (frontend, svc, svc.flags & SERVICE_FLAG_MASQ != 0)
    };
    let chosen = if route.flags & SERVICE_FLAG_AFFINITY != 0 {
        let client = ADDRESS_CLIENT | u64::from(packet.src_be);
        affinity::select4(client, &frontend, &route)
    } else if route.maglev_table != 0 && route.count != 0 {
        lb::maglev_backend(route.maglev_table, packet.hash()).map(|(id, backend)| (id, backend, 0))
    } else {
        lb::select_backend(&frontend, &route).map(|(id, backend, _)| (id, backend, 0))
    };
    let Some((backend_id, backend, reason)) = chosen else {
        if route.count != 0 {
            return reject(ctx, &packet, svc.rev_nat_index, REASON_BACKEND_MISSING);
        }
        if route.flags & SERVICE_FLAG_DROP_EMPTY != 0 {
            return drop_packet(&packet, svc.rev_nat_index, REASON_NO_LOCAL_ENDPOINTS);
        }
        return reject(ctx, &packet, svc.rev_nat_index, REASON_NO_ENDPOINTS);
    };
    let reason = if reselected {
        REASON_RESELECTED
    } else {
        reason
    };
    let flags = if masquerade { CT_FLAG_MASQ } else { 0 };
    remember(&packet, &route, backend_id, &backend, flags);
    observe::count(
        route.rev_nat_index,
        HOOK_TC_INGRESS,
        VERDICT_NAT,
        backend_id,
    );
    if observe::monitoring(route.rev_nat_index) {
        let mut event = event(&packet, route.rev_nat_index, VERDICT_NAT, reason);
        event.backend_id = backend_id;
        event.backend_be = backend.address_be;
        event.backend_port_be = backend.port_be;
        observe::emit_packet(event);
    }
    translate(ctx, &packet, backend.address_be, backend.port_be, flags)
}

/// Egress: a backend's reply to a translated flow leaves from the frontend.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(packet) = Packet::parse(ctx) else {
        return TC_ACT_OK;
    };
    let Some(flow) = LB4_CT.get_ptr_mut(packet.key(CT_REPLY)) else {
        return TC_ACT_OK;
    };
    // SAFETY: a valid map value pointer.
    let frontend = unsafe {
        (*flow).last_seen_ns = now();
        *flow
    };
    let _ = packet.rewrite(ctx, false, frontend.nat_be, frontend.nat_port_be);
    TC_ACT_OK
}

/// The flow's two entries: the client's packets to the backend, the replies back.
fn remember(packet: &Packet, route: &ServiceValue, backend_id: u32, backend: &Backend4, flags: u8) {
    let seen = now();
    let forward = Ct4Value {
        last_seen_ns: seen,
        nat_be: backend.address_be,
        nat_port_be: backend.port_be,
        rev_nat_index: route.rev_nat_index,
        backend_id,
        flags,
        pad: [0; 3],
    };
    let reply_key = Ct4Key {
        src_be: backend.address_be,
        dst_be: packet.src_be,
        sport_be: backend.port_be,
        dport_be: packet.sport_be,
        proto: packet.proto,
        direction: CT_REPLY,
        pad: [0; 2],
    };
    let reply = Ct4Value {
        nat_be: packet.dst_be,
        nat_port_be: packet.dport_be,
        ..forward
    };
    // LRU maps evict rather than fail; a lost entry only means the next packet
    // chooses again.
    let _ = LB4_CT.insert(reply_key, reply, 0);
    let _ = LB4_CT.insert(packet.key(CT_FORWARD), forward, 0);
}

fn translate(ctx: &TcContext, packet: &Packet, address_be: u32, port_be: u16, flags: u8) -> i32 {
    if packet.rewrite(ctx, true, address_be, port_be).is_none() {
        return TC_ACT_SHOT;
    }
    if flags & CT_FLAG_MASQ != 0 {
        ctx.set_mark(MARK_MASQ);
    }
    TC_ACT_OK
}

/// Hands the packet to netfilter marked for rejection (TCP reset, ICMP unreachable).
fn reject(ctx: &TcContext, packet: &Packet, rev_nat_index: u16, reason: u8) -> i32 {
    refuse(packet, rev_nat_index, VERDICT_REJECT, reason);
    ctx.set_mark(MARK_REJECT);
    TC_ACT_OK
}

fn drop_packet(packet: &Packet, rev_nat_index: u16, reason: u8) -> i32 {
    refuse(packet, rev_nat_index, VERDICT_DROP, reason);
    TC_ACT_SHOT
}

/// Counts a reject or drop (the reason in the backend field) and streams it.
fn refuse(packet: &Packet, rev_nat_index: u16, verdict: u8, reason: u8) {
    observe::count(rev_nat_index, HOOK_TC_INGRESS, verdict, u32::from(reason));
    if observe::monitoring(rev_nat_index) {
        observe::emit_packet(event(packet, rev_nat_index, verdict, reason));
    }
}

fn event(packet: &Packet, rev_nat_index: u16, verdict: u8, reason: u8) -> MonitorEvent {
    MonitorEvent {
        frontend_be: packet.dst_be,
        frontend_port_be: packet.dport_be,
        rev_nat_index,
        hook: HOOK_TC_INGRESS,
        verdict,
        reason,
        proto: packet.proto,
        ..MonitorEvent::default()
    }
}

/// Whether the source is a pod (inside `--cluster-cidr`).
fn in_cluster(src_be: u32) -> bool {
    CLUSTER_CIDR4.get(Key::new(32, src_be)).is_some()
}

fn source_allowed(svc: &ServiceValue, src_be: u32) -> bool {
    let data = SourceRange4 {
        rev_nat_index_be: svc.rev_nat_index.to_be(),
        pad: 0,
        address_be: src_be,
    };
    LB4_SOURCE_RANGES.get(Key::new(64, data)).is_some()
}
