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
    rr::{DNSClass, Record, RecordType},
};
use tokio::sync::{oneshot, watch};
use tracing::debug;

use super::{
    cache::{Answer, Cache, Hit, Key},
    metrics::{DnsMetrics, RcodeLabel, RequestLabels, TypeLabel},
    upstream::{self, Transport},
    wire::{self, QueryView, WireCache},
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
    wire: WireCache,
    metrics: DnsMetrics,
    /// Where upstream queries run: the hot path that starts them (a prefetch) may be on
    /// a thread outside any runtime.
    runtime: tokio::runtime::Handle,
}

/// Where a query stands after the synchronous part.
pub enum Outcome {
    Reply(Option<Vec<u8>>),
    Later(Box<Pending>),
}

/// A query waiting for an upstream.
pub struct Pending {
    forward: Forward,
    limit: usize,
}

struct Forward {
    response: Message,
    query: Query,
    servers: Vec<SocketAddr>,
    transport: Transport,
    key: Key,
    stale: Option<Answer>,
}

enum Step {
    Done(Message, Origin),
    Forward(Box<Forward>),
}

/// Where a finished answer came from: the zone and fresh cache entries may be reused
/// by the hot path (`wire.rs`); errors and refusals are not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Zone,
    /// A fresh cache entry, counted as this kind of hit; `external` when the name is
    /// outside the cluster domain and not a reverse name, so no zone can ever answer
    /// it and its reused bytes outlive zone changes.
    Cache {
        kind: &'static str,
        external: bool,
    },
    Other,
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
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            zone,
            upstreams,
            cache: Cache::new(CACHE_SIZE),
            inflight: Mutex::new(HashMap::new()),
            wire: WireCache::default(),
            metrics,
            runtime,
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
        match self.try_now(packet, via, client) {
            Outcome::Reply(reply) => reply,
            Outcome::Later(pending) => self.finish(pending).await,
        }
    }

    /// Everything that needs no upstream (bad packets, the zone, fresh cache entries) is
    /// answered here without waiting; the rest comes back as `Later`.
    pub fn try_now(self: &Arc<Self>, packet: &[u8], via: Via, client: SocketAddr) -> Outcome {
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            self.metrics.dropped.inc();
            return Outcome::Reply(None);
        }
        let now = Instant::now();
        let zone = self.zone_id();
        let view = wire::parse(packet);
        if let Some(view) = &view {
            if let Some(reuse) = self.wire.answer(view, zone, now) {
                if via == Via::Tcp || reuse.bytes.len() <= view.udp_limit {
                    self.count_reuse(view, reuse.cache_hit, &reuse.bytes, via, client);
                    return Outcome::Reply(Some(reuse.bytes));
                }
            }
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(error) => {
                debug!(%client, %error, "malformed DNS query");
                return Outcome::Reply(Some(self.counted(form_error(packet))));
            }
        };
        let qtype = request
            .queries()
            .first()
            .map_or("other", |q| q.query_type().into());
        self.count_request(via, client, qtype);
        let limit = match via {
            Via::Tcp => usize::from(u16::MAX),
            Via::Udp => usize::from(request.max_payload().max(512)),
        };
        match self.respond(&request) {
            Step::Done(response, origin) => {
                let bytes = self.encode(response, limit);
                if let (Some(view), Some(bytes), false) = (&view, &bytes, origin == Origin::Other) {
                    let truncated = bytes.get(2).is_some_and(|flags| flags & 0x02 != 0);
                    let rcode = bytes.get(3).map_or(0xF, |b| b & 0x0F);
                    if !truncated && matches!(rcode, 0 | 3) {
                        let (hit, zone) = match origin {
                            Origin::Cache { kind, external } => {
                                (Some(kind), if external { wire::ANY_ZONE } else { zone })
                            }
                            _ => (None, zone),
                        };
                        self.wire.store(view, bytes, zone, hit, now);
                    }
                }
                Outcome::Reply(bytes)
            }
            Step::Forward(forward) => Outcome::Later(Box::new(Pending {
                forward: *forward,
                limit,
            })),
        }
    }

    /// Finishes a query that needs an upstream.
    pub async fn finish(self: &Arc<Self>, pending: Box<Pending>) -> Option<Vec<u8>> {
        let Forward {
            mut response,
            query,
            servers,
            transport,
            key,
            stale,
        } = pending.forward;
        self.metrics.cache_misses.inc();
        let fresh = self
            .fetch(key, query, servers, transport)
            .await
            .ok()
            .flatten();
        let answer = if fresh.is_none() && stale.is_some() {
            self.metrics.cache_served_stale.inc();
            stale
        } else {
            fresh
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
        self.encode(response, pending.limit)
    }

    /// The wire form, truncated (TC) when larger than `limit`.
    fn encode(&self, mut response: Message, limit: usize) -> Option<Vec<u8>> {
        let mut bytes = response.to_vec().ok()?;
        if bytes.len() > limit {
            response = response.truncate();
            response.set_truncated(true);
            bytes = response.to_vec().ok()?;
        }
        self.count_response(response.response_code());
        Some(bytes)
    }

    /// The zone answers come from now, so reused answers of an older zone are never
    /// sent.
    fn zone_id(&self) -> u64 {
        self.zone.borrow().as_ref().map_or(0, |z| z.serial())
    }

    /// Metrics for an answer the hot path reused, as the full path would count them.
    fn count_reuse(
        &self,
        view: &QueryView<'_>,
        cache_hit: Option<&'static str>,
        bytes: &[u8],
        via: Via,
        client: SocketAddr,
    ) {
        self.count_request(via, client, RecordType::from(view.qtype).into());
        if let Some(kind) = cache_hit {
            self.count_cache_hit(kind);
        }
        self.count_response(ResponseCode::from_low(bytes.get(3).map_or(0, |b| b & 0x0F)));
    }

    /// `coredns_dns_requests_total` for one query of type `qtype`.
    fn count_request(&self, via: Via, client: SocketAddr, qtype: &'static str) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                proto: if via == Via::Udp { "udp" } else { "tcp" },
                family: if client.is_ipv4() { "1" } else { "2" },
                kind: TypeLabel { r#type: qtype },
            })
            .inc();
    }

    /// `coredns_dns_responses_total` for one answer sent.
    fn count_response(&self, rcode: ResponseCode) {
        self.metrics
            .responses
            .get_or_create(&RcodeLabel {
                rcode: rcode_name(rcode),
            })
            .inc();
    }

    /// `coredns_cache_hits_total` of `kind` (`success` or `denial`).
    fn count_cache_hit(&self, kind: &'static str) {
        self.metrics
            .cache_hits
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    /// Counts a packet dropped before it was read.
    pub fn dropped(&self) {
        self.metrics.dropped.inc();
    }

    fn counted(&self, bytes: Vec<u8>) -> Vec<u8> {
        self.count_response(ResponseCode::FormErr);
        bytes
    }

    fn respond(self: &Arc<Self>, request: &Message) -> Step {
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
            return Step::Done(response, Origin::Other);
        }
        let [query] = request.queries() else {
            response.set_response_code(ResponseCode::FormErr);
            return Step::Done(response, Origin::Other);
        };
        response.add_query(query.clone());
        let zone = self.zone.borrow().clone();
        let Some(zone) = zone.filter(|_| query.query_class() == DNSClass::IN) else {
            // Not loaded yet (or not the Internet class): refuse rather than guess.
            response.set_response_code(ResponseCode::Refused);
            return Step::Done(response, Origin::Other);
        };
        let (servers, transport, external) = match zone.lookup(query.name(), query.query_type()) {
            Lookup::Answer(data) => {
                response.set_authoritative(true);
                for rdata in data {
                    response.add_answer(Record::from_rdata(
                        query.name().clone(),
                        zone.ttl(),
                        rdata,
                    ));
                }
                return Step::Done(response, Origin::Zone);
            }
            Lookup::NoData => {
                response.set_authoritative(true).add_name_server(zone.soa());
                return Step::Done(response, Origin::Zone);
            }
            Lookup::NxDomain => {
                response
                    .set_authoritative(true)
                    .set_response_code(ResponseCode::NXDomain)
                    .add_name_server(zone.soa());
                return Step::Done(response, Origin::Zone);
            }
            Lookup::Cluster => {
                let servers = if self.upstreams.cluster.is_empty() {
                    zone.kube_dns().to_vec()
                } else {
                    self.upstreams.cluster.clone()
                };
                (servers, Transport::Tcp, false)
            }
            Lookup::External => (self.upstreams.forward.clone(), Transport::UdpThenTcp, true),
        };
        self.from_cache(response, query, servers, transport, external)
    }

    /// A forwarded name: a fresh cache entry now, else the upstream (keeping any stale
    /// entry for when it fails).
    fn from_cache(
        self: &Arc<Self>,
        mut response: Message,
        query: &Query,
        servers: Vec<SocketAddr>,
        transport: Transport,
        external: bool,
    ) -> Step {
        let key = (query.name().to_lowercase().to_ascii(), query.query_type());
        let stale = match self.cache.get(&key, Instant::now()) {
            Hit::Fresh { answer, prefetch } => {
                let kind = if answer.answers.is_empty() {
                    "denial"
                } else {
                    "success"
                };
                self.count_cache_hit(kind);
                if prefetch {
                    self.metrics.cache_prefetch.inc();
                    drop(self.fetch(key, query.clone(), servers, transport));
                }
                response
                    .set_response_code(answer.rcode)
                    .add_answers(answer.answers)
                    .add_name_servers(answer.authority);
                return Step::Done(response, Origin::Cache { kind, external });
            }
            Hit::Stale(answer) => Some(answer),
            Hit::Miss => None,
        };
        Step::Forward(Box::new(Forward {
            response,
            query: query.clone(),
            servers,
            transport,
            key,
            stale,
        }))
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
        self.runtime.spawn(async move {
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
                        .get_or_create(&TypeLabel { r#type: kind })
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
fn rcode_name(rcode: ResponseCode) -> &'static str {
    match u16::from(rcode) {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
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
