//! End to end, the agent's image run on a testbed node exactly as `deploy/02-daemonset.yaml`
//! runs it (its capabilities and nothing more, read-only root, no privilege escalation,
//! its volumes, the node's network namespace as the host network): ClusterIP from a pod,
//! NodePort from outside and NodeLocal DNS work; a container restart keeps a long-lived
//! connection and new ones flowing; `cleanup` run from the image removes everything.
use proxy_agent_tests::{
    agent::testpod_bin,
    cluster::Cluster,
    container::{
        added_capabilities, daemonset, load_image, podman_run, run_options, ContainerAgent,
    },
    manifests,
    scenarios::{self, LanLoad, UdpHold, ECHO_IP, POD_PORTS, SVC_PORTS, WEB_A_AND_B},
};

const ECHO_PORT: (&str, &str, u16) = ("echo", "TCP", 7070);

const NODEPORT: &str = "\
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080},
          {name: echo, protocol: TCP, port: 7070, targetPort: echo, nodePort: 30070}]
";

/// echo (`ClusterIP`) and np (`NodePort`, with the echo port), both on web-a and web-b,
/// in the cluster's manifests directory.
fn write_manifests(cluster: &Cluster) {
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(
        &dir,
        "echo.yaml",
        &manifests::service("echo", ECHO_IP, &SVC_PORTS),
    );
    manifests::write(
        &dir,
        "echo-slice.yaml",
        &manifests::slice("echo-1", "echo", &POD_PORTS, &WEB_A_AND_B),
    );
    manifests::write(&dir, "np.yaml", NODEPORT);
    let ports = [POD_PORTS[0], ECHO_PORT];
    manifests::write(
        &dir,
        "np-slice.yaml",
        &manifests::slice("np-1", "np", &ports, &WEB_A_AND_B),
    );
}

/// The source the container is given beside the `DaemonSet`'s arguments (`NODE_NAME`
/// comes from its env): the manifests directory, and the volume that holds it.
fn source(cluster: &Cluster) -> ([String; 2], [String; 1]) {
    let dir = cluster.scratch().join("manifests");
    (
        ["--manifests".to_owned(), "/manifests".into()],
        [format!("{}:/manifests:ro", dir.display())],
    )
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    let cluster = scenarios::echo_cluster("ctr");
    write_manifests(&cluster);
    let image = load_image(&cluster);
    let (source, volumes) = source(&cluster);
    let agent = ContainerAgent::start(&cluster, "node1", &image, &source, &volumes);
    agent.wait_healthy(&cluster);

    // ClusterIP from a pod: both endpoints.
    let answered: std::collections::BTreeSet<String> =
        scenarios::requests(&cluster, "tcp", &format!("{ECHO_IP}:80"), 16)
            .iter()
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_owned())
            .collect();
    assert_eq!(
        answered,
        ["web-a".to_owned(), "web-b".to_owned()].into(),
        "{}",
        agent.logs(&cluster)
    );
    // NodePort from outside the cluster.
    let out = scenarios::probe(&cluster, None, "tcp", "10.100.0.254", "10.100.0.1:30080", 8);
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    // NodeLocal DNS on the DaemonSet's address, answered from the model.
    let dig = cluster.run_in_pod(
        "client",
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            "@169.254.20.10",
            "echo.default.svc.cluster.local",
        ],
    );
    assert_eq!(dig.trim(), ECHO_IP, "{}", agent.logs(&cluster));

    restart_keeps_connections(&cluster, &agent);
    cleanup_from_the_image(&cluster, &agent, &image);
}

/// A container restart: a long-lived connection and a stream of new ones from the LAN
/// through the NodePort carry on.
fn restart_keeps_connections(cluster: &Cluster, agent: &ContainerAgent) {
    let load = LanLoad::start(cluster, "10.100.0.1:30070", "10.100.0.1:30080");
    std::thread::sleep(std::time::Duration::from_millis(500));
    agent.restart(cluster);
    agent.wait_healthy(cluster);
    let _ = load.carried_on("");
}

/// `cleanup` from the image, with the same privileges, removes everything.
fn cleanup_from_the_image(cluster: &Cluster, agent: &ContainerAgent, image: &str) {
    let _ = podman_run(cluster, &["stop", "-t", "10", &agent.name]);
    cleanup_node(cluster, image);
    assert!(!cluster.bpffs_dir("node1").exists(), "pins left behind");
    let tables = cluster.run_on_node("node1", &["nft", "list", "tables"]);
    assert!(!tables.contains("proxy-agent"), "{tables}");
    let links = cluster.run_on_node("node1", &["ip", "-o", "link"]);
    assert!(!links.contains("nodelocaldns"), "{links}");
}

/// What works with one set of capabilities: each check that failed, by name, and the
/// agent's warnings and errors.
fn what_breaks(
    cluster: &Cluster,
    image: &str,
    capabilities: &[String],
    baseline: &[String],
) -> (Vec<&'static str>, Vec<String>) {
    let (source, volumes) = source(cluster);
    let agent =
        ContainerAgent::start_with(cluster, "node1", image, capabilities, &source, &volumes);
    let mut broken = Vec::new();
    if agent
        .healthy_within(cluster, std::time::Duration::from_secs(10))
        .is_err()
    {
        broken.push("healthz");
    } else {
        let testpod = testpod_bin().display().to_string();
        let health = cluster.run_on_node(
            "node1",
            &[&testpod, "http", "GET", "127.0.0.1:10256", "/healthz"],
        );
        if !health.contains("\"dataplane\":\"ebpf\"") {
            broken.push("eBPF dataplane");
        }
        let ok = |lines: &str| !lines.is_empty() && lines.lines().all(|l| l.starts_with("ok "));
        let requests = scenarios::requests(cluster, "tcp", &format!("{ECHO_IP}:80"), 4).join("\n");
        if !ok(&requests) {
            broken.push("ClusterIP");
        }
        let nodeport =
            scenarios::probe(cluster, None, "tcp", "10.100.0.254", "10.100.0.1:30080", 4);
        if nodeport.is_empty() || !nodeport.iter().all(Result::is_ok) {
            broken.push("NodePort");
        }
        let dig = cluster
            .command_in_pod(
                "client",
                &[
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "@169.254.20.10",
                    "echo.default.svc.cluster.local",
                ],
            )
            .output()
            .expect("dig");
        if String::from_utf8_lossy(&dig.stdout).trim() != ECHO_IP {
            broken.push("DNS");
        }
        if !stale_udp_socket_destroyed(cluster) {
            broken.push("UDP socket destruction");
        }
    }
    let said: Vec<String> = agent
        .logs(cluster)
        .lines()
        .filter(|l| {
            l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.starts_with("Caused by")
                || l.starts_with("    ")
        })
        .map(|l| {
            l.split_once(": ")
                .map_or(l, |(_, rest)| rest)
                .chars()
                .take(160)
                .collect()
        })
        .filter(|l: &String| !baseline.contains(l))
        .collect();
    drop(agent);
    cleanup_node(cluster, image);
    (broken, said)
}

/// A pod's connected UDP socket to echo, whose backend then leaves: destroyed by the
/// agent (the client replaces it and reaches the other pod). The slice is put back.
fn stale_udp_socket_destroyed(cluster: &Cluster) -> bool {
    let dir = cluster.scratch().join("manifests");
    let hold = UdpHold::start(cluster, &format!("{ECHO_IP}:53"));
    let (stay, want) = if hold.pinned == "ok web-a" {
        (&WEB_A_AND_B[1..], "ok web-b")
    } else {
        (&WEB_A_AND_B[..1], "ok web-a")
    };
    let since = std::time::Instant::now();
    manifests::write(
        &dir,
        "echo-slice.yaml",
        &manifests::slice("echo-1", "echo", &POD_PORTS, stay),
    );
    let moved = hold.follow(want, since);
    manifests::write(
        &dir,
        "echo-slice.yaml",
        &manifests::slice("echo-1", "echo", &POD_PORTS, &WEB_A_AND_B),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    moved.after_move.is_some() && moved.before.iter().any(|l| l == "reconnect")
}

/// The node as it was before the agent: `cleanup` from the image with every capability.
fn cleanup_node(cluster: &Cluster, image: &str) {
    let mut args = vec!["run".to_owned(), "--rm".into()];
    args.extend(run_options(
        cluster,
        "node1",
        &added_capabilities(&daemonset().1),
    ));
    args.push(image.to_owned());
    args.extend([
        "cleanup".into(),
        format!("--bpffs={}", cluster.bpffs_dir("node1").display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = podman_run(cluster, &args);
}

/// Least privilege, measured: the agent's container without each capability the
/// `DaemonSet` adds, one at a time. Every one must be needed for something.
#[test]
fn every_capability_the_daemonset_adds_is_needed() {
    let cluster = scenarios::echo_cluster("ccap");
    write_manifests(&cluster);
    let image = load_image(&cluster);
    let all = added_capabilities(&daemonset().1);
    let (broken, baseline) = what_breaks(&cluster, &image, &all, &[]);
    assert!(
        broken.is_empty(),
        "with every capability: {broken:?} {baseline:?}"
    );
    // Each alone, then the pairs where one stands in for the other (CAP_SYS_ADMIN still
    // grants what CAP_BPF and CAP_PERFMON were split from).
    let mut trials: Vec<Vec<String>> = all.iter().map(|c| vec![c.clone()]).collect();
    for pair in [["BPF", "SYS_ADMIN"], ["PERFMON", "SYS_ADMIN"]] {
        if pair.iter().all(|c| all.iter().any(|a| a == c)) {
            trials.push(pair.iter().map(|c| (*c).to_owned()).collect());
        }
    }
    let mut table = vec![
        "| without | what breaks | what the agent says |".to_owned(),
        "| --- | --- | --- |".to_owned(),
    ];
    let mut needed = std::collections::BTreeSet::new();
    let mut unsaid = Vec::new();
    for without in &trials {
        let fewer: Vec<String> = all
            .iter()
            .filter(|c| !without.contains(c))
            .cloned()
            .collect();
        let (broken, said) = what_breaks(&cluster, &image, &fewer, &baseline);
        if !broken.is_empty() {
            needed.extend(without.iter().cloned());
            // What a missing capability breaks, the agent says.
            if said.is_empty() {
                unsaid.push(without.join(" + "));
            }
        }
        let broken = if broken.is_empty() {
            "nothing".to_owned()
        } else {
            broken.join(", ")
        };
        let said = said
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('^'))
            .cloned()
            .unwrap_or_default();
        table.push(format!(
            "| {} | {broken} | {} |",
            without.join(" + "),
            said.trim()
        ));
    }
    let table = table.join("\n");
    println!("{table}");
    assert!(
        unsaid.is_empty(),
        "the agent did not say what broke without {unsaid:?}:\n{table}"
    );
    let unneeded: Vec<&String> = all.iter().filter(|c| !needed.contains(*c)).collect();
    assert!(unneeded.is_empty(), "nothing needs {unneeded:?}:\n{table}");
    for cap in ["NET_ADMIN", "NET_BIND_SERVICE"] {
        assert!(needed.contains(cap), "{cap} breaks nothing:\n{table}");
    }
}
