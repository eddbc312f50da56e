//! The packet-flow table against the model: the oracle every dataplane must match.
use std::collections::BTreeSet;

use proxy_agent::model::{self, flow};
use proxy_agent_tests::flows;

#[test]
fn the_model_passes_every_packet_flow_case() {
    let snapshot = flows::snapshot();
    let cases = flows::cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let nodes = flows::nodes(&snapshot, &cases);
    let states: Vec<_> = nodes
        .iter()
        .map(|(name, node)| (name.clone(), model::build(&snapshot, node)))
        .collect();
    let mut failures = Vec::new();
    for case in &cases {
        let node = &nodes[&case.node];
        let state = &states
            .iter()
            .find(|(n, _)| n == &case.node)
            .expect("state")
            .1;
        let decision = flow::decide(state, node, case.packet);
        let actual = decision.outcome.to_string();
        if actual != case.expected {
            failures.push(format!(
                "cases.txt:{}: {:?}\n  want {}\n  got  {actual} ({})",
                case.line, case.packet, case.expected, decision.reason
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let outcomes: BTreeSet<&str> = cases
        .iter()
        .map(|c| c.expected.split_whitespace().next().unwrap_or_default())
        .collect();
    assert!(outcomes.contains("PASS") && outcomes.contains("REJECT") && outcomes.contains("DROP"));
    println!("{} packet-flow cases pass", cases.len());
}

#[test]
fn trace_explains_every_packet_flow_case() {
    let snapshot = flows::snapshot();
    let cases = flows::cases();
    let nodes = flows::nodes(&snapshot, &cases);
    let mut explained = 0;
    for case in &cases {
        let node = &nodes[&case.node];
        let state = model::build(&snapshot, node);
        let trace = model::explain::trace(&snapshot, &state, node, case.packet);
        let text = trace.to_string();
        assert_eq!(
            trace.verdict, case.expected,
            "cases.txt:{}:\n{text}",
            case.line
        );
        assert!(
            !trace.reason.is_empty(),
            "cases.txt:{}: no reason\n{text}",
            case.line
        );
        for endpoint in &trace.endpoints {
            let why = endpoint.excluded_because.as_deref().unwrap_or("eligible");
            assert!(
                !why.starts_with("not in the endpoint set"),
                "cases.txt:{}: unexplained exclusion\n{text}",
                case.line
            );
        }
        if trace.frontend.is_some() {
            assert!(
                text.contains("endpoints\n") && text.contains("verdict"),
                "cases.txt:{}:\n{text}",
                case.line
            );
            explained += 1;
        }
    }
    println!("{explained} frontends explained over {} cases", cases.len());
}

#[test]
fn the_trace_command_prints_the_decision() {
    let out = std::process::Command::new(proxy_agent_tests::agent::agent_bin())
        .args([
            "trace",
            "--from",
            "203.0.113.5",
            "--to",
            "10.100.0.1:30008/tcp",
            "--node-name",
            "node1",
        ])
        .args(["--cluster-cidr", "10.244.0.0/16", "--json", "--manifests"])
        .arg(flows::dir().join("cluster"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["verdict"], "DROP");
    assert_eq!(json["service"], "default/np-remote:http");
    assert_eq!(
        json["endpoints"][0]["excluded_because"],
        "on node2, not node1, and externalTrafficPolicy is Local"
    );
    let text = std::process::Command::new(proxy_agent_tests::agent::agent_bin())
        .args([
            "trace",
            "--from",
            "10.244.1.50",
            "--to",
            "[fd00:10:96::20]:80",
            "--node-name",
            "node1",
            "--manifests",
        ])
        .arg(flows::dir().join("cluster"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("[fd00:10:244:2::21]:8080") && text.contains("eligible"),
        "{text}"
    );
}

#[test]
fn trace_names_the_topology_hint_that_decided() {
    let snapshot = flows::snapshot();
    let trace = |node: &str, to: &str| {
        let info = flows::node(&snapshot, node);
        let state = model::build(&snapshot, &info);
        let (ip, port) = to.rsplit_once(':').unwrap();
        let packet = flow::Packet {
            source: "10.244.1.50".parse().unwrap(),
            protocol: model::Protocol::Tcp,
            destination: ip.parse().unwrap(),
            port: port.parse().unwrap(),
            interface: None,
        };
        model::explain::trace(&snapshot, &state, &info, packet)
    };
    let same_node = trace("node1", "10.96.1.29:80");
    assert_eq!(
        same_node.topology.as_deref(),
        Some("PreferSameNode: endpoints hinted for node node1")
    );
    let excluded: Vec<_> = same_node
        .endpoints
        .iter()
        .filter_map(|e| e.excluded_because.clone())
        .collect();
    assert_eq!(
        excluded,
        ["hinted for node(s) node2, not node1 (PreferSameNode)"; 2]
    );
    // No endpoint is hinted for node1: zone hints decide, and the trace says why.
    let fallback = trace("node1", "10.96.1.30:80");
    assert_eq!(
        fallback.topology.as_deref(),
        Some("PreferSameZone: endpoints hinted for zone zone-a (node hints: none for node node1)")
    );
    // One ready endpoint lacks zone hints: every endpoint, said so.
    let missing = trace("node1", "10.96.1.16:80");
    assert_eq!(
        missing.topology.as_deref(),
        Some(
            "hints passed over: zone hints: 1 of 2 ready endpoints have none; using every endpoint"
        )
    );
    assert!(missing.to_string().contains("topology   hints passed over"));
}
