//! One query in, one answer out: the zone answers Service names itself; other names go
//! through the cache to the cluster DNS or the node's forwarders, identical concurrent
//! misses sharing one upstream query. Bad packets get FORMERR or nothing, never a panic.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Record},
};
use tokio::sync::{oneshot, watch};
use tracing::debug;

use super::{
    cache::{Answer, Cache, Hit, Key},
    metrics::{DnsMetrics, RcodeLabel, RequestLabels, TypeLabel},
    upstream::{self, Transport},
    zone::{Lookup, Zone},
};

/// The EDNS buffer size the agent advertises (the DNS flag day value).
pub const ADVERTISED_PAYLOAD: u16 = 1232;
/// Cache entries (CoreDNS's default capacity).
pub const CACHE_SIZE: usize = 9984;

/// Where forwarded names go.
#[derive(Clone, Debug, Default)]
pub struct Upstreams {
    /// `--dns-upstream`; empty means the ready endpoints of kube-system/kube-dns.
    pub cluster: Vec<SocketAddr>,
    /// `--dns-forward`, else the node's resolv.conf nameservers.
    pub forward: Vec<SocketAddr>,
}

type Waiters = Vec<oneshot::Sender<Option<Answer>>>;

pub struct Resolver {
    zone: watch::Receiver<Option<Arc<Zone>>>,
    upstreams: Upstreams,
    cache: Cache,
    inflight: Mutex<HashMap<Key, Waiters>>,
    metrics: DnsMetrics,
}

/// The transport a query came over: how large its answer may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Udp,
    Tcp,
}

impl Resolver {
    #[must_use]
    pub fn new(
        zone: watch::Receiver<Option<Arc<Zone>>>,
        upstreams: Upstreams,
        metrics: DnsMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            zone,
            upstreams,
            cache: Cache::new(CACHE_SIZE),
            inflight: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// The answer to one packet, or `None` when it deserves none (not a query, too short
    /// to carry an id).
    pub async fn handle(
        self: &Arc<Self>,
        packet: &[u8],
        via: Via,
        client: SocketAddr,
    ) -> Option<Vec<u8>> {
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            self.metrics.dropped.inc();
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(error) => {
                debug!(%client, %error, "malformed DNS query");
                return Some(self.counted(form_error(packet)));
            }
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                proto: if via == Via::Udp { "udp" } else { "tcp" },
                family: if client.is_ipv4() { "1" } else { "2" },
                kind: TypeLabel {
                    r#type: request
                        .queries()
                        .first()
                        .map_or_else(|| "other".into(), |q| q.query_type().to_string()),
                },
            })
            .inc();
        let mut response = self.respond(&request).await;
        let limit = match via {
            Via::Tcp => usize::from(u16::MAX),
            Via::Udp => usize::from(request.max_payload().max(512)),
        };
        let mut bytes = response.to_vec().ok()?;
        if bytes.len() > limit {
            response = response.truncate();
            response.set_truncated(true);
            bytes = response.to_vec().ok()?;
        }
        self.metrics
            .responses
            .get_or_create(&RcodeLabel {
                rcode: rcode_name(response.response_code()),
            })
            .inc();
        Some(bytes)
    }

    /// Counts a packet dropped before it was read.
    pub fn dropped(&self) {
        self.metrics.dropped.inc();
    }

    fn counted(&self, bytes: Vec<u8>) -> Vec<u8> {
        self.metrics
            .responses
            .get_or_create(&RcodeLabel {
                rcode: rcode_name(ResponseCode::FormErr),
            })
            .inc();
        bytes
    }

    async fn respond(self: &Arc<Self>, request: &Message) -> Message {
        let mut response = Message::new();
        response
            .set_id(request.id())
            .set_message_type(MessageType::Response)
            .set_op_code(request.op_code())
            .set_recursion_desired(request.recursion_desired())
            .set_recursion_available(true);
        if request.extensions().is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(ADVERTISED_PAYLOAD);
            response.set_edns(edns);
        }
        if request.op_code() != OpCode::Query {
            response.set_response_code(ResponseCode::NotImp);
            return response;
        }
        let [query] = request.queries() else {
            response.set_response_code(ResponseCode::FormErr);
            return response;
        };
        response.add_query(query.clone());
        let zone = self.zone.borrow().clone();
        let Some(zone) = zone.filter(|_| query.query_class() == DNSClass::IN) else {
            // Not loaded yet (or not the Internet class): refuse rather than guess.
            response.set_response_code(ResponseCode::Refused);
            return response;
        };
        let answer = match zone.lookup(query.name(), query.query_type()) {
            Lookup::Answer(data) => {
                response.set_authoritative(true);
                for rdata in data {
                    response.add_answer(Record::from_rdata(
                        query.name().clone(),
                        zone.ttl(),
                        rdata,
                    ));
                }
                return response;
            }
            Lookup::NoData => {
                response.set_authoritative(true).add_name_server(zone.soa());
                return response;
            }
            Lookup::NxDomain => {
                response
                    .set_authoritative(true)
                    .set_response_code(ResponseCode::NXDomain)
                    .add_name_server(zone.soa());
                return response;
            }
            Lookup::Cluster => {
                let servers = if self.upstreams.cluster.is_empty() {
                    zone.kube_dns().to_vec()
                } else {
                    self.upstreams.cluster.clone()
                };
                self.forward(query, servers, Transport::Tcp).await
            }
            Lookup::External => {
                self.forward(query, self.upstreams.forward.clone(), Transport::UdpThenTcp)
                    .await
            }
        };
        match answer {
            Some(answer) => {
                response
                    .set_response_code(answer.rcode)
                    .add_answers(answer.answers)
                    .add_name_servers(answer.authority);
            }
            None => {
                response.set_response_code(ResponseCode::ServFail);
            }
        }
        response
    }

    /// A forwarded name: from the cache, else upstream; stale only if upstream fails.
    async fn forward(
        self: &Arc<Self>,
        query: &Query,
        servers: Vec<SocketAddr>,
        transport: Transport,
    ) -> Option<Answer> {
        let key = (query.name().to_lowercase().to_ascii(), query.query_type());
        let stale = match self.cache.get(&key, Instant::now()) {
            Hit::Fresh { answer, prefetch } => {
                let kind = if answer.answers.is_empty() {
                    "denial"
                } else {
                    "success"
                };
                self.metrics
                    .cache_hits
                    .get_or_create(&TypeLabel {
                        r#type: kind.into(),
                    })
                    .inc();
                if prefetch {
                    self.metrics.cache_prefetch.inc();
                    drop(self.fetch(key, query.clone(), servers, transport));
                }
                return Some(answer);
            }
            Hit::Stale(answer) => Some(answer),
            Hit::Miss => None,
        };
        self.metrics.cache_misses.inc();
        let fresh = self
            .fetch(key, query.clone(), servers, transport)
            .await
            .ok()
            .flatten();
        if fresh.is_none() && stale.is_some() {
            self.metrics.cache_served_stale.inc();
            return stale;
        }
        fresh
    }

    /// Joins the upstream query for `key` in flight, or starts one on a task of its own
    /// (so a client that goes away cannot strand the others waiting on it).
    fn fetch(
        self: &Arc<Self>,
        key: Key,
        query: Query,
        servers: Vec<SocketAddr>,
        transport: Transport,
    ) -> oneshot::Receiver<Option<Answer>> {
        let (tx, rx) = oneshot::channel();
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(waiters) = inflight.get_mut(&key) {
            waiters.push(tx);
            return rx;
        }
        inflight.insert(key.clone(), vec![tx]);
        drop(inflight);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let answer = this.ask(&query, &servers, transport).await;
            if let Some(answer) = &answer {
                let inserted = this.cache.insert(&key, answer.clone(), Instant::now());
                if inserted.evicted {
                    this.metrics.cache_evictions.inc();
                }
                let (positive, negative) = this.cache.counts();
                for (kind, n) in [("success", positive), ("denial", negative)] {
                    this.metrics
                        .cache_entries
                        .get_or_create(&TypeLabel {
                            r#type: kind.into(),
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            let waiters = this
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key)
                .unwrap_or_default();
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        });
        rx
    }

    async fn ask(
        &self,
        query: &Query,
        servers: &[SocketAddr],
        transport: Transport,
    ) -> Option<Answer> {
        let mut request = Message::new();
        request
            .set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_PAYLOAD);
        request.set_edns(edns);
        self.metrics.forward_requests.inc();
        let started = Instant::now();
        let result = upstream::ask(servers, transport, &request).await;
        self.metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut answer) => Some(
                Answer {
                    rcode: answer.response_code(),
                    answers: answer.take_answers(),
                    authority: answer.take_name_servers(),
                }
                .capped(),
            ),
            Err(error) => {
                debug!(%error, name = %query.name(), "upstream query failed");
                None
            }
        }
    }
}

/// The rcode as CoreDNS labels it.
fn rcode_name(rcode: ResponseCode) -> String {
    match u16::from(rcode) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// FORMERR for a packet whose header could be read but not the rest.
fn form_error(packet: &[u8]) -> Vec<u8> {
    let opcode = packet[2] & 0x78;
    let rd = packet[2] & 0x01;
    let mut out = vec![packet[0], packet[1], 0x80 | opcode | rd, 0x80 | 1];
    out.extend([0u8; 8]);
    out
}
