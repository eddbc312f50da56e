//! Synthetic clusters of many Services for the scale tests and the bench: Service `i`
//! has ClusterIP 10.96.x.y, one TCP port and `endpoints` ready pods in 10.128.0.0/9.
use std::{fmt::Write, net::Ipv4Addr};

use proxy_agent::{model::Snapshot, source::manifests::ManifestsDir};

/// The ClusterIP of Service `i`.
#[must_use]
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("service index");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
}

/// Endpoint `e` of Service `i`.
#[must_use]
pub fn endpoint_ip(i: usize, e: usize, endpoints: usize) -> Ipv4Addr {
    let k = u32::try_from(i * endpoints + e).expect("endpoint index");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + k)
}

/// Manifests for `services` Services with `endpoints` endpoints each.
#[must_use]
pub fn manifests(services: usize, endpoints: usize) -> String {
    let mut out = String::with_capacity(services * (400 + endpoints * 60));
    for i in 0..services {
        let ip = cluster_ip(i);
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for e in 0..endpoints {
            let _ = writeln!(
                out,
                "- addresses: [{}]\n  conditions: {{ready: true}}",
                endpoint_ip(i, e, endpoints)
            );
        }
        out.push_str("---\n");
    }
    out
}

/// The snapshot of [`manifests`], read the way the agent reads a manifests directory.
#[must_use]
pub fn snapshot(services: usize, endpoints: usize) -> Snapshot {
    let dir = std::env::temp_dir().join(format!(
        "proxy-agent-scale-{}-{services}-{endpoints}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scale dir");
    std::fs::write(dir.join("all.yaml"), manifests(services, endpoints)).expect("write");
    let mut source = ManifestsDir::new(&dir);
    source.reload().expect("scale manifests");
    let _ = std::fs::remove_dir_all(&dir);
    source.snapshot()
}

/// `snapshot` with the first endpoint of Service `i` replaced by `ip` (a pod moved).
#[must_use]
pub fn with_endpoint(snapshot: &Snapshot, i: usize, ip: Ipv4Addr) -> Snapshot {
    let mut changed = snapshot.clone();
    let key = ("bench".to_owned(), format!("s{i}-1"));
    let mut slice = (**changed.endpoint_slices().get(&key).expect("slice")).clone();
    slice.endpoints[0].address = ip.into();
    changed.put_slice(key, std::sync::Arc::new(slice));
    changed
}

/// `snapshot` with Service `i`'s endpoints replaced by `ips` (real pods for the bench).
#[must_use]
pub fn with_endpoints(snapshot: &Snapshot, i: usize, ips: &[Ipv4Addr]) -> Snapshot {
    let mut changed = snapshot.clone();
    let key = ("bench".to_owned(), format!("s{i}-1"));
    let mut slice = (**changed.endpoint_slices().get(&key).expect("slice")).clone();
    let template = slice.endpoints[0].clone();
    slice.endpoints = ips
        .iter()
        .map(|ip| {
            let mut endpoint = template.clone();
            endpoint.address = (*ip).into();
            endpoint
        })
        .collect();
    changed.put_slice(key, std::sync::Arc::new(slice));
    changed
}
