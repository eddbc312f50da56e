//! Counters and monitor events for every decision the programs take: counting is a
//! per-CPU increment; events cost one array read unless a monitor is listening.
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use proxy_common::{MonitorEvent, MonitorEvent6, Stats, StatsKey};

use crate::maps::{LB_EVENTS, LB_MONITOR, LB_STATS};

/// `BPF_NOEXIST`: a first count never overwrites an entry another CPU just created.
const BPF_NOEXIST: u64 = 1;

/// One more decision for this frontend, backend, hook and verdict.
#[inline(always)]
pub fn count(rev_nat_index: u32, hook: u8, verdict: u8, backend_id: u32) {
    let key = StatsKey {
        rev_nat_index,
        hook,
        verdict,
        backend_id,
        pad: 0,
    };
    match LB_STATS.get_ptr_mut(key) {
        // SAFETY: a per-CPU value of this CPU; nothing else writes it while we run.
        Some(stats) => unsafe { (*stats).count += 1 },
        None => {
            let first = Stats { count: 1, bytes: 0 };
            // Another CPU may have created the entry since the lookup: then count in
            // this CPU's slot of it. (A full LRU map evicts its coldest entry; losing a
            // count is not worth a failed call.)
            if let Err(code) = LB_STATS.insert(key, first, BPF_NOEXIST) {
                if let Some(stats) = LB_STATS.get_ptr_mut(key) {
                    // SAFETY: as above.
                    unsafe { (*stats).count += 1 };
                } else {
                    crate::records::stats_insert_failed(code.into());
                }
            }
        }
    }
}

/// Whether a monitor wants events of this frontend now.
#[inline(always)]
pub fn monitoring(rev_nat_index: u32) -> bool {
    let Some(config) = LB_MONITOR.get(0) else {
        return false;
    };
    if config.expires_ns == 0 {
        return false;
    }
    if config.rev_nat_index != 0 && config.rev_nat_index != rev_nat_index {
        return false;
    }
    // SAFETY: helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    now < config.expires_ns
}

/// The calling process (thread group id), for events of socket programs (a packet
/// program runs for no particular one).
#[inline(always)]
pub fn pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Streams one event; a full ring buffer drops it rather than slow the caller.
#[inline(always)]
pub fn emit(mut event: MonitorEvent) {
    // SAFETY: helper call with no arguments.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let _ = LB_EVENTS.output::<MonitorEvent>(&event, 0);
}

/// [`emit`] for an IPv6 frontend's event, written in place in the ring buffer (the
/// per-packet path has no stack to spare for a copy).
#[inline(always)]
pub fn emit6(event: &MonitorEvent, frontend: &[u8; 16], backend: &[u8; 16]) {
    let Some(mut entry) = LB_EVENTS.reserve::<MonitorEvent6>(0) else {
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, writable MonitorEvent6; every field is
    // written before it is submitted.
    unsafe {
        (*record).event = *event;
        (*record).event.timestamp_ns = bpf_ktime_get_ns();
        (*record).frontend = *frontend;
        (*record).backend = *backend;
    }
    entry.submit(0);
}
