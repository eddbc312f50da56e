//! The agent run as kube-proxy is run on a kubeadm cluster: `--config` naming the
//! `config.conf` of the `kube-system/kube-proxy` config map, which says where the API
//! server's kubeconfig is, the pod CIDR and the metrics address. Its fields that the
//! agent does not act on are named in the log; flags on the command line win.
use proxy_agent_tests::{
    agent::Agent,
    api_echo::{answered, serve},
    scenarios,
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
    for field in ["bindAddress", "conntrack", "iptables.syncPeriod"] {
        assert!(named.contains(field), "{field} not named: {named}");
    }
    assert!(!named.contains("qps"), "an unset field named: {named}");
    println!("{named}");
}
