//! Per-packet load balancing on the node's external interfaces: a packet from outside
//! to a NodePort, external or load-balancer IP (or a routed ClusterIP) is sent to a
//! backend chosen once per flow and remembered in the family's flow map; the backend's
//! replies get the frontend back as their source on the way out. Masquerade and reject
//! are left to the node's netfilter through packet marks (as Cilium does without BPF
//! masquerade). Family differences live in `wire.rs`.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use proxy_common::{
    MonitorEvent, ServiceValue, CT_FLAG_MASQ, CT_FORWARD, CT_REPLY, HOOK_TC_INGRESS, MARK_MASQ,
    MARK_REJECT, PROTO_UDP, REASON_BACKEND_MISSING, REASON_NO_ENDPOINTS, REASON_NO_LOCAL_ENDPOINTS,
    REASON_RESELECTED, REASON_SOURCE_RANGE, SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY,
    SERVICE_FLAG_DROP_EMPTY, SERVICE_FLAG_EXTERNAL_MASQ, SERVICE_FLAG_EXTERNAL_SCOPE,
    SERVICE_FLAG_MASQ, SERVICE_FLAG_SOURCE_RANGES, VERDICT_DROP, VERDICT_NAT, VERDICT_REJECT,
};

use crate::{
    affinity,
    family::{V4, V6},
    l4::{CLOSING, OPENING},
    lb,
    maps::LOCAL_INTERFACES,
    observe,
    wire::{read, Flow, Packet, Wire, ETH_P_IP, ETH_P_IPV6},
};

/// Murmur3's finalizer: every input bit reaches every output bit.
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow's hash for Maglev: the same on every node.
fn hash<F: Wire>(packet: &Packet<F::Addr>) -> u32 {
    let ports = (u32::from(packet.sport_be) << 16) | u32::from(packet.dport_be);
    let mut h = mix(0x9e37_79b9 ^ F::fold(&packet.src));
    h = mix(h ^ F::fold(&packet.dst));
    h = mix(h ^ ports);
    mix(h ^ u32::from(packet.proto))
}

fn now() -> u64 {
    // SAFETY: helper call with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

fn ethertype(ctx: &TcContext) -> Option<u16> {
    read::<u16>(ctx, 12).map(u16::from_be)
}

/// Ingress of either family.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    match ethertype(ctx) {
        Some(ETH_P_IP) => ingress_in::<V4>(ctx),
        Some(ETH_P_IPV6) => ingress_in::<V6>(ctx),
        _ => TC_ACT_OK,
    }
}

/// Egress of either family.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    match ethertype(ctx) {
        Some(ETH_P_IP) => egress_in::<V4>(ctx),
        Some(ETH_P_IPV6) => egress_in::<V6>(ctx),
        _ => TC_ACT_OK,
    }
}

/// The key of a flow's reply entry: from the backend to the client.
fn reply_key<F: Wire>(packet: &Packet<F::Addr>, backend: (F::Addr, u16)) -> F::CtKey {
    F::ct_key(
        backend.0,
        packet.src,
        (backend.1, packet.sport_be),
        packet.proto,
        CT_REPLY,
    )
}

fn forward_key<F: Wire>(packet: &Packet<F::Addr>) -> F::CtKey {
    F::ct_key(
        packet.src,
        packet.dst,
        (packet.sport_be, packet.dport_be),
        packet.proto,
        CT_FORWARD,
    )
}

/// What the flow map says about a packet.
enum Known {
    /// The packet's verdict.
    Verdict(i32),
    /// A new flow; `true` if it replaces one whose backend left.
    New(bool),
}

/// Ingress: existing flows go to their backend (a UDP flow whose backend left moves to
/// a live one), new ones are load-balanced. The steps are
/// functions of their own, not inlined: each gets a stack frame of its own, and the
/// verifier allows 512 bytes along a call chain (IPv6 keys are large).
#[inline(never)]
fn ingress_in<F: Wire>(ctx: &TcContext) -> i32 {
    let Some(packet) = F::parse(ctx) else {
        return TC_ACT_OK;
    };
    match known::<F>(ctx, &packet) {
        Known::Verdict(verdict) => verdict,
        Known::New(reselected) => new_flow::<F>(ctx, &packet, reselected),
    }
}

/// An existing flow's packet goes to its backend. A TCP or SCTP flow keeps its backend
/// after it left the Service, as kube-proxy's conntrack keeps it: a terminating pod
/// drains its connections, and one that is gone answers for itself. A UDP flow moves
/// to a live backend, and so does a new connection reusing a finished flow's ports (a
/// busy client cycles through its ports faster than the sweep forgets flows).
#[inline(never)]
fn known<F: Wire>(ctx: &TcContext, packet: &Packet<F::Addr>) -> Known {
    let key = forward_key::<F>(packet);
    let Some(value) = F::ct_get(&key) else {
        return Known::New(false);
    };
    // SAFETY: a valid map value pointer, copied out at once.
    let flow = F::ct_read(unsafe { &*value });
    let live = F::backend(flow.backend_id).is_some_and(|b| {
        let (address, port_be) = F::backend_addr(&b);
        F::same(&address, &flow.nat) && port_be == flow.nat_port_be
    });
    let stays = packet.proto != PROTO_UDP && packet.flow & OPENING == 0;
    if live || stays {
        F::ct_touch(value, now(), packet.flow & CLOSING != 0);
        let to = (flow.nat, flow.nat_port_be);
        return Known::Verdict(translate::<F>(ctx, packet, &to, flow.flags));
    }
    F::ct_remove(&key);
    F::ct_remove(&reply_key::<F>(packet, (flow.nat, flow.nat_port_be)));
    Known::New(true)
}

/// Whether the packet arrived on an interface local pods' traffic comes from.
#[inline(always)]
fn from_local_interface(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the context pointer the kernel handed this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup; the value is not kept.
    unsafe { LOCAL_INTERFACES.get(ifindex) }.is_some()
}

/// A new flow to a frontend gets a backend, or the frontend's verdict.
#[inline(never)]
fn new_flow<F: Wire>(ctx: &TcContext, packet: &Packet<F::Addr>, reselected: bool) -> i32 {
    let frontend = F::key(packet.dst, packet.dport_be, packet.proto, 0);
    let Some(svc) = lb::lookup::<F>(&frontend) else {
        return TC_ACT_OK;
    };
    if svc.flags & SERVICE_FLAG_SOURCE_RANGES != 0
        && !F::source_allowed(svc.rev_nat_index, &packet.src)
    {
        return drop_packet::<F>(packet, svc.rev_nat_index, REASON_SOURCE_RANGE);
    }
    let external = !F::in_cluster(&packet.src) && !from_local_interface(ctx);
    // The scope, not its key: a second key in this frame would pass the 512 bytes.
    let (scope, route, masquerade) = if external && svc.flags & SERVICE_FLAG_EXTERNAL_SCOPE != 0 {
        let scoped = F::key(packet.dst, packet.dport_be, packet.proto, SCOPE_EXTERNAL);
        let Some(route) = lb::lookup::<F>(&scoped) else {
            return TC_ACT_OK;
        };
        (SCOPE_EXTERNAL, route, route.flags & SERVICE_FLAG_MASQ != 0)
    } else if external {
        (0, svc, svc.flags & SERVICE_FLAG_EXTERNAL_MASQ != 0)
    } else {
        (0, svc, svc.flags & SERVICE_FLAG_MASQ != 0)
    };
    let Some((backend_id, to, reason)) = choose::<F>(packet, scope, &route) else {
        // The agent rewrote the Service twice under this packet: a dropped SYN is sent
        // again, where a refused connection would fail.
        if route.count != 0 {
            return drop_packet::<F>(packet, svc.rev_nat_index, REASON_BACKEND_MISSING);
        }
        if route.flags & SERVICE_FLAG_DROP_EMPTY != 0 {
            return drop_packet::<F>(packet, svc.rev_nat_index, REASON_NO_LOCAL_ENDPOINTS);
        }
        return reject::<F>(ctx, packet, svc.rev_nat_index, REASON_NO_ENDPOINTS);
    };
    let reason = if reselected {
        REASON_RESELECTED
    } else {
        reason
    };
    let flags = if masquerade { CT_FLAG_MASQ } else { 0 };
    remember::<F>(packet, &route, backend_id, &to, flags);
    observe::count(
        route.rev_nat_index,
        HOOK_TC_INGRESS,
        VERDICT_NAT,
        backend_id,
    );
    if observe::monitoring(route.rev_nat_index) {
        report::<F>(packet, route.rev_nat_index, backend_id, &to, reason);
    }
    translate::<F>(ctx, packet, &to, flags)
}

/// The backend of a new flow through the frontend's `scope` (its id, address and port,
/// and the monitor's reason): the client's by affinity, the Maglev table's, or a
/// random one.
#[inline(never)]
fn choose<F: Wire>(
    packet: &Packet<F::Addr>,
    scope: u8,
    route: &ServiceValue,
) -> Option<(u32, (F::Addr, u16), u8)> {
    let frontend = &F::key(packet.dst, packet.dport_be, packet.proto, scope);
    let (id, backend, reason) = if route.flags & SERVICE_FLAG_AFFINITY != 0 {
        affinity::select::<F>(F::client(&packet.src), frontend, route)?
    } else if route.maglev_table != 0 && route.count != 0 {
        let (id, backend) =
            lb::maglev_backend::<F>(frontend, route.maglev_table, hash::<F>(packet))?;
        (id, backend, 0)
    } else {
        let (id, backend, _) = lb::select_backend::<F>(frontend, route)?;
        (id, backend, 0)
    };
    Some((id, F::backend_addr(&backend), reason))
}

/// Egress: a backend's reply to a translated flow leaves from the frontend.
#[inline(never)]
fn egress_in<F: Wire>(ctx: &TcContext) -> i32 {
    let Some(packet) = F::parse(ctx) else {
        return TC_ACT_OK;
    };
    let key = F::ct_key(
        packet.src,
        packet.dst,
        (packet.sport_be, packet.dport_be),
        packet.proto,
        CT_REPLY,
    );
    let Some(value) = F::ct_get(&key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a valid map value pointer, copied out at once.
    let frontend = F::ct_read(unsafe { &*value });
    F::ct_touch(value, now(), false);
    if F::rewrite(ctx, &packet, false, (frontend.nat, frontend.nat_port_be)).is_none() {
        crate::records::egress_rewrite_failed(packet.proto, frontend.nat_port_be);
    }
    TC_ACT_OK
}

/// Streams a new flow's decision to a listening monitor. Not inlined (nor is anything
/// below that is off the common path): a frame of its own keeps `ingress_in`'s small.
#[inline(never)]
fn report<F: Wire>(
    packet: &Packet<F::Addr>,
    rev_nat_index: u32,
    backend_id: u32,
    to: &(F::Addr, u16),
    reason: u8,
) {
    let mut event = event(packet, rev_nat_index, VERDICT_NAT, reason);
    event.backend_id = backend_id;
    F::emit(event, (packet.dst, packet.dport_be), Some(*to));
}

/// The flow's two entries: the client's packets to the backend, the replies back. A
/// refused write goes unsaid: this chain of frames is at the verifier's 512 bytes of
/// stack, which a record's frame (or its caller's spills) would pass.
#[inline(never)]
fn remember<F: Wire>(
    packet: &Packet<F::Addr>,
    route: &ServiceValue,
    backend_id: u32,
    backend: &(F::Addr, u16),
    flags: u8,
) {
    // One value, reused: the IPv6 path's frames stay within the 512-byte stack.
    let mut value = F::ct_value(
        &Flow {
            nat: packet.dst,
            nat_port_be: packet.dport_be,
            rev_nat_index: route.rev_nat_index,
            backend_id,
            flags,
        },
        now(),
    );
    let reply = F::ct_put(&reply_key::<F>(packet, *backend), &value);
    F::ct_retarget(&mut value, backend);
    let forward = F::ct_put(&forward_key::<F>(packet), &value);
    // LRU maps evict rather than fail; a lost entry only means the next packet chooses
    // again.
    let _ = (reply, forward);
}

fn translate<F: Wire>(
    ctx: &TcContext,
    packet: &Packet<F::Addr>,
    to: &(F::Addr, u16),
    flags: u8,
) -> i32 {
    if F::rewrite(ctx, packet, true, *to).is_none() {
        return TC_ACT_SHOT;
    }
    if flags & CT_FLAG_MASQ != 0 {
        ctx.set_mark(MARK_MASQ);
    }
    TC_ACT_OK
}

/// Hands the packet to netfilter marked for rejection (TCP reset, ICMP unreachable).
fn reject<F: Wire>(ctx: &TcContext, packet: &Packet<F::Addr>, index: u32, reason: u8) -> i32 {
    refuse::<F>(packet, index, VERDICT_REJECT, reason);
    ctx.set_mark(MARK_REJECT);
    TC_ACT_OK
}

fn drop_packet<F: Wire>(packet: &Packet<F::Addr>, index: u32, reason: u8) -> i32 {
    refuse::<F>(packet, index, VERDICT_DROP, reason);
    TC_ACT_SHOT
}

/// Counts a reject or drop (the reason in the backend field) and streams it.
#[inline(never)]
fn refuse<F: Wire>(packet: &Packet<F::Addr>, index: u32, verdict: u8, reason: u8) {
    observe::count(index, HOOK_TC_INGRESS, verdict, u32::from(reason));
    if observe::monitoring(index) {
        let event = event(packet, index, verdict, reason);
        F::emit(event, (packet.dst, packet.dport_be), None);
    }
}

fn event<A>(packet: &Packet<A>, rev_nat_index: u32, verdict: u8, reason: u8) -> MonitorEvent {
    MonitorEvent {
        rev_nat_index,
        hook: HOOK_TC_INGRESS,
        verdict,
        reason,
        proto: packet.proto,
        ..MonitorEvent::default()
    }
}
