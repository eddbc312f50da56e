//! kube-proxy's health-check node ports: for each `externalTrafficPolicy: Local` Service,
//! an HTTP server on its `healthCheckNodePort` tells load balancers whether this node has
//! endpoints of it (200) or not (503), so they only send traffic where it stays local.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::AbortHandle,
};
use tracing::{info, warn};

use crate::{health::Health, model::DesiredState};

/// One Service's check, as served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The checks a desired state asks for, by port: the Service's distinct local endpoints.
#[must_use]
pub fn checks(desired: &DesiredState) -> BTreeMap<u16, Check> {
    let mut found: BTreeMap<u16, (Check, BTreeSet<IpAddr>)> = BTreeMap::new();
    for frontend in desired.frontends.values() {
        let Some(port) = frontend.health_check_node_port else {
            continue;
        };
        let entry = found.entry(port).or_insert_with(|| {
            (
                Check {
                    namespace: frontend.service.namespace.clone(),
                    name: frontend.service.name.clone(),
                    local_endpoints: 0,
                },
                BTreeSet::new(),
            )
        });
        if frontend.external.local {
            entry
                .1
                .extend(frontend.external.backends.iter().map(|b| b.ip));
        }
    }
    found
        .into_iter()
        .map(|(port, (mut check, ips))| {
            check.local_endpoints = ips.len();
            (port, check)
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

type Shared = Arc<RwLock<BTreeMap<u16, Check>>>;

/// The servers, one per port, following each sync.
pub struct HealthChecks {
    state: Shared,
    servers: HashMap<u16, AbortHandle>,
    health: Arc<Health>,
    /// Where the servers run (the agent's main runtime, not the sync thread's).
    runtime: tokio::runtime::Handle,
}

impl HealthChecks {
    #[must_use]
    pub fn new(health: Arc<Health>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            state: Arc::default(),
            servers: HashMap::new(),
            health,
            runtime,
        }
    }

    /// Serves exactly the checks `desired` asks for.
    pub fn update(&mut self, desired: &DesiredState) {
        let wanted = checks(desired);
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.abort();
            }
            keep
        });
        for &port in wanted.keys() {
            if self.servers.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
            let _runtime = self.runtime.enter();
            let bound = std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            });
            match bound {
                Ok(listener) => {
                    info!(port, "health check node port serving");
                    let task = self.runtime.spawn(serve(
                        listener,
                        port,
                        self.state.clone(),
                        self.health.clone(),
                    ));
                    self.servers.insert(port, task.abort_handle());
                }
                Err(error) => warn!(port, %error, "cannot serve the health check node port"),
            }
        }
        *self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted;
    }
}

async fn serve(listener: TcpListener, port: u16, state: Shared, health: Arc<Health>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let (state, health) = (state.clone(), health.clone());
        tokio::spawn(async move {
            // Any path, any method: read the request head and answer.
            let mut buffer = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buffer))
                    .await;
            let check = state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&port)
                .cloned();
            let Some(check) = check else {
                return;
            };
            let body = serde_json::to_string(&Body {
                service: ServiceRef {
                    namespace: &check.namespace,
                    name: &check.name,
                },
                local_endpoints: check.local_endpoints,
                service_proxy_healthy: health.is_healthy(),
            })
            .unwrap_or_default();
            let status = if check.local_endpoints > 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::checks;
    use crate::{
        model::{self, NodeInfo},
        source::manifests::ManifestsDir,
    };

    #[test]
    fn counts_this_nodes_endpoints_of_each_local_service() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.9
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP},
          {name: alt, port: 81, targetPort: 8080, nodePort: 30081, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: alt, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node1}
- {addresses: [10.244.1.3], nodeName: node1}
- {addresses: [10.244.2.2], nodeName: node2}
";
        let dir = std::env::temp_dir().join(format!("pa-hc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), yaml).unwrap();
        let mut manifests = ManifestsDir::new(&dir);
        manifests.reload().unwrap();
        let snapshot = manifests.snapshot();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut node = NodeInfo::named("node1");
        node.addresses.push("10.100.0.1".parse().unwrap());
        let found = checks(&model::build(&snapshot, &node));
        assert_eq!(found.len(), 1);
        assert_eq!(found[&32000].name, "web");
        assert_eq!(found[&32000].local_endpoints, 2);
        let node3 = NodeInfo::named("node3");
        assert_eq!(
            checks(&model::build(&snapshot, &node3))[&32000].local_endpoints,
            0
        );
    }
}
