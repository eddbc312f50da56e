//! The Kubernetes API as the source: list/watch Services, EndpointSlices and this node's
//! Node with kube-proxy's selectors. Stores are the truth: a relist replaces a kind
//! whole (so deletes missed while disconnected vanish), nothing is published before
//! every kind has listed once, and a burst of changes is published once.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Api, ApiResource},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Config,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    parse::{Kind, Object},
    rate::{ApiRate, RateLimitLayer},
    wire::{field, WireObject},
    SourceError, SourceUpdate,
};
use crate::model::{
    self,
    snapshot::{slim_node, slim_service, slim_slice},
    ObjectKey, Snapshot,
};

/// kube-proxy's selector: objects of another proxy are not ours.
const NOT_OTHER_PROXY: &str = "!service.kubernetes.io/service-proxy-name";

/// A client from `--kubeconfig`, else in-cluster config, else `~/.kube/config`, its
/// requests limited to `rate`.
pub async fn client(kubeconfig: Option<&Path>, rate: ApiRate) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(SourceError::Kubeconfig)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(SourceError::Kubeconfig)?
        }
        None => Config::infer().await.map_err(SourceError::InferConfig)?,
    };
    client_limited(config, rate)
}

/// The client for a configuration. kube-rs retries a request answered 429, 503 or 504
/// itself, 15 times from 5 ms doubling: through an API outage its waits grow into
/// minutes before the watcher even hears of it, so a change made just after the
/// outage waited 8-12 s. Here the watcher's own backoff ([`WatchBackoff`]) decides.
///
/// # Errors
/// When the configuration cannot make a client (a bad TLS setup, say).
pub fn client_from(mut config: Config) -> Result<Client, SourceError> {
    config.default_retry = false;
    Client::try_from(config).map_err(SourceError::Kube)
}

/// [`client_from`] with every request waiting its turn under `rate`.
///
/// # Errors
/// As [`client_from`].
pub fn client_limited(mut config: Config, rate: ApiRate) -> Result<Client, SourceError> {
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(SourceError::Kube)?;
    Ok(builder.with_layer(&RateLimitLayer::new(rate)).build())
}

/// One watcher's news for the store. Objects arrive decoded, checked and slimmed (or as
/// the reason they are unusable) by the watcher's own task, so only slim objects wait
/// in the channel while a large list streams in.
enum Change {
    Init(Kind),
    Upsert(Kind, ObjectKey, Result<Object, String>, bool),
    Delete(Kind, ObjectKey),
    InitDone(Kind),
}

/// The typed, slimmed objects of one kind being relisted.
type Relist = BTreeMap<ObjectKey, Object>;

/// The published snapshot, kept current object by object, and the relists in progress.
#[derive(Default)]
struct Store {
    snapshot: Snapshot,
    relist: BTreeMap<Kind, Relist>,
    listed: BTreeSet<Kind>,
}

/// Every kind the agent lists and watches (the RBAC in `deploy/` must allow each).
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

impl Store {
    fn ready(&self) -> bool {
        KINDS.iter().all(|k| self.listed.contains(k))
    }

    /// The stored version of an object, if any.
    fn stored(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
        super::stored(&self.snapshot, kind, key)
    }

    /// Stores an object unless an equal one is there; true when it changed.
    fn put(&mut self, key: &ObjectKey, object: Object) -> bool {
        let kind = object.id().0;
        super::store(&mut self.snapshot, kind, key, Some(object))
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        super::store(&mut self.snapshot, kind, key, None)
    }

    /// The keys of one kind the snapshot holds.
    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        let s = &self.snapshot;
        match kind {
            Kind::Service => s.services().keys().cloned().collect(),
            Kind::EndpointSlice => s.endpoint_slices().keys().cloned().collect(),
            Kind::Node => s
                .nodes()
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
        }
    }

    /// Applies one change; true when the published state may differ.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Init(kind) => {
                self.relist.insert(kind, Relist::new());
                false
            }
            Change::Upsert(kind, key, object, initial) => {
                let object = match object {
                    Ok(object) => object,
                    Err(error) => {
                        warn!(kind = ?kind, object = %format!("{}/{}", key.0, key.1), %error, "API object skipped; keeping its last good version");
                        // During a relist the last good version must survive the swap.
                        let Some(previous) = self.stored(kind, &key) else {
                            return false;
                        };
                        previous
                    }
                };
                match self.relist.get_mut(&kind) {
                    Some(relist) if initial => {
                        relist.insert(key, object);
                        false
                    }
                    _ => self.put(&key, object),
                }
            }
            Change::Delete(kind, key) => self.remove(kind, &key),
            Change::InitDone(kind) => {
                let mut changed = false;
                if let Some(relist) = self.relist.remove(&kind) {
                    // Deletes missed while disconnected vanish; the rest is compared.
                    for key in self.keys(kind) {
                        if !relist.contains_key(&key) {
                            changed |= self.remove(kind, &key);
                        }
                    }
                    for (key, object) in relist {
                        changed |= self.put(&key, object);
                    }
                }
                self.listed.insert(kind) || changed
            }
        }
    }
}

/// Decodes, validates and slims an API object as its kind; the error names what is
/// wrong. Each object is decoded once, when it arrives, one field at a time.
pub fn checked(kind: Kind, object: WireObject) -> Result<Object, String> {
    let WireObject {
        metadata,
        spec,
        status,
        address_type,
        endpoints,
        ports,
    } = object;
    match kind {
        Kind::Service => {
            let service = Service {
                metadata,
                spec: field("Service", "spec", spec)?,
                status: field("Service", "status", status)?,
            };
            model::validate::service(&service).map_err(|e| e.to_string())?;
            Ok(Object::Service(Arc::new(slim_service(service))))
        }
        Kind::EndpointSlice => {
            let slice = EndpointSlice {
                metadata,
                address_type: field("EndpointSlice", "addressType", address_type)?,
                endpoints: field::<Option<_>>("EndpointSlice", "endpoints", endpoints)?
                    .unwrap_or_default(),
                ports: field("EndpointSlice", "ports", ports)?,
            };
            model::validate::endpoint_slice(&slice).map_err(|e| e.to_string())?;
            Ok(Object::EndpointSlice(Arc::new(slim_slice(slice))))
        }
        Kind::Node => {
            let node = Node {
                metadata,
                spec: field("Node", "spec", spec)?,
                status: field("Node", "status", status)?,
            };
            Ok(Object::Node(Arc::new(slim_node(node))))
        }
    }
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

/// The delays between retries after a watch or list error: 100 ms doubling up to 1 s,
/// each cut by a random part of up to a half so a cluster's nodes do not retry in step.
/// An agent is watching again within about a second of an API outage ending; kube-rs's
/// default climbs to 30 s, which left changes made after a 10 s outage unseen for 8 s.
/// The delays start again from 100 ms only after [`Self::CALM`] without an error, as
/// client-go's do: a success in between (a relist answered, then its watch sent away
/// with 410 again) does not, or an API server answering every watch with 410 would be
/// relisted ten times a second.
#[derive(Debug)]
struct WatchBackoff {
    next: std::time::Duration,
    last_error: Option<std::time::Instant>,
    calm: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);
    const CALM: std::time::Duration = std::time::Duration::from_secs(10);

    /// With another calm period (tests).
    #[must_use]
    fn with_calm(calm: std::time::Duration) -> Self {
        Self {
            next: Self::FIRST,
            last_error: None,
            calm,
        }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::with_calm(Self::CALM)
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let now = std::time::Instant::now();
        if self
            .last_error
            .is_some_and(|at| now.duration_since(at) >= self.calm)
        {
            self.next = Self::FIRST;
        }
        self.last_error = Some(now);
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        Some(delay.mul_f64(rand::random_range(0.5..=1.0)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    /// A success alone does not start the delays over (see the type's text).
    fn reset(&mut self) {}
}

/// Runs one kind's watcher (with backoff on errors) and forwards its events.
fn spawn_watcher(
    client: Client,
    kind: Kind,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<Change>,
) {
    tokio::spawn(async move {
        let api: Api<WireObject> = Api::all_with(client, &resource(kind));
        let mut events = watcher(api, config)
            .backoff(WatchBackoff::default())
            .boxed();
        let upsert = |object: WireObject, initial| {
            Change::Upsert(kind, object.key(), checked(kind, object), initial)
        };
        while let Some(event) = events.next().await {
            let change = match event {
                Ok(watcher::Event::Init) => Change::Init(kind),
                Ok(watcher::Event::InitApply(o)) => upsert(o, true),
                Ok(watcher::Event::Apply(o)) => upsert(o, false),
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

/// Connects and watches on a thread of its own (a runtime of the source's), so that
/// decoding API objects and keeping the store never delays the runtime that answers
/// DNS, `/healthz` and `/metrics`. Returns once the client is made (or could not be),
/// with the watch's outcome to wait for.
///
/// # Errors
/// When the client cannot be made (kubeconfig, in-cluster config) or the threads
/// cannot start.
pub async fn spawn(
    kubeconfig: Option<std::path::PathBuf>,
    rate: ApiRate,
    node_name: String,
    tx: watch::Sender<SourceUpdate>,
) -> Result<impl std::future::Future<Output = Result<(), SourceError>>, SourceError> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let watching = move || async move {
        let client = match client(kubeconfig.as_deref(), rate).await {
            Ok(client) => client,
            Err(error) => {
                let _ = ready_tx.send(Err(error));
                return Ok(());
            }
        };
        let _ = ready_tx.send(Ok(()));
        run(client, node_name, tx).await
    };
    // One thread: decoding is the work, and two workers handing the connections' reads
    // to each other cost more in wake-ups than they gained (30 000 Services: start →
    // programmed 4.0 s with two, 2.8-3.1 s with one).
    let done = crate::background::spawn("kube-source", watching).map_err(SourceError::Thread)?;
    ready.await.map_err(|_| SourceError::ThreadEnded)??;
    Ok(async move { done.await.unwrap_or(Ok(())) })
}

/// Watches until the receiver is gone, publishing every change as it arrives (the sync
/// loop decides how often to program).
pub async fn run(
    client: Client,
    node_name: String,
    tx: watch::Sender<SourceUpdate>,
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
        // Whatever else has arrived goes into the same version.
        while let Ok(change) = changes.try_recv() {
            dirty |= store.apply(change);
        }
        if !dirty || !store.ready() {
            continue;
        }
        if !announced {
            info!("initial lists from the API server complete");
            announced = true;
        }
        let snapshot = Arc::new(store.snapshot.clone());
        debug!(
            services = snapshot.services().len(),
            slices = snapshot.endpoint_slices().len(),
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

#[cfg(test)]
mod backoff_tests {
    use std::time::Duration;

    use kube::runtime::utils::Backoff as _;

    use super::WatchBackoff;

    #[test]
    fn delays_grow_through_successes_and_start_over_after_a_calm_period() {
        let mut backoff = WatchBackoff::with_calm(Duration::from_millis(200));
        let mut upper = Vec::new();
        for _ in 0..6 {
            let delay = backoff.next().expect("a delay");
            upper.push(delay);
            // A relist answered between two 410s.
            backoff.reset();
        }
        let ms = |d: &Duration| d.as_millis();
        // Each delay is within [half, whole] of 100, 200, 400, 800, 1000, 1000 ms.
        for (delay, whole) in upper.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            assert!(ms(delay) >= whole / 2 && ms(delay) <= whole, "{upper:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
        let after_calm = backoff.next().expect("a delay");
        assert!(after_calm <= Duration::from_millis(100), "{after_calm:?}");
    }
}
