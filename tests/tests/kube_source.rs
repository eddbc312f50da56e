//! The Kubernetes API source against the in-process fake API server: initial sync,
//! relists after `410 Gone`, the sync loop coalescing a burst, and malformed objects.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_agent::{
    dataplane::{Applied, Dataplane, DataplaneError},
    health::Health,
    introspect::Live,
    metrics::Metrics,
    model::{Backend, DesiredState, NodeInfo, Plan, Snapshot},
    source::{kube as kube_source, SourceUpdate},
    sync,
};
use proxy_agent_tests::fake_api::{FakeApi, ENDPOINT_SLICES, NODES, SERVICES};
use serde_json::{json, Value};
use tokio::sync::watch;

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(name: &str, service: &str, ips: &[String]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}

/// Starts the source against `api` for node1; returns the receiver of its updates.
fn start(api: &FakeApi) -> watch::Receiver<SourceUpdate> {
    let config = kube::Config::new(format!("http://{}", api.addr).parse().expect("url"));
    let client = kube_source::client_from(config).expect("client");
    let (tx, rx) = watch::channel(SourceUpdate::default());
    tokio::spawn(kube_source::run(client, "node1".into(), tx));
    rx
}

/// Waits up to `limit` for a published snapshot satisfying `ok`.
async fn wait_for(
    rx: &mut watch::Receiver<SourceUpdate>,
    limit: Duration,
    ok: impl Fn(&Snapshot) -> bool,
) -> (u64, Arc<Snapshot>) {
    let result = tokio::time::timeout(limit, async {
        loop {
            {
                let update = rx.borrow_and_update();
                if let Some(snapshot) = update.snapshot.as_ref().filter(|s| ok(s)) {
                    return (update.generation, Arc::clone(snapshot));
                }
            }
            rx.changed().await.expect("source alive");
        }
    })
    .await;
    result.expect("snapshot not reached in time")
}

fn service_names(snapshot: &Snapshot) -> Vec<&str> {
    snapshot.services().keys().map(|k| k.1.as_str()).collect()
}

fn cluster_ip(snapshot: &Snapshot, name: &str) -> Option<String> {
    snapshot
        .services()
        .get(&("default".to_owned(), name.to_owned()))?
        .cluster_ips
        .first()
        .map(ToString::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_until_every_kind_has_listed() {
    let api = FakeApi::start().await;
    api.upsert(SERVICES, service("web", "10.96.0.10"));
    api.upsert(
        ENDPOINT_SLICES,
        slice("web-1", "web", &["10.244.1.2".into()]),
    );
    api.upsert(NODES, node("node1"));
    api.upsert(NODES, node("node2"));
    api.set_list_delay(NODES, Duration::from_millis(600));
    let mut rx = start(&api);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.borrow().snapshot.is_none(),
        "published before the Node list arrived"
    );
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(5), |_| true).await;
    assert_eq!(snapshot.services().len(), 1);
    assert_eq!(snapshot.endpoint_slices().len(), 1);
    // Only this agent's own Node is watched (field selector).
    assert_eq!(snapshot.nodes().keys().collect::<Vec<_>>(), ["node1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_missed_while_disconnected_is_reconciled_by_the_relist() {
    let api = FakeApi::start().await;
    api.upsert(SERVICES, service("keep", "10.96.0.10"));
    api.upsert(SERVICES, service("gone", "10.96.0.11"));
    api.upsert(NODES, node("node1"));
    let mut rx = start(&api);
    wait_for(&mut rx, Duration::from_secs(5), |s| s.services().len() == 2).await;
    // The connection drops, the Service is deleted meanwhile, and the history that
    // would have carried the DELETED event is compacted: the watch resumes into 410.
    api.hold_watches();
    api.disconnect_watches();
    api.delete(SERVICES, "default", "gone");
    api.compact();
    api.release_watches();
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(15), |s| {
        s.services().len() == 1
    })
    .await;
    assert!(cluster_ip(&snapshot, "keep").is_some());
    assert!(
        api.counters().gone >= 1,
        "the watch never hit 410: {:?}",
        api.counters()
    );
    assert!(api.counters().lists >= 4, "no relist: {:?}", api.counters());
    // Watches resume after the relist: a new Service still arrives.
    api.upsert(SERVICES, service("late", "10.96.0.12"));
    wait_for(&mut rx, Duration::from_secs(5), |s| {
        cluster_ip(s, "late").is_some()
    })
    .await;
    assert!(
        api.counters().bookmarks >= 1,
        "no bookmarks were requested: {:?}",
        api.counters()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_api_outage_the_source_is_watching_again_within_two_seconds() {
    let api = FakeApi::start().await;
    api.upsert(SERVICES, service("web", "10.96.0.10"));
    api.upsert(NODES, node("node1"));
    let mut rx = start(&api);
    wait_for(&mut rx, Duration::from_secs(5), |s| s.services().len() == 1).await;
    // 20 s of 503s: long enough for kube-rs's default backoff to reach 12.8 s.
    api.go_down();
    let watches = api.counters().watches;
    tokio::time::sleep(Duration::from_secs(20)).await;
    api.recover();
    let ended = std::time::Instant::now();
    api.upsert(SERVICES, service("late", "10.96.0.12"));
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(15), |s| {
        cluster_ip(s, "late").is_some()
    })
    .await;
    let took = ended.elapsed();
    println!("a change made as the outage ended arrived after {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "a change made as the outage ended took {took:?}"
    );
    assert!(
        cluster_ip(&snapshot, "web").is_some(),
        "the outage removed a Service"
    );
    assert!(api.counters().watches > watches, "{:?}", api.counters());
}

/// A dataplane that only records what it was asked to program: the sync loop's
/// scheduling is under test here, not the kernel.
struct Recording(Arc<Mutex<Vec<DesiredState>>>);

impl Dataplane for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn programmed(&mut self) -> Result<DesiredState, DataplaneError> {
        Ok(DesiredState::default())
    }
    fn apply(&mut self, _plan: &Plan, desired: &DesiredState) -> Result<Applied, DataplaneError> {
        self.0.lock().unwrap().push(desired.clone());
        Ok(Applied::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_slice_updates_costs_a_handful_of_syncs() {
    let api = FakeApi::start().await;
    api.upsert(SERVICES, service("web", "10.96.0.10"));
    api.upsert(NODES, node("node1"));
    let rx = start(&api);
    let synced = Arc::new(Mutex::new(Vec::new()));
    let health = Arc::new(Health::new("recording", Duration::from_mins(1)));
    let metrics = Arc::new(Metrics::new("recording", &health.answers, Vec::new()));
    let period = Duration::from_millis(500);
    tokio::spawn(sync::spawn(sync::Inputs {
        updates: rx,
        addresses: watch::channel(Vec::new()).1,
        dataplane: Box::new(Recording(synced.clone())),
        node: NodeInfo::named("node1"),
        health,
        metrics,
        live: Arc::new(Live::new("recording", "/nonexistent".into())),
        min_sync_period: period,
        sync_period: Duration::from_hours(1),
        runtime: tokio::runtime::Handle::current(),
    }));
    let count = || synced.lock().unwrap().len();
    while count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..1000u32 {
        let ips = vec![format!("10.244.{}.{}", i / 250, i % 250 + 1)];
        api.upsert(ENDPOINT_SLICES, slice("web-1", "web", &ips));
    }
    let last: Backend = Backend {
        ip: "10.244.3.250".parse().unwrap(),
        port: 8080,
    };
    let programmed_last = || {
        synced.lock().unwrap().last().is_some_and(|d| {
            d.frontends
                .values()
                .any(|f| f.pod.backends.as_ref() == [last])
        })
    };
    let started = std::time::Instant::now();
    while !programmed_last() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the last update never synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let burst = started.elapsed();
    let syncs = count() - 1;
    println!("1000 updates over {burst:?} -> {syncs} syncs");
    // One at the leading edge, then at most one per period the burst lasted.
    let periods = usize::try_from(burst.as_millis() / period.as_millis()).unwrap();
    assert!(syncs <= periods + 2, "{syncs} syncs for one burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_skipped_and_keep_their_last_good_version() {
    let api = FakeApi::start().await;
    api.upsert(SERVICES, service("good", "10.96.0.10"));
    api.upsert(SERVICES, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "garbled", "namespace": "default"},
                                "spec": {"ports": "not-a-list"}}));
    api.upsert(SERVICES, service("bad-ip", "10.96.0.999"));
    api.upsert(NODES, node("node1"));
    let mut rx = start(&api);
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(5), |_| true).await;
    assert_eq!(service_names(&snapshot), ["good"]);
    // A bad update keeps the last good version; a good one after it applies.
    api.upsert(SERVICES, service("good", "not-an-ip"));
    api.upsert(SERVICES, service("other", "10.96.0.20"));
    let (_, snapshot) =
        wait_for(&mut rx, Duration::from_secs(5), |s| s.services().len() == 2).await;
    assert_eq!(cluster_ip(&snapshot, "good").as_deref(), Some("10.96.0.10"));
    // The same holds across a relist.
    api.hold_watches();
    api.disconnect_watches();
    api.upsert(SERVICES, service("after-relist", "10.96.0.21"));
    api.compact();
    api.release_watches();
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(15), |s| {
        s.services().len() == 3
    })
    .await;
    assert_eq!(cluster_ip(&snapshot, "good").as_deref(), Some("10.96.0.10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_another_proxy_are_not_watched() {
    let api = FakeApi::start().await;
    let mut other = service("theirs", "10.96.0.30");
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
    api.upsert(SERVICES, other);
    api.upsert(SERVICES, service("ours", "10.96.0.31"));
    api.upsert(NODES, node("node1"));
    let mut rx = start(&api);
    let (_, snapshot) = wait_for(&mut rx, Duration::from_secs(5), |_| true).await;
    assert_eq!(service_names(&snapshot), ["ours"]);
}
