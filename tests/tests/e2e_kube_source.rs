//! End to end through the Kubernetes API source: the real agent on node1 watches the
//! fake API server (served from the LAN namespace), and real packets follow its changes.
use std::time::{Duration, Instant};

use proxy_agent_tests::{
    agent::Agent,
    api_echo::{answered, serve, slice as echo_slice, Served},
    fake_api::ENDPOINT_SLICES,
    scenarios,
};

#[test]
fn the_agent_follows_the_api_server() {
    let mut cluster = scenarios::echo_cluster("kube");
    let Served {
        api,
        kubeconfig,
        runtime,
    } = serve(&cluster, "kubeconfig");
    let agent = Agent::start_with(
        &mut cluster,
        "node1",
        &["--kubeconfig".into(), kubeconfig.display().to_string()],
    );
    assert_eq!(
        answered(&cluster),
        ["web-a", "web-b"],
        "{}",
        agent.log_text()
    );
    // An EndpointSlice change on the API server reaches new connections within a second.
    api.upsert(ENDPOINT_SLICES, echo_slice(&["10.244.2.3"]));
    let started = Instant::now();
    while answered(&cluster) != ["web-c"] {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "change not live after 1 s:\n{}",
            agent.log_text()
        );
    }
    println!("API change live after {:?}", started.elapsed());
    // A dropped watch with compacted history forces a relist; the state still converges.
    api.hold_watches();
    api.disconnect_watches();
    api.upsert(ENDPOINT_SLICES, echo_slice(&["10.244.1.2"]));
    api.compact();
    api.release_watches();
    let started = Instant::now();
    while answered(&cluster) != ["web-a"] {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no convergence after relist:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(api.counters().gone >= 1, "{:?}", api.counters());
    drop(runtime);
}
