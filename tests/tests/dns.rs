//! NodeLocal DNS end to end: the real agent answering real `dig` queries inside a
//! simulated node, an upstream the test runs itself in the LAN, hostile packets, and a
//! pod that resolves a Service and connects to it.
use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use proxy_agent_tests::{
    agent::{testpod_bin, Agent},
    cluster::{within_netns, Cluster},
    dns_upstream::Upstream,
    manifests,
    scenarios::{self, ECHO_IP, POD_PORTS, SVC_PORTS, WEB_A_AND_B},
};

const LISTEN: &str = "169.254.20.10";
const UPSTREAM: &str = "10.100.0.254:53";

const WORLD: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: data, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.244.1.20]
  hostname: db-0
- addresses: [10.244.2.21]
  conditions: {ready: true}
- addresses: [10.244.2.22]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: all, namespace: data}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: all-1, namespace: data, labels: {kubernetes.io/service-name: all}}
addressType: IPv4
endpoints:
- addresses: [10.244.2.23]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: ttl60.example.org
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70, 'fd00:10:96::70']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80, protocol: TCP}]
";

struct Bed {
    cluster: Cluster,
    agent: Agent,
    upstream: Upstream,
}

fn setup(tag: &str, dataplane: &str) -> Bed {
    let mut cluster = scenarios::echo_cluster(tag);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(
        &dir,
        "echo-svc.yaml",
        &manifests::service("echo", ECHO_IP, &SVC_PORTS),
    );
    manifests::write(&dir, "world.yaml", WORLD);
    let endpoints = WEB_A_AND_B;
    manifests::write(
        &dir,
        "echo-slice.yaml",
        &manifests::slice("echo-abc", "echo", &POD_PORTS, &endpoints),
    );
    let upstream = Upstream::start(&cluster.lan_netns(), UPSTREAM);
    let args: Vec<String> = [
        "--manifests",
        &dir.display().to_string(),
        "--dataplane",
        dataplane,
        "--dns-listen",
        LISTEN,
        "--dns-upstream",
        UPSTREAM,
        "--dns-forward",
        UPSTREAM,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let agent = Agent::start_with(&mut cluster, "node1", &args);
    Bed {
        cluster,
        agent,
        upstream,
    }
}

/// `dig` on node1 against the agent: the full text output.
fn dig(bed: &Bed, args: &[&str]) -> String {
    let server = format!("@{LISTEN}");
    let mut full = vec!["dig", "+time=3", "+tries=1", server.as_str()];
    full.extend_from_slice(args);
    bed.cluster.run_on_node("node1", &full)
}

fn status(output: &str) -> &str {
    output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
}

/// The answer section's records as `name type data`, TTLs left out.
fn answers(output: &str) -> Vec<String> {
    section(output, ";; ANSWER SECTION:")
}

fn section(output: &str, title: &str) -> Vec<String> {
    output
        .split(title)
        .nth(1)
        .map(|rest| {
            rest.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    format!("{} {} {}", f[0], f[3], f[4..].join(" "))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn flags(output: &str) -> String {
    output
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn cluster_names_are_answered_from_the_model_per_the_spec() {
    let bed = setup("dnsspec", "none");
    let cases: &[(&str, &str, &[&str])] = &[
        ("echo.default.svc.cluster.local", "A", &["echo.default.svc.cluster.local. A 10.96.0.50"]),
        ("EcHo.DeFault.SVC.cluster.local", "A", &["EcHo.DeFault.SVC.cluster.local. A 10.96.0.50"]),
        ("dual.default.svc.cluster.local", "AAAA", &["dual.default.svc.cluster.local. AAAA fd00:10:96::70"]),
        (
            "db.data.svc.cluster.local",
            "A",
            &["db.data.svc.cluster.local. A 10.244.1.20", "db.data.svc.cluster.local. A 10.244.2.21"],
        ),
        ("all.data.svc.cluster.local", "A", &["all.data.svc.cluster.local. A 10.244.2.23"]),
        ("db-0.db.data.svc.cluster.local", "A", &["db-0.db.data.svc.cluster.local. A 10.244.1.20"]),
        (
            "_pg._tcp.db.data.svc.cluster.local",
            "SRV",
            &[
                "_pg._tcp.db.data.svc.cluster.local. SRV 0 50 5432 db-0.db.data.svc.cluster.local.",
                "_pg._tcp.db.data.svc.cluster.local. SRV 0 50 5432 10-244-2-21.db.data.svc.cluster.local.",
            ],
        ),
        (
            "_http._tcp.echo.default.svc.cluster.local",
            "SRV",
            &["_http._tcp.echo.default.svc.cluster.local. SRV 0 100 80 echo.default.svc.cluster.local."],
        ),
        ("50.0.96.10.in-addr.arpa", "PTR", &["50.0.96.10.in-addr.arpa. PTR echo.default.svc.cluster.local."]),
        ("20.1.244.10.in-addr.arpa", "PTR", &["20.1.244.10.in-addr.arpa. PTR db-0.db.data.svc.cluster.local."]),
        (
            "0.7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa",
            "PTR",
            &["0.7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa. PTR dual.default.svc.cluster.local."],
        ),
        ("ext.default.svc.cluster.local", "CNAME", &["ext.default.svc.cluster.local. CNAME ttl60.example.org."]),
        ("dns-version.cluster.local", "TXT", &["dns-version.cluster.local. TXT \"1.1.0\""]),
    ];
    for (name, rtype, want) in cases {
        let out = dig(&bed, &["+norec", name, rtype]);
        assert_eq!(status(&out), "NOERROR", "{name} {rtype}:\n{out}");
        assert!(
            flags(&out).contains("aa"),
            "{name} {rtype} not authoritative:\n{out}"
        );
        let mut got = answers(&out);
        got.sort();
        let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(got, want, "{name} {rtype}:\n{out}");
    }
    // Negative answers carry the zone's SOA: NXDOMAIN for unknown names, NODATA for a
    // known name without that type and for a namespace that exists.
    for (name, rtype, want) in [
        ("nope.default.svc.cluster.local", "A", "NXDOMAIN"),
        ("echo.default.svc.cluster.local", "AAAA", "NOERROR"),
        ("data.svc.cluster.local", "A", "NOERROR"),
    ] {
        let out = dig(&bed, &[name, rtype]);
        assert_eq!(status(&out), want, "{name} {rtype}:\n{out}");
        assert!(answers(&out).is_empty(), "{out}");
        let authority = section(&out, ";; AUTHORITY SECTION:");
        assert!(
            authority.len() == 1 && authority[0].starts_with("cluster.local. SOA"),
            "{name} {rtype} without the SOA:\n{out}"
        );
    }
    // Not-ready endpoints stay out unless the Service publishes them.
    let out = dig(&bed, &["+short", "db.data.svc.cluster.local", "A"]);
    assert!(!out.contains("10.244.2.22"), "{out}");
}

#[test]
fn other_names_are_forwarded_cached_coalesced_and_served_stale() {
    let bed = setup("dnsfwd", "none");
    let up = &bed.upstream;
    // Cluster-domain misses go to the cluster DNS over TCP.
    let out = dig(
        &bed,
        &["+short", "10-244-9-9.default.pod.cluster.local", "A"],
    );
    assert_eq!(out.trim(), "10.244.9.9");
    assert_eq!(up.count("10-244-9-9.default.pod.cluster.local", "tcp"), 1);
    assert_eq!(up.count("10-244-9-9.default.pod.cluster.local", "udp"), 0);
    // Positive answers are cached: the second question never leaves the node, and its
    // TTL is capped at 30 s.
    for _ in 0..3 {
        let out = dig(&bed, &["ttl300.example.org", "A"]);
        assert_eq!(status(&out), "NOERROR");
        let ttl: u32 = out
            .lines()
            .find(|l| l.starts_with("ttl300.example.org."))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|t| t.parse().ok())
            .unwrap_or(u32::MAX);
        assert!(ttl <= 30, "TTL not capped: {out}");
    }
    assert_eq!(up.count("ttl300.example.org", "udp"), 1);
    // Negative answers too.
    for _ in 0..3 {
        assert_eq!(status(&dig(&bed, &["nx1.example.org", "A"])), "NXDOMAIN");
    }
    assert_eq!(up.count("nx1.example.org", "udp"), 1);
    // Identical concurrent misses share one upstream question.
    let server = format!("@{LISTEN}");
    let netns = format!("--net=/run/netns/{}", bed.cluster.node("node1").netns);
    let children: Vec<_> = (0..6)
        .map(|_| {
            Command::new("nsenter")
                .args([
                    &netns,
                    "--",
                    "dig",
                    "+short",
                    &server,
                    "slow.example.org",
                    "A",
                ])
                .output()
        })
        .map(|o| thread::spawn(move || o))
        .collect();
    for child in children {
        let out = child.join().unwrap().expect("dig");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.1");
    }
    // (spawned one after another but each waits 300 ms upstream: they overlap)
    assert!(
        up.count("slow.example.org", "udp") <= 2,
        "not coalesced: {}",
        up.count("slow.example.org", "udp")
    );
    // Answers larger than the client's buffer are truncated over UDP; TCP gets all.
    let out = dig(&bed, &["+noedns", "+ignore", "big.example.org", "TXT"]);
    assert!(flags(&out).contains("tc"), "no TC bit:\n{out}");
    let out = dig(&bed, &["+tcp", "big.example.org", "TXT"]);
    assert_eq!(answers(&out).len(), 1, "{out}");
    answers_while_it_prefetches(&bed);
    // An expired entry is served only when the upstream fails.
    assert_eq!(
        dig(&bed, &["+short", "ttl1.example.org", "A"]).trim(),
        "192.0.2.1"
    );
    thread::sleep(Duration::from_millis(1_200));
    up.set_silent(true);
    let out = dig(&bed, &["ttl1.example.org", "A"]);
    assert_eq!(status(&out), "NOERROR", "stale entry not served:\n{out}");
    assert_eq!(status(&dig(&bed, &["never.example.org", "A"])), "SERVFAIL");
    up.set_silent(false);
    // The metrics moved, under CoreDNS's names.
    let (_, metrics) = bed
        .agent
        .http_get(&bed.cluster, "127.0.0.1:10249", "/metrics");
    for name in [
        "coredns_dns_requests_total{",
        "coredns_dns_responses_total{rcode=\"NXDOMAIN\"}",
        "coredns_cache_hits_total{type=\"success\"}",
        "coredns_cache_hits_total{type=\"denial\"}",
        "coredns_cache_misses_total",
        "coredns_cache_served_stale_total 1",
        "coredns_cache_prefetch_total 1",
        "coredns_forward_requests_total",
        "coredns_forward_request_duration_seconds_count",
        "coredns_cache_entries{type=\"success\"}",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
}

#[test]
fn an_upstream_sending_garbage_gets_servfail_and_wedges_nothing() {
    let bed = setup("dnsjunk", "none");
    // Over UDP (forwarded names) and over TCP (the cluster domain's misses).
    for name in [
        "garbage-bytes.example.org",
        "garbage-id.example.org",
        "garbage-cut.example.org",
        "garbage-flood.example.org",
        "garbage-bytes.default.pod.cluster.local",
        "garbage-cut.default.pod.cluster.local",
    ] {
        // dig gives up after 3 s: an answer held up by the garbage shows no status.
        let out = dig(&bed, &[name, "A"]);
        assert_eq!(status(&out), "SERVFAIL", "{name}:\n{out}");
        assert!(bed.upstream.count(name, "udp") + bed.upstream.count(name, "tcp") >= 1);
    }
    // Still answering, from the upstream and from the zone.
    assert_eq!(
        dig(&bed, &["+short", "after.example.org", "A"]).trim(),
        "192.0.2.1"
    );
    assert_eq!(
        status(&dig(&bed, &["echo.default.svc.cluster.local", "A"])),
        "NOERROR"
    );
}

#[test]
fn hostile_packets_neither_crash_nor_wedge_it() {
    let bed = setup("dnsbad", "none");
    let server: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let netns = bed.cluster.node("node1").netns.clone();
    // Every packet before the garbage is malformed in a way that deserves FORMERR.
    let packets_with_formerr = 8;
    let replies = within_netns(&netns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let header = |qd: u8| vec![0xab, 0xcd, 0x01, 0x00, 0, qd, 0, 0, 0, 0, 0, 0];
        let mut loop_name = header(1);
        loop_name.extend([0xc0, 12, 0, 1, 0, 1]); // a name pointing at itself
        let mut long_name = header(1);
        for _ in 0..10 {
            long_name.push(63);
            long_name.extend([b'a'; 63]);
        }
        long_name.extend([0, 0, 1, 0, 1]);
        let mut response = header(1);
        response[2] |= 0x80; // QR: a response, never answered (no reflection loops)
        let garbage: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        let packets = [
            vec![],
            vec![1],
            header(0)[..11].to_vec(),
            header(0),
            header(1),
            loop_name,
            long_name,
            response,
            garbage,
        ];
        packets
            .iter()
            .map(|p| {
                let _ = socket.send_to(p, server);
                let mut buf = [0u8; 512];
                (
                    p.clone(),
                    socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec()),
                )
            })
            .collect::<Vec<_>>()
    });
    // Too short to carry an id, or a response: silence. Otherwise an error answer
    // (FORMERR for the malformed questions) with the query's id.
    for (i, (packet, reply)) in replies.iter().enumerate() {
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            assert!(reply.is_none(), "packet {i} answered: {reply:?}");
            continue;
        }
        let reply = reply
            .as_ref()
            .unwrap_or_else(|| panic!("packet {i} unanswered"));
        assert_eq!(reply[..2], packet[..2], "packet {i}: id");
        let rcode = reply[3] & 0x0f;
        assert!(rcode != 0, "packet {i}: accepted: {reply:?}");
        if i < packets_with_formerr {
            assert_eq!(rcode, 1, "packet {i}: rcode {reply:?}");
        }
    }
    // Idle TCP clients do not starve others, and are closed after the idle timeout.
    let idle = within_netns(&netns, move || {
        (0..50)
            .map(|_| TcpStream::connect(server).unwrap())
            .collect::<Vec<_>>()
    });
    let out = dig(
        &bed,
        &["+tcp", "+short", "echo.default.svc.cluster.local", "A"],
    );
    assert_eq!(out.trim(), "10.96.0.50");
    let started = Instant::now();
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut first, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "idle connection not closed");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed only after {:?}",
        started.elapsed()
    );
    // Still answering after all of it.
    assert_eq!(
        dig(&bed, &["+short", "echo.default.svc.cluster.local", "A"]).trim(),
        "10.96.0.50"
    );
    assert!(
        bed.agent.log_text().contains("DNS listening"),
        "{}",
        bed.agent.log_text()
    );
}

#[test]
fn a_pod_resolves_a_service_name_and_connects_to_it() {
    let bed = setup("dnspod", "ebpf");
    let server = format!("@{LISTEN}");
    let out = bed.cluster.run_in_pod(
        "client",
        &[
            "dig",
            "+short",
            &server,
            "echo.default.svc.cluster.local",
            "A",
        ],
    );
    let ip = out.trim();
    assert_eq!(ip, ECHO_IP, "{out}");
    let testpod = testpod_bin().display().to_string();
    let lines = bed.cluster.run_in_pod(
        "client",
        &[&testpod, "request", "tcp", &format!("{ip}:80"), "4"],
    );
    assert!(lines.lines().all(|l| l.starts_with("ok web-")), "{lines}");
}

const KUBE_DNS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 53},
          {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kube-dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
endpoints:
- addresses: [10.244.2.53]
  nodeName: node2
";

/// Who answered a query the client pod sent to kube-dns's ClusterIP: the local cache
/// (authoritative, the Service's real address) or kube-dns (our fake, 192.0.2.1).
fn via_kube_dns(bed: &Bed) -> &'static str {
    let args = [
        "dig",
        "+time=1",
        "+tries=1",
        "@10.96.0.10",
        "echo.default.svc.cluster.local",
        "A",
    ];
    let output = bed
        .cluster
        .command_in_pod("client", &args)
        .output()
        .expect("dig");
    let out = String::from_utf8_lossy(&output.stdout);
    if std::env::var_os("DNS_DEBUG").is_some() {
        eprintln!("{out}");
    }
    if out.contains("10.96.0.50") && flags(&out).contains("aa") {
        "local"
    } else if out.contains("192.0.2.1") {
        "kube-dns"
    } else {
        "none"
    }
}

#[test]
fn kube_dns_queries_go_to_the_local_cache_while_it_answers() {
    kube_dns_local("dnsredir", "ebpf");
}

#[test]
fn kube_dns_queries_go_to_the_local_cache_with_nftables() {
    kube_dns_local("dnsnotrk", "nftables");
}

fn kube_dns_local(tag: &str, dataplane: &str) {
    let mut cluster = scenarios::echo_cluster(tag);
    cluster.add_pod("node2", "coredns", 53);
    // kube-dns's pod: the in-test server, which answers every A question with 192.0.2.1.
    let kube_dns = Upstream::start(&cluster.pod("coredns").netns, "10.244.2.53:53");
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(
        &dir,
        "echo-svc.yaml",
        &manifests::service("echo", ECHO_IP, &SVC_PORTS),
    );
    manifests::write(&dir, "kube-dns.yaml", KUBE_DNS);
    // No --dns-upstream: cluster names the agent does not know go to kube-dns's pods.
    let args: Vec<String> = [
        "--manifests",
        &dir.display().to_string(),
        "--dns-listen",
        LISTEN,
        "--dns-forward",
        "10.244.2.53:53",
        "--dataplane",
        dataplane,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let agent = Agent::start_with(&mut cluster, "node1", &args);
    let bed = Bed {
        cluster,
        agent,
        upstream: kube_dns,
    };
    let wait_for = |bed: &Bed, want: &str, limit: Duration| {
        let started = Instant::now();
        while via_kube_dns(bed) != want {
            assert!(
                started.elapsed() < limit,
                "queries to kube-dns not served by {want} after {limit:?}\n{}",
                bed.agent.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    };
    wait_for(&bed, "local", Duration::from_secs(3));
    // A cluster name only kube-dns knows is forwarded to its pod over TCP, and the
    // answer comes back from the ClusterIP the pod asked (dig checks the source).
    let out = bed.cluster.run_in_pod(
        "client",
        &[
            "dig",
            "+short",
            "@10.96.0.10",
            "10-244-9-9.default.pod.cluster.local",
            "A",
        ],
    );
    assert_eq!(out.trim(), "10.244.9.9");
    assert_eq!(
        bed.upstream
            .count("10-244-9-9.default.pod.cluster.local", "tcp"),
        1
    );

    let mut bed = bed;
    if dataplane == "ebpf" {
        // A crashed agent (no chance to clean up): kube-dns takes over once the
        // heartbeat is stale. (nftables, like node-cache, needs the exit path.)
        bed.cluster.signal("node1", "agent", "KILL");
        let took = wait_for(&bed, "kube-dns", Duration::from_secs(8));
        println!("after SIGKILL, kube-dns answered within {took:?}");
        bed.agent.respawn(&mut bed.cluster);
        wait_for(&bed, "local", Duration::from_secs(10));
    }
    // A graceful exit hands over at once.
    bed.cluster.terminate("node1", "agent");
    wait_for(&bed, "kube-dns", Duration::from_secs(1));
}

/// A popular entry in the last tenth of its life is refreshed in the background
/// (prefetch), started from the thread that answers it on the hot path; every answer
/// meanwhile is the cached one, and the agent goes on answering.
fn answers_while_it_prefetches(bed: &Bed) {
    let up = &bed.upstream;
    // The wire form of an answer lives 1 s, so the hits at 1.2 s and 2.4 s reach the
    // cache, and the one at 7.5 s (of 8 s) prefetches.
    let started = Instant::now();
    for at in [0.0, 1.2, 2.4, 7.5] {
        thread::sleep(Duration::from_secs_f64(at).saturating_sub(started.elapsed()));
        assert_eq!(
            dig(bed, &["+short", "ttl8.example.org", "A"]).trim(),
            "192.0.2.1"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while up.count("ttl8.example.org", "udp") < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up.count("ttl8.example.org", "udp"), 2, "no prefetch");
    assert_eq!(
        dig(bed, &["+short", "ttl8.example.org", "A"]).trim(),
        "192.0.2.1",
        "the agent stopped answering after a prefetch"
    );
}
