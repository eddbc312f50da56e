//! A DNS query as a client sends it, over UDP and TCP, against a zone of the fixture
//! cluster: the hot path's parser, then the resolver, whose every answer carries the
//! query's id, and which stays silent only for what cannot carry one or is a response.
#![no_main]
use std::{net::SocketAddr, path::Path, sync::Arc, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use proxy_agent::{
    dns::{
        metrics::DnsMetrics,
        resolver::{Outcome, Resolver, Upstreams, Via},
        wire,
        zone::Zone,
    },
    model::Snapshot,
    source::{self, parse::parse_file},
};

struct Served {
    resolver: Arc<Resolver>,
    _runtime: tokio::runtime::Runtime,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let mut snapshot = Snapshot::default();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/flows/cluster");
        for entry in std::fs::read_dir(dir).expect("fixture cluster") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("file");
            for object in parse_file(&text).expect("fixture").into_iter().flatten() {
                let (kind, key) = object.id();
                source::store(&mut snapshot, kind, &key, Some(object));
            }
        }
        let zone = Arc::new(Zone::build(&snapshot, "cluster.local", 30));
        let (keep, zone_rx) = tokio::sync::watch::channel(Some(zone));
        std::mem::forget(keep);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut registry = prometheus_client::registry::Registry::default();
        let resolver = Resolver::new(
            zone_rx,
            Upstreams {
                cluster: Vec::new(),
                forward: Vec::new(),
            },
            DnsMetrics::register(&mut registry),
            runtime.handle().clone(),
        );
        Served {
            resolver,
            _runtime: runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse(data);
    let client: SocketAddr = "10.244.1.10:40000".parse().expect("address");
    for via in [Via::Udp, Via::Tcp] {
        match served().resolver.try_now(data, via, client) {
            Outcome::Reply(Some(reply)) => assert_eq!(reply.get(..2), data.get(..2), "reply id"),
            Outcome::Reply(None) => assert!(data.len() < 12 || data[2] & 0x80 != 0, "unanswered"),
            Outcome::Later(_) => {}
        }
    }
});
