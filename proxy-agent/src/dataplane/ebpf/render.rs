//! JSON view of the LB maps, for `render --dataplane ebpf`.
use std::net::Ipv4Addr;

use serde::Serialize;

use super::store::MapContents;
use crate::model::{DesiredState, FrontendKey, Protocol};

#[derive(Serialize)]
struct ServiceEntry {
    address: Ipv4Addr,
    port: u16,
    protocol: String,
    /// `external` for the entries of external clients (`SCOPE_EXTERNAL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'static str>,
    slot: u16,
    backend_id: u32,
    count: u16,
    rev_nat_index: u16,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flags: Vec<&'static str>,
    #[serde(skip_serializing_if = "is_zero")]
    maglev_table: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
}

#[derive(Serialize)]
struct BackendEntry {
    id: u32,
    address: Ipv4Addr,
    port: u16,
    protocol: String,
}

#[derive(Serialize)]
struct RevNatEntry {
    index: u16,
    address: Ipv4Addr,
    port: u16,
}

#[derive(Serialize)]
struct SourceRangeEntry {
    rev_nat_index: u16,
    range: String,
}

#[derive(Serialize)]
struct Maps {
    #[serde(rename = "lb4_services")]
    services: Vec<ServiceEntry>,
    #[serde(rename = "lb4_backends")]
    backends: Vec<BackendEntry>,
    #[serde(rename = "lb4_revnat")]
    revnat: Vec<RevNatEntry>,
    #[serde(rename = "lb4_source_ranges", skip_serializing_if = "Vec::is_empty")]
    source_ranges: Vec<SourceRangeEntry>,
    #[serde(rename = "lb4_maglev", skip_serializing_if = "Vec::is_empty")]
    maglev: Vec<MaglevEntry>,
}

#[derive(Serialize)]
struct MaglevEntry {
    table: u16,
    size: u32,
    backend_ids: Vec<u32>,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if signature"
)]
fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// The names of a slot-0 entry's flags.
#[must_use]
pub fn flag_names(flags: u8) -> Vec<&'static str> {
    [
        (proxy_common::SERVICE_FLAG_AFFINITY, "affinity"),
        (proxy_common::SERVICE_FLAG_MASQ, "masquerade"),
        (proxy_common::SERVICE_FLAG_DROP_EMPTY, "drop-when-empty"),
        (proxy_common::SERVICE_FLAG_SOURCE_RANGES, "source-ranges"),
        (proxy_common::SERVICE_FLAG_EXTERNAL_SCOPE, "external-scope"),
        (
            proxy_common::SERVICE_FLAG_EXTERNAL_MASQ,
            "external-masquerade",
        ),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn protocol_name(n: u8) -> String {
    Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.to_string())
}

fn ip(address_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(address_be.to_ne_bytes())
}

/// Pretty JSON of `contents`; frontends are named from `state` where it knows them.
#[must_use]
pub fn to_json(contents: &MapContents, state: &DesiredState) -> String {
    let name_of = |address_be: u32, port: u16, proto: u8| {
        let key = FrontendKey {
            ip: ip(address_be).into(),
            port,
            protocol: Protocol::from_number(proto)?,
        };
        state.frontends.get(&key).map(|f| f.service.to_string())
    };
    let maps = Maps {
        services: contents
            .services
            .iter()
            .map(|(k, v)| ServiceEntry {
                address: ip(k.address_be),
                port: u16::from_be(k.dport_be),
                protocol: protocol_name(k.proto),
                scope: (k.scope == proxy_common::SCOPE_EXTERNAL).then_some("external"),
                slot: k.backend_slot,
                backend_id: v.backend_id,
                count: v.count,
                rev_nat_index: v.rev_nat_index,
                flags: flag_names(v.flags),
                maglev_table: v.maglev_table,
                service: (k.backend_slot == 0 && k.scope == 0)
                    .then(|| name_of(k.address_be, u16::from_be(k.dport_be), k.proto))
                    .flatten(),
            })
            .collect(),
        backends: contents
            .backends
            .iter()
            .map(|(id, b)| BackendEntry {
                id: *id,
                address: ip(b.address_be),
                port: u16::from_be(b.port_be),
                protocol: protocol_name(b.proto),
            })
            .collect(),
        revnat: contents
            .revnat
            .iter()
            .map(|(index, r)| RevNatEntry {
                index: *index,
                address: ip(r.address_be),
                port: u16::from_be(r.port_be),
            })
            .collect(),
        source_ranges: contents
            .source_ranges
            .iter()
            .map(|(len, data)| SourceRangeEntry {
                rev_nat_index: u16::from_be(data.rev_nat_index_be),
                range: format!("{}/{}", ip(data.address_be), len.saturating_sub(32)),
            })
            .collect(),
        maglev: contents
            .maglev
            .iter()
            .map(|(table, (size, ids))| MaglevEntry {
                table: *table,
                size: *size,
                backend_ids: ids.clone(),
            })
            .collect(),
    };
    let mut maps = maps;
    // Keys sort by their raw (network-order) bytes; people read addresses in order.
    maps.services
        .sort_by_key(|e| (e.address, e.port, e.protocol.clone(), e.scope, e.slot));
    maps.revnat.sort_by_key(|e| e.index);
    serde_json::to_string_pretty(&maps).unwrap_or_default()
}

/// The JSON of the maps a fresh agent would write for `desired`.
pub fn render(desired: &DesiredState) -> Result<String, super::EbpfError> {
    let mut writer = super::MapWriter::restore(MapContents::default())?;
    writer.apply(&crate::model::diff(&DesiredState::default(), desired))?;
    Ok(to_json(writer.store(), desired))
}
