//! `--manifests DIR`: a directory of YAML/JSON files as the cluster. Files are re-read
//! when inotify says they changed; a file or object that fails keeps its last good content.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    parse::{self, Kind, Object},
    SourceError, SourceUpdate,
};
use crate::model::{ObjectKey, Snapshot};

/// Changes closer together than this are read in one pass.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A full rescan even without events, in case inotify lost some.
const RESCAN: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    objects: BTreeMap<(Kind, ObjectKey), Object>,
}

/// The directory's last good content, file by file.
#[derive(Debug, Default)]
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ManifestsDir {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads changed files; true when anything the snapshot holds may have changed.
    pub fn reload(&mut self) -> Result<bool, SourceError> {
        let listed = list(&self.dir)?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| listed.contains(path));
        changed |= self.files.len() != before;
        for path in listed {
            let stamp = fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            let state = self.files.entry(path.clone()).or_default();
            if stamp.is_some() && state.stamp == stamp {
                continue;
            }
            state.stamp = stamp;
            changed |= read_file(&path, state);
        }
        Ok(changed)
    }

    /// Merges every file's objects; a later file (by name) wins on a duplicate.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for object in self.files.values().flat_map(|f| f.objects.values()) {
            let (_, key) = object.id();
            match object {
                Object::Service(o) => {
                    snapshot.services.insert(key, (**o).clone());
                }
                Object::EndpointSlice(o) => {
                    snapshot.endpoint_slices.insert(key, (**o).clone());
                }
                Object::Node(o) => {
                    snapshot.nodes.insert(key.1, (**o).clone());
                }
            }
        }
        snapshot
    }
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let entries = fs::read_dir(dir).map_err(|e| SourceError::ReadDir(dir.to_owned(), e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
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

/// Loads the directory, publishes it, then follows changes until the receiver is gone.
pub async fn run(dir: PathBuf, tx: watch::Sender<SourceUpdate>) -> Result<(), SourceError> {
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver only goes away at shutdown.
        let _ = event_tx.send(event);
    })
    .map_err(SourceError::Watch)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(SourceError::Watch)?;
    let mut manifests = ManifestsDir::new(&dir);
    manifests.reload()?;
    publish(&tx, &manifests);
    info!(dir = %dir.display(), "manifests loaded");
    loop {
        tokio::select! {
            event = events.recv() => {
                if event.is_none() {
                    return Ok(());
                }
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(RESCAN) => {}
        }
        match manifests.reload() {
            Ok(true) => publish(&tx, &manifests),
            Ok(false) => {}
            Err(error) => {
                warn!(%error, "manifests directory unreadable; keeping the last good state");
            }
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
