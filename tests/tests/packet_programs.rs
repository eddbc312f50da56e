//! The per-packet programs as a table of packet in → verdict, packet out and mark, run
//! by the kernel through `BPF_PROG_TEST_RUN` on maps the agent's writer filled: DNAT and
//! reverse NAT with their checksums, each verdict, both client classes, and flows whose
//! backend leaves.
use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_agent::model::{
    DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol,
};
use proxy_agent_tests::progtest::{
    checksums_valid, endpoints, frontend, route, sctp, sctp_crc, tcp, udp, udp_checksum, Programs,
    DROP, PASS,
};
use proxy_common::{MARK_MASQ, MARK_REJECT};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 201);
const B1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080);
const B2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 8080);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// SCTP chunk types.
const DATA: u8 = 0;
const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const ABORT: u8 = 6;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn client(port: u16) -> SocketAddrV4 {
    at(Ipv4Addr::new(192, 0, 2, 10), port)
}

fn key(ip: Ipv4Addr, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: ip.into(),
        port,
        protocol,
    }
}

/// NodePorts with eTP Cluster (TCP and UDP) and Local (no endpoint on this node), one
/// without endpoints, and a load-balancer IP with source ranges; `backends` serve all.
fn services(backends: &[SocketAddrV4]) -> DesiredState {
    use EmptyVerdict::{Drop, Reject};
    use FrontendKind::{LoadBalancer, NodePort};
    let masqueraded = route(backends, true, Reject);
    let mut state = DesiredState::default();
    let mut add = |key: FrontendKey, frontend: Frontend| {
        state.frontends.insert(key, frontend.into());
    };
    add(
        key(NODE, 30080, Protocol::Tcp),
        frontend("np", NodePort, masqueraded.clone(), masqueraded.clone()),
    );
    add(
        key(NODE, 30053, Protocol::Udp),
        frontend("np-udp", NodePort, masqueraded.clone(), masqueraded.clone()),
    );
    add(
        key(NODE, 30132, Protocol::Sctp),
        frontend(
            "np-sctp",
            NodePort,
            masqueraded.clone(),
            masqueraded.clone(),
        ),
    );
    add(
        key(NODE, 30081, Protocol::Tcp),
        frontend(
            "np-local",
            NodePort,
            route(backends, false, Reject),
            route::<SocketAddrV4>(&[], false, Drop),
        ),
    );
    add(
        key(NODE, 30090, Protocol::Tcp),
        frontend(
            "noeps",
            NodePort,
            route::<SocketAddrV4>(&[], true, Reject),
            route::<SocketAddrV4>(&[], true, Reject),
        ),
    );
    let mut lb = frontend("lb", LoadBalancer, masqueraded.clone(), masqueraded);
    lb.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    add(key(LB_IP, 80, Protocol::Tcp), lb);
    state
}

fn loaded(tag: &str) -> Programs {
    let mut programs = Programs::load(tag);
    programs.program(&services(&[B1, B2]));
    programs.cluster_cidr(Ipv4Addr::new(10, 244, 0, 0), 16);
    programs
}

#[test]
fn nodeport_flows_are_translated_both_ways_with_valid_checksums() {
    let programs = loaded("nat");
    let frontend = at(NODE, 30080);
    let syn = tcp(client(40000), frontend, SYN);
    let first = programs.run(true, &syn);
    assert_eq!(first.verdict, PASS);
    let (src, backend) = endpoints(&first.packet);
    assert_eq!(
        src,
        client(40000),
        "the client address is kept (netfilter masquerades)"
    );
    assert!(
        backend == B1 || backend == B2,
        "DNAT to a backend, got {backend}"
    );
    assert!(checksums_valid(&first.packet), "checksums after DNAT");
    assert_eq!(first.mark, MARK_MASQ, "eTP=Cluster marks for masquerade");

    // The flow keeps its backend.
    for _ in 0..8 {
        let next = programs.run(true, &tcp(client(40000), frontend, ACK));
        assert_eq!(endpoints(&next.packet).1, backend);
    }
    // The backend's reply leaves from the frontend.
    let reply = programs.run(false, &tcp(backend, client(40000), SYN | ACK));
    assert_eq!(reply.verdict, PASS);
    assert_eq!(endpoints(&reply.packet), (frontend, client(40000)));
    assert!(
        checksums_valid(&reply.packet),
        "checksums after reverse NAT"
    );
    // Packets of no flow and to no Service pass untouched.
    let stranger = tcp(B1, client(40001), ACK);
    assert_eq!(programs.run(false, &stranger).packet, stranger);
    let ssh = tcp(client(40002), at(NODE, 22), SYN);
    let out = programs.run(true, &ssh);
    assert_eq!((out.verdict, out.mark, out.packet), (PASS, 0, ssh));
}

#[test]
fn udp_checksums_are_updated_and_an_absent_one_stays_absent() {
    let programs = loaded("udp");
    let frontend = at(NODE, 30053);
    let with = programs.run(true, &udp(client(5000), frontend, b"query", true));
    assert_eq!(with.verdict, PASS);
    assert!(checksums_valid(&with.packet) && udp_checksum(&with.packet) != 0);
    let backend = endpoints(&with.packet).1;
    assert!(backend == B1 || backend == B2);
    let without = programs.run(true, &udp(client(5001), frontend, b"query", false));
    assert_eq!(
        udp_checksum(&without.packet),
        0,
        "no checksum stays no checksum"
    );
    assert!(checksums_valid(&without.packet));
}

#[test]
fn sctp_nodeport_flows_are_translated_both_ways_with_a_valid_crc32c() {
    let programs = loaded("sctp");
    let frontend = at(NODE, 30132);
    let init = programs.run(true, &sctp(client(40000), frontend, INIT, true));
    assert_eq!((init.verdict, init.mark), (PASS, MARK_MASQ));
    let (src, backend) = endpoints(&init.packet);
    assert_eq!(src, client(40000));
    assert!(backend == B1 || backend == B2, "DNAT to {backend}");
    assert!(checksums_valid(&init.packet), "CRC32c after DNAT");
    // The association keeps its backend; the reply leaves from the frontend.
    for _ in 0..4 {
        let data = programs.run(true, &sctp(client(40000), frontend, DATA, true));
        assert_eq!(endpoints(&data.packet).1, backend);
        assert!(checksums_valid(&data.packet));
    }
    let reply = programs.run(false, &sctp(backend, client(40000), INIT_ACK, true));
    assert_eq!(endpoints(&reply.packet), (frontend, client(40000)));
    assert!(checksums_valid(&reply.packet), "CRC32c after reverse NAT");
    // A CRC left to offload (zero) is computed later over the rewritten packet: it
    // stays zero.
    let partial = programs.run(true, &sctp(client(40000), frontend, DATA, false));
    assert_eq!(endpoints(&partial.packet).1, backend);
    assert_eq!(sctp_crc(&partial.packet).0, 0);
    // ABORT closes the association: swept 10 s on, as a TCP flow after its FIN.
    let _ = programs.run(true, &sctp(client(40001), frontend, INIT, true));
    let _ = programs.run(true, &sctp(client(40001), frontend, ABORT, true));
    let now = proxy_agent::dataplane::system::monotonic_ns();
    assert_eq!(programs.sweep_flows(now + 30_000_000_000), 2);
}

#[test]
fn each_verdict_for_each_class_of_client() {
    let programs = loaded("verdicts");
    // eTP=Local without a local endpoint: external clients are dropped...
    let local = at(NODE, 30081);
    let out = programs.run(true, &tcp(client(41000), local, SYN));
    assert_eq!(out.verdict, DROP);
    // ...pods (inside --cluster-cidr) take the pod route: every endpoint, kept address.
    let pod = at(Ipv4Addr::new(10, 244, 2, 7), 5000);
    let out = programs.run(true, &tcp(pod, local, SYN));
    assert_eq!((out.verdict, out.mark), (PASS, 0));
    assert_eq!(endpoints(&out.packet).0, pod);
    assert_ne!(endpoints(&out.packet).1, local);
    // No endpoints at all: marked for netfilter's REJECT, untranslated.
    let none = tcp(client(41001), at(NODE, 30090), SYN);
    let out = programs.run(true, &none);
    assert_eq!(
        (out.verdict, out.mark, &out.packet),
        (PASS, MARK_REJECT, &none)
    );
    // loadBalancerSourceRanges: outside dropped, inside translated.
    let lb = at(LB_IP, 80);
    let outsider = at(Ipv4Addr::new(198, 51, 100, 1), 41002);
    assert_eq!(programs.run(true, &tcp(outsider, lb, SYN)).verdict, DROP);
    let out = programs.run(true, &tcp(client(41003), lb, SYN));
    assert_eq!(out.verdict, PASS);
    assert_ne!(endpoints(&out.packet).1, lb);
}

/// A source port of a new flow to `frontend` that lands on `backend`.
fn flow_on(
    programs: &Programs,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
    tcp_flow: bool,
    from: u16,
) -> u16 {
    (from..from + 200)
        .find(|&port| {
            let packet = if tcp_flow {
                tcp(client(port), frontend, SYN)
            } else {
                udp(client(port), frontend, b"x", true)
            };
            endpoints(&programs.run(true, &packet).packet).1 == backend
        })
        .expect("random choice never picked the backend in 200 flows")
}

#[test]
fn flows_of_a_backend_that_left_move_udp_keep_tcp_and_a_new_syn_is_balanced_afresh() {
    let mut programs = loaded("stale");
    let udp_port = flow_on(&programs, at(NODE, 30053), B1, false, 20000);
    let tcp_port = flow_on(&programs, at(NODE, 30080), B1, true, 30000);
    let reused_port = flow_on(&programs, at(NODE, 30080), B1, true, 31000);
    programs.program(&services(&[B2]));
    // The UDP flow's next datagram goes to the live backend, and stays there.
    for _ in 0..4 {
        let out = programs.run(true, &udp(client(udp_port), at(NODE, 30053), b"x", true));
        assert_eq!((out.verdict, endpoints(&out.packet).1), (PASS, B2));
    }
    // The TCP flow keeps its backend, as kube-proxy's conntrack keeps it: a terminating
    // pod drains its connections.
    let segment = tcp(client(tcp_port), at(NODE, 30080), ACK);
    let out = programs.run(true, &segment);
    assert_eq!((out.verdict, endpoints(&out.packet).1), (PASS, B1));
    assert_ne!(out.mark, MARK_REJECT);
    // A new connection's SYN on a finished flow's ports (a busy client reuses ports
    // before the sweep forgets the flow) is balanced afresh, not reset.
    let out = programs.run(true, &tcp(client(reused_port), at(NODE, 30080), SYN));
    assert_eq!((out.verdict, endpoints(&out.packet).1), (PASS, B2));
    assert_ne!(out.mark, MARK_REJECT);
}

/// Ten backends behind one NodePort, and the backend each of 2 000 flows gets.
fn maglev_choices(programs: &Programs) -> Vec<SocketAddrV4> {
    programs.forget_flows();
    (0..2000)
        .map(|i| {
            let packet = tcp(client(10_000 + i), at(NODE, 30080), SYN);
            endpoints(&programs.run(true, &packet).packet).1
        })
        .collect()
}

fn ten(skip: Option<u8>) -> Vec<SocketAddrV4> {
    (1..=10u8)
        .filter(|i| Some(*i) != skip)
        .map(|i| at(Ipv4Addr::new(10, 244, 3, i), 8080))
        .collect()
}

#[test]
fn maglev_sends_a_flow_to_the_same_backend_on_every_node_and_moves_few_flows() {
    let mut node1 = loaded("maglev1");
    let mut node2 = loaded("maglev2");
    node1.program(&services(&ten(None)));
    node2.program(&services(&ten(None)));
    let before = maglev_choices(&node1);
    assert_eq!(
        before,
        maglev_choices(&node2),
        "two nodes chose differently"
    );
    let used: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(used.len(), 10, "not every backend was used");

    // One backend of ten leaves: its flows move, the others' stay put.
    let removed = at(Ipv4Addr::new(10, 244, 3, 4), 8080);
    node1.program(&services(&ten(Some(4))));
    let after = maglev_choices(&node1);
    let survivors = before.iter().filter(|b| **b != removed).count();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != removed && b != a)
        .count();
    let fraction =
        f64::from(u32::try_from(moved).unwrap()) / f64::from(u32::try_from(survivors).unwrap());
    println!(
        "Maglev remap fraction after removing 1 of 10 backends: {moved}/{survivors} = {fraction:.4} of the other backends' flows moved; {} flows had to",
        before.len() - survivors
    );
    assert!(after.iter().all(|b| *b != removed));
    assert!(fraction < 0.02, "{fraction} of surviving flows moved");
}

#[test]
fn a_full_flow_map_evicts_old_flows_and_keeps_translating() {
    let programs = loaded("full");
    programs.fill_flows(proxy_common::MAX_CT);
    let full = programs.flow_count();
    assert!(
        full * 10 >= proxy_common::MAX_CT as usize * 9,
        "only {full} flows"
    );
    let frontend = at(NODE, 30080);
    let first = programs.run(true, &tcp(client(46000), frontend, SYN));
    let backend = endpoints(&first.packet).1;
    assert!(backend == B1 || backend == B2, "DNAT to {backend}");
    // The new flow was remembered (the LRU evicted old entries for it), both ways.
    for _ in 0..8 {
        let next = programs.run(true, &tcp(client(46000), frontend, ACK));
        assert_eq!(endpoints(&next.packet).1, backend);
    }
    let reply = programs.run(false, &tcp(backend, client(46000), SYN | ACK));
    assert_eq!(endpoints(&reply.packet), (frontend, client(46000)));
    assert!(programs.flow_count() <= proxy_common::MAX_CT as usize);
}

#[test]
fn garbage_collection_removes_closed_and_idle_flows_and_keeps_live_ones() {
    let programs = loaded("gc");
    let frontend = at(NODE, 30080);
    // A TCP flow that closed (FIN seen), a live TCP flow, and a UDP flow.
    let _ = programs.run(true, &tcp(client(45000), frontend, SYN));
    let _ = programs.run(true, &tcp(client(45000), frontend, 0x01 | ACK));
    let _ = programs.run(true, &tcp(client(45001), frontend, SYN));
    let _ = programs.run(true, &udp(client(45002), at(NODE, 30053), b"x", true));
    assert_eq!(programs.flow_count(), 6, "three flows, two entries each");
    let now = proxy_agent::dataplane::system::monotonic_ns();
    // Now: nothing has been idle long enough.
    assert_eq!(programs.sweep_flows(now), 0);
    // 30 s on: the closed flow is gone (10 s after its FIN), the others stay.
    assert_eq!(programs.sweep_flows(now + 30_000_000_000), 2);
    // 2 min on: the UDP flow is idle past 60 s; the open TCP flow stays for hours.
    assert_eq!(programs.sweep_flows(now + 120_000_000_000), 2);
    assert_eq!(programs.flow_count(), 2);
    // The survivor is still translated as before.
    let out = programs.run(true, &tcp(client(45001), frontend, ACK));
    assert_ne!(endpoints(&out.packet).1, frontend);
}

/// A UDP packet cut short of its ports passes untranslated, and says so in the kernel's
/// debug records when they are on (`-v`); with them off (the agent's default) the same
/// packet writes none.
#[test]
fn a_packet_cut_short_is_passed_and_said_only_with_kernel_records_on() {
    static OFF: u8 = 0;
    static DEBUG: u8 = 4;
    let mut short = udp(client(40000), at(NODE, 30053), b"x", true);
    // Ethernet and IPv4 headers, then two bytes of the UDP header.
    short.truncate(14 + 20 + 2);
    for (level, said) in [(&DEBUG, true), (&OFF, false)] {
        let mut programs = Programs::load_with(&format!("records{level}"), Some(level));
        programs.program(&services(&[B1, B2]));
        let outcome = programs.run(true, &short);
        assert_eq!(outcome.verdict, PASS, "level {level}");
        assert_eq!(outcome.packet, short, "level {level}: rewritten");
        let records = programs.kernel_records();
        let found = records
            .iter()
            .any(|r| r.contains("protocol 17 packet too short for its ports"));
        assert_eq!(found, said, "level {level}: {records:?}");
    }
}

/// New connections to a frontend whose slot or backend is gone (as a program sees it
/// when the agent rewrites the Service between its reads; a stalled CPU can hold a
/// program across a whole rewrite): `(translated, dropped)` of 2 000 SYNs from
/// `client`, none of them refused, each translated one sent to `survivor`.
fn syns_to_a_vanished_backend(
    programs: &Programs,
    from: Ipv4Addr,
    to: SocketAddrV4,
    survivor: SocketAddrV4,
) -> (u32, u32) {
    let (mut translated, mut dropped) = (0, 0);
    for port in 20000..22000 {
        let out = programs.run(true, &tcp(at(from, port), to, SYN));
        assert_ne!(out.mark, MARK_REJECT, "SYN from port {port} refused");
        if out.verdict == DROP {
            dropped += 1;
        } else {
            assert_eq!(endpoints(&out.packet).1, survivor, "SYN from port {port}");
            translated += 1;
        }
    }
    (translated, dropped)
}

/// A SYN that draws a vanished slot draws again from the frontend as it is now; one
/// that misses twice, or whose Maglev backend is gone from the table the frontend
/// still names, is dropped so the client sends it again. None is refused (a churn
/// soak saw one NodePort connection in 290 000 refused so).
#[test]
fn a_new_flow_to_a_vanished_slot_or_backend_draws_again_or_is_dropped_never_refused() {
    let mut programs = loaded("vanished");
    let cluster_ip = at(Ipv4Addr::new(10, 96, 0, 10), 80);
    let mut state = services(&[B1, B2]);
    state.frontends.insert(
        key(*cluster_ip.ip(), 80, Protocol::Tcp),
        frontend(
            "web",
            FrontendKind::ClusterIp,
            route(&[B1, B2], false, EmptyVerdict::Reject),
            route(&[B1, B2], false, EmptyVerdict::Reject),
        )
        .into(),
    );
    programs.program(&state);
    programs.delete_slot(cluster_ip, proxy_common::PROTO_TCP, 2);
    // The backend left in slot 1: one of the two, as the writer placed them.
    let pod = Ipv4Addr::new(10, 244, 5, 5);
    let survivor = (0..64)
        .map(|port| programs.run(true, &tcp(at(pod, 19000 + port), cluster_ip, SYN)))
        .find(|out| out.verdict != DROP)
        .map(|out| endpoints(&out.packet).1)
        .expect("a translated SYN");
    let (translated, dropped) = syns_to_a_vanished_backend(&programs, pod, cluster_ip, survivor);
    // Either slot first, slot 1 on the second draw: three in four get through (one in
    // two with no second draw).
    assert!(
        translated > 1400 && dropped > 300,
        "{translated} translated, {dropped} dropped of 2000"
    );
    programs.delete_backend(B2, proxy_common::PROTO_TCP);
    let outside = *client(0).ip();
    let (translated, dropped) = syns_to_a_vanished_backend(&programs, outside, at(NODE, 30080), B1);
    assert!(
        translated > 700 && dropped > 700,
        "Maglev: {translated} translated, {dropped} dropped of 2000"
    );
}

/// New connections while the agent shrinks and grows the Service under them: the
/// program may read the frontend's old backend count, and the writer delete the
/// surplus slot or backend before the program reads it. No connection is refused for
/// it (before, about one in 300 000 NodePort connections was, under a churn soak).
#[test]
fn a_new_flow_racing_a_rewrite_of_its_service_is_never_refused() {
    const B3: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 8080);
    const B4: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 3), 8080);
    let all = [B1, B2, B3, B4];
    let programs = loaded("race");
    let mut writer = programs.second_writer();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut translated, mut refused, mut dropped) = (0u32, 0u32, 0u32);
    let rewrites = std::thread::scope(|scope| {
        let churn = scope.spawn(|| {
            let (wide, narrow) = (services(&all), services(&[B3]));
            let mut rewrites = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer.program(&wide);
                writer.program(&narrow);
                rewrites += 2;
            }
            rewrites
        });
        let started = std::time::Instant::now();
        let mut i = 0u32;
        while started.elapsed() < std::time::Duration::from_secs(3) {
            let from = SocketAddrV4::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 2, 0)) + (i >> 14 & 0xff)),
                1024 + u16::try_from(i & 0x3fff).expect("port"),
            );
            let out = programs.run(true, &tcp(from, at(NODE, 30080), SYN));
            if out.mark == MARK_REJECT {
                refused += 1;
            } else if out.verdict == DROP {
                dropped += 1;
            } else if all.contains(&endpoints(&out.packet).1) {
                translated += 1;
            }
            i += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().expect("writer thread")
    });
    eprintln!(
        "{rewrites} rewrites; {translated} connections translated, {refused} refused, \
         {dropped} dropped (SYN sent again)"
    );
    assert!(rewrites > 1000, "only {rewrites} rewrites");
    assert_eq!(
        refused, 0,
        "{refused} of {translated} new connections refused"
    );
    assert!(
        dropped * 10_000 <= translated,
        "{dropped} of {translated} new connections dropped"
    );
}
