//! Bounded fuzzing of every parser that takes outside input: manifests (YAML), API
//! objects (JSON), DNS queries (the hot path and the full one) and netlink replies
//! (rtnetlink addresses, `sock_diag`, conntrack). Seeded mutations of valid inputs, so a
//! failure replays; what a parser accepts goes on through the model and the DNS zone.
//! Nothing may panic, and every query that deserves an answer gets one with its id.
use std::{net::SocketAddr, path::Path, sync::Arc};

use netlink_packet_core::Emitable;
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Tuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_sock_diag::SockDiagMessage;
use proxy_agent::{
    dataplane::conntrack,
    dns::{
        metrics::DnsMetrics,
        resolver::{Outcome, Resolver, Upstreams, Via},
        wire,
        zone::Zone,
    },
    model::{self, NodeInfo, Snapshot},
    netlink, sockdiag,
    source::{
        self, addresses,
        kube::checked,
        parse::{parse_file, Kind, Object},
        wire::WireObject,
    },
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Byte-level mutations of a seed, a few at a time, with tokens of the format spliced in.
struct Mutator {
    rng: StdRng,
    tokens: &'static [&'static [u8]],
}

impl Mutator {
    fn new(seed: u64, tokens: &'static [&'static [u8]]) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            tokens,
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.random_range(0..items.len())]
    }

    /// One to three [`mutate_tree`] steps on a parsed seed.
    fn mutate_tree(&mut self, tree: &mut serde_json::Value) {
        for _ in 0..self.rng.random_range(1..=3) {
            mutate_tree(&mut self.rng, tree);
        }
    }

    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'-', b':', b'\n', b' ', b'"'];
        let mut out = seed.to_vec();
        for _ in 0..self.rng.random_range(1..=4) {
            let len = out.len();
            let at = self.rng.random_range(0..=len);
            let end = (at + self.rng.random_range(0..=16)).min(len);
            match self.rng.random_range(0..8) {
                0 if at < len => out[at] ^= 1 << self.rng.random_range(0..8),
                1 if at < len => out[at] = *self.pick(&INTERESTING),
                2 => {
                    out.drain(at..end);
                }
                3 => {
                    let copy = out[at..end].to_vec();
                    let to = self.rng.random_range(0..=out.len());
                    out.splice(to..to, copy);
                }
                4 => out.truncate(at),
                5 if !self.tokens.is_empty() => {
                    let token = *self.pick(self.tokens);
                    out.splice(at..at, token.iter().copied());
                }
                6 => {
                    let noise: Vec<u8> = (at..end).map(|_| self.rng.random()).collect();
                    out.splice(at..end, noise);
                }
                _ if len >= 2 => {
                    let other = self.rng.random_range(0..len);
                    out.swap(at.min(len - 1), other);
                }
                _ => {}
            }
        }
        out
    }
}

/// Structure-aware mutations of a JSON tree: a node somewhere replaced by a value of
/// another type or an extreme one, a key removed, an array element doubled.
fn mutate_tree(rng: &mut StdRng, value: &mut serde_json::Value) {
    use serde_json::{json, Value};
    let mut node = value;
    loop {
        let children = match node {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        if children == 0 || rng.random_bool(0.3) {
            break;
        }
        let pick = rng.random_range(0..children);
        node = match node {
            Value::Object(map) => map.values_mut().nth(pick).expect("child"),
            Value::Array(items) => &mut items[pick],
            _ => unreachable!(),
        };
    }
    let replacements = [
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(65536),
        json!(u64::MAX),
        json!(1.5),
        json!(""),
        json!("None"),
        json!("::1"),
        json!("10.96.0.300"),
        json!("x".repeat(300)),
        json!([]),
        json!({}),
        json!([{"name": "", "port": 0}]),
    ];
    match node {
        Value::Object(map) if !map.is_empty() && rng.random_bool(0.3) => {
            let key = map.keys().nth(rng.random_range(0..map.len())).cloned();
            map.remove(&key.expect("key"));
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.3) => {
            let item = items[rng.random_range(0..items.len())].clone();
            items.push(item);
        }
        _ => *node = replacements[rng.random_range(0..replacements.len())].clone(),
    }
}

fn fixture_texts() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("flows/cluster");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("fixture file"))
        .collect()
}

/// Each YAML document of the fixture cluster on its own.
fn fixture_documents() -> Vec<String> {
    fixture_texts()
        .iter()
        .flat_map(|text| {
            text.split("\n---")
                .map(|d| d.trim_start_matches('\n').to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|d| d.contains("kind:"))
        .collect()
}

fn fixture_snapshot() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for text in fixture_texts() {
        for object in parse_file(&text)
            .expect("fixture parses")
            .into_iter()
            .flatten()
        {
            put(&mut snapshot, object);
        }
    }
    snapshot
}

fn put(snapshot: &mut Snapshot, object: Object) {
    let (kind, key) = object.id();
    source::store(snapshot, kind, &key, Some(object));
}

fn node() -> NodeInfo {
    NodeInfo {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..NodeInfo::named("node1")
    }
}

/// A mutated object replaces its original in the cluster, which the model and the DNS
/// zone then take in whole.
fn consume(base: &Snapshot, objects: Vec<Object>) {
    let mut snapshot = base.clone();
    for object in objects {
        put(&mut snapshot, object);
    }
    let state = model::build(&snapshot, &node());
    let _ = model::diff(&model::DesiredState::default(), &state);
    let _ = Zone::build(&snapshot, "cluster.local", 30);
}

const YAML_TOKENS: &[&[u8]] = &[
    b"- ",
    b": ",
    b"null",
    b"~",
    b"[]",
    b"{}",
    b"-1",
    b"99999999999",
    b"\"\"",
    b"port: 0",
    b"protocol: SCTP",
    b"IPv6",
    b"::1",
    b"0.0.0.0",
    b"clusterIP: None",
    b"type: LoadBalancer",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"<<: *a",
    b"\n  ",
    b"\n- ",
    b"65536",
    b"ipFamilyPolicy: ",
];

#[test]
fn mutated_manifests_are_rejected_by_name_never_a_panic() {
    let documents = fixture_documents();
    assert!(documents.len() >= 20, "{} documents", documents.len());
    let base = fixture_snapshot();
    let mut mutator = Mutator::new(1, YAML_TOKENS);
    let (mut inputs, mut accepted, mut rejected, mut unreadable) = (0, 0, 0, 0);
    for round in 0..40_000 {
        let seed = &documents[round % documents.len()];
        let text = if round % 2 == 0 {
            let bytes = mutator.mutate(seed.as_bytes());
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            let mut tree: serde_json::Value = serde_yaml::from_str(seed).expect("yaml");
            mutator.mutate_tree(&mut tree);
            serde_yaml::to_string(&tree).expect("yaml out")
        };
        inputs += 1;
        match parse_file(&text) {
            Ok(results) => {
                let mut objects = Vec::new();
                for result in results {
                    match result {
                        Ok(object) => objects.push(object),
                        Err(rejection) => {
                            assert!(!rejection.error.to_string().is_empty());
                            rejected += 1;
                        }
                    }
                }
                accepted += objects.len();
                if !objects.is_empty() && round % 8 == 0 {
                    consume(&base, objects);
                }
            }
            Err(error) => {
                assert!(!error.to_string().is_empty());
                unreadable += 1;
            }
        }
    }
    println!(
        "manifests: {inputs} inputs, no panic: {accepted} objects accepted, {rejected} rejected by name, {unreadable} files unreadable"
    );
    assert!(accepted > 2000 && rejected > 2000 && unreadable > 2000);
}

const JSON_TOKENS: &[&[u8]] = &[
    b"null",
    b"[]",
    b"{}",
    b"-1",
    b"1e999",
    b"\"\"",
    b"true",
    b"65536",
    b"\"::1\"",
    b"\"None\"",
    b",",
    b":",
    b"\"ports\":[]",
    b"\"endpoints\":null",
];

#[test]
fn mutated_api_objects_are_rejected_by_name_never_a_panic() {
    let base = fixture_snapshot();
    let mut seeds: Vec<(Kind, Vec<u8>)> = Vec::new();
    for document in fixture_documents() {
        let value: serde_json::Value = serde_yaml::from_str(&document).expect("yaml");
        let kind = match value["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            _ => continue,
        };
        seeds.push((kind, serde_json::to_vec(&value).expect("json")));
    }
    let mut mutator = Mutator::new(2, JSON_TOKENS);
    let (mut inputs, mut accepted, mut rejected, mut undecodable) = (0, 0, 0, 0);
    for round in 0..100_000 {
        let (kind, seed) = &seeds[round % seeds.len()];
        let bytes = if round % 4 == 0 {
            mutator.mutate(seed)
        } else {
            let mut tree: serde_json::Value = serde_json::from_slice(seed).expect("json");
            mutator.mutate_tree(&mut tree);
            serde_json::to_vec(&tree).expect("json out")
        };
        inputs += 1;
        let Ok(object) = serde_json::from_slice::<WireObject>(&bytes) else {
            undecodable += 1;
            continue;
        };
        match checked(*kind, object) {
            Ok(object) => {
                accepted += 1;
                if round % 16 == 0 {
                    consume(&base, vec![object]);
                }
            }
            Err(error) => {
                assert!(!error.is_empty());
                rejected += 1;
            }
        }
    }
    println!(
        "API objects: {inputs} inputs, no panic: {accepted} accepted, {rejected} rejected by name, {undecodable} undecodable"
    );
    assert!(accepted > 20_000 && rejected > 5000);
}

/// A query for `name` of `rtype`, with an EDNS OPT record when `edns`.
fn query(id: u16, name: &str, rtype: u16, edns: bool) -> Vec<u8> {
    let mut packet = id.to_be_bytes().to_vec();
    packet.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        packet.push(u8::try_from(label.len()).unwrap());
        packet.extend(label.as_bytes());
    }
    packet.push(0);
    packet.extend(rtype.to_be_bytes());
    packet.extend([0, 1]);
    if edns {
        packet.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    packet
}

#[test]
fn mutated_dns_queries_are_answered_with_their_id_never_a_panic() {
    let zone = Arc::new(Zone::build(&fixture_snapshot(), "cluster.local", 30));
    let (_keep, zone_rx) = tokio::sync::watch::channel(Some(zone));
    let mut registry = prometheus_client::registry::Registry::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let resolver = Resolver::new(
        zone_rx,
        Upstreams {
            cluster: Vec::new(),
            forward: Vec::new(),
        },
        DnsMetrics::register(&mut registry),
        runtime.handle().clone(),
    );
    let names = [
        "echo.default.svc.cluster.local",
        "default.svc.cluster.local",
        "_http._tcp.echo.default.svc.cluster.local",
        "50.0.96.10.in-addr.arpa",
        "nothing.default.svc.cluster.local",
        "cluster.local",
    ];
    let mut seeds = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for rtype in [1u16, 28, 33, 12, 255, 6] {
            seeds.push(query(
                u16::try_from(i).unwrap(),
                name,
                rtype,
                rtype % 2 == 0,
            ));
        }
    }
    let tokens: &'static [&'static [u8]] = &[b"\xc0\x0c", b"\x3f", b"\x00\x29", b"\xc0"];
    let mut mutator = Mutator::new(3, tokens);
    let client: SocketAddr = "10.244.1.10:40000".parse().unwrap();
    let (mut inputs, mut hot, mut answered, mut upstream, mut silent) = (0, 0, 0, 0, 0);
    for round in 0..300_000 {
        let packet = if round % 10 == 0 {
            (0..mutator.rng.random_range(0..64))
                .map(|_| mutator.rng.random())
                .collect()
        } else {
            let seed = &seeds[round % seeds.len()];
            mutator.mutate(seed)
        };
        inputs += 1;
        if wire::parse(&packet).is_some() {
            hot += 1;
        }
        let via = if round % 3 == 0 { Via::Tcp } else { Via::Udp };
        match resolver.try_now(&packet, via, client) {
            Outcome::Reply(Some(reply)) => {
                assert_eq!(reply.get(..2), packet.get(..2), "reply id: {packet:?}");
                answered += 1;
            }
            Outcome::Reply(None) => {
                // Only what is too short to carry an id, or a response, goes unanswered.
                assert!(
                    packet.len() < 12 || packet[2] & 0x80 != 0,
                    "unanswered: {packet:?}"
                );
                silent += 1;
            }
            Outcome::Later(_) => upstream += 1,
        }
    }
    println!(
        "DNS: {inputs} inputs, no panic: {hot} took the hot path, {answered} answered at once, {upstream} left for an upstream, {silent} silent"
    );
    assert!(hot > 10_000 && answered > 10_000 && silent > 1000);
}

/// One netlink message of type `kind` (request 1 of port 0) around `body`.
fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).unwrap();
    let mut out = len.to_ne_bytes().to_vec();
    out.extend(kind.to_ne_bytes());
    out.extend(2u16.to_ne_bytes());
    out.extend(1u32.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend(body);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

fn emitted(message: &impl Emitable) -> Vec<u8> {
    let mut out = vec![0; message.buffer_len()];
    message.emit(&mut out);
    out
}

/// A dump reply as the kernel sends one: a conntrack entry of each family.
fn conntrack_seed() -> Vec<u8> {
    let tuple = |src: &str, dst: &str, sport: u16, dport: u16| {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    };
    let entry = |family, client: &str, service: &str, pod: &str| {
        emitted(&NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(tuple(client, service, 40000, 80)),
                ConntrackAttribute::CtaTupleReply(tuple(pod, client, 8080, 40000)),
                ConntrackAttribute::CtaTimeout(120),
                ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                    3,
                )])]),
            ]),
        ))
    };
    [
        message(
            1 << 8,
            &entry(
                NetfilterProtoFamily::IPv4,
                "10.244.1.10",
                "10.96.0.50",
                "10.244.2.2",
            ),
        ),
        message(
            1 << 8,
            &entry(
                NetfilterProtoFamily::IPv6,
                "fd00::1:a",
                "fd00::50",
                "fd00::2:2",
            ),
        ),
        message(3, &[0u8; 4]),
    ]
    .concat()
}

/// An address dump reply: one point-to-point address, one link, DONE.
fn route_seed() -> Vec<u8> {
    let mut address = AddressMessage::default();
    address.header.family = AddressFamily::Inet;
    address.header.prefix_len = 32;
    address.header.index = 2;
    address.attributes = vec![
        AddressAttribute::Address("10.100.0.2".parse().unwrap()),
        AddressAttribute::Local("10.100.0.1".parse().unwrap()),
    ];
    let mut link = LinkMessage::default();
    link.header.index = 2;
    link.attributes = vec![LinkAttribute::IfName("eth0".into())];
    [
        message(20, &emitted(&address)),
        message(16, &emitted(&link)),
        message(3, &[0u8; 4]),
    ]
    .concat()
}

/// A `sock_diag` dump reply: one connected UDP socket, DONE.
fn diag_seed() -> Vec<u8> {
    let mut diag = vec![2u8, 1, 0, 0];
    diag.extend(40000u16.to_be_bytes());
    diag.extend(80u16.to_be_bytes());
    diag.extend([10, 244, 1, 10]);
    diag.extend([0u8; 12]);
    diag.extend([10, 96, 0, 50]);
    diag.extend([0u8; 12]);
    diag.extend([0u8; 12]);
    diag.extend([0u8; 20]);
    [message(20, &diag), message(3, &[0u8; 4])].concat()
}

#[test]
fn mutated_netlink_replies_are_errors_never_a_panic() {
    let (route, diag, entry) = (route_seed(), diag_seed(), conntrack_seed());
    let addresses_in = |bytes: &[u8]| {
        netlink::read_reply::<RouteNetlinkMessage>(bytes, 1, 0).map(|messages| {
            messages
                .iter()
                .filter(|m| match m {
                    RouteNetlinkMessage::NewAddress(a) => addresses::address_of(a).is_some(),
                    _ => false,
                })
                .count()
        })
    };
    let sockets_in = |bytes: &[u8]| {
        netlink::read_reply::<SockDiagMessage>(bytes, 1, 0)
            .map(|messages| messages.iter().filter_map(sockdiag::socket_of).count())
    };
    let entries_in = |bytes: &[u8]| {
        netlink::read_reply::<NetfilterMessage>(bytes, 1, 0)
            .map(|messages| messages.iter().filter_map(conntrack::entry_of).count())
    };
    assert_eq!(addresses_in(&route).unwrap(), 1, "address seed");
    assert_eq!(sockets_in(&diag).unwrap(), 1, "socket seed");
    assert_eq!(entries_in(&entry).unwrap(), 2, "conntrack seed");
    let mut mutator = Mutator::new(4, &[]);
    let (mut inputs, mut parsed) = (0, 0);
    for round in 0..300_000 {
        let seed: &[u8] = match round % 3 {
            0 => &route,
            1 => &diag,
            _ => &entry,
        };
        let bytes = mutator.mutate(seed);
        inputs += 1;
        parsed += addresses_in(&bytes).unwrap_or(0)
            + sockets_in(&bytes).unwrap_or(0)
            + entries_in(&bytes).unwrap_or(0);
    }
    println!("netlink: {inputs} inputs, no panic: {parsed} addresses, sockets and conntrack entries read");
    assert!(parsed > 10_000);
}
