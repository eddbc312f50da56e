//! Frontend lookup and backend selection over the services maps (either family).
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{Backend4, Service4Key, ServiceValue, LOCAL_REDIRECT_TTL_NS};

use crate::{
    family::Family,
    maps::{LB4_MAGLEV, LOCAL_REDIRECT4},
};

/// The slot-0 key of a frontend in one scope.
#[inline(always)]
pub fn frontend_key(address_be: u32, dport_be: u16, proto: u8, scope: u8) -> Service4Key {
    Service4Key {
        address_be,
        dport_be,
        backend_slot: 0,
        proto,
        scope,
        pad: [0; 2],
    }
}

/// The frontend entry (slot 0) for a key, if it is a Service. The agent never rewrites
/// a slot-0 entry in place with a count its slots do not back (its write order).
#[inline(always)]
pub fn lookup<F: Family>(frontend: &F::Key) -> Option<ServiceValue> {
    F::service(frontend)
}

/// A uniformly random backend of a frontend with `svc.count > 0`, its id and slot. A
/// missing slot or backend means the agent rewrote the frontend after `svc` was read
/// (it deletes surplus slots and unused backends right after the new count, and a
/// stalled CPU can hold a program across that): the frontend is read again and the
/// choice made once more from its count now. `None` if that misses too.
#[inline(always)]
pub fn select_backend<F: Family>(
    frontend: &F::Key,
    svc: &ServiceValue,
) -> Option<(u32, F::Backend, u16)> {
    if let Some(chosen) = select_among::<F>(frontend, svc.count) {
        return Some(chosen);
    }
    let now = F::service(frontend)?;
    select_among::<F>(frontend, now.count)
}

/// A uniformly random one of the first `count` slots' backends, its id and slot.
#[inline(always)]
fn select_among<F: Family>(frontend: &F::Key, count: u16) -> Option<(u32, F::Backend, u16)> {
    let count = u32::from(count);
    if count == 0 {
        return None;
    }
    // SAFETY: helper call with no arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    // `count` is non-zero and at most u16::MAX, so the slot fits in u16.
    let slot = (random % count) as u16 + 1;
    let (id, backend) = slot_backend::<F>(frontend, slot)?;
    Some((id, backend, slot))
}

/// The backend a flow hashing to `hash` gets from a frontend's Maglev `table`, and its
/// id: every node holding the same table sends the flow to the same backend, and a
/// backend change moves only about its share of flows. A missing table or backend
/// means the agent replaced the table (and deleted what only the old one used) after
/// the frontend was read: the frontend is read again for its table now.
#[inline(always)]
pub fn maglev_backend<F: Family>(
    frontend: &F::Key,
    table: u16,
    hash: u32,
) -> Option<(u32, F::Backend)> {
    if let Some(chosen) = maglev_entry::<F>(table, hash) {
        return Some(chosen);
    }
    let now = F::service(frontend)?;
    maglev_entry::<F>(now.maglev_table, hash)
}

/// One read of a Maglev table's entry for `hash`, and its backend.
#[inline(always)]
fn maglev_entry<F: Family>(table: u16, hash: u32) -> Option<(u32, F::Backend)> {
    // SAFETY: the value is read in place, one entry; the agent replaces whole tables.
    let table = unsafe { LB4_MAGLEV.get(table) }?;
    let size = table.size;
    if size == 0 {
        return None;
    }
    let id = *table.backend_ids.get((hash % size) as usize)?;
    Some((id, F::backend(id)?))
}

/// The backend in one slot of a frontend, and its id.
#[inline(always)]
pub fn slot_backend<F: Family>(frontend: &F::Key, slot: u16) -> Option<(u32, F::Backend)> {
    let slot_value = F::service(&F::with_slot(frontend, slot))?;
    let backend = F::backend(slot_value.backend_id)?;
    Some((slot_value.backend_id, backend))
}

/// The node-local listener that stands in for this frontend's backends, if one is
/// registered and its heartbeat is fresh (so a dead listener costs at most the TTL).
#[inline(always)]
pub fn local_redirect(frontend: &Service4Key) -> Option<Backend4> {
    // SAFETY: copied out at once.
    let redirect = unsafe { LOCAL_REDIRECT4.get(frontend) }.copied()?;
    // SAFETY: helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(redirect.heartbeat_ns) >= LOCAL_REDIRECT_TTL_NS {
        return None;
    }
    Some(Backend4 {
        address_be: redirect.address_be,
        port_be: redirect.port_be,
        proto: frontend.proto,
        flags: 0,
    })
}
