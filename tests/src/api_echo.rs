//! The echo scenario's Service and EndpointSlice as the fake API server holds them, and
//! which pods answer echo now: for the tests that run the agent against the API.
use serde_json::{json, Value};

use crate::{
    cluster::Cluster,
    scenarios::{requests, ECHO_IP},
};

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
