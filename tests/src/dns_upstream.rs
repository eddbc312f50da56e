//! An upstream DNS server the tests run themselves (UDP and TCP, in any namespace): it
//! answers a small fixed world, counts every question it receives by name and
//! transport, and can be told to go silent.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, SOA, TXT},
        Name, RData, Record, RecordType,
    },
};

use crate::cluster::within_netns;

/// The world it answers:
/// - `ttl<N>.example.org` A 192.0.2.1 with TTL N; any other `*.example.org` A with TTL 60;
/// - `nx*.example.org`: NXDOMAIN with an SOA whose minimum is 60;
/// - `slow*.example.org`: answered after 300 ms;
/// - `big.example.org` TXT: 2 000 bytes (more than fits 512);
/// - `*.pod.cluster.local` A 10.244.9.9; `*.in-addr.arpa` PTR-less NXDOMAIN;
/// - `garbage-{bytes,id,cut,flood}.*`: garbage instead of an answer (see
///   [`garbage_answer`]; `flood` keeps sending it).
pub struct Upstream {
    pub addr: SocketAddr,
    counts: Arc<Mutex<HashMap<(String, &'static str), usize>>>,
    silent: Arc<AtomicBool>,
}

impl Upstream {
    /// Starts it on `addr` inside `netns`.
    #[must_use]
    pub fn start(netns: &str, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("upstream addr");
        let (udp, tcp) = within_netns(netns, move || {
            (
                UdpSocket::bind(addr).expect("bind upstream udp"),
                TcpListener::bind(addr).expect("bind upstream tcp"),
            )
        });
        let upstream = Self {
            addr,
            counts: Arc::default(),
            silent: Arc::default(),
        };
        let (counts, silent) = (upstream.counts.clone(), upstream.silent.clone());
        thread::spawn(move || {
            let udp = Arc::new(udp);
            let mut buffer = [0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buffer) {
                let (packet, udp) = (buffer[..n].to_vec(), udp.clone());
                let (counts, silent) = (counts.clone(), silent.clone());
                thread::spawn(move || {
                    if let Some(answer) = answer(&packet, "udp", &counts, &silent) {
                        let flood = garbage(&packet).is_some_and(|kind| kind == "flood");
                        // `garbage-flood`: a datagram that is not the answer every
                        // 300 ms for 6 s.
                        for _ in 0..if flood { 20 } else { 1 } {
                            let _ = udp.send_to(&answer, peer);
                            if flood {
                                thread::sleep(Duration::from_millis(300));
                            }
                        }
                    }
                });
            }
        });
        let (counts, silent) = (upstream.counts.clone(), upstream.silent.clone());
        thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let (counts, silent) = (counts.clone(), silent.clone());
                thread::spawn(move || serve_tcp(stream, &counts, &silent));
            }
        });
        upstream
    }

    /// How many times `name` was asked over `transport` ("udp" or "tcp").
    #[must_use]
    pub fn count(&self, name: &str, transport: &str) -> usize {
        let counts = self.counts.lock().expect("counts");
        counts
            .iter()
            .filter(|((n, t), _)| n == name && *t == transport)
            .map(|(_, c)| *c)
            .sum()
    }

    /// Stops (or resumes) answering.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
}

fn serve_tcp(
    mut stream: std::net::TcpStream,
    counts: &Mutex<HashMap<(String, &'static str), usize>>,
    silent: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut packet).is_err() {
            return;
        }
        let Some(answer) = answer(&packet, "tcp", counts, silent) else {
            return;
        };
        let mut framed = u16::try_from(answer.len())
            .expect("short answer")
            .to_be_bytes()
            .to_vec();
        framed.extend(answer);
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The garbage a `garbage-<kind>.…` question gets, if it is one.
fn garbage(packet: &[u8]) -> Option<&'static str> {
    let request = Message::from_vec(packet).ok()?;
    let name = request.queries().first()?.name().to_lowercase().to_ascii();
    ["bytes", "id", "cut", "flood"]
        .into_iter()
        .find(|kind| name.starts_with(&format!("garbage-{kind}.")))
}

/// `bytes` (and `flood`): noise; `id`: the question echoed back under another id;
/// `cut`: a header promising an answer that is not there.
fn garbage_answer(kind: &str, id: u16, packet: &[u8]) -> Vec<u8> {
    match kind {
        "id" => {
            let mut reply = packet.to_vec();
            reply[..2].copy_from_slice(&id.wrapping_add(1).to_be_bytes());
            reply[2] |= 0x80;
            reply
        }
        "cut" => {
            let mut reply = packet[..12].to_vec();
            reply[2] |= 0x80;
            reply[7] = 1;
            reply
        }
        _ => (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11).to_le_bytes()[0])
            .collect(),
    }
}

fn answer(
    packet: &[u8],
    transport: &'static str,
    counts: &Mutex<HashMap<(String, &'static str), usize>>,
    silent: &AtomicBool,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let query = request.queries().first()?.clone();
    let name = query.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').to_owned();
    *counts
        .lock()
        .expect("counts")
        .entry((name.clone(), transport))
        .or_default() += 1;
    if silent.load(Ordering::SeqCst) {
        return None;
    }
    if let Some(kind) = garbage(packet) {
        return Some(garbage_answer(kind, request.id(), packet));
    }
    if name.starts_with("slow") {
        thread::sleep(Duration::from_millis(300));
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_recursion_available(true)
        .add_query(query.clone());
    let owner = query.name().clone();
    let zone = Name::from_ascii("example.org.").expect("name");
    if name.starts_with("nx") || name.ends_with("in-addr.arpa") {
        let soa = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 60);
        response
            .set_response_code(ResponseCode::NXDomain)
            .add_name_server(Record::from_rdata(zone, 60, RData::SOA(soa)));
    } else if name == "big.example.org" && query.query_type() == RecordType::TXT {
        let strings = (0..20)
            .map(|i| format!("{i:03}{}", "x".repeat(97)))
            .collect();
        response.add_answer(Record::from_rdata(owner, 60, RData::TXT(TXT::new(strings))));
    } else if query.query_type() == RecordType::A {
        let (ip, ttl) = if name.ends_with("pod.cluster.local") {
            (Ipv4Addr::new(10, 244, 9, 9), 60)
        } else {
            let ttl = name
                .strip_prefix("ttl")
                .and_then(|rest| rest.split('.').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(60);
            (Ipv4Addr::new(192, 0, 2, 1), ttl)
        };
        response.add_answer(Record::from_rdata(owner, ttl, RData::A(A(ip))));
    }
    response.to_vec().ok()
}
