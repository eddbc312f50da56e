use std::time::Duration;

use clap::Parser;

use super::{parse, ConfigError, FileSettings};
use crate::cli::{Cli, Command, RunArgs};

/// What `kubeadm init` writes into the `kube-proxy` config map's `config.conf` (a
/// kubeadm 1.33 cluster with a pod subnet), every field present, most unset.
const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForProto: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

fn run_args(cli: &[&str]) -> RunArgs {
    let mut line = vec!["proxy-agent", "run"];
    line.extend(cli);
    match Cli::parse_from(line).command {
        Command::Run(args) => *args,
        _ => unreachable!("run"),
    }
}

#[test]
fn a_kubeadm_file_sets_what_applies_and_names_the_rest() {
    let settings = parse("config.conf", KUBEADM).unwrap();
    assert_eq!(
        settings,
        FileSettings {
            cluster_cidr: Some(vec!["10.244.0.0/16".parse().unwrap()]),
            nodeport_addresses: None,
            detect_local_mode: None,
            pod_bridge_interface: None,
            pod_interface_name_prefix: None,
            healthz_bind_address: None,
            metrics_bind_address: Some("0.0.0.0:10249".parse().unwrap()),
            hostname_override: None,
            kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
            min_sync_period: Some(Duration::from_secs(1)),
            sync_period: Some(Duration::from_secs(30)),
            masquerade_all: false,
            bind_address_hard_fail: false,
            kube_api_qps: None,
            kube_api_burst: None,
            // Unset fields are not named; set ones the agent does not act on are.
            ignored: vec!["bindAddress".to_owned()],
        }
    );
}

#[test]
fn flags_given_on_the_command_line_win_over_the_file() {
    let mut args = run_args(&["--cluster-cidr", "10.0.0.0/8", "--manifests", "/m"]);
    let settings = parse("config.conf", KUBEADM).unwrap();
    settings.apply(&mut args, |id| ["cluster_cidr", "manifests"].contains(&id));
    assert_eq!(args.node.cluster_cidr, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(args.metrics_bind_address, "0.0.0.0:10249".parse().unwrap());
    assert_eq!(args.min_sync_period, Duration::from_secs(1));
    // The manifests source stands: the file's kubeconfig is not used beside it.
    assert!(args.kubeconfig.is_none());
}

#[test]
fn the_nftables_mode_reads_the_nftables_section() {
    let text = KUBEADM.replace("mode: \"\"", "mode: nftables").replace(
        "  minSyncPeriod: 0s\n  syncPeriod: 0s\nnodePort",
        "  minSyncPeriod: 250ms\n  syncPeriod: 0s\nnodePort",
    );
    let settings = parse("config.conf", &text).unwrap();
    assert_eq!(settings.min_sync_period, Some(Duration::from_millis(250)));
    assert!(settings.ignored.iter().any(|f| f.starts_with("mode")));
}

#[test]
fn local_detection_and_primary_nodeport_addresses_come_from_the_file() {
    let text = KUBEADM
        .replace(
            "detectLocalMode: \"\"",
            "detectLocalMode: InterfaceNamePrefix",
        )
        .replace("interfaceNamePrefix: \"\"", "interfaceNamePrefix: veth")
        .replace("nodePortAddresses: null", "nodePortAddresses: [primary]");
    let mut args = run_args(&["--manifests", "/m"]);
    parse("config.conf", &text)
        .unwrap()
        .apply(&mut args, |id| id == "manifests");
    let node = args.node.node_info("n").unwrap();
    assert_eq!(
        node.detect_local,
        crate::model::DetectLocal::InterfaceNamePrefix("veth".into())
    );
    assert!(node.nodeport_primary && node.nodeport_cidrs.is_empty());
    // The flag wins over the file.
    let mut args = run_args(&["--detect-local-mode", "ClusterCIDR", "--manifests", "/m"]);
    parse("config.conf", &text).unwrap().apply(&mut args, |id| {
        ["detect_local_mode", "manifests"].contains(&id)
    });
    assert_eq!(
        args.node.node_info("n").unwrap().detect_local,
        crate::model::DetectLocal::ClusterCidr
    );
    // A mode without its interface is refused, as kube-proxy refuses it.
    let lacking = KUBEADM.replace("detectLocalMode: \"\"", "detectLocalMode: BridgeInterface");
    let mut args = run_args(&["--manifests", "/m"]);
    parse("c", &lacking).unwrap().apply(&mut args, |_| false);
    let error = args.node.node_info("n").unwrap_err();
    assert!(error.contains("--pod-bridge-interface"), "{error}");
    for bad in [
        "detectLocalMode: Bridge",
        "nodePortAddresses: [primary, 10.0.0.0/8]",
    ] {
        let key = bad.split(':').next().unwrap();
        let text = KUBEADM
            .replace(
                "detectLocalMode: \"\"",
                if key == "detectLocalMode" {
                    bad
                } else {
                    "detectLocalMode: \"\""
                },
            )
            .replace(
                "nodePortAddresses: null",
                if key == "nodePortAddresses" {
                    bad
                } else {
                    "nodePortAddresses: null"
                },
            );
        let error = parse("c", &text).unwrap_err().to_string();
        assert!(error.contains(key), "{bad}: {error}");
    }
}

#[test]
fn masquerade_all_sync_period_hard_fail_and_api_rates_come_from_the_file() {
    let text = KUBEADM
        .replace("bindAddressHardFail: false", "bindAddressHardFail: true")
        .replace("  burst: 0\n", "  burst: 20\n")
        .replace("  qps: 0\n", "  qps: 7.5\n")
        .replace(
            "  masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 1s",
            "  masqueradeAll: true\n  masqueradeBit: null\n  minSyncPeriod: 1s",
        );
    let mut args = run_args(&["--manifests", "/m", "--kube-api-burst", "3"]);
    parse("config.conf", &text).unwrap().apply(&mut args, |id| {
        ["manifests", "kube_api_burst"].contains(&id)
    });
    assert!(args.node.masquerade_all && args.bind_address_hard_fail);
    assert_eq!(args.sync_period, Duration::from_secs(30));
    assert!((args.kube_api_qps - 7.5).abs() < f64::EPSILON);
    // The flag wins.
    assert_eq!(args.kube_api_burst, 3);
    let bad = KUBEADM.replace("  burst: 0\n", "  burst: -1\n");
    let error = parse("c", &bad).unwrap_err().to_string();
    assert!(error.contains("clientConnection.burst"), "{error}");
}

#[test]
fn a_bad_file_is_a_named_error() {
    let wrong_kind = KUBEADM.replace("kind: KubeProxyConfiguration", "kind: KubeletConfiguration");
    assert!(matches!(
        parse("c", &wrong_kind),
        Err(ConfigError::Parse(..))
    ));
    let bad_cidr = KUBEADM.replace("10.244.0.0/16", "10.244.0.0/33");
    let error = parse("c", &bad_cidr).unwrap_err().to_string();
    assert!(
        error.contains("clusterCIDR") && error.contains("10.244.0.0/33"),
        "{error}"
    );
    let bad_period = KUBEADM.replace("minSyncPeriod: 1s", "minSyncPeriod: soon");
    assert!(parse("c", &bad_period)
        .unwrap_err()
        .to_string()
        .contains("minSyncPeriod"));
    assert!(matches!(
        parse("c", "clusterCIDR: [1"),
        Err(ConfigError::Parse(..))
    ));
}
