//! The programs' debug records (aya-log), read by the agent only with `-v`. Each is a
//! function of its own, never inlined: its frame is not added to the hot path's frames
//! (the verifier allows 512 bytes of stack along a call chain), and with the log level
//! off (the agent's default) the verifier prunes its body, so it costs nothing.
use aya_log_ebpf::debug;

/// A socket's reverse mapping could not be written: its replies keep the backend's
/// address.
#[inline(never)]
pub fn revnat_insert_failed(family: u8, code: i64) {
    debug!(
        &(),
        "socket reverse NAT LB{}_SK_REVNAT: insert failed ({})", family, code
    );
}

/// A decision went uncounted.
#[inline(never)]
pub fn stats_insert_failed(code: i64) {
    debug!(&(), "decision counters LB_STATS: insert failed ({})", code);
}

/// A backend's reply could not be rewritten back to its frontend: sent as it was.
#[inline(never)]
pub fn egress_rewrite_failed(proto: u8, port_be: u16) {
    debug!(
        &(),
        "egress: cannot rewrite a reply back to its frontend (protocol {}, port {}); sent as is",
        proto,
        u16::from_be(port_be)
    );
}

/// A TCP, UDP or SCTP packet too short for its ports (the verifier's bounds check):
/// passed untranslated, for the kernel to drop.
#[inline(never)]
pub fn too_short(proto: u8) {
    debug!(
        &(),
        "protocol {} packet too short for its ports; passed untranslated", proto
    );
}
