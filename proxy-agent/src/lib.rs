//! proxy-agent: watch → model (pure) → sync → dataplane backends.
// No unsafe code, except the one `bpf()` syscall aya lacks (batched map updates, in the
// eBPF dataplane's `batch` module), as STYLE.md allows on the eBPF loader's side, and
// `setpriority` for background threads (`background`).
#![deny(unsafe_code)]

pub mod background;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dataplane;
pub mod debug;
pub mod dns;
pub mod fault;
pub mod health;
pub mod health_check;
pub mod introspect;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod sockdiag;
pub mod source;
pub mod sync;
