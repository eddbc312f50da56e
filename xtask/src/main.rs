//! Project chores: `build`, `test`, `demo`, `bless`, `clippy`. Everything a clean
//! machine lacks (Debian packages, bpf-linker) is installed first, so one command works
//! from a fresh clone.
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <command>\n\n  build   install missing tools, build the eBPF object and target/release/proxy-agent\n  test    build, then fmt check, clippy (host and eBPF crates), unit, golden and end-to-end tests\n  demo    build, bring up a simulated cluster from examples/demo and send requests to a ClusterIP\n  bless   rewrite the golden files from the current model\n  clippy  clippy with -D warnings on the host crates and the eBPF crate"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let command = std::env::args().nth(1).unwrap_or_else(|| usage());
    let started = Instant::now();
    match command.as_str() {
        "build" => build()?,
        "test" => test()?,
        "demo" => demo()?,
        "bless" => bless()?,
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

fn build() -> Result<()> {
    toolchain::ensure()?;
    run(&mut toolchain::ebpf_cargo(&["build", "--release"], &[]))?;
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "proxy-agent",
            "-p",
            "proxy-agent-tests",
            "--bins",
        ])
        .env("PROXY_EBPF_OBJECT", ebpf_object()))?;
    Ok(())
}

fn clippy() -> Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(&mut toolchain::ebpf_cargo(
        &["clippy", "--release"],
        &["--", "-D", "warnings"],
    ))
}

fn test() -> Result<()> {
    build()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["fmt", "--check", "--manifest-path", "proxy-ebpf/Cargo.toml"]))?;
    clippy()?;
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--release",
            "--",
            "--test-threads",
            "2",
        ])
        .env("PROXY_EBPF_OBJECT", ebpf_object())
        .env("PROXY_AGENT_BIN", root().join("target/release/proxy-agent")))
}

fn demo() -> Result<()> {
    build()?;
    run(Command::new(root().join("target/release/demo"))
        .arg(root().join("examples/demo"))
        .env("PROXY_AGENT_BIN", root().join("target/release/proxy-agent")))
}

fn bless() -> Result<()> {
    run(cargo()
        .args(["test", "-p", "proxy-agent-tests", "--test", "golden"])
        .env("BLESS", "1"))
}
