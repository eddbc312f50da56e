//! Embeds the eBPF object built by `cargo xtask build`. Without it the agent still
//! builds (for `cargo check`, clippy and unit tests) and says at run time what is missing.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let object = env::var_os("PROXY_EBPF_OBJECT").map_or_else(
        || manifest.join("../target/ebpf/bpfel-unknown-none/release/proxy-ebpf"),
        PathBuf::from,
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it")).join("proxy-ebpf.o");
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo::rustc-check-cfg=cfg(ebpf_object_missing)");
    if object.exists() {
        fs::copy(&object, &out).expect("copy eBPF object");
    } else {
        fs::write(&out, b"").expect("write empty eBPF object");
        println!("cargo:rustc-cfg=ebpf_object_missing");
        println!(
            "cargo:warning=eBPF object not found at {}; run `cargo xtask build`",
            object.display()
        );
    }
}
