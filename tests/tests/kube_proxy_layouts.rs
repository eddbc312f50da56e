//! The bench's kube-proxy baselines checked against kube-proxy's own tests: the Services
//! of its `TestOverall*Rules`, read through our model, give the rulesets those tests
//! expect (the same chains, each chain's rules in order, elements and verdicts). The
//! transactions then load into a real kernel, and a partial sync leaves the table a full
//! sync of the same state leaves.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use proxy_agent::{
    model::{self, DesiredState, NodeInfo},
    source::manifests::ManifestsDir,
};
use proxy_agent_tests::{
    cluster::{sh_in, sh_in_with_stdin, Cluster},
    kube_proxy::{
        iptables,
        nftables::{Config, Proxier},
    },
};

fn layouts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube-proxy-layouts/overall")
}

/// kube-proxy's test node: test-node at 192.168.0.2, pods in 10.0.0.0/8, NodePorts on
/// 192.168.0.2 only.
fn node() -> NodeInfo {
    NodeInfo {
        addresses: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        nodeport_cidrs: vec!["192.168.0.2/32".parse().unwrap()],
        ..NodeInfo::named("test-node")
    }
}

fn config() -> Config {
    Config {
        cluster_cidr: "10.0.0.0/8".into(),
        service_cidrs: "172.30.0.0/16".into(),
        nodeport_ips: vec!["192.168.0.2".parse().unwrap()],
        node_ip: "192.168.0.2".parse().unwrap(),
    }
}

/// The desired state of `yaml` (the fixture's manifests, edited or not).
fn desired(yaml: &str) -> DesiredState {
    let dir = std::env::temp_dir().join(format!("pa-kp-layouts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.yaml"), yaml).unwrap();
    let mut source = ManifestsDir::new(&dir);
    source.reload().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    model::build(&source.snapshot(), &node())
}

fn fixture() -> String {
    std::fs::read_to_string(layouts().join("manifests.yaml")).unwrap()
}

/// What a transaction leaves, as kube-proxy's tests compare it: the objects and
/// elements it adds as a sorted set, each chain's rules in their order (flushes of a
/// first sync change nothing).
fn normalized(text: &str) -> Vec<String> {
    let mut rule_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("flush "))
        .map(|l| match l.strip_prefix("add rule ip kube-proxy ") {
            Some(rule) => {
                let chain = rule.split(' ').next().unwrap_or_default().to_owned();
                let index = rule_index.entry(chain.clone()).or_default();
                *index += 1;
                format!("add rule {chain} #{index:03}: {l}")
            }
            None => l.to_owned(),
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn kube_proxys_nftables_layout_is_the_one_its_overall_test_expects() {
    let transactions = Proxier::new(config()).full(&desired(&fixture()));
    assert_eq!(transactions.len(), 1, "one transaction on a first sync");
    let expected = std::fs::read_to_string(layouts().join("nftables.expected")).unwrap();
    let (ours, theirs) = (normalized(&transactions[0]), normalized(&expected));
    let missing: Vec<_> = theirs.iter().filter(|l| !ours.contains(l)).collect();
    let extra: Vec<_> = ours.iter().filter(|l| !theirs.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "kube-proxy's layout differs:\nmissing {missing:#?}\nextra {extra:#?}"
    );
}

/// The fixture after a few changes of the kinds the bench makes and more: an endpoint
/// moved, a Service gone, a Service's first endpoint, affinity and firewall dropped.
fn changed() -> String {
    fixture()
        .replace("[{addresses: [10.180.0.1]}]", "[{addresses: [10.180.0.9]}]")
        .replace("- {addresses: [10.180.0.4]}", "- {addresses: [10.180.0.7]}")
        .replace(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}\n",
            "",
        )
        .replace("  loadBalancerSourceRanges: [203.0.113.0/25]\n", "")
        .replace(
            "metadata: {name: svc3, namespace: ns3}",
            "metadata: {name: svc3-renamed, namespace: ns3}",
        )
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: svc6-1, namespace: ns6, labels: {kubernetes.io/service-name: svc6}}\naddressType: IPv4\nports: [{name: p80, port: 80, protocol: TCP}]\nendpoints: [{addresses: [10.180.0.6]}]\n"
}

#[test]
fn kube_proxys_nftables_transactions_load_and_a_partial_sync_leaves_what_a_full_one_does() {
    let cluster = Cluster::new("kplay");
    let (partial_ns, full_ns) = (cluster.add_netns("partial"), cluster.add_netns("full"));
    let load = |ns: &str, transactions: Vec<String>| {
        for tx in transactions {
            sh_in_with_stdin(ns, &["nft", "-f", "-"], &tx);
        }
    };
    // The table's objects, in no particular order (the kernel lists chains in the
    // order they were made).
    let list = |ns: &str| {
        let listing = sh_in(ns, &["nft", "list", "table", "ip", "kube-proxy"]);
        let mut blocks: Vec<String> = listing.split("\n\n").map(str::to_owned).collect();
        blocks.sort();
        blocks.join("\n\n")
    };
    let (before, after) = (desired(&fixture()), desired(&changed()));
    let mut proxier = Proxier::new(config());
    load(&partial_ns, proxier.full(&before));
    let partial = proxier.partial(&after);
    let written: usize = partial.iter().map(|t| t.lines().count()).sum();
    load(&partial_ns, partial);
    // Chains left stale are flushed, and deleted by the next sync.
    load(&partial_ns, proxier.partial(&after));
    load(&full_ns, Proxier::new(config()).full(&after));
    let full_listing = list(&full_ns);
    assert!(full_listing.contains("10.180.0.9"), "{full_listing}");
    assert_eq!(list(&partial_ns), full_listing);
    // The partial sync wrote what changed, not the whole table.
    let whole = Proxier::new(config()).full(&after)[0].lines().count();
    assert!(
        written * 2 < whole,
        "a partial sync wrote {written} lines, a full one {whole}"
    );
}

/// kube-proxy's iptables test proxier: nfacct counters, no `--random-fully`, localhost
/// NodePorts on; `nfacct` off is what it writes on a kernel without the counters (here).
fn iptables_config(nfacct: bool) -> iptables::Config {
    iptables::Config {
        cluster_cidr: "10.0.0.0/8".into(),
        node_ip: "192.168.0.2".parse().unwrap(),
        localhost_nodeports: true,
        nfacct,
        random_fully: false,
    }
}

/// An `iptables-restore` input as kube-proxy's tests compare it: per table, its chain
/// declarations and top-level rules as sets (written in Service order, which is its
/// map's), and each other chain's rules in order.
fn iptables_normalized(text: &str) -> Vec<String> {
    let ordered = |chain: &str| {
        !matches!(
            chain,
            "KUBE-SERVICES" | "KUBE-NODEPORTS" | "KUBE-EXTERNAL-SERVICES" | "KUBE-PROXY-FIREWALL"
        )
    };
    let mut table = String::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            name.clone_into(&mut table);
            continue;
        }
        let chain = line.strip_prefix("-A ").and_then(|r| r.split(' ').next());
        lines.push(match chain {
            Some(chain) if ordered(chain) => {
                let i = index.entry(format!("{table} {chain}")).or_default();
                *i += 1;
                format!("{table} {chain} #{i:03}: {line}")
            }
            _ => format!("{table} {line}"),
        });
    }
    lines.sort();
    lines
}

#[test]
fn kube_proxys_iptables_layout_is_the_one_its_overall_test_expects() {
    let restore = iptables::Proxier::new(iptables_config(true)).full(&desired(&fixture()));
    let expected = std::fs::read_to_string(layouts().join("iptables.expected")).unwrap();
    let (ours, theirs) = (
        iptables_normalized(&restore),
        iptables_normalized(&expected),
    );
    let missing: Vec<_> = theirs.iter().filter(|l| !ours.contains(l)).collect();
    let extra: Vec<_> = ours.iter().filter(|l| !theirs.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "kube-proxy's layout differs:\nmissing {missing:#?}\nextra {extra:#?}"
    );
}

#[test]
fn kube_proxys_iptables_restores_load_on_nft_and_legacy_and_a_partial_sync_leaves_what_a_full_one_does(
) {
    let cluster = Cluster::new("kpipt");
    let (before, after) = (desired(&fixture()), desired(&changed()));
    for variant in ["nft", "legacy"] {
        let restore = format!("iptables-{variant}-restore");
        let save = format!("iptables-{variant}-save");
        let (partial_ns, full_ns) = (
            cluster.add_netns(&format!("{variant}p")),
            cluster.add_netns(&format!("{variant}f")),
        );
        let load = |ns: &str, input: &str| {
            sh_in_with_stdin(ns, &[restore.as_str(), "--noflush"], input);
        };
        // The tables' rules and chains, as sets (counters and save comments aside).
        let list = |ns: &str| {
            let mut lines: Vec<String> = sh_in(ns, &[save.as_str()])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
                .collect();
            lines.sort();
            lines
        };
        let mut proxier = iptables::Proxier::new(iptables_config(false));
        load(&partial_ns, &proxier.full(&before));
        let partial = proxier.partial(&after);
        load(&partial_ns, &partial);
        load(
            &full_ns,
            &iptables::Proxier::new(iptables_config(false)).full(&after),
        );
        let full_listing = list(&full_ns);
        assert!(
            full_listing.iter().any(|l| l.contains("10.180.0.9:80")),
            "{variant}: {full_listing:#?}"
        );
        assert_eq!(list(&partial_ns), full_listing, "{variant}");
        // The unchanged Services' chains were not written again.
        assert!(
            !partial.contains(":KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
            "{variant}: a partial restore rewrote an unchanged Service:\n{partial}"
        );
    }
}
