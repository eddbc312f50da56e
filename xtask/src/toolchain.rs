//! The offline eBPF toolchain: Debian's Rust (which ships a prebuilt `core` for
//! bpfel-unknown-none), LLVM 22 and bpf-linker 0.13.0 built against it, plus the
//! system tools the agent and tests drive. Installed only when missing.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// Debian packages the build and the tests need.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "nftables",
    "iproute2",
    "bpftool",
    "util-linux",
    "procps",
    // A real DNS client for the NodeLocal DNS tests.
    "dnsutils",
    // The bench's baselines: kube-proxy's iptables mode; DNS servers and load.
    "iptables",
    "dnsperf",
    "unbound",
    "dnsmasq-base",
    // The bench's plots (plotters draws text through fontconfig and FreeType).
    "pkg-config",
    "libfontconfig-dev",
    "libfreetype-dev",
    "fonts-dejavu-core",
    // libFuzzer, which the fuzz targets link (built from C++ by libfuzzer-sys).
    "g++",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";

/// Where bpf-linker is installed: outside rustup's bin directory, which must stay off
/// PATH while Debian's toolchain builds the eBPF crate.
fn tools_root() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".local/share/proxy-agent/tools")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages of `packages` that are missing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Installs what is missing; fast when everything is there.
pub fn ensure() -> Result<()> {
    ensure_packages(PACKAGES)?;
    let linker = tools_root().join("bin/bpf-linker");
    let current = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !current {
        eprintln!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
        run(crate::cargo()
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(tools_root())
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("installing bpf-linker")?;
    }
    if !Path::new(DEBIAN_CARGO).exists() {
        bail!("{DEBIAN_CARGO} is missing after installing cargo-web");
    }
    Ok(())
}

/// Debian's cargo on the eBPF crate, with a clean environment: rustup's proxies and
/// the outer cargo's variables would otherwise pick the wrong compiler.
/// Runs in the crate's directory so its `.cargo/config.toml` (target, rustflags) applies.
pub fn ebpf_cargo(args: &[&str], extra: &[&str]) -> Command {
    // Cargo looks for subcommands in $CARGO_HOME/bin before PATH, where rustup's
    // `cargo-clippy` proxy would win: call Debian's directly.
    let mut command = if args.first() == Some(&"clippy") {
        Command::new("/usr/bin/cargo-clippy")
    } else {
        Command::new(DEBIAN_CARGO)
    };
    command
        .current_dir(root().join("proxy-ebpf"))
        .env_clear()
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                tools_root().join("bin").display()
            ),
        )
        .env("CARGO", DEBIAN_CARGO)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .args(args)
        .arg("--target-dir")
        .arg(root().join("target/ebpf"))
        .args(extra);
    command
}
