//! `sessionAffinity: ClientIP` at the socket: a client keeps its backend while it
//! reconnects within the timeout (kube-proxy's `recent` match refreshes on each use).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{AffinityKey, AffinityValue, ServiceValue, REASON_AFFINITY};

use crate::{family::Family, lb, maps::LB4_AFFINITY};

/// The client's remembered backend if still valid, else a fresh random choice that is
/// remembered: (backend id, backend, reason for monitor events). Both families share
/// the map: reverse-NAT indexes are unique across them.
#[inline(always)]
pub fn select<F: Family>(
    client_cookie: u64,
    frontend: &F::Key,
    svc: &ServiceValue,
) -> Option<(u32, F::Backend, u8)> {
    let key = AffinityKey {
        client_cookie,
        rev_nat_index: svc.rev_nat_index,
        pad: 0,
    };
    // SAFETY: helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // The slot-0 entry of an affinity Service carries the timeout in `backend_id`.
    let timeout_ns = u64::from(svc.backend_id) * 1_000_000_000;
    if let Some(remembered) = LB4_AFFINITY.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; concurrent updates only race on the
        // timestamp, where either value is fine.
        let (last, id, slot) = unsafe {
            (
                (*remembered).last_used_ns,
                (*remembered).backend_id,
                (*remembered).slot,
            )
        };
        if now.wrapping_sub(last) < timeout_ns && slot != 0 && slot <= svc.count {
            if let Some((current, backend)) = lb::slot_backend::<F>(frontend, slot) {
                if current == id {
                    // SAFETY: as above.
                    unsafe { (*remembered).last_used_ns = now };
                    return Some((id, backend, REASON_AFFINITY));
                }
            }
        }
    }
    let (id, backend, slot) = lb::select_backend::<F>(frontend, svc)?;
    let value = AffinityValue {
        last_used_ns: now,
        backend_id: id,
        slot,
        pad: 0,
    };
    // A full LRU map forgets its coldest client; the connection goes on regardless.
    let _ = LB4_AFFINITY.insert(key, value, 0);
    Some((id, backend, 0))
}
