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
