//! Counters and monitor events for every decision the programs take: counting is a
//! per-CPU increment; events cost one array read unless a monitor is listening.
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use proxy_common::{MonitorEvent, Stats, StatsKey};

use crate::maps::{LB_EVENTS, LB_MONITOR, LB_STATS};

/// `BPF_NOEXIST`: a concurrent first count on another CPU keeps its own entry.
const BPF_NOEXIST: u64 = 1;

/// One more decision for this frontend, backend, hook and verdict.
#[inline(always)]
pub fn count(rev_nat_index: u16, hook: u8, verdict: u8, backend_id: u32) {
    let key = StatsKey {
        rev_nat_index,
        hook,
        verdict,
        backend_id,
    };
    match LB_STATS.get_ptr_mut(key) {
        // SAFETY: a per-CPU value of this CPU; nothing else writes it while we run.
        Some(stats) => unsafe { (*stats).count += 1 },
        None => {
            let first = Stats { count: 1, bytes: 0 };
            // A full LRU map evicts its coldest entry; losing a count is not worth a
            // failed call.
            let _ = LB_STATS.insert(key, first, BPF_NOEXIST);
        }
    }
}

/// Whether a monitor wants events of this frontend now.
#[inline(always)]
pub fn monitoring(rev_nat_index: u16) -> bool {
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

/// Streams one event of a socket program, naming the calling process.
#[inline(always)]
pub fn emit(mut event: MonitorEvent) {
    event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit_packet(event);
}

/// Streams one event (no process: a packet program runs for no particular one); a
/// full ring buffer drops it rather than slow the caller.
#[inline(always)]
pub fn emit_packet(mut event: MonitorEvent) {
    // SAFETY: helper call with no arguments.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let _ = LB_EVENTS.output::<MonitorEvent>(&event, 0);
}
