//! The packet-flow table against the nftables ruleset on a real kernel: real
//! connections through the node under test, each outcome compared with the oracle.
use std::collections::BTreeSet;

use proxy_agent::{dataplane::nftables::ruleset, model};
use proxy_agent_tests::{
    cluster::sh_in,
    flowbed::{expected_view, FlowBed},
    flows,
};

#[test]
fn the_nftables_ruleset_passes_the_packet_flow_table_on_a_real_kernel() {
    let cases = flows::cases();
    let snapshot = flows::snapshot();
    let (mut observed, mut skipped, mut failures) = (0, Vec::new(), Vec::new());
    for node in ["node1", "node2"] {
        let bed = FlowBed::new(&format!("nf{}", &node[4..]), node, &cases);
        let info = flows::node(&snapshot, node);
        let desired = model::build(&snapshot, &info);
        let file = bed.cluster.scratch().join("rules.nft");
        std::fs::write(&file, ruleset::render(&desired, &info.cluster_cidrs)).unwrap();
        sh_in(&bed.node_ns, &["nft", "-f", &file.display().to_string()]);
        for case in cases.iter().filter(|c| c.node == node) {
            if let Some(why) = bed.unobservable(case) {
                skipped.push(format!("cases.txt:{} ({why})", case.line));
                continue;
            }
            observed += 1;
            let seen = bed.observe(case);
            let (want_set, want_masq, want_verdict) = expected_view(&case.expected);
            let ok = if let Some(verdict) = want_verdict {
                seen == verdict
            } else {
                let (got_set, got_masq, _) = expected_view(&seen);
                // With affinity every probe sticks to one endpoint of the expected set.
                let set_ok = if case.expected.contains("affinity=") {
                    got_set.len() == 1 && got_set.is_subset(&want_set)
                } else {
                    got_set == want_set
                };
                set_ok && got_masq == want_masq && !seen.contains("mixed")
            };
            if !ok {
                failures.push(format!(
                    "cases.txt:{} {:?}\n  want {}\n  saw  {seen}",
                    case.line, case.packet, case.expected
                ));
            }
        }
    }
    println!(
        "{observed} cases observed on the kernel, {} skipped: {}",
        skipped.len(),
        skipped.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {observed} cases differ from the oracle:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let skipped_lines: BTreeSet<&String> = skipped.iter().collect();
    assert!(
        observed >= 75 && skipped_lines.len() <= 5,
        "too few cases observed"
    );
}
