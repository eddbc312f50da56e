//! The Kubernetes API as the source: list/watch Services, EndpointSlices and this node's
//! Node with kube-proxy's selectors. Stores are the truth: a relist replaces a kind
//! whole (so deletes missed while disconnected vanish), nothing is published before
//! every kind has listed once, and a burst of changes is published once.
use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Config,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{parse::Kind, SourceError, SourceUpdate};
use crate::model::{self, ObjectKey, Snapshot};

/// kube-proxy's selector: objects of another proxy are not ours.
const NOT_OTHER_PROXY: &str = "!service.kubernetes.io/service-proxy-name";

/// A client from `--kubeconfig`, else in-cluster config, else `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    let error = |e: &dyn std::fmt::Display| SourceError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| error(&e))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| error(&e))?
        }
        None => Config::infer().await.map_err(|e| error(&e))?,
    };
    Client::try_from(config).map_err(|e| error(&e))
}

/// One watcher's news for the store.
enum Change {
    Init(Kind),
    Upsert(Kind, Box<DynamicObject>, bool),
    Delete(Kind, ObjectKey),
    InitDone(Kind),
}

/// One kind's objects, and the relist in progress.
#[derive(Default)]
struct KindStore {
    objects: BTreeMap<ObjectKey, serde_json::Value>,
    relist: Option<BTreeMap<ObjectKey, serde_json::Value>>,
    listed: bool,
}

#[derive(Default)]
struct Store {
    kinds: BTreeMap<Kind, KindStore>,
}

/// Every kind the agent lists and watches (the RBAC in `deploy/` must allow each).
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

impl Store {
    fn kind(&mut self, kind: Kind) -> &mut KindStore {
        self.kinds.entry(kind).or_default()
    }

    fn ready(&self) -> bool {
        KINDS
            .iter()
            .all(|k| self.kinds.get(k).is_some_and(|s| s.listed))
    }

    /// Applies one change; true when the published state may differ.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Init(kind) => {
                self.kind(kind).relist = Some(BTreeMap::new());
                false
            }
            Change::Upsert(kind, object, initial) => {
                let key = (
                    object.metadata.namespace.clone().unwrap_or_default(),
                    object.metadata.name.clone().unwrap_or_default(),
                );
                let store = self.kind(kind);
                let value = match checked(kind, &object) {
                    Ok(value) => value,
                    Err(error) => {
                        warn!(kind = ?kind, object = %format!("{}/{}", key.0, key.1), %error, "API object skipped; keeping its last good version");
                        // During a relist the last good version must survive the swap.
                        let Some(previous) = store.objects.get(&key).cloned() else {
                            return false;
                        };
                        previous
                    }
                };
                match (&mut store.relist, initial) {
                    (Some(relist), true) => {
                        relist.insert(key, value);
                        false
                    }
                    _ => store
                        .objects
                        .insert(key, value.clone())
                        .is_none_or(|old| old != value),
                }
            }
            Change::Delete(kind, key) => self.kind(kind).objects.remove(&key).is_some(),
            Change::InitDone(kind) => {
                let store = self.kind(kind);
                if let Some(relist) = store.relist.take() {
                    store.objects = relist;
                }
                store.listed = true;
                true
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let objects = |kind| {
            self.kinds
                .get(&kind)
                .into_iter()
                .flat_map(|s| s.objects.iter())
        };
        for (key, value) in objects(Kind::Service) {
            if let Ok(o) = serde_json::from_value::<Service>(value.clone()) {
                snapshot.services.insert(key.clone(), o);
            }
        }
        for (key, value) in objects(Kind::EndpointSlice) {
            if let Ok(o) = serde_json::from_value::<EndpointSlice>(value.clone()) {
                snapshot.endpoint_slices.insert(key.clone(), o);
            }
        }
        for (key, value) in objects(Kind::Node) {
            if let Ok(o) = serde_json::from_value::<Node>(value.clone()) {
                snapshot.nodes.insert(key.1.clone(), o);
            }
        }
        snapshot
    }
}

/// Decodes and validates an API object as its kind; the error names what is wrong.
fn checked(kind: Kind, object: &DynamicObject) -> Result<serde_json::Value, String> {
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    let valid = match kind {
        Kind::Service => serde_json::from_value::<Service>(value.clone())
            .map_err(|e| format!("does not decode as Service: {e}"))
            .and_then(|s| model::validate::service(&s).map_err(|e| e.to_string())),
        Kind::EndpointSlice => serde_json::from_value::<EndpointSlice>(value.clone())
            .map_err(|e| format!("does not decode as EndpointSlice: {e}"))
            .and_then(|s| model::validate::endpoint_slice(&s).map_err(|e| e.to_string())),
        Kind::Node => serde_json::from_value::<Node>(value.clone())
            .map(|_| ())
            .map_err(|e| format!("does not decode as Node: {e}")),
    };
    valid.map(|()| value)
}

/// The API resource of a kind.
#[must_use]
pub fn resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::Node => ApiResource::erase::<Node>(&()),
    }
}

/// Runs one kind's watcher (with backoff on errors) and forwards its events.
fn spawn_watcher(
    client: Client,
    kind: Kind,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<Change>,
) {
    tokio::spawn(async move {
        let api: Api<DynamicObject> = Api::all_with(client, &resource(kind));
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let change = match event {
                Ok(watcher::Event::Init) => Change::Init(kind),
                Ok(watcher::Event::InitApply(o)) => Change::Upsert(kind, Box::new(o), true),
                Ok(watcher::Event::Apply(o)) => Change::Upsert(kind, Box::new(o), false),
                Ok(watcher::Event::Delete(o)) => Change::Delete(
                    kind,
                    (
                        o.metadata.namespace.unwrap_or_default(),
                        o.metadata.name.unwrap_or_default(),
                    ),
                ),
                Ok(watcher::Event::InitDone) => Change::InitDone(kind),
                Err(error) => {
                    warn!(kind = ?kind, %error, "watch failed; retrying with backoff, keeping the last state");
                    continue;
                }
            };
            if tx.send(change).is_err() {
                return;
            }
        }
    });
}

/// Watches until the receiver is gone. `coalesce` is how long a change waits for
/// others before the state is published (kube-proxy's min-sync-period idea).
pub async fn run(
    client: Client,
    node_name: String,
    tx: watch::Sender<SourceUpdate>,
    coalesce: Duration,
) -> Result<(), SourceError> {
    let (change_tx, mut changes) = mpsc::unbounded_channel();
    let selected = watcher::Config::default().labels(NOT_OTHER_PROXY);
    spawn_watcher(
        client.clone(),
        Kind::Service,
        selected.clone(),
        change_tx.clone(),
    );
    spawn_watcher(
        client.clone(),
        Kind::EndpointSlice,
        selected,
        change_tx.clone(),
    );
    let own_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    spawn_watcher(client, Kind::Node, own_node, change_tx);
    let mut store = Store::default();
    let mut announced = false;
    while let Some(change) = changes.recv().await {
        let mut dirty = store.apply(change);
        let deadline = tokio::time::Instant::now() + coalesce;
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Some(change) => dirty |= store.apply(change),
                    None => return Ok(()),
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !dirty || !store.ready() {
            continue;
        }
        if !announced {
            info!("initial lists from the API server complete");
            announced = true;
        }
        let snapshot = Arc::new(store.snapshot());
        debug!(
            services = snapshot.services.len(),
            slices = snapshot.endpoint_slices.len(),
            "publishing API state"
        );
        tx.send_modify(|update| {
            update.generation += 1;
            update.snapshot = Some(snapshot);
        });
        if tx.is_closed() {
            return Ok(());
        }
    }
    Ok(())
}
