//! Connected UDP sockets the socket LB sent to a backend that has since left its
//! Service keep sending straight to it: no hook runs again after `connect()`. As Cilium
//! does, the agent destroys such sockets (`sock_diag`, in every network namespace it can
//! see), so their owner's pending receive fails with ECONNABORTED and the socket it
//! opens next is balanced afresh. TCP connections are left alone, as kube-proxy does.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
};

use thiserror::Error;
use tracing::{debug, info, warn};

use super::{observe, EbpfError};
use crate::{
    model::{Frontend, FrontendKey, Plan, Protocol},
    netlink::NetlinkError,
    sockdiag::SockDiag,
};

/// A UDP frontend and one of its backends.
pub type Pair = (SocketAddr, SocketAddr);

#[derive(Debug, Error)]
pub enum TerminateError {
    #[error("reading the per-socket map: {0}")]
    Map(#[from] EbpfError),
    #[error("entering network namespace {0}: {1}")]
    Netns(PathBuf, #[source] std::io::Error),
    #[error("sock_diag: {0}")]
    Diag(#[from] NetlinkError),
    #[error("the thread in network namespace {0} panicked")]
    Thread(PathBuf),
}

/// The (frontend, backend) pairs of one UDP frontend, whichever class of client the
/// backend serves.
fn udp_pairs(key: &FrontendKey, frontend: &Frontend) -> BTreeSet<Pair> {
    if key.protocol != Protocol::Udp {
        return BTreeSet::new();
    }
    let at = SocketAddr::new(key.ip, key.port);
    frontend
        .routes()
        .iter()
        .flat_map(|route| route.backends.iter())
        .map(|backend| (at, SocketAddr::new(backend.ip, backend.port)))
        .collect()
}

/// The UDP (frontend, backend) pairs a plan takes away: a backend that left its
/// frontend, or a frontend that went with its backends. Only the frontends the plan
/// touches are looked at.
#[must_use]
pub fn removed_pairs(plan: &Plan) -> BTreeSet<Pair> {
    let mut removed = BTreeSet::new();
    for (key, before, after) in plan.changes() {
        let Some(before) = before else { continue };
        let kept = after.map(|a| udp_pairs(&key, a)).unwrap_or_default();
        removed.extend(udp_pairs(&key, before).difference(&kept).copied());
    }
    removed
}

/// The sockets to destroy, by cookie: those the per-socket maps record as sent to a
/// removed pair's backend in place of its frontend. The value is the backend, which
/// the socket's peer must still be.
///
/// # Errors
/// When a map cannot be read.
pub fn stale_sockets(
    bpffs: &Path,
    removed: &BTreeSet<Pair>,
) -> Result<BTreeMap<u64, SocketAddr>, EbpfError> {
    let entries = observe::sockets4(bpffs)?
        .into_iter()
        .chain(observe::sockets6(bpffs)?);
    Ok(entries
        .filter(|s| removed.contains(&(s.frontend, s.backend)))
        .map(|s| (s.cookie, s.backend))
        .collect())
}

/// The network namespaces this process can see, each once: its own, the named ones
/// (where CRI runtimes keep pods'), and every process's.
#[must_use]
pub fn namespaces() -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::from("/proc/self/ns/net")];
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            candidates.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let pids = entries.filter_map(Result::ok).filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        });
        candidates.extend(pids.map(|e| e.path().join("ns/net")));
    }
    let mut seen = BTreeSet::new();
    candidates
        .into_iter()
        .filter(|path| {
            std::fs::metadata(path).is_ok_and(|m| m.dev() != 0 && seen.insert((m.dev(), m.ino())))
        })
        .collect()
}

/// Destroys, in the network namespace at `netns`, the connected UDP sockets among
/// `stale` whose peer is still the recorded backend; removes them from `stale` and
/// returns how many went.
///
/// # Errors
/// When the namespace cannot be entered or `sock_diag` fails.
pub fn destroy_in(
    netns: &Path,
    stale: &mut BTreeMap<u64, SocketAddr>,
) -> Result<usize, TerminateError> {
    let file = std::fs::File::open(netns).map_err(|e| TerminateError::Netns(netns.into(), e))?;
    // A thread of its own: the namespace switch ends with it.
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| TerminateError::Netns(netns.into(), e.into()))?;
                let mut diag = SockDiag::open()?;
                let mut destroyed = 0;
                for socket in diag.connected_udp()? {
                    if stale.get(&socket.cookie) == Some(&socket.peer) {
                        diag.destroy(&socket)?;
                        stale.remove(&socket.cookie);
                        destroyed += 1;
                    }
                }
                Ok(destroyed)
            })
            .join()
            .unwrap_or_else(|_| Err(TerminateError::Thread(netns.into())))
    })
}

/// One pass: the stale sockets of `removed`, destroyed wherever they are.
///
/// # Errors
/// When the per-socket maps cannot be read.
pub fn terminate(bpffs: &Path, removed: &BTreeSet<Pair>) -> Result<usize, TerminateError> {
    let mut stale = stale_sockets(bpffs, removed)?;
    let mut destroyed = 0;
    for netns in namespaces() {
        if stale.is_empty() {
            break;
        }
        match destroy_in(&netns, &mut stale) {
            Ok(n) => destroyed += n,
            // Refused, not gone: without CAP_SYS_ADMIN no pod's namespace can be entered,
            // and their stale sockets stay. Said once.
            Err(TerminateError::Netns(_, error))
                if error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(%error, "cannot enter pods' network namespaces (CAP_SYS_ADMIN?): their connected UDP sockets to removed backends are not destroyed");
                });
            }
            // Processes come and go while the walk runs.
            Err(error) => debug!(%error, "skipping a network namespace"),
        }
    }
    Ok(destroyed)
}

/// The background worker the dataplane hands removed pairs to.
pub struct Terminator {
    tx: mpsc::Sender<BTreeSet<Pair>>,
    destroyed: Arc<AtomicU64>,
}

impl Terminator {
    /// Starts the worker for the maps pinned under `bpffs`.
    #[must_use]
    pub fn spawn(bpffs: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<BTreeSet<Pair>>();
        let destroyed = Arc::new(AtomicU64::new(0));
        let count = destroyed.clone();
        let spawned = std::thread::Builder::new()
            .name("udp-terminate".into())
            .spawn(move || {
                while let Ok(mut removed) = rx.recv() {
                    // Removals queued meanwhile go in the same pass.
                    removed.extend(rx.try_iter().flatten());
                    match terminate(&bpffs, &removed) {
                        Ok(0) => {}
                        Ok(n) => {
                            count
                                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
                            info!(
                                sockets = n,
                                "destroyed connected UDP sockets sent to removed backends"
                            );
                        }
                        Err(error) => warn!(%error, "cannot destroy stale UDP sockets"),
                    }
                }
            });
        if let Err(error) = spawned {
            warn!(%error, "cannot start the stale UDP socket worker");
        }
        Self { tx, destroyed }
    }

    /// Queues the pairs a sync removed.
    pub fn request(&self, removed: BTreeSet<Pair>) {
        // The worker only stops when the process does.
        let _ = self.tx.send(removed);
    }

    /// Sockets destroyed so far.
    #[must_use]
    pub fn destroyed(&self) -> Arc<AtomicU64> {
        self.destroyed.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, os::unix::fs::MetadataExt};

    use super::{
        super::tests::{key, state},
        namespaces, removed_pairs,
    };
    use crate::model::{diff, Protocol};

    #[test]
    fn removed_pairs_are_udp_backends_that_left_their_frontend() {
        use Protocol::{Tcp, Udp};
        let before = state(&[
            (key(1, Udp), &[1, 2]),
            (key(2, Udp), &[3]),
            (key(3, Tcp), &[4]),
        ]);
        let after = state(&[(key(1, Udp), &[2, 5]), (key(3, Tcp), &[])]);
        let removed: Vec<String> = removed_pairs(&diff(&before, &after))
            .iter()
            .map(|(f, b)| format!("{f}->{b}"))
            .collect();
        // 10.244.0.1 left the first frontend, the second frontend went with its
        // backend; TCP is not UDP's business, and an added backend removes nothing.
        assert_eq!(
            removed,
            [
                "10.96.0.1:80->10.244.0.1:8080",
                "10.96.0.2:80->10.244.0.3:8080"
            ]
        );
        assert!(removed_pairs(&diff(&before, &before)).is_empty());
    }

    #[test]
    fn every_visible_network_namespace_is_listed_once_starting_with_our_own() {
        let listed = namespaces();
        assert_eq!(listed[0].to_str(), Some("/proc/self/ns/net"));
        let mut seen = BTreeSet::new();
        // A process may exit meanwhile: its namespace is then not read again.
        for path in &listed {
            if let Ok(meta) = std::fs::metadata(path) {
                assert!(seen.insert((meta.dev(), meta.ino())), "{path:?} twice");
            }
        }
    }
}
