//! A simulated cluster in network namespaces: a LAN namespace with a bridge (also the
//! sink router every node defaults to), node namespaces on it, and pod namespaces joined
//! to their node by veth pairs (ptp style, /32 per pod). Every process runs in a cgroup v2
//! subtree of the node it belongs to. Everything is recorded and removed on drop, and a
//! later run removes what a killed one left behind.
use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// Where each run records what it created.
const RECORDS: &str = "/run/proxy-agent-tests";
const CGROUP2: &str = "/sys/fs/cgroup/unified";
const BPFFS: &str = "/sys/fs/bpf";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A node of the simulated cluster.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    /// `fd00:10:100::index` on the LAN.
    pub ip6: Ipv6Addr,
    pub netns: String,
    pub cgroup: PathBuf,
}

/// A pod: its own namespace, a /32 address, processes in its node's cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// `fd00:10:244:<node index>::<host>`.
    pub ip6: Ipv6Addr,
    pub netns: String,
}

pub struct Cluster {
    pub id: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    children: Vec<Child>,
}

/// Runs a command and panics with its output if it fails.
#[allow(
    clippy::must_use_candidate,
    reason = "most callers run it for its effect only"
)]
pub fn sh(args: &[&str]) -> String {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command in a network namespace and panics with its output if it fails.
#[allow(
    clippy::must_use_candidate,
    reason = "most callers run it for its effect only"
)]
pub fn sh_in(netns: &str, args: &[&str]) -> String {
    let target = format!("--net=/run/netns/{netns}");
    let mut full = vec!["nsenter", target.as_str(), "--"];
    full.extend_from_slice(args);
    sh(&full)
}

/// Runs a command in a network namespace with `input` on its stdin; panics with its
/// stderr if it fails.
pub fn sh_in_with_stdin(netns: &str, args: &[&str], input: &str) {
    if let Err(error) = try_sh_in_with_stdin(netns, args, input) {
        panic!("{error}");
    }
}

/// The same, returning the failure (`{args:?}: stderr`) instead of panicking.
///
/// # Errors
/// When the command exits non-zero.
pub fn try_sh_in_with_stdin(netns: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    // A command that dies before reading all of its input (killed by a time limit)
    // closes the pipe: that is its failure, not ours.
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes());
    let out = child.wait_with_output().expect("wait");
    if out.status.success() && written.is_ok() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a fresh thread inside network namespace `netns`: sockets it creates
/// stay in that namespace after the thread ends.
pub fn within_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = fs::File::open(format!("/run/netns/{netns}")).expect("netns file");
    std::thread::spawn(move || {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns")
}

fn sysctl(netns: &str, key: &str, value: &str) {
    sh_in(netns, &["sysctl", "-qw", &format!("{key}={value}")]);
}

/// No duplicate address detection in a new namespace: its interfaces' addresses (link
/// local ones included) are usable at once, not seconds later.
fn no_dad(netns: &str) {
    for key in ["all", "default"] {
        sysctl(netns, &format!("net.ipv6.conf.{key}.accept_dad"), "0");
    }
}

impl Cluster {
    /// A new, empty cluster; removes leftovers of earlier runs whose process is gone.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        assert!(
            nix_is_root(),
            "the end-to-end tests need root (network namespaces, cgroups, eBPF)"
        );
        ensure_bpffs();
        ensure_netns_dir();
        reap_leftovers();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("pa{}{}{}", std::process::id() % 100_000, tag, n);
        fs::create_dir_all(RECORDS).expect("records dir");
        // Written whole (then renamed into place): a record read half-written by another
        // test's `reap_leftovers` would look like a dead run's, and its cluster be torn
        // down under this one.
        let record = Path::new(RECORDS).join(&id);
        let partial = Path::new(RECORDS).join(format!(".{id}.tmp"));
        fs::write(&partial, std::process::id().to_string()).expect("record");
        fs::rename(&partial, &record).expect("record");
        fs::create_dir_all(cgroup_base(&id)).expect("test cgroup");
        let cluster = Self {
            id,
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Vec::new(),
        };
        let lan = cluster.lan();
        sh(&["ip", "netns", "add", &lan]);
        no_dad(&lan);
        sh_in(&lan, &["ip", "link", "set", "lo", "up"]);
        // A fixed address, as a switch's or a client's NIC keeps: a bridge left to
        // itself takes its lowest port's, so a node interface plugged in or removed would
        // change the LAN's MAC under the node's neighbour cache and lose packets.
        sh_in(
            &lan,
            &[
                "ip",
                "link",
                "add",
                "br0",
                "address",
                "02:00:0a:64:00:fe",
                "type",
                "bridge",
            ],
        );
        sh_in(
            &lan,
            &["ip", "addr", "add", "10.100.0.254/24", "dev", "br0"],
        );
        sh_in(
            &lan,
            &["ip", "addr", "add", "fd00:10:100::254/64", "dev", "br0"],
        );
        sh_in(&lan, &["ip", "link", "set", "br0", "up"]);
        // The sink router: knows the LAN only and answers everything else unreachable,
        // so no test packet can leave the simulated cluster.
        sh_in(&lan, &["ip", "route", "add", "unreachable", "default"]);
        sh_in(
            &lan,
            &["ip", "-6", "route", "add", "unreachable", "default"],
        );
        cluster
    }

    fn lan(&self) -> String {
        format!("{}-lan", self.id)
    }

    /// Adds node `index` (1-based): address 10.100.0.index and `fd00:10:100::index`, pod
    /// CIDRs 10.244.index.0/24 and `fd00:10:244:index::/64`.
    pub fn add_node(&mut self, name: &str, index: u8) -> Node {
        let netns = format!("{}-{name}", self.id);
        let ip = Ipv4Addr::new(10, 100, 0, index);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0x100, 0, 0, 0, 0, index.into());
        let lan = self.lan();
        sh(&["ip", "netns", "add", &netns]);
        no_dad(&netns);
        let lan_side = format!("n{index}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name",
            &lan_side, "netns", &lan,
        ]);
        sh_in(
            &lan,
            &["ip", "link", "set", &lan_side, "master", "br0", "up"],
        );
        sh_in(&netns, &["ip", "link", "set", "lo", "up"]);
        sh_in(
            &netns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        sh_in(
            &netns,
            &["ip", "addr", "add", &format!("{ip6}/64"), "dev", "eth0"],
        );
        sh_in(&netns, &["ip", "link", "set", "eth0", "up"]);
        sh_in(
            &netns,
            &["ip", "route", "add", "default", "via", "10.100.0.254"],
        );
        sh_in(
            &netns,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:10:100::254",
            ],
        );
        sysctl(&netns, "net.ipv4.ip_forward", "1");
        sysctl(&netns, "net.ipv4.icmp_ratelimit", "0");
        sysctl(&netns, "net.ipv6.conf.all.forwarding", "1");
        for other in &self.nodes {
            for (cidr, via) in [
                (format!("10.244.{}.0/24", other.index), other.ip.to_string()),
                (
                    format!("fd00:10:244:{}::/64", other.index),
                    other.ip6.to_string(),
                ),
            ] {
                sh_in(&netns, &["ip", "route", "add", &cidr, "via", &via]);
            }
            for (cidr, via) in [
                (format!("10.244.{index}.0/24"), ip.to_string()),
                (format!("fd00:10:244:{index}::/64"), ip6.to_string()),
            ] {
                sh_in(&other.netns, &["ip", "route", "add", &cidr, "via", &via]);
            }
        }
        let cgroup = cgroup_base(&self.id).join(name);
        fs::create_dir_all(&cgroup).expect("node cgroup");
        let node = Node {
            name: name.to_owned(),
            index,
            ip,
            ip6,
            netns,
            cgroup,
        };
        self.nodes.push(node.clone());
        node
    }

    #[must_use]
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Adds a pod on `node` with addresses 10.244.<node index>.<host> and
    /// `fd00:10:244:<node index>::<host>` (its IPv6 gateway is the node's `fe80::1`).
    pub fn add_pod(&mut self, node: &str, name: &str, host: u8) -> Pod {
        let node = self.node(node).clone();
        let netns = format!("{}-{name}", self.id);
        let ip = Ipv4Addr::new(10, 244, node.index, host);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, node.index.into(), 0, 0, 0, host.into());
        let node_side = format!("v{host}");
        sh(&["ip", "netns", "add", &netns]);
        no_dad(&netns);
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &node_side,
            "netns",
            &node.netns,
        ]);
        sh_in(&netns, &["ip", "link", "set", "lo", "up"]);
        sh_in(
            &netns,
            &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        );
        sh_in(
            &netns,
            &["ip", "addr", "add", &format!("{ip6}/128"), "dev", "eth0"],
        );
        sh_in(&netns, &["ip", "link", "set", "eth0", "up"]);
        let gateway = node.ip.to_string();
        sh_in(
            &netns,
            &[
                "ip", "route", "add", "default", "via", &gateway, "dev", "eth0", "onlink",
            ],
        );
        sh_in(
            &node.netns,
            &["ip", "addr", "add", "fe80::1/64", "dev", &node_side],
        );
        sh_in(&node.netns, &["ip", "link", "set", &node_side, "up"]);
        sh_in(
            &node.netns,
            &["ip", "route", "add", &format!("{ip}/32"), "dev", &node_side],
        );
        sh_in(
            &node.netns,
            &[
                "ip",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &node_side,
            ],
        );
        sh_in(
            &netns,
            &[
                "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        );
        let pod = Pod {
            name: name.to_owned(),
            node: node.name,
            ip,
            ip6,
            netns,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A command line that runs `args` in `netns` as a member of `cgroup`.
    fn wrapped(netns: &str, cgroup: &Path, args: &[&str]) -> Command {
        let mut script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{netns} --",
            cgroup.display()
        );
        for arg in args {
            let _ = write!(script, " '{}'", arg.replace('\'', "'\\''"));
        }
        let mut command = Command::new("sh");
        command.args(["-c", &script]);
        command
    }

    /// Starts a long-running process in a pod (in its node's cgroup); killed on drop.
    pub fn spawn_in_pod(&mut self, pod: &str, args: &[&str]) {
        let pod = self.pod(pod).clone();
        let cgroup = self.node(&pod.node).cgroup.clone();
        let child = Self::wrapped(&pod.netns, &cgroup, args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pod process");
        self.children.push(child);
    }

    /// A command that runs in a pod (in its node's cgroup), for callers that need to
    /// start it and do other things while it runs.
    #[must_use]
    pub fn command_in_pod(&self, pod: &str, args: &[&str]) -> Command {
        let pod = self.pod(pod);
        Self::wrapped(&pod.netns, &self.node(&pod.node).cgroup, args)
    }

    /// Runs a command to completion in a pod (in its node's cgroup) and returns stdout.
    #[must_use]
    pub fn run_in_pod(&self, pod: &str, args: &[&str]) -> String {
        let pod = self.pod(pod);
        let cgroup = &self.node(&pod.node).cgroup;
        let output = Self::wrapped(&pod.netns, cgroup, args)
            .output()
            .expect("run in pod");
        assert!(
            output.status.success(),
            "{args:?} in {}: {}",
            pod.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a command in a node's namespace, outside the node's cgroup.
    #[must_use]
    pub fn run_on_node(&self, node: &str, args: &[&str]) -> String {
        sh_in(&self.node(node).netns, args)
    }

    /// Starts a long-running process in a node's namespace, in a cgroup of its own
    /// (not below the node's socket-LB cgroup); killed on drop.
    pub fn spawn_on_node(
        &mut self,
        node: &str,
        role: &str,
        args: &[&str],
        stderr: Stdio,
    ) -> &mut Child {
        let netns = self.node(node).netns.clone();
        let cgroup = cgroup_base(&self.id).join(format!("{role}-{node}"));
        fs::create_dir_all(&cgroup).expect("role cgroup");
        let child = Self::wrapped(&netns, &cgroup, args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn node process");
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// The processes of `role` on `node` (started with `spawn_on_node`).
    #[must_use]
    pub fn pids(&self, node: &str, role: &str) -> Vec<u32> {
        let cgroup = cgroup_base(&self.id).join(format!("{role}-{node}"));
        fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends SIGTERM to the processes of `role` on `node` and returns their exit statuses.
    pub fn terminate(&mut self, node: &str, role: &str) -> Vec<std::process::ExitStatus> {
        self.signal(node, role, "TERM")
    }

    /// Sends `signal` (`TERM`, `KILL`, …) to the processes of `role` on `node` and returns
    /// their exit statuses.
    pub fn signal(
        &mut self,
        node: &str,
        role: &str,
        signal: &str,
    ) -> Vec<std::process::ExitStatus> {
        let cgroup = cgroup_base(&self.id).join(format!("{role}-{node}"));
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<u32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            // A short-lived child in the same cgroup (the agent's `nft`) may be gone.
            let _ = Command::new("kill")
                .args([format!("-{signal}"), pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let (mine, others): (Vec<Child>, Vec<Child>) = self
            .children
            .drain(..)
            .partition(|c| pids.contains(&c.id()));
        self.children = others;
        mine.into_iter()
            .map(|mut c| c.wait().expect("wait for terminated process"))
            .collect()
    }

    /// A TCP listener bound to `addr` inside the LAN namespace (the sink router, reachable
    /// from every node), for servers the test process runs itself.
    #[must_use]
    pub fn listen_on_lan(&self, addr: &str) -> std::net::TcpListener {
        let addr = addr.to_owned();
        within_netns(&self.lan(), move || {
            std::net::TcpListener::bind(addr).expect("bind in lan")
        })
    }

    /// A command to run in the LAN namespace (an outside client).
    #[must_use]
    pub fn command_in_lan(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.lan()))
            .arg("--")
            .args(args);
        command
    }

    /// The LAN namespace's name.
    #[must_use]
    pub fn lan_netns(&self) -> String {
        self.lan()
    }

    /// Runs a command in the LAN namespace (an outside client on the nodes' network,
    /// 10.100.0.254) and returns stdout.
    #[allow(
        clippy::must_use_candidate,
        reason = "setup commands are run for their effect"
    )]
    pub fn run_in_lan(&self, args: &[&str]) -> String {
        sh_in(&self.lan(), args)
    }

    /// A bare namespace `<id>-<suffix>` (loopback up), removed with the cluster.
    #[must_use]
    pub fn add_netns(&self, suffix: &str) -> String {
        let netns = format!("{}-{suffix}", self.id);
        sh(&["ip", "netns", "add", &netns]);
        sh_in(&netns, &["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// Starts a long-running process in `netns` (in a cgroup of its own); killed on drop.
    pub fn spawn_in_netns(&mut self, netns: &str, args: &[&str]) {
        self.spawn_in_netns_with(netns, args, Stdio::inherit());
    }

    /// [`Self::spawn_in_netns`] with the process's standard error going to `stderr`.
    pub fn spawn_in_netns_with(&mut self, netns: &str, args: &[&str], stderr: Stdio) {
        let cgroup = cgroup_base(&self.id).join("misc");
        fs::create_dir_all(&cgroup).expect("misc cgroup");
        let child = Self::wrapped(netns, &cgroup, args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn");
        self.children.push(child);
    }

    /// A cgroup of its own below the cluster's (a socket-LB root), removed with it.
    #[must_use]
    pub fn cgroup_dir(&self, name: &str) -> PathBuf {
        let cgroup = cgroup_base(&self.id).join(name);
        fs::create_dir_all(&cgroup).expect("cgroup");
        cgroup
    }

    /// A scratch directory (manifests, logs) removed with the cluster.
    #[must_use]
    pub fn scratch(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(&self.id);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// A directory on bpffs private to this cluster.
    #[must_use]
    pub fn bpffs_dir(&self, node: &str) -> PathBuf {
        Path::new(BPFFS).join(&self.id).join(node)
    }
}

/// Mounts bpffs at /sys/fs/bpf once per process if nothing is mounted there, so agents
/// started in parallel never race to mount it (a second mount would hide the first's pins).
/// Mounts bpffs at /sys/fs/bpf unless it is there.
pub fn ensure_bpffs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fs_type = sh(&["stat", "-f", "-c", "%T", BPFFS]);
        if fs_type.trim() != "bpf_fs" {
            sh(&["mount", "-t", "bpf", "bpffs", BPFFS]);
        }
    });
}

/// Makes `/run/netns` a shared mount once per process before any test adds a namespace.
/// On a fresh machine the first `ip netns add` bind-mounts that directory onto itself; a
/// second one running at that moment creates its file under the mount and then fails
/// with "Bind /proc/self/ns/net -> /run/netns/NAME failed: No such file or directory".
fn ensure_netns_dir() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let probe = format!("pa{}-probe", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &probe]);
        sh(&["ip", "netns", "delete", &probe]);
    });
}

fn cgroup_base(id: &str) -> PathBuf {
    Path::new(CGROUP2).join("proxy-agent-tests").join(id)
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}

/// Kills every process below `cgroup` and removes the subtree.
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    for _ in 0..100 {
        let populated = fs::read_to_string(cgroup.join("cgroup.events"))
            .is_ok_and(|e| e.contains("populated 1"));
        if !populated {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    collect_dirs(cgroup, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        let _ = fs::remove_dir(dir);
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Removes everything a cluster with this id created.
fn teardown(id: &str) {
    // Containers first (they hold the node's network namespace and cgroup); only a
    // cluster that ran podman has its configuration in the scratch directory.
    let scratch = std::env::temp_dir().join(id);
    if scratch.join("containers.conf").exists() {
        crate::container::remove_all(&scratch, id);
    }
    remove_cgroup(&cgroup_base(id));
    let _ = fs::remove_dir_all(Path::new(BPFFS).join(id));
    if std::env::var_os("KEEP_TEST_LOGS").is_none() {
        let _ = fs::remove_dir_all(std::env::temp_dir().join(id));
    }
    if let Ok(list) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{id}-")) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let _ = fs::remove_file(Path::new(RECORDS).join(id));
}

/// Tears down the clusters of runs whose process no longer exists (killed with -9).
fn reap_leftovers() {
    let Ok(entries) = fs::read_dir(RECORDS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // Only a record naming a process that is gone is a leftover.
        let owner = fs::read_to_string(entry.path()).unwrap_or_default();
        let Ok(pid) = owner.trim().parse::<u32>() else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            teardown(&name);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        teardown(&self.id);
    }
}
