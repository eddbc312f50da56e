//! Project chores: `build`, `test`, `demo`, `bless`, `bench`, `clippy`. Everything a clean
//! machine lacks (Debian packages, bpf-linker) is installed first, so one command works
//! from a fresh clone.
mod image;
mod toolchain;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <command>\n\n  build   install missing tools, build the eBPF object, target/release/proxy-agent and proxy-agent-faults (fault hooks)\n  test    build, then fmt check, clippy (host and eBPF crates), unit, golden and end-to-end tests\n  demo    build, bring up a simulated cluster from examples/demo and send requests to a ClusterIP\n  bless   rewrite the golden files from the current model\n  image   build, then the agent's OCI image (target/image/proxy-agent.oci.tar), with buildah, no registry\n  bench   build, then measure against kube-proxy's iptables and nftables modes, DNS servers and a twin path [--quick]\n  clippy  clippy with -D warnings on the host crates, the eBPF crate and the fuzz targets"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let command = std::env::args().nth(1).unwrap_or_else(|| usage());
    let started = Instant::now();
    let mut summary = None;
    match command.as_str() {
        "build" => build()?,
        "test" => summary = Some(test()?),
        "demo" => demo()?,
        "bless" => bless()?,
        "image" => {
            build()?;
            image::build()?;
        }
        "bench" => bench(std::env::args().any(|a| a == "--quick"))?,
        "clippy" => {
            toolchain::ensure()?;
            clippy()?;
        }
        _ => usage(),
    }
    eprintln!(
        "xtask {command}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(summary) = summary {
        // The closing line CI reads: every test of the workspace, added up.
        println!("tests: {summary}");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// Runs a command in the workspace root, failing with its description.
fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    if command.get_current_dir().is_none() {
        command.current_dir(root());
    }
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// The host cargo (rustup's, the one running xtask).
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/proxy-ebpf")
}

/// The agent built with `fault-hooks`.
fn faults_agent() -> PathBuf {
    root().join("target/release/proxy-agent-faults")
}

fn build() -> Result<()> {
    toolchain::ensure()?;
    run(&mut toolchain::ebpf_cargo(&["build", "--release"], &[]))?;
    let release_build = |args: &[&str]| {
        run(cargo()
            .args(["build", "--release"])
            .args(args)
            .env("PROXY_EBPF_OBJECT", ebpf_object()))
    };
    // The fault suite's agent, with faults armed on demand (`fault-hooks`), built first:
    // the build below leaves target/release/proxy-agent the one without them.
    release_build(&[
        "-p",
        "proxy-agent",
        "--bin",
        "proxy-agent",
        "--features",
        "fault-hooks",
    ])?;
    std::fs::copy(root().join("target/release/proxy-agent"), faults_agent())?;
    release_build(&["-p", "proxy-agent", "-p", "proxy-agent-tests", "--bins"])?;
    Ok(())
}

fn clippy() -> Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(&mut toolchain::ebpf_cargo(
        &["clippy", "--release"],
        &["--", "-D", "warnings"],
    ))?;
    // The cargo-fuzz targets build with stable too (unfuzzed): kept compiling and clean.
    run(cargo()
        .args([
            "clippy",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--target-dir",
        ])
        .arg(root().join("target"))
        .args(["--", "-D", "warnings"])
        .env("PROXY_EBPF_OBJECT", ebpf_object()))
}

/// Everything CI checks; returns the test totals line.
fn test() -> Result<String> {
    build()?;
    // The container end-to-end test runs the image of this very build.
    image::build()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["fmt", "--check", "--manifest-path", "proxy-ebpf/Cargo.toml"]))?;
    run(cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))?;
    clippy()?;
    let (passed, failed) = run_tests(
        cargo()
            .args([
                "test",
                "--workspace",
                "--release",
                "--lib",
                "--bins",
                "--tests",
                // Every suite runs: one failing test binary does not hide the others'.
                "--no-fail-fast",
            ])
            .args(["--", "--test-threads", "2"])
            .env("PROXY_EBPF_OBJECT", ebpf_object())
            .env("PROXY_AGENT_BIN", root().join("target/release/proxy-agent"))
            .env("PROXY_AGENT_FAULTS_BIN", faults_agent())
            .env("PROXY_AGENT_IMAGE", image::archive()),
    )?;
    Ok(format!("{passed} passed, {failed} failed"))
}

/// Runs `cargo test`, echoing its output, and adds up every `test result:` line.
fn run_tests(command: &mut Command) -> Result<(u64, u64)> {
    eprintln!("+ {command:?}");
    let mut child = command
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("test output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, " passed");
            failed += count(result, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("tests failed ({passed} passed, {failed} failed)");
    }
    Ok((passed, failed))
}

/// The number before `label` in `ok. 5 passed; 0 failed; ...`.
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find(|part| part.ends_with(label))
        .and_then(|part| {
            part.trim_end_matches(label)
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn demo() -> Result<()> {
    build()?;
    run(Command::new(root().join("target/release/demo"))
        .arg(root().join("examples/demo"))
        .env("PROXY_AGENT_BIN", root().join("target/release/proxy-agent")))
}

/// Runs the bench binary into `bench/results/<UTC timestamp>/`.
fn bench(quick: bool) -> Result<()> {
    build()?;
    let stamp = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .context("date")?;
    let stamp = String::from_utf8_lossy(&stamp.stdout).trim().to_owned();
    let out = root().join("bench/results").join(stamp);
    let mut command = Command::new(root().join("target/release/bench"));
    command.arg("--out").arg(&out);
    if quick {
        command.arg("--quick");
    }
    run(&mut command)
}

fn bless() -> Result<()> {
    run(cargo()
        .args(["test", "-p", "proxy-agent-tests", "--test", "golden"])
        .env("BLESS", "1"))
}
