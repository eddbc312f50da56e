//! Ready-made simulated clusters shared by the end-to-end tests.
use std::{
    io::{BufRead, BufReader, Lines},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{
    agent::{testpod_bin, Agent},
    cluster::Cluster,
    manifests::{self, Endpoint},
};

/// The echo Service's address and ports, and its pods' ports.
pub const ECHO_IP: &str = "10.96.0.50";
pub const SVC_PORTS: [(&str, &str, u16); 2] = [("http", "TCP", 80), ("dns", "UDP", 53)];
pub const POD_PORTS: [(&str, &str, u16); 2] = [("http", "TCP", 8080), ("dns", "UDP", 5353)];

/// Two nodes; echo pods web-a (10.244.1.2, node1), web-b (10.244.2.2, node2) and
/// web-c (10.244.2.3, node2) answering on TCP 8080 and UDP 5353 (and echoing lines on
/// TCP 7070); a client pod
/// (10.244.1.10) on node1. No agent yet.
#[must_use]
pub fn echo_cluster(tag: &str) -> Cluster {
    let mut cluster = Cluster::new(tag);
    cluster.add_node("node1", 1);
    cluster.add_node("node2", 2);
    let testpod = testpod_bin().display().to_string();
    for (node, pod, host) in [
        ("node1", "web-a", 2),
        ("node2", "web-b", 2),
        ("node2", "web-c", 3),
    ] {
        cluster.add_pod(node, pod, host);
        cluster.spawn_in_pod(
            pod,
            &[&testpod, "serve", pod, "tcp:8080", "udp:5353", "echo:7070"],
        );
    }
    cluster.add_pod("node1", "client", 10);
    cluster
}

/// `count` requests from the client pod; one output line each.
#[must_use]
pub fn requests(cluster: &Cluster, proto: &str, to: &str, count: usize) -> Vec<String> {
    let testpod = testpod_bin().display().to_string();
    cluster
        .run_in_pod(
            "client",
            &[&testpod, "request", proto, to, &count.to_string()],
        )
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The pod that answered each datagram of `testpod udp-from`; a lost one fails the test.
#[must_use]
pub fn udp_flow_pods(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            assert!(l.starts_with("ok "), "datagram lost: {l}");
            l.split_whitespace().nth(1).expect("a pod name").to_owned()
        })
        .collect()
}

/// web-a (node1) and web-b (node2), ready: a Service's endpoints on both nodes.
pub const WEB_A_AND_B: [Endpoint<'static>; 2] = [
    Endpoint {
        ip: "10.244.1.2",
        ready: true,
        node: "node1",
    },
    Endpoint {
        ip: "10.244.2.2",
        ready: true,
        node: "node2",
    },
];

/// What a client (`testpod request-for`, `hold`, ...) printed once it exits.
#[must_use]
pub fn client_report(child: Child) -> String {
    let output = child.wait_with_output().expect("client output");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The empty Service (no endpoints) beside echo in a [`Bed`].
pub const EMPTY_IP: &str = "10.96.0.51";

/// The echo cluster with an agent on node1 reading a manifests directory.
pub struct Bed {
    pub cluster: Cluster,
    pub agent: Agent,
    pub dir: PathBuf,
}

fn endpoints(ready: &[(&'static str, bool, &'static str)]) -> Vec<Endpoint<'static>> {
    ready
        .iter()
        .map(|&(ip, ready, node)| Endpoint { ip, ready, node })
        .collect()
}

/// The echo cluster with the eBPF agent serving node1: echo has web-a and web-b ready
/// and web-c not ready; empty has no endpoints.
#[must_use]
pub fn setup(tag: &str) -> Bed {
    setup_on(tag, "ebpf")
}

/// The same with the agent on `dataplane`.
#[must_use]
pub fn setup_on(tag: &str, dataplane: &str) -> Bed {
    setup_with(tag, &crate::agent::agent_bin(), &["--dataplane", dataplane])
}

/// The same running the agent `binary` with `args` beside `--manifests`.
#[must_use]
pub fn setup_with(tag: &str, binary: &Path, args: &[&str]) -> Bed {
    let mut cluster = echo_cluster(tag);
    let dir = cluster.scratch().join("manifests");
    std::fs::create_dir_all(&dir).expect("manifests directory");
    manifests::write(
        &dir,
        "echo-svc.yaml",
        &manifests::service("echo", ECHO_IP, &SVC_PORTS),
    );
    manifests::write(
        &dir,
        "empty-svc.yaml",
        &manifests::service("empty", EMPTY_IP, &SVC_PORTS[..1]),
    );
    write_echo_slice(
        &dir,
        &[
            ("10.244.1.2", true, "node1"),
            ("10.244.2.2", true, "node2"),
            ("10.244.2.3", false, "node2"),
        ],
    );
    let mut source = vec!["--manifests".to_owned(), dir.display().to_string()];
    source.extend(args.iter().map(|&arg| arg.to_owned()));
    let agent = Agent::spawn_binary(&mut cluster, "node1", &source, binary);
    agent.wait_healthy(&cluster);
    Bed {
        cluster,
        agent,
        dir,
    }
}

/// Rewrites echo's `EndpointSlice` with `(address, ready, node)` endpoints.
pub fn write_echo_slice(dir: &Path, eps: &[(&'static str, bool, &'static str)]) {
    manifests::write(
        dir,
        "echo-slice.yaml",
        &manifests::slice("echo-abc", "echo", &POD_PORTS, &endpoints(eps)),
    );
}

/// From the LAN client, for four seconds: a long-lived connection to an echo port and a
/// stream of new connections, to be carried across whatever the test does meanwhile.
pub struct LanLoad {
    held: Child,
    stream: Child,
}

impl LanLoad {
    /// Starts both clients: the held connection to `hold_to`, the stream to `stream_to`.
    ///
    /// # Panics
    /// When a client cannot start.
    #[must_use]
    pub fn start(cluster: &Cluster, hold_to: &str, stream_to: &str) -> Self {
        let testpod = testpod_bin().display().to_string();
        let spawn = |args: &[&str]| {
            cluster
                .command_in_lan(args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a LAN client")
        };
        Self {
            held: spawn(&[&testpod, "hold", hold_to, "4000"]),
            stream: spawn(&[&testpod, "request-for", "tcp", stream_to, "4000"]),
        }
    }

    /// Waits for both to end: their reports (`exchanges=N err=0`, `ok=N err=0 …`).
    ///
    /// # Panics
    /// When the held connection broke or a new one failed (`context` follows the
    /// stream's report).
    #[must_use]
    pub fn carried_on(self, context: &str) -> (String, String) {
        let (held, stream) = (client_report(self.held), client_report(self.stream));
        assert!(
            held.ends_with("err=0"),
            "the long-lived connection broke: {held}"
        );
        assert!(
            stream.contains(" err=0"),
            "new connections failed: {stream}{context}"
        );
        (held, stream)
    }
}

/// A long-lived connection to `hold_to` (an echo port) and a stream of new connections
/// to `stream_to`, both from the LAN client, across a SIGTERM + restart of `agent` and
/// then an upgrade to a copy of its binary. Returns the two reports
/// (`exchanges=N err=0`, `ok=N err=0 …`).
///
/// # Panics
/// When an agent exits badly, an exchange or a connection fails, or too few ran.
pub fn restart_under_load(
    cluster: &mut Cluster,
    agent: &Agent,
    hold_to: &str,
    stream_to: &str,
) -> (String, String) {
    let upgraded = cluster.scratch().join("proxy-agent-upgraded");
    std::fs::copy(crate::agent::agent_bin(), &upgraded).expect("copy the agent");
    let load = LanLoad::start(cluster, hold_to, stream_to);
    let started = Instant::now();
    let mut restarts = Vec::new();
    std::thread::sleep(Duration::from_millis(400));
    for binary in [None, Some(&upgraded)] {
        let stopping = started.elapsed().as_millis();
        let exits = cluster.terminate(&agent.node, "agent");
        assert!(exits.iter().all(ExitStatus::success), "{exits:?}");
        match binary {
            None => agent.respawn(cluster),
            Some(path) => agent.respawn_with(cluster, path),
        }
        agent.wait_healthy(cluster);
        restarts.push(format!(
            "stopped at {stopping} ms, healthy at {} ms",
            started.elapsed().as_millis()
        ));
        std::thread::sleep(Duration::from_millis(300));
    }
    let (held, stream) = load.carried_on(&format!("\nagent restarts: {restarts:?}"));
    let count = |text: &str, key: &str| -> u64 {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(count(&held, "exchanges=") > 100, "{held}");
    assert!(count(&stream, "ok=") > 100, "{stream}");
    (held, stream)
}

/// A long-lived connected UDP client in the client pod (`testpod udp-hold`, one
/// datagram every 50 ms for 5 s), read line by line.
pub struct UdpHold {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// The `ok POD` line of its first exchanges.
    pub pinned: String,
}

/// What a [`UdpHold`] client saw after a change: the lines before it first reached the
/// wanted pod, how long after the change that was, and the lines from then on.
#[derive(Debug)]
pub struct Moved {
    pub before: Vec<String>,
    pub after_move: Option<Duration>,
    pub after: Vec<String>,
}

impl UdpHold {
    /// Starts the client toward `to` and waits for four exchanges, which must all have
    /// reached one pod.
    ///
    /// # Panics
    /// When the client cannot start or its first exchanges disagree.
    #[must_use]
    pub fn start(cluster: &Cluster, to: &str) -> Self {
        let testpod = testpod_bin().display().to_string();
        let mut child = cluster
            .command_in_pod("client", &[&testpod, "udp-hold", to, "5000"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("udp-hold");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first: Vec<String> = lines.by_ref().take(4).map_while(Result::ok).collect();
        assert!(
            first.len() == 4 && first.iter().all(|l| *l == first[0] && l.starts_with("ok ")),
            "one socket, one backend: {first:?}"
        );
        let pinned = first[0].clone();
        Self {
            child,
            lines,
            pinned,
        }
    }

    /// Reads the client to its end: when it first got `want` (`ok POD`), timed from
    /// `since`.
    ///
    /// # Panics
    /// When the client cannot be waited for.
    #[must_use]
    pub fn follow(mut self, want: &str, since: Instant) -> Moved {
        let mut moved = Moved {
            before: Vec::new(),
            after_move: None,
            after: Vec::new(),
        };
        for line in self.lines.map_while(Result::ok) {
            if moved.after_move.is_none() && line == want {
                moved.after_move = Some(since.elapsed());
            }
            if moved.after_move.is_some() {
                moved.after.push(line);
            } else {
                moved.before.push(line);
            }
        }
        self.child.wait().expect("udp-hold exit");
        moved
    }
}

impl Moved {
    /// Asserts the client reached `want` within two seconds and never left it again;
    /// returns how many times it replaced its socket meanwhile.
    ///
    /// # Panics
    /// When it did not move, moved late, or went back.
    #[must_use]
    pub fn assert_moved_to(&self, want: &str) -> usize {
        let after = self
            .after_move
            .unwrap_or_else(|| panic!("never reached {want}: {:?}", self.before));
        assert!(
            after < Duration::from_secs(2),
            "moved only after {after:?}: {:?}",
            self.before
        );
        assert!(
            self.after.iter().all(|l| l == want),
            "the removed endpoint answered again: {:?}",
            self.after
        );
        self.before.iter().filter(|l| *l == "reconnect").count()
    }
}

/// The eBPF agent destroyed a [`UdpHold`] client's socket: the client replaced it
/// (`replaced` times), and the agent's metric counts it.
///
/// # Panics
/// When neither shows.
pub fn assert_destroyed(cluster: &Cluster, agent: &Agent, replaced: usize) {
    assert!(
        replaced >= 1,
        "the socket was not destroyed\n{}",
        agent.log_text()
    );
    let (_, metrics) = agent.http_get(cluster, "127.0.0.1:10249", "/metrics");
    let destroyed =
        crate::agent::sample_sum(&metrics, "proxyagent_udp_sockets_destroyed_total", &[]);
    assert!(destroyed >= 1.0, "{metrics}");
}

/// Asserts a `testpod request-for` report (`ok=N err=0 …`): no connection failed
/// `what`, and enough were made to prove it.
///
/// # Panics
/// When a connection failed or 100 or fewer were made.
pub fn assert_served(report: &str, what: &str) {
    assert!(
        report.contains(" err=0"),
        "connections failed {what}: {report}"
    );
    let ok: u64 = report
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ok="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok > 100, "too few connections: {report}");
}

/// One probe's answer: the pod that answered and the address it saw the client as, or
/// the error line.
pub type Probed = Result<(String, String), String>;

/// `count` `proto` connections from `source` (in `pod`, or the LAN for `None`) to `to`,
/// each with a 700 ms timeout.
#[must_use]
pub fn probe(
    cluster: &Cluster,
    pod: Option<&str>,
    proto: &str,
    source: &str,
    to: &str,
    count: usize,
) -> Vec<Probed> {
    let testpod = crate::agent::testpod_bin().display().to_string();
    let count = count.to_string();
    let args = [testpod.as_str(), "probe", proto, source, to, &count, "700"];
    let out = match pod {
        Some(pod) => cluster.run_in_pod(pod, &args),
        None => cluster.run_in_lan(&args),
    };
    out.lines()
        .map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["ok", pod, peer] => Ok((
                    pod.to_owned(),
                    peer.rsplit_once(':').map_or(peer, |(ip, _)| ip).to_owned(),
                )),
                _ => Err(line.to_owned()),
            },
        )
        .collect()
}
