//! The echo scenario's Service and EndpointSlice as the fake API server holds them, and
//! which pods answer echo now: for the tests that run the agent against the API.
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::{
    cluster::Cluster,
    fake_api::{FakeApi, ENDPOINT_SLICES, NODES, SERVICES},
    scenarios::{requests, ECHO_IP},
};

/// The fake API server, served from the LAN namespace, and what keeps it running.
pub struct Served {
    pub api: FakeApi,
    /// A kubeconfig for it, in the cluster's scratch directory.
    pub kubeconfig: PathBuf,
    pub runtime: tokio::runtime::Runtime,
}

/// The fake API server holding echo (web-a and web-b ready) and node1, with a
/// kubeconfig for it at `kubeconfig_name` in the scratch directory.
#[must_use]
pub fn serve(cluster: &Cluster, kubeconfig_name: &str) -> Served {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = cluster.listen_on_lan("10.100.0.254:0");
    let api = runtime.block_on(async { FakeApi::start_on(listener) });
    api.upsert(SERVICES, service());
    api.upsert(ENDPOINT_SLICES, slice(&["10.244.1.2", "10.244.2.2"]));
    api.upsert(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}),
    );
    let kubeconfig = cluster.scratch().join(kubeconfig_name);
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    Served {
        api,
        kubeconfig,
        runtime,
    }
}

/// echo's Service: TCP 80 to the pods' `http` port.
#[must_use]
pub fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
           "spec": {"clusterIP": ECHO_IP, "clusterIPs": [ECHO_IP], "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}})
}

/// echo's one EndpointSlice, every address ready.
#[must_use]
pub fn slice(ready: &[&str]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

/// The pods answering 20 TCP requests to echo from the client pod, sorted, each once.
#[must_use]
pub fn answered(cluster: &Cluster) -> Vec<String> {
    let mut pods: Vec<String> = requests(cluster, "tcp", &format!("{ECHO_IP}:80"), 20)
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_owned())
        .collect();
    pods.sort();
    pods.dedup();
    pods
}
