//! The packet-flow table against a real kernel: the node under test sits between an
//! `outside` namespace holding every client address of the table, a `backends`
//! namespace holding every endpoint address (each answering with its own address and
//! the peer it saw), and a sink router answering everything else with ICMP unreachable.
//! A dataplane programs the node; each case is then observed with real connections.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use proxy_agent::model::{self, flow::Packet, Protocol, Snapshot};

use crate::{
    agent::testpod_bin,
    cluster::{sh_in, Cluster},
    flows::{self, Case},
};

/// Where masqueraded traffic appears to come from (the node's address toward backends).
pub const MASQ_V4: &str = "10.99.0.1";
pub const MASQ_V6: &str = "fd00:99::1";
const PROBE_TIMEOUT_MS: &str = "300";
const ATTEMPTS: &str = "16";

/// The node under test with its neighbours.
pub struct FlowBed {
    pub cluster: Cluster,
    pub node: String,
    pub node_ns: String,
    outside: String,
    node_addresses: Vec<IpAddr>,
}

fn all_endpoints(snapshot: &Snapshot) -> BTreeSet<(Protocol, IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for slice in snapshot.endpoint_slices().values() {
        for port in &slice.ports {
            let (Some(protocol), Some(number)) =
                (Protocol::from_k8s(port.protocol.as_deref()), port.port)
            else {
                continue;
            };
            for ip in slice.endpoints.iter().map(|e| e.address) {
                out.insert((protocol, ip, u16::try_from(number).unwrap_or(0)));
            }
        }
    }
    out
}

/// Forwarding and ICMP settings, and the three veth links of the node under test.
fn wire(node_ns: &str, outside: &str, backends: &str, sink: &str) {
    for ns in [node_ns, sink] {
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
        ] {
            sh_in(ns, &["sysctl", "-qw", key]);
        }
    }
    sh_in(
        node_ns,
        &["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
    );
    for (link, peer, peer_ns) in [
        ("out0", "eth0", outside),
        ("be0", "eth0", backends),
        ("sink0", "eth0", sink),
    ] {
        sh_in(
            node_ns,
            &[
                "ip", "link", "add", link, "type", "veth", "peer", "name", peer, "netns", peer_ns,
            ],
        );
        sh_in(node_ns, &["ip", "link", "set", link, "up"]);
        sh_in(peer_ns, &["ip", "link", "set", peer, "up"]);
    }
}

/// The node's addresses (host routes only, so another node's address is not on-link
/// but goes to the sink), its default route to the sink, and the sink's answers.
fn route_node(node_ns: &str, sink: &str, addresses: &[IpAddr]) {
    let addr = |ns: &str, cidr: &str, dev: &str| {
        sh_in(ns, &["ip", "addr", "add", cidr, "dev", dev, "nodad"])
    };
    for ip in addresses {
        addr(node_ns, &host(*ip), "out0");
    }
    addr(node_ns, &format!("{MASQ_V4}/32"), "be0");
    addr(node_ns, &format!("{MASQ_V6}/128"), "be0");
    addr(node_ns, "10.98.0.1/30", "sink0");
    addr(node_ns, "fd00:98::1/64", "sink0");
    addr(sink, "10.98.0.2/30", "eth0");
    addr(sink, "fd00:98::2/64", "eth0");
    for ip in addresses {
        route_back(sink, *ip);
    }
    sh_in(
        node_ns,
        &["ip", "route", "add", "default", "via", "10.98.0.2"],
    );
    sh_in(
        node_ns,
        &["ip", "-6", "route", "add", "default", "via", "fd00:98::2"],
    );
    // "Administratively prohibited" is a hard ICMP error that TCP and UDP sockets
    // report at once (plain unreachable is soft: UDP ignores it, TCP retries).
    sh_in(sink, &["ip", "route", "add", "prohibit", "default"]);
    sh_in(sink, &["ip", "-6", "route", "add", "prohibit", "default"]);
}

/// The sink's way back to a client, for its ICMP unreachable answers.
fn route_back(sink: &str, ip: IpAddr) {
    let via = if ip.is_ipv4() {
        "10.98.0.1"
    } else {
        "fd00:98::1"
    };
    sh_in(sink, &["ip", "route", "add", &host(ip), "via", via]);
}

fn host(ip: IpAddr) -> String {
    if ip.is_ipv4() {
        format!("{ip}/32")
    } else {
        format!("{ip}/128")
    }
}

impl FlowBed {
    /// Builds the bed for `node` of the flow fixture, for the clients `cases` use.
    #[must_use]
    pub fn new(tag: &str, node: &str, cases: &[Case]) -> Self {
        let snapshot = flows::snapshot();
        let info = flows::node(&snapshot, node);
        let cluster = Cluster::new(tag);
        let node_ns = cluster.add_netns("node");
        let outside = cluster.add_netns("outside");
        let backends = cluster.add_netns("backends");
        let sink = cluster.add_netns("sink");
        wire(&node_ns, &outside, &backends, &sink);
        let addr = |ns: &str, cidr: &str, dev: &str| {
            sh_in(ns, &["ip", "addr", "add", cidr, "dev", dev, "nodad"])
        };
        route_node(&node_ns, &sink, &info.addresses);
        let v4 = info
            .addresses
            .iter()
            .find(|a| a.is_ipv4())
            .map(ToString::to_string)
            .unwrap_or_default();
        let v6 = info
            .addresses
            .iter()
            .find(|a| a.is_ipv6())
            .map(ToString::to_string)
            .unwrap_or_default();
        for (ns, via4, via6) in [
            (&outside, v4.as_str(), v6.as_str()),
            (&backends, MASQ_V4, MASQ_V6),
        ] {
            sh_in(
                ns,
                &[
                    "ip", "route", "add", "default", "via", via4, "dev", "eth0", "onlink",
                ],
            );
            sh_in(
                ns,
                &[
                    "ip", "-6", "route", "add", "default", "via", via6, "dev", "eth0", "onlink",
                ],
            );
        }
        let mut listeners = Vec::new();
        let endpoint_ips: BTreeSet<IpAddr> = all_endpoints(&snapshot).iter().map(|e| e.1).collect();
        for ip in &endpoint_ips {
            addr(&backends, &host(*ip), "eth0");
            sh_in(&node_ns, &["ip", "route", "add", &host(*ip), "dev", "be0"]);
        }
        for (protocol, ip, port) in all_endpoints(&snapshot) {
            let socket = std::net::SocketAddr::new(ip, port);
            match protocol {
                Protocol::Tcp => listeners.push(format!("tcp:{socket}")),
                Protocol::Udp => listeners.push(format!("udp:{socket}")),
                Protocol::Sctp => {}
            }
        }
        let sources: BTreeSet<IpAddr> = cases
            .iter()
            .filter(|c| {
                c.node == node && info.classify(c.packet.source, None) != model::SourceClass::Node
            })
            .map(|c| c.packet.source)
            .filter(|s| !endpoint_ips.contains(s))
            .collect();
        for source in &sources {
            addr(&outside, &host(*source), "eth0");
            sh_in(
                &node_ns,
                &["ip", "route", "add", &host(*source), "dev", "out0"],
            );
            route_back(&sink, *source);
        }
        let mut bed = Self {
            cluster,
            node: node.to_owned(),
            node_ns,
            outside,
            node_addresses: info.addresses.clone(),
        };
        let testpod = testpod_bin().display().to_string();
        let mut args = vec![testpod.as_str(), "serve-each"];
        args.extend(listeners.iter().map(String::as_str));
        bed.cluster.spawn_in_netns(&backends, &args);
        bed.serve_node_ports(node, &info.addresses, cases);
        std::thread::sleep(Duration::from_millis(300));
        bed
    }

    /// Listeners on the node's own probed ports: a packet no rule takes is answered by
    /// the node itself (PASS), so a refusal can only be a REJECT rule.
    fn serve_node_ports(&mut self, node: &str, addresses: &[IpAddr], cases: &[Case]) {
        let testpod = testpod_bin().display().to_string();
        let local: BTreeSet<String> = cases
            .iter()
            .filter(|c| {
                c.node == node
                    && (c.packet.destination.is_loopback()
                        || addresses.contains(&c.packet.destination))
            })
            .filter(|c| c.packet.protocol != Protocol::Sctp)
            .map(|c| {
                let proto = if c.packet.protocol == Protocol::Udp {
                    "udp"
                } else {
                    "tcp"
                };
                format!(
                    "{proto}:{}",
                    std::net::SocketAddr::new(c.packet.destination, c.packet.port)
                )
            })
            .collect();
        let mut args = vec![testpod.as_str(), "serve-each"];
        args.extend(local.iter().map(String::as_str));
        let node_ns = self.node_ns.clone();
        self.cluster.spawn_in_netns(&node_ns, &args);
    }

    /// Why a case cannot be observed on this bed, if it cannot.
    #[must_use]
    pub fn unobservable(&self, case: &Case) -> Option<&'static str> {
        if case.packet.protocol == Protocol::Sctp {
            return Some("the probe has no SCTP sockets");
        }
        if case.expected == "PASS"
            && case.packet.destination.is_ipv6()
            && !self.node_addresses.contains(&case.packet.destination)
        {
            // Reproduced without any dataplane: the sink's ICMPv6 "prohibited" for a
            // forwarded packet never reaches the client here, so PASS shows as DROP.
            return Some(
                "IPv6 PASS needs an ICMPv6 error the sink router does not deliver on this kernel",
            );
        }
        if case.expected.contains("hairpin") {
            return Some(
                "the client address is also an endpoint address in the backends namespace",
            );
        }
        None
    }

    /// Whether the case's client is the node itself (loopback or a node address).
    #[must_use]
    pub fn from_node(&self, case: &Case) -> bool {
        case.packet.source.is_loopback() || self.node_addresses.contains(&case.packet.source)
    }

    /// Runs the real agent on the node under test with `dataplane`, reading the flow
    /// fixture, and waits until it is healthy.
    ///
    /// # Panics
    /// When the agent does not become healthy within 20 s.
    pub fn start_agent(&mut self, dataplane: &str) {
        crate::cluster::ensure_bpffs();
        let cgroup = self.cluster.cgroup_dir("socket-lb");
        let bpffs = self.cluster.bpffs_dir(&self.node);
        let fixture = flows::dir().join("cluster");
        let agent = crate::agent::agent_bin().display().to_string();
        let args = [
            agent.as_str(),
            "run",
            "--node-name",
            &self.node,
            "--manifests",
            &fixture.display().to_string(),
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--dataplane",
            dataplane,
            "--cgroup-root",
            &cgroup.display().to_string(),
            "--bpffs",
            &bpffs.display().to_string(),
            "--healthz-bind-address",
            "127.0.0.1:10256",
        ]
        .map(ToOwned::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let node_ns = self.node_ns.clone();
        let log = self.cluster.scratch().join("agent.log");
        let file = std::fs::File::create(&log).expect("agent log");
        self.cluster
            .spawn_in_netns_with(&node_ns, &args, std::process::Stdio::from(file));
        let testpod = testpod_bin().display().to_string();
        let started = std::time::Instant::now();
        while !sh_in(
            &self.node_ns,
            &[&testpod, "http-get", "127.0.0.1:10256", "/healthz"],
        )
        .starts_with("200")
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the agent is not healthy after 20 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Observes every case of this node that neither the bed nor `skip` rules out, and
    /// adds each outcome to `tally`.
    pub fn run_table(
        &self,
        cases: &[Case],
        tally: &mut Tally,
        skip: impl Fn(&Case) -> Option<&'static str>,
    ) {
        for case in cases.iter().filter(|c| c.node == self.node) {
            if let Some(why) = self.unobservable(case).or_else(|| skip(case)) {
                tally
                    .skipped
                    .push(format!("cases.txt:{} ({why})", case.line));
                continue;
            }
            tally.observed += 1;
            let seen = self.observe(case);
            if !matches_oracle(&case.expected, &seen) {
                tally.failures.push(format!(
                    "cases.txt:{} {:?}\n  want {}\n  saw  {seen}",
                    case.line, case.packet, case.expected
                ));
            }
        }
    }

    /// Observes `case` with real connections and describes the outcome in the oracle's
    /// words (`PASS`, `REJECT`, `DROP`, or endpoints with `masq`).
    #[must_use]
    pub fn observe(&self, case: &Case) -> String {
        let packet: Packet = case.packet;
        let from_node = self.from_node(case);
        let ns = if from_node {
            &self.node_ns
        } else {
            &self.outside
        };
        let proto = if packet.protocol == Protocol::Udp {
            "udp"
        } else {
            "tcp"
        };
        let to = std::net::SocketAddr::new(packet.destination, packet.port).to_string();
        let testpod = testpod_bin().display().to_string();
        let expect_drop = matches!(case.expected.as_str(), "DROP" | "REJECT" | "PASS");
        let attempts = if expect_drop { "1" } else { ATTEMPTS };
        let out = sh_in(
            ns,
            &[
                &testpod,
                "probe",
                proto,
                &packet.source.to_string(),
                &to,
                attempts,
                PROBE_TIMEOUT_MS,
            ],
        );
        classify(&out, &to, packet.source)
    }
}

/// Cases observed, skipped (with why) and differing from the oracle, over a table run.
#[derive(Debug, Default)]
pub struct Tally {
    pub observed: usize,
    pub skipped: Vec<String>,
    pub failures: Vec<String>,
}

impl Tally {
    /// Prints the counts and fails on any difference, or when fewer than
    /// `min_observed` cases were observed.
    ///
    /// # Panics
    /// On a difference from the oracle or too few observations.
    pub fn assert_passed(&self, min_observed: usize) {
        println!(
            "{} cases observed on the kernel, {} skipped: {}",
            self.observed,
            self.skipped.len(),
            self.skipped.join(", ")
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} cases differ from the oracle:\n{}",
            self.failures.len(),
            self.observed,
            self.failures.join("\n")
        );
        assert!(self.observed >= min_observed, "too few cases observed");
    }
}

/// Whether an observed outcome is what the oracle expects: the verdict, or the set of
/// endpoints and the masquerade (with affinity, one endpoint of the set).
fn matches_oracle(expected: &str, seen: &str) -> bool {
    let (want_set, want_masq, want_verdict) = expected_view(expected);
    if let Some(verdict) = want_verdict {
        return seen == verdict;
    }
    let (got_set, got_masq, _) = expected_view(seen);
    let set_ok = if expected.contains("affinity=") {
        got_set.len() == 1 && got_set.is_subset(&want_set)
    } else {
        got_set == want_set
    };
    set_ok && got_masq == want_masq && !seen.contains("mixed")
}

/// Turns probe lines into the oracle's outcome text.
fn classify(out: &str, to: &str, source: IpAddr) -> String {
    let mut endpoints = BTreeSet::new();
    let mut masquerade = BTreeSet::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["ok", endpoint, _] if *endpoint == to => return "PASS".to_owned(),
            ["ok", endpoint, peer] => {
                endpoints.insert((*endpoint).to_owned());
                let peer_ip = peer
                    .rsplit_once(':')
                    .map_or(*peer, |(ip, _)| ip)
                    .trim_matches(['[', ']']);
                masquerade.insert(peer_ip != source.to_string());
            }
            ["err", "ConnectionRefused"] => return "REJECT".to_owned(),
            ["err", "TimedOut" | "WouldBlock"] => return "DROP".to_owned(),
            ["err", "HostUnreachable" | "NetworkUnreachable" | "PermissionDenied"] => {
                return "PASS".to_owned()
            }
            _ => return format!("unexpected probe output {line:?}"),
        }
    }
    let sorted: Vec<String> = endpoints.into_iter().collect();
    let masq = match masquerade.len() {
        1 if masquerade.contains(&true) => " masq",
        1 => "",
        _ => " (mixed masquerade)",
    };
    format!("{}{masq}", sorted.join(","))
}

/// The oracle's expectation reduced to what a probe can see: affinity shows as one
/// endpoint among the expected ones, so the caller compares sets.
#[must_use]
pub fn expected_view(expected: &str) -> (BTreeSet<String>, bool, Option<String>) {
    let mut parts = expected.split_whitespace();
    let head = parts.next().unwrap_or_default();
    if matches!(head, "PASS" | "REJECT" | "DROP") {
        return (BTreeSet::new(), false, Some(head.to_owned()));
    }
    let rest: Vec<&str> = parts.collect();
    (
        head.split(',').map(str::to_owned).collect(),
        rest.contains(&"masq"),
        None,
    )
}
