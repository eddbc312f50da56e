//! `proxy-agent monitor`: the eBPF programs' decisions as they happen, from the ring
//! buffer they write only while a monitor holds its lease, so nobody listening costs
//! nothing but one array read per decision.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use proxy_common::{VERDICT_LOCAL_REDIRECT, VERDICT_NAT, VERDICT_REJECT};
use serde::Serialize;

use super::Names;
use crate::{
    cli::{MonitorArgs, VerdictFilter},
    dataplane::{
        ebpf::observe::{self, Event},
        system::monotonic_ns,
    },
    metrics::datapath::{hook_name, reason_name, verdict_name},
    model::{Backend, FrontendKey, Protocol},
};

/// One event as printed.
#[derive(Debug, Serialize)]
pub struct Line {
    pub time: String,
    pub hook: &'static str,
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'static str,
    pub service: String,
    pub frontend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<u32>,
    pub pid: u32,
    pub socket_cookie: u64,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:<12} {:<14} {} {}",
            self.time,
            self.hook,
            self.verdict.to_uppercase(),
            self.service,
            self.frontend
        )?;
        if let Some(backend) = &self.backend {
            write!(f, " -> {backend}")?;
        }
        if !self.reason.is_empty() {
            write!(f, " reason={}", self.reason)?;
        }
        write!(f, " pid={} cookie={}", self.pid, self.socket_cookie)
    }
}

fn wall_time(timestamp_ns: u64) -> String {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(timestamp_ns));
    let at = SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_micros(at).to_string()
}

/// An event in words.
#[must_use]
pub fn describe(decoded: &Event, names: &Names) -> Line {
    let event = &decoded.record;
    let frontend = Protocol::from_number(event.proto).map_or_else(
        || {
            Backend {
                ip: decoded.frontend,
                port: u16::from_be(event.frontend_port_be),
            }
            .to_string()
        },
        |protocol| {
            FrontendKey {
                ip: decoded.frontend,
                port: u16::from_be(event.frontend_port_be),
                protocol,
            }
            .to_string()
        },
    );
    let backend = (event.verdict != VERDICT_REJECT && event.verdict != proxy_common::VERDICT_DROP)
        .then(|| {
            Backend {
                ip: decoded.backend,
                port: u16::from_be(event.backend_port_be),
            }
            .to_string()
        });
    Line {
        time: wall_time(event.timestamp_ns),
        hook: hook_name(event.hook),
        verdict: verdict_name(event.verdict),
        reason: reason_name(event.reason),
        service: names.of(&frontend),
        frontend,
        backend,
        backend_id: (event.verdict == VERDICT_NAT).then_some(event.backend_id),
        pid: event.pid,
        socket_cookie: event.socket_cookie,
    }
}

fn wanted(filters: &[VerdictFilter], verdict: u8) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| match f {
            VerdictFilter::Nat => verdict == VERDICT_NAT || verdict == VERDICT_LOCAL_REDIRECT,
            VerdictFilter::Reject => verdict == VERDICT_REJECT,
            VerdictFilter::Drop => verdict == proxy_common::VERDICT_DROP,
            VerdictFilter::ReverseNat => verdict == proxy_common::VERDICT_REVERSE_NAT,
        })
}

/// The reverse-NAT indexes of `service`'s frontends (`namespace/name`).
fn indexes_of(service: &str, names: &Names, args: &MonitorArgs) -> Result<BTreeSet<u32>> {
    let state = super::ebpf::State::read(&args.bpffs)?;
    let indexes: BTreeSet<u32> = state
        .indexed_frontends()
        .into_iter()
        .filter(|(_, frontend)| {
            let name = names.of(&frontend.to_string());
            name == service || name.starts_with(&format!("{service}:"))
        })
        .map(|(index, _)| index)
        .collect();
    if indexes.is_empty() {
        anyhow::bail!("no programmed frontend belongs to {service} (is the agent running?)");
    }
    Ok(indexes)
}

/// Runs until `--count` events, `--duration` seconds, or the process is killed (the
/// programs stop writing within three seconds of the last lease renewal).
///
/// # Errors
/// When the eBPF dataplane's maps are not pinned under `--bpffs`.
pub fn run(args: &MonitorArgs) -> Result<()> {
    let names = Names::ask(args.agent);
    let indexes = match &args.service {
        Some(service) => Some(indexes_of(service, &names, args)?),
        None => None,
    };
    // The kernel filters on one frontend; more are filtered here.
    let kernel_filter = indexes
        .as_ref()
        .filter(|i| i.len() == 1)
        .and_then(|i| i.first().copied());
    let mut monitor = observe::Monitor::open(&args.bpffs, kernel_filter).with_context(|| {
        format!(
            "opening the monitor ring buffer under {} (eBPF dataplane only)",
            args.bpffs.display()
        )
    })?;
    eprintln!("listening for datapath events (eBPF socket load balancer)");
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut printed = 0;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        for event in monitor.next_batch(Duration::from_millis(200))? {
            let in_service = indexes
                .as_ref()
                .is_none_or(|i| i.contains(&event.record.rev_nat_index));
            if !in_service || !wanted(&args.verdict, event.record.verdict) {
                continue;
            }
            let line = describe(&event, &names);
            if args.json {
                println!("{}", serde_json::to_string(&line)?);
            } else {
                println!("{line}");
            }
            printed += 1;
            if args.count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
    }
}
