//! What differs between IPv4 and IPv6 frontends: their keys, maps and monitor records.
//! The load-balancing logic in `lb.rs`, `affinity.rs` and `sock.rs` is written once
//! over this trait and compiled for each family.
use proxy_common::{Backend4, Backend6, MonitorEvent, Service4Key, Service6Key, ServiceValue};

use crate::{
    lb,
    maps::{LB4_BACKENDS, LB4_SERVICES, LB6_BACKENDS, LB6_SERVICES},
    observe,
};

pub trait Family {
    /// An address as the kernel hands it over (network order in memory).
    type Addr: Copy;
    type Key: Copy;
    type Backend: Copy;
    fn key(address: Self::Addr, port_be: u16, proto: u8, scope: u8) -> Self::Key;
    fn with_slot(key: &Self::Key, slot: u16) -> Self::Key;
    fn service(key: &Self::Key) -> Option<ServiceValue>;
    fn backend(id: u32) -> Option<Self::Backend>;
    /// A backend's address and network-order port.
    fn backend_addr(backend: &Self::Backend) -> (Self::Addr, u16);
    /// The node-local listener standing in for a frontend (the DNS cache), if any.
    fn local_redirect(key: &Self::Key) -> Option<Self::Backend>;
    /// Streams an event, its addresses filled in (`backend` is `None` for rejects and
    /// drops).
    fn emit(event: MonitorEvent, frontend: (Self::Addr, u16), backend: Option<(Self::Addr, u16)>);
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type Key = Service4Key;
    type Backend = Backend4;

    #[inline(always)]
    fn key(address_be: u32, dport_be: u16, proto: u8, scope: u8) -> Service4Key {
        lb::frontend_key(address_be, dport_be, proto, scope)
    }
    #[inline(always)]
    fn with_slot(key: &Service4Key, slot: u16) -> Service4Key {
        Service4Key {
            backend_slot: slot,
            ..*key
        }
    }
    #[inline(always)]
    fn service(key: &Service4Key) -> Option<ServiceValue> {
        // SAFETY: copied out at once.
        unsafe { LB4_SERVICES.get(key) }.copied()
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<Backend4> {
        // SAFETY: copied out at once.
        unsafe { LB4_BACKENDS.get(id) }.copied()
    }
    #[inline(always)]
    fn backend_addr(backend: &Backend4) -> (u32, u16) {
        (backend.address_be, backend.port_be)
    }
    #[inline(always)]
    fn local_redirect(key: &Service4Key) -> Option<Backend4> {
        lb::local_redirect(key)
    }
    #[inline(always)]
    fn emit(mut event: MonitorEvent, frontend: (u32, u16), backend: Option<(u32, u16)>) {
        (event.frontend_be, event.frontend_port_be) = frontend;
        if let Some((address_be, port_be)) = backend {
            (event.backend_be, event.backend_port_be) = (address_be, port_be);
        }
        observe::emit(event);
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type Key = Service6Key;
    type Backend = Backend6;

    #[inline(always)]
    fn key(address: [u8; 16], dport_be: u16, proto: u8, scope: u8) -> Service6Key {
        Service6Key {
            address,
            dport_be,
            backend_slot: 0,
            proto,
            scope,
            pad: [0; 2],
        }
    }
    #[inline(always)]
    fn with_slot(key: &Service6Key, slot: u16) -> Service6Key {
        Service6Key {
            backend_slot: slot,
            ..*key
        }
    }
    #[inline(always)]
    fn service(key: &Service6Key) -> Option<ServiceValue> {
        // SAFETY: copied out at once.
        unsafe { LB6_SERVICES.get(key) }.copied()
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: copied out at once.
        unsafe { LB6_BACKENDS.get(id) }.copied()
    }
    #[inline(always)]
    fn backend_addr(backend: &Backend6) -> ([u8; 16], u16) {
        (backend.address, backend.port_be)
    }
    #[inline(always)]
    fn local_redirect(_key: &Service6Key) -> Option<Backend6> {
        // The node-local DNS cache listens on IPv4 only.
        None
    }
    #[inline(always)]
    fn emit(mut event: MonitorEvent, frontend: ([u8; 16], u16), backend: Option<([u8; 16], u16)>) {
        event.frontend_port_be = frontend.1;
        let (backend, port_be) = backend.unwrap_or_default();
        event.backend_port_be = port_be;
        observe::emit6(&event, &frontend.0, &backend);
    }
}

/// An IPv6 address as four network-order words (as `user_ip6` and `bpf_csum_diff` take
/// it): the same 16 bytes.
#[inline(always)]
pub fn words(address: [u8; 16]) -> [u32; 4] {
    // SAFETY: any 16 bytes are valid as either type.
    unsafe { core::mem::transmute(address) }
}

/// The inverse of [`words`].
#[inline(always)]
pub fn bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: as above.
    unsafe { core::mem::transmute(words) }
}
