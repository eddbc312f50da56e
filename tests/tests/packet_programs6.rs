//! The per-packet programs on IPv6 packets through `BPF_PROG_TEST_RUN`: NodePort DNAT
//! and reverse NAT with their checksums (TCP, UDP, SCTP), the masquerade mark, source
//! ranges, and the drop of a Local policy without local endpoints.
use std::net::{Ipv6Addr, SocketAddrV6};

use proxy_agent::model::{
    DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol,
};
use proxy_agent_tests::{
    progtest::{frontend, route, sctp_crc, Programs, DROP, PASS},
    progtest6::{checksum6_valid, endpoints6, sctp6, tcp6, udp6},
};
use proxy_common::MARK_MASQ;

const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x100, 0, 0, 0, 0, 1);
const LB_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x100, 0, 0, 0, 0, 0x201);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn at(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

fn backends() -> [SocketAddrV6; 2] {
    [
        at(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2), 8080),
        at(Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 2), 8080),
    ]
}

fn client(net: u16, port: u16) -> SocketAddrV6 {
    at(Ipv6Addr::new(0x2001, net, 0, 0, 0, 0, 0, 0x10), port)
}

/// NodePorts with eTP Cluster (TCP and UDP) and Local (no endpoint here), and a
/// load-balancer IP open to `2001:db8::/32` only (an IPv4 range beside it is ignored).
fn loaded(tag: &str) -> Programs {
    use EmptyVerdict::{Drop, Reject};
    use FrontendKind::{LoadBalancer, NodePort};
    let masqueraded = route(&backends(), true, Reject);
    let mut state = DesiredState::default();
    let mut add = |ip: Ipv6Addr, port: u16, protocol: Protocol, frontend: Frontend| {
        let key = FrontendKey {
            ip: ip.into(),
            port,
            protocol,
        };
        state.frontends.insert(key, frontend.into());
    };
    let np = frontend("np", NodePort, masqueraded.clone(), masqueraded.clone());
    add(NODE, 30080, Protocol::Tcp, np.clone());
    add(NODE, 30053, Protocol::Udp, np.clone());
    add(NODE, 30132, Protocol::Sctp, np);
    let local = frontend(
        "np-local",
        NodePort,
        route(&backends(), false, Reject),
        route::<SocketAddrV6>(&[], false, Drop),
    );
    add(NODE, 30081, Protocol::Tcp, local);
    let mut lb = frontend("lb", LoadBalancer, masqueraded.clone(), masqueraded);
    lb.source_ranges = vec![
        "2001:db8::/32".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
    ];
    add(LB_IP, 80, Protocol::Tcp, lb);
    let mut programs = Programs::load(tag);
    programs.program(&state);
    programs
}

#[test]
fn ipv6_nodeport_flows_are_translated_both_ways_with_valid_checksums() {
    let programs = loaded("nat6");
    let frontend = at(NODE, 30080);
    let client = client(0xdb8, 40000);
    let first = programs.run(true, &tcp6(client, frontend, SYN));
    assert_eq!(first.verdict, PASS);
    let (src, backend) = endpoints6(&first.packet);
    assert_eq!(
        src, client,
        "the client address is kept (netfilter masquerades)"
    );
    assert!(
        backends().contains(&backend),
        "DNAT to a backend, got {backend}"
    );
    assert!(checksum6_valid(&first.packet), "TCP checksum after DNAT");
    assert_eq!(first.mark, MARK_MASQ, "eTP=Cluster marks for masquerade");
    for _ in 0..8 {
        let next = programs.run(true, &tcp6(client, frontend, ACK));
        assert_eq!(
            endpoints6(&next.packet).1,
            backend,
            "the flow keeps its backend"
        );
    }
    let reply = programs.run(false, &tcp6(backend, client, SYN | ACK));
    assert_eq!(reply.verdict, PASS);
    assert_eq!(endpoints6(&reply.packet), (frontend, client));
    assert!(
        checksum6_valid(&reply.packet),
        "TCP checksum after reverse NAT"
    );
    // UDP: the checksum IPv6 requires stays right.
    let datagram = programs.run(true, &udp6(client, at(NODE, 30053), b"query"));
    assert_eq!(datagram.verdict, PASS);
    assert!(backends().contains(&endpoints6(&datagram.packet).1));
    assert!(checksum6_valid(&datagram.packet), "UDP checksum after DNAT");
    // SCTP: the CRC32c follows the port, both ways (chunk types INIT, INIT ACK).
    let init = programs.run(true, &sctp6(client, at(NODE, 30132), 1, true));
    let backend = endpoints6(&init.packet).1;
    assert!(backends().contains(&backend));
    assert!(sctp_crc(&init.packet).1, "CRC32c after DNAT");
    let reply = programs.run(false, &sctp6(backend, client, 2, true));
    assert_eq!(endpoints6(&reply.packet), (at(NODE, 30132), client));
    assert!(sctp_crc(&reply.packet).1, "CRC32c after reverse NAT");
    // Not a Service: untouched.
    let ssh = tcp6(client, at(NODE, 22), SYN);
    let out = programs.run(true, &ssh);
    assert_eq!((out.verdict, out.mark, out.packet), (PASS, 0, ssh));
}

#[test]
fn ipv6_source_ranges_and_local_policy_verdicts() {
    let programs = loaded("verdict6");
    let inside = programs.run(true, &tcp6(client(0xdb8, 41000), at(LB_IP, 80), SYN));
    assert_eq!(inside.verdict, PASS);
    assert!(backends().contains(&endpoints6(&inside.packet).1));
    let outside = programs.run(true, &tcp6(client(0xdb9, 41000), at(LB_IP, 80), SYN));
    assert_eq!(
        outside.verdict, DROP,
        "a source outside the ranges is dropped"
    );
    let local = programs.run(true, &tcp6(client(0xdb8, 41001), at(NODE, 30081), SYN));
    assert_eq!(
        local.verdict, DROP,
        "eTP=Local without a local endpoint drops"
    );
}
