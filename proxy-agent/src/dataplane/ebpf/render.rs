//! JSON view of the LB maps, for `render --dataplane ebpf`.
use std::net::IpAddr;

use serde::Serialize;

use super::store::{MapContents, SourceRange};
use crate::model::{DesiredState, FrontendKey, Protocol};

#[derive(Serialize)]
struct ServiceEntry {
    address: IpAddr,
    port: u16,
    protocol: String,
    /// `external` for the entries of external clients (`SCOPE_EXTERNAL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'static str>,
    slot: u16,
    backend_id: u32,
    count: u16,
    rev_nat_index: u32,
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
    address: IpAddr,
    port: u16,
    protocol: String,
}

#[derive(Serialize)]
struct RevNatEntry {
    index: u32,
    address: IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct SourceRangeEntry {
    rev_nat_index: u32,
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
    #[serde(rename = "lb6_services", skip_serializing_if = "Vec::is_empty")]
    services6: Vec<ServiceEntry>,
    #[serde(rename = "lb6_backends", skip_serializing_if = "Vec::is_empty")]
    backends6: Vec<BackendEntry>,
    #[serde(rename = "lb6_revnat", skip_serializing_if = "Vec::is_empty")]
    revnat6: Vec<RevNatEntry>,
    #[serde(rename = "lb6_source_ranges", skip_serializing_if = "Vec::is_empty")]
    source_ranges6: Vec<SourceRangeEntry>,
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

/// Pretty JSON of `contents`; frontends are named from `state` where it knows them.
#[must_use]
pub fn to_json(contents: &MapContents, state: &DesiredState) -> String {
    let name_of = |ip: IpAddr, port: u16, proto: u8| {
        let key = FrontendKey {
            ip,
            port,
            protocol: Protocol::from_number(proto)?,
        };
        state.frontends.get(&key).map(|f| f.service.to_string())
    };
    let (mut services, mut services6): (Vec<_>, Vec<_>) = contents
        .services
        .iter()
        .map(|(k, v)| ServiceEntry {
            address: k.ip(),
            port: k.port(),
            protocol: protocol_name(k.proto()),
            scope: (k.scope() == proxy_common::SCOPE_EXTERNAL).then_some("external"),
            slot: k.slot(),
            backend_id: v.backend_id,
            count: v.count,
            rev_nat_index: v.rev_nat_index,
            flags: flag_names(v.flags),
            maglev_table: v.maglev_table,
            service: (k.slot() == 0 && k.scope() == 0)
                .then(|| name_of(k.ip(), k.port(), k.proto()))
                .flatten(),
        })
        .partition(|e| e.address.is_ipv4());
    let (backends, backends6): (Vec<_>, Vec<_>) = contents
        .backends
        .iter()
        .map(|(id, b)| {
            let (address, port, proto) = b.parts();
            BackendEntry {
                id: *id,
                address,
                port,
                protocol: protocol_name(proto),
            }
        })
        .partition(|e| e.address.is_ipv4());
    let (mut revnat, mut revnat6): (Vec<_>, Vec<_>) = contents
        .revnat
        .iter()
        .map(|(index, r)| {
            let (address, port) = r.parts();
            RevNatEntry {
                index: *index,
                address,
                port,
            }
        })
        .partition(|e| e.address.is_ipv4());
    // Keys sort by their raw (network-order) bytes; people read addresses in order.
    for services in [&mut services, &mut services6] {
        services.sort_by_key(|e| (e.address, e.port, e.protocol.clone(), e.scope, e.slot));
    }
    revnat.sort_by_key(|e| e.index);
    let (ranges4, ranges6): (Vec<&SourceRange>, Vec<&SourceRange>) = contents
        .source_ranges
        .iter()
        .partition(|range| matches!(range, SourceRange::V4(..)));
    let entries = |ranges: Vec<&SourceRange>| -> Vec<SourceRangeEntry> {
        ranges
            .into_iter()
            .map(|range| SourceRangeEntry {
                rev_nat_index: range.rev_nat_index(),
                range: range.range(),
            })
            .collect()
    };
    revnat6.sort_by_key(|e| e.index);
    let maps = Maps {
        services,
        backends,
        revnat,
        services6,
        backends6,
        revnat6,
        source_ranges: entries(ranges4),
        source_ranges6: entries(ranges6),
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
    serde_json::to_string_pretty(&maps).unwrap_or_default()
}

/// The JSON of the maps a fresh agent would write for `desired`.
pub fn render(desired: &DesiredState) -> Result<String, super::EbpfError> {
    let mut writer = super::MapWriter::restore(MapContents::default())?;
    writer.apply(&crate::model::diff(&DesiredState::default(), desired))?;
    Ok(to_json(writer.store(), desired))
}
