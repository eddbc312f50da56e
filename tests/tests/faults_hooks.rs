//! Kernel calls failing on demand under live traffic, through the agent built with
//! `fault-hooks` (`proxy-agent-faults`): eBPF map writes refused for one Service, the
//! node's interfaces unreadable over rtnetlink, and every nftables transaction refused.
//! Each failure stays small: what was programmed keeps serving, the failure is named in
//! the log, counted and said in `/healthz`'s body, other changes land meanwhile, and
//! the failed work lands once the fault is gone. And maps really full (a small
//! `--bpf-lb-map-max`): the frontends past the end are skipped, the others serve.
use std::{
    fmt::Write as _,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{agent_bin, faults_agent_bin, sample_sum, testpod_bin},
    manifests,
    scenarios::{
        assert_served, client_report, setup_with, Bed, ECHO_IP, POD_PORTS, SVC_PORTS, WEB_A_AND_B,
    },
};

const METRICS: &str = "127.0.0.1:10249";
/// How long the map-write and rtnetlink test's traffic runs: past both faults.
const TRAFFIC_MS: u64 = 28_000;

/// A Service named `name` at `ip` port 80, served by web-a and web-b.
fn served_by_web(bed: &Bed, name: &str, ip: &str) {
    write_served(bed, name, &manifests::service(name, ip, &SVC_PORTS[..1]));
}

/// `service` (named `name`, port 80), served by web-a and web-b.
fn write_served(bed: &Bed, name: &str, service: &str) {
    let text = service.to_owned()
        + "---\n"
        + &manifests::slice(&format!("{name}-abc"), name, &POD_PORTS[..1], &WEB_A_AND_B);
    manifests::write(&bed.dir, &format!("{name}.yaml"), &text);
}

/// Connections from the client pod to echo for `millis`.
fn pod_traffic(bed: &Bed, millis: u64) -> Child {
    let testpod = testpod_bin().display().to_string();
    bed.cluster
        .command_in_pod(
            "client",
            &[
                &testpod,
                "request-for",
                "tcp",
                &format!("{ECHO_IP}:80"),
                &millis.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client")
}

/// Whether one connection from the client pod to `to` is answered within 300 ms.
fn serves(bed: &Bed, to: &str) -> bool {
    let testpod = testpod_bin().display().to_string();
    bed.cluster
        .run_in_pod(
            "client",
            &[&testpod, "probe", "tcp", "10.244.1.10", to, "1", "300"],
        )
        .starts_with("ok ")
}

/// Polls `check` every 50 ms until it holds; how long that took.
fn until(bed: &Bed, limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "{what}: not after {limit:?}\n{}",
            bed.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn fault(bed: &Bed, method: &str, path: &str) -> String {
    let (code, body) = bed.agent.http(&bed.cluster, method, METRICS, path);
    assert_eq!(code, 200, "{method} {path}: {body}");
    body
}

fn sync_errors(bed: &Bed, reason: &str) -> f64 {
    let (_, text) = bed.agent.http_get(&bed.cluster, METRICS, "/metrics");
    sample_sum(
        &text,
        "proxyagent_sync_errors_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

fn healthz_body(bed: &Bed) -> String {
    bed.agent.healthz(&bed.cluster).1
}

fn faults_bed(tag: &str, dataplane: &str) -> Bed {
    setup_with(tag, &faults_agent_bin(), &["--dataplane", dataplane])
}

/// The eBPF map writes of one new Service refused until disarmed: it is skipped,
/// counted and retried while echo keeps serving, a Service added meanwhile serves at
/// once (not after the skipped one's backoff), and the skipped one serves once the
/// kernel takes its writes. Then rtnetlink failing while a change is synced: the
/// per-packet programs stay attached, so NodePort traffic from outside keeps flowing.
#[test]
fn map_writes_and_rtnetlink_failing_on_demand_stay_small_with_ebpf() {
    let bed = faults_bed("hookb", "ebpf");
    let nodeport = manifests::service("edge", "10.96.0.70", &SVC_PORTS[..1])
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30080}");
    write_served(&bed, "edge", &nodeport);
    let testpod = testpod_bin().display().to_string();
    until(&bed, Duration::from_secs(10), "the NodePort served", || {
        bed.cluster
            .run_in_lan(&[
                &testpod,
                "probe",
                "tcp",
                "10.100.0.254",
                "10.100.0.1:30080",
                "1",
                "300",
            ])
            .starts_with("ok ")
    });
    let started = Instant::now();
    let pods = pod_traffic(&bed, TRAFFIC_MS);
    let outside = bed
        .cluster
        .command_in_lan(&[
            &testpod,
            "request-for",
            "tcp",
            "10.100.0.1:30080",
            &TRAFFIC_MS.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the LAN client");
    std::thread::sleep(Duration::from_millis(300));

    fault(&bed, "PUT", "/debug/faults/bpf-map?address=10.96.0.60");
    served_by_web(&bed, "blocked", "10.96.0.60");
    until(&bed, Duration::from_secs(10), "blocked skipped", || {
        healthz_body(&bed).contains("\"failedFrontends\":1")
    });
    // The skipped frontend is retried 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 and 12.7 s after its
    // first failure: a change 8 s in would wait 4.7 s for a retry.
    std::thread::sleep(Duration::from_secs(8));
    served_by_web(&bed, "late", "10.96.0.61");
    let late = until(&bed, Duration::from_secs(10), "late served", || {
        serves(&bed, "10.96.0.61:80")
    });
    assert!(
        !serves(&bed, "10.96.0.60:80"),
        "blocked served while its writes fail"
    );
    let skipped = sync_errors(&bed, "bpf_map");
    let hits = fault(&bed, "DELETE", "/debug/faults/bpf-map");
    let blocked = until(&bed, Duration::from_secs(15), "blocked served", || {
        serves(&bed, "10.96.0.60:80")
    });
    until(&bed, Duration::from_secs(5), "healthz clean", || {
        healthz_body(&bed).contains("\"failedFrontends\":0")
    });

    fault(&bed, "PUT", "/debug/faults/rtnetlink");
    served_by_web(&bed, "during", "10.96.0.62");
    until(&bed, Duration::from_secs(10), "during served", || {
        serves(&bed, "10.96.0.62:80")
    });
    let netlink_hits = fault(&bed, "DELETE", "/debug/faults/rtnetlink");
    let faults_over = started.elapsed();
    let unfollowed = sync_errors(&bed, "interfaces");

    let (pods, outside) = (client_report(pods), client_report(outside));
    println!(
        "bpf map writes of 10.96.0.60 refused: {skipped} skipped writes counted ({}); a Service added 8 s in served after {late:?}; blocked served {blocked:?} after the fault went; rtnetlink failing ({}); echo from a pod: {pods}; NodePort from the LAN: {outside}",
        hits.lines().find(|l| l.starts_with("bpf-map")).unwrap_or_default(),
        netlink_hits.lines().find(|l| l.starts_with("rtnetlink")).unwrap_or_default(),
    );
    let log = bed.agent.log_text();
    assert!(
        faults_over < Duration::from_millis(TRAFFIC_MS - 500),
        "the traffic ended before the faults ({faults_over:?})"
    );
    assert!(skipped >= 2.0, "bpf_map failures counted: {skipped}");
    assert!(
        late < Duration::from_secs(3),
        "a change waited {late:?} behind a failing frontend's backoff"
    );
    assert!(
        !hits.contains("bpf-map off hits=0") && !netlink_hits.contains("rtnetlink off hits=0"),
        "a fault never fired: {hits} {netlink_hits}"
    );
    assert!(
        log.contains("10.96.0.60"),
        "the skipped frontend is not named in the log"
    );
    assert!(
        log.contains("cannot follow the node's interfaces") && unfollowed >= 1.0,
        "the rtnetlink failure is not in the log or not counted ({unfollowed})"
    );
    assert!(
        !log.contains("per-packet load balancing detached"),
        "programs detached"
    );
    assert_served(&pods, "from a pod while kernel calls failed");
    assert_served(&outside, "from the LAN while kernel calls failed");
}

/// Every nftables transaction refused while echo gains an endpoint: the rules last
/// loaded keep serving, the failure is counted and said in `/healthz`, and the change
/// lands once nft takes transactions again.
#[test]
fn nft_failing_on_demand_keeps_the_last_rules_with_nftables() {
    let bed = faults_bed("hookn", "nftables");
    let traffic = pod_traffic(&bed, 12_000);
    std::thread::sleep(Duration::from_millis(300));
    fault(&bed, "PUT", "/debug/faults/nft");
    served_by_web(&bed, "blocked", "10.96.0.60");
    until(&bed, Duration::from_secs(10), "sync failure said", || {
        healthz_body(&bed).contains("injected nft fault")
    });
    std::thread::sleep(Duration::from_secs(3));
    let held = bed
        .cluster
        .run_on_node("node1", &["nft", "list", "ruleset"]);
    assert!(
        !serves(&bed, "10.96.0.60:80"),
        "blocked served while nft refuses"
    );
    let failures = sync_errors(&bed, "nft_rejected");
    let hits = fault(&bed, "DELETE", "/debug/faults/nft");
    let landed = until(&bed, Duration::from_secs(15), "blocked served", || {
        serves(&bed, "10.96.0.60:80")
    });
    bed.agent.wait_healthy(&bed.cluster);
    let report = client_report(traffic);
    println!(
        "nft refused for 3 s: {failures} failed syncs counted ({}); the change landed {landed:?} after; echo from a pod: {report}",
        hits.lines().find(|l| l.starts_with("nft")).unwrap_or_default()
    );
    assert!(held.contains(ECHO_IP), "echo's rules gone during the fault");
    assert!(failures >= 2.0, "nft_rejected counted: {failures}");
    assert!(!hits.contains("nft off hits=0"), "the fault never fired");
    assert!(
        bed.agent.log_text().contains("injected nft fault"),
        "the failure is not in the log"
    );
    assert_served(&report, "while nft refused");
}

/// `services` Services at 10.97.0.1 and on, one TCP port each, all served by the same
/// `endpoints` addresses (so they share backend ids and fill the service map first).
fn sharing(services: usize, endpoints: usize) -> String {
    let mut out = String::new();
    for i in 1..=services {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: w{i}, namespace: default}}\nspec: {{clusterIP: 10.97.0.{i}, clusterIPs: [10.97.0.{i}], ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: w{i}-1, namespace: default, labels: {{kubernetes.io/service-name: w{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for e in 1..=endpoints {
            let _ = writeln!(
                out,
                "- addresses: [10.128.0.{e}]\n  conditions: {{ready: true}}"
            );
        }
        out.push_str("---\n");
    }
    out
}

/// `services` Services at 10.98.0.1 and on with no endpoints: a frontend and a slot each.
fn bare(services: usize) -> String {
    let mut out = String::new();
    for i in 1..=services {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: b{i}, namespace: default}}\nspec: {{clusterIP: 10.98.0.{i}, clusterIPs: [10.98.0.{i}], ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
        );
    }
    out
}

/// Frontends with their backends' slots, past the end of a small service map: the ones
/// that fit are written, the rest skipped with `bpf_map` and retried, echo serving
/// throughout; with a wide Service gone, the next fits. Then more frontends than
/// reverse-NAT ids: skipped with `ids_exhausted` until ids are freed.
#[test]
fn full_maps_and_exhausted_ids_skip_only_what_does_not_fit_with_ebpf() {
    // 64 slots a family, 32 backend ids, 32 reverse-NAT entries (31 ids): echo's two
    // ports take 6 slots and 2 ids, empty 1 and 1.
    let bed = setup_with(
        "fullm",
        &agent_bin(),
        &["--dataplane", "ebpf", "--bpf-lb-map-max", "64"],
    );
    let traffic = pod_traffic(&bed, 10_000);
    std::thread::sleep(Duration::from_millis(300));
    // 8 Services of the same 10 endpoints: 11 slots each, 57 free (and 10 backend ids).
    let wide = |n| sharing(n, 10);
    manifests::write(&bed.dir, "wide.yaml", &wide(8));
    // A batch the kernel refused fails the whole sync; the retry writes frontend by
    // frontend and skips only those that do not fit.
    until(&bed, Duration::from_secs(10), "wide skipped", || {
        healthz_body(&bed).contains("skipped (bpf_map")
    });
    let programmed = |bed: &Bed| {
        let out = bed.cluster.run_on_node(
            "node1",
            &[
                &agent_bin().display().to_string(),
                "dump",
                "services",
                "--json",
                "--dataplane",
                "ebpf",
                "--bpffs",
                &bed.agent.bpffs.display().to_string(),
            ],
        );
        let rows: serde_json::Value = serde_json::from_str(&out).expect("dump json");
        rows.as_array()
            .expect("rows")
            .iter()
            .filter(|row| {
                row["frontend"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("10.97.0."))
                    && row["backends"] == 10
            })
            .count()
    };
    let fit = programmed(&bed);
    let full_health = healthz_body(&bed);
    manifests::write(&bed.dir, "wide.yaml", &wide(fit));
    until(&bed, Duration::from_secs(15), "the rest fits", || {
        healthz_body(&bed).contains("\"failedFrontends\":0")
    });
    // 32 Services without endpoints: their 32 slots fit, 28 free ids do not.
    manifests::write(&bed.dir, "wide.yaml", "");
    manifests::write(&bed.dir, "bare.yaml", &bare(32));
    until(&bed, Duration::from_secs(10), "ids exhausted", || {
        healthz_body(&bed).contains("skipped (ids_exhausted")
    });
    let ids_health = healthz_body(&bed);
    manifests::write(&bed.dir, "bare.yaml", &bare(28));
    until(&bed, Duration::from_secs(15), "ids freed", || {
        healthz_body(&bed).contains("\"failedFrontends\":0")
    });
    let report = client_report(traffic);
    println!(
        "service map of 64 slots: {fit} of 8 wide Services fit ({full_health}); 32 Services over 28 free ids ({ids_health}); echo meanwhile: {report}"
    );
    assert!((3..8).contains(&fit), "{fit} wide Services programmed");
    assert!(full_health.contains("bpf_map"), "{full_health}");
    assert!(ids_health.contains("ids_exhausted"), "{ids_health}");
    assert_served(&report, "while the maps were full");
}
