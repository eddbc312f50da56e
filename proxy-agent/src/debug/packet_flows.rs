//! `dump conntrack` rows for the eBPF per-packet path: the flows `LB4_CT` and `LB6_CT`
//! remember (traffic from outside the node), with the time each has left.
use std::path::Path;

use proxy_common::{Ct4Key, Ct6Key, CT_FLAG_CLOSING, CT_FLAG_MASQ, CT_FORWARD};

use super::{ebpf::lru_entries, rows::FlowRow, Names};
use crate::{
    dataplane::ebpf::flows::{self, FlowKey},
    model::{Backend, FrontendKey, Protocol},
};

/// A translated flow, read out of either family's map.
pub struct PacketFlow {
    proto: u8,
    endpoints: [Backend; 3],
    flags: u8,
    remaining_s: u32,
}

/// Every forward entry of both flow maps pinned under `bpffs` (none if missing).
#[must_use]
pub fn read(bpffs: &Path, now_ns: u64) -> Vec<PacketFlow> {
    let mut out = family::<Ct4Key>(bpffs, now_ns);
    out.extend(family::<Ct6Key>(bpffs, now_ns));
    out
}

fn family<K: FlowKey>(bpffs: &Path, now_ns: u64) -> Vec<PacketFlow> {
    lru_entries::<K, K::Value>(bpffs, K::MAP)
        .into_iter()
        .filter(|(key, _)| key.direction() == CT_FORWARD)
        .map(|(key, value)| PacketFlow {
            proto: key.proto(),
            endpoints: key.endpoints(&value).map(|(ip, port)| Backend { ip, port }),
            flags: K::flags(&value),
            remaining_s: u32::try_from(flows::remaining_ns(&key, &value, now_ns) / 1_000_000_000)
                .unwrap_or(u32::MAX),
        })
        .collect()
}

impl PacketFlow {
    #[must_use]
    pub fn row(&self, names: &Names) -> FlowRow {
        let [client, frontend, backend] = &self.endpoints;
        let protocol = Protocol::from_number(self.proto);
        let frontend = protocol.map_or_else(
            || frontend.to_string(),
            |protocol| {
                FrontendKey {
                    ip: frontend.ip,
                    port: frontend.port,
                    protocol,
                }
                .to_string()
            },
        );
        let mut state = if self.flags & CT_FLAG_CLOSING != 0 {
            "closing"
        } else {
            "open"
        }
        .to_owned();
        if self.flags & CT_FLAG_MASQ != 0 {
            state.push_str(",masquerade");
        }
        FlowRow {
            table: "packet",
            protocol: protocol.map_or_else(|| self.proto.to_string(), |p| p.to_string()),
            client: Some(client.to_string()),
            service: names.of(&frontend),
            frontend,
            backend: backend.to_string(),
            state: Some(state),
            expires_in: Some(self.remaining_s),
            socket_cookie: None,
        }
    }
}
