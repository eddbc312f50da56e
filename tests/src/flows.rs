//! The packet-flow table (`tests/flows/cases.txt`) and its fixture: parsed here once so
//! the model test and every dataplane's kernel test run the same cases.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use proxy_agent::{
    model::{flow::Packet, NodeInfo, Protocol, Snapshot},
    source::manifests::ManifestsDir,
};

/// One row: on `node`, `packet` must get `expected` (the oracle's `Outcome` text).
#[derive(Clone, Debug)]
pub struct Case {
    pub line: usize,
    pub node: String,
    pub packet: Packet,
    pub expected: String,
}

#[must_use]
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("flows")
}

/// The fixture cluster's snapshot.
#[must_use]
pub fn snapshot() -> Snapshot {
    let mut manifests = ManifestsDir::new(&dir().join("cluster"));
    manifests.reload().expect("flow fixture");
    manifests.snapshot()
}

/// A node of the fixture as the agent would see it with
/// `--cluster-cidr 10.244.0.0/16,fd00:10:244::/56`.
#[must_use]
pub fn node(snapshot: &Snapshot, name: &str) -> NodeInfo {
    NodeInfo {
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:10:244::/56".parse().expect("cidr"),
        ],
        ..NodeInfo::named(name)
    }
    .with_node_object(snapshot)
}

/// Every case of the table, in order.
#[must_use]
pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(dir().join("cases.txt")).expect("cases.txt");
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| parse(i + 1, l))
        .collect()
}

fn parse(line: usize, text: &str) -> Case {
    let (input, expected) = text
        .split_once("->")
        .unwrap_or_else(|| panic!("line {line}: no ->"));
    let fields: Vec<&str> = input.split_whitespace().collect();
    let [node, source, protocol, destination] = fields[..] else {
        panic!("line {line}: want `node source protocol destination:port`");
    };
    let destination: SocketAddr = destination
        .parse()
        .unwrap_or_else(|e| panic!("line {line}: {e}"));
    Case {
        line,
        node: node.to_owned(),
        packet: Packet {
            source: source
                .parse::<IpAddr>()
                .unwrap_or_else(|e| panic!("line {line}: {e}")),
            protocol: Protocol::from_k8s(Some(protocol))
                .unwrap_or_else(|| panic!("line {line}: protocol")),
            destination: destination.ip(),
            port: destination.port(),
            interface: None,
        },
        expected: expected.trim().to_owned(),
    }
}

/// Node name → its `NodeInfo`, for every node the cases use.
#[must_use]
pub fn nodes(snapshot: &Snapshot, cases: &[Case]) -> BTreeMap<String, NodeInfo> {
    cases
        .iter()
        .map(|c| (c.node.clone(), node(snapshot, &c.node)))
        .collect()
}
