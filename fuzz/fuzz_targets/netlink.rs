//! Netlink replies: the message walk, rtnetlink addresses, `sock_diag` sockets and
//! conntrack entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_agent::{dataplane::conntrack, netlink, sockdiag, source::addresses};

fuzz_target!(|data: &[u8]| {
    let _ = netlink::messages(data, &mut |_, body| {
        let _ = addresses::parse(body);
        let _ = sockdiag::parse(body);
        let _ = conntrack::parse_entry(body);
    });
    let _ = addresses::parse(data);
    let _ = sockdiag::parse(data);
    let _ = conntrack::parse_entry(data);
    let _ = netlink::attrs(data);
});
