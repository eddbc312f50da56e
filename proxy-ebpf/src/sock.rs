//! Socket-level translation: rewrite a Service destination to a backend at connect or
//! sendmsg time, and rewrite the backend back to the Service for recvmsg and getpeername.
//! IPv6 sockets asking for an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack
//! socket) are translated through the IPv4 maps.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use proxy_common::{
    MonitorEvent, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, REASON_BACKEND_MISSING,
    REASON_NO_ENDPOINTS, REASON_NO_LOCAL_ENDPOINTS, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DROP_EMPTY,
    VERDICT_DROP, VERDICT_LOCAL_REDIRECT, VERDICT_NAT, VERDICT_REJECT, VERDICT_REVERSE_NAT,
};

use crate::{
    affinity,
    family::{bytes, words, Family, V4, V6},
    lb,
    maps::{LB4_SK_REVNAT, LB6_SK_REVNAT},
    observe, SYS_PROCEED,
};

const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const AF_INET6: u32 = 10;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in network order.
const V4_MAPPED_BE: u32 = 0xffff_u32.to_be();

/// The per-socket memory of which backend replaced which frontend, per family.
trait SockFamily: Family {
    fn remember(cookie: u64, backend: (Self::Addr, u16), frontend: (Self::Addr, u16), index: u32);
    /// The frontend (and its reverse-NAT index) a socket's backend peer stands for.
    fn recall(cookie: u64, peer: (Self::Addr, u16)) -> Option<((Self::Addr, u16), u32)>;
    fn forget(cookie: u64, peer: (Self::Addr, u16));
}

impl SockFamily for V4 {
    #[inline(always)]
    fn remember(cookie: u64, backend: (u32, u16), frontend: (u32, u16), index: u32) {
        let key = SockRevNat4Key {
            cookie,
            address_be: backend.0,
            port_be: backend.1,
            pad: 0,
        };
        let value = SockRevNat4 {
            address_be: frontend.0,
            port_be: frontend.1,
            rev_nat_index: index,
            pad: 0,
        };
        // A full LRU map evicts the oldest entry, so insertion cannot fail for lack of
        // room; any other failure only loses the reverse mapping, never the connection.
        if let Err(code) = LB4_SK_REVNAT.insert(key, value, 0) {
            crate::records::revnat_insert_failed(4, code.into());
        }
    }
    #[inline(always)]
    fn recall(cookie: u64, peer: (u32, u16)) -> Option<((u32, u16), u32)> {
        let key = SockRevNat4Key {
            cookie,
            address_be: peer.0,
            port_be: peer.1,
            pad: 0,
        };
        // SAFETY: copied out at once.
        let orig = unsafe { LB4_SK_REVNAT.get(key) }.copied()?;
        Some(((orig.address_be, orig.port_be), orig.rev_nat_index))
    }
    #[inline(always)]
    fn forget(cookie: u64, peer: (u32, u16)) {
        let key = SockRevNat4Key {
            cookie,
            address_be: peer.0,
            port_be: peer.1,
            pad: 0,
        };
        let _ = LB4_SK_REVNAT.remove(key);
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn remember(cookie: u64, backend: ([u8; 16], u16), frontend: ([u8; 16], u16), index: u32) {
        let key = SockRevNat6Key {
            cookie,
            address: backend.0,
            port_be: backend.1,
            pad: [0; 6],
        };
        let value = SockRevNat6 {
            address: frontend.0,
            port_be: frontend.1,
            rev_nat_index: index,
            pad: 0,
        };
        // As for IPv4: LRU, and a failure loses only the reverse mapping.
        if let Err(code) = LB6_SK_REVNAT.insert(key, value, 0) {
            crate::records::revnat_insert_failed(6, code.into());
        }
    }
    #[inline(always)]
    fn recall(cookie: u64, peer: ([u8; 16], u16)) -> Option<(([u8; 16], u16), u32)> {
        let key = SockRevNat6Key {
            cookie,
            address: peer.0,
            port_be: peer.1,
            pad: [0; 6],
        };
        // SAFETY: copied out at once.
        let orig = unsafe { LB6_SK_REVNAT.get(key) }.copied()?;
        Some(((orig.address, orig.port_be), orig.rev_nat_index))
    }
    #[inline(always)]
    fn forget(cookie: u64, peer: ([u8; 16], u16)) {
        let key = SockRevNat6Key {
            cookie,
            address: peer.0,
            port_be: peer.1,
            pad: [0; 6],
        };
        let _ = LB6_SK_REVNAT.remove(key);
    }
}

/// What the forward hooks do with a destination.
enum Choice<A> {
    /// Not a Service: leave it.
    Pass,
    /// A Service with no usable backend: fail the call.
    Refuse,
    /// Send it here instead.
    To((A, u16)),
}

/// The forward decision for one destination: the backend (or live node-local listener)
/// of a Service; every decision is counted, and streamed to a listening monitor.
#[inline(always)]
fn choose<F: SockFamily>(
    ctx: &SockAddrContext,
    frontend: (F::Addr, u16),
    proto: u8,
    hook: u8,
) -> Choice<F::Addr> {
    let key = F::key(frontend.0, frontend.1, proto, 0);
    let Some(svc) = lb::lookup::<F>(&key) else {
        return Choice::Pass;
    };
    let rev_nat_index = svc.rev_nat_index;
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = MonitorEvent {
        socket_cookie: cookie,
        rev_nat_index,
        hook,
        proto,
        ..MonitorEvent::default()
    };
    let chosen = if let Some(listener) = F::local_redirect(&key) {
        Some((0, listener, VERDICT_LOCAL_REDIRECT, 0))
    } else if svc.flags & SERVICE_FLAG_AFFINITY != 0 {
        // SAFETY: valid context pointer; allowed in sock_addr programs.
        let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        affinity::select::<F>(client, &key, &svc)
            .map(|(id, backend, reason)| (id, backend, VERDICT_NAT, reason))
    } else {
        lb::select_backend::<F>(&key, &svc).map(|(id, backend, _)| (id, backend, VERDICT_NAT, 0))
    };
    let Some((backend_id, backend, verdict, reason)) = chosen else {
        // No endpoint on this node under a Local policy: kube-proxy drops, so the client
        // waits out its timeout. The call goes on untranslated and the node's netfilter
        // table drops its packets (the frontend is in its no-endpoints set).
        let drop = svc.count == 0 && svc.flags & SERVICE_FLAG_DROP_EMPTY != 0;
        (event.verdict, event.reason) = if drop {
            (VERDICT_DROP, REASON_NO_LOCAL_ENDPOINTS)
        } else if svc.count == 0 {
            (VERDICT_REJECT, REASON_NO_ENDPOINTS)
        } else {
            (VERDICT_REJECT, REASON_BACKEND_MISSING)
        };
        observe::count(rev_nat_index, hook, event.verdict, u32::from(event.reason));
        if observe::monitoring(rev_nat_index) {
            event.pid = observe::pid();
            F::emit(event, frontend, None);
        }
        return if drop { Choice::Pass } else { Choice::Refuse };
    };
    let to = F::backend_addr(&backend);
    observe::count(rev_nat_index, hook, verdict, backend_id);
    if observe::monitoring(rev_nat_index) {
        event.verdict = verdict;
        event.reason = reason;
        event.backend_id = backend_id;
        event.pid = observe::pid();
        F::emit(event, frontend, Some(to));
    }
    F::remember(cookie, to, frontend, rev_nat_index);
    Choice::To(to)
}

/// Fails a connect or sendmsg with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: bpf_set_retval is allowed in connect and sendmsg hooks.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    SYS_REJECT
}

/// connect4/sendmsg4: a Service destination becomes one of its backends (or the live
/// node-local listener registered for it); a Service with no backends fails the call at
/// once with ECONNREFUSED, one with no endpoint on this node under a Local policy is left
/// to the netfilter table's drop.
#[inline(always)]
pub fn xlate_fwd4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable in
    // connect4 and sendmsg4.
    let (address_be, port_u32, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    // user_port holds the network-order port in its low 16 bits.
    match choose::<V4>(ctx, (address_be, port_u32 as u16), proto as u8, hook) {
        Choice::Pass => SYS_PROCEED,
        Choice::Refuse => refuse(),
        Choice::To((address_be, port_be)) => {
            // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = address_be;
                (*ctx.sock_addr).user_port = u32::from(port_be);
            }
            SYS_PROCEED
        }
    }
}

/// The destination of an IPv6 sock_addr hook, word by word (the verifier allows
/// 4-byte context accesses to user_ip6).
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: valid context pointer; user_ip6 is readable in every IPv6 hook.
    unsafe {
        let sa = &*ctx.sock_addr;
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    }
}

/// Whether the address is IPv4-mapped: then its last word is the IPv4 address.
#[inline(always)]
fn v4_mapped(words: &[u32; 4]) -> bool {
    words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_BE
}

/// Writes the destination of an IPv6 hook.
#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, words: [u32; 4], port_be: u16) {
    // SAFETY: user_ip6 and user_port are writable in connect6, sendmsg6, recvmsg6 and
    // getpeername6; each word is one 4-byte store.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = words[0];
        sa.user_ip6[1] = words[1];
        sa.user_ip6[2] = words[2];
        sa.user_ip6[3] = words[3];
        sa.user_port = u32::from(port_be);
    }
}

/// connect6/sendmsg6: as `xlate_fwd4`, for IPv6 Services and IPv4-mapped destinations.
#[inline(always)]
pub fn xlate_fwd6(ctx: &SockAddrContext, hook: u8) -> i32 {
    let ip6 = user_ip6(ctx);
    // SAFETY: valid context pointer; readable in connect6 and sendmsg6.
    let (port_u32, proto) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    let port_be = port_u32 as u16;
    let proto = proto as u8;
    if v4_mapped(&ip6) {
        return match choose::<V4>(ctx, (ip6[3], port_be), proto, hook) {
            Choice::Pass => SYS_PROCEED,
            Choice::Refuse => refuse(),
            Choice::To((address_be, port_be)) => {
                set_user_ip6(ctx, [0, 0, V4_MAPPED_BE, address_be], port_be);
                SYS_PROCEED
            }
        };
    }
    match choose::<V6>(ctx, (bytes(ip6), port_be), proto, hook) {
        Choice::Pass => SYS_PROCEED,
        Choice::Refuse => refuse(),
        Choice::To((address, port_be)) => {
            set_user_ip6(ctx, words(address), port_be);
            SYS_PROCEED
        }
    }
}

/// A reverse translation: the frontend a socket's backend peer stands for, streamed to
/// a listening monitor.
#[inline(always)]
fn recall<F: SockFamily>(
    ctx: &SockAddrContext,
    peer: (F::Addr, u16),
    hook: u8,
) -> Option<(F::Addr, u16)> {
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (frontend, rev_nat_index) = F::recall(cookie, peer)?;
    if observe::monitoring(rev_nat_index) {
        let event = MonitorEvent {
            socket_cookie: cookie,
            rev_nat_index,
            hook,
            verdict: VERDICT_REVERSE_NAT,
            // SAFETY: valid context pointer; protocol is readable in these hooks.
            proto: unsafe { (*ctx.sock_addr).protocol } as u8,
            pid: observe::pid(),
            ..MonitorEvent::default()
        };
        F::emit(event, frontend, Some(peer));
    }
    Some(frontend)
}

/// recvmsg4/getpeername4: a peer that is a backend this socket was sent to shows up
/// as the Service address it asked for.
#[inline(always)]
pub fn xlate_rev4(ctx: &SockAddrContext, hook: u8) {
    // SAFETY: valid context pointer; user_ip4/user_port are readable in these hooks.
    let (address_be, port_u32) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    if let Some((address_be, port_be)) = recall::<V4>(ctx, (address_be, port_u32 as u16), hook) {
        // SAFETY: user_ip4 and user_port are writable in recvmsg4 and getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = address_be;
            (*ctx.sock_addr).user_port = u32::from(port_be);
        }
    }
}

/// recvmsg6/getpeername6: as `xlate_rev4`, for IPv6 and IPv4-mapped peers.
#[inline(always)]
pub fn xlate_rev6(ctx: &SockAddrContext, hook: u8) {
    let ip6 = user_ip6(ctx);
    // SAFETY: valid context pointer; readable in recvmsg6 and getpeername6.
    let port_be = unsafe { (*ctx.sock_addr).user_port } as u16;
    if v4_mapped(&ip6) {
        if let Some((address_be, port_be)) = recall::<V4>(ctx, (ip6[3], port_be), hook) {
            set_user_ip6(ctx, [0, 0, V4_MAPPED_BE, address_be], port_be);
        }
    } else if let Some((address, port_be)) = recall::<V6>(ctx, (bytes(ip6), port_be), hook) {
        set_user_ip6(ctx, words(address), port_be);
    }
}

/// sock_release: a connected socket that was sent to a backend forgets it, so the
/// per-socket tables hold live sockets (unconnected UDP entries age out of the LRU).
#[inline(always)]
pub fn forget(ctx: &SockContext) {
    // SAFETY: the kernel passes a valid bpf_sock; these fields are readable here.
    let (family, address_be, port_be) = unsafe {
        (
            (*ctx.sock).family,
            (*ctx.sock).dst_ip4,
            (*ctx.sock).dst_port,
        )
    };
    if family == AF_INET6 {
        // SAFETY: as above; dst_ip6 is readable word by word.
        let ip6 = unsafe {
            let sk = &*ctx.sock;
            [sk.dst_ip6[0], sk.dst_ip6[1], sk.dst_ip6[2], sk.dst_ip6[3]]
        };
        if ip6 == [0; 4] {
            return;
        }
        // SAFETY: valid context pointer.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if v4_mapped(&ip6) {
            V4::forget(cookie, (ip6[3], port_be));
        } else {
            V6::forget(cookie, (bytes(ip6), port_be));
        }
        return;
    }
    if address_be == 0 {
        return;
    }
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    V4::forget(cookie, (address_be, port_be));
}
