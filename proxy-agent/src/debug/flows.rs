//! The flows a live dataplane already holds for a traced client and frontend: the
//! conntrack entries (nftables, or anything else translating on the node) and the socket
//! LB's per-socket memory (eBPF), each with the backend it is pinned to.
use std::{collections::BTreeSet, fmt::Write, net::IpAddr, path::Path};

use crate::{
    dataplane::conntrack::Conntrack,
    model::{explain::FlowNote, Backend, FrontendKey},
};

/// Conntrack entries from `client` to `frontend`.
fn conntrack(client: IpAddr, frontend: FrontendKey, live: &BTreeSet<String>) -> Vec<FlowNote> {
    let Ok(entries) = Conntrack::open().and_then(|mut c| c.dump()) else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter(|e| {
            e.orig.src == client
                && e.orig.dst == frontend.ip
                && e.orig.dport == frontend.port
                && e.orig.proto == frontend.protocol.number()
        })
        .map(|e| {
            let backend = Backend {
                ip: e.reply.src,
                port: e.reply.sport,
            }
            .to_string();
            let mut detail = e.tcp_state.unwrap_or("").to_owned();
            if let Some(timeout) = e.timeout {
                if !detail.is_empty() {
                    detail.push_str(", ");
                }
                let _ = write!(detail, "expires in {timeout} s");
            }
            FlowNote {
                table: "conntrack".to_owned(),
                client: Some(
                    Backend {
                        ip: e.orig.src,
                        port: e.orig.sport,
                    }
                    .to_string(),
                ),
                live_backend: live.contains(&backend),
                backend,
                detail,
            }
        })
        .collect()
}

/// Sockets the socket LB sent from `frontend` to a backend (any client: the socket
/// LB keys them by socket, not by address).
fn sockets(bpffs: &Path, frontend: FrontendKey, live: &BTreeSet<String>) -> Vec<FlowNote> {
    let Ok(state) = super::ebpf::State::read(bpffs) else {
        return Vec::new();
    };
    let wanted = frontend.to_string();
    state
        .flows(&super::Names::default())
        .into_iter()
        .filter(|row| row.frontend == wanted)
        .map(|row| FlowNote {
            table: "socket".to_owned(),
            client: None,
            live_backend: live.contains(&row.backend),
            backend: row.backend,
            detail: format!("socket cookie {}", row.socket_cookie.unwrap_or_default()),
        })
        .collect()
}

/// Every flow the dataplane holds for `client` → `frontend`; `live` are the frontend's
/// eligible endpoints (`IP:PORT`), to flag flows pinned to a backend that left.
#[must_use]
pub fn existing(
    dataplane: &str,
    bpffs: &Path,
    client: IpAddr,
    frontend: FrontendKey,
    live: &BTreeSet<String>,
) -> Vec<FlowNote> {
    let mut notes = conntrack(client, frontend, live);
    if dataplane == "ebpf" {
        notes.extend(sockets(bpffs, frontend, live));
    }
    notes
}
