//! The agent run as kube-proxy is run on a kubeadm cluster: `--config` naming the
//! `config.conf` of the `kube-system/kube-proxy` config map, which says where the API
//! server's kubeconfig is, the pod CIDR and the metrics address. Its fields that the
//! agent does not act on are named in the log; flags on the command line win.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{agent_bin, testpod_bin, Agent},
    api_echo::{answered, serve},
    scenarios::{self, ECHO_IP},
};

#[test]
fn a_kubeadm_kube_proxy_config_file_runs_the_agent() {
    let mut cluster = scenarios::echo_cluster("kpcf");
    let served = serve(&cluster, "kubeconfig.conf");
    // As kubeadm writes it (abridged: every field it leaves unset is left out).
    let config = cluster.scratch().join("config.conf");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: 0.0.0.0\nclientConnection:\n  kubeconfig: {}\n  qps: 0\nclusterCIDR: 10.244.0.0/16\nconntrack:\n  maxPerCore: 32768\niptables:\n  minSyncPeriod: 1s\n  syncPeriod: 30s\nmetricsBindAddress: 127.0.0.1:10249\nmode: \"\"\nnodePortAddresses: null\n",
            served.kubeconfig.display()
        ),
    )
    .unwrap();
    let agent = Agent::start_with(
        &mut cluster,
        "node1",
        &[
            "--config".into(),
            config.display().to_string(),
            "--min-sync-period".into(),
            "20ms".into(),
        ],
    );
    assert_eq!(
        answered(&cluster),
        ["web-a", "web-b"],
        "{}",
        agent.log_text()
    );
    let (code, metrics) = agent.http_get(&cluster, "127.0.0.1:10249", "/metrics");
    assert_eq!(code, 200, "metrics where the file says");
    assert!(metrics.contains("proxyagent_dataplane_info"));
    let log = agent.log_text();
    let named = log
        .lines()
        .find(|l| l.contains("kube-proxy configuration fields the agent does not act on"))
        .unwrap_or_else(|| panic!("unused fields not named:\n{log}"));
    for field in ["bindAddress", "conntrack"] {
        assert!(named.contains(field), "{field} not named: {named}");
    }
    for read in ["qps", "syncPeriod", "minSyncPeriod", "clusterCIDR"] {
        assert!(!named.contains(read), "{read}: read, yet named: {named}");
    }
    println!("{named}");
}

/// `masqueradeAll: true` in the mode's section: a pod's ClusterIP traffic reaches the
/// backend from the node's address (nftables; eBPF translates pods at `connect()`).
#[test]
fn masquerade_all_from_the_file_with_nftables() {
    let mut cluster = scenarios::echo_cluster("kpma");
    let served = serve(&cluster, "kubeconfig.conf");
    let config = cluster.scratch().join("config.conf");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection:\n  kubeconfig: {}\n  qps: 20\n  burst: 40\nclusterCIDR: 10.244.0.0/16\niptables:\n  masqueradeAll: true\n  syncPeriod: 1s\n",
            served.kubeconfig.display()
        ),
    )
    .unwrap();
    let args = [
        "--config".into(),
        config.display().to_string(),
        "--dataplane".into(),
        "nftables".into(),
    ];
    let agent = Agent::start_with(&mut cluster, "node1", &args);
    let peers: Vec<String> = scenarios::requests(&cluster, "tcp", &format!("{ECHO_IP}:80"), 12)
        .iter()
        .map(|line| line.split_whitespace().nth(2).unwrap_or(line).to_owned())
        .collect();
    assert!(
        peers.iter().all(|p| !p.starts_with("10.244.1.10:")),
        "the pod's address reached a backend: {peers:?}\n{}",
        agent.log_text()
    );
    // syncPeriod: a sync runs each second with nothing to change.
    std::thread::sleep(Duration::from_millis(2500));
    let syncs = agent.log_text().matches("synced").count();
    assert!(syncs >= 3, "{syncs} syncs in 2.5 s with syncPeriod 1s");
}

/// A metrics address already taken: logged and retried while the agent serves, as
/// kube-proxy does; with `--bind-address-hard-fail` the agent exits instead.
#[test]
fn a_taken_address_is_fatal_only_with_bind_address_hard_fail() {
    let mut cluster = scenarios::echo_cluster("kpbh");
    let testpod = testpod_bin().display().to_string();
    let _ = cluster.spawn_on_node(
        "node1",
        "holder",
        &[&testpod, "serve-each", "tcp:127.0.0.1:10249"],
        Stdio::null(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let source = [
        "--manifests".to_owned(),
        dir.display().to_string(),
        "--dataplane".into(),
        "none".into(),
    ];
    let agent = Agent::start_with(&mut cluster, "node1", &source);
    let since = Instant::now();
    while !agent.log_text().contains("cannot serve") {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.healthz(&cluster).0, 200, "the agent goes on");
    let bin = agent_bin().display().to_string();
    let strict = cluster.spawn_on_node(
        "node1",
        "strict",
        &[
            &bin,
            "run",
            "--node-name",
            "node1",
            "--manifests",
            &source[1],
            "--dataplane",
            "none",
            "--bind-address-hard-fail",
            "--healthz-bind-address",
            "127.0.0.1:10266",
        ],
        Stdio::null(),
    );
    let since = Instant::now();
    let status = loop {
        if let Some(status) = strict.try_wait().unwrap() {
            break status;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "still running with its address taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
}
