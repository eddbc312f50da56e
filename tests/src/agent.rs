//! Starting the real `proxy-agent` binary for a node of a simulated cluster, and
//! waiting for what it has programmed.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::cluster::Cluster;

/// The release agent binary `cargo xtask build` produced (or `PROXY_AGENT_BIN`).
#[must_use]
pub fn agent_bin() -> PathBuf {
    std::env::var_os("PROXY_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/proxy-agent"),
        PathBuf::from,
    )
}

/// The agent built with `fault-hooks` (`cargo xtask build`'s `proxy-agent-faults`, or
/// `PROXY_AGENT_FAULTS_BIN`): faults armed through `PUT /debug/faults/{point}`.
#[must_use]
pub fn faults_agent_bin() -> PathBuf {
    std::env::var_os("PROXY_AGENT_FAULTS_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/proxy-agent-faults"),
        PathBuf::from,
    )
}

/// The `testpod` helper built beside the running test or demo binary.
#[must_use]
pub fn testpod_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TESTPOD_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("testpod"))
        .find(|p| p.exists())
        .expect("testpod binary next to the test binary")
}

/// An agent serving one node; its log is kept for assertions and failure output.
pub struct Agent {
    pub node: String,
    pub log: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup_root: PathBuf,
    source: Vec<String>,
    binary: PathBuf,
}

impl Agent {
    /// Starts the agent on `node` reading `manifests`, and waits for `/healthz` 200.
    pub fn start(cluster: &mut Cluster, node: &str, manifests: &Path) -> Self {
        Self::start_with(
            cluster,
            node,
            &["--manifests".into(), manifests.display().to_string()],
        )
    }

    /// Starts the agent on `node` with `source` arguments (`--manifests DIR` or
    /// `--kubeconfig FILE`), and waits for `/healthz` 200.
    pub fn start_with(cluster: &mut Cluster, node: &str, source: &[String]) -> Self {
        let agent = Self::spawn_with(cluster, node, source);
        agent.wait_healthy(cluster);
        agent
    }

    /// Starts the agent on `node` with `source` arguments, without waiting.
    pub fn spawn_with(cluster: &mut Cluster, node: &str, source: &[String]) -> Self {
        Self::spawn_binary(cluster, node, source, &agent_bin())
    }

    /// [`Self::spawn_with`] running `bin` (this and every restart).
    pub fn spawn_binary(cluster: &mut Cluster, node: &str, source: &[String], bin: &Path) -> Self {
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask build`",
            bin.display()
        );
        let log = cluster.scratch().join(format!("agent-{node}.log"));
        let bpffs = cluster.bpffs_dir(node);
        let cgroup_root = cluster.node(node).cgroup.clone();
        let agent = Self {
            node: node.to_owned(),
            log,
            bpffs,
            cgroup_root,
            source: source.to_vec(),
            binary: bin.to_owned(),
        };
        agent.respawn(cluster);
        agent
    }

    /// Starts another agent process for the same node with the same source (a restart
    /// or upgrade).
    pub fn respawn(&self, cluster: &mut Cluster) {
        self.respawn_with(cluster, &self.binary);
    }

    /// [`Self::respawn`] running `binary` (an upgrade).
    pub fn respawn_with(&self, cluster: &mut Cluster, binary: &Path) {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut args = vec![
            binary.display().to_string(),
            "run".into(),
            "--node-name".into(),
            self.node.clone(),
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--bpffs".into(),
            self.bpffs.display().to_string(),
            "--healthz-bind-address".into(),
            "127.0.0.1:10256".into(),
        ];
        args.extend(self.source.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.spawn_on_node(&self.node, "agent", &args, Stdio::from(file));
    }

    /// The `/healthz` status code and body, read from inside the node.
    #[must_use]
    pub fn healthz(&self, cluster: &Cluster) -> (u16, String) {
        self.http_get(cluster, "127.0.0.1:10256", "/healthz")
    }

    /// An HTTP GET from inside the node: status code and body.
    #[must_use]
    pub fn http_get(&self, cluster: &Cluster, addr: &str, path: &str) -> (u16, String) {
        self.http(cluster, "GET", addr, path)
    }

    /// An HTTP request from inside the node: status code and body.
    #[must_use]
    pub fn http(&self, cluster: &Cluster, method: &str, addr: &str, path: &str) -> (u16, String) {
        let bin = testpod_bin().display().to_string();
        let out = cluster.run_on_node(&self.node, &[&bin, "http", method, addr, path]);
        let (code, body) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// Waits (up to 20 s) until `/healthz` answers 200 with every source change programmed.
    pub fn wait_healthy(&self, cluster: &Cluster) {
        self.wait_healthy_within(cluster, Duration::from_secs(20));
    }

    /// [`Self::wait_healthy`] with another deadline.
    pub fn wait_healthy_within(&self, cluster: &Cluster, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = self.healthz(cluster);
            if code == 200 && generations_equal(&body) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent on {} not healthy: {code} {body}\n{}",
                self.node,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the dataplane holds, as counts a leak would grow and a loss would shrink:
    /// the eBPF maps' service slots and backends, or the nftables ruleset's lines and
    /// chains.
    #[must_use]
    pub fn kernel_counts(&self, cluster: &Cluster, dataplane: &str) -> Vec<usize> {
        let netns = cluster.node(&self.node).netns.clone();
        if dataplane == "ebpf" {
            let bin = agent_bin().display().to_string();
            let bpffs = self.bpffs.display().to_string();
            ["services", "backends"]
                .iter()
                .map(|what| {
                    let args = [
                        bin.as_str(),
                        "dump",
                        what,
                        "--json",
                        "--dataplane",
                        "ebpf",
                        "--bpffs",
                        &bpffs,
                    ];
                    let out = crate::cluster::sh_in(&netns, &args);
                    let json: serde_json::Value = serde_json::from_str(&out).expect("dump json");
                    json.as_array().map_or(0, Vec::len)
                })
                .collect()
        } else {
            let out = crate::cluster::sh_in(&netns, &["nft", "list", "ruleset"]);
            vec![out.lines().count(), out.matches("chain ").count()]
        }
    }

    /// Removes everything the agent installed on its node (`proxy-agent cleanup`).
    pub fn cleanup(&self, cluster: &Cluster, dataplane: &str) {
        let bin = agent_bin().display().to_string();
        let bpffs = self.bpffs.display().to_string();
        let cgroup = self.cgroup_root.display().to_string();
        let args = [
            bin.as_str(),
            "cleanup",
            "--dataplane",
            dataplane,
            "--bpffs",
            &bpffs,
            "--cgroup-root",
            &cgroup,
        ];
        crate::cluster::sh_in(&cluster.node(&self.node).netns, &args);
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn generations_equal(body: &str) -> bool {
    let field = |name: &str| {
        let start = body.find(&format!("\"{name}\":"))? + name.len() + 3;
        body[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u64>()
            .ok()
    };
    matches!((field("sourceGeneration"), field("programmedGeneration")), (Some(a), Some(b)) if a == b)
}

/// The sum of every sample of `name` in Prometheus text whose labels contain all of
/// `labels` (`key="value"` strings).
#[must_use]
pub fn sample_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
