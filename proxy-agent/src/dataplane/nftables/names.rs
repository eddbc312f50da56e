//! kube-proxy's chain names: a prefix and the first 16 characters of the base32 SHA-256
//! of the same input strings kube-proxy hashes, so an operator can match them up.
use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::{Backend, Protocol, ServicePortName};

fn hashed(prefix: &str, input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let encoded = BASE32.encode(&digest);
    format!("{prefix}{}", &encoded[..16])
}

fn port_input(service: &ServicePortName, protocol: Protocol) -> String {
    format!("{service}{}", protocol.to_string().to_lowercase())
}

/// `KUBE-SVC-…`: the Service port's cluster-wide endpoints.
#[must_use]
pub fn service_chain(service: &ServicePortName, protocol: Protocol) -> String {
    hashed("KUBE-SVC-", &port_input(service, protocol))
}

/// `KUBE-SVL-…`: the Service port's endpoints on this node.
#[must_use]
pub fn local_chain(service: &ServicePortName, protocol: Protocol) -> String {
    hashed("KUBE-SVL-", &port_input(service, protocol))
}

/// `KUBE-EXT-…`: traffic to the port's NodePort, external and load-balancer IPs.
#[must_use]
pub fn external_chain(service: &ServicePortName, protocol: Protocol) -> String {
    hashed("KUBE-EXT-", &port_input(service, protocol))
}

/// `KUBE-FW-…`: `loadBalancerSourceRanges` in front of `KUBE-EXT-…`.
#[must_use]
pub fn firewall_chain(service: &ServicePortName, protocol: Protocol) -> String {
    hashed("KUBE-FW-", &port_input(service, protocol))
}

/// `KUBE-SEP-…`: one endpoint of the port.
#[must_use]
pub fn endpoint_chain(service: &ServicePortName, protocol: Protocol, backend: &Backend) -> String {
    hashed(
        "KUBE-SEP-",
        &format!("{}{backend}", port_input(service, protocol)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(namespace: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }

    #[test]
    fn names_match_kube_proxys_own_fixtures() {
        // The chain names kube-proxy's iptables tests expect for these Service ports.
        assert_eq!(
            service_chain(&port("ns1", "svc1", "p80"), Protocol::Tcp),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            service_chain(&port("ns2", "svc2", "p80"), Protocol::Tcp),
            "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
        );
        let digest = Sha256::digest(b"ns1/svc1:p80tcp10.180.0.1:80");
        let backend = Backend {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(
            endpoint_chain(&port("ns1", "svc1", "p80"), Protocol::Tcp, &backend),
            format!("KUBE-SEP-{}", &BASE32.encode(&digest)[..16])
        );
    }
}
