//! Kernel side of proxy-agent: socket-level Service load balancing on cgroup hooks, and
//! per-packet load balancing for traffic from outside the node on its external
//! interfaces. Entry points only; the work lives in `sock.rs`, `packet.rs` and `lb.rs`.
#![no_std]
#![no_main]

mod affinity;
mod crc32c;
mod family;
mod l4;
mod lb;
mod maps;
mod observe;
mod packet;
mod records;
mod sock;
mod wire;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, SockContext, TcContext},
};
use proxy_common::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_GETPEERNAME4, HOOK_GETPEERNAME6, HOOK_RECVMSG4,
    HOOK_RECVMSG6, HOOK_SENDMSG4, HOOK_SENDMSG6,
};

/// Verdicts of cgroup sock_addr programs.
const SYS_PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    sock::xlate_fwd4(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::xlate_fwd4(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::xlate_rev4(&ctx, HOOK_RECVMSG4);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    sock::xlate_rev4(&ctx, HOOK_GETPEERNAME4);
    SYS_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    sock::xlate_fwd6(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::xlate_fwd6(&ctx, HOOK_SENDMSG6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::xlate_rev6(&ctx, HOOK_RECVMSG6);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    sock::xlate_rev6(&ctx, HOOK_GETPEERNAME6);
    SYS_PROCEED
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock::forget(&ctx);
    SYS_PROCEED
}

#[classifier]
pub fn nodeport_ingress(ctx: TcContext) -> i32 {
    packet::ingress(&ctx)
}

#[classifier]
pub fn nodeport_egress(ctx: TcContext) -> i32 {
    packet::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
