//! Checks an object must pass before the model sees it. A failing object is logged
//! with its name and reason by the source, which then keeps its last good version.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use thiserror::Error;

use super::types::Protocol;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("clusterIP {0:?} is not an IP address")]
    BadClusterIp(String),
    #[error("port {0} is outside 1-65535")]
    BadPort(i32),
    #[error("protocol {0:?} is not TCP, UDP or SCTP")]
    BadProtocol(String),
    #[error("addressType {0:?} is not IPv4, IPv6 or FQDN")]
    BadAddressType(String),
    #[error("endpoint address {0:?} is not a valid {1} address")]
    BadAddress(String, String),
}

pub fn service(service: &Service) -> Result<(), ValidationError> {
    if service
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(ValidationError::MissingName);
    }
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    let ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    for ip in ips {
        if !ip.is_empty() && ip != "None" && ip.parse::<IpAddr>().is_err() {
            return Err(ValidationError::BadClusterIp(ip.clone()));
        }
    }
    for port in spec.ports.iter().flatten() {
        if !(1..=65535).contains(&port.port) {
            return Err(ValidationError::BadPort(port.port));
        }
        protocol(port.protocol.as_deref())?;
    }
    Ok(())
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), ValidationError> {
    if slice
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(ValidationError::MissingName);
    }
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return Ok(()),
        other => return Err(ValidationError::BadAddressType(other.to_owned())),
    };
    for address in slice.endpoints.iter().flat_map(|e| &e.addresses) {
        let ok = address
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_ipv4() == want_v4);
        if !ok {
            return Err(ValidationError::BadAddress(
                address.clone(),
                slice.address_type.clone(),
            ));
        }
    }
    for port in slice.ports.iter().flatten() {
        if let Some(n) = port.port {
            if !(1..=65535).contains(&n) {
                return Err(ValidationError::BadPort(n));
            }
        }
        protocol(port.protocol.as_deref())?;
    }
    Ok(())
}

fn protocol(name: Option<&str>) -> Result<Protocol, ValidationError> {
    Protocol::from_k8s(name)
        .ok_or_else(|| ValidationError::BadProtocol(name.unwrap_or_default().to_owned()))
}
