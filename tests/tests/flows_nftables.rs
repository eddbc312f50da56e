//! The packet-flow table against the nftables ruleset on a real kernel: real
//! connections through the node under test, each outcome compared with the oracle.
use std::collections::BTreeSet;

use proxy_agent::{dataplane::nftables::ruleset, model};
use proxy_agent_tests::{
    cluster::sh_in,
    flowbed::{FlowBed, Tally},
    flows,
};

#[test]
fn the_nftables_ruleset_passes_the_packet_flow_table_on_a_real_kernel() {
    let cases = flows::cases();
    let snapshot = flows::snapshot();
    let mut tally = Tally::default();
    for node in ["node1", "node2"] {
        let bed = FlowBed::new(&format!("nf{}", &node[4..]), node, &cases);
        let info = flows::node(&snapshot, node);
        let desired = model::build(&snapshot, &info);
        let file = bed.cluster.scratch().join("rules.nft");
        std::fs::write(&file, ruleset::render(&desired, &info.local())).unwrap();
        sh_in(&bed.node_ns, &["nft", "-f", &file.display().to_string()]);
        bed.run_table(&cases, &mut tally, |_| None);
    }
    let skipped_lines: BTreeSet<&String> = tally.skipped.iter().collect();
    assert!(skipped_lines.len() <= 5, "too many cases skipped");
    tally.assert_passed(75);
}
