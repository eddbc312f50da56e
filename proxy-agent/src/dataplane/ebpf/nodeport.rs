//! The per-packet programs (traffic from outside the node) on every interface holding a
//! node address, through pinned TCX links that a restarted agent swaps in place; local
//! traffic detection for telling pods from external clients; and the small netfilter
//! table that masquerades and rejects what the programs mark.
use std::{collections::BTreeSet, fs, path::PathBuf};

use aya::{
    programs::{links::FdLink, SchedClassifier, TcAttachType},
    Ebpf,
};
use tracing::{info, warn};

use super::{
    loader, local,
    unserved::{self, Steps, Unserved},
    EbpfError,
};
use crate::{
    dataplane::nftables,
    model::{FrontendKey, LocalTraffic, Plan},
    source::addresses,
};

/// The programs, by the names the object gives them.
pub const INGRESS_PROGRAM: &str = "nodeport_ingress";
pub const EGRESS_PROGRAM: &str = "nodeport_egress";
/// Our netfilter table (the marks' consumers).
pub const TABLE: &str = "proxy-agent-ebpf";
/// Pinned link names start with these, then the interface name.
const INGRESS_PIN: &str = "tc_in_";
const EGRESS_PIN: &str = "tc_out_";

/// The loaded per-packet programs and the interfaces they are attached to.
pub struct PacketPrograms {
    ebpf: Ebpf,
    bpffs: PathBuf,
    attached: BTreeSet<String>,
    /// How local pod traffic is told, as last written to the maps (`None`: what a
    /// previous agent left there stands until the first sync says).
    local: Option<LocalTraffic>,
    /// Frontends whose pods' traffic the netfilter table drops.
    unserved: Unserved,
    /// The network namespace the programs serve: the one `start` ran in, whichever
    /// thread later calls `refresh` (the bench starts a node's dataplane in-process).
    netns: fs::File,
}

impl PacketPrograms {
    /// Loads the programs, writes the local traffic detection if it tells anything yet
    /// (`NodeCIDR` knows nothing before the Node is read; what the maps held stands until
    /// then), installs the netfilter table (its drop sets filled from what the maps hold:
    /// `unserved`), and attaches to the interfaces there are now.
    pub fn start(
        mut ebpf: Ebpf,
        bpffs: PathBuf,
        local: &LocalTraffic,
        unserved: Unserved,
    ) -> Result<Self, EbpfError> {
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::MissingProgram(name.to_owned()))?
                .try_into()?;
            program.load()?;
        }
        let local = local.detects().then(|| local.clone());
        if let Some(local) = &local {
            local::write(&mut ebpf, local, &BTreeSet::new())?;
        }
        let table = netfilter_table() + &unserved.elements();
        nftables::load(&table).map_err(EbpfError::Netfilter)?;
        let netns = fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| EbpfError::Io("/proc/thread-self/ns/net".into(), e))?;
        let mut programs = Self {
            ebpf,
            bpffs,
            attached: BTreeSet::new(),
            local,
            unserved,
            netns,
        };
        programs.detach_stale()?;
        programs.refresh()?;
        Ok(programs)
    }

    /// Attaches to interfaces that gained a node address since the last call, and
    /// detaches from those that lost theirs.
    pub fn refresh(&mut self) -> Result<(), EbpfError> {
        self.here(Self::refresh_here)
    }

    /// Follows a change of local traffic detection into the maps.
    pub fn set_local(&mut self, local: &LocalTraffic) -> Result<(), EbpfError> {
        if self.local.as_ref() == Some(local) {
            return Ok(());
        }
        local::write(&mut self.ebpf, local, &self.attached)?;
        self.local = Some(local.clone());
        Ok(())
    }

    /// Follows a plan's frontends into the drop sets in memory; [`Self::load_steps`]
    /// then brings the kernel along.
    pub fn follow(&mut self, plan: &Plan) -> Steps {
        self.unserved.follow(plan)
    }

    /// Adds (`added`) or deletes elements in one transaction. If the kernel refuses, they
    /// are forgotten in memory and returned, to be reported as failed frontends: the next
    /// plan carrying these keys tries them again.
    pub fn load_steps(
        &mut self,
        added: &[FrontendKey],
        removed: &[FrontendKey],
    ) -> Vec<FrontendKey> {
        if added.is_empty() && removed.is_empty() {
            return Vec::new();
        }
        let text = unserved::commands("add", added) + &unserved::commands("delete", removed);
        let result = self.here(|_| nftables::load(&text).map_err(EbpfError::Netfilter));
        let Err(error) = result else {
            return Vec::new();
        };
        warn!(%error, added = added.len(), removed = removed.len(), "cannot update the no-endpoints drop sets; will retry");
        self.unserved.undo(added, removed);
        added.iter().chain(removed).copied().collect()
    }

    /// Runs `f` in the programs' network namespace.
    fn here<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, EbpfError> + Send,
    ) -> Result<T, EbpfError> {
        if !same_netns(&self.netns) {
            let netns = self
                .netns
                .try_clone()
                .map_err(|e| EbpfError::Io("netns".into(), e))?;
            return std::thread::scope(|scope| {
                scope
                    .spawn(move || {
                        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| EbpfError::Io("setns".into(), e.into()))?;
                        f(self)
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(EbpfError::Io(
                            "netns thread".into(),
                            std::io::Error::other("panicked"),
                        ))
                    })
            });
        }
        f(self)
    }

    fn refresh_here(&mut self) -> Result<(), EbpfError> {
        // Not knowing the interfaces is no reason to leave them: nothing is detached.
        let wanted = external_interfaces()?;
        let (attach, detach) = changes(&self.attached, &wanted);
        for name in &attach {
            match self.attach(name) {
                Ok(()) => {
                    info!(interface = %name, "per-packet load balancing attached");
                    self.attached.insert(name.clone());
                }
                Err(error) => {
                    warn!(interface = %name, %error, "cannot attach the per-packet programs");
                }
            }
        }
        for name in &detach {
            self.detach(name)?;
            self.attached.remove(name);
        }
        if let Some(local) = self
            .local
            .as_ref()
            .filter(|_| !attach.is_empty() || !detach.is_empty())
        {
            local::write_interfaces(&mut self.ebpf, local, &self.attached)?;
        }
        Ok(())
    }

    fn attach(&mut self, interface: &str) -> Result<(), EbpfError> {
        for (program, attach_type, pin) in [
            (INGRESS_PROGRAM, TcAttachType::Ingress, INGRESS_PIN),
            (EGRESS_PROGRAM, TcAttachType::Egress, EGRESS_PIN),
        ] {
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| EbpfError::MissingProgram(program.to_owned()))?
                .try_into()?;
            // TCX: appended after any previous agent's program, which the pin swap
            // then detaches; both translate the same way, so no packet misses.
            let link_id = program.attach(interface, attach_type)?;
            let link = FdLink::try_from(program.take_link(link_id)?)?;
            loader::swap_pin(link, &pin_name(pin, interface), &self.bpffs)?;
        }
        Ok(())
    }

    fn detach(&self, interface: &str) -> Result<(), EbpfError> {
        for pin in [INGRESS_PIN, EGRESS_PIN] {
            let path = loader::links_dir(&self.bpffs).join(pin_name(pin, interface));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EbpfError::Io(path, e)),
            }
        }
        info!(interface, "per-packet load balancing detached");
        Ok(())
    }

    /// Links a previous agent pinned for interfaces that no longer hold a node address.
    fn detach_stale(&self) -> Result<(), EbpfError> {
        let wanted: BTreeSet<String> = match external_interfaces() {
            Ok(found) => found.iter().map(|name| pin_name("", name)).collect(),
            // Unknown: every pin stays (a stale one costs nothing; a live one, traffic).
            Err(error) => {
                warn!(%error, "cannot tell stale per-packet links from live ones; all kept");
                return Ok(());
            }
        };
        let Ok(entries) = fs::read_dir(loader::links_dir(&self.bpffs)) else {
            return Ok(());
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let interface = name
                .strip_prefix(INGRESS_PIN)
                .or_else(|| name.strip_prefix(EGRESS_PIN));
            if interface.is_some_and(|i| !wanted.contains(i)) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| EbpfError::Io(path, e))?;
            }
        }
        Ok(())
    }
}

/// Whether this thread is in the network namespace `netns` refers to.
fn same_netns(netns: &fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let here = fs::metadata("/proc/thread-self/ns/net");
    match (here, netns.metadata()) {
        (Ok(here), Ok(there)) => here.ino() == there.ino() && here.dev() == there.dev(),
        _ => true,
    }
}

/// bpffs refuses dots in names; interface names may have them.
fn pin_name(prefix: &str, interface: &str) -> String {
    format!("{prefix}{}", interface.replace('.', "_"))
}

/// Interfaces holding a node address (loopback and link-local left out): where
/// NodePort, external and load-balancer traffic arrives. An error when they cannot be
/// listed, never an empty set in its place.
fn external_interfaces() -> Result<BTreeSet<String>, EbpfError> {
    let found = addresses::by_interface().map_err(EbpfError::Interfaces)?;
    Ok(found.into_iter().map(|(name, _)| name).collect())
}

/// The interfaces to attach to and to detach from.
fn changes(attached: &BTreeSet<String>, wanted: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        wanted.difference(attached).cloned().collect(),
        attached.difference(wanted).cloned().collect(),
    )
}

/// Masquerade for flows the ingress program marked (the node picks the source address,
/// as kube-proxy's KUBE-POSTROUTING does), the REJECT kube-proxy sends: a TCP reset
/// for TCP (which an established connection heeds), ICMP port unreachable otherwise, and
/// the DROP it gives traffic to a frontend with no endpoint on this node under a Local
/// policy (which the socket programs leave untranslated).
///
/// Unlike kube-proxy, not `fully-random`: keeping the client's port keeps each client
/// port's connections on one 4-tuple at the backend, whose `TIME_WAIT` then accepts the
/// next SYN (monotonic sequence numbers). Random ports land on other connections'
/// `TIME_WAIT` sockets, which answer a SYN with a bare ACK: measured here, ~1 connection
/// in 80 then waited a second for its retransmitted SYN, ~1 in 10 000 timed out.
fn netfilter_table() -> String {
    let masq = proxy_common::MARK_MASQ;
    let reject = proxy_common::MARK_REJECT;
    let (set4, set6) = (unserved::SET4, unserved::SET6);
    let drops = format!(
        "ip daddr . meta l4proto . th dport @{set4} drop\n\t\tip6 daddr . meta l4proto . th dport @{set6} drop\n"
    );
    let rejects = format!(
        "{drops}\t\tmeta mark & {reject:#x} == {reject:#x} meta l4proto tcp reject with tcp reset\n\t\tmeta mark & {reject:#x} == {reject:#x} reject\n"
    );
    // Both families in one `inet` table; the `ip` table of earlier versions goes in the
    // same transaction.
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\n\
         add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         \tset {set4} {{ type ipv4_addr . inet_proto . inet_service; }}\n\
         \tset {set6} {{ type ipv6_addr . inet_proto . inet_service; }}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {masq:#x} == {masq:#x} masquerade\n\t}}\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\t{rejects}\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\t{rejects}\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\t\t{drops}\t}}\n}}\n"
    )
}

/// Removes our netfilter table (and an earlier version's), whether it exists or not.
pub fn remove_netfilter_table() -> Result<(), nftables::NftError> {
    nftables::load(&format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\nadd table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::changes;

    #[test]
    fn interfaces_that_lose_their_address_are_detached_and_new_ones_attached() {
        let set = |names: &[&str]| {
            names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<BTreeSet<_>>()
        };
        let (attach, detach) = changes(&set(&["eth0", "eth1"]), &set(&["eth1", "eth2"]));
        assert_eq!(
            (attach, detach),
            (vec!["eth2".to_owned()], vec!["eth0".to_owned()])
        );
    }
}
