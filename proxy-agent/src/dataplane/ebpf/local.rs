//! Local-traffic detection for the per-packet programs: the pod CIDRs (`ClusterCIDR` or
//! `NodeCIDR`) in the family tries, or the ifindexes of the attached interfaces local
//! pods' traffic arrives on (`BridgeInterface`, `InterfaceNamePrefix`). Only attached
//! interfaces run the programs, so only they need to be known.
use std::collections::BTreeSet;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData,
    },
    Ebpf, Pod,
};
use ipnet::IpNet;

use super::EbpfError;
use crate::model::LocalTraffic;

/// Makes the maps say what `local` says, for the interfaces in `attached`.
pub fn write(
    ebpf: &mut Ebpf,
    local: &LocalTraffic,
    attached: &BTreeSet<String>,
) -> Result<(), EbpfError> {
    let cidrs: &[IpNet] = match local {
        LocalTraffic::Sources(cidrs) => cidrs,
        LocalTraffic::Interface(_) | LocalTraffic::InterfacePrefix(_) => &[],
    };
    write_cidrs(ebpf, cidrs)?;
    write_interfaces(ebpf, local, attached)
}

/// Replaces `LOCAL_INTERFACES` with the attached interfaces `local` names.
pub fn write_interfaces(
    ebpf: &mut Ebpf,
    local: &LocalTraffic,
    attached: &BTreeSet<String>,
) -> Result<(), EbpfError> {
    let name = proxy_common::MAP_LOCAL_INTERFACES;
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| EbpfError::MissingMap(name.to_owned()))?;
    let mut interfaces: HashMap<&mut MapData, u32, u8> = HashMap::try_from(map)?;
    let wanted: BTreeSet<u32> = attached
        .iter()
        .filter(|name| local.holds_interface(name))
        .filter_map(|name| nix::net::if_::if_nametoindex(name.as_str()).ok())
        .collect();
    let old: Vec<u32> = interfaces.keys().filter_map(Result::ok).collect();
    for index in &wanted {
        interfaces.insert(index, 1, 0)?;
    }
    for index in old.iter().filter(|i| !wanted.contains(i)) {
        let _ = interfaces.remove(index);
    }
    Ok(())
}

/// Replaces the pinned `CLUSTER_CIDR4` and `CLUSTER_CIDR6` entries with `cidrs`.
fn write_cidrs(ebpf: &mut Ebpf, cidrs: &[IpNet]) -> Result<(), EbpfError> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for cidr in cidrs {
        let len = u32::from(cidr.prefix_len());
        match cidr {
            IpNet::V4(net) => v4.push(Key::new(len, u32::from_ne_bytes(net.network().octets()))),
            IpNet::V6(net) => v6.push(Key::new(len, net.network().octets())),
        }
    }
    replace_trie(ebpf, proxy_common::MAP_CLUSTER_CIDR4, &v4)?;
    replace_trie(ebpf, proxy_common::MAP_CLUSTER_CIDR6, &v6)
}

/// Makes a pinned trie hold exactly `new` (added first, then the rest removed).
fn replace_trie<K: Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &str,
    new: &[Key<K>],
) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| EbpfError::MissingMap(name.to_owned()))?;
    let mut trie: LpmTrie<&mut MapData, K, u8> = LpmTrie::try_from(map)?;
    let old: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in new {
        trie.insert(key, 1, 0)?;
    }
    let same = |a: &Key<K>, b: &Key<K>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
    for key in old.iter().filter(|k| !new.iter().any(|n| same(n, k))) {
        let _ = trie.remove(key);
    }
    Ok(())
}
