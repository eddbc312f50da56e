//! proxy-agent: watch → model (pure) → sync → dataplane backends.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod dataplane;
pub mod debug;
pub mod dns;
pub mod health;
pub mod health_check;
pub mod introspect;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod sockdiag;
pub mod source;
pub mod sync;
