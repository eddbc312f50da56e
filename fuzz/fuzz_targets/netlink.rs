//! Netlink replies as the agent reads them: the crates' typed messages through the
//! request glue, then rtnetlink addresses, `sock_diag` sockets and conntrack entries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netlink_packet_netfilter::NetfilterMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_sock_diag::SockDiagMessage;
use proxy_agent::{dataplane::conntrack, netlink, sockdiag, source::addresses};

fuzz_target!(|data: &[u8]| {
    if let Ok(messages) = netlink::read_reply::<RouteNetlinkMessage>(data, 1, 0) {
        for message in &messages {
            if let RouteNetlinkMessage::NewAddress(address) = message {
                let _ = addresses::address_of(address);
            }
        }
    }
    if let Ok(messages) = netlink::read_reply::<SockDiagMessage>(data, 1, 0) {
        messages.iter().for_each(|m| drop(sockdiag::socket_of(m)));
    }
    if let Ok(messages) = netlink::read_reply::<NetfilterMessage>(data, 1, 0) {
        messages.iter().for_each(|m| drop(conntrack::entry_of(m)));
    }
});
