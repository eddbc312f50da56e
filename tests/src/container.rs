//! The agent's image (`cargo xtask image`) run on a testbed node as the `DaemonSet` runs it:
//! the container's security context, arguments and volumes are read from
//! `deploy/02-daemonset.yaml` itself, and only the host paths are the node's (its
//! network namespace as the host network, its cgroup as the host's cgroup2, its own
//! directory on the bpf filesystem). Run with podman over runc.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

use crate::{agent::testpod_bin, cluster::Cluster};

/// The image archive `cargo xtask image` wrote (or `PROXY_AGENT_IMAGE`).
#[must_use]
pub fn image_archive() -> PathBuf {
    std::env::var_os("PROXY_AGENT_IMAGE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/proxy-agent.oci.tar"),
        PathBuf::from,
    )
}

/// The `DaemonSet` of `deploy/02-daemonset.yaml` and its agent container.
#[must_use]
pub fn daemonset() -> (DaemonSet, Container) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/02-daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/02-daemonset.yaml");
    let ds: DaemonSet = serde_yaml::from_str(&text).expect("a DaemonSet");
    let container = ds
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
        .containers[0]
        .clone();
    (ds, container)
}

/// The capabilities the `DaemonSet` adds.
#[must_use]
pub fn added_capabilities(container: &Container) -> Vec<String> {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
}

/// podman with this machine's needs: runc and cgroupfs (crun refuses the hybrid cgroup
/// layout) and no default ulimits (raising them needs `CAP_SYS_RESOURCE`).
#[must_use]
pub fn podman(cluster: &Cluster) -> Command {
    podman_in(&cluster.scratch())
}

fn podman_in(scratch: &Path) -> Command {
    let conf = scratch.join("containers.conf");
    if !conf.exists() {
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
        )
        .expect("containers.conf");
    }
    let mut command = Command::new("podman");
    command.env("CONTAINERS_CONF", conf);
    command
}

/// Runs podman to completion; its stdout, or a panic with its stderr.
#[must_use]
pub fn podman_run(cluster: &Cluster, args: &[&str]) -> String {
    let out = podman(cluster).args(args).output().expect("podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads the image archive; the name podman knows it by.
#[must_use]
pub fn load_image(cluster: &Cluster) -> String {
    let archive = image_archive();
    assert!(
        archive.exists(),
        "{} is missing: run `cargo xtask image`",
        archive.display()
    );
    let out = podman_run(
        cluster,
        &["load", "-q", "-i", &archive.display().to_string()],
    );
    out.lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .or_else(|| {
            out.lines()
                .find_map(|l| l.strip_prefix("Loaded image(s): "))
        })
        .unwrap_or_else(|| panic!("no image name in {out:?}"))
        .trim()
        .to_owned()
}

/// The agent's container on one node; removed on drop.
pub struct ContainerAgent {
    pub name: String,
    pub node: String,
    scratch: PathBuf,
}

impl Drop for ContainerAgent {
    fn drop(&mut self) {
        let _ = podman_in(&self.scratch)
            .args(["rm", "-f", "-t", "5", &self.name])
            .output();
    }
}

/// Removes every container of cluster `id` (named `{id}-…`), running or not: what a
/// killed run left (its [`ContainerAgent`]s were never dropped).
pub(crate) fn remove_all(scratch: &Path, id: &str) {
    let Ok(out) = podman_in(scratch)
        .args(["ps", "-a", "--format", "{{.Names}}"])
        .output()
    else {
        return;
    };
    let prefix = format!("{id}-");
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with(&prefix))
    {
        let _ = podman_in(scratch)
            .args(["rm", "-f", "-t", "0", name])
            .output();
    }
}

/// How a node's paths stand in for the `DaemonSet`'s host paths.
fn host_path(cluster: &Cluster, node: &str, path: &str) -> String {
    match path {
        "/sys/fs/cgroup" => cluster.node(node).cgroup.display().to_string(),
        other => other.to_owned(),
    }
}

/// `podman run` options for the `DaemonSet`'s pod on `node`, with `capabilities` added
/// (the `DaemonSet`'s, or fewer when measuring what each is for).
#[must_use]
pub fn run_options(cluster: &Cluster, node: &str, capabilities: &[String]) -> Vec<String> {
    let (ds, container) = daemonset();
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(
        pod.host_network,
        Some(true),
        "a node agent on the host network"
    );
    let security = container
        .security_context
        .clone()
        .expect("a security context");
    let mut options = vec![
        "--network".to_owned(),
        format!("ns:/run/netns/{}", cluster.node(node).netns),
        "--env".into(),
        format!("NODE_NAME={node}"),
    ];
    let dropped = security
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    for cap in dropped {
        options.extend(["--cap-drop".into(), cap]);
    }
    for cap in capabilities {
        options.extend(["--cap-add".into(), cap.clone()]);
    }
    assert_ne!(security.privileged, Some(true));
    if security.read_only_root_filesystem == Some(true) {
        options.push("--read-only".into());
    }
    if security.allow_privilege_escalation == Some(false) {
        options.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    // The seccomp profile the kubelet gives: none unless the pod or container asks for
    // one (`RuntimeDefault`), as the kubelet does without `--seccomp-default`.
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or_else(|| {
            pod.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
        })
        .map(|p| p.type_.as_str());
    if seccomp != Some("RuntimeDefault") {
        options.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
    }
    let volumes: BTreeMap<String, k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = &volumes[&mount.name];
        let propagation = match mount.mount_propagation.as_deref() {
            Some("HostToContainer") => ",rslave",
            Some("Bidirectional") => ",rshared",
            _ => "",
        };
        let mode = if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        if let Some(host) = &volume.host_path {
            let from = host_path(cluster, node, &host.path);
            options.extend([
                "--volume".into(),
                format!("{from}:{}:{mode}{propagation}", mount.mount_path),
            ]);
        } else if volume.empty_dir.is_some() {
            options.extend([
                "--mount".into(),
                format!("type=tmpfs,destination={}", mount.mount_path),
            ]);
        } else {
            panic!(
                "volume {} of a kind the test cannot stand in for",
                mount.name
            );
        }
    }
    options
}

/// The `DaemonSet`'s arguments with the node's bpffs directory in place of its own, and
/// `extra` after them.
#[must_use]
pub fn agent_args(cluster: &Cluster, node: &str, extra: &[String]) -> Vec<String> {
    let (_, container) = daemonset();
    let mut args: Vec<String> = container
        .args
        .unwrap_or_default()
        .into_iter()
        .map(|arg| match arg.strip_prefix("--bpffs=") {
            Some(_) => format!("--bpffs={}", cluster.bpffs_dir(node).display()),
            None => arg,
        })
        .collect();
    args.extend(extra.iter().cloned());
    args
}

impl ContainerAgent {
    /// Starts the agent's container on `node` as the `DaemonSet` would, with `extra`
    /// arguments (the test's source) and `volumes` (`HOST:CONTAINER:ro`).
    #[must_use]
    pub fn start(
        cluster: &Cluster,
        node: &str,
        image: &str,
        extra: &[String],
        volumes: &[String],
    ) -> Self {
        let capabilities = added_capabilities(&daemonset().1);
        Self::start_with(cluster, node, image, &capabilities, extra, volumes)
    }

    /// [`Self::start`] with these capabilities added instead of the `DaemonSet`'s.
    #[must_use]
    pub fn start_with(
        cluster: &Cluster,
        node: &str,
        image: &str,
        capabilities: &[String],
        extra: &[String],
        volumes: &[String],
    ) -> Self {
        let name = format!("{}-agent-{node}", cluster.id);
        let mut args = vec!["run".to_owned(), "-d".into(), "--name".into(), name.clone()];
        args.extend(run_options(cluster, node, capabilities));
        for volume in volumes {
            args.extend(["--volume".into(), volume.clone()]);
        }
        args.push(image.to_owned());
        args.extend(agent_args(cluster, node, extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = podman_run(cluster, &args);
        Self {
            name,
            node: node.to_owned(),
            scratch: cluster.scratch(),
        }
    }

    /// What the container printed.
    #[must_use]
    pub fn logs(&self, cluster: &Cluster) -> String {
        let out = podman(cluster)
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Waits until `/healthz` is 200 (from inside the node).
    pub fn wait_healthy(&self, cluster: &Cluster) {
        if let Err(out) = self.healthy_within(cluster, Duration::from_secs(30)) {
            panic!("container agent not healthy: {out}\n{}", self.logs(cluster));
        }
    }

    /// Whether `/healthz` turns 200 within `within`; else its last answer.
    ///
    /// # Errors
    /// The last answer when it never did.
    pub fn healthy_within(&self, cluster: &Cluster, within: Duration) -> Result<(), String> {
        let testpod = testpod_bin().display().to_string();
        let since = Instant::now();
        loop {
            let out = cluster.run_on_node(
                &self.node,
                &[&testpod, "http", "GET", "127.0.0.1:10256", "/healthz"],
            );
            if out.starts_with("200 ") {
                return Ok(());
            }
            if since.elapsed() > within {
                return Err(out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and then the same container started again (a pod's container restart).
    pub fn restart(&self, cluster: &Cluster) {
        let _ = podman_run(cluster, &["stop", "-t", "10", &self.name]);
        let status = podman_run(
            cluster,
            &["inspect", "--format", "{{.State.ExitCode}}", &self.name],
        );
        assert_eq!(
            status.trim(),
            "0",
            "SIGTERM exits 0\n{}",
            self.logs(cluster)
        );
        let _ = podman_run(cluster, &["start", &self.name]);
    }
}
