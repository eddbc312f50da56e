//! A faithful in-process fake of the Kubernetes API's list/watch for Services,
//! EndpointSlices and Nodes: paginated lists at a resourceVersion, watches streaming
//! ADDED/MODIFIED/DELETED from a resourceVersion, BOOKMARKs, `410 Gone` once history is
//! compacted, label and field selectors, and dropped connections on demand.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    ops::Bound,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    response::Response,
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

/// The collections served, by plural name.
pub const SERVICES: &str = "services";
pub const ENDPOINT_SLICES: &str = "endpointslices";
pub const NODES: &str = "nodes";

#[derive(Default)]
struct Collection {
    /// Each object with its JSON text, serialized once when stored (an API server's
    /// watch cache keeps objects encoded too), so a list costs what it sends.
    objects: BTreeMap<(String, String), (Value, String)>,
    /// (resourceVersion, event type, object) of every change since compaction.
    log: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted_before: u64,
    list_delay: Duration,
}

/// What the fake has served, for assertions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub lists: u64,
    pub watches: u64,
    pub gone: u64,
    pub bookmarks: u64,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    collections: HashMap<&'static str, Collection>,
    counters: Counters,
    /// Bumped by each disconnect, under the lock: a watch opened in an earlier epoch
    /// sends nothing stored after it (a dropped connection carries no later event).
    disconnects: u64,
}

#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    changed: broadcast::Sender<()>,
    disconnect: broadcast::Sender<()>,
    /// While true, new watch requests wait (the client looks disconnected).
    held: Arc<tokio::sync::watch::Sender<bool>>,
    /// While true, every request gets `503 Service Unavailable` (an API server down
    /// behind its load balancer).
    down: Arc<AtomicBool>,
    /// While true, every watch gets `410 Gone` (its history always just compacted).
    expired: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

impl FakeApi {
    /// Starts serving on a loopback port (inside the current tokio runtime).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API");
        Self::serve(listener)
    }

    /// Serves on an already bound listener (say, one bound inside a test namespace).
    #[must_use]
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).expect("nonblocking");
        Self::serve(tokio::net::TcpListener::from_std(listener).expect("tokio listener"))
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let mut inner = Inner::default();
        for name in [SERVICES, ENDPOINT_SLICES, NODES] {
            inner.collections.insert(name, Collection::default());
        }
        let api = Self {
            inner: Arc::new(Mutex::new(inner)),
            changed: broadcast::channel(4096).0,
            disconnect: broadcast::channel(16).0,
            held: Arc::new(tokio::sync::watch::channel(false).0),
            down: Arc::new(AtomicBool::new(false)),
            expired: Arc::new(AtomicBool::new(false)),
            addr,
        };
        let app = Router::new()
            .route("/api/v1/{plural}", get(handle))
            .route("/apis/discovery.k8s.io/v1/{plural}", get(handle))
            .with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        api
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces an object (its namespace/name from its metadata).
    pub fn upsert(&self, plural: &'static str, mut object: Value) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        let collection = inner.collections.get_mut(plural).expect("known collection");
        let stored = (object.clone(), object.to_string());
        let kind = if collection.objects.insert(key, stored).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.log.push((rv, kind, object));
        drop(inner);
        let _ = self.changed.send(());
    }

    pub fn delete(&self, plural: &'static str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let collection = inner.collections.get_mut(plural).expect("known collection");
        if let Some((mut object, _)) = collection
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            collection.log.push((rv, "DELETED", object));
        }
        drop(inner);
        let _ = self.changed.send(());
    }

    /// Forgets history: a watch resuming from an earlier resourceVersion than the
    /// current one gets 410 (from the current one, nothing is missing: it is served).
    pub fn compact(&self) {
        let mut inner = self.lock();
        let current = inner.rv;
        for collection in inner.collections.values_mut() {
            collection.log.clear();
            collection.compacted_before = current;
        }
    }

    /// Ends every open watch, as a dropped connection would.
    pub fn disconnect_watches(&self) {
        self.lock().disconnects += 1;
        let _ = self.disconnect.send(());
    }

    /// Holds new watch requests until `release_watches`: with `disconnect_watches`, the
    /// client stays disconnected while changes happen.
    pub fn hold_watches(&self) {
        self.held.send_replace(true);
    }

    pub fn release_watches(&self) {
        self.held.send_replace(false);
    }

    /// An outage: open watches end and every request fails with 503 until
    /// [`Self::recover`].
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.disconnect_watches();
    }

    pub fn recover(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Every watch, open or new, ends with `410 Gone` while `on`: lists still work, so a
    /// client relists and watches again, and is sent away again.
    pub fn expire_every_watch(&self, on: bool) {
        self.expired.store(on, Ordering::SeqCst);
        if on {
            self.disconnect_watches();
        }
    }

    pub fn set_list_delay(&self, plural: &'static str, delay: Duration) {
        self.lock()
            .collections
            .get_mut(plural)
            .expect("known collection")
            .list_delay = delay;
    }

    #[must_use]
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// A kubeconfig file pointing at this server.
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }
}

fn key_of(object: &Value) -> (String, String) {
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (text("namespace"), text("name"))
}

/// `labelSelector` (`key`, `!key`, `key=value`) and `fieldSelector` (`metadata.name=`).
fn selected(object: &Value, query: &HashMap<String, String>) -> bool {
    let labels = &object["metadata"]["labels"];
    let labels_ok = query.get("labelSelector").is_none_or(|selector| {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| {
            if let Some(key) = term.strip_prefix('!') {
                labels.get(key).is_none()
            } else if let Some((key, value)) = term.split_once('=') {
                labels.get(key).and_then(Value::as_str) == Some(value)
            } else {
                labels.get(term).is_some()
            }
        })
    });
    let fields_ok = query.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').all(|term| match term.split_once('=') {
            Some(("metadata.name", name)) => object["metadata"]["name"].as_str() == Some(name),
            Some(("metadata.namespace", ns)) => {
                object["metadata"]["namespace"].as_str() == Some(ns)
            }
            _ => true,
        })
    });
    labels_ok && fields_ok
}

async fn handle(
    State(api): State<FakeApi>,
    Path(plural): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(plural) = [SERVICES, ENDPOINT_SLICES, NODES]
        .into_iter()
        .find(|p| *p == plural)
    else {
        return Response::builder()
            .status(404)
            .body(Body::empty())
            .expect("response");
    };
    if api.down.load(Ordering::SeqCst) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server is currently unable to handle the request", "reason": "ServiceUnavailable", "code": 503});
        return Response::builder()
            .status(503)
            .header("content-type", "application/json")
            .body(Body::from(status.to_string()))
            .expect("response");
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let mut held = api.held.subscribe();
        // The sender lives as long as `api`, so waiting cannot fail.
        let _ = held.wait_for(|held| !*held).await;
        watch(api, plural, query)
    } else {
        list(api, plural, &query).await
    }
}

async fn list(api: FakeApi, plural: &'static str, query: &HashMap<String, String>) -> Response {
    let delay = api.lock().collections[plural].list_delay;
    tokio::time::sleep(delay).await;
    let mut inner = api.lock();
    inner.counters.lists += 1;
    let rv = inner.rv;
    // The continue token names the last key sent: the next page starts after it.
    let after = query
        .get("continue")
        .and_then(|c| c.split_once('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    // Only the page is read, as an API server serves pages from its watch cache.
    let objects = &inner.collections[plural].objects;
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut selected_objects = objects
        .range((from, Bound::Unbounded))
        .filter(|(_, (o, _))| selected(o, query));
    let mut items = String::from("[");
    let mut last = None;
    for (key, (_, text)) in selected_objects.by_ref().take(limit) {
        if last.is_some() {
            items.push(',');
        }
        items.push_str(text);
        last = Some(key);
    }
    items.push(']');
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (Some((ns, name)), Some(_)) = (last, selected_objects.next()) {
        metadata["continue"] = json!(format!("{ns}/{name}"));
    }
    drop(inner);
    let body =
        format!(r#"{{"kind":"List","apiVersion":"v1","metadata":{metadata},"items":{items}}}"#);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("response")
}

fn event_line(kind: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

/// Streams events after `resourceVersion` until a disconnect, the timeout, or the client
/// goes away; `410 Gone` when that version is compacted away.
fn watch(api: FakeApi, plural: &'static str, query: HashMap<String, String>) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let (tx, rx) = mpsc::channel::<String>(1024);
    let mut changed = api.changed.subscribe();
    let mut disconnect = api.disconnect.subscribe();
    let epoch;
    {
        let mut inner = api.lock();
        inner.counters.watches += 1;
        epoch = inner.disconnects;
        if from < inner.collections[plural].compacted_before || api.expired.load(Ordering::SeqCst) {
            inner.counters.gone += 1;
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410});
            let _ = tx.try_send(event_line("ERROR", &status));
            return stream_response(rx);
        }
    }
    tokio::spawn(async move {
        let mut sent = from;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_millis(200));
        loop {
            let (lines, read_to): (Vec<String>, u64) = {
                let inner = api.lock();
                if inner.disconnects != epoch {
                    return;
                }
                let log = &inner.collections[plural].log;
                // The log is in resourceVersion order: only what is new is read, as an
                // API server's watch cache does, and what the selector leaves out is
                // read once (the watch's progress, which bookmarks report, passes it).
                let new = log.partition_point(|(rv, _, _)| *rv <= sent);
                let lines = log[new..]
                    .iter()
                    .filter(|(_, _, o)| selected(o, &query))
                    .map(|(_, kind, o)| event_line(kind, o))
                    .collect();
                (lines, log.last().map_or(sent, |(rv, _, _)| sent.max(*rv)))
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            sent = read_to;
            tokio::select! {
                biased;
                _ = disconnect.recv() => return,
                _ = changed.recv() => {}
                () = &mut deadline => return,
                _ = bookmark.tick(), if bookmarks => {
                    api.lock().counters.bookmarks += 1;
                    let object = json!({"kind": "Bookmark", "apiVersion": "v1", "metadata": {"resourceVersion": sent.to_string()}});
                    if tx.send(event_line("BOOKMARK", &object)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<String>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}
