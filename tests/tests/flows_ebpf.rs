//! The packet-flow table against the eBPF dataplane on a real kernel: the real agent
//! programs the node, and every case whose client reaches the node over the wire
//! (outside clients, and pods as another node would route them) is observed with real
//! connections through its per-packet programs and compared with the oracle.
use proxy_agent_tests::{
    flowbed::{FlowBed, Tally},
    flows,
};

#[test]
fn the_ebpf_dataplane_passes_the_packet_flow_table_on_a_real_kernel() {
    let cases = flows::cases();
    let mut tally = Tally::default();
    for node in ["node1", "node2"] {
        let mut bed = FlowBed::new(&format!("eb{}", &node[4..]), node, &cases);
        bed.start_agent("ebpf");
        bed.run_table(&cases, &mut tally, |case| {
            bed.from_node(case).then_some(
                "the node's own connections take the socket LB, without NAT (e2e_socket_lb)",
            )
        });
    }
    tally.assert_passed(65);
}
