//! Faults under live traffic: the agent killed with SIGKILL at random points of large
//! syncs, again and again, while a pod keeps connecting to a Service. The node keeps
//! serving through it (the kernel state outlives the agent), and the agent that finally
//! stays up holds exactly what a clean start holds: no stale and no missing entries.
//! And manifests replaced the way editors, shells and kubelet replace them, under traffic.
use std::{
    io::Write as _,
    os::unix::fs::symlink,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use proxy_agent_tests::{
    agent::testpod_bin,
    manifests, scale,
    scenarios::{assert_served, setup_on, Bed, ECHO_IP},
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SERVICES: usize = 2000;

/// 2 000 Services beside echo (ClusterIPs in 10.97/16, clear of echo's) with
/// `endpoints` endpoints each: each count makes every Service change.
fn many(endpoints: usize) -> String {
    scale::manifests(SERVICES, endpoints).replace("10.96.", "10.97.")
}

fn client(bed: &Bed, millis: u64) -> Child {
    let testpod = testpod_bin().display().to_string();
    let to = format!("{ECHO_IP}:80");
    let millis = millis.to_string();
    bed.cluster
        .command_in_pod("client", &[&testpod, "request-for", "tcp", &to, &millis])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client")
}

/// The kernel state once the agent has tidied: nftables deletes the chains a full load
/// over a previous agent's tables left flushed one second after that load.
fn settled_counts(bed: &Bed, dataplane: &str) -> Vec<usize> {
    std::thread::sleep(Duration::from_millis(1500));
    bed.agent.kernel_counts(&bed.cluster, dataplane)
}

fn kill_9_during_large_syncs(dataplane: &str) {
    let mut bed = setup_on(&format!("kill{}", &dataplane[..1]), dataplane);
    manifests::write(&bed.dir, "many.yaml", &many(3));
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let traffic = client(&bed, 6000);
    std::thread::sleep(Duration::from_millis(300));
    let mut rng = StdRng::seed_from_u64(9);
    let mut kills = Vec::new();
    for round in 0..6 {
        // Every Service changes while the agent is down: its first sync is large.
        bed.cluster.signal("node1", "agent", "KILL");
        manifests::write(&bed.dir, "many.yaml", &many(2 + round % 2));
        bed.agent.respawn(&mut bed.cluster);
        let after = rng.random_range(20..600);
        kills.push(after);
        std::thread::sleep(Duration::from_millis(after));
    }
    bed.cluster.signal("node1", "agent", "KILL");
    bed.agent.respawn(&mut bed.cluster);
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let survived = settled_counts(&bed, dataplane);
    let output = traffic.wait_with_output().expect("client output");
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    // What a clean start programs from the same manifests.
    bed.cluster.signal("node1", "agent", "KILL");
    bed.agent.cleanup(&bed.cluster, dataplane);
    bed.agent.respawn(&mut bed.cluster);
    bed.agent
        .wait_healthy_within(&bed.cluster, Duration::from_mins(1));
    let clean = settled_counts(&bed, dataplane);
    println!(
        "{dataplane}: 7 SIGKILLs ({kills:?} ms into a start over 2 000 changed Services); traffic meanwhile: {report}; kernel {survived:?} after, {clean:?} from a clean start"
    );
    assert_served(&report, "while the agent was killed");
    assert_eq!(survived, clean, "stale or missing entries after the kills");
}

#[test]
fn kill_9_during_large_syncs_loses_no_connection_and_leaves_nothing_stale_with_ebpf() {
    kill_9_during_large_syncs("ebpf");
}

#[test]
fn kill_9_during_large_syncs_loses_no_connection_and_leaves_nothing_stale_with_nftables() {
    kill_9_during_large_syncs("nftables");
}

/// Puts `text` in `dir/..NAME/FILE` and points `dir/..data` at it (through a link renamed
/// over the old one), as kubelet updates a config map volume.
fn configmap_version(dir: &Path, name: &str, file: &str, text: &str) {
    let version = dir.join(format!("..{name}"));
    std::fs::create_dir_all(&version).expect("version directory");
    std::fs::write(version.join(file), text).expect("versioned file");
    symlink(format!("..{name}"), dir.join("..data_tmp")).expect("data link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap the data link");
}

/// echo's Service file truncated and written again 1.2 s later (`kubectl get … > file`),
/// then made a config map volume's link and swapped to a new version twice, while a pod
/// keeps connecting to echo: no connection fails (a half-written file read as empty
/// would remove echo's Service).
fn manifests_replaced_in_place(dataplane: &str) {
    let bed = setup_on(&format!("repl{}", &dataplane[..1]), dataplane);
    let traffic = client(&bed, 5000);
    std::thread::sleep(Duration::from_millis(300));
    let file = bed.dir.join("echo-svc.yaml");
    let text = std::fs::read_to_string(&file).expect("echo's Service");
    let mut writer = std::fs::File::create(&file).expect("truncate");
    std::thread::sleep(Duration::from_millis(1200));
    writer.write_all(text.as_bytes()).expect("write");
    drop(writer);
    std::thread::sleep(Duration::from_millis(500));
    configmap_version(&bed.dir, "v1", "echo-svc.yaml", &text);
    symlink("..data/echo-svc.yaml", bed.dir.join(".echo-link")).expect("file link");
    std::fs::rename(bed.dir.join(".echo-link"), &file).expect("file becomes a link");
    for version in ["v2", "v3"] {
        std::thread::sleep(Duration::from_millis(700));
        configmap_version(&bed.dir, version, "echo-svc.yaml", &text);
    }
    let output = traffic.wait_with_output().expect("client output");
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!("{dataplane}: echo's Service file rewritten in place, then swapped as a ConfigMap: {report}");
    assert_served(&report, "while echo's Service file was replaced");
}

#[test]
fn manifests_replaced_in_place_keep_serving_with_ebpf() {
    manifests_replaced_in_place("ebpf");
}

#[test]
fn manifests_replaced_in_place_keep_serving_with_nftables() {
    manifests_replaced_in_place("nftables");
}
