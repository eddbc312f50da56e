//! Faults of the Kubernetes API under live traffic: the API server gone for a minute,
//! then answering every watch with 410 Gone, then sending malformed objects, while a pod
//! keeps connecting to a Service. The node keeps serving what was programmed through
//! all of it, and the agent follows the next good change as before.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{testpod_bin, Agent},
    api_echo::{answered, serve, service as echo_service, slice as echo_slice, Served},
    fake_api::{ENDPOINT_SLICES, SERVICES},
    scenarios::{self, assert_served, ECHO_IP},
};
use serde_json::json;

/// How long the API server is away (the minute; shorter by env for a quick run).
fn outage() -> Duration {
    std::env::var("PROXY_AGENT_API_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_mins(1), Duration::from_secs)
}

fn api_faults_under_traffic(dataplane: &str) {
    let mut cluster = scenarios::echo_cluster(&format!("apif{}", &dataplane[..1]));
    let Served {
        api,
        kubeconfig,
        runtime,
    } = serve(&cluster, "kubeconfig");
    let args = [
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
        "--dataplane".to_owned(),
        dataplane.to_owned(),
    ];
    let agent = Agent::start_with(&mut cluster, "node1", &args);
    assert_eq!(
        answered(&cluster),
        ["web-a", "web-b"],
        "{}",
        agent.log_text()
    );

    let total = outage() + Duration::from_secs(12);
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:80");
    let millis = total.as_millis().to_string();
    let traffic = cluster
        .command_in_pod("client", &[&testpod, "request-for", "tcp", &to, &millis])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    let started = Instant::now();
    // The API server away: every request answered 503.
    api.go_down();
    std::thread::sleep(outage());
    api.recover();
    // Every watch sent away with 410 Gone: the agent relists, watches, is sent away again.
    let gone = api.counters().gone;
    api.expire_every_watch(true);
    std::thread::sleep(Duration::from_secs(4));
    api.expire_every_watch(false);
    let expired = api.counters().gone - gone;
    // Malformed objects: a Service whose ports are not a list, a slice with a bad address.
    let mut garbled = echo_service();
    garbled["spec"]["ports"] = json!("not-a-list");
    api.upsert(SERVICES, garbled);
    api.upsert(ENDPOINT_SLICES, echo_slice(&["10.244.1.999"]));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        answered(&cluster),
        ["web-a", "web-b"],
        "the last good version was not kept:\n{}",
        agent.log_text()
    );
    // The next good change is followed at once.
    api.upsert(SERVICES, echo_service());
    api.upsert(ENDPOINT_SLICES, echo_slice(&["10.244.2.3"]));
    let changed = Instant::now();
    while answered(&cluster) != ["web-c"] {
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "the change after the faults was not followed:\n{}",
            agent.log_text()
        );
    }
    let followed = changed.elapsed();
    let output = traffic.wait_with_output().expect("client output");
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!(
        "{dataplane}: API down {:?}, {expired} watches answered 410 in 4 s, two malformed objects; traffic over {:?}: {report}; the next change live after {followed:?}",
        outage(),
        started.elapsed()
    );
    assert!(expired >= 2, "the watches were not sent away: {expired}");
    let log = agent.log_text();
    for named in ["default/echo", "10.244.1.999"] {
        assert!(
            log.contains(named),
            "the bad object is not named ({named}):\n{log}"
        );
    }
    assert_served(&report, "through the API faults");
    drop(runtime);
}

#[test]
fn api_gone_expired_and_malformed_keep_serving_with_ebpf() {
    api_faults_under_traffic("ebpf");
}

#[test]
fn api_gone_expired_and_malformed_keep_serving_with_nftables() {
    api_faults_under_traffic("nftables");
}
