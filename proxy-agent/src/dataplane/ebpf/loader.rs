//! Loads the embedded eBPF object, pins its maps under `--bpffs`, and attaches the
//! socket programs to `--cgroup-root` through pinned links, so an exiting agent leaves
//! them in place and a new one swaps its own in without a gap.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr},
    Ebpf, EbpfLoader,
};
use proxy_common::{LAYOUT_VERSION, MAP_LAYOUT};
use tracing::{debug, info, warn};

use super::{kernel::KernelMaps, EbpfError, Sizing};

/// The object `cargo xtask build` compiled, embedded at build time.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// The embedded eBPF object (empty when built without it).
#[must_use]
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The socket-LB programs, by the names the object gives them.
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
];
/// The program that forgets a closed socket's backend.
pub const RELEASE_PROGRAM: &str = "sock_release";

/// Every map the object pins, by name.
const PINNED_MAPS: [&str; 21] = [
    proxy_common::MAP_LAYOUT,
    proxy_common::MAP_SERVICES4,
    proxy_common::MAP_BACKENDS4,
    proxy_common::MAP_REVNAT4,
    proxy_common::MAP_SOCK_REVNAT4,
    proxy_common::MAP_LOCAL_REDIRECT4,
    proxy_common::MAP_STATS,
    proxy_common::MAP_EVENTS,
    proxy_common::MAP_MONITOR,
    proxy_common::MAP_AFFINITY4,
    proxy_common::MAP_CT4,
    proxy_common::MAP_CLUSTER_CIDR4,
    proxy_common::MAP_SOURCE_RANGES4,
    proxy_common::MAP_MAGLEV4,
    proxy_common::MAP_SERVICES6,
    proxy_common::MAP_BACKENDS6,
    proxy_common::MAP_REVNAT6,
    proxy_common::MAP_SOCK_REVNAT6,
    proxy_common::MAP_CT6,
    proxy_common::MAP_CLUSTER_CIDR6,
    proxy_common::MAP_LOCAL_INTERFACES,
];

/// The layout stamped on the maps pinned in `bpffs`, if any.
#[must_use]
fn pinned_layout(bpffs: &Path) -> Option<u32> {
    let data = MapData::from_pin(bpffs.join(MAP_LAYOUT)).ok()?;
    let stamp: Array<MapData, u32> = Array::try_from(Map::Array(data)).ok()?;
    stamp.get(&0, 0).ok()
}

/// The service, backend and reverse-NAT maps' entries for `sizing`, by map name.
fn lb_map_sizes(sizing: Sizing) -> [(&'static str, u32); 6] {
    [
        (proxy_common::MAP_SERVICES4, sizing.lb_map_max),
        (proxy_common::MAP_SERVICES6, sizing.lb_map_max),
        (proxy_common::MAP_BACKENDS4, sizing.backends()),
        (proxy_common::MAP_BACKENDS6, sizing.backends()),
        (proxy_common::MAP_REVNAT4, sizing.revnat()),
        (proxy_common::MAP_REVNAT6, sizing.revnat()),
    ]
}

/// A pinned LB map whose size is not `sizing`'s, with the size it has.
fn resized_map(bpffs: &Path, sizing: Sizing) -> Option<(&'static str, u32)> {
    lb_map_sizes(sizing).into_iter().find_map(|(name, wanted)| {
        let data = MapData::from_pin(bpffs.join(name)).ok()?;
        let held = data.info().ok()?.max_entries();
        (held != wanted).then_some((name, held))
    })
}

/// Unpins the maps of another layout (or of one from before layouts were stamped), or
/// of another `--bpf-lb-map-max`, so that the object makes them anew instead of
/// reading their bytes as other fields or its ids running past their end. The
/// previous agent's programs keep their maps until their links are swapped. Returns
/// how many were unpinned.
fn retire_other_layout(bpffs: &Path, sizing: Sizing) -> Result<usize, EbpfError> {
    let found = pinned_layout(bpffs);
    let resized = resized_map(bpffs, sizing);
    if found == Some(LAYOUT_VERSION) && resized.is_none() {
        return Ok(0);
    }
    let mut retired = 0;
    for name in PINNED_MAPS {
        let pin = bpffs.join(name);
        match fs::remove_file(&pin) {
            Ok(()) => retired += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(EbpfError::Io(pin, error)),
        }
    }
    if retired > 0 {
        warn!(
            found = found.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            layout = LAYOUT_VERSION,
            resized = resized.map(|(name, held)| format!("{name} holds {held}")),
            maps = retired,
            "the pinned eBPF maps have another layout or size: made anew (flows in progress on the per-packet path choose their backend again)"
        );
    }
    Ok(retired)
}

/// Stamps the maps just loaded with this layout.
fn stamp_layout(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(MAP_LAYOUT)
        .ok_or_else(|| EbpfError::MissingMap(MAP_LAYOUT.to_owned()))?;
    let mut stamp: Array<&mut MapData, u32> = Array::try_from(map)?;
    stamp.set(0, LAYOUT_VERSION, 0)?;
    Ok(())
}

/// Where pinned links live below `--bpffs`.
#[must_use]
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Loads, pins and attaches the socket programs; returns the maps to write and the
/// object, whose per-packet programs `nodeport.rs` attaches.
pub fn load(
    bpffs: &Path,
    cgroup_root: &Path,
    sizing: Sizing,
) -> Result<(KernelMaps, Ebpf), EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    fs::create_dir_all(links_dir(bpffs)).map_err(|e| EbpfError::Io(bpffs.to_owned(), e))?;
    // BPF memory is charged to the cgroup on current kernels; an old kernel without
    // that needs the rlimit, which a missing CAP_SYS_RESOURCE forbids raising.
    if let Err(error) = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    ) {
        tracing::warn!(%error, "cannot raise the memlock rlimit; going on");
    }
    retire_other_layout(bpffs, sizing)?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(bpffs);
    super::kernel_log::set_level(&mut loader);
    for (name, entries) in lb_map_sizes(sizing) {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader.load(OBJECT)?;
    super::kernel_log::follow(&mut ebpf);
    stamp_layout(&mut ebpf)?;
    let cgroup =
        fs::File::open(cgroup_root).map_err(|e| EbpfError::Io(cgroup_root.to_owned(), e))?;
    for name in SOCKET_PROGRAMS {
        attach(&mut ebpf, name, &cgroup, bpffs)?;
    }
    attach_release(&mut ebpf, &cgroup, bpffs)?;
    info!(cgroup = %cgroup_root.display(), bpffs = %bpffs.display(), "socket load balancing attached");
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or(EbpfError::MissingMap(name.to_owned()))
    };
    let maps = KernelMaps::new(
        [
            take(proxy_common::MAP_SERVICES4)?,
            take(proxy_common::MAP_BACKENDS4)?,
            take(proxy_common::MAP_REVNAT4)?,
        ],
        [
            take(proxy_common::MAP_SERVICES6)?,
            take(proxy_common::MAP_BACKENDS6)?,
            take(proxy_common::MAP_REVNAT6)?,
        ],
        [
            Some(take(proxy_common::MAP_SOURCE_RANGES4)?),
            Some(take(proxy_common::MAP_SOURCE_RANGES6)?),
        ],
        Some(take(proxy_common::MAP_MAGLEV4)?),
        Some(take(proxy_common::MAP_STATS)?),
    )?;
    Ok((maps, ebpf))
}

/// Attaches one program next to any previous agent's, then retires the old link: both
/// read the same maps, so for an instant either may translate a connect, never neither.
fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &fs::File, bpffs: &Path) -> Result<(), EbpfError> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| EbpfError::MissingProgram(name.to_owned()))?
        .try_into()?;
    program.load()?;
    // A cgroup bpf_link takes no flags (the kernel rejects them) and is always
    // multi-attach, which is what lets the old and new programs overlap.
    let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
    let link = FdLink::try_from(program.take_link(link_id)?)?;
    swap_pin(link, name, bpffs)
}

/// The same for the `sock_release` program.
fn attach_release(ebpf: &mut Ebpf, cgroup: &fs::File, bpffs: &Path) -> Result<(), EbpfError> {
    let program: &mut CgroupSock = ebpf
        .program_mut(RELEASE_PROGRAM)
        .ok_or_else(|| EbpfError::MissingProgram(RELEASE_PROGRAM.to_owned()))?
        .try_into()?;
    program.load()?;
    let link_id = program.attach(cgroup, CgroupAttachMode::Single)?;
    let link = FdLink::try_from(program.take_link(link_id)?)?;
    swap_pin(link, RELEASE_PROGRAM, bpffs)
}

/// Pins `link` as `name`, unpinning (and so detaching) the previous agent's.
pub(super) fn swap_pin(link: FdLink, name: &str, bpffs: &Path) -> Result<(), EbpfError> {
    let pin = links_dir(bpffs).join(name);
    // bpffs refuses names with a dot (reserved), hence `_new`.
    let fresh = links_dir(bpffs).join(format!("{name}_new"));
    let _ = fs::remove_file(&fresh);
    link.pin(&fresh)?;
    if pin.exists() {
        // Unpinning the last reference detaches the previous agent's program.
        fs::remove_file(&pin).map_err(|e| EbpfError::Io(pin.clone(), e))?;
        debug!(program = name, "replaced the previous agent's link");
    }
    fs::rename(&fresh, &pin).map_err(|e| EbpfError::Io(pin.clone(), e))?;
    Ok(())
}

/// Detaches every program (by unpinning its link) and removes every pinned map (the
/// netfilter table is `nodeport::remove_netfilter_table`'s).
pub fn cleanup(bpffs: &Path) -> Result<usize, EbpfError> {
    let mut removed = 0;
    let links = links_dir(bpffs);
    for dir in [links.as_path(), bpffs] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_file() {
                fs::remove_file(&path).map_err(|e| EbpfError::Io(path.clone(), e))?;
                removed += 1;
            }
        }
    }
    for dir in [links.as_path(), bpffs] {
        if dir.exists() {
            fs::remove_dir(dir).map_err(|e| EbpfError::Io(dir.to_owned(), e))?;
        }
    }
    Ok(removed)
}
