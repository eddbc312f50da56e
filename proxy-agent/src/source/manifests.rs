//! `--manifests DIR`: a directory of YAML/JSON files as the cluster. A file is re-read
//! when inotify says it changed (at once when it was closed after writing or renamed
//! into place, after a short debounce for other writes); a file or object that fails
//! keeps its last good content. Only the objects of re-read files are compared, and the
//! snapshot is updated in place, so a change costs what it changes. Runs on a thread of
//! its own: file I/O never blocks the runtime serving DNS, health and metrics.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::{mpsc as std_mpsc, Arc},
    time::{Duration, Instant, SystemTime},
};

use notify::{
    event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode},
    EventKind, RecursiveMode, Watcher,
};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    parse::{self, Kind, Object},
    SourceError, SourceUpdate,
};
use crate::model::{ObjectKey, Snapshot};

/// A file written and not yet closed is read once the writer closes it; if it never
/// does, this long after its last write. (A file truncated and then written, as
/// `kubectl … > file` does, reads as empty in between: reading it then would remove
/// its Services.)
const UNCLOSED: Duration = Duration::from_secs(10);
/// A full rescan even without events, in case inotify lost some.
const RESCAN: Duration = Duration::from_secs(5);

type ObjectId = (Kind, ObjectKey);

#[derive(Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    objects: BTreeMap<ObjectId, Object>,
}

/// The directory's last good content, file by file, and the snapshot it makes.
#[derive(Debug, Default)]
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The files defining each object, sorted; the last by name wins. (Almost always
    /// one file: a short vector of shared paths, not a set per object.)
    defined_in: HashMap<ObjectId, Vec<Arc<Path>>>,
    snapshot: Snapshot,
}

impl ManifestsDir {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            ..Self::default()
        }
    }

    /// Re-reads every changed file; true when the snapshot changed.
    pub fn reload(&mut self) -> Result<bool, SourceError> {
        self.reload_except(&BTreeSet::new())
    }

    /// [`Self::reload`] leaving out the files in `skip` (being written).
    fn reload_except(&mut self, skip: &BTreeSet<PathBuf>) -> Result<bool, SourceError> {
        let mut listed = list(&self.dir)?;
        listed.retain(|p| !skip.contains(p));
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(p) && !skip.contains(*p))
            .cloned()
            .collect();
        let mut changed = false;
        for path in gone.iter().chain(&listed) {
            changed |= self.reload_file(path);
        }
        Ok(changed)
    }

    /// Re-reads the given files (gone ones are dropped); true when the snapshot changed.
    pub fn reload_paths<'a>(&mut self, paths: impl IntoIterator<Item = &'a PathBuf>) -> bool {
        let mut changed = false;
        for path in paths {
            changed |= self.reload_file(path);
        }
        changed
    }

    fn reload_file(&mut self, path: &Path) -> bool {
        let stamp = if is_manifest(path) {
            fs::metadata(path)
                .ok()
                .filter(fs::Metadata::is_file)
                .map(|m| (m.modified().ok(), m.len()))
        } else {
            None
        };
        let Some((modified, len)) = stamp else {
            let Some(state) = self.files.remove(path) else {
                return false;
            };
            return self.replace(path, &state.objects, &BTreeMap::new());
        };
        let stamp = modified.map(|m| (m, len));
        let state = self.files.entry(path.to_owned()).or_default();
        if stamp.is_some() && state.stamp == stamp {
            return false;
        }
        state.stamp = stamp;
        let before = state.objects.clone();
        if !read_file(path, state) {
            return false;
        }
        let after = state.objects.clone();
        self.replace(path, &before, &after)
    }

    /// Follows one file's objects going from `before` to `after`.
    fn replace(
        &mut self,
        path: &Path,
        before: &BTreeMap<ObjectId, Object>,
        after: &BTreeMap<ObjectId, Object>,
    ) -> bool {
        let mut changed = false;
        let shared: Arc<Path> = Arc::from(path);
        let ids: BTreeSet<&ObjectId> = before.keys().chain(after.keys()).collect();
        for id in ids {
            if before.get(id) == after.get(id) {
                continue;
            }
            let files = self.defined_in.entry(id.clone()).or_default();
            match (files.binary_search(&shared), after.contains_key(id)) {
                (Err(at), true) => files.insert(at, shared.clone()),
                (Ok(at), false) => drop(files.remove(at)),
                _ => {}
            }
            let winner = files.last().cloned();
            if winner.is_none() {
                self.defined_in.remove(id);
            }
            let object = winner.and_then(|p| self.files.get(&*p)?.objects.get(id).cloned());
            changed |= self.store(id, object);
        }
        changed
    }

    /// Puts the winning version of an object into the snapshot (or removes it).
    fn store(&mut self, (kind, key): &ObjectId, object: Option<Object>) -> bool {
        super::store(&mut self.snapshot, *kind, key, object)
    }

    /// The merged objects of every file (a later file, by name, wins on a duplicate);
    /// O(1), sharing structure with the directory's own copy.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let entries = fs::read_dir(dir).map_err(|e| SourceError::ReadDir(dir.to_owned(), e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Reads one file into `state`, keeping the previous content on any failure.
fn read_file(path: &Path, state: &mut FileState) -> bool {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            warn!(file = %path.display(), %error, "cannot read manifest file; keeping its previous content");
            return false;
        }
    };
    let entries = match parse::parse_file(&text) {
        Ok(entries) => entries,
        Err(error) => {
            warn!(file = %path.display(), %error, "manifest file rejected; keeping its previous content");
            return false;
        }
    };
    let mut objects = BTreeMap::new();
    for entry in entries {
        match entry {
            Ok(object) => {
                objects.insert(object.id(), object);
            }
            Err(rejected) => {
                let kept = rejected
                    .id
                    .as_ref()
                    .and_then(|id| state.objects.get(id).map(|o| (id.clone(), o.clone())));
                warn!(
                    file = %path.display(),
                    object = %rejected.display,
                    error = %rejected.error,
                    kept_previous = kept.is_some(),
                    "manifest object skipped"
                );
                if let Some((id, object)) = kept {
                    objects.insert(id, object);
                }
            }
        }
    }
    debug!(file = %path.display(), objects = objects.len(), "manifest file read");
    state.objects = objects;
    true
}

/// What an event says about its files.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The writer is done with them (closed after writing, renamed, removed): read now.
    Done,
    /// Written and still open: read when closed (or after [`UNCLOSED`]).
    Writing,
    Nothing,
}

fn step(kind: EventKind) -> Step {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(
            RenameMode::To | RenameMode::From | RenameMode::Both | RenameMode::Any,
        ))
        | EventKind::Remove(_) => Step::Done,
        EventKind::Access(_) | EventKind::Create(CreateKind::Folder) => Step::Nothing,
        _ => Step::Writing,
    }
}

/// Loads the directory, publishes it, then follows changes until the receiver is gone,
/// on a thread of its own.
pub async fn run(dir: PathBuf, tx: watch::Sender<SourceUpdate>) -> Result<(), SourceError> {
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("manifests".into())
        .spawn(move || {
            crate::background::lower_priority();
            let _ = done_tx.send(follow(&dir, &tx));
        })
        .map_err(SourceError::Thread)?;
    done.await.unwrap_or(Ok(()))
}

fn follow(dir: &Path, tx: &watch::Sender<SourceUpdate>) -> Result<(), SourceError> {
    let (event_tx, events) = std_mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver only goes away at shutdown.
        let _ = event_tx.send(event);
    })
    .map_err(SourceError::Watch)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(SourceError::Watch)?;
    let mut manifests = ManifestsDir::new(dir);
    manifests.reload()?;
    publish(tx, &manifests);
    info!(dir = %dir.display(), "manifests loaded");
    // Files to read, by when; those still open for writing are also in `writing`,
    // which the rescan leaves alone.
    let mut pending: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    let mut writing: BTreeSet<PathBuf> = BTreeSet::new();
    let mut rescan = Instant::now() + RESCAN;
    loop {
        let next = pending
            .values()
            .min()
            .copied()
            .unwrap_or(rescan)
            .min(rescan);
        match events.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Ok(event)) => {
                let event: notify::Event = event;
                let now = Instant::now();
                for path in event.paths {
                    if !is_manifest(&path) {
                        // `..data` swapped, as a ConfigMap volume updates: the files
                        // behind the links changed without events of their own.
                        let swapped = matches!(
                            event.kind,
                            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Create(_)
                        );
                        if swapped && path != dir {
                            rescan = rescan.min(now);
                        }
                        continue;
                    }
                    match step(event.kind) {
                        Step::Done => {
                            writing.remove(&path);
                            pending.insert(path, now);
                        }
                        Step::Writing => {
                            writing.insert(path.clone());
                            pending.insert(path, now + UNCLOSED);
                        }
                        Step::Nothing => {}
                    }
                }
            }
            Ok(Err(error)) => warn!(%error, "inotify error; the next rescan catches up"),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        let mut changed = false;
        if !due.is_empty() {
            for path in &due {
                pending.remove(path);
                writing.remove(path);
            }
            changed |= manifests.reload_paths(&due);
        }
        if now >= rescan {
            rescan = now + RESCAN;
            match manifests.reload_except(&writing) {
                Ok(c) => changed |= c,
                Err(error) => {
                    warn!(%error, "manifests directory unreadable; keeping the last good state");
                }
            }
        }
        if changed {
            publish(tx, &manifests);
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
}

fn publish(tx: &watch::Sender<SourceUpdate>, manifests: &ManifestsDir) {
    let snapshot = Arc::new(manifests.snapshot());
    tx.send_modify(|update| {
        update.generation += 1;
        update.snapshot = Some(snapshot);
    });
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        time::{Duration, Instant},
    };

    use tokio::sync::watch;

    use super::{follow, ManifestsDir, SourceUpdate};

    /// The followed directory's published ClusterIP of default/web.
    fn published_ip(rx: &watch::Receiver<SourceUpdate>) -> Option<String> {
        let snapshot = rx.borrow().snapshot.clone()?;
        let service = snapshot
            .services()
            .get(&("default".to_owned(), "web".to_owned()))?
            .clone();
        service.cluster_ips.first().map(ToString::to_string)
    }

    /// Follows `root` on a thread of its own (it stops once the receiver is dropped).
    fn following(root: &Path) -> watch::Receiver<SourceUpdate> {
        let (tx, rx) = watch::channel(SourceUpdate::default());
        let root = root.to_owned();
        std::thread::spawn(move || follow(&root, &tx));
        rx
    }

    fn wait_for(rx: &watch::Receiver<SourceUpdate>, ip: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while published_ip(rx).as_deref() != Some(ip) {
            assert!(
                Instant::now() < deadline,
                "{ip} not published: {:?}",
                published_ip(rx)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("pa-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn a_file_truncated_then_written_slowly_keeps_its_objects_until_closed() {
        use std::io::Write as _;
        let root = scratch("truncated");
        let file = root.join("web.yaml");
        std::fs::write(&file, service("10.96.0.1")).unwrap();
        let rx = following(&root);
        wait_for(&rx, "10.96.0.1", Duration::from_secs(5));
        // `kubectl get … > web.yaml`: truncated at once, written when the answer comes.
        let mut writer = std::fs::File::create(&file).unwrap();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                published_ip(&rx).as_deref(),
                Some("10.96.0.1"),
                "removed mid-write"
            );
        }
        writer.write_all(service("10.96.0.9").as_bytes()).unwrap();
        drop(writer);
        wait_for(&rx, "10.96.0.9", Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_configmap_volume_update_is_read_at_once() {
        use std::os::unix::fs::symlink;
        let root = scratch("configmap");
        // The layout kubelet writes: timestamped dir, `..data` link, links to it.
        std::fs::create_dir(root.join("..2026_01")).unwrap();
        std::fs::write(root.join("..2026_01/web.yaml"), service("10.96.0.1")).unwrap();
        symlink("..2026_01", root.join("..data")).unwrap();
        symlink("..data/web.yaml", root.join("web.yaml")).unwrap();
        let rx = following(&root);
        wait_for(&rx, "10.96.0.1", Duration::from_secs(5));
        std::fs::create_dir(root.join("..2026_02")).unwrap();
        std::fs::write(root.join("..2026_02/web.yaml"), service("10.96.0.9")).unwrap();
        symlink("..2026_02", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        // Well before the periodic rescan.
        wait_for(&rx, "10.96.0.9", Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn service(ip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")
    }

    fn cluster_ip(dir: &ManifestsDir) -> Option<String> {
        let snapshot = dir.snapshot();
        let service = snapshot
            .services()
            .get(&("default".to_owned(), "web".to_owned()))?
            .clone();
        service.cluster_ips.first().map(ToString::to_string)
    }

    #[test]
    fn the_last_file_by_name_wins_and_the_other_takes_over_when_it_goes() {
        let root = std::env::temp_dir().join(format!("pa-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.yaml"), service("10.96.0.1")).unwrap();
        std::fs::write(root.join("b.yaml"), service("10.96.0.2")).unwrap();
        let mut dir = ManifestsDir::new(&root);
        dir.reload().unwrap();
        assert_eq!(cluster_ip(&dir).as_deref(), Some("10.96.0.2"));
        std::fs::remove_file(root.join("b.yaml")).unwrap();
        dir.reload().unwrap();
        assert_eq!(cluster_ip(&dir).as_deref(), Some("10.96.0.1"));
        std::fs::remove_file(root.join("a.yaml")).unwrap();
        dir.reload().unwrap();
        assert_eq!(cluster_ip(&dir), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
