//! Socket-level translation: rewrite a Service destination to a backend at connect or
//! sendmsg time, and rewrite the backend back to the Service for recvmsg and getpeername.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use proxy_common::{
    MonitorEvent, SockRevNat4, SockRevNat4Key, REASON_BACKEND_MISSING, REASON_NO_ENDPOINTS,
    SERVICE_FLAG_AFFINITY, VERDICT_LOCAL_REDIRECT, VERDICT_NAT, VERDICT_REJECT,
    VERDICT_REVERSE_NAT,
};

use crate::{affinity, lb, maps::LB4_SK_REVNAT, observe, SYS_PROCEED};

const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect4/sendmsg4: a Service destination becomes one of its backends (or the live
/// node-local listener registered for it); a Service with no backends fails the call at
/// once with ECONNREFUSED. Every decision is counted, and streamed to a listening monitor.
#[inline(always)]
pub fn xlate_fwd4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable in
    // connect4 and sendmsg4.
    let (address_be, port_u32, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    // user_port holds the network-order port in its low 16 bits.
    let dport_be = port_u32 as u16;
    let proto = proto as u8;
    let frontend = lb::frontend_key(address_be, dport_be, proto, 0);
    let Some(svc) = lb::lookup(&frontend) else {
        return SYS_PROCEED;
    };
    let rev_nat_index = svc.rev_nat_index;
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = MonitorEvent {
        socket_cookie: cookie,
        frontend_be: address_be,
        frontend_port_be: dport_be,
        rev_nat_index,
        hook,
        proto,
        ..MonitorEvent::default()
    };
    let chosen = if let Some(listener) = lb::local_redirect(&frontend) {
        Some((0, listener, VERDICT_LOCAL_REDIRECT, 0))
    } else if svc.flags & SERVICE_FLAG_AFFINITY != 0 {
        // SAFETY: valid context pointer; allowed in sock_addr programs.
        let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        affinity::select4(client, &frontend, &svc)
            .map(|(id, backend, reason)| (id, backend, VERDICT_NAT, reason))
    } else {
        lb::select_backend(&frontend, &svc).map(|(id, backend, _)| (id, backend, VERDICT_NAT, 0))
    };
    let Some((backend_id, backend, verdict, reason)) = chosen else {
        event.verdict = VERDICT_REJECT;
        event.reason = if svc.count == 0 {
            REASON_NO_ENDPOINTS
        } else {
            REASON_BACKEND_MISSING
        };
        observe::count(rev_nat_index, hook, VERDICT_REJECT, u32::from(event.reason));
        if observe::monitoring(rev_nat_index) {
            observe::emit(event);
        }
        // SAFETY: bpf_set_retval is allowed in connect4 and sendmsg4.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return SYS_REJECT;
    };
    observe::count(rev_nat_index, hook, verdict, backend_id);
    if observe::monitoring(rev_nat_index) {
        event.verdict = verdict;
        event.reason = reason;
        event.backend_id = backend_id;
        event.backend_be = backend.address_be;
        event.backend_port_be = backend.port_be;
        observe::emit(event);
    }
    let key = SockRevNat4Key {
        cookie,
        address_be: backend.address_be,
        port_be: backend.port_be,
        pad: 0,
    };
    let value = SockRevNat4 {
        address_be,
        port_be: dport_be,
        rev_nat_index: svc.rev_nat_index,
    };
    // A full LRU map evicts the oldest entry, so insertion cannot fail for lack of room;
    // any other failure only loses the reverse mapping, never the connection.
    let _ = LB4_SK_REVNAT.insert(key, value, 0);
    // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = backend.address_be;
        (*ctx.sock_addr).user_port = u32::from(backend.port_be);
    }
    SYS_PROCEED
}

/// recvmsg4/getpeername4: a peer that is a backend this socket was sent to shows up
/// as the Service address it asked for.
#[inline(always)]
pub fn xlate_rev4(ctx: &SockAddrContext, hook: u8) {
    // SAFETY: valid context pointer; user_ip4/user_port are readable in these hooks.
    let (address_be, port_u32) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port)
    };
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNat4Key {
        cookie,
        address_be,
        port_be: port_u32 as u16,
        pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { LB4_SK_REVNAT.get(key) }).copied() else {
        return;
    };
    // SAFETY: user_ip4 and user_port are writable in recvmsg4 and getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = orig.address_be;
        (*ctx.sock_addr).user_port = u32::from(orig.port_be);
    }
    if observe::monitoring(orig.rev_nat_index) {
        observe::emit(MonitorEvent {
            socket_cookie: cookie,
            frontend_be: orig.address_be,
            frontend_port_be: orig.port_be,
            backend_be: address_be,
            backend_port_be: port_u32 as u16,
            rev_nat_index: orig.rev_nat_index,
            hook,
            verdict: VERDICT_REVERSE_NAT,
            // SAFETY: valid context pointer; protocol is readable in these hooks.
            proto: unsafe { (*ctx.sock_addr).protocol } as u8,
            ..MonitorEvent::default()
        });
    }
}

/// sock_release: a connected socket that was sent to a backend forgets it, so the
/// per-socket table holds live sockets (unconnected UDP entries age out of the LRU).
#[inline(always)]
pub fn forget(ctx: &SockContext) {
    // SAFETY: the kernel passes a valid bpf_sock; these fields are readable here.
    let (address_be, port_be) = unsafe { ((*ctx.sock).dst_ip4, (*ctx.sock).dst_port) };
    if address_be == 0 {
        return;
    }
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNat4Key {
        cookie,
        address_be,
        port_be,
        pad: 0,
    };
    let _ = LB4_SK_REVNAT.remove(key);
}
