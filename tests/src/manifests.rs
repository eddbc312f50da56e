//! Writing Service and `EndpointSlice` manifests for a simulated cluster.
use std::{fmt::Write, fs, path::Path};

/// One endpoint of a slice.
pub struct Endpoint<'a> {
    pub ip: &'a str,
    pub ready: bool,
    pub node: &'a str,
}

/// A `ClusterIP` Service with `(name, protocol, port, targetPort name)` ports.
#[must_use]
pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, &str, u16)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n"
    );
    for (port_name, protocol, port) in ports {
        let _ = writeln!(text, "  - {{name: {port_name}, protocol: {protocol}, port: {port}, targetPort: {port_name}}}");
    }
    text
}

/// An `EndpointSlice` for `service` with `(name, protocol, port)` ports.
#[must_use]
pub fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[Endpoint<'_>],
) -> String {
    let mut text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (port_name, protocol, port) in ports {
        let _ = writeln!(
            text,
            "- {{name: {port_name}, protocol: {protocol}, port: {port}}}"
        );
    }
    text.push_str("endpoints:\n");
    for e in endpoints {
        let _ = writeln!(
            text,
            "- addresses: [{}]\n  nodeName: {}\n  conditions: {{ready: {}}}",
            e.ip, e.node, e.ready
        );
    }
    text
}

/// Writes a file atomically (write then rename), as an operator's tooling would.
pub fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text).expect("write manifest");
    fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}
