//! A manifests file as the agent reads it from `--manifests`: parsed into objects or
//! rejected by name, and what is accepted goes through the model and the DNS zone.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_agent::{
    dns::zone::Zone,
    model::{self, NodeInfo, Snapshot},
    source::{self, parse::parse_file},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(results) = parse_file(&text) else {
        return;
    };
    let mut snapshot = Snapshot::default();
    for object in results.into_iter().flatten() {
        let (kind, key) = object.id();
        source::store(&mut snapshot, kind, &key, Some(object));
    }
    let node = NodeInfo {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        ..NodeInfo::named("node1")
    };
    let state = model::build(&snapshot, &node);
    let _ = model::diff(&model::DesiredState::default(), &state);
    let _ = Zone::build(&snapshot, "cluster.local", 30);
});
